"""The optional extras (pyproject.toml's [project.optional-dependencies]) and the modules each brings.

`pip install imdb-lora` trains, evaluates, predicts and exports merged models; `serve`, ONNX and `score`
need an extra. A command that needs one that is not installed checks before it reads or loads anything
and ends with one line naming what to install, never an ImportError's traceback from deep inside.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

from .errors import UserError

# extra -> the top-level modules its packages provide (tests/test_packaging.py holds them to pyproject.toml)
EXTRAS: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "h11", "prometheus_client"),
    "onnx": ("onnx", "onnxruntime", "onnxscript"),
    "scale": ("pyarrow", "ray"),
}


def installed(module: str) -> bool:
    """Whether `module` can be imported: a top-level one is only looked up (`--help` and a mistyped
    path stay fast); a submodule (`ray.data`, whose own dependencies come with `ray[data]`) is imported."""
    if "." in module:
        try:
            importlib.import_module(module)
        except ImportError:
            return False
        return True
    if module in sys.modules:  # already imported (None: its import is blocked, as `import` says)
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(extra: str, what: str, modules: tuple[str, ...] | None = None) -> None:
    """`what` (a command, a flag or a file) needs `modules` (default: all of `extra`'s), or it ends with
    one line, e.g. `serve needs fastapi, which is not installed: pip install 'imdb-lora[serve]'`."""
    for module in modules if modules is not None else EXTRAS[extra]:
        if not installed(module):
            raise UserError(
                f"{what} needs {module}, which is not installed: pip install 'imdb-lora[{extra}]'"
            )
