"""The CLI run in-process: predict/evaluate output, and every bad input ending in exit code 2."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import yaml
from conftest import build_tiny, sigterm_fails_the_test, train_args, without_startup

from imdb_lora.cli import main
from imdb_lora.errors import Terminated, UserError
from imdb_lora.modeling.load import resolve_device

FANTASTIC = "This movie was absolutely fantastic! I loved every minute of it."


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_prints_the_reference_format(trained_run, capsys):
    code, out, _ = run(capsys, "predict", str(trained_run), FANTASTIC, "Terrible film.")
    assert code == 0
    blocks = out.strip().split("\n\n")
    assert len(blocks) == 2
    lines = blocks[0].splitlines()
    assert lines[0] == f"Text: {FANTASTIC}"
    assert lines[1] in ("Prediction: POSITIVE", "Prediction: NEGATIVE")
    conf = float(lines[2].removeprefix("Confidence: "))
    neg, pos = (float(x.split(": ")[1]) for x in lines[3].removeprefix("Probabilities - ").split(" | "))
    assert lines[3].startswith("Probabilities - Negative: ") and " | Positive: " in lines[3]
    assert conf == max(neg, pos) and abs(neg + pos - 1) < 2e-4
    assert blocks[1].splitlines()[0] == "Text: Terrible film."


def test_predict_json_keeps_input_order_across_length_sorted_batches(trained_run, capsys):
    texts = ["great " * n + "film" for n in (1, 30, 3, 12, 7)]
    code, out, _ = run(capsys, "predict", str(trained_run), *texts, "--json", "--batch-size", "2")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["text"] for r in rows] == texts
    for r in rows:
        p = r["probabilities"]
        assert r["label"] == ("POSITIVE" if p["positive"] > p["negative"] else "NEGATIVE")
    # one at a time gives the same numbers as batched
    _, single, _ = run(capsys, "predict", str(trained_run), texts[3], "--json")
    assert json.loads(single)["probabilities"] == pytest.approx(rows[3]["probabilities"], abs=1e-5)


def test_predict_prints_a_long_stream_chunk_by_chunk(trained_run, capsys, monkeypatch):
    """predict held every text's token ids, predictions and output until the last text was computed: a
    stream of 50,000 reviews grew its memory with every review (and printed nothing until the end). Now
    it computes and prints a chunk at a time, with the same output as one pass."""
    from imdb_lora.cli import chunks
    from imdb_lora.inference.classifier import Classifier

    texts = ["great " * n + "film" for n in (1, 30, 3, 12, 7)]
    for flag in ("--json", "--raw"):  # --raw: any flag that keeps the text format
        _, whole, _ = run(capsys, "predict", str(trained_run), *texts, flag)
        calls: list[tuple[int, str]] = []

        def one_chunk(self, chunk, *args, calls=calls, classify=Classifier.predict, **kw):
            calls.append((len(chunk), capsys.readouterr().out))  # what was printed before this chunk
            return classify(self, chunk, *args, **kw)

        monkeypatch.setattr(chunks, "CHUNK", 2)
        monkeypatch.setattr(Classifier, "predict", one_chunk)
        code, rest, _ = run(capsys, "predict", str(trained_run), *texts, flag)
        monkeypatch.undo()
        assert code == 0 and [n for n, _ in calls] == [2, 2, 1]
        assert calls[1][1] and "".join(out for _, out in calls) + rest == whole


@pytest.mark.parametrize("fmt", ["txt", "jsonl", "csv"])
def test_predict_from_file(trained_run, tmp_path, capsys, fmt):
    texts = ["great film", "awful, boring waste"]
    f = tmp_path / f"in.{fmt}"
    if fmt == "txt":
        f.write_text("\n".join(texts) + "\n\n")
    elif fmt == "jsonl":
        f.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    else:
        f.write_text('id,text\n1,great film\n2,"awful, boring waste"\n')
    code, out, _ = run(capsys, "predict", str(trained_run), "--file", str(f), "--json")
    assert code == 0 and [json.loads(line)["text"] for line in out.splitlines()] == texts


def test_counts_say_one_row_and_two_rows():
    from imdb_lora.errors import counted

    assert [counted(n, "row") for n in (0, 1, 2, 1234)] == ["0 rows", "1 row", "2 rows", "1,234 rows"]
    assert (
        counted(1, "process", "processes") == "1 process"
        and counted(4, "process", "processes") == "4 processes"
    )
    assert counted(1.0, "GPU") == "1.0 GPU" and counted(0.5, "GPU") == "0.5 GPUs"  # Ray's resource counts


def test_predict_says_how_many_blank_lines_it_skipped(trained_run, tmp_path, capsys, monkeypatch):
    # they used to vanish silently, so outputs no longer lined up with input lines unnoticed
    f = tmp_path / "in.txt"
    f.write_text("a fine film\n\nawful\n   \nboring\n")
    code, out, err = run(capsys, "predict", str(trained_run), "--file", str(f), "--json")
    assert code == 0 and len(out.splitlines()) == 3 and f"skipped 2 blank lines of --file {f}" in err
    monkeypatch.setattr(sys, "stdin", io.StringIO("great\n\nawful\n"))
    code, out, err = run(capsys, "predict", str(trained_run), "--json")
    assert code == 0 and len(out.splitlines()) == 2 and "skipped 1 blank line of stdin" in err
    code, _, err = run(capsys, "predict", str(trained_run), "great")
    assert code == 0 and "skipped" not in err


def test_predict_says_on_stderr_what_it_loaded(trained_run, capsys):
    """predict did not say which model it read, nor whether its probabilities were calibrated; said on
    stderr, stdout stays the predictions alone (--json lines parse, pipes get nothing else)."""
    base = json.loads((trained_run / "run.json").read_text())["model"]
    for flags, note in (([], "calibrated: temperature "), (["--raw"], "raw probabilities (--raw")):
        code, out, err = run(capsys, "predict", str(trained_run), "great", "awful", "--json", *flags)
        assert code == 0 and [json.loads(line)["text"] for line in out.splitlines()] == ["great", "awful"]
        assert err.splitlines() == [line for line in err.splitlines() if line.startswith("loaded ")]
        assert err.startswith(f"loaded {trained_run}: lora run of {base} (torch, cpu), {note}"), err


def test_predict_text_column(trained_run, tmp_path, capsys):
    f = tmp_path / "in.csv"
    f.write_text('id,review\n1,great film\n2,"awful, boring"\n')
    code, out, _ = run(
        capsys, "predict", str(trained_run), "--file", str(f), "--text-column", "review", "--json"
    )
    assert code == 0 and [json.loads(line)["text"] for line in out.splitlines()] == [
        "great film",
        "awful, boring",
    ]
    # .ndjson is JSON Lines, as for score: it was refused ("--text-column applies to ... only") and,
    # without the flag, its lines were classified as texts, braces and all
    nd = tmp_path / "in.ndjson"
    nd.write_text('{"id": 1, "review": "great film"}\n')
    code, out, _ = run(
        capsys, "predict", str(trained_run), "--file", str(nd), "--text-column", "review", "--json"
    )
    assert code == 0 and json.loads(out)["text"] == "great film"
    expect_error(
        capsys,
        "lacks column(s) ['text']; it needs 'text' (columns found: ['id', 'review'])",
        "predict",
        str(trained_run),
        "--file",
        str(f),
    )
    # an empty cell is named by its file and line, not as "text 2" of the texts read
    f.write_text('id,review\n1,great film\n2,"  "\n')
    expect_error(
        capsys, f"--file: {f} line 3 has an empty 'review' text",
        "predict", str(trained_run), "--file", str(f), "--text-column", "review",
    )  # fmt: skip
    nd.write_text('{"review": "great film"}\n{"review": ""}\n')
    expect_error(
        capsys, f"--file: {nd} line 2 has an empty 'review' text",
        "predict", str(trained_run), "--file", str(nd), "--text-column", "review",
    )  # fmt: skip
    expect_error(
        capsys, "--text-column applies to a CSV, TSV or JSONL --file only",
        "predict", str(trained_run), "x", "--text-column", "review",
    )  # fmt: skip


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stdin", [io.StringIO, Terminal])
def test_predict_from_stdin(trained_run, capsys, monkeypatch, stdin):
    monkeypatch.setattr(sys, "stdin", stdin("great film\nawful film\n"))
    code, out, err = run(capsys, "predict", str(trained_run))
    assert code == 0 and out.count("Prediction: ") == 2
    # typed in a terminal, the texts are asked for (a pipe stays silent)
    assert ("end with Ctrl-D" in err) == (stdin is Terminal)


@pytest.mark.parametrize(
    "raw, error",
    [
        (b"great \xff film\n", "stdin is not UTF-8 (byte 0xff on line 1)"),  # was a tokenizer traceback
        (b"\x1f\x8b\x08\x00\x00", "stdin is gzip-compressed, not text"),
    ],
)
def test_predict_from_stdin_that_is_not_utf8_is_one_line(tmp_path, capsys, monkeypatch, raw, error):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"))
    expect_error(capsys, error, "predict", str(tmp_path))  # refused before any run is read


def test_predict_from_stdin_drops_a_byte_order_mark(trained_run, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"\xef\xbb\xbfgreat film\n")))
    code, out, _ = run(capsys, "predict", str(trained_run), "--json")
    assert code == 0 and json.loads(out)["text"] == "great film"


def test_evaluate_json(trained_run, capsys):
    code, out, _ = run(capsys, "evaluate", str(trained_run), "--split", "val", "--json")
    r = json.loads(out)
    assert code == 0 and r["split"] == "val" and r["examples"] == 12 and 0 <= r["accuracy"] <= 1
    info = json.loads((trained_run / "run.json").read_text())
    assert r["accuracy"] == pytest.approx(info["val_accuracy"], abs=1e-6)  # same checkpoint, same split
    code, out, _ = run(capsys, "evaluate", str(trained_run), "--max-samples", "10", "--json")
    assert json.loads(out)["examples"] == 10
    # one truncated window is window_stride 0, as the flag's help and select's JSON say it (was null)
    assert r["window_stride"] == 0 and json.loads(out)["window_stride"] == 0
    code, out, _ = run(
        capsys, "evaluate", str(trained_run), "--max-samples", "4", "--window-stride", "0", "--json"
    )
    assert code == 0 and json.loads(out)["window_stride"] == 0


def test_python_dash_m_predicts_and_a_reader_that_stops_early_is_quiet(trained_run, tmp_path):
    # `python -m imdb_lora` is the CLI; `predict ... | head` used to end in a BrokenPipeError traceback
    texts = tmp_path / "many.txt"
    line = "a great film, " * 40  # each JSON answer repeats its text: 150 of them are > a pipe's 64 KiB
    texts.write_text("".join(f"{line}number {i}\n" for i in range(150)))
    cmd = [sys.executable, "-m", "imdb_lora", "predict", str(trained_run), "--file", str(texts), "--json"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        first = proc.stdout.readline()
        proc.stdout.close()  # the reader leaves, as head does
        err = proc.stderr.read().decode()
        code = proc.wait(timeout=120)
    assert json.loads(first)["text"] == f"{line}number 0" and "Traceback" not in err, err
    assert "BrokenPipe" not in err and code == 141, (
        err
    )  # 128 + SIGPIPE, as a shell reports a filter cut short
    r = subprocess.run(
        [sys.executable, "-m", "imdb_lora", "predict", "/nonexistent/run", "x"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no such run directory" in r.stderr


def test_a_full_disk_under_standard_output_is_one_line(trained_run, monkeypatch, capsys):
    """`predict RUN ... > file` on a full disk ended in an OSError traceback (exit 1), or for a short
    output, once main had returned, in Python's own "Exception ignored" report (exit 120)."""
    import errno

    class FullDisk(io.RawIOBase):
        full = True

        def writable(self) -> bool:
            return True

        def write(self, b) -> int:
            if self.full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return len(b)

    disk = FullDisk()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BufferedWriter(disk)))
    try:
        assert main(["predict", str(trained_run), "great film"]) == 2
    finally:
        disk.full = False  # what is left in the buffer may go now: nothing to report at garbage collection
    lines = without_startup(capsys.readouterr().err).splitlines()
    assert lines[1:] == [  # after predict's "loaded RUN: ..."
        "imdb-lora: error: cannot write standard output (No space left on device); free some space or write "
        "elsewhere, and run the command again"
    ]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_standard_output_on_dev_full_is_named(trained_run, monkeypatch, capsys):
    """`predict ... > /dev/full`: the failed write names no file and /dev's file system has room, so the
    line named nothing; a device that is /dev/full is a full standard output. Unbuffered, as with
    PYTHONUNBUFFERED=1 (container images set it): nothing is kept back for a second flush to fail on."""
    with io.TextIOWrapper(io.FileIO("/dev/full", "w"), write_through=True) as full:
        monkeypatch.setattr(sys, "stdout", full)
        assert main(["predict", str(trained_run), "great film"]) == 2
    assert "cannot write standard output (No space left on device)" in capsys.readouterr().err


