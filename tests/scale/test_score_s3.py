"""`imdb-lora score` from S3 to S3 through pyarrow's real S3FileSystem, against a real S3 API: moto's
server on 127.0.0.1, reached the way a user points pyarrow at an S3-compatible store (AWS_ENDPOINT_URL
and the AWS_* credentials in the environment; pyarrow 26 honours AWS_ENDPOINT_URL and
AWS_ENDPOINT_URL_S3 for `s3://` URIs). The other remote tests use pyarrow's in-memory mock filesystem,
which has no prefixes instead of folders, no multipart uploads and no HTTP.

The server runs in a child process, not on a thread of this one: an S3 output stream that is never
closed (a job stopped mid-part) completes its upload from its destructor while holding the GIL, so an
in-process server could never answer it and the test hung (seen with ThreadedMotoServer in-process).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import hold_score_at, sigint_as_in_a_terminal, wait_running_until
from test_score_resume import ROWS, write_inputs

from imdb_lora.cli import main
from imdb_lora.scale import engines

pytest.importorskip("moto.server", reason="moto's server is not installed (pip install 'moto[server]')")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pafs = pytest.importorskip("pyarrow.fs")

MARKER = "_imdb_lora_score.json"
SERVER = """
import logging, sys
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # until the test closes our stdin (or dies)
"""


@pytest.fixture(scope="module")
def endpoint():
    """http://127.0.0.1:PORT of a moto S3 server in a child process (a free port, chosen by the server)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        port = proc.stdout.readline().strip()
        assert port.isdigit(), f"moto's server did not start (exit status {proc.poll()})"
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stdin.close()
        proc.kill()
        proc.wait()


