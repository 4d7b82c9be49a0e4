"""`imdb-lora score --resume`: a stopped local job continues where it stood, to the output an uninterrupted
job writes (the same parts, the same rows), and is refused in one line wherever it cannot do so soundly.
Fast: the tiny trained run of conftest and files of a few lines; one real child process stopped by a
signal (SIGINT, SIGKILL) while it writes a part."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import hold_score_at, wait_running_until

from imdb_lora.cli import main
from imdb_lora.scale import engines

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

MARKER = "_imdb_lora_score.json"
ROWS = "2"  # rows per batch: every file below is read in several batches


def write_inputs(folder: Path) -> list[Path]:
    """Four files: a JSONL whose later lines add a key (two parts), a CSV, a Parquet, a JSONL with bad rows."""
    folder.mkdir(parents=True, exist_ok=True)
    a = folder / "a.jsonl"
    a.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"id": "a1", "text": "great wonderful film"},
                {"id": "a2", "text": "awful boring waste"},
                {"id": "a3", "text": "loved it", "note": "later key"},
                {"id": "a4", "text": "dull plot", "note": "x"},
            ]
        )
    )
    b = folder / "b.csv"
    b.write_text("id,text\nb1,brilliant acting\nb2,\nb3,poor and dull\n")
    c = folder / "c.parquet"
    pq.write_table(pa.table({"id": ["c1", "c2", "c3"], "text": ["superb story", "meh", None]}), c)
    d = folder / "d.jsonl"
    d.write_text('{"id": "d1", "text": "fine"}\n{not json\n{"id": "d3", "text": "terrible"}\n')
    return [a, b, c, d]


def score(run: Path, inputs: Path, out: Path, *flags: str) -> int:
    return main(
        ["score", str(run), "--input", str(inputs), "--output", str(out), "--rows-per-batch", ROWS, *flags]
    )


def parts(out: Path) -> dict[str, pa.Table]:
    return {f.name: pq.read_table(f) for f in sorted(out.glob("*.parquet"))}


def marker(out: Path) -> dict:
    return json.loads((out / MARKER).read_text())


@pytest.fixture
def reference(trained_run, tmp_path) -> tuple[Path, Path]:
    """The inputs, and the output of an uninterrupted job on them."""
    write_inputs(tmp_path / "in")
    assert score(trained_run, tmp_path / "in", tmp_path / "ref") == 0
    return tmp_path / "in", tmp_path / "ref"


def same_output(out: Path, ref: Path) -> None:
    """The same part files, each with the same rows (every column, probabilities too), and the same counts."""
    got, want = parts(out), parts(ref)
    assert (
        list(got) == list(want) and len(want) == 5
    )  # a.jsonl's later lines, with a key more: a part of their own
    for name in want:
        assert got[name].equals(want[name]), name
    done, full = marker(out), marker(ref)
    assert done["status"] == "finished" and (done["rows"], done["errors"]) == (full["rows"], full["errors"])


def stop_at(
    monkeypatch, file: str, after_batches: int, stop: type[KeyboardInterrupt] = KeyboardInterrupt
) -> None:
    """Ctrl-C (or `stop`: Terminated is SIGTERM) while the job reads `file`, after `after_batches` of its
    batches were scored and written."""
    real = engines.read_batches

    def interrupted(uri, *a, **kw):
        for n, table in enumerate(real(uri, *a, **kw)):
            if Path(uri).name == file and n == after_batches:
                raise stop
            yield table

    monkeypatch.setattr(engines, "read_batches", interrupted)


def reads(monkeypatch) -> list[str]:
    """The input files the job opens, by name."""
    real, seen = engines.read_batches, []

    def spy(uri, *a, **kw):
        seen.append(Path(uri).name)
        return real(uri, *a, **kw)

    monkeypatch.setattr(engines, "read_batches", spy)
    return seen


# ---------------------------------------------------------------- resuming


def test_the_parts_in_file_name_order_hold_the_rows_in_input_order(reference):
    """Readers (pyarrow, pandas, DuckDB's globs) take a folder's parts in file-name order: an input's later
    parts (a.jsonl's lines with a key more) must sort after its first and before the next input's."""
    _, ref = reference
    names = sorted(p.name for p in ref.glob("*.parquet"))
    assert len(names) == 5 and names[0] == "part-00000.parquet" and names[2] == "part-00001.parquet"
    rows = [(Path(r["source_file"]).name, r["source_row"]) for r in pq.read_table(ref).to_pylist()]
    assert rows == sorted(rows) and len(rows) == 13  # a.jsonl < b.csv < c.parquet < d.jsonl, each in order


def test_part_names_sort_in_input_order_past_99999_inputs():
    """`part-100000.parquet` sorted before `part-10001.parquet` when the index had 5 digits whatever the count."""
    from imdb_lora.scale.resume import part_digits, part_stem, record_name

    assert [part_digits(n) for n in (1, 4, 100_000, 100_001, 10**7)] == [5, 5, 5, 6, 7]
    digits = part_digits(100_001)
    for indexes in ([9, 10], [10_001, 100_000], [99_999, 100_000]):
        assert sorted(part_stem(i, digits) for i in indexes) == [part_stem(i, digits) for i in indexes]
        assert sorted(record_name(i, digits) for i in indexes) == [record_name(i, digits) for i in indexes]


def eleven_inputs(folder: Path) -> Path:
    """Eleven one-line inputs: past the last one-digit index, as 100,001 inputs are past five digits."""
    folder.mkdir()
    for i in range(11):
        (folder / f"x{i:02d}.jsonl").write_text(json.dumps({"id": i, "text": f"review {i} was good"}) + "\n")
    return folder


def least_digits(monkeypatch, digits: int) -> None:
    from imdb_lora.scale import resume

    monkeypatch.setattr(resume, "LEAST_DIGITS", digits)


def test_parts_are_named_wide_enough_for_the_jobs_inputs_and_resumed_so(trained_run, tmp_path, monkeypatch):
    """With one digit at least (as 5 are), 11 inputs get two: file-name order is input order, and a
    stopped job's resume knows its records by those names."""
    inputs = eleven_inputs(tmp_path / "in")
    least_digits(monkeypatch, 1)
    assert score(trained_run, inputs, tmp_path / "ref") == 0
    names = [p.name for p in sorted((tmp_path / "ref").glob("*.parquet"))]
    assert (
        names == [f"part-{i:02d}.parquet" for i in range(11)]
        and marker(tmp_path / "ref")["job"]["part_digits"] == 2
    )
    ids = [r["id"] for r in pq.read_table(tmp_path / "ref").to_pylist()]
    assert ids == list(range(11))  # with part-10 named so, it would sort before part-2
    out = tmp_path / "out"
    stop_at(monkeypatch, "x09.jsonl", 0)
    assert score(trained_run, inputs, out) == 130
    monkeypatch.undo()
    least_digits(monkeypatch, 1)
    seen = reads(monkeypatch)
    assert score(trained_run, inputs, out, "--resume") == 0
    assert seen == ["x09.jsonl", "x10.jsonl"]
    assert parts(out).keys() == parts(tmp_path / "ref").keys()
    assert all(parts(out)[n].equals(t) for n, t in parts(tmp_path / "ref").items())


def test_the_resume_of_a_job_that_recorded_no_part_digits_keeps_its_names(trained_run, tmp_path, monkeypatch):
    """A marker from before part_digits: its names had 5 digits, whatever the count; kept on resume."""
    inputs = eleven_inputs(tmp_path / "in")
    out = tmp_path / "out"
    stop_at(monkeypatch, "x03.jsonl", 0)
    assert score(trained_run, inputs, out) == 130
    monkeypatch.undo()
    written = marker(out)
    del written["job"]["part_digits"]
    (out / MARKER).write_text(json.dumps(written))
    least_digits(monkeypatch, 1)  # this version would name 11 inputs' parts with 2 digits
    seen = reads(monkeypatch)
    assert score(trained_run, inputs, out, "--resume") == 0
    assert seen == [f"x{i:02d}.jsonl" for i in range(3, 11)]  # the 3 recorded files were known
    assert [p.name for p in sorted(out.glob("*.parquet"))] == [f"part-{i:05d}.parquet" for i in range(11)]
    assert marker(out)["job"]["part_digits"] == 5


@pytest.mark.parametrize(("file", "after"), [("b.csv", 0), ("c.parquet", 1), ("d.jsonl", 1)])
def test_a_stopped_job_resumes_to_the_output_of_an_uninterrupted_one(
    trained_run, reference, tmp_path, monkeypatch, capsys, file, after
):
    """Stopped before a file's first batch, or with half its part written (its footer missing)."""
    inputs, ref = reference
    out = tmp_path / "out"
    stop_at(monkeypatch, file, after)
    capsys.readouterr()
    assert score(trained_run, inputs, out) == 130
    err = capsys.readouterr().err
    done = "abcd".index(file[0])
    assert (
        f"interrupted; the output {out} is unfinished ({done} of 4 input files scored); continue it with: "
        in err
    )
    assert (marker(out)["status"], marker(out)["signal"]) == ("stopped", "SIGINT") and "error" not in marker(
        out
    )
    if after:  # the half part is there: a file without its footer
        assert (out / f"part-0000{done}.parquet").exists()
    monkeypatch.undo()
    seen = reads(monkeypatch)
    assert score(trained_run, inputs, out, "--resume") == 0
    assert seen == ["a.jsonl", "b.csv", "c.parquet", "d.jsonl"][done:]  # the finished files are not read
    assert f"(resumed: {done} of 4 input files kept from before)" in capsys.readouterr().out
    same_output(out, ref)
    assert marker(out)["attempt"] == 2


@pytest.mark.parametrize("failure", ["full_disk", "unreadable_input"])
def test_a_failed_job_says_how_to_resume_and_resumes(
    trained_run, reference, tmp_path, monkeypatch, capsys, failure
):
    import errno

    from imdb_lora.errors import UserError

    inputs, ref = reference
    out = tmp_path / "out"
    fault = {
        "full_disk": OSError(errno.ENOSPC, "No space left on device"),
        "unreadable_input": UserError("--input: cannot read c.parquet (connection reset)"),
    }[failure]
    raise_at_record(monkeypatch, 2, fault, after=False)  # the third file fails
    capsys.readouterr()
    assert score(trained_run, inputs, out) == 2
    how = "free some space, then" if failure == "full_disk" else "once that is fixed,"
    one_line(capsys, f"the output {out} is unfinished (2 of 4 input files scored); {how} continue it with: ")
    assert marker(out)["status"] == "failed"
    monkeypatch.undo()
    assert score(trained_run, inputs, out, "--resume") == 0
    same_output(out, ref)


def test_a_job_stopped_by_sigterm_is_stopped_not_failed_and_resumes(
    trained_run, reference, tmp_path, monkeypatch, capsys
):
    """SIGTERM (a scheduler, `kill`) is a stop, as Ctrl-C is: the marker says so and names it."""
    from imdb_lora.errors import Terminated

    inputs, ref = reference
    out = tmp_path / "out"
    stop_at(monkeypatch, "c.parquet", 1, stop=Terminated)
    capsys.readouterr()
    assert score(trained_run, inputs, out) == 143
    err = capsys.readouterr().err
    assert f"imdb-lora: stopped by SIGTERM; the output {out} is unfinished (2 of 4 input files scored)" in err
    stopped = marker(out)
    assert (stopped["status"], stopped["signal"]) == ("stopped", "SIGTERM") and "error" not in stopped
    monkeypatch.undo()
    refused_then_resumed(
        trained_run, inputs, out, ref, capsys, "(status 'stopped': the job was stopped by SIGTERM)"
    )


def test_a_stopped_output_of_an_earlier_version_still_resumes(
    trained_run, reference, tmp_path, monkeypatch, capsys
):
    """Before "stopped", a job stopped by a signal wrote "failed" with the error "interrupted"."""
    inputs, ref = reference
    out = tmp_path / "out"
    stop_at(monkeypatch, "c.parquet", 1)
    assert score(trained_run, inputs, out) == 130
    old = {k: v for k, v in marker(out).items() if k != "signal"}
    (out / MARKER).write_text(json.dumps({**old, "status": "failed", "error": "interrupted"}))
    monkeypatch.undo()
    refused_then_resumed(
        trained_run, inputs, out, ref, capsys, "(status 'failed': the job was stopped by a signal)"
    )


def refused_then_resumed(run: Path, inputs: Path, out: Path, ref: Path, capsys, status: str) -> None:
    """A plain rerun is refused naming the stop and --resume; --resume ends as an uninterrupted job."""
    capsys.readouterr()
    assert score(run, inputs, out) == 2
    one_line(capsys, f"{status}; pass --resume to continue it")
    assert score(run, inputs, out, "--resume") == 0
    same_output(out, ref)


def test_a_part_closed_but_not_recorded_is_scored_again_without_duplicates(
    trained_run, reference, tmp_path, monkeypatch, capsys
):
    """Killed between closing a file's last part and writing its record: the whole part is redone."""
    inputs, ref = reference
    out = tmp_path / "out"
    raise_at_record(monkeypatch, 1, KeyboardInterrupt(), after=False)
    capsys.readouterr()
    assert score(trained_run, inputs, out) == 130
    assert f"the output {out} is unfinished (1 of 4 input files scored)" in capsys.readouterr().err
    assert pq.read_table(out / "part-00001.parquet").num_rows == 3  # whole, yet unrecorded
    monkeypatch.undo()
    seen = reads(monkeypatch)
    assert score(trained_run, inputs, out, "--resume") == 0
    assert seen == ["b.csv", "c.parquet", "d.jsonl"]
    same_output(out, ref)
    assert len(pq.read_table(out).to_pylist()) == marker(ref)["rows"] == 13


def test_a_stop_just_after_a_record_is_written_counts_that_file(
    trained_run, reference, tmp_path, monkeypatch, capsys
):
    """Ctrl-C as a file's record is closed: the stop line counts what --resume will keep (was one fewer)."""
    inputs, ref = reference
    out = tmp_path / "out"
    raise_at_record(monkeypatch, 1, KeyboardInterrupt(), after=True)
    capsys.readouterr()
    assert score(trained_run, inputs, out) == 130
    assert f"the output {out} is unfinished (2 of 4 input files scored)" in capsys.readouterr().err
    monkeypatch.undo()
    seen = reads(monkeypatch)
    assert score(trained_run, inputs, out, "--resume") == 0
    assert seen == ["c.parquet", "d.jsonl"]
    same_output(out, ref)


def test_a_kept_part_that_was_truncated_since_is_redone(trained_run, reference, tmp_path, monkeypatch):
    inputs, ref = reference
    out = tmp_path / "out"
    stop_at(monkeypatch, "c.parquet", 0)
    assert score(trained_run, inputs, out) == 130
    monkeypatch.undo()
    with open(out / "part-00001.parquet", "r+b") as f:  # the record says its size: this is another
        f.truncate(100)
    (out / "part-00009.parquet").write_bytes(b"a stray part of no input")
    (out / "part-00000-1.parquet").write_bytes(b"unrecorded, named as imdb-lora named later parts before")
    seen = reads(monkeypatch)
    assert score(trained_run, inputs, out, "--resume") == 0
    assert seen == ["b.csv", "c.parquet", "d.jsonl"]
    same_output(out, ref)


def test_a_half_part_the_resumed_job_would_not_overwrite_is_deleted(trained_run, tmp_path, monkeypatch):
    """Stopped in a.jsonl's second part (its lines with a key more), then resumed with larger batches,
    which put all of a.jsonl in one part: the half second part must not stay beside it."""
    write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    stop_at(monkeypatch, "a.jsonl", 3)  # a1, a2 in part-00000 (closed), a3 in part-00000_00001 (half)
    assert score(trained_run, tmp_path / "in", out, "--rows-per-batch", "1") == 130
    assert (out / "part-00000_00001.parquet").exists()
    monkeypatch.undo()
    assert score(trained_run, tmp_path / "in", out, "--resume", "--rows-per-batch", "4") == 0
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"part-0000{i}.parquet" for i in range(4)]
    ids = [r["id"] for r in pq.read_table(out / "part-00000.parquet").to_pylist()]
    assert ids == ["a1", "a2", "a3", "a4"] and marker(out)["rows"] == 13


def test_files_of_the_user_in_a_stopped_output_are_left_and_not_counted(trained_run, stopped, tmp_path):
    """A note or a folder put into the output between the stop and --resume: kept as they are, and the
    summary counts the job's parts alone (it read every file of the folder as Parquet: a traceback)."""
    inputs, out = stopped
    (out / "notes.txt").write_text("scored with runs/x")
    (out / "mine").mkdir()
    (out / "mine" / "part-00009.parquet").write_bytes(b"not ours")
    assert score(trained_run, inputs, out, "--resume") == 0
    assert marker(out)["rows"] == 13 and marker(out)["errors"] == 3
    assert (out / "notes.txt").read_text() == "scored with runs/x"
    assert (out / "mine" / "part-00009.parquet").read_bytes() == b"not ours"


def test_resume_goes_through_the_outputs_pyarrow_filesystem(monkeypatch):
    """A remote output (pyarrow's in-memory mock filesystem): records, stale parts and marker as locally."""
    from imdb_lora.scale import output as score_output
    from imdb_lora.scale import resume

    remote = pa.fs._MockFileSystem()
    for module in (score_output, resume):
        monkeypatch.setattr(module, "filesystem", lambda uri: (remote, uri.split("://", 1)[1]))
    job = {"engine": "local", "model": {"path": "m", "sha256": "x"}, "inputs": [["mock://in/a", 1, 2]] * 2}
    out = "mock://bucket/out"
    assert score_output.prepare_output(out, ["mock://in"], overwrite=False, job=job) is None  # no lock
    for name in ("part-00000.parquet", "part-00001.parquet"):
        with remote.open_output_stream(f"bucket/out/{name}") as f:
            f.write(b"a part")
    resume.write_record(out, resume.Done(0, "mock://in/a", {"part-00000.parquet": 6}, 3, 1, 1, 2.5))
    score_output.end_marker(out, KeyboardInterrupt())
    lock, resumed = resume.resume_output(out, job, ["mock://in"])
    assert (
        lock is None and list(resumed.kept) == [0] and resumed.attempt == 2 and resumed.earlier_seconds == 2.5
    )
    names = sorted(i.base_name for i in remote.get_file_info(pa.fs.FileSelector("bucket/out")))
    kept = ["_imdb_lora_score.done-00000.json", MARKER, "part-00000.parquet"]
    assert names == kept  # part-00001: no record
    assert (
        score_output.read_marker(out)["status"] == "running" and score_output.read_marker(out)["attempt"] == 2
    )


def test_the_marker_counts_and_times_the_whole_output(trained_run, reference, tmp_path, monkeypatch):
    inputs, ref = reference
    out = tmp_path / "out"
    stop_at(monkeypatch, "c.parquet", 0)
    assert score(trained_run, inputs, out) == 130
    first = [json.loads(p.read_text()) for p in sorted(out.glob("_imdb_lora_score.done-*.json"))]
    assert [(r["index"], r["rows"], r["errors"], r["attempt"]) for r in first] == [(0, 4, 0, 1), (1, 3, 1, 1)]
    assert sorted(first[0]["parts"]) == ["part-00000.parquet", "part-00000_00001.parquet"]
    monkeypatch.undo()
    assert score(trained_run, inputs, out, "--resume") == 0
    done = marker(out)
    assert (done["rows"], done["errors"]) == (13, 3) == (marker(ref)["rows"], marker(ref)["errors"])
    assert done["seconds"] > first[1]["seconds"] > 0  # the first attempt's time is in it
    assert done["started"] and done["resumed"] and done["job"]["engine"] == "local"
    assert done["job"]["window_stride"] == 0  # one truncated window, as the flag says it (was null)


def test_a_resume_that_finds_every_file_done_only_finishes_the_marker(
    trained_run, reference, tmp_path, monkeypatch
):
    """Killed after the last record, before the marker said "finished": no model is loaded."""
    inputs, ref = reference
    out = tmp_path / "out"
    monkeypatch.setattr(engines, "finished", lambda job, summary: (_ for _ in ()).throw(KeyboardInterrupt))
    assert score(trained_run, inputs, out) == 130
    monkeypatch.undo()
    monkeypatch.setattr(engines, "ScoreBatch", None)  # loading a model would fail
    assert score(trained_run, inputs, out, "--resume") == 0
    same_output(out, ref)


# ---------------------------------------------------------------- refusals


def raise_at_record(monkeypatch, index: int, error: BaseException, after: bool) -> None:
    """Input file `index`'s record: `error` raised instead of writing it, or just after it is written."""
    real = engines.write_record

    def write_record(output, done, *digits):
        if done.index == index and not after:
            raise error
        real(output, done, *digits)
        if done.index == index:
            raise error

    monkeypatch.setattr(engines, "write_record", write_record)


def one_line(capsys, needle: str) -> None:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "imdb-lora: error" in line]
    assert needle in err and "Traceback" not in err and len(lines) == 1, err


