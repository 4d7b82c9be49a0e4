"""`score`'s engine flags: a flag the chosen engine would ignore, and a Ray cluster that cannot be
reached, end in one line before any output is written. Ray itself is never started (nor imported: a
stand-in module answers as ray.init does when nothing is there)."""

import socket
import sys
import types
import warnings

import pytest

from imdb_lora.cli import main
from imdb_lora.scale import engines
from imdb_lora.scale.batch import ScoreBatch


@pytest.fixture
def job(trained_run, tmp_path):
    reviews = tmp_path / "in.jsonl"
    reviews.write_text('{"text": "great film"}\n')
    return ["score", str(trained_run), "--input", str(reviews), "--output", str(tmp_path / "out")]


@pytest.fixture
def no_cluster(monkeypatch):
    """A stand-in `ray` whose init fails as Ray's does when no cluster answers (never a real start);
    the list records each init's address, `ray.init.asked` its other arguments."""
    calls = []

    def init(address=None, **kwargs):
        calls.append(address)
        init.asked.append(kwargs)
        raise ConnectionError(f"Failed to connect to Ray cluster at {address}")

    init.asked = []

    fake = types.ModuleType("ray")
    fake.is_initialized = lambda: False
    fake.init = init
    fake.data = types.ModuleType("ray.data")
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setitem(sys.modules, "ray.data", fake.data)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_flags_of_the_other_engine_are_refused(job, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(engines, "run_ray", lambda *a, **k: pytest.fail("Ray must not start"))
    assert main([*job, "--engine", "ray", "--device", "cuda"]) == 2
    assert "--device applies to --engine local only" in one_line(capsys)
    assert main([*job, "--cpus-per-worker", "2"]) == 2
    assert "--cpus-per-worker applies to --engine ray only" in one_line(capsys)
    assert main([*job, "--cpus-per-worker", "2", "--num-gpus-per-worker", "1"]) == 2
    assert "--cpus-per-worker, --num-gpus-per-worker apply to --engine ray only" in one_line(capsys)
    assert not (tmp_path / "out").exists()


def test_an_unreachable_ray_address_is_one_line_before_any_output(job, tmp_path, no_cluster, capsys):
    port = closed_port()
    assert main([*job, "--engine", "ray", "--ray-address", f"127.0.0.1:{port}"]) == 2
    assert f"--ray-address 127.0.0.1:{port}: no Ray cluster reachable" in one_line(capsys)
    assert main([*job, "--engine", "ray", "--ray-address", f"ray://localhost:{port}"]) == 2
    assert "no Ray cluster reachable at localhost" in one_line(capsys)
    assert no_cluster == [] and not (tmp_path / "out").exists()


def test_ray_address_from_the_environment_is_checked_too(job, no_cluster, monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{closed_port()}")
    assert main([*job, "--engine", "ray"]) == 2
    assert one_line(capsys).startswith("imdb-lora: error: $RAY_ADDRESS 127.0.0.1:")


def test_no_cluster_behind_auto_is_one_line(job, no_cluster, capsys):
    assert main([*job, "--engine", "ray", "--ray-address", "auto"]) == 2
    assert "--ray-address: cannot connect to a Ray cluster" in one_line(capsys)
    assert no_cluster == ["auto"]


@pytest.fixture
def two_cpu_cluster(monkeypatch):
    """A stand-in `ray` already connected to a 2-CPU cluster (never a real start); the list records
    each look at the cluster's resources."""
    looks = []
    fake = types.ModuleType("ray")
    fake.is_initialized = lambda: True
    fake.cluster_resources = lambda: looks.append(1) or {"CPU": 2.0}
    fake.data = types.ModuleType("ray.data")
    options = types.SimpleNamespace(execution_options=types.SimpleNamespace())  # what run_ray sets first
    fake.data.DataContext = types.SimpleNamespace(get_current=lambda: options)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setitem(sys.modules, "ray.data", fake.data)
    return looks


def test_a_worker_larger_than_the_cluster_is_refused_before_the_output_is_touched(
    job, tmp_path, two_cpu_cluster, capsys
):
    """The refusal came after the output's "running" marker: the folder was left "failed", and the rerun
    with a sane --cpus-per-worker was refused unless given --overwrite, for a job that scored nothing."""
    out = tmp_path / "out"
    assert main([*job, "--engine", "ray", "--cpus-per-worker", "64"]) == 2
    assert one_line(capsys) == "imdb-lora: error: --cpus-per-worker 64: the Ray cluster has 2.0 CPUs"
    assert not out.exists() and two_cpu_cluster == [1]
    # an earlier output given --overwrite is not emptied by a job that cannot run
    assert main(job) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main([*job, "--engine", "ray", "--cpus-per-worker", "64", "--overwrite"]) == 2
    assert "--cpus-per-worker 64: the Ray cluster has 2.0 CPUs" in one_line(capsys)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # and an output refused anyway is said before Ray is asked anything
    assert main([*job, "--engine", "ray", "--cpus-per-worker", "64"]) == 2
    assert "holds an earlier score output; pass --overwrite" in one_line(capsys)
    assert two_cpu_cluster == [1, 1]


def test_a_worker_loads_its_model_without_transformers_deprecation_notices(trained_run):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ScoreBatch(str(trained_run), device="cpu").clf.predict(["great film"], 4)
    assert not [w for w in seen if issubclass(w.category, FutureWarning)], [str(w.message) for w in seen]


def test_sigterm_stops_a_ray_job_as_ctrl_c_does_though_ray_init_sets_its_own_handler(
    job, tmp_path, monkeypatch, capsys
):
    """ray.init puts its own SIGTERM handler in place, sys.exit(15): a Ray job sent SIGTERM (`kill`, a
    scheduler) ended with exit status 15, no line, and its marker said "failed" (SystemExit: 15). Here a
    stand-in `ray` does the same in init, and the job is sent a real SIGTERM once Ray is up."""
    import json
    import os
    import signal

    def init(address=None, **kwargs):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # as ray.init does

    def get_current():
        os.kill(os.getpid(), signal.SIGTERM)  # handled before this returns

    fake = types.ModuleType("ray")
    fake.is_initialized = lambda: False
    fake.init = init
    fake.cluster_resources = lambda: {"CPU": 2.0}
    fake.data = types.ModuleType("ray.data")
    fake.data.DataContext = types.SimpleNamespace(get_current=get_current)
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setitem(sys.modules, "ray.data", fake.data)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main([*job, "--engine", "ray"]) == 143
    out = tmp_path / "out"
    assert one_line(capsys) == (
        f"imdb-lora: stopped by SIGTERM; the output {out} is unfinished; "
        "Ray jobs cannot be resumed: score again with --overwrite"
    )  # no count of input files scored: Ray's parts do not say which (it said "0 of 1" whatever was written)
    record = json.loads((out / "_imdb_lora_score.json").read_text())
    assert (record["status"], record["signal"]) == ("stopped", "SIGTERM")


def ray_running(monkeypatch, dataset) -> types.SimpleNamespace:
    """A stand-in `ray` already connected to a 2-CPU cluster whose Ray Data gives `dataset` for the job's
    file list; returns the DataContext the engine sets."""
    context = types.SimpleNamespace(execution_options=types.SimpleNamespace())
    fake = types.ModuleType("ray")
    fake.is_initialized = lambda: True
    fake.cluster_resources = lambda: {"CPU": 2.0}
    fake.data = types.ModuleType("ray.data")
    fake.data.DataContext = types.SimpleNamespace(get_current=lambda: context)
    fake.data.from_items = lambda items: dataset
    fake.data.ActorPoolStrategy = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "ray", fake)
    monkeypatch.setitem(sys.modules, "ray.data", fake.data)
    return context


def test_the_ray_engine_cuts_an_input_file_into_small_blocks_spread_over_the_actors(
    job, tmp_path, monkeypatch
):
    """A block is what one actor scores. At Ray Data's default (blocks of up to 128 MiB) an input file
    under that was one block: 2,000 real reviews in one 2.6 MB file, 2 actors on 2 CPUs, scored by one
    actor while the other waited (41.2 s; 24.1 s with these settings, same rows). And one block in
    flight per actor: else the first actor up took the queued blocks while the next one still started.
    A stand-in `ray` records what the engine asks of Ray Data."""
    asked = {}

    class Dataset:
        def map_batches(self, fn, **kwargs):
            asked[getattr(fn, "__name__", "")] = kwargs
            return self

        def write_parquet(self, path, **kwargs):
            asked["write_parquet"] = kwargs

    context = ray_running(monkeypatch, Dataset())
    assert main([*job, "--engine", "ray"]) == 0
    assert context.execution_options.preserve_order and context.target_max_block_size <= 1 << 20
    assert asked["ScoreBatch"]["compute"] == {"size": 2, "max_tasks_in_flight_per_actor": 1}
    assert asked["write_parquet"]["min_rows_per_file"] >= 100_000  # small blocks, yet not a part per block


def test_ray_keeps_the_workers_output_off_the_console_unless_asked(job, no_cluster, monkeypatch):
    """A worker that could not load the model printed its traceback on the console some six times (each
    actor, each retry; 370 lines) before score's one line: ray.init(log_to_driver=False) keeps the
    workers' output in Ray's session logs. RAY_LOG_TO_DRIVER in the environment is Ray's own switch."""
    monkeypatch.delenv("RAY_LOG_TO_DRIVER", raising=False)
    assert main([*job, "--engine", "ray"]) == 2  # no cluster: what follows ray.init is not this test's
    monkeypatch.setenv("RAY_LOG_TO_DRIVER", "1")
    assert main([*job, "--engine", "ray"]) == 2
    asked = sys.modules["ray"].init.asked
    assert [a["log_to_driver"] for a in asked] == [False, None]  # None: Ray reads RAY_LOG_TO_DRIVER


# The text of the ActorDiedError a driver gets when ScoreBatch's constructor raised in the actors
# (Ray 2.60, the model's adapter file damaged): the worker's error survives only as its traceback's text.
ACTOR_DIED = (
    "The actor died because of an error raised in its creation task, ray::MapWorker(MapBatches(ScoreBatch))"
    ".__init__() (pid=1711, ip=192.0.2.2, actor_id=ba0d, repr=MapWorker(MapBatches(ScoreBatch)))\n"
    '  File ".../imdb_lora/inference/classifier.py", line 376, in load_adapter_model\n'
    '    raise UserError(f"the adapter weights in {adapter} are damaged ({first_line(e)})") from None\n'
    "imdb_lora.errors.UserError: the adapter weights in run/adapter are damaged (header too large)"
)


@pytest.fixture
def workers_cannot_load_the_model(monkeypatch):
    """A stand-in `ray` on a 2-CPU cluster whose job fails as Ray 2.60's does when every actor's
    constructor raises: an ActorDiedError (a stand-in of the class) before any part is written."""

    class ActorDiedError(RuntimeError):
        pass

    class Dataset:
        def map_batches(self, fn, **kwargs):
            return self

        def write_parquet(self, path, **kwargs):
            raise ActorDiedError(ACTOR_DIED)

    ray_running(monkeypatch, Dataset())


def test_a_ray_job_whose_workers_cannot_load_the_model_is_one_line_and_its_rerun_needs_no_overwrite(
    job, tmp_path, workers_cannot_load_the_model, monkeypatch, capsys
):
    """It ended in Ray's traceback (exit status 1), and its output, holding only a "failed" marker, was
    refused to the rerun unless given --overwrite, for a job that wrote no row."""
    import json

    out = tmp_path / "out"
    assert main([*job, "--engine", "ray"]) == 2
    assert one_line(capsys) == (
        "imdb-lora: error: the adapter weights in run/adapter are damaged (header too large)"
    )
    record = json.loads((out / "_imdb_lora_score.json").read_text())
    assert record["status"] == "failed" and "adapter weights" in record["error"]
    monkeypatch.undo()  # the model loads again: the same command, without --overwrite
    assert main(job) == 0
    assert json.loads((out / "_imdb_lora_score.json").read_text())["status"] == "finished"