def aws_env(url: str) -> dict[str, str]:
    """What a user sets for an S3-compatible store; no AWS profile or instance metadata is looked up."""
    return {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


@pytest.fixture
def bucket(endpoint, monkeypatch, request, tmp_path):
    """A new bucket of the test's own holding the inputs of test_score_resume under reviews/; yields
    (s3 filesystem, bucket name, the local copy of the inputs)."""
    for key, value in aws_env(endpoint).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    name = request.node.name.lower().replace("_", "-")[:50].strip("-")
    # from_uri, as score opens its URIs: pyarrow's S3FileSystem() constructor ignores AWS_ENDPOINT_URL
    # (apache/arrow#49643; it went to AWS here), while an s3:// URI's filesystem honours it
    s3 = pafs.FileSystem.from_uri(f"s3://{name}?allow_bucket_creation=true")[0]
    s3.create_dir(name)
    local = tmp_path / "in"
    for f in write_inputs(local):
        pafs.copy_files(str(f), f"{name}/reviews/{f.name}", destination_filesystem=s3)
    return s3, name, local


@pytest.fixture
def reference(trained_run, bucket, tmp_path) -> dict[str, pa.Table]:
    """The parts of an uninterrupted local job on the same inputs."""
    assert score(trained_run, str(bucket[2]), str(tmp_path / "ref")) == 0
    return {f.name: pq.read_table(f) for f in sorted((tmp_path / "ref").glob("*.parquet"))}


def score(run: Path, inputs: str, out: str, *flags: str) -> int:
    return main(["score", str(run), "--input", inputs, "--output", out, "--rows-per-batch", ROWS, *flags])


def listing(s3, path: str) -> dict[str, int]:
    """name -> size of the objects under a prefix (none: the prefix does not exist)."""
    try:
        infos = s3.get_file_info(pafs.FileSelector(path, recursive=True))
    except FileNotFoundError:
        return {}
    return {i.path.removeprefix(path + "/"): i.size for i in infos if i.type == pafs.FileType.File}


def marker(s3, out: str) -> dict:
    with s3.open_input_stream(f"{out}/{MARKER}") as f:
        return json.loads(f.read())


def same_rows(s3, out: str, ref: dict[str, pa.Table], name: str) -> None:
    """The parts of the S3 output are the reference's, row for row, but source_file names the S3 object."""
    parts = {
        n: pq.read_table(f"{out}/{n}", filesystem=s3)
        for n in sorted(listing(s3, out))
        if n.endswith(".parquet")
    }
    assert list(parts) == list(ref) and len(ref) == 5
    for part, table in parts.items():
        want = ref[part]
        files = want["source_file"].to_pylist()
        uris = [f"s3://{name}/reviews/{Path(f).name}" for f in files]
        assert table["source_file"].to_pylist() == uris, part
        cols = [c for c in want.column_names if c != "source_file"]
        assert table.select(cols).equals(want.select(cols)), part
    keys = [
        (r["source_file"], r["source_row"])
        for t in parts.values()
        for r in t.select(["source_file", "source_row"]).to_pylist()
    ]
    assert len(keys) == len(set(keys)) == 13  # every input row once


def one_line(capsys, start: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(start), err
    return err


def test_score_from_s3_to_s3_refuses_a_second_run_and_overwrites(trained_run, bucket, reference, capsys):
    s3, name, _ = bucket
    out = f"{name}/scored"
    assert score(trained_run, f"s3://{name}/reviews/", f"s3://{out}/") == 0
    same_rows(s3, out, reference, name)
    done = marker(s3, out)
    assert (done["status"], done["rows"], done["errors"]) == ("finished", 13, 3)
    assert [i[0] for i in done["job"]["inputs"]] == [
        f"s3://{name}/reviews/{f}" for f in ("a.jsonl", "b.csv", "c.parquet", "d.jsonl")
    ]
    assert all(size > 0 and mtime > 0 for _, size, mtime in done["job"]["inputs"])  # what --resume compares
    assert "_imdb_lora_score.lock" not in listing(s3, out)  # object stores have no flock: no lock file
    before = listing(s3, out)
    capsys.readouterr()

    assert score(trained_run, f"s3://{name}/reviews/", f"s3://{out}/") == 2
    one_line(
        capsys, f"imdb-lora: error: --output s3://{out}/ holds an earlier score output; pass --overwrite"
    )
    assert listing(s3, out) == before

    assert score(trained_run, f"s3://{name}/reviews/", f"s3://{out}/", "--overwrite") == 0
    same_rows(s3, out, reference, name)
    assert marker(s3, out)["status"] == "finished" and set(listing(s3, out)) == set(before)


def test_a_stopped_s3_job_resumes_to_the_whole_output(trained_run, bucket, reference, capsys, monkeypatch):
    """Ctrl-C in c.parquet's second batch: its half part is left in the bucket (the unclosed stream's
    upload completes when it is collected), and only the records say which files were done."""
    s3, name, _ = bucket
    out = f"{name}/scored"
    real = engines.read_batches

    def interrupted(uri, *a, **kw):
        for n, table in enumerate(real(uri, *a, **kw)):
            if uri.endswith("/c.parquet") and n == 1:
                raise KeyboardInterrupt
            yield table

    monkeypatch.setattr(engines, "read_batches", interrupted)
    assert score(trained_run, f"s3://{name}/reviews/", f"s3://{out}") == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(
        f"imdb-lora: interrupted; the output s3://{out} is unfinished (2 of 4 input files"
    ), err
    stopped = marker(s3, out)
    assert (stopped["status"], stopped["signal"]) == ("stopped", "SIGINT")
    left = listing(s3, out)
    assert "part-00002.parquet" in left  # the half part, uploaded whole by its stream's destructor
    assert "_imdb_lora_score.done-00002.json" not in left
    monkeypatch.setattr(engines, "read_batches", real)  # not undo(): that would unset the AWS settings too

    assert score(trained_run, f"s3://{name}/reviews/", f"s3://{out}", "--resume") == 0
    assert "(resumed: 2 of 4 input files kept from before)" in capsys.readouterr().out
    same_rows(s3, out, reference, name)
    done = marker(s3, out)
    assert (done["status"], done["rows"], done["errors"], done["attempt"]) == ("finished", 13, 3, 2)


def test_missing_buckets_and_prefixes_are_one_line(trained_run, bucket, capsys):
    s3, name, _ = bucket
    assert score(trained_run, f"s3://{name}/nothing/", f"s3://{name}/scored") == 2
    one_line(capsys, f"imdb-lora: error: --input: no such file or folder: s3://{name}/nothing/")
    assert score(trained_run, f"s3://{name}/reviews/", "s3://no-such-bucket/scored") == 2
    err = one_line(capsys, "imdb-lora: error: --output s3://no-such-bucket/scored: cannot create the folder")
    assert "Bucket 'no-such-bucket' not found" in err
    assert (
        score(trained_run, f"s3://{name}/reviews/", f"s3://{name}/new/deep/scored") == 0
    )  # no folder needed
    assert marker(s3, f"{name}/new/deep/scored")["status"] == "finished"
    assert listing(s3, f"{name}/scored") == {}


@pytest.mark.slow  # a real process (~5 s): Ctrl-C's stop line is also checked in process above
def test_a_score_process_stopped_by_sigint_resumes_by_its_stop_line(trained_run, bucket, reference, tmp_path):
    """A real `imdb-lora score` held in its 6th part write (c.parquet's second batch) and sent SIGINT: the
    command its stop line gives finishes the S3 output, every row once."""
    import shlex

    import imdb_lora

    s3, name, _ = bucket
    out, ready = f"{name}/scored", tmp_path / "held"
    src = str(Path(imdb_lora.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}  # fmt: skip
    args = ["score", str(trained_run), "--input", f"s3://{name}/reviews/", "--output", f"s3://{out}/"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "imdb_lora", *args, "--rows-per-batch", ROWS, "--device", "cpu"],
        env=hold_score_at("write:6", ready, env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=sigint_as_in_a_terminal,
    )  # fmt: skip
    try:
        wait_running_until(proc, ready.exists)
        assert ready.exists(), proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130 and marker(s3, out)["status"] == "stopped", err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"imdb-lora: interrupted; the output s3://{out}/ is unfinished (2 of 4"), err
    command = shlex.split(line.split("continue it with: ", 1)[1])
    assert main(command[1:]) == 0
    same_rows(s3, out, reference, name)


def test_an_endpoint_in_the_uris_query_reaches_every_listed_file(trained_run, bucket, endpoint, monkeypatch):
    """pyarrow also takes the endpoint as URI options (`?endpoint_override=HOST:PORT&scheme=http`): the
    files listed under such an --input folder are read from that store too. They were opened without the
    query, so on AWS itself: a bucket of the same name there, or here a one-line network error."""
    s3, name, _ = bucket
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the query alone says where the store is
    query = f"endpoint_override={endpoint.removeprefix('http://')}&scheme=http"
    out = f"{name}/scored"
    assert score(trained_run, f"s3://{name}/reviews/?{query}", f"s3://{out}?{query}") == 0
    done = marker(s3, out)
    assert done["status"] == "finished" and done["rows"] == 13
    assert done["job"]["inputs"][0][0] == f"s3://{name}/reviews/a.jsonl?{query}"  # as it is opened again
    table = pq.read_table(f"{out}/part-00001.parquet", filesystem=s3)
    assert set(table["source_file"].to_pylist()) == {f"s3://{name}/reviews/b.csv?{query}"}


SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"  # AWS's documented example secret, not a real one


def test_credentials_in_a_uri_are_refused_without_printing_them(trained_run, bucket, capsys):
    """pyarrow takes an S3 key and secret as `s3://KEY:SECRET@bucket/...`. score writes its URIs into
    the output (source_file, the marker) and onto the console (the summary, refusals, a stop line's
    resume command): such a job ran, and its summary printed the secret. Now one line naming the flag,
    without the secret, before anything is read or written."""
    s3, name, _ = bucket
    given = f"s3://testing:{SECRET}@{name}"
    cases = [
        (f"{given}/reviews/", f"s3://{name}/scored", f"--input s3://{name}/reviews/"),
        (f"s3://{name}/reviews/", f"{given}/scored", f"--output s3://{name}/scored"),
    ]
    for inputs, out, flag in cases:
        assert score(trained_run, inputs, out) == 2
        captured = capsys.readouterr()
        assert SECRET not in captured.out + captured.err
        err = captured.err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"imdb-lora: error: {flag}: credentials"), err
        assert "AWS_SECRET_ACCESS_KEY" in err
        assert listing(s3, f"{name}/scored") == {}