HEAVY = ("torch", "transformers", "peft", "numpy", "fastapi", "uvicorn", "onnxruntime", "ray", "matplotlib")


MISTYPED_RUN = [
    ["predict", "/no/such/run", "x"],
    ["evaluate", "/no/such/run"],
    ["serve", "/no/such/run"],
    ["export", "/no/such/run", "--to", "/no/such/export"],
    ["select", "/no/such/run"],
    ["bench", "predict", "/no/such/run"],
    ["bench", "serve", "/no/such/run"],
]


def test_help_usage_errors_and_a_mistyped_run_import_no_heavy_library():
    # `--help`, `--version`, usage errors and a run path that does not exist answer in a fraction of a
    # second: the commands import torch & co. only when they run (importing torch alone takes seconds)
    code = textwrap.dedent(
        f"""
        import json, sys
        from imdb_lora.cli import build_parser, main
        build_parser()
        codes = [main(args) for args in {MISTYPED_RUN!r}]
        print(json.dumps({{"codes": codes, "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"codes": [2] * len(MISTYPED_RUN), "heavy": []}
    assert r.stderr.count("no such run directory: /no/such/run") == len(MISTYPED_RUN), r.stderr


def test_a_quoted_tilde_in_a_run_path_is_the_home_folder(trained_run, monkeypatch):
    # "~/runs/x" in quotes reaches us unexpanded; the rest of the code expands it, and the early
    # "no such run directory" check refused it before
    monkeypatch.setenv("HOME", str(trained_run.parent))
    assert main(["predict", f"~/{trained_run.name}", "great film", "--device", "cpu"]) == 0


# ---------------------------------------------------------------- bad input: exit 2, one clear line


def expect_error(capsys, needle, *args):
    code, _, err = run(capsys, *args)
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert without_startup(err).startswith("imdb-lora: error:")


def test_missing_data_path(tiny_models, tmp_path, capsys):
    expect_error(
        capsys,
        "no such file or directory",
        *train_args(tiny_models("bert"), tmp_path / "none", tmp_path / "o"),
    )
    assert not (tmp_path / "o").exists()  # nothing half-made left behind


def test_corrupt_archive(tiny_models, tmp_path, capsys):
    (tmp_path / "x.tar.xz").write_bytes(b"garbage" * 100)
    expect_error(
        capsys, "cannot read archive", *train_args(tiny_models("bert"), tmp_path / "x.tar.xz", tmp_path / "o")
    )


def test_missing_model(imdb_dir, tmp_path, capsys):
    expect_error(
        capsys, "--model: no such directory", *train_args(tmp_path / "nomodel", imdb_dir, tmp_path / "o")
    )


def test_model_without_weights(imdb_dir, tmp_path, capsys, tiny_models):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text((tiny_models("bert") / "config.json").read_text())
    expect_error(capsys, "no model.safetensors", *train_args(tmp_path / "m", imdb_dir, tmp_path / "o"))


def test_hub_unreachable(imdb_dir, tmp_path, capsys):
    expect_error(capsys, "--model PATH", *train_args("some-org/some-model", imdb_dir, tmp_path / "o"))


def test_bad_labels_in_a_file(tiny_models, tmp_path, capsys):
    f = tmp_path / "d.csv"
    f.write_text("text,label\nok,1\nhm,5\n")
    args = train_args(tiny_models("bert"), tmp_path, tmp_path / "o")
    args[args.index("--data") : args.index("--data") + 2] = ["--train-file", str(f)]
    expect_error(capsys, "labels must be 0 (negative) or 1 (positive)", *args)


def test_existing_output_dir_is_never_silently_replaced(trained_run, tiny_models, imdb_dir, tmp_path, capsys):
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    expect_error(capsys, "pass --overwrite", *train_args(tiny_models("bert"), imdb_dir, keep))
    assert (keep / "notes.txt").read_text() == "precious"
    expect_error(capsys, "--resume: ", "train", "--output-dir", str(keep), "--resume")
    done = shutil.copytree(trained_run, tmp_path / "done")  # a copy: --resume takes the run's lock
    expect_error(capsys, "already finished", "train", "--output-dir", str(done), "--resume")


def test_overwrite_replaces(tiny_models, imdb_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "config.yaml").write_text("{}\n")  # a run directory (an interrupted one, say)
    (out / "old.txt").write_text("x")
    code, _, _ = run(capsys, *train_args(tiny_models("bert"), imdb_dir, out, "--epochs", "1", "--overwrite"))
    assert code == 0 and not (out / "old.txt").exists() and (out / "run.json").is_file()


@pytest.mark.parametrize("char, shown", [("\x1b", "\\x1b"), ("\x7f", "\\x7f"), ("\t", "\\t")])
def test_a_control_character_in_an_error_is_shown_escaped(tmp_path, capsys, char, shown):
    # printed raw: a terminal escape sequence from a path, or from a binary file's bytes that pyarrow's
    # parse error quotes, acted on the user's terminal
    code, _, err = run(capsys, "predict", str(tmp_path / f"my{char}[31mrun"), "x")
    assert code == 2 and err == f"imdb-lora: error: no such run directory: {tmp_path}/my{shown}[31mrun\n"


def test_a_line_break_in_a_path_keeps_the_error_on_one_line(tmp_path, capsys):
    run_dir = str(tmp_path / "my\nrun")  # the message quoted it raw: two lines on stderr
    code, _, err = run(capsys, "predict", run_dir, "x")
    assert code == 2 and err == f"imdb-lora: error: no such run directory: {tmp_path}/my\\nrun\n"


def test_predict_or_evaluate_on_something_that_is_not_a_run(tmp_path, capsys):
    expect_error(capsys, "no such run directory", "predict", str(tmp_path / "nope"), "x")
    expect_error(capsys, "not an imdb-lora run directory", "evaluate", str(tmp_path))


def test_adapter_with_a_different_base(trained_run, tmp_path, capsys):
    import torch

    torch.manual_seed(123)
    other = build_tiny("bert", tmp_path / "other-bert")  # same architecture, other weights
    from transformers import AutoModelForSequenceClassification

    m = AutoModelForSequenceClassification.from_pretrained(other)
    with torch.no_grad():
        m.get_input_embeddings().weight.add_(1.0)
    m.save_pretrained(other)
    expect_error(capsys, "different model", "predict", str(trained_run), "x", "--base-model", str(other))


def test_a_moved_base_model_points_to_base_model(trained_run, tmp_path, capsys):
    run = shutil.copytree(trained_run, tmp_path / "r")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"]["name"] = str(tmp_path / "moved-away")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    expect_error(capsys, "is no longer there; pass --base-model", "predict", str(run), "x")
    expect_error(capsys, "--base-model: ", "predict", str(run), "x", "--base-model", str(tmp_path))


@pytest.mark.parametrize("command", ["evaluate", "select", "bench predict"])
def test_a_saved_data_path_that_no_longer_loads_names_the_run_config_and_the_way_back(
    trained_run, tmp_path, capsys, command
):
    """The line named the run's saved data settings as --data, --train-file or --test-file, which the
    user never typed: it names config.yaml's key (or run.json's, for the IMDB copy it records) and says
    how to reach the data; a --data typed is named as typed. bench predict reads the test reviews so too."""
    rundir = shutil.copytree(trained_run, tmp_path / "r")
    saved, info = (
        yaml.safe_load((rundir / "config.yaml").read_text()),
        json.loads((rundir / "run.json").read_text()),
    )
    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"good {i},1\nbad {i},0\n" for i in range(8)))
    (tmp_path / "empty").mkdir()
    gone, labeled = str(tmp_path / "gone"), {"path": None, "train_file": str(tmp_path / "t.csv")}
    imdb_way, file_way = (
        "; pass --data with where the IMDB data is now",
        "; put the file back there (a symlink will do)",
    )
    if command == "evaluate":
        file_way += ", or evaluate a labeled file where it is now with --file"
    cases = [
        (
            {"path": gone},
            None,
            f"{rundir}/config.yaml: data.path: no such file or directory: {gone}{imdb_way}",
        ),
        (
            {**labeled, "train_file": gone},
            None,
            f"{rundir}/config.yaml: data.train_file: no such file: {gone}{file_way}",
        ),
        (
            {**labeled, "test_file": gone},
            None,
            f"{rundir}/config.yaml: data.test_file: no such file: {gone}{file_way}",
        ),
        (  # config.yaml says none; run.json's IMDB copy is read while it is there, and named as run.json's
            {"path": None},
            str(tmp_path / "empty"),
            f"{rundir}/run.json: data_source.path: {tmp_path / 'empty'} is not an aclImdb dataset",
        ),
    ]
    for data, recorded, line in cases:
        (rundir / "config.yaml").write_text(yaml.safe_dump({**saved, "data": {**saved["data"], **data}}))
        source = {**info["data_source"], "path": recorded or info["data_source"]["path"]}
        (rundir / "run.json").write_text(json.dumps({**info, "data_source": source}))
        code, _, err = run(capsys, *command.split(), str(rundir), "--device", "cpu")
        err = without_startup(err)
        assert code == 2 and err.startswith(f"imdb-lora: error: {line}") and err.count("\n") == 1, err
        assert recorded is None or err.endswith(f"{imdb_way}\n"), err
    expect_error(
        capsys,
        f"error: --data: no such file or directory: {gone}\n",
        *command.split(),
        str(rundir),
        "--data",
        gone,
    )


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_a_device_typo_is_one_line(trained_run, capsys, command):
    text = ["x"] if command == "predict" else ["--max-samples", "4"]
    expect_error(capsys, "--device 'gpu': not a device", command, str(trained_run), *text, "--device", "gpu")
    for other in ("mps", "xla", "meta"):  # real torch devices, but nothing here runs on them (tracebacks)
        expect_error(
            capsys,
            f"--device {other}: imdb-lora runs on cpu or cuda",
            command,
            str(trained_run),
            *text,
            "--device",
            other,
        )


def test_a_gpu_index_beyond_the_machine_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match=r"--device cuda:2: this machine has 2 GPUs, cuda:0 to cuda:1"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("texts", [["good", "   "], [""]])
def test_empty_text(trained_run, capsys, texts):
    expect_error(capsys, "is empty", "predict", str(trained_run), *texts)


def test_no_text_at_all(trained_run, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    expect_error(capsys, "no text to classify", "predict", str(trained_run))


def test_bad_flag_value_names_the_flag(capsys):
    expect_error(capsys, "--lora-r must be a positive integer", "train", "--lora-r", "0")


@pytest.mark.parametrize(
    "args, line",
    [
        (
            ["predict", "RUN", "--batch-size", "abc"],
            "imdb-lora predict: error: argument --batch-size: expected a positive integer, got 'abc' "
            "(see imdb-lora predict --help)",
        ),
        (
            ["predict", "RUN", "--bogus"],
            "imdb-lora predict: error: unrecognized arguments: --bogus (see imdb-lora predict --help)",
        ),
        (["predcit", "RUN"], "did you mean predict? (see imdb-lora --help)"),
        (
            ["train", "--max-stpes", "5"],
            "imdb-lora train: error: unrecognized arguments: --max-stpes 5; did you mean --max-steps? "
            "(see imdb-lora train --help)",
        ),
        # a prefix is not a flag: a later flag sharing it would change what the same line means
        (["train", "--max-step", "5"], "--max-step 5; did you mean --max-steps?"),
        (["train", "--warmpu-ratio=0.1"], "--warmpu-ratio=0.1; did you mean --warmup-ratio?"),
        # a nested command's own flags, and its own name
        (
            ["bench", "train", "--stepz", "3"],
            "imdb-lora bench train: error: unrecognized arguments: --stepz 3; "
            "did you mean --steps? (see imdb-lora bench train --help)",
        ),
        (["bench", "trian"], "did you mean train? (see imdb-lora bench --help)"),
        (
            ["serve"],
            "imdb-lora serve: error: the following arguments are required: model (see imdb-lora serve --help)",
        ),
    ],
)
def test_a_usage_mistake_is_one_line_pointing_at_help(args, line, capsys):
    """argparse printed the command's whole usage block (five lines for predict) above its error, and a
    mistyped command listed every command without naming the one meant."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and line in err, err


