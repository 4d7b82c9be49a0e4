"""What scripts/gpu-checks.sh runs needs only the packages the GPU machine has.

scripts/gpu-like/sitecustomize.py makes a Python process refuse FastAPI, uvicorn, starlette, Ray and
Playwright, as the GPU machine lacks them; here the commands the GPU script calls (train, bench train,
bench eval, select) run on tiny models in one such process. `compare` runs `train` in subprocesses
(about 9 s each to start here), so only its modules are imported.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import train_args

GPU_LIKE = Path(__file__).resolve().parents[1] / "scripts" / "gpu-like"

SCRIPT = textwrap.dedent(
    """
    import json, sys
    try:
        import fastapi  # noqa: F401
        sys.exit("the gpu-like start-up hook did not run")
    except ModuleNotFoundError:
        pass
    import imdb_lora.cli.compare, imdb_lora.runs.compare  # noqa: E401, F401
    from imdb_lora.cli import main
    for args in json.loads(sys.argv[1]):
        if main(args) != 0:
            sys.exit(f"failed: {args[:2]}")
    """
)


def test_gpu_script_commands_need_no_package_the_gpu_machine_lacks(tiny_models, imdb_dir, tmp_path):
    bert, roberta = str(tiny_models("bert")), str(tiny_models("roberta"))
    run = tmp_path / "run"
    tiny = ["--samples", "16", "--batch-size", "4", "--max-length", "64", "--device", "cpu"]
    commands = [
        train_args(tiny_models("bert"), imdb_dir, run, "--epochs", "1", "--batching", "flat"),
        ["bench", "train", "--model", roberta, "--data", str(imdb_dir), "--batching", "flat",
         "--steps", "1", "--warmup", "1", *tiny, "--json"],
        ["bench", "eval", "--model", bert, "--data", str(imdb_dir), "--batching", "flat", *tiny, "--json"],
        ["select", str(run), "--window-strides", "0,32", "--json"],
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(GPU_LIKE), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(commands)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "run.json").is_file()
