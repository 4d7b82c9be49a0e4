"""predict and evaluate --file read big inputs a chunk at a time: their memory is bounded by the chunk,
not by the input (both read the whole file first, and evaluate tokenized every text at once: a few
hundred MB of reviews took gigabytes), with the same output as before."""

import io
import json
import os
import sys
import threading

import pytest

from imdb_lora.cli import main
from imdb_lora.data.files import CsvRows, TextLines, read_texts
from imdb_lora.errors import UserError


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# Line breaks str.splitlines() knows besides "\n" (the old whole-file reading split on them), a byte
# order mark, blank lines, non-ASCII text: the streamed reading must split and decode exactly the same.
PLAIN = (
    "\ufeffgreat film\n\nawful film\r\nboring\rplot was dull\n   \nsuperb\u2028acting\n"
    "héllo wonderful\x0cstory\n" + "".join(f"film number {i} was great\n" for i in range(9)) + "last line"
)


def inputs(tmp_path):
    plain = tmp_path / "in.txt"
    plain.write_bytes(PLAIN.encode())
    texts = [t for t in PLAIN.removeprefix("\ufeff").splitlines() if t.strip()]
    jsonl = tmp_path / "in.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    csv = tmp_path / "in.csv"
    csv.write_text(
        'id,text\n1,"a review\nover two lines"\n' + "".join(f'{i},"{t}"\n' for i, t in enumerate(texts))
    )
    return plain, jsonl, csv


def test_predict_output_is_the_same_whatever_the_chunk(trained_run, tmp_path, capsys, monkeypatch):
    """Chunks of 3 texts give byte for byte what one chunk gives, in both formats, for every kind of
    --file and for stdin; and the texts are the lines the old whole-file reading gave."""
    from imdb_lora.cli import chunks

    plain, jsonl, csv = inputs(tmp_path)
    expected = [t for t in PLAIN.removeprefix("\ufeff").splitlines() if t.strip()]
    blank = len(PLAIN.splitlines()) - len(expected)
    assert blank == 2 and read_texts(str(plain), None) == (expected, blank)
    for source in (plain, jsonl, csv, "stdin"):
        for flags in (["--json"], []):
            outs = []
            for chunk in (10_000, 3):
                monkeypatch.setattr(chunks, "CHUNK", chunk)
                if source == "stdin":
                    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(PLAIN.encode()), "utf-8"))
                    args = []
                else:
                    args = ["--file", str(source)]
                code, out, err = run(capsys, "predict", str(trained_run), *args, *flags)
                assert code == 0, err
                outs.append((out, "skipped 2 blank lines" in err))
            assert outs[0] == outs[1]
            if flags and source in (plain, "stdin"):
                assert [json.loads(line)["text"] for line in outs[0][0].splitlines()] == expected
                assert outs[0][1]  # said once all was read, at the end of a long input


class Boom(Exception):
    pass


class FailingStdin:
    """stdin whose reading fails after `lines` lines (old predict read all of stdin before predicting)."""

    def __init__(self, lines: int):
        self.lines = lines

    def isatty(self) -> bool:
        return False

    def __iter__(self):
        for i in range(self.lines):
            yield f"great film {i}\n"
        raise Boom("stdin was read past what the first chunk needed")

    def read(self) -> str:
        return "".join(self)


def test_predict_prints_a_chunk_before_reading_the_next(trained_run, capsys, monkeypatch):
    from imdb_lora.cli import chunks

    monkeypatch.setattr(chunks, "CHUNK", 2)
    monkeypatch.setattr(sys, "stdin", FailingStdin(4))
    with pytest.raises(Boom):
        main(["predict", str(trained_run), "--json"])
    out = capsys.readouterr().out
    assert [json.loads(line)["text"] for line in out.splitlines()] == ["great film 0", "great film 1"]


def test_predict_from_a_pipe_answers_before_the_pipe_ends(trained_run, tmp_path, capsys, monkeypatch):
    """A --file pipe: the first chunk is predicted while the writer still holds the pipe open (the old
    predict waited for its end, so a producer that waits for answers never got one)."""
    from imdb_lora.cli import chunks
    from imdb_lora.inference.classifier import Classifier

    fifo = tmp_path / "texts.fifo"
    os.mkfifo(fifo)
    predicted = threading.Event()
    waited_out: list[bool] = []

    def writer():
        with open(fifo, "w") as f:
            f.write("great film\nawful film\nboring film\n")
            f.flush()
            waited_out.append(not predicted.wait(20))
            f.write("superb film\n")

    def noting(self, *args, classify=Classifier.predict, **kw):
        predicted.set()
        return classify(self, *args, **kw)

    monkeypatch.setattr(chunks, "CHUNK", 2)
    monkeypatch.setattr(Classifier, "predict", noting)
    t = threading.Thread(target=writer)
    t.start()
    try:
        code, out, err = run(capsys, "predict", str(trained_run), "--file", str(fifo), "--json")
    finally:
        predicted.set()
        t.join()
    assert code == 0, err
    assert waited_out == [False]
    assert len(out.splitlines()) == 4