def state(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


@pytest.fixture
def stopped(trained_run, tmp_path, monkeypatch) -> tuple[Path, Path]:
    """Inputs and the output of a job stopped after its first two files."""
    write_inputs(tmp_path / "in")
    out = tmp_path / "out"
    stop_at(monkeypatch, "c.parquet", 1)
    assert score(trained_run, tmp_path / "in", out) == 130
    monkeypatch.undo()
    return tmp_path / "in", out


def test_a_plain_rerun_of_a_stopped_output_names_resume(trained_run, stopped, capsys):
    inputs, out = stopped
    capsys.readouterr()
    assert score(trained_run, inputs, out) == 2
    one_line(capsys, "holds an unfinished score output (status 'stopped': the job was stopped by SIGINT); "
             "pass --resume to continue it, or --overwrite to replace it")  # fmt: skip


def changed_model(run: Path, tmp: Path) -> Path:
    copy = tmp / "run-copy"
    shutil.copytree(run, copy)
    info = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**info, "retrained": True}))
    return copy


REFUSALS = {
    "overwrite": (["--overwrite"], "--overwrite and --resume contradict each other; pass one"),
    "ray": (["--engine", "ray"], "--resume works with --engine local only: Ray Data's workers write parts"),
    "max_chars": (
        ["--max-chars", "50"],
        "was scored with other settings: --max-chars 50 (the stopped job: 100000)",
    ),
    "keep_text": (["--keep-text"], "other settings: --keep-text (the stopped job: without it)"),
    "encoding": (["--encoding", "latin-1"], "--encoding latin-1 (the stopped job: utf-8)"),
    "raw": (["--raw"], "--raw (the stopped job: without it)"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_resume_with_other_flags_is_refused_and_touches_nothing(trained_run, stopped, capsys, case):
    inputs, out = stopped
    flags, needle = REFUSALS[case]
    before = state(out)
    capsys.readouterr()
    assert score(trained_run, inputs, out, "--resume", *flags) == 2
    one_line(capsys, needle)
    assert state(out) == before


def test_resume_names_encodings_as_typed_and_takes_another_spelling_of_the_same(
    trained_run, tmp_path, monkeypatch, capsys
):
    """Compared as codecs (latin-1 is iso-8859-1), named as the user typed them (never `iso8859-1`)."""
    inputs = tmp_path / "in"
    write_inputs(inputs)
    out = tmp_path / "out"
    stop_at(monkeypatch, "c.parquet", 1)
    assert score(trained_run, inputs, out, "--encoding", "Latin-1") == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert score(trained_run, inputs, out, "--resume", "--encoding", "cp1252") == 2
    one_line(capsys, "--encoding cp1252 (the stopped job: Latin-1); resume with")
    assert score(trained_run, inputs, out, "--resume", "--encoding", "ISO-8859-1") == 0
    assert "(resumed: 2 of 4 input files kept from before)" in capsys.readouterr().out


def test_resume_with_another_model_or_other_inputs_is_refused(trained_run, stopped, tmp_path, capsys):
    inputs, out = stopped
    before = state(out)
    capsys.readouterr()
    other = changed_model(trained_run, tmp_path)
    assert score(other, inputs, out, "--resume") == 2
    one_line(capsys, f"the model ({other} is not the {trained_run.resolve()} the stopped job scored with)")
    (inputs / "e.jsonl").write_text('{"id": "e1", "text": "new"}\n')
    assert score(trained_run, inputs, out, "--resume") == 2
    one_line(capsys, "--input: 5 files (the stopped job: 4)")
    (inputs / "e.jsonl").unlink()
    (inputs / "b.csv").write_text('id,text\nb1,"brilliant acting, edited"\nb2,\nb3,poor and dull\n')
    assert score(trained_run, inputs, out, "--resume") == 2
    one_line(capsys, f"--input: {inputs / 'b.csv'} changed since the stopped job read it")
    assert state(out) == before


def test_resume_with_a_model_changed_in_place_is_refused(trained_run, tmp_path, monkeypatch, capsys):
    write_inputs(tmp_path / "in")
    run, out = tmp_path / "run", tmp_path / "out"
    shutil.copytree(trained_run, run)
    stop_at(monkeypatch, "b.csv", 0)
    assert score(run, tmp_path / "in", out) == 130
    monkeypatch.undo()
    (run / "calibration.json").write_text(json.dumps({"temperature": 2.0}))  # calibrated again, say
    capsys.readouterr()
    assert score(run, tmp_path / "in", out, "--resume") == 2
    one_line(capsys, f"the model ({run} changed since the stopped job scored with it)")


def test_resume_refuses_a_finished_output_and_a_folder_that_is_none(trained_run, reference, tmp_path, capsys):
    inputs, ref = reference
    before = state(ref)
    capsys.readouterr()
    assert score(trained_run, inputs, ref, "--resume") == 2
    one_line(capsys, f"--resume: --output {ref} is already finished; nothing to resume")
    assert state(ref) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    assert score(trained_run, inputs, mine, "--resume") == 2
    one_line(capsys, f"--resume: --output {mine} is not an imdb-lora score output (no {MARKER})")
    assert state(mine) == {"notes.txt": b"precious"}
    assert score(trained_run, inputs, tmp_path / "none", "--resume") == 2
    one_line(capsys, f"--resume: --output {tmp_path / 'none'} does not exist; nothing to resume")
    assert not (tmp_path / "none").exists()


def test_resume_refuses_an_output_of_the_ray_engine_or_of_an_older_imdb_lora(trained_run, stopped, capsys):
    inputs, out = stopped
    written = marker(out)
    for job, needle in (
        (
            {**written["job"], "engine": "ray"},
            "was written by --engine ray, whose stopped jobs cannot be continued",
        ),
        (None, "was written by an earlier imdb-lora that recorded no settings; replace it with --overwrite"),
    ):
        (out / MARKER).write_text(json.dumps({**written, "job": job}))
        before = state(out)
        capsys.readouterr()
        assert score(trained_run, inputs, out, "--resume") == 2
        one_line(capsys, needle)
        assert state(out) == before
        assert score(trained_run, inputs, out) == 2  # and a plain rerun does not offer --resume
        err = capsys.readouterr().err
        assert "pass --overwrite to replace it" in err and "--resume" not in err


def test_resume_refuses_the_output_of_a_live_job(trained_run, tmp_path, capsys):
    from test_score_guards import holding_job

    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "ok", "text": "great wonderful film"}\n')
    out = tmp_path / "out"
    with holding_job(out, src) as proc:
        before = state(out)
        capsys.readouterr()
        assert main(["score", str(trained_run), "--input", str(src), "--output", str(out), "--resume"]) == 2
        one_line(capsys, f"--output {out} is being written by another imdb-lora score job (pid {proc.pid})")
        assert state(out) == before


# ---------------------------------------------------------------- a real process, stopped by a signal


# a real process (~5 s each): SIGKILL, which runs no clean-up, in the fast suite; SIGINT's stop line is
# also checked in process above, so its real-process run is slow (`make test` and CI run it)
@pytest.mark.parametrize(
    "sig", [signal.SIGKILL, pytest.param(signal.SIGINT, marks=pytest.mark.slow)], ids=["SIGKILL", "SIGINT"]
)
def test_a_score_process_stopped_by_a_signal_mid_part_resumes(trained_run, reference, tmp_path, sig):
    """The child waits in its 6th part write (c.parquet's second batch: its part is half-written) until
    the signal comes; SIGKILL leaves "running" and no lock, SIGINT says how to continue."""
    import imdb_lora

    inputs, ref = reference
    out, ready = tmp_path / "out", tmp_path / "held"
    src = str(Path(imdb_lora.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    args = ["score", str(trained_run), "--input", str(inputs), "--output", str(out), "--rows-per-batch", ROWS]
    proc = subprocess.Popen(
        [sys.executable, "-m", "imdb_lora", *args, "--device", "cpu"],
        env=hold_score_at("write:6", ready, env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_running_until(proc, ready.exists)
        assert ready.exists(), proc.communicate()
        proc.send_signal(sig)
        stdout, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert (out / "part-00002.parquet").exists()  # the half part of c.parquet
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL and marker(out)["status"] == "running"
        command = ["imdb-lora", *args, "--device", "cpu", "--resume"]
    else:
        assert proc.returncode == 130 and marker(out)["status"] == "stopped"
        line = err.strip().splitlines()[-1]
        assert line.startswith(
            f"imdb-lora: interrupted; the output {out} is unfinished (2 of 4 input files"
        ), err
        command = shlex.split(line.split("continue it with: ", 1)[1])
        assert command[-1] == "--resume" and "--rows-per-batch" in command and "--device" in command
    assert main(command[1:]) == 0
    same_output(out, ref)


@pytest.mark.parametrize(
    "argv",
    [
        ["--input", "in dir", "it's.jsonl", "--output", 'o "q"', "--text-column=-t", "--encoding", "latin-1"],
        ["--input=-x.jsonl", "--input", "a.csv", "--output=-o", "--base-model=-b", "--window-stride", "0"],
    ],
)
def test_the_resume_command_parses_back_to_the_stopped_jobs_arguments(argv):
    """The line's command as a shell splits it: the same model, inputs (in order), output and flags, also
    for values a shell must quote and values that begin with '-' (which a flag's next word cannot be)."""
    from imdb_lora.cli import build_parser
    from imdb_lora.cli.score import resume_command

    parser = build_parser()
    ns = parser.parse_args(["score", "runs/x", *argv])
    words = shlex.split(resume_command(ns))
    assert words[:2] == ["imdb-lora", "score"] and words[-1] == "--resume"
    again = parser.parse_args(words[1:])
    assert vars(again) == {**vars(ns), "resume": True}


@pytest.mark.parametrize("saved_stride", [None, 0])
def test_a_marker_of_either_stride_form_is_the_same_job(saved_stride):
    """score's marker held null for one truncated window until 090718f, 0 since: a job stopped under
    either resumes with no --window-stride (the same rows), and a real change names 0, not 'not given'."""
    from imdb_lora.scale import resume

    settings = engines.ScoreJob(model="m", inputs=["a.jsonl"], output="out").settings()
    model = {"path": "m", "sha256": "x"}
    saved = resume.job_record(settings | {"window_stride": saved_stride}, model, [])
    assert resume.differences(saved, resume.job_record(settings, model, [])) == []
    windows = resume.job_record(settings | {"window_stride": 16}, model, [])
    assert resume.differences(saved, windows) == ["--window-stride 16 (the stopped job: 0)"]
