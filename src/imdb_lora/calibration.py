"""Calibration math shared by training, inference and evaluation: temperature scaling and its figures.

A fine-tuned classifier is usually over-confident. Temperature scaling divides the logits by one scalar
T > 0 fitted on the validation split (minimising its negative log-likelihood). Dividing by a positive
scalar keeps the order of the logits, so the predicted label - and the accuracy - never change; only the
confidence does.

Figures: NLL (mean cross-entropy), Brier score (mean squared difference between the probability of
POSITIVE and the 0/1 label, as scikit-learn's brier_score_loss: 0 is perfect, 0.25 is a coin), and ECE: the confidence of the predicted label is put in
ECE_BINS equal-width bins over [0, 1]; ECE is the example-weighted mean of |accuracy - mean confidence|
over the bins. The same bins make the reliability diagram.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

ECE_BINS = 15
# Temperatures outside this range mean the fit went wrong (e.g. a perfectly separable validation set
# drives T to 0); clamping keeps predictions usable and is reported in the figures.
T_MIN, T_MAX = 0.05, 20.0


def _labels(labels: Sequence[int] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(labels, dtype=torch.long)


def nll(logits: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    return F.cross_entropy(logits.float(), _labels(labels)).item()


def brier(probs: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """Binary Brier score: mean (P(positive) - label)^2."""
    return ((probs.float()[:, 1] - _labels(labels).float()) ** 2).mean().item()


def reliability_bins(
    probs: torch.Tensor, labels: Sequence[int] | torch.Tensor, n_bins: int = ECE_BINS
) -> list[dict[str, float]]:
    """Per equal-width confidence bin: count, mean confidence, accuracy (bin i covers (i/n, (i+1)/n])."""
    conf, pred = probs.float().max(-1)
    correct = (pred == _labels(labels)).float()
    # (lo, hi] bins; a confidence of exactly 0 (impossible for a softmax) would fall in the first bin
    idx = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    out = []
    for b in range(n_bins):
        sel = idx == b
        n = int(sel.sum())
        out.append(
            {
                "lo": b / n_bins,
                "hi": (b + 1) / n_bins,
                "count": n,
                "confidence": conf[sel].mean().item() if n else 0.0,
                "accuracy": correct[sel].mean().item() if n else 0.0,
            }
        )
    return out


def ece_from_bins(bins: list[dict[str, float]]) -> float:
    total = sum(b["count"] for b in bins)
    return sum(b["count"] * abs(b["accuracy"] - b["confidence"]) for b in bins) / max(1, total)


def ece(probs: torch.Tensor, labels: Sequence[int] | torch.Tensor, n_bins: int = ECE_BINS) -> float:
    return ece_from_bins(reliability_bins(probs, labels, n_bins))


def figures(logits: torch.Tensor, labels: Sequence[int] | torch.Tensor, temperature: float = 1.0) -> dict:
    """NLL, Brier, ECE and accuracy of logits / temperature (accuracy is the same for any temperature)."""
    scaled = logits.float() / temperature
    probs = scaled.softmax(-1)
    y = _labels(labels)
    return {
        "nll": nll(scaled, y),
        "brier": brier(probs, y),
        "ece": ece(probs, y),
        "accuracy": (probs.argmax(-1) == y).float().mean().item(),
    }


def fit_temperature(logits: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    """The temperature minimising the NLL of logits / T, by LBFGS on log T (so T stays positive)."""
    # clone: evaluation logits come from inference mode, which autograd may not record
    x, y = logits.detach().float().clone(), _labels(labels)
    log_t = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    t = float(log_t.detach().exp())
    if not (t == t) or nll(x / t, y) > nll(x, y):  # NaN, or LBFGS went astray: never make it worse
        t = 1.0
    return min(max(t, T_MIN), T_MAX)


def before_after(logits: torch.Tensor, labels: Sequence[int] | torch.Tensor, temperature: float) -> dict:
    """{"before": figures at T=1, "after": figures at the temperature, "bins": both reliability tables}."""
    probs_before, probs_after = logits.float().softmax(-1), (logits.float() / temperature).softmax(-1)
    return {
        "before": figures(logits, labels),
        "after": figures(logits, labels, temperature),
        "bins": {
            "before": reliability_bins(probs_before, labels),
            "after": reliability_bins(probs_after, labels),
        },
    }


def confusion(pred: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor) -> list[list[int]]:
    """2x2 counts: rows are the true label (0 negative, 1 positive), columns the predicted label."""
    m = [[0, 0], [0, 0]]
    for p, y in zip(torch.as_tensor(pred).tolist(), _labels(labels).tolist()):
        m[y][p] += 1
    return m


def labeled_report(logits: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> dict[str, Any]:
    """Rows, accuracy, loss (NLL), Brier, ECE and the confusion matrix of (already scaled) logits."""
    f = figures(logits, labels)
    return {
        "rows": len(logits),
        "accuracy": f["accuracy"],
        "loss": f["nll"],
        "brier": f["brier"],
        "ece": f["ece"],
        "confusion": confusion(logits.argmax(-1), labels),
    }


def most_confident_mistakes(probs: torch.Tensor, labels: Sequence[int] | torch.Tensor, n: int) -> list[int]:
    """Indices of up to n wrong predictions, most confident first (ties: input order)."""
    conf, pred = probs.float().max(-1)
    wrong = (pred != _labels(labels)).nonzero().flatten().tolist()
    return sorted(wrong, key=lambda i: (-conf[i].item(), i))[:n]