@pytest.mark.parametrize(
    "command", [["predict", "RUN", "x"], ["evaluate", "RUN"], ["select", "RUN"], ["bench", "eval"]]
)
@pytest.mark.parametrize("value", ["0", "-3"])
def test_batch_size_must_be_positive(command, value, capsys):
    # a batch of 0 or fewer rows used to run silently one text at a time
    assert main([*command, "--batch-size", value]) == 2
    err = capsys.readouterr().err
    assert "argument --batch-size: expected a positive integer" in err and "Traceback" not in err


LONG_NAME = "x" * 300  # longer than any file system's 255-byte name: os.stat raised "File name too long"


@pytest.mark.parametrize(
    "args, flag",
    [
        (["predict", LONG_NAME, "good"], "argument run"),
        (["predict", "RUN", "--file", LONG_NAME], "argument --file"),
        (["evaluate", "RUN", "--data", LONG_NAME], "argument --data"),
        (["evaluate", "RUN", "--base-model", LONG_NAME], "argument --base-model"),
        (["evaluate", "RUN", "--file", "f.csv", "--errors", "1", "--errors-dir", LONG_NAME], "--errors-dir"),
        (["select", LONG_NAME], "argument runs"),
        (["export", "RUN", "--to", LONG_NAME], "argument --to"),
        (["serve", LONG_NAME], "argument model"),
        (["score", "MODEL", "--input", LONG_NAME, "--output", "o"], "argument --input"),
        (["score", "MODEL", "--input", "i.jsonl", "--output", LONG_NAME], "argument --output"),
        (["train", "--config", LONG_NAME], "argument --config"),
        (["train", "--output-dir", LONG_NAME], "argument --output-dir"),
        (["train", "--data", LONG_NAME], "--data: "),  # config fields: Config.validate, YAML too
        (["train", "--model", f"/tmp/{LONG_NAME}"], "--model: "),
        (["train", "--eval-file", LONG_NAME], "--eval-file: "),
        (["compare", "--output-dir", LONG_NAME], "argument --output-dir"),
        (["bench", "train", "--model", LONG_NAME], "argument --model"),
        (["bench", "predict", LONG_NAME], "argument models"),
        (["bench", "serve", "MODEL", "--data", LONG_NAME], "argument --data"),
    ],
)
def test_a_path_no_file_system_can_hold_is_one_line_naming_its_flag(capsys, args, flag):
    code, _, err = run(capsys, *args)
    assert code == 2 and "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("imdb-lora") and flag in line and "not a usable path: a name of 300 bytes" in line


