"""`imdb-lora score` guards (audit23): --overwrite replaces only a score output (its marker), the output
never overlaps an input or the current directory, and hostile input rows become error rows, not failed
jobs. Fast: the tiny trained run of conftest, files of a few lines."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

from imdb_lora.cli import main
from imdb_lora.errors import UserError
from imdb_lora.scale import sources

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
fs = pytest.importorskip("pyarrow.fs")

MARKER = "_imdb_lora_score.json"


def score(run: Path, *args: str) -> int:
    return main(["score", str(run), *args])


def one_line_error(capsys, needle: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "imdb-lora: error" in line]  # not the progress bar's
    assert needle in err and "Traceback" not in err and len(lines) == 1, err
    return err


def marker(out: Path) -> dict:
    return json.loads((out / MARKER).read_text())


def output_rows(out: Path) -> list[dict]:
    return pq.read_table(out).to_pylist()  # a pyarrow dataset read: the marker is skipped


def write_jsonl(path: Path, lines: list[bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path


GOOD = b'{"id": "ok", "text": "great wonderful film"}'


# ---------------------------------------------------------------- the output folder (H1)


def test_overwrite_refuses_a_folder_that_is_not_a_score_output(trained_run, tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    mine = tmp_path / "mydocs"
    (mine / "sub").mkdir(parents=True)
    (mine / "taxes.pdf").write_text("precious")
    assert score(trained_run, "--input", str(src), "--output", str(mine), "--overwrite") == 2
    one_line_error(capsys, f"--output {mine} is not an imdb-lora score output; refusing to replace it")
    assert (mine / "taxes.pdf").read_text() == "precious" and (mine / "sub").is_dir()


@pytest.mark.parametrize("where", ["same", "parent", "inside", "parent_of_file"])
def test_output_may_not_overlap_an_input(trained_run, tmp_path, capsys, where):
    inputs = tmp_path / "proj" / "reviews"
    write_jsonl(inputs / "a.jsonl", [GOOD])
    (tmp_path / "proj" / "thesis.tex").write_text("precious")
    given, out = {
        "same": (inputs, inputs),
        "parent": (inputs, tmp_path / "proj"),
        "inside": (inputs, inputs / "scored"),
        "parent_of_file": (inputs / "a.jsonl", inputs),
    }[where]
    assert score(trained_run, "--input", str(given), "--output", str(out), "--overwrite") == 2
    one_line_error(capsys, f"--output {out} overlaps --input {given}")
    assert (inputs / "a.jsonl").read_bytes() == GOOD + b"\n"
    assert (tmp_path / "proj" / "thesis.tex").read_text() == "precious"
    assert not (inputs / "scored").exists()


def test_output_may_not_hold_the_current_directory(trained_run, tmp_path, capsys, monkeypatch):
    src = write_jsonl(tmp_path / "in" / "a.jsonl", [GOOD])
    here = tmp_path / "work" / "sub"
    here.mkdir(parents=True)
    (here / "notes.txt").write_text("precious")
    monkeypatch.chdir(here)
    for out in (".", ".."):
        assert score(trained_run, "--input", str(src), "--output", out, "--overwrite") == 2
        one_line_error(capsys, f"--output {out} holds the current directory")
    assert (here / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize("kind", ["device", "fifo", "under_a_file"])
def test_an_output_that_cannot_be_a_folder_is_one_line(trained_run, tmp_path, capsys, kind):
    """pyarrow's create_dir raised FileExistsError or NotADirectoryError as a traceback."""
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    if kind == "fifo":
        os.mkfifo(tmp_path / "pipe")
    (tmp_path / "notes.txt").write_text("precious")
    out = {
        "device": os.devnull,
        "fifo": str(tmp_path / "pipe"),
        "under_a_file": str(tmp_path / "notes.txt" / "o"),
    }[kind]
    assert score(trained_run, "--input", str(src), "--output", out) == 2
    why = (
        ": cannot create the folder (Not a directory)"
        if kind == "under_a_file"
        else " exists and is not a folder"
    )
    one_line_error(capsys, f"--output {out}{why}")
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_marker_records_the_job_and_overwrite_replaces_only_a_score_output(trained_run, tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD, b'{"id": "e", "text": ""}'])
    out = tmp_path / "out"
    assert score(trained_run, "--input", str(src), "--output", str(out)) == 0
    first = marker(out)
    assert first["kind"] == "imdb-lora score output" and first["status"] == "finished"
    assert (first["rows"], first["errors"]) == (2, 1) and first["seconds"] > 0
    assert len(output_rows(out)) == 2
    capsys.readouterr()
    assert score(trained_run, "--input", str(src), "--output", str(out)) == 2
    one_line_error(capsys, "holds an earlier score output; pass --overwrite to replace it")
    (out / "stale.parquet").write_bytes(b"left by an earlier job")
    assert score(trained_run, "--input", str(src), "--output", str(out), "--overwrite") == 0
    assert not (out / "stale.parquet").exists() and marker(out)["status"] == "finished"
    assert len(output_rows(out)) == 2


