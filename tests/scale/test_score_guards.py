"""`imdb-lora score` guards (audit23): --overwrite replaces only a score output (its marker), the output
never overlaps an input or the current directory, and hostile input rows become error rows, not failed
jobs. Fast: the tiny trained run of conftest, files of a few lines."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest

from imdb_lora.cli import main
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
    one_line_error(capsys, "holds an unfinished score output (status 'failed'")
    # A killed job cannot write anything more: its marker still says "running".
    score_output.write_marker(str(out), {"status": "running"})
    assert score(trained_run, "--input", str(src), "--output", str(out)) == 2
    one_line_error(capsys, "holds an unfinished score output (status 'running': the job was killed")


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