@pytest.mark.parametrize(
    "args, flag",
    [
        (["train", "--config", ""], "--config"),  # was ignored: the defaults trained
        (["train", "--output-dir", ""], "--output-dir"),  # was ignored: runs/<model>-<method>
        (["compare", "--output-dir", ""], "--output-dir"),
        (["score", "MODEL", "--input", "", "--output", "o"], "--input"),  # read the whole current folder
    ],
)
def test_an_empty_path_is_refused_where_it_meant_something_else(capsys, args, flag):
    code, _, err = run(capsys, *args)
    assert code == 2 and f"argument {flag}: expected a path, got ''" in err and "Traceback" not in err


def test_window_averaging_gives_one_prediction_per_input_in_order(trained_run, capsys):
    texts = ["great film " * 60, "awful", "boring plot and poor acting " * 25]
    code, out, _ = run(
        capsys, "predict", str(trained_run), *texts, "--json", "--window-stride", "20", "--batch-size", "3"
    )
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["text"] for r in rows] == texts
    _, plain, _ = run(capsys, "predict", str(trained_run), "awful", "--json")
    # a text shorter than one window is read once: same probabilities as without windows
    assert rows[1]["probabilities"] == pytest.approx(json.loads(plain)["probabilities"], abs=1e-5)
    code, out, _ = run(capsys, "evaluate", str(trained_run), "--window-stride", "32", "--json")
    assert code == 0 and json.loads(out)["window_stride"] == 32