def test_a_failed_or_killed_job_leaves_its_marker_unfinished(trained_run, tmp_path, capsys, monkeypatch):
    from imdb_lora.errors import UserError
    from imdb_lora.scale import engines
    from imdb_lora.scale import output as score_output

    src = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    out = tmp_path / "out"
    real = engines.read_batches

    def breaks_after_one_batch(*a, **kw):
        yield next(real(*a, **kw))
        raise UserError("--input: cannot read it after row 1 (disk gone)")

    monkeypatch.setattr(engines, "read_batches", breaks_after_one_batch)
    assert score(trained_run, "--input", str(src), "--output", str(out)) == 2
    assert marker(out)["status"] == "failed" and "disk gone" in marker(out)["error"]
    capsys.readouterr()
    assert score(trained_run, "--input", str(src), "--output", str(out)) == 2
    one_line_error(capsys, "holds an unfinished score output (status 'failed': the job failed)")
    # A killed job cannot write anything more: its marker still says "running".
    score_output.write_marker(str(out), {"status": "running"})
    assert score(trained_run, "--input", str(src), "--output", str(out)) == 2
    one_line_error(capsys, "holds an unfinished score output (status 'running': the job was killed")


SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"  # AWS's documented example secret, not a real one


@pytest.mark.parametrize(
    "flag, uri, shown",
    [
        ("--input", f"s3://b/in/?access_key=AKIDEXAMPLE&secret_key={SECRET}", "s3://b/in/"),
        ("--input", f"s3://AKIDEXAMPLE:{SECRET}@b/in/", "s3://b/in/"),
        ("--output", f"abfs://c@acct.dfs.core.windows.net/out?tenant_id=t&client_id=i&client_secret={SECRET}",
         "abfs://c@acct.dfs.core.windows.net/out"),
        ("--output", f"abfs://c:{SECRET}@acct.dfs.core.windows.net/out", "abfs://c@acct.dfs.core.windows.net/out"),
    ],
)  # fmt: skip
def test_credentials_in_a_uri_are_one_line_that_never_prints_them(
    trained_run, tmp_path, capsys, flag, uri, shown
):
    """The secret went into the console (pyarrow's refusal of S3's query keys was printed after the URI
    whole) or, where pyarrow takes it, into source_file, the marker and the summary line."""
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    given = {"--input": str(src), "--output": str(tmp_path / "out"), flag: uri}
    assert score(trained_run, "--input", given["--input"], "--output", given["--output"]) == 2
    captured = capsys.readouterr()
    assert SECRET not in captured.out + captured.err
    assert captured.err.startswith(f"imdb-lora: error: {flag} {shown}: credentials in a URI"), captured.err
    assert len(captured.err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_an_output_whose_job_ended_before_any_part_is_replaced_without_overwrite(
    trained_run, tmp_path, capsys
):
    """A job that failed before writing a row (here the model's adapter file is damaged, which only
    loading it finds) left its folder holding just a "failed" marker; the rerun, once the model was
    fixed, was refused unless given --overwrite. Such a folder loses nothing if replaced; one that holds
    anything else, or whose job may still be running, is still refused."""
    import shutil

    from imdb_lora.scale import output as score_output

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    weights = run / "adapter" / "adapter_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(b"not safetensors")
    src, out = write_jsonl(tmp_path / "in.jsonl", [GOOD]), tmp_path / "out"
    assert score(run, "--input", str(src), "--output", str(out)) == 2
    one_line_error(capsys, "are damaged")  # the line still says what failed
    assert marker(out)["status"] == "failed" and not list(out.glob("*.parquet"))
    weights.write_bytes(good)
    assert score(run, "--input", str(src), "--output", str(out)) == 0
    assert marker(out)["status"] == "finished" and len(output_rows(out)) == 1
    capsys.readouterr()

    def left(name: str, status: str, *extra: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        score_output.write_marker(str(folder), {"status": status})
        for f in extra:
            (folder / f).write_text("kept")
        return folder

    assert score(run, "--input", str(src), "--output", str(left("stopped", "stopped"))) == 0
    for folder in (left("running", "running"), left("note", "failed", "notes.txt")):
        before = {p.name: p.read_bytes() for p in folder.iterdir()}
        assert score(run, "--input", str(src), "--output", str(folder)) == 2
        one_line_error(capsys, "holds an unfinished score output")
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


def test_a_full_disk_under_the_first_marker_is_one_line_and_leaves_an_output_to_reuse(
    trained_run, tmp_path, capsys, monkeypatch
):
    """The marker was rewritten in place: a full disk left it empty, and the folder then was "not an
    imdb-lora score output", refused even with --overwrite (and the job ended in pyarrow's traceback)."""
    import errno

    from imdb_lora.scale import output as score_output

    class FullDisk:  # the output's filesystem, where every write finds the disk full
        def __init__(self, real):
            self.real = real

        def __getattr__(self, name):
            return getattr(self.real, name)

        @contextlib.contextmanager
        def open_output_stream(self, path):
            with self.real.open_output_stream(path):  # created (empty), as a full disk still allows
                yield self

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    real = score_output.filesystem
    monkeypatch.setattr(score_output, "filesystem", lambda uri: (FullDisk(real(uri)[0]), real(uri)[1]))
    src, out = write_jsonl(tmp_path / "in.jsonl", [GOOD]), tmp_path / "out"
    assert score(trained_run, "--input", str(src), "--output", str(out)) == 2
    one_line_error(capsys, f"--output {out}: cannot write (No space left on device); free some space")
    monkeypatch.undo()
    assert score(trained_run, "--input", str(src), "--output", str(out)) == 0  # no --overwrite needed
    assert marker(out)["status"] == "finished"


def test_marker_and_refusals_go_through_the_outputs_pyarrow_filesystem(monkeypatch):
    """A remote output (here pyarrow's in-memory mock filesystem) is guarded as a local one is."""
    from imdb_lora.scale import output as score_output

    remote = fs._MockFileSystem()
    monkeypatch.setattr(score_output, "filesystem", lambda uri: (remote, uri.split("://", 1)[1]))
    remote.create_dir("bucket/mine")
    with remote.open_output_stream("bucket/mine/keep.txt") as f:
        f.write(b"precious")
    with pytest.raises(Exception, match="is not an imdb-lora score output; refusing to replace it"):
        score_output.prepare_output("mock://bucket/mine", ["mock://bucket/in"], overwrite=True)
    assert remote.get_file_info("bucket/mine/keep.txt").is_file
    for out, given in (("mock://bucket/in/", "mock://bucket/in"), ("mock://bucket", "mock://bucket/in/a.jsonl"),
                       ("mock://bucket/x/../in/out", "mock://bucket/in")):  # fmt: skip
        with pytest.raises(Exception, match="overlaps --input"):
            score_output.prepare_output(out, [given], overwrite=True)
    score_output.prepare_output("mock://bucket/out", ["mock://bucket/in"], overwrite=False)
    assert score_output.read_marker("mock://bucket/out")["status"] == "running"
    with remote.open_output_stream("bucket/out/part-0.parquet") as f:
        f.write(b"a part")
    score_output.finish_marker("mock://bucket/out", rows=3, errors=1, seconds=0.5)
    assert score_output.read_marker("mock://bucket/out")["status"] == "finished"
    score_output.prepare_output("mock://bucket/out", ["mock://bucket/in"], overwrite=True)
    assert [i.base_name for i in remote.get_file_info(fs.FileSelector("bucket/out"))] == [MARKER]
    assert score_output.read_marker("mock://bucket/out")["status"] == "running"


# ---------------------------------------------------------------- hostile input rows (L4, L5)


BAD_LINES = {
    "nested_too_deep": (b"[" * 100_000 + b"]" * 100_000, "line 2 is not readable JSON (RecursionError)"),
    "not_utf8": (b'{"id": "u", "text": "great \xff film"}', "line 2 is not UTF-8"),
    "label_and_input_label": (
        b'{"id": "d", "text": "great film", "label": 1, "input_label": 0}',
        "line 2 has both 'label' and 'input_label' (the output carries 'label' as 'input_label')",
    ),
    "lone_surrogate": (b'{"id": "s", "text": "great \\udc80 film"}', "line 2 is not valid Unicode"),
    "too_long": (b'{"id": "l", "text": "' + b"great film " * 20 + b'"}', "text longer than 100 characters"),
    # json keeps the last of two keys without a word: the text scored could be either
    "repeated_key": (
        b'{"id": "r", "text": "great", "text": "awful"}',
        "line 2 has the key 'text' more than once",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_LINES))
def test_a_hostile_jsonl_line_is_an_error_row_not_a_failed_job(trained_run, tmp_path, capsys, case):
    line, error = BAD_LINES[case]
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD, line, b'{"id": "after", "text": "awful boring"}'])
    out = tmp_path / "out"
    flags = ["--max-chars", "100"] if case == "too_long" else []  # the others fail with the default too
    assert score(trained_run, "--input", str(src), "--output", str(out), *flags) == 0, capsys.readouterr().err
    rows = output_rows(out)
    assert [r["source_row"] for r in rows] == [0, 1, 2]
    assert rows[0]["error"] is None and rows[2]["error"] is None and rows[2]["label"]
    assert rows[1]["error"].startswith(error) and rows[1]["label"] is None
    assert "text" not in rows[1] or rows[1]["text"] is None  # never scored as a changed text


