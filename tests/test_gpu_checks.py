"""scripts/gpu-checks.sh's shell helpers, run by bash on their own (the script itself needs a GPU stage)."""

import json
import re
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu-checks.sh"


def shell_function(name: str) -> str:
    return re.search(rf"^{name}\(\) \{{.*?^\}}", SCRIPT.read_text(), re.S | re.M).group(0)


def test_finished_runs_lists_each_finished_run_once_in_order(tmp_path):
    # `select` refuses a run listed twice, so the candidates the script hands it must be unique
    for name, status in (("a", "finished"), ("b", "finished"), ("c", "running")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps({"status": status}, indent=2))
    code = f"set -uo pipefail; runs={tmp_path}\n{shell_function('finished_runs')}\nfinished_runs b c a b d a"
    r = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(tmp_path / "b"), str(tmp_path / "a")]
