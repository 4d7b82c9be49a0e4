"""The JSON record of one gpu-checks.sh call, for docs/measurements/ (run by the script, not by hand).

    gpu_summary.py record STEPS NAME RC SECONDS OUTPUT -- CMD...   one step: its command and figures
                                                                   (RC `skipped`: not run, DEADLINE)
    gpu_summary.py write STEPS RUNS DEST PARTS QUICK               the call: machine, versions, steps, runs

A step's figures are the JSON objects it printed (bench reports, evaluate/select results) and its
figure lines (epoch lines, `done:`, wall time); a run's figures are its run.json, metrics.jsonl and
config.yaml, read from the run directory itself; a run a time limit cut is listed with its status
(running), and the resume state that came back for it in OUT (gpu_resume.py pack) with its parts'
names, size and sha256. Paths under the home folder are written as ~/...
Standard library only (plus torch and friends, for their versions): it runs on the GPU machine as is.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

# ... and the lines that say a run was resumed, or cut by the step's time limit (and where it can go on)
FIGURE_LINE = re.compile(
    r"^(epoch \d+[: ]|done:|wall |chosen on validation|.*tok/s|resuming |imdb-lora: stopped)"
)


def record(steps: Path, name: str, rc: str, seconds: str, output: Path, cmd: list[str]) -> None:
    text = output.read_text(errors="replace") if output.is_file() else ""
    objects, lines = [], []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                objects.append(json.loads(line))
                continue
            except json.JSONDecodeError:
                pass
        if FIGURE_LINE.match(line):
            lines.append(line[:600])
    row = {
        "step": name,
        "rc": None if rc == "skipped" else int(rc),
        "skipped": rc == "skipped",
        "seconds": int(seconds),
        "command": cmd,
        "json": objects,
        "lines": lines,
    }
    with steps.open("a") as f:
        f.write(json.dumps(row) + "\n")


def machine() -> dict:
    out: dict = {"python": platform.python_version(), "host": platform.node()}
    try:
        import peft
        import torch
        import transformers

        out.update(torch=torch.__version__, transformers=transformers.__version__, peft=peft.__version__)
        out["gpu"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
        out["cuda"] = torch.version.cuda
    except ImportError as e:
        out["versions_error"] = str(e)
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        out["nvidia_smi"] = smi.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["nvidia_smi"] = None
    return out


def runs_in(root: Path) -> list[dict]:
    """Every run directory under root (compare puts lora/ and full/ one level deeper)."""
    out = []
    for status in sorted([*root.glob("*/run.json"), *root.glob("*/*/run.json")]):
        run = status.parent
        entry: dict = {"run": str(run.relative_to(root)), "summary": json.loads(status.read_text())}
        metrics = run / "metrics.jsonl"
        if metrics.is_file():
            entry["epochs"] = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        if (run / "config.yaml").is_file():
            entry["config_yaml"] = (run / "config.yaml").read_text()
        out.append(entry)
    for table in sorted(root.glob("*/comparison.md")):
        out.append({"run": str(table.parent.relative_to(root)), "comparison_md": table.read_text()})
    return out


def resume_states(out: Path) -> dict[str, dict]:
    """The cut runs' resume states in OUT (gpu_resume.py pack): their parts, size and the whole's sha256,
    which the next session checks what it stages against."""
    found: dict[str, list[Path]] = {}
    for part in sorted(out.glob("*.resume.tgz.[0-9][0-9]")):
        found.setdefault(part.name.split(".resume.tgz.")[0], []).append(part)
    out_states = {}
    for name, parts in found.items():
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part.read_bytes())
        out_states[name] = {
            "parts": [p.name for p in parts],
            "bytes": sum(p.stat().st_size for p in parts),
            "sha256": digest.hexdigest(),
        }
    return out_states


def write(steps: Path, runs: Path, dest: Path, parts: str, quick: str) -> None:
    rows = [json.loads(line) for line in steps.read_text().splitlines()] if steps.is_file() else []
    doc = {
        "what": "scripts/gpu-checks.sh " + parts,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "quick_rehearsal": quick == "1",
        "machine": machine(),
        "steps": rows,
        "runs": runs_in(runs) if runs.is_dir() else [],
        "resume_states": resume_states(dest.parent),
    }
    # Paths under the home folder are written as ~/...: no machine paths in committed files.
    dest.write_text(json.dumps(doc, indent=1).replace(str(Path.home()) + "/", "~/") + "\n")


def main(argv: list[str]) -> int:
    if len(argv) >= 7 and argv[0] == "record" and argv[6] == "--":
        record(Path(argv[1]), argv[2], argv[3], argv[4], Path(argv[5]), argv[7:])
    elif len(argv) == 6 and argv[0] == "write":
        write(Path(argv[1]), Path(argv[2]), Path(argv[3]), argv[4], argv[5])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
