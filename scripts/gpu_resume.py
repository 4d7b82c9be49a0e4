"""A training run cut by gpu-checks.sh's DEADLINE, carried to the next GPU session (run by the script).

    gpu_resume.py pack RUN OUT          RUN's resume state as OUT/NAME.resume.tgz.00, .01, ... (each at
                                        most 16 MiB), if the device's limits on what comes back allow
    gpu_resume.py restore STAGE RUNS NAME MODEL DATA
                                        STAGE/NAME.resume.tgz.* put back as RUNS/NAME, its config.yaml
                                        pointed at this machine's MODEL and DATA (same folder/file names)
    gpu_resume.py need RUN SECONDS      the seconds a whole run needs, scaled to the epochs RUN has left

The machine is fresh every session, so a cut run's directory is lost with it unless it comes back
through OUT: at most 8 files, 16 MiB each, 64 MiB together (docs/development.md). What `train --resume`
needs is the run directory less its lock and half-written temporaries: checkpoint.safetensors (trainable
weights, AdamW's two moments, RNG, progress: 27 MB for MPNet-base's default LoRA, whatever the data
size), adapter/ (the best epoch's weights so far, 9 MB), tokenizer/, config.yaml, run.json,
metrics.jsonl; no base weights (a --random-init run's base_model/ would go too, and not fit).
A restored run's config.yaml names the old machine's paths; the new machine's model and data are
the same files under a home folder that may differ, so those two paths are rewritten, and only where
the folder or file name is the same (another model is refused).
"""

from __future__ import annotations

import io
import math
import re
import shutil
import sys
import tarfile
import zlib
from pathlib import Path

# the package's torch-free reader (gpu-checks.sh runs this with the checkout's src/ on PYTHONPATH): a
# fresh `import torch` costs ~10 s on the GPU machine, right after a deadline
from imdb_lora.training.progress import UnreadableProgress, read_progress

PART_BYTES = 16 * 1024 * 1024  # the device's limit per file back from $OUT
MAX_FILES = 8  # ... and per call
MAX_BYTES = 64 * 1024 * 1024  # ... all together
RESERVED = 1  # summary.json, written after the packing
SUMMARY_BYTES = 2 * 1024 * 1024  # room kept for it
SUFFIX = ".resume.tgz"
# not needed to resume: the lock, half-written temporaries (adapter.old stays: a cut between the two
# renames of save_weights leaves the only whole adapter there, and resume's recover() puts it back)
LEFT_OUT = re.compile(r"^(\.lock|.*\.tmp|.*\.replaced-\d+)$")


class Parts(io.RawIOBase):
    """A write-only stream cut into OUT/STEM.00, .01, ... of at most PART_BYTES each."""

    def __init__(self, stem: Path, part_bytes: int = PART_BYTES):
        self.stem, self.part_bytes, self.paths = stem, part_bytes, []
        self.current: io.BufferedWriter | None = None
        self.left = 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        while view:
            if self.left == 0:
                self._next()
            n = min(self.left, len(view))
            self.current.write(view[:n])
            self.left -= n
            view = view[n:]
        return len(data)

    def _next(self) -> None:
        if self.current is not None:
            self.current.close()
        path = self.stem.with_name(f"{self.stem.name}.{len(self.paths):02d}")
        self.paths.append(path)
        self.current = path.open("wb")
        self.left = self.part_bytes

    def close(self) -> None:
        if self.current is not None:
            self.current.close()
            self.current = None
        super().close()


def place(progress: dict) -> str:
    """Where a checkpoint stands, in words."""
    epoch, step = progress.get("epoch"), progress.get("step_in_epoch")
    at = f"the start of epoch {epoch}" if not step else f"epoch {epoch}, step {step}"
    return (
        f"{at} (step {progress.get('global_step')} in all; {len(progress.get('history', []))} epoch(s) done)"
    )


def files_back(out: Path) -> list[Path]:
    """The plain files under OUT that come back (links do not)."""
    return [p for p in out.rglob("*") if p.is_file() and not p.is_symlink()]