def test_predict_names_a_bad_line_of_a_later_chunk(trained_run, tmp_path, capsys, monkeypatch):
    """An error past the first chunk still names its line (or its text's place); the chunks before it
    were printed (the one that holds it is read whole, and one text more, before it is computed)."""
    from imdb_lora.cli import chunks

    monkeypatch.setattr(chunks, "CHUNK", 2)
    cases = [
        ("in.jsonl", "".join(json.dumps({"text": f"film {i}"}) + "\n" for i in range(4)).encode() + b"{oops\n",
         "in.jsonl line 5 is not JSON"),
        ("in.txt", b"great\nfilm\nawful\nplot\nbad \xff byte\n", "in.txt is not UTF-8 (byte 0xff on line 5)"),
        ("in.csv", b'text\ngreat\nfilm\nawful\nplot\n"open\nquote\n',
         "in.csv line 6 opens a quoted cell that is never closed"),
        ("empty.txt", b"great\nfilm\nawful\n\x00\n", "text 4 is empty"),
    ]  # fmt: skip
    for name, content, error in cases:
        f = tmp_path / name
        f.write_bytes(content)
        code, out, err = run(capsys, "predict", str(trained_run), "--file", str(f), "--json")
        assert code == 2 and error in err and len(out.splitlines()) == 2, (name, err)


def test_csv_rows_are_read_one_at_a_time(tmp_path):
    def lines():
        yield "id,text\n"
        yield '1,"great\n'
        yield 'film"\n'
        yield "2,awful\n"
        yield "3,boring\n"
        raise Boom("read past the row asked for")

    rows = iter(CsvRows(lines(), tmp_path / "x.csv", "--file"))
    assert next(rows) == (2, {"id": "1", "text": "great\nfilm"})
    assert next(rows) == (4, {"id": "2", "text": "awful"})
    with pytest.raises(Boom):
        next(rows)


def test_text_lines_are_read_as_asked_for(tmp_path):
    f = tmp_path / "in.txt"
    f.write_text("a\n\nb\n" + "c\n" * 10)
    reader = TextLines(str(f), None)
    it = iter(reader)
    assert [next(it), next(it)] == ["a", "b"] and reader.blank == 1
    with pytest.raises(UserError, match="no such file"):
        TextLines(str(tmp_path / "missing.txt"), None)  # checked when made, before any model loads


# ---------------------------------------------------------------- evaluate --file


def labeled(tmp_path, n: int = 11):
    f = tmp_path / "labeled.jsonl"
    words = ["great", "awful", "superb film", "boring plot", "a dull waste", "loved it"]
    f.write_text(
        "".join(json.dumps({"text": f"{words[i % 6]} {i}", "label": i % 2}) + "\n" for i in range(n))
    )
    return f


def test_evaluate_file_is_the_same_whatever_the_chunk(trained_run, tmp_path, capsys, monkeypatch):
    from imdb_lora.cli import chunks

    f = labeled(tmp_path)
    results, errors = [], []
    for chunk in (10_000, 3):
        monkeypatch.setattr(chunks, "CHUNK", chunk)
        out_dir = tmp_path / f"errors-{chunk}"
        code, out, err = run(
            capsys, "evaluate", str(trained_run), "--file", str(f), "--json", "--errors", "4",
            "--errors-dir", str(out_dir),
        )  # fmt: skip
        assert code == 0, err
        results.append(json.loads(out))
        errors.append(
            [json.loads(line) for line in (out_dir / "labeled.jsonl.errors.jsonl").read_text().splitlines()]
        )
    a, b = results
    assert a["rows"] == b["rows"] == 11 and a["confusion"] == b["confusion"]
    for key in ("accuracy", "loss", "brier", "ece"):
        assert a[key] == pytest.approx(b[key], abs=1e-6)
    assert [(e["row"], e["line"], e["label"], e["text"]) for e in errors[0]] == [
        (e["row"], e["line"], e["label"], e["text"]) for e in errors[1]
    ]
    assert errors[0] and all(e["text"].endswith(f" {e['row'] - 1}") for e in errors[0])


def test_evaluate_holds_the_labels_of_a_file_not_its_texts(tmp_path):
    """The texts are read again chunk by chunk (a pipe's alone are held: it cannot be read twice); a
    file that changed in between is said in one line rather than evaluated against the wrong labels."""
    from imdb_lora.cli.evaluate import LabeledFile

    f = labeled(tmp_path, 5)
    part = LabeledFile.read(str(f), "text", "label")
    assert part.held is None and list(part.labels) == [0, 1, 0, 1, 0] and list(part.lines) == [1, 2, 3, 4, 5]
    assert [t for _, t in part.texts()] == [json.loads(line)["text"] for line in f.read_text().splitlines()]
    f.write_text(f.read_text().replace('"label": 1', '"label": 0', 1))
    with pytest.raises(UserError, match="changed while it was evaluated"):
        list(part.texts())
    f.write_text("".join(f.read_text().splitlines(keepends=True)[:3]))
    part = LabeledFile.read(str(f), "text", "label")
    f.write_text(f.read_text() + json.dumps({"text": "one more", "label": 1}) + "\n")
    with pytest.raises(UserError, match="changed while it was evaluated"):
        list(part.texts())

    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    t = threading.Thread(target=lambda: fifo.write_text('{"text": "great", "label": 1}\n'))
    t.start()
    part = LabeledFile.read(str(fifo), "text", "label")
    t.join()
    assert part.held == ["great"] and list(part.texts()) == [(0, "great")]


def test_evaluate_file_shows_its_checking_pass(trained_run, tmp_path, capsys):
    """The pass that checks every row before the model loads had no bar: a big file was silent there
    (~2 s per 100,000 reviews); it now draws one on stderr, named by the file, gone when done."""
    f = labeled(tmp_path, 7)
    code, out, err = run(capsys, "evaluate", str(trained_run), "--file", str(f), "--json")
    assert code == 0 and json.loads(out)["rows"] == 7
    assert "check labeled.jsonl: 0review" in err  # drawn at once, then every 0.1 s as the scoring bar
    assert err.index("check labeled.jsonl") < err.index("evaluate labeled.jsonl")
