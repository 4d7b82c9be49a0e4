"""scripts/fast_summary.py: the GPU part's table and JSON record, from a log in gpu-checks.sh's format."""

import json
import runpy
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fast_summary.py"


def run_summary(monkeypatch, log: Path, out: Path) -> None:
    """scripts/fast_summary.py LOG OUT, as the GPU script calls it; it must exit 0 (or just return)."""
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), str(log), str(out)])
    try:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    except SystemExit as e:
        assert e.code == 0


def summarise(tmp_path: Path, monkeypatch, capsys, log: str, name: str) -> tuple[str, dict]:
    """(printed text, JSON record) of fast_summary.py over a log with no summary.txt beside it."""
    (tmp_path / "log.txt").write_text(log)
    run_summary(monkeypatch, tmp_path / "log.txt", tmp_path / name)
    return capsys.readouterr().out, json.loads((tmp_path / name).read_text())


LOG = """gpu-checks 2026-11-29T00:00:00Z parts: fast quick=0
torch 2.11.0+cu130 | transformers 5.17.0 | peft 0.21.0 | python 3.12.1 | gpu NVIDIA H200
=== fast-ref: python3 reference_lora.py --max-steps 60
epoch 1 steps 60 train_loss 0.6931 train_acc 0.5000 train_s 30.0 real_tok/s 70000 epoch_est_s 95.1
peak_mem_GiB 9.0
=== fast-bench-train-flat-graphs: python3 -m imdb_lora bench train --batching flat --cuda-graphs
{"bench": "train", "tokens_per_second": 490000.0, "epoch_seconds_estimate": 9.5, "mfu": 0.3}
=== fast-bench-eval-flat: python3 -m imdb_lora bench eval --batching flat
{"bench": "eval", "cold_test_set_seconds_estimate": 6.0, "test_set_seconds_estimate": 3.5}
=== fast-train-3-epochs: /usr/bin/time python3 -m imdb_lora train --epochs 3
epoch 1: train loss 0.69 acc 0.50 | val loss 0.69 acc 0.50 | test acc 0.5012 | 14.0s train, 4.0s eval *best*
done: runs/roberta-random | best epoch 1 | val acc 50.00% | test acc 50.12% | trainable 2,410,442 of 126,382,538
wall 55.0 s
"""