@pytest.mark.parametrize("command", ["predict", "evaluate", "score"])
def test_a_window_stride_too_long_is_refused_before_the_model_loads(
    trained_run, tmp_path, capsys, monkeypatch, command
):
    # score used to exit 0 with a "finished" output whose every row held this error
    from imdb_lora.inference.classifier import Classifier

    monkeypatch.setattr(Classifier, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "in.csv").write_text("text\ngreat\n")
    out = tmp_path / "scored"
    args = {
        "predict": ["predict", str(trained_run), "x"],
        "evaluate": ["evaluate", str(trained_run)],
        "score": ["score", str(trained_run), "--input", str(tmp_path / "in.csv"), "--output", str(out)],
    }[command]
    assert main([*args, "--window-stride", "999"]) == 2
    err = capsys.readouterr().err
    assert (
        "--window-stride must be in (0, " in err and "got 999" in err and len(err.strip().splitlines()) == 1
    )
    assert not out.exists()


def test_window_stride_zero_is_one_truncated_window_and_negative_is_refused(trained_run, capsys):
    _, plain, _ = run(capsys, "predict", str(trained_run), "awful film", "--json")
    code, zero, _ = run(capsys, "predict", str(trained_run), "awful film", "--json", "--window-stride", "0")
    assert code == 0 and json.loads(zero) == json.loads(plain)
    assert main(["predict", str(trained_run), "x", "--window-stride", "-1"]) == 2
    assert "argument --window-stride: expected an integer >= 0, got -1" in capsys.readouterr().err