def _inputs_that_give_no_text(tmp: Path) -> dict[str, tuple[Path, str]]:
    """Inputs whose every row was an error row (exit status 0), or a KeyError traceback."""
    jsonl = write_jsonl(tmp / "Text.jsonl", [b'{"Text": "great film"}', b'{"Text": "awful", "id": 2}'])
    twice_csv = tmp / "twice.csv"
    twice_csv.write_text("text,text\ngreat,awful\n")
    twice_pq, ints, gz = tmp / "twice.parquet", tmp / "ints.parquet", tmp / "gz.jsonl"
    pq.write_table(pa.table([pa.array(["great"]), pa.array(["awful"])], names=["text", "text"]), twice_pq)
    pq.write_table(pa.table({"text": [1, 2]}), ints)
    import gzip

    gz.write_bytes(gzip.compress(GOOD + b"\n"))
    return {
        "jsonl_without_the_key": (jsonl, "has no key 'text' in its first 2 JSON objects (keys: Text, id)"),
        "csv_column_twice": (twice_csv, "names column(s) ['text'] more than once"),
        "parquet_column_twice": (twice_pq, "names column(s) ['text'] more than once"),
        "parquet_text_of_ints": (ints, "column 'text' holds int64, not strings"),
        "gzip_named_jsonl": (gz, "is gzip-compressed, not text"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "jsonl_without_the_key",
        "csv_column_twice",
        "parquet_column_twice",
        "parquet_text_of_ints",
        "gzip_named_jsonl",
    ],
)
def test_an_input_that_gives_no_text_is_one_line_before_any_work(trained_run, tmp_path, capsys, case):
    src, error = _inputs_that_give_no_text(tmp_path)[case]
    out = tmp_path / "out"
    assert score(trained_run, "--input", str(src), "--output", str(out)) == 2
    assert str(src) in one_line_error(capsys, error)
    assert not out.exists()  # refused before the output was touched


