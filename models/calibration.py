"""Probability calibration: temperature scaling fitted on out-of-fold logits.

A network's softmax is often over-confident. Temperature scaling (Guo et al.,
*On calibration of modern neural networks*, ICML 2017) divides the logits by one
scalar ``T`` fitted to minimise the negative log-likelihood of held-out
predictions; the ranking of classes is unchanged, only the confidence moves.
Expected calibration error (ECE) measures what it gained.
"""

from __future__ import annotations

import numpy as np

#: Bins of the expected calibration error (equal width over the top-class confidence).
ECE_BINS = 15


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature`` (float64, numerically stable).

    Raises
    ------
    ValueError
        If ``temperature`` is not positive or ``logits`` is not 2-D.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2:
        raise ValueError(f"logits: expected [N, K], got shape {z.shape}")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature!r}")
    z = z / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / T)``."""
    p = softmax(logits, temperature)
    y = np.asarray(labels, dtype=int)
    return float(-np.mean(np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1.0))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the NLL of held-out ``(logits, labels)``.

    A deterministic search over ``log T`` in [-3, 3] (a coarse grid, then golden
    section around the best point), so the result does not depend on an
    optimiser's floating-point path.

    Raises
    ------
    ValueError
        If shapes disagree, a label is out of range, or there are no samples.
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    if z.ndim != 2 or y.ndim != 1 or len(y) != len(z) or len(y) == 0:
        raise ValueError(f"logits [N, K] and labels [N] needed, got {z.shape} and {y.shape}")
    if y.min() < 0 or y.max() >= z.shape[1]:
        raise ValueError(f"labels: must lie in [0, {z.shape[1]}), got {y.min()}..{y.max()}")
    grid = np.linspace(-3.0, 3.0, 61)
    losses = [nll(z, y, float(np.exp(g))) for g in grid]
    i = int(np.argmin(losses))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    phi = (np.sqrt(5.0) - 1.0) / 2.0
    for _ in range(40):
        a, b = hi - phi * (hi - lo), lo + phi * (hi - lo)
        if nll(z, y, float(np.exp(a))) <= nll(z, y, float(np.exp(b))):
            hi = b
        else:
            lo = a
    return float(np.exp((lo + hi) / 2.0))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: the bin-weighted mean gap between top-class confidence and accuracy.

    Raises
    ------
    ValueError
        If shapes disagree or there are no samples.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=int)
    if p.ndim != 2 or len(p) != len(y) or len(y) == 0:
        raise ValueError(f"probs [N, K] and labels [N] needed, got {p.shape} and {y.shape}")
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def log_probs(probs: np.ndarray) -> np.ndarray:
    """Logits up to a per-row constant (which neither softmax nor a temperature sees) from probabilities."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1.0))


def calibration_summary(
    logits: np.ndarray, labels: np.ndarray, test: tuple[np.ndarray, np.ndarray] | None = None,
    method: str = "temperature scaling fitted on out-of-fold logits",
) -> dict[str, float | str]:
    """Fit a temperature on ``(logits, labels)`` and report ECE and NLL before and after.

    The figures are measured on ``test`` (logits, labels) when given, else on the
    fitting set itself (then optimistic). Returns the package's ``calibration``.
    """
    t = fit_temperature(logits, labels)
    z, y = test if test is not None else (logits, labels)
    out: dict[str, float | str] = {
        "method": method,
        "temperature": t,
        "ece_before": expected_calibration_error(softmax(z), y),
        "ece_after": expected_calibration_error(softmax(z, t), y),
        "nll_before": nll(z, y),
        "nll_after": nll(z, y, t),
        "n": int(len(y)),
    }
    if test is not None:
        out["n_fit"] = int(len(labels))
    return out


__all__ = ["ECE_BINS", "calibration_summary", "log_probs", "expected_calibration_error", "fit_temperature", "nll", "softmax"]
