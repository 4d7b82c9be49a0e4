"""RunDir.save_weights: the adapter folder is replaced whole and written the same way every time; a
failed atomic write keeps the file it was replacing."""

import errno
import json
import os
from pathlib import Path

import pytest

from imdb_lora.runs.rundir import RunDir, atomic_write_text


class HashOrderModel:
    """Saves as PEFT does: target_modules in whatever order its set had in this process."""

    def __init__(self, order: list[str]):
        self.order = order

    def save_pretrained(self, folder, safe_serialization: bool = True) -> None:
        folder.mkdir(parents=True)
        record = {"r": 8, "target_modules": self.order, "modules_to_save": ["classifier"]}
        (folder / "adapter_config.json").write_text(json.dumps(record, indent=2, sort_keys=True))
        (folder / "adapter_model.safetensors").write_bytes(b"weights")


def test_adapter_config_is_the_same_whatever_the_set_order(tmp_path):
    written = []
    for order in (["value", "query", "dense", "key"], ["key", "dense", "value", "query"]):
        run = RunDir(tmp_path / "-".join(order))
        run.path.mkdir()
        run.save_weights(HashOrderModel(order), "lora")
        written.append((run.path / "adapter" / "adapter_config.json").read_bytes())
    assert written[0] == written[1]
    assert json.loads(written[0])["target_modules"] == ["dense", "key", "query", "value"]
    assert json.loads(written[0])["modules_to_save"] == ["classifier"]  # other lists keep their order


def test_a_trained_runs_adapter_config_lists_target_modules_sorted(trained_run):
    record = json.loads((trained_run / "adapter" / "adapter_config.json").read_text())
    assert record["target_modules"] == sorted(record["target_modules"]) and len(record["target_modules"]) > 1


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_half_copy(tmp_path, monkeypatch):
    """A full disk under run.json's rewrite left a half-written run.json.tmp beside the run."""
    path = tmp_path / "run.json"
    path.write_text("old")
    write_text = Path.write_text

    def full_disk(self, text, *args, **kw):
        write_text(self, text[:3])  # what fitted before the disk was full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError):
        atomic_write_text(path, "new and longer")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["run.json"]


def test_two_writers_of_one_file_at_once_leave_one_whole_copy_and_no_error(tmp_path, monkeypatch):
    """Two processes writing the same file at once (two `evaluate --errors-dir D` of one --file, two
    `compare` into one folder) shared its one temporary name: the later truncated the earlier's copy
    mid-write, and the earlier's rename then found no file (a FileNotFoundError traceback)."""
    path = tmp_path / "mine.csv.errors.jsonl"
    replace = os.replace

    def other_writer_finishes_first(src, dst):
        monkeypatch.setattr(os, "replace", replace)
        atomic_write_text(path, "the other process's\n")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", other_writer_finishes_first)
    atomic_write_text(path, "this process's\n")
    assert path.read_text() == "this process's\n" and os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_write_that_must_not_replace_keeps_a_file_that_appeared_and_leaves_no_copy(
    tmp_path, monkeypatch, hard_links
):
    """replace=False: a hard link puts the whole copy in place only if no file is there; a file system
    without hard links checks again just before the rename."""
    if not hard_links:

        def no_links(src, dst):
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

        monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "mine.csv.errors.jsonl"
    atomic_write_text(path, "first\n", replace=False)
    with pytest.raises(FileExistsError):
        atomic_write_text(path, "second\n", replace=False)
    assert path.read_text() == "first\n" and os.listdir(tmp_path) == [path.name]