def test_a_jsonl_byte_order_mark_is_read_as_a_csvs_is(trained_run, tmp_path):
    """pyarrow skips a CSV's byte order mark; a JSONL file's made line 1 an error row."""
    j, c = tmp_path / "in.jsonl", tmp_path / "in.csv"
    j.write_bytes(b'\xef\xbb\xbf{"text": "great film"}\n')
    c.write_bytes(b"\xef\xbb\xbftext\ngreat film\n")
    assert score(trained_run, "--input", str(j), str(c), "--output", str(tmp_path / "out")) == 0
    rows = output_rows(tmp_path / "out")
    assert [r["error"] for r in rows] == [None, None] and rows[0]["prob_positive"] == rows[1]["prob_positive"]


def test_label_and_input_label_on_different_lines_never_collide(trained_run, tmp_path):
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [b'{"text": "great film", "label": 1}', b'{"text": "awful film", "input_label": 0, "error": "x"}'],
    )
    assert score(trained_run, "--input", str(src), "--output", str(tmp_path / "out")) == 0
    rows = output_rows(tmp_path / "out")
    assert [r["input_label"] for r in rows] == [1, 0] and [r["input_error"] for r in rows] == [None, "x"]
    assert all(r["error"] is None for r in rows)


def test_an_int_over_64_bits_is_carried_as_text(trained_run, tmp_path):
    src = write_jsonl(
        tmp_path / "in.jsonl",
        [b'{"id": 1, "text": "great film"}', b'{"id": 1' + b"0" * 30 + b', "text": "awful"}'],
    )
    assert score(trained_run, "--input", str(src), "--output", str(tmp_path / "out")) == 0
    assert [r["id"] for r in output_rows(tmp_path / "out")] == ["1", "1" + "0" * 30]


