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


def test_a_timed_step_cut_by_its_limit_ends_after_the_command_has_stopped(tmp_path):
    # GNU time dies of the limit's SIGTERM at once: with the limit outside it, the step returned while
    # the training it timed was still stopping (the run then packed half-stopped, its last lines lost)
    done = tmp_path / "stopped"
    child = f"trap 'sleep 1; echo stopped; touch {done}; exit 143' TERM; sleep 30 & wait"
    code = (
        f"set -uo pipefail; out={tmp_path}; log=$out/log.txt; summary=$out/summary.txt; steps=$out/steps\n"
        f"deadline=100000; py=true; here=.\n{shell_function('step')}\n"
        f"step cut 1 /usr/bin/time -f 'wall %e s' bash -c \"{child}\"; echo rc=$?"
    )
    r = subprocess.run(["bash", "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().endswith("rc=124"), r.stdout + r.stderr
    assert done.exists()  # the step waited for the command's own clean-up
    assert "stopped" in (tmp_path / "log.txt").read_text()
    assert re.search(r"^cut +rc=124", (tmp_path / "summary.txt").read_text(), re.M)
