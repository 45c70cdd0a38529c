"""Transferability estimators: score frozen features for a labelled target task without fine-tuning.

This module owns the estimators that predict, from a backbone's frozen features F (N, D) on the target
data and the target labels y (N,) in [0, C), how well that backbone will transfer, and the rank
correlation the literature uses to validate them (estimator score vs fine-tuned accuracy across a
model zoo). Everything is computed in float64 numpy; inputs may be numpy arrays, torch tensors or
nested lists. Bad input raises `UserError`.

- `logme`: LogME (You et al., ICML 2021), mean over classes of the maximised Bayesian linear-model
  log evidence per sample. `logme_fit` returns the per-class details (alpha, beta, steps, convergence).
- `hscore_shrinkage`: the shrinkage-based H-score (Ibrahim, Ponomareva, Mazumder 2022, "Newer is not
  always better: rethinking transferability metrics..."), built on `ledoit_wolf`.
- `weighted_kendall_tau`: additive hyperbolic weighted Kendall tau, as `scipy.stats.weightedtau`'s
  defaults compute it (scipy is not a dependency; this is a numpy re-implementation).
- `ESTIMATORS` / `score`: the registry by name.

NLEEP (Li et al. 2021) is not here: it fits a Gaussian mixture by EM on PCA-reduced features, whose
result depends on initialisation and EM settings; done cheaply it would not reproduce the reference.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import UserError, did_you_mean

# LogME defaults, from the reference implementation (thuml/LogME, LogME.py, `LogME._fit_fixed_point`,
# the method `LogME.fit` uses): alpha = beta = 1 to start; stop once alpha/beta moves by <= 1e-3
# relative; at most 11 fixed-point updates.
LOGME_MAX_ITER = 11
LOGME_TOL = 1e-3
# The reference adds 1e-5 to both update denominators. Besides guarding against 0/0 (a class target
# that the features fit exactly, or that is orthogonal to them), it bounds alpha and beta when the
# evidence's supremum lies at alpha -> inf or beta -> inf, so keep it for equal scores.
_LOGME_EPS = 1e-5
_LOG_2PI = math.log(2.0 * math.pi)


# ------------------------------------------------------------------------------------ input checks

def _to_numpy(x, what: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor, without importing torch here
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()  # bfloat16/half have no numpy dtype; float64 is where we compute anyway
        x = x.numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:  # ragged nested lists, say
        raise UserError(f"{what} could not be read as an array: {e}") from None


def _features(features) -> np.ndarray:
    f = _to_numpy(features, "features")
    if f.ndim != 2:
        raise UserError(f"features must be a 2-D (N, D) array, got shape {tuple(f.shape)}")
    if f.shape[0] < 2 or f.shape[1] < 1:
        raise UserError(f"features need at least 2 rows (samples) and 1 column, got shape {tuple(f.shape)}")
    if not (np.issubdtype(f.dtype, np.number) or f.dtype == np.bool_) or np.iscomplexobj(f):
        raise UserError(f"features must be real numbers, got dtype {f.dtype}")
    f = f.astype(np.float64, copy=False)
    bad = ~np.isfinite(f)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise UserError(f"features contain {int(bad.sum())} NaN/inf values (rows {_some(rows)}): "
                        "check the backbone's outputs before scoring them")
    return f


def _labels(labels, n: int) -> tuple[np.ndarray, int]:
    y = _to_numpy(labels, "labels")
    if y.ndim != 1:
        raise UserError(f"labels must be a 1-D array of class ids, got shape {tuple(y.shape)}")
    if y.shape[0] != n:
        raise UserError(f"labels must have one entry per feature row: got {y.shape[0]} labels for {n} rows")
    if not np.issubdtype(y.dtype, np.integer):
        raise UserError(f"labels must be integer class ids in [0, C), got dtype {y.dtype}")
    y = y.astype(np.int64, copy=False)
    if y.min() < 0:
        raise UserError(f"labels must be class ids in [0, C), got negative ids {_some(np.unique(y[y < 0]))}")
    c = int(y.max()) + 1
    counts = np.bincount(y, minlength=c)
    empty = np.flatnonzero(counts == 0)
    # An empty class has no class mean (H-score) and an all-zero LogME target, whose evidence is
    # unbounded: the ids were almost certainly not consecutive, so say so instead of scoring garbage.
    if empty.size:
        raise UserError(f"labels use class ids up to {c - 1} but class(es) {_some(empty)} have no samples: "
                        "remap them to consecutive ids 0..C-1, e.g. np.unique(labels, return_inverse=True)[1]")
    if c < 2:
        raise UserError("labels hold a single class: transferability needs at least 2 classes")
    return y, c


def _some(ids: np.ndarray, k: int = 5) -> str:
    head = ", ".join(str(int(i)) for i in ids[:k])
    return head + (f", ... ({len(ids)} in all)" if len(ids) > k else "")


def _class_sums(rows: np.ndarray, y: np.ndarray, c: int) -> np.ndarray:
    """(C, K): the sum of `rows` (N, K) over each class, O(N K) rather than a dense one-hot product."""
    out = np.zeros((c, rows.shape[1]))
    np.add.at(out, y, rows)
    return out


# ------------------------------------------------------------------------------------ LogME

@dataclass(frozen=True)
class LogMEResult:
    """What `logme_fit` found, per class c (one-vs-rest target): arrays of shape (C,)."""

    score: float  # the LogME score: mean over classes of `evidence`
    evidence: np.ndarray  # log p(t_c | F, alpha_c, beta_c) / N at the final (alpha_c, beta_c)
    alpha: np.ndarray  # prior precision of the weights
    beta: np.ndarray  # noise precision
    iterations: np.ndarray  # fixed-point updates taken
    converged: np.ndarray  # alpha/beta settled within tol before max_iter ran out


def logme_fit(features, labels, *, max_iter: int = LOGME_MAX_ITER, tol: float = LOGME_TOL) -> LogMEResult:
    """LogME with per-class details. See `logme` for the model and the conventions."""
    f = _features(features)
    y, c = _labels(labels, f.shape[0])
    if not (isinstance(max_iter, (int, np.integer)) and max_iter >= 1):
        raise UserError(f"logme: max_iter must be a positive integer, got {max_iter!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0 and math.isfinite(tol)):
        raise UserError(f"logme: tol must be a finite number >= 0, got {tol!r}")
    n, d = f.shape

    # One eigendecomposition of the smaller Gram matrix: F^T F (D x D, O(N D^2 + D^3)) when N > D,
    # F F^T (N x N, O(N^2 D + N^3)) otherwise. Its eigenvalues are sigma = s^2 (s: singular values of
    # F); x = U^T t are the targets' coordinates on F's left singular vectors.
    if n > d:
        sigma, v = np.linalg.eigh(f.T @ f)
    else:
        sigma, u = np.linalg.eigh(f @ f.T)
    # Drop directions at eigh's rounding level (relative, unlike the reference's absolute s > 1e-10):
    # they are null directions in all but round-off, and their noisy vectors would corrupt x.
    # Dropping one with sigma << alpha/beta changes nothing: it adds log(alpha) to log|A| either way.
    keep = sigma > sigma.max() * max(n, d) * np.finfo(np.float64).eps
    if not keep.any():
        raise UserError("logme: the features are all zero, so there is nothing to score")
    sigma = sigma[keep]
    if n > d:
        v = v[:, keep]
        x = (v.T @ _class_sums(f, y, c).T) / np.sqrt(sigma)[:, None]  # U^T t = V^T F^T t / s
    else:
        x = _class_sums(u[:, keep], y, c).T  # U^T t for one-hot t: sum of U's rows in the class
    k = sigma.size
    sig = sigma[:, None]  # (k, 1) against the (k, C) targets
    x2 = x * x
    # The part of ||t||^2 = n_c outside F's column space; clamp the round-off when t lies inside it.
    outside = np.maximum(np.bincount(y, minlength=c) - x2.sum(axis=0), 0.0)

    def fit_terms(ratio):  # gamma, ||m||^2 and ||F m - t||^2 at alpha/beta = ratio, per class
        gamma = (sig / (sig + ratio)).sum(axis=0)
        m2 = (sig * x2 / (sig + ratio) ** 2).sum(axis=0)
        res2 = (x2 / (1.0 + sig / ratio) ** 2).sum(axis=0) + outside
        return gamma, m2, res2

    # MacKay's fixed point, every class at once; a class stops updating once it has converged.
    alpha, beta = np.ones(c), np.ones(c)
    steps = np.zeros(c, dtype=np.int64)
    converged = np.zeros(c, dtype=bool)
    for _ in range(max_iter):
        active = ~converged
        if not active.any():
            break
        ratio = alpha / beta
        gamma, m2, res2 = fit_terms(ratio)
        new_alpha = gamma / (m2 + _LOGME_EPS)
        new_beta = (n - gamma) / (res2 + _LOGME_EPS)
        alpha = np.where(active, new_alpha, alpha)
        beta = np.where(active, new_beta, beta)
        steps += active
        converged |= active & (np.abs(alpha / beta - ratio) <= tol * ratio)

    # The log evidence at the final (alpha, beta), with the posterior mean m for that same pair. (The
    # reference reuses the previous step's m here, a second-order difference at convergence.)
    #   L = N/2 log beta + D/2 log alpha - N/2 log 2pi - beta/2 ||F m - t||^2 - alpha/2 ||m||^2 - 1/2 log|A|,
    #   log|A| = sum_k log(alpha + beta sigma_k) + (D - k) log alpha   (A = alpha I + beta F^T F, D x D).
    # The (D - k) log alpha term cancels D/2 log alpha down to k/2 log alpha. The reference's default
    # (`_fit_fixed_point`) leaves it out, which overstates the score by (D - k)/(2N) log alpha whenever
    # rank(F) < D, e.g. always when N < D (thuml/LogME issue #23, fix agreed in PR #24).
    _, m2, res2 = fit_terms(alpha / beta)
    log_ev = (n / 2 * np.log(beta) + k / 2 * np.log(alpha) - 0.5 * np.log(alpha + beta * sig).sum(axis=0)
              - beta / 2 * res2 - alpha / 2 * m2 - n / 2 * _LOG_2PI)
    evidence = log_ev / n
    return LogMEResult(score=float(evidence.mean()), evidence=evidence, alpha=alpha, beta=beta,
                       iterations=steps, converged=converged)


def logme(features, labels, *, max_iter: int = LOGME_MAX_ITER, tol: float = LOGME_TOL) -> float:
    """LogME (You et al., "LogME: Practical Assessment of Pre-trained Models for Transfer Learning", ICML 2021).

    For each class c, the one-hot column t = [y == c] is modelled as t = F m + noise with prior
    m ~ N(0, alpha^-1 I) and noise ~ N(0, beta^-1 I); the log evidence log p(t | F, alpha, beta) is
    maximised over (alpha, beta) by MacKay's fixed-point updates after one eigendecomposition of F's
    Gram matrix. The score is the mean over classes of the maximised log evidence divided by N
    (higher is better). Features are used as given: no centring or scaling, no bias column.

    Conventions follow the reference's `LogME._fit_fixed_point` (thuml/LogME): start at alpha = beta = 1,
    add 1e-5 to both update denominators, stop when |r' - r| <= tol * r for r = alpha/beta (tol = 1e-3),
    at most `max_iter` = 11 updates. Differences, both documented in `logme_fit`: the evidence is
    evaluated at the final (alpha, beta) with its own posterior mean, and log|A| counts the (D - rank)
    null directions, as the model requires (the reference omits them, so it scores rank-deficient
    features, e.g. any with N < D, higher). With 11 updates the fixed point may stop short when the
    evidence is flat or maximal at a boundary (no linear signal in a class, or N <= D): `logme_fit`'s
    `converged` says where; raise `max_iter` and lower `tol` for the exact maximum. The 1e-5 makes the
    score scale-dependent: for large-scale features (||m||^2 not >> 1e-5) the fixed point settles below
    the maximum (e.g. 4e-4 per sample low with features x30 in a test problem, 2e-2 with x100).
    """
    return logme_fit(features, labels, max_iter=max_iter, tol=tol).score


# ------------------------------------------------------------------------------------ H-score

def ledoit_wolf(x) -> tuple[np.ndarray, float]:
    """Ledoit-Wolf shrunk covariance of the rows of x (N, D), and its shrinkage, after centring x.

    Ledoit & Wolf (2004), "A well-conditioned estimator for large-dimensional covariance matrices":
    S = Xc^T Xc / N (Xc: x centred), mu = tr(S) / D, and the shrunk covariance is
    (1 - delta) S + delta mu I with delta = min(b2, d2) / d2, where, in the norm ||A||^2 = tr(A A^T) / D,
    d2 = ||S - mu I||^2 and b2 = sum_k ||x_k x_k^T - S||^2 / N^2. The same estimate as
    sklearn.covariance.ledoit_wolf with its defaults (delta = 0 when d2 = 0, e.g. D = 1).
    """
    f = _features(x)
    n, d = f.shape
    xc = f - f.mean(axis=0)
    s = xc.T @ xc / n
    mu = np.trace(s) / d
    d2 = (np.sum(s * s) - 2 * mu * np.trace(s) + d * mu * mu) / d
    # sum_k ||x_k x_k^T - S||_F^2 = sum_k ||x_k||^4 - N ||S||_F^2, so b2 needs no (N, D, D) tensor.
    b2 = (np.sum(np.sum(xc * xc, axis=1) ** 2) - n * np.sum(s * s)) / (n * n * d)
    shrinkage = 0.0 if d2 <= 0 else float(min(max(b2, 0.0), d2) / d2)
    shrunk = (1.0 - shrinkage) * s
    shrunk[np.diag_indices(d)] += shrinkage * mu
    return shrunk, shrinkage


def hscore_shrinkage(features, labels) -> float:
    """Shrinkage-based H-score (Ibrahim, Ponomareva, Mazumder, "Newer is not always better", 2022).

    H_alpha = tr(cov_alpha(f)^-1 (1 - alpha) cov(E[f | y])), higher is better: cov_alpha is the
    Ledoit-Wolf shrunk covariance of the centred features (`ledoit_wolf`; alpha its shrinkage), and
    cov(E[f | y]) the covariance of the features with each row replaced by its class mean, i.e.
    sum_c n_c mu_c mu_c^T / (N - 1) with mu_c the class means of the centred features. The (1 - alpha)
    factor shrinks the between-class covariance as the paper does (it is part of cov_alpha's data term).

    Normalisations match the paper's published estimator (as in TLlib's `regularized_h_score`):
    cov_alpha divides by N (Ledoit-Wolf's S), the between-class covariance by N - 1 (np.cov), and the
    inverse is a pseudo-inverse with relative cutoff 1e-15 (cov_alpha is singular only when shrinkage
    is 0 and N <= D). The N/(N - 1) mismatch scales every model's score on a dataset alike, so
    rankings do not depend on it.
    """
    f = _features(features)
    y, c = _labels(labels, f.shape[0])
    n = f.shape[0]
    cov, shrinkage = ledoit_wolf(f)
    fc = f - f.mean(axis=0)
    counts = np.bincount(y, minlength=c).astype(np.float64)
    means = _class_sums(fc, y, c) / counts[:, None]
    # tr(P sum_c n_c mu_c mu_c^T) = sum_c n_c ||lam^+1/2 Q^T mu_c||^2 for the pseudo-inverse
    # P = Q diag(lam^+) Q^T: a (C, D) product instead of forming the D x D between-class matrix.
    lam, q = np.linalg.eigh(cov)
    inv = np.zeros_like(lam)
    big = lam > 1e-15 * max(lam.max(), 0.0)
    inv[big] = 1.0 / lam[big]
    proj = means @ q
    trace = float(np.sum(counts[:, None] * proj * proj * inv[None, :]))
    return (1.0 - shrinkage) * trace / (n - 1)


# ------------------------------------------------------------------------------------ weighted tau

def _paired(x, y) -> tuple[np.ndarray, np.ndarray]:
    out = []
    for name, v in (("x", x), ("y", y)):
        a = _to_numpy(v, f"weighted_kendall_tau: {name}")
        if a.ndim != 1:
            raise UserError(f"weighted_kendall_tau: {name} must be 1-D, got shape {tuple(a.shape)}")
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_) or np.iscomplexobj(a):
            raise UserError(f"weighted_kendall_tau: {name} must be real numbers, got dtype {a.dtype}")
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            raise UserError(f"weighted_kendall_tau: {name} contains NaN/inf at positions "
                            f"{_some(np.flatnonzero(~np.isfinite(a)))}")
        out.append(a)
    if out[0].shape != out[1].shape:
        raise UserError(f"weighted_kendall_tau: x and y must pair up, got {out[0].size} and {out[1].size} values")
    if out[0].size < 2:
        raise UserError(f"weighted_kendall_tau: need at least 2 pairs, got {out[0].size}")
    # Dense ranks keep every comparison and tie of the original values exactly (int64 ids beyond 2^53
    # included) and make the pairwise differences below exact integers.
    return tuple(np.unique(a, return_inverse=True)[1].astype(np.int64) for a in out)


def weighted_kendall_tau(x, y) -> float:
    """Weighted Kendall tau, additive hyperbolic: scipy.stats.weightedtau(x, y) with its defaults.

    Vigna (2015), "A weighted correlation index for rankings with ties". Each element gets an
    importance rank r (0 = most important) and weight 1/(r + 1); a pair weighs the sum of its two
    weights, and tau = (concordant - discordant weight) / sqrt(weight of pairs untied in x * weight of
    pairs untied in y). As scipy's default rank=True does, the result is the mean of two such taus: one
    ranking elements by decreasing (x, y) lexicographically, the other by decreasing (y, x). (How elements
    tied in both are ordered does not matter: they are interchangeable in every pair.) Returns NaN when
    x or y is constant, as scipy does, and is clipped to [-1, 1] like scipy's.
    O(n^2) time in blocks of rows, O(n) memory beyond that: ample for model zoos.
    """
    xr, yr = _paired(x, y)
    n = xr.size
    # S_i = sum_j sign(x_i - x_j) sign(y_i - y_j). With a pair's weight w_i + w_j and the sign product
    # symmetric in (i, j), sum over pairs i < j of (w_i + w_j) s_ij = sum_i w_i S_i: the weighting
    # enters only through per-element sums, so both rankings share one O(n^2) pass.
    s = np.empty(n)
    block = max(1, 4_000_000 // n)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        s[lo:hi] = (np.sign(xr[lo:hi, None] - xr[None, :]) * np.sign(yr[lo:hi, None] - yr[None, :])).sum(axis=1)
    # Pairs untied in x (y) that involve i: n minus the size of i's tie group.
    untied_x = n - np.bincount(xr)[xr]
    untied_y = n - np.bincount(yr)[yr]
    if not untied_x.any() or not untied_y.any():
        return float("nan")

    def one(primary: np.ndarray, secondary: np.ndarray) -> float:
        order = np.lexsort((secondary, primary))  # ascending by primary, ties broken by secondary
        rank = np.empty(n, dtype=np.int64)
        rank[order[::-1]] = np.arange(n)  # the largest is rank 0
        w = 1.0 / (rank + 1.0)
        tau = float(w @ s) / math.sqrt(float(w @ untied_x)) / math.sqrt(float(w @ untied_y))
        return min(1.0, max(-1.0, tau))

    return (one(xr, yr) + one(yr, xr)) / 2


# ------------------------------------------------------------------------------------ registry

ESTIMATORS: dict[str, Callable[..., float]] = {
    "logme": logme,
    "hscore": hscore_shrinkage,
}


def score(name: str, features, labels) -> float:
    """The transferability estimator `name` (a key of ESTIMATORS) on features (N, D) and labels (N,)."""
    try:
        estimator = ESTIMATORS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown transferability estimator {name!r}: choose from {', '.join(sorted(ESTIMATORS))}."
                        f"{did_you_mean(str(name), ESTIMATORS)}") from None
    return float(estimator(features, labels))