def test_a_csv_cell_of_megabytes_is_an_error_row_not_a_failed_job(trained_run, tmp_path, capsys):
    big = "great " * 600_000  # 3.6 MB: more than pyarrow's default 1 MiB block reads
    src = tmp_path / "in.csv"
    src.write_text(f'id,text\n1,great film\n2,"{big}"\n3,awful boring\n')
    out = tmp_path / "out"
    assert score(trained_run, "--input", str(src), "--output", str(out)) == 0, capsys.readouterr().err
    rows = output_rows(out)
    assert [r["error"] for r in rows] == [
        None,
        "text longer than 100,000 characters (3,600,000; --max-chars)",
        None,
    ]


def test_a_csv_row_over_the_readers_block_is_one_line_naming_file_and_cause(
    trained_run, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(sources, "csv_block_bytes", lambda max_chars: 1 << 20)
    src = tmp_path / "in.csv"
    src.write_text('id,text\n1,great film\n2,"' + "great " * 600_000 + '"\n')
    assert score(trained_run, "--input", str(src), "--output", str(tmp_path / "out")) == 2
    one_line_error(capsys, f"--input: cannot read {src} after row 0 (a CSV row is longer than 1 MiB")
    assert marker(tmp_path / "out")["status"] == "failed"


def test_max_chars_is_in_the_help(capsys):
    with contextlib.suppress(SystemExit):
        main(["score", "--help"])
    out = capsys.readouterr().out
    assert "--max-chars N" in out and "100,000" in out


# ---------------------------------------------------------------- one writer per local output (lock)

LOCK = "_imdb_lora_score.lock"
# Another process that takes the output as a job does, writes a part and holds on until it is killed.
HOLDER = """
import sys, time
from imdb_lora.scale.output import prepare_output
lock = prepare_output(sys.argv[1], [sys.argv[2]], overwrite=False)
open(sys.argv[1] + "/part-00000.parquet", "w").write("being written")
print("ready", flush=True)
time.sleep(600)
"""


@contextlib.contextmanager
def holding_job(out: Path, src: Path):
    """Another process holding `out` as a running job does, killed (SIGKILL) when the block ends."""
    import os
    import subprocess
    import sys

    import imdb_lora

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(imdb_lora.__file__).parents[1]), env.get("PYTHONPATH", "")])
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out), str(src)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def folder_state(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_a_second_job_on_a_locked_output_is_refused_and_touches_nothing(trained_run, tmp_path, capsys):
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    out = tmp_path / "out"
    with holding_job(out, src) as proc:
        before = folder_state(out)
        assert (
            set(before) == {MARKER, LOCK, "part-00000.parquet"} and before[LOCK] == f"{proc.pid}\n".encode()
        )
        for flags in ([], ["--overwrite"]):
            assert score(trained_run, "--input", str(src), "--output", str(out), *flags) == 2
            one_line_error(
                capsys, f"--output {out} is being written by another imdb-lora score job (pid {proc.pid})"
            )
            assert folder_state(out) == before
    # A killed job's lock went with its process; its "running" marker says what happened.
    assert score(trained_run, "--input", str(src), "--output", str(out)) == 2
    one_line_error(
        capsys, "holds an unfinished score output (status 'running': the job was killed or failed)"
    )
    assert score(trained_run, "--input", str(src), "--output", str(out), "--overwrite") == 0
    assert marker(out)["status"] == "finished" and [r["id"] for r in output_rows(out)] == ["ok"]


def test_a_lock_file_without_a_holder_blocks_nobody(trained_run, tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK).write_text("99999999\n")  # left by a killed job: the only thing in the folder
    assert score(trained_run, "--input", str(src), "--output", str(out)) == 0
    assert marker(out)["status"] == "finished" and len(output_rows(out)) == 1


def test_the_ray_engines_driver_holds_the_lock_until_the_job_ends(trained_run, tmp_path, monkeypatch):
    """The lock is the driver's (Ray's workers write the parts): held while _run_ray runs, then let go."""
    from imdb_lora.errors import UserError
    from imdb_lora.scale import engines
    from imdb_lora.scale import output as score_output

    src = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    out = tmp_path / "out"
    seen = []

    def ray_stand_in(job, *a):
        with pytest.raises(UserError, match="is being written by another imdb-lora score job"):
            score_output.prepare_output(str(out), [str(src)], overwrite=True)
        seen.append(marker(out)["status"])
        return engines.Summary(0, 0, 0.1, [])

    monkeypatch.setattr(engines, "_run_ray", ray_stand_in)
    job = engines.ScoreJob(model=str(trained_run), inputs=[str(src)], output=str(out))
    engines.prepare(job)
    engines.run_ray(job)
    assert seen == ["running"] and marker(out)["status"] == "finished"
    score_output.prepare_output(str(out), [str(src)], overwrite=True).close()  # let go: taken again


# ---------------------------------------------------------------- encodings (CSV and JSONL)

# An export whose rows are UTF-8 (ASCII here, which Latin-1 reads the same) but for one Latin-1 row.
LATIN1_CSV = b"id,text,label\n1,great film,1\n2,caf\xe9 cr\xe8me: superb,1\n3,awful boring,0\n"


def test_a_csv_cell_that_is_not_utf8_is_an_error_row_not_a_failed_job(trained_run, tmp_path, capsys):
    src = tmp_path / "in.csv"
    src.write_bytes(LATIN1_CSV)
    out = tmp_path / "out"
    assert score(trained_run, "--input", str(src), "--output", str(out), "--keep-text") == 0, (
        capsys.readouterr()
    )
    rows = output_rows(out)
    assert [(r["id"], r["source_row"], r["input_label"]) for r in rows] == [
        ("1", 0, "1"),
        ("2", 1, "1"),
        ("3", 2, "0"),
    ]
    assert rows[1]["error"] == "column 'text' is not UTF-8 (byte 0xe9 at offset 3; --encoding)"
    assert rows[1]["text"] is None and rows[1]["label"] is None
    assert rows[0]["error"] is None and rows[2]["error"] is None and rows[0]["label"] and rows[2]["label"]


@pytest.mark.parametrize(
    ("encoding", "data", "text"),
    [
        ("latin-1", LATIN1_CSV, "café crème: superb"),
        ("cp1252", LATIN1_CSV.replace(b"superb", b"\x93superb\x94"), "café crème: “superb”"),
        ("utf-16", LATIN1_CSV.decode("latin-1").encode("utf-16"), "café crème: superb"),  # pyarrow transcodes
    ],
)
def test_encoding_reads_a_csv_export_as_written(trained_run, tmp_path, capsys, encoding, data, text):
    src = tmp_path / "in.csv"
    src.write_bytes(data)
    out = tmp_path / "out"
    args = ["--input", str(src), "--output", str(out), "--keep-text", "--encoding", encoding]
    assert score(trained_run, *args) == 0, capsys.readouterr().err
    rows = output_rows(out)
    assert [r["error"] for r in rows] == [None] * 3
    assert [r["text"] for r in rows] == ["great film", text, "awful boring"]


def test_both_engines_read_encodings_alike(tmp_path):
    """Ray's read stage (read_files) is read_batches, with the same arguments, as the local engine's."""
    from imdb_lora.scale.engines import read_files

    src = tmp_path / "in.csv"
    src.write_bytes(LATIN1_CSV.replace(b"superb", b"\x81"))  # 0x81: a byte cp1252 leaves undefined
    files = pa.table({"uri": [str(src)], "format": ["csv"]})
    for encoding in ("utf-8", "cp1252", "iso8859-1"):
        local = list(sources.read_batches(str(src), "csv", 2, "text", 1000, encoding))
        ray = list(read_files(files, rows=2, text_column="text", max_chars=1000, encoding=encoding))
        assert [t.to_pylist() for t in ray] == [t.to_pylist() for t in local]
        errors = [r["error"] for t in local for r in t.to_pylist()]
        assert [r["source_row"] for t in local for r in t.to_pylist()] == [0, 1, 2]
        want = {"utf-8": "UTF-8 (byte 0xe9", "cp1252": "cp1252 (byte 0x81", "iso8859-1": None}[encoding]
        assert errors[0] is None and errors[2] is None
        assert errors[1] == want or errors[1].startswith(f"column 'text' is not {want}")


def test_encoding_reads_jsonl_too(trained_run, tmp_path):
    src = write_jsonl(
        tmp_path / "in.jsonl", [GOOD, '{"id": "l", "text": "caf\xe9 superb"}'.encode("latin-1")]
    )
    assert score(trained_run, "--input", str(src), "--output", str(tmp_path / "a")) == 0
    assert [r["error"] for r in output_rows(tmp_path / "a")] == [None, "line 2 is not UTF-8"]
    args = ["--input", str(src), "--output", str(tmp_path / "b"), "--keep-text", "--encoding", "latin-1"]
    assert score(trained_run, *args) == 0
    assert [(r["text"], r["error"]) for r in output_rows(tmp_path / "b")] == [
        ("great wonderful film", None),
        ("café superb", None),
    ]


def test_row_errors_name_the_encoding_as_typed_not_its_codec(trained_run, tmp_path, capsys):
    """--encoding US-ASCII is Python's codec `ascii`: a row's error names what the user typed."""
    csv, jsonl = tmp_path / "in.csv", tmp_path / "in.jsonl"
    csv.write_bytes(LATIN1_CSV)
    write_jsonl(jsonl, [GOOD, '{"id": "l", "text": "caf\xe9 superb"}'.encode("latin-1")])
    for src, name in ((csv, "a"), (jsonl, "b")):
        args = ["--input", str(src), "--output", str(tmp_path / name), "--encoding", "US-ASCII"]
        assert score(trained_run, *args) == 0, capsys.readouterr().err
    assert output_rows(tmp_path / "a")[1]["error"] == (
        "column 'text' is not US-ASCII (byte 0xe9 at offset 3; --encoding)"
    )
    assert [r["error"] for r in output_rows(tmp_path / "b")] == [None, "line 2 is not US-ASCII"]


def test_a_csv_header_error_names_the_encoding_as_typed(trained_run, tmp_path, capsys):
    src = tmp_path / "in.csv"
    src.write_bytes(b"id,r\xe9sum\xe9,text\n1,x,great film\n")
    args = ["--input", str(src), "--output", str(tmp_path / "out"), "--encoding", "US-ASCII"]
    assert score(trained_run, *args) == 2
    one_line_error(capsys, f"--input: the header of {src} is not US-ASCII; give its encoding with --encoding")


def test_ray_read_stage_names_the_encoding_as_typed(trained_run, tmp_path):
    """Ray's read stage gets the local engine's reading settings, --encoding as typed among them."""
    from imdb_lora.scale import engines

    src = tmp_path / "in.csv"
    src.write_bytes(LATIN1_CSV)
    job = engines.ScoreJob(
        model=str(trained_run), inputs=[str(src)], output=str(tmp_path / "out"), encoding="US-ASCII"
    )
    engines.prepare(job)
    job.lock.close()  # prepare took the output; nothing is written here
    assert job.encoding == "ascii" and job.read_args()["encoding"] == "US-ASCII"
    files = pa.table({"uri": [str(src)], "format": ["csv"]})
    rows = [r for t in engines.read_files(files, **job.read_args()) for r in t.to_pylist()]
    assert rows[1]["error"].startswith("column 'text' is not US-ASCII (byte 0xe9")
    assert [r["text"] for r in rows] == ["great film", None, "awful boring"]


@pytest.mark.parametrize("name", ["utf-9", "rot13"])
def test_an_unknown_encoding_is_one_line(trained_run, tmp_path, capsys, name):
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    assert score(trained_run, "--input", str(src), "--output", str(tmp_path / "out"), "--encoding", name) == 2
    one_line_error(capsys, f"--encoding {name}: not a text encoding")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- a JSONL line without end


def test_a_jsonl_line_of_megabytes_is_an_error_row_and_the_next_lines_keep_their_numbers(
    trained_run, tmp_path
):
    """A .gz of a few kB expanding to a 3,000,000-character line (the bomb, small): with --max-chars 20
    the reader stops at 1,000,240 characters and skips to the next newline."""
    import gzip

    huge = b'{"id": "huge", "text": "' + b"great " * 500_000 + b'"}'
    src = tmp_path / "in.jsonl.gz"
    src.write_bytes(
        gzip.compress(b"\n".join([GOOD, huge, b"", b"{not json", b'{"id": "end", "text": "awful"}']))
    )
    assert src.stat().st_size < 100_000
    out = tmp_path / "out"
    assert score(trained_run, "--input", str(src), "--output", str(out), "--max-chars", "20") == 0
    rows = output_rows(out)
    assert [(r["source_row"], r["error"]) for r in rows] == [
        (0, None),
        (1, "line 2 is longer than 1,000,240 characters (12 per --max-chars character, plus 1,000,000)"),
        (2, "line 4 is not JSON (Expecting property name enclosed in double quotes)"),
        (3, None),
    ]
    assert rows[3]["id"] == "end" and rows[3]["label"]


def test_a_long_line_is_skipped_in_pieces_not_read_whole(tmp_path):
    """Memory: reading past a 50,000,000-character line costs far less than the line."""
    import gzip
    import io
    import tracemalloc

    src = tmp_path / "bomb.gz"
    src.write_bytes(gzip.compress(b"x" * 50_000_000 + b"\nafter\n", compresslevel=1))
    with fs.LocalFileSystem().open_input_stream(str(src), compression="gzip") as f:
        lines = io.TextIOWrapper(f, encoding="utf-8")
        tracemalloc.start()
        got = list(sources._bounded_lines(lines, 1000))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert got == [None, "after\n"] and peak < 5_000_000


@pytest.mark.parametrize(
    "twice", ["same path", "folder and its file", "symlink", "file URI", "folder symlink", "hard link"]
)
def test_a_file_named_twice_is_refused_in_one_line(tmp_path, twice):
    # it was scored twice: its rows repeated (under the same source_file and source_row, or another name)
    from imdb_lora.errors import UserError

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text('{"text": "fine"}\n')
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "in" / "a.jsonl")
    (tmp_path / "in-link").symlink_to(tmp_path / "in")
    os.link(tmp_path / "in" / "a.jsonl", tmp_path / "hard.jsonl")  # one file, as A.jsonl on a case-blind disk
    second = {
        "same path": tmp_path / "in" / "a.jsonl",
        "folder and its file": tmp_path / "in" / "a.jsonl",
        "symlink": tmp_path / "link.jsonl",
        "file URI": f"file://{tmp_path / 'in' / 'a.jsonl'}",
        "folder symlink": tmp_path / "in-link",
        "hard link": tmp_path / "hard.jsonl",
    }[twice]
    first = str(tmp_path / "in") if "folder" in twice else str(tmp_path / "in" / "a.jsonl")
    with pytest.raises(
        UserError, match=r"--input: .*a\.jsonl.* is named twice by --input .*; give each file once"
    ):
        sources.list_sources([first, str(second)])
    assert [s.uri for s in sources.list_sources([str(tmp_path / "in")])] == [str(tmp_path / "in" / "a.jsonl")]


def test_a_worker_larger_than_the_ray_cluster_is_refused():
    """--cpus-per-worker 64 on a 2-CPU Ray cluster: one line, not a job that waits for ever (it did, with
    Ray's autoscaler logging 'No available node types can fulfill resource request' every ~35 s)."""
    from imdb_lora.scale.engines import pool_size

    assert pool_size({"CPU": 2.0}, 1.0, 0) == 2 and pool_size({"CPU": 2.0}, 2.0, 0) == 1
    with pytest.raises(UserError, match=r"^--cpus-per-worker 64: the Ray cluster has 2.0 CPUs$"):
        pool_size({"CPU": 2.0}, 64.0, 0)
    with pytest.raises(UserError, match="--num-gpus-per-worker 1"):
        pool_size({"CPU": 2.0}, 1.0, 1.0)
    assert pool_size({"CPU": 8.0, "GPU": 2.0}, 1.0, 1.0) == 2
