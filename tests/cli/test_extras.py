"""A command that needs an optional extra (serve, onnx, scale) which is not installed ends with one line
naming the extra to install, before it reads anything: it used to end in an ImportError traceback from
deep inside (`serve` after loading the model)."""

import sys

import pytest

from imdb_lora.cli import main
from imdb_lora.extras import EXTRAS


def blocked(monkeypatch, *modules: str) -> None:
    """`import m` raises ImportError for each of `modules`, as where its package is not installed."""
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)


@pytest.mark.parametrize(
    ("module", "args", "needs"),
    [
        ("fastapi", ["serve", "RUN"], "serve needs fastapi"),
        ("uvicorn", ["serve", "RUN", "--port", "0"], "serve needs uvicorn"),
        ("prometheus_client", ["bench", "serve", "RUN"], "bench serve needs prometheus_client"),
        ("onnxscript", ["export", "RUN", "--to", "OUT", "--format", "onnx"], "export --format onnx needs onnxscript"),
        ("onnxruntime", ["export", "RUN", "--to", "OUT", "--format", "onnx", "--quantize", "int8"],
         "export --format onnx needs onnxruntime"),
        ("pyarrow", ["score", "RUN", "--input", "IN", "--output", "OUT"], "score needs pyarrow"),
        ("ray", ["score", "RUN", "--input", "IN", "--output", "OUT", "--engine", "ray"],
         "score --engine ray needs ray"),
    ],
)  # fmt: skip
def test_a_missing_extra_is_one_line_naming_it(module, args, needs, monkeypatch, tmp_path, capsys):
    blocked(monkeypatch, module)
    extra = next(e for e, modules in EXTRAS.items() if module in modules)
    args = [str(tmp_path / a) if a.isupper() else a for a in args]  # paths that do not exist: never read
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == f"imdb-lora: error: {needs}, which is not installed: pip install 'imdb-lora[{extra}]'\n"


def test_an_onnx_export_without_onnxruntime_says_which_extra(monkeypatch, tmp_path):
    from imdb_lora.errors import UserError
    from imdb_lora.inference.onnx_backend import OnnxModel

    blocked(monkeypatch, "onnxruntime")
    with pytest.raises(UserError, match=r"^the ONNX export .* needs onnxruntime, .*imdb-lora\[onnx\]'$"):
        OnnxModel(tmp_path / "model.onnx")


def test_ray_data_without_its_dependencies_says_which_extra(monkeypatch):
    from imdb_lora.errors import UserError
    from imdb_lora.extras import require

    blocked(monkeypatch, "ray.data")  # `ray` without `ray[data]`: importing ray.data fails
    with pytest.raises(UserError, match=r"^score --engine ray needs ray.data, .*imdb-lora\[scale\]'$"):
        require("scale", "score --engine ray", ("ray.data",))


def test_installed_extras_pass_the_check():
    from imdb_lora.extras import require

    for extra in EXTRAS:  # the dev install has them all
        require(extra, "test")
