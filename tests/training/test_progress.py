"""The progress record read from a checkpoint's safetensors header alone: the step a stop saved (the
trainer) and where a cut run stands (scripts/gpu_resume.py, on the GPU machine right after a deadline),
one reader for both, without torch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from imdb_lora.training.checkpoint import Progress, save_checkpoint
from imdb_lora.training.progress import UnreadableProgress, read_progress, saved_step


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    path = tmp_path / "checkpoint.safetensors"
    progress = Progress(epoch=2, step_in_epoch=3, global_step=8, history=[{"epoch": 1}])
    save_checkpoint(path, model, optimizer, progress, torch.device("cpu"))
    return path


def test_the_record_save_checkpoint_writes_is_read_back(checkpoint):
    assert read_progress(checkpoint) == {**Progress(epoch=2, step_in_epoch=3, global_step=8).__dict__,
                                         "history": [{"epoch": 1}]}  # fmt: skip
    assert saved_step(checkpoint) == 8


def header(meta: dict | None) -> bytes:
    body = json.dumps({"__metadata__": meta} if meta is not None else {}).encode()
    return len(body).to_bytes(8, "little") + body


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (None, "No such file"),
        (b"", "not a safetensors file (0 bytes)"),
        (b"\x05\x00\x00", "not a safetensors file (3 bytes)"),
        ((2**62).to_bytes(8, "little") + b"{}", "a header of 4,611,686,018,427,387,904 bytes in 10"),
        (b"\x04\x00\x00\x00\x00\x00\x00\x00\xff\xfe{}", "its header is not JSON"),
        (header(None)[:8] + b"[1]", "not a safetensors file"),
        (b"\x03\x00\x00\x00\x00\x00\x00\x00[1]", "its header is not a JSON object"),
        (header(None), "no readable progress record (KeyError)"),
        (header({"version": "0.1.0"}), "no readable progress record (KeyError)"),
        (header({"progress": "{oops"}), "no readable progress record (JSONDecodeError)"),
        (header({"progress": "[1, 2]"}), "no readable progress record (a JSON list)"),
    ],
)
def test_anything_else_is_unreadable_in_one_line_and_no_step(tmp_path, content, said):
    """Missing, cut, garbled (a length of exabytes is not read as asked), not a checkpoint: one error
    that names the file, and saved_step None, as safetensors' own reader gave."""
    path = tmp_path / "checkpoint.safetensors"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UnreadableProgress) as e:
        read_progress(path)
    assert str(e.value).startswith(f"{path}: ") and said in str(e.value) and "\n" not in str(e.value)
    assert saved_step(path) is None


def test_a_record_without_a_step_has_no_step(tmp_path):
    path = tmp_path / "checkpoint.safetensors"
    for progress in ({"epoch": 1}, {"global_step": "seven"}, {"global_step": None}):
        path.write_bytes(header({"progress": json.dumps(progress)}))
        assert saved_step(path) is None


def test_the_reader_imports_no_torch(checkpoint):
    """Its whole point: scripts/gpu_resume.py's tests run the script itself the same way."""
    code = (
        "import sys; from imdb_lora.training.progress import saved_step; "
        f"print(saved_step({str(checkpoint)!r}), sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'safetensors', 'numpy')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["8", "[]"], done.stderr