def test_sigterm_runs_any_command_s_clean_up_and_exits_143(monkeypatch, capsys):
    """SIGTERM's default ended a command at once, skipping its `finally` (an export's temporary folder,
    a lock, score's record of an interrupted output); now every command takes it as Ctrl-C, a second
    SIGTERM does not cut the clean-up short, and the handler from before is back afterwards."""
    import imdb_lora.cli.evaluate

    cleaned = []

    def command(ns) -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises at once: never slept through
            return 0
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # a process group's second signal, during clean-up
            cleaned.append(True)

    monkeypatch.setattr(imdb_lora.cli.evaluate, "cmd_evaluate", command)
    with sigterm_fails_the_test() as before:
        assert main(["evaluate", "any-run"]) == 128 + signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is before
    assert cleaned == [True]
    assert capsys.readouterr().err.strip() == "imdb-lora: stopped by SIGTERM"


def test_a_quiet_interruption_keeps_its_exit_status_and_prints_nothing(monkeypatch, capsys):
    """train marks the stop of a data-parallel rank other than 0 quiet: rank 0 alone prints the line."""
    import imdb_lora.cli.evaluate

    def command(ns) -> int:
        stop = Terminated("training was at step 3 of 9")
        stop.quiet = True
        raise stop

    monkeypatch.setattr(imdb_lora.cli.evaluate, "cmd_evaluate", command)
    assert main(["evaluate", "any-run"]) == 128 + signal.SIGTERM
    assert capsys.readouterr().err == ""


def test_version_names_the_libraries_that_decide_what_runs(capsys):
    # a bug report's first line: imdb-lora's version alone did not say which torch/transformers/peft ran
    from importlib.metadata import version

    import imdb_lora

    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    libs = ", ".join(f"{d} {version(d)}" for d in ("torch", "transformers", "peft"))
    assert out == f"imdb-lora {imdb_lora.__version__} (Python {sys.version.split()[0]}, {libs})\n"


def test_python_dash_m_is_the_same_command():
    r = subprocess.run(
        [sys.executable, "-m", "imdb_lora", "--version"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stdout.startswith("imdb-lora ") and "torch " in r.stdout, r.stderr
