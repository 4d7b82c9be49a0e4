"""Where a train command's wall time went: run.json's time_breakdown, results.md's table, train's last line."""

from __future__ import annotations

import json
import time

import pytest
from conftest import train_args

from imdb_lora.cli import main
from imdb_lora.training.timing import PHASES, Phases, breakdown_line
from imdb_lora.training.trainer import Trainer


def test_phases_are_exclusive_and_never_add_up_to_more_than_the_total(monkeypatch):
    now = {"t": 100.0}
    monkeypatch.setattr(time, "monotonic", lambda: now["t"])
    clock = Phases(start=90.0)
    clock.since_start("startup")  # 10 s
    with clock.timed("setup"):
        now["t"] += 1
        with clock.timed("data"):
            now["t"] += 5
        with clock.timed("model"):
            now["t"] += 2
        now["t"] += 1
    now["t"] += 3  # covered by no phase
    clock.add("train_steps", 1.5)  # measured by the caller
    now["t"] += 1.5
    with clock.timed("train_steps"):
        now["t"] += 20
        with clock.timed("saving"):  # a checkpoint during the steps counts once, as saving
            now["t"] += 4
            with clock.timed("saving"):
                now["t"] += 1
    b = clock.breakdown()
    assert list(b) == [*PHASES, "other", "total"]
    assert (b["startup"], b["setup"], b["data"], b["model"]) == (10, 2, 5, 2)
    assert (b["train_steps"], b["saving"], b["other"], b["total"]) == (21.5, 5, 3, 48.5)
    assert sum(v for k, v in b.items() if k != "total") == b["total"]
    assert breakdown_line(b) == (
        "time: 48.5 s = startup 10.0 + setup 2.0 + data 5.0 + model 2.0 + train steps 21.5 + saving 5.0 + other 3.0"
    )


def test_a_run_records_where_its_time_went(tiny_models, imdb_dir, tmp_path, capsys, monkeypatch):
    starts = []
    real_init = Trainer.__init__
    monkeypatch.setattr(
        Trainer, "__init__", lambda self, *a, **k: starts.append(k.get("started")) or real_init(self, *a, **k)
    )
    before = time.monotonic()
    out = tmp_path / "run"
    assert main(train_args(tiny_models("bert"), imdb_dir, out, "--checkpoint-every", "2")) == 0
    after = time.monotonic()
    assert len(starts) == 1 and before <= starts[0] <= after  # the CLI hands over its start
    info = json.loads((out / "run.json").read_text())
    b = info["time_breakdown"]
    assert list(b) == [*PHASES, "other", "total"]
    assert all(v >= 0 for v in b.values())
    assert sum(v for k, v in b.items() if k != "total") == pytest.approx(b["total"], abs=1e-9)
    assert b["total"] <= after - before
    # the phases mean what the older fields mean, where they overlap
    assert b["total"] >= info["wall_seconds"] + info["data_seconds"]
    assert b["data"] == info["data_seconds"]
    assert b["train_steps"] == pytest.approx(info["train_seconds"], rel=1e-9)  # a fresh run: all its epochs
    for phase in ("setup", "model", "train_steps", "evaluation", "saving", "after_training", "reports"):
        assert b[phase] > 0, phase
    stdout = capsys.readouterr().out.splitlines()
    assert stdout[-2].startswith("done: ") and stdout[-1] == breakdown_line(b)
    results = (out / "results.md").read_text()
    assert "## Where the time went" in results and f"| **total** | **{b['total']:.1f} s** |" in results
    assert f"| train steps | {b['train_steps']:.1f} s |" in results


def test_a_run_whose_every_phase_is_short_still_ends_its_line_cleanly():
    """A resume that only calibrates a tiny run takes ~0.2 s, every phase under the 0.05 s shown: the
    line gives the total alone, not a dangling `=`."""
    short = {**dict.fromkeys(PHASES, 0.02), "other": 0.001, "total": 0.181}
    assert breakdown_line(short) == "time: 0.2 s (every phase under 0.05 s)"
