"""results.md and the figures of a run (runs/report.py) from a hand-made history: the kept epoch is the
one marked, the headline is its test accuracy, and each curve plots what the history holds."""

import pytest
from matplotlib.figure import Figure

from imdb_lora.config import Config
from imdb_lora.runs.report import epoch_table, plot_curves, plot_reliability, results_markdown

pytestmark = pytest.mark.real_plots  # the figures drawn and saved for real (conftest.quick_plots)

# epoch 2 is the best on validation; epoch 3 is the last, and the best on test (never used to choose)
HISTORY = [
    {"epoch": 1, "train_loss": 0.61, "train_accuracy": 0.70, "val_loss": 0.50, "val_accuracy": 0.75,
     "test_loss": 0.52, "test_accuracy": 0.74, "train_seconds": 10.0},
    {"epoch": 2, "train_loss": 0.41, "train_accuracy": 0.82, "val_loss": 0.40, "val_accuracy": 0.85,
     "test_loss": 0.43, "test_accuracy": 0.83, "train_seconds": 11.0},
    {"epoch": 3, "train_loss": 0.30, "train_accuracy": 0.90, "val_loss": 0.45, "val_accuracy": 0.84,
     "test_loss": 0.42, "test_accuracy": 0.86, "train_seconds": 12.0},
]  # fmt: skip
SUMMARY = {
    "model": "tiny", "random_init": False, "method": "lora", "device": "cpu", "precision": "fp32",
    "train_path": "padded", "eval_path": "padded", "examples": {"train": 90, "val": 10, "test": 50},
    "train_seconds": 33.0, "best_epoch": 2, "val_accuracy": 0.85, "test_accuracy": 0.83,
    "trainable_parameters": 1_234, "total_parameters": 100_000, "trainable_percent": 1.234,
    "weights_bytes": 2048, "peak_memory_kind": "CPU (process peak RSS)", "peak_memory_bytes": 3 << 20,
}  # fmt: skip


def test_the_epoch_table_marks_the_kept_epoch_and_shows_each_rows_figures():
    rows = epoch_table(HISTORY, best_epoch=2).splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["1", "2 *", "3"]
    assert rows[2] == "| 3 | 0.3000 | 90.00% | 0.4500 | 84.00% | 0.4200 | 86.00% | 12.0 s |"


def test_results_headline_is_the_kept_epochs_test_accuracy():
    text = results_markdown(Config().validate(), HISTORY, SUMMARY)
    assert "| Final test accuracy (best epoch) | **83.00%** |" in text
    assert "| Best epoch (by validation accuracy) | 2 |" in text
    assert "| Validation accuracy (best epoch) | 85.00% |" in text
    assert "| Training time | 33.0 s |" in text and "| Time per epoch | 11.0 s |" in text
    assert "| Trainable parameters | 1,234 |" in text and "| Adapter size on disk | 2.0 KB |" in text


def test_time_per_epoch_averages_the_full_epochs_only():
    # epoch 3 cut by --max-steps after 1 of its 10 steps: 12 s would have been 1.2 s, pulling 11 s to 7.4 s
    cut = [
        *HISTORY[:2],
        {**HISTORY[2], "train_seconds": 1.2, "steps": 1, "steps_in_epoch": 10, "train_reviews": 8},
    ]
    text = results_markdown(Config().validate(), cut, {**SUMMARY, "train_seconds": 22.2})
    assert "| Time per epoch | 10.5 s |" in text
    alone = results_markdown(Config().validate(), cut[2:], {**SUMMARY, "train_seconds": 1.2, "best_epoch": 3})
    assert "| Time per epoch | – (no full epoch; the cut one: 1.2 s for 1 of 10 steps) |" in alone


@pytest.fixture
def drawn(monkeypatch):
    """The lines of each axis of every figure saved: {axis title: {line label: (x, y)}}."""
    figures = []
    real = Figure.savefig

    def spy(self, *args, **kwargs):
        figures.append(
            {
                ax.get_title(): {
                    line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
                    for line in ax.get_lines()
                }
                for ax in self.axes
            }
        )
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return figures


def test_curves_plot_loss_and_accuracy_of_every_split_per_epoch(tmp_path, drawn):
    plot_curves(HISTORY, tmp_path / "curves.png", kept_epoch=2)
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    (fig,) = drawn
    epochs = [1, 2, 3]
    kept = {"kept: epoch 2": ([2, 2], [0, 1])}  # a vertical line at the kept checkpoint's epoch
    assert fig["Loss"] == {
        **{s: (epochs, [r[f"{s}_loss"] for r in HISTORY]) for s in ("train", "val", "test")},
        **kept,
    }
    assert fig["Accuracy"] == {
        **{
            s: (epochs, [pytest.approx(100 * r[f"{s}_accuracy"]) for r in HISTORY])
            for s in ("train", "val", "test")
        },
        **kept,
    }


def test_reliability_diagram_plots_the_used_bins_raw_and_calibrated(tmp_path, drawn):
    def bins(*used):  # (lo, count, confidence, accuracy) of the non-empty bins
        return [
            {"lo": lo, "hi": lo + 0.1, "count": n, "confidence": c, "accuracy": a} for lo, n, c, a in used
        ]

    tables = {
        "val": {"before": bins((0.5, 0, 0, 0), (0.9, 3, 0.95, 0.6)), "after": bins((0.7, 2, 0.75, 0.7))},
        "test": {"before": bins((0.8, 4, 0.85, 0.5))},
    }
    plot_reliability(tables, tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    (fig,) = drawn
    # titles give the split's reviews, legends each curve's ECE (the figure results.md reports)
    assert fig["Reliability (validation, 3 reviews)"] == {
        "perfect calibration": ([0, 1], [0, 1]),
        "raw (ECE 35.00%)": ([0.95], [0.6]),  # the empty bin is not drawn
        "calibrated (ECE 5.00%)": ([0.75], [0.7]),
    }
    assert fig["Reliability (test, 4 reviews)"] == {
        "perfect calibration": ([0, 1], [0, 1]),
        "raw (ECE 35.00%)": ([0.85], [0.5]),
    }


def test_reliability_bin_counts_sit_in_white_boxes_over_the_curves(tmp_path, monkeypatch):
    labels = []
    real = Figure.savefig

    def spy(self, *args, **kwargs):  # each count's text, and the highest line under it
        for ax in self.axes:
            top = max(line.get_zorder() for line in ax.get_lines())
            labels.extend((t.get_text(), t.get_zorder() > top, t.get_bbox_patch()) for t in ax.texts)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    used = [{"lo": 0.6, "hi": 0.7, "count": 82, "confidence": 0.65, "accuracy": 0.7}]
    plot_reliability({"test": {"before": used, "after": used}}, tmp_path / "reliability.png")
    assert [(text, above) for text, above, _ in labels] == [("82", True), ("82", True)]
    assert all(box is not None and box.get_facecolor()[:3] == (1.0, 1.0, 1.0) for *_, box in labels)