def test_fast_summary_table_json_and_targets(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"  # the device machine's home folder: written as ~/ in the record
    monkeypatch.setenv("HOME", str(home))
    (tmp_path / "log.txt").write_text(
        LOG.replace("python3 reference_lora.py", f"python3 {home}/stage/reference_lora.py")
    )
    (tmp_path / "summary.txt").write_text(
        "fast-ref                     rc=0    61s\nfast-bench-train-flat-compiled skipped (DEADLINE)\n"
    )
    out = tmp_path / "fast-summary.json"
    run_summary(monkeypatch, tmp_path / "log.txt", out)
    table = capsys.readouterr().out
    assert "| project, flat + CUDA graphs | 490,000 | 9.5 | 7.00x | 30.0% |" in table
    r = json.loads(out.read_text())
    assert "| python 3.12.1 |" in r["versions"]
    assert r["gpu"] == "NVIDIA H200" and r["steps"]["fast-ref"] == {
        "command": "python3 ~/stage/reference_lora.py --max-steps 60", "rc": 0, "seconds": 61,
        "tokens_per_second": 70000.0, "epoch_seconds_estimate": 95.1, "peak_memory_bytes": 9.0 * 2**30,
        "ratio_to_reference": 1.0,
    }  # fmt: skip
    assert r["steps"]["fast-bench-train-flat-compiled"]["skipped"] is True
    assert r["steps"]["fast-train-3-epochs"]["epochs"] == [{"epoch": 1, "train_s": 14.0, "eval_s": 4.0}]
    assert r["steps"]["fast-train-3-epochs"]["test_accuracy"] == [0.5012]  # not the done: line's 50.12
    met = {k: v["met"] for k, v in r["targets"].items()}
    assert met == {"ratio >= 6x": True, "epoch <= 10 s": True, "test-set evaluation warm <= 3 s": False,
                   "3 epochs with evaluations <= 60 s wall": True}  # fmt: skip


MPNET_LOG = """gpu-checks 2026-11-29T00:00:00Z parts: fast-mpnet quick=0
torch 2.11.0+cu130 | transformers 5.17.0 | peft 0.21.0 | python 3.12.1 | gpu NVIDIA H200
=== fast-mpnet-bench-train-flat: python3 -m imdb_lora bench train --batching flat
{"bench": "train", "tokens_per_second": 150000.0, "epoch_seconds_estimate": 44.0, "mfu": 0.1}
=== fast-mpnet-bench-train-padded: python3 -m imdb_lora bench train --batching padded
{"bench": "train", "tokens_per_second": 100000.0, "epoch_seconds_estimate": 66.0, "mfu": 0.07}
=== fast-mpnet-1ep-flat: /usr/bin/time python3 -m imdb_lora train --epochs 1 --batching flat
epoch 1: train loss 0.25 acc 0.90 | val loss 0.15 acc 0.95 | test acc 0.9521 | 50.0s train, 9.0s eval *best*
done: runs/mpnet-1ep-flat | best epoch 1 | val acc 95.00% | test acc 95.21% | trainable 2,252,538 of 111,065,466
wall 90.0 s
"""


def test_fast_summary_mpnet_part_alone(tmp_path, monkeypatch, capsys):
    """A fast-mpnet call: the MPNet table (flat vs padded) and the accuracy line, no roberta table."""
    text, r = summarise(tmp_path, monkeypatch, capsys, MPNET_LOG, "fast-mpnet-summary.json")
    assert (
        "| MPNet-base (random init), flat (FlexAttention, no attention dropout) | 150,000 | 44.0 | 1.50x |"
        in text
    )
    assert "flat: test 95.21% (plain recipe 95.34%), 50.0 s train, 9.0 s eval, wall 90.0 s" in text
    assert "padded: test –" in text and "reference_lora" not in text
    assert r["mpnet_accuracy"]["flat"] == {"test_accuracy": 95.21, "wall_seconds": 90.0}
    assert r["steps"]["fast-mpnet-bench-train-flat"]["ratio_to_padded"] == 1.5


def test_fastest_captured_gives_the_train_flags_of_the_fastest_captured_step(tmp_path, monkeypatch, capsys):
    """gpu-checks.sh trains its 3-epoch run with the captured step that was fastest in the same call:
    compiled, with the bf16 working copies (and fused q/k/v), or plain (LOG's flat + CUDA graphs: 490,000 tokens/s); a
    bench that failed or was skipped (no rate) is never chosen."""

    def bench(name: str, rate: str | None) -> str:
        if rate is None:
            return ""
        return f'=== {name}: python3 -m imdb_lora bench train\n{{"bench": "train", "tokens_per_second": {rate}}}\n'

    compiled, working = "fast-bench-train-flat-compiled-graphs", "fast-bench-train-flat-graphs-working"
    fused = "fast-bench-train-flat-graphs-working-fused"
    cases = [
        (("520000.0", None, None), "--compile"),
        (("410000.0", None, None), ""),
        ((None, None, None), ""),
        (("520000.0", "560000.0", None), "--bf16-working-copies"),
        (("580000.0", "560000.0", None), "--compile"),
        ((None, "480000.0", None), ""),
        (("520000.0", "560000.0", "600000.0"), "--bf16-working-copies --fused-qkv"),
        ((None, "560000.0", "550000.0"), "--bf16-working-copies"),
    ]
    for i, ((c, w, f), want) in enumerate(cases):
        log = tmp_path / f"log-{i}.txt"
        log.write_text(LOG + bench(compiled, c) + bench(working, w) + bench(fused, f))
        monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--fastest-captured", str(log)])
        try:
            runpy.run_path(str(SCRIPT), run_name="__main__")
        except SystemExit as e:
            assert e.code == 0
        assert capsys.readouterr().out.strip() == want, (c, w, f)


def test_fast_summary_says_what_compiling_cost(tmp_path, monkeypatch, capsys):
    """The compiled benches' first (untimed) step pays for compiling: the summary says it."""
    compiled = (
        "=== fast-bench-train-flat-compiled-graphs: python3 -m imdb_lora bench train --compile --cuda-graphs\n"
        '{"bench": "train", "tokens_per_second": 520000.0, "first_step_seconds": 41.25, "warmup_seconds": 44.0}\n'
    )
    text, r = summarise(tmp_path, monkeypatch, capsys, LOG + compiled, "fast-summary.json")
    assert (
        "project, flat + torch.compile + CUDA graphs: first step 41.2 s (compiling), 44.0 s for all warm-up steps"
        in text
    )
    assert "flat + torch.compile: first" not in text  # the uncompiled rows and the missing one say nothing
    assert r["steps"]["fast-bench-train-flat-compiled-graphs"]["first_step_seconds"] == 41.25


@pytest.mark.parametrize(
    "name, flags, label",
    [
        ("working", "--bf16-working-copies", "bf16 working copies"),
        ("working-fused", "--bf16-working-copies --fused-qkv", "bf16 working copies + fused q/k/v"),
    ],
)
def test_fast_summary_sets_the_working_copies_steps_beside_the_captured_step(
    tmp_path, monkeypatch, capsys, name, flags, label
):
    """The flat + CUDA graphs + bf16 working copies bench and the same with fused q/k/v (gpu-checks.sh
    runs them right after flat + CUDA graphs) get their rows, and each profiled bench its kernels per
    step, for them to compare."""
    step = f"fast-bench-train-flat-graphs-{name}"
    bench = (
        f"=== {step}: python3 -m imdb_lora bench train --batching flat --cuda-graphs {flags}\n"
        '{"bench": "train", "tokens_per_second": 560000.0, "epoch_seconds_estimate": 8.3, "mfu": 0.34, '
        '"profile": {"steps": 3, "device_kernels_per_step": 2050.0, "device_busy_ms_per_step": 24.5}}\n'
    )
    text, r = summarise(tmp_path, monkeypatch, capsys, LOG + bench, "fast-summary.json")
    assert f"| project, flat + CUDA graphs + {label} | 560,000 | 8.3 | 8.00x | 34.0% |" in text
    assert f"project, flat + CUDA graphs + {label}: 2,050 device kernels per step, GPU busy 24.5 ms" in text
    assert "project, flat + CUDA graphs: " not in text  # its log line has no profile here
    assert r["steps"][step]["profile"]["device_kernels_per_step"] == 2050.0


def test_the_three_epoch_run_says_which_captured_step_it_trained_with():
    train_how = runpy.run_path(str(SCRIPT))["train_how"]
    command = "train --batching flat --cuda-graphs --bf16-working-copies --fused-qkv"
    assert train_how({"command": command}) == "flat + CUDA graphs + bf16 working copies + fused q/k/v"


def test_the_3_epoch_runs_time_by_phase_comes_from_its_run_json(tmp_path, monkeypatch, capsys):
    """With the run's folder (gpu-checks.sh passes it), its run.json's time_breakdown is printed and
    recorded; a run that did not finish, or a step that failed, is not read (an older run.json may be
    left there)."""
    run = tmp_path / "run"
    run.mkdir()
    breakdown = {"startup": 4.0, "setup": 6.5, "data": 10.3, "model": 3.0, "train_steps": 101.6,
                 "evaluation": 22.6, "saving": 1.2, "after_training": 0.4, "reports": 1.1, "other": 0.3,
                 "total": 151.0}  # fmt: skip
    (tmp_path / "log.txt").write_text(LOG)
    for status, rc, shown in (("finished", 0, True), ("running", 0, False), ("finished", 1, False)):
        (run / "run.json").write_text(json.dumps({"status": status, "time_breakdown": breakdown}))
        (tmp_path / "summary.txt").write_text(f"fast-train-3-epochs          rc={rc}    160s\n")
        monkeypatch.setattr(
            sys, "argv", [str(SCRIPT), str(tmp_path / "log.txt"), str(tmp_path / "s.json"), str(run)]
        )
        with pytest.raises(SystemExit) as e:
            runpy.run_path(str(SCRIPT), run_name="__main__")
        assert e.value.code == 0
        out = capsys.readouterr().out
        record = json.loads((tmp_path / "s.json").read_text())["steps"]["fast-train-3-epochs"]
        line = (
            "train --epochs 3 time by phase (run.json): 151.0 s = startup 4.0 + setup 6.5 + data 10.3 + "
            "model 3.0 + train steps 101.6 + evaluation 22.6 + saving 1.2 + after training 0.4 + reports 1.1 + "
            "other 0.3"
        )
        assert (line in out) == shown and ("time_breakdown" in record) == shown, (status, rc)
        if shown:
            assert record["time_breakdown"] == breakdown