def pack(run: Path, out: Path) -> tuple[int, str]:
    name = run.name
    if not (run / "checkpoint.safetensors").is_file() or not (run / "config.yaml").is_file():
        return 1, f"{name}: no resume state (no checkpoint.safetensors yet): nothing to bring back"
    try:
        where = place(read_progress(run / "checkpoint.safetensors"))
    except UnreadableProgress as e:  # train --resume could not read it either
        return 1, f"{name}: checkpoint unreadable ({e}): nothing to bring back"
    before = files_back(out)
    parts = Parts(out / f"{name}{SUFFIX}", PART_BYTES)
    with tarfile.open(fileobj=parts, mode="w|gz") as tar:
        for path in sorted(run.rglob("*")):
            rel = path.relative_to(run)
            if any(LEFT_OUT.match(p) for p in rel.parts) or path.is_dir():
                continue
            tar.add(path, arcname=f"{name}/{rel}", recursive=False)
    parts.close()
    size = sum(p.stat().st_size for p in parts.paths)
    taken, taken_bytes = len(before) + RESERVED, sum(p.stat().st_size for p in before) + SUMMARY_BYTES
    if taken + len(parts.paths) > MAX_FILES or taken_bytes + size > MAX_BYTES:
        for p in parts.paths:
            p.unlink()
        return 1, (
            f"{name}: checkpoint at {where}; its resume state ({size / 1e6:.1f} MB, {len(parts.paths)} files) "
            f"does NOT fit what comes back ({taken} of {MAX_FILES} files, {taken_bytes / 1e6:.1f} of "
            f"{MAX_BYTES / 1e6:.1f} MB taken): lost with the machine"
        )
    names = ", ".join(p.name for p in parts.paths)
    return 0, f"{name}: checkpoint at {where}; resume state back as {names} ({size / 1e6:.1f} MB)"


def restore(stage: Path, runs: Path, name: str, model: str, data: str) -> tuple[int, str]:
    paths = sorted(stage.glob(f"{name}{SUFFIX}.[0-9][0-9]"))
    if not paths:
        return 1, f"{name}: no {name}{SUFFIX}.NN in {stage}"
    if (runs / name).exists():
        return 1, f"{name}: {runs / name} exists already: kept, the staged resume state not used"
    blob = b"".join(p.read_bytes() for p in paths)
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
            members = tar.getmembers()
            outside = [m.name for m in members if not m.name.startswith(f"{name}/")]
            if outside:
                return 1, f"{name}: {paths[0].name} holds {outside[0]}, outside {name}/: not used"
            tar.extractall(runs, filter="data")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:  # a part missing or damaged
        shutil.rmtree(runs / name, ignore_errors=True)
        return 1, f"{name}: {len(paths)} staged part(s) unreadable ({type(e).__name__}: {e}): not used"
    try:
        where = place(read_progress(runs / name / "checkpoint.safetensors"))
    except UnreadableProgress as e:  # trained afresh rather than failing at --resume
        shutil.rmtree(runs / name, ignore_errors=True)
        return 1, f"{name}: staged checkpoint unreadable ({e}): not used"
    moved = repath(runs / name / "config.yaml", model, data)
    return 0, f"{name}: restored from {len(paths)} staged part(s) at {where}{moved}"


def repath(config: Path, model: str, data: str) -> str:
    """Point a restored run's config.yaml at this machine's model folder and data file, which must bear
    the same names as the old machine's (a different model or data set is not resumed)."""
    # the project's own reader and writer: the file stays as train wrote it
    from imdb_lora.config import Config

    cfg = Config.load(config, flag=None)
    said = []
    for what, old, new in (("model.name", cfg.model.name, model), ("data.path", cfg.data.path, data)):
        if old == new:
            continue
        if old is None or Path(old).name != Path(new).name:
            raise SystemExit(f"gpu_resume: {config}: {what} is {old!r} there, {new!r} here: not the same one")
        said.append(f"{what} {old} -> {new}")
    cfg.model.name, cfg.data.path = model, data
    cfg.validate().save(
        config
    )  # validate makes local paths absolute as train does (its resume compares them)
    return f" ({'; '.join(said)})" if said else ""


def need(run: Path, seconds: int) -> int:
    """A whole run's seconds scaled to the epochs left (loading, ~30 s, is paid again in full)."""
    try:
        done = len(read_progress(run / "checkpoint.safetensors").get("history", []))
        from imdb_lora.config import Config

        epochs = Config.load(run / "config.yaml", flag=None).train.epochs
    except Exception:  # noqa: BLE001 - an unreadable record: the whole run's time, as before
        return seconds
    load = min(30, seconds)
    return load + math.ceil((seconds - load) * max(0, epochs - done) / max(1, epochs))


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "pack":
        rc, line = pack(Path(argv[1]), Path(argv[2]))
    elif len(argv) == 6 and argv[0] == "restore":
        rc, line = restore(Path(argv[1]), Path(argv[2]), argv[3], argv[4], argv[5])
    elif len(argv) == 3 and argv[0] == "need":
        print(need(Path(argv[1]), int(argv[2])))
        return 0
    else:
        print(__doc__, file=sys.stderr)
        return 2
    print(f"    resume state {line}")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
