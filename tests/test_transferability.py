"""Transferability estimators against independent references: LogME against a direct maximisation of the
closed-form evidence, Ledoit-Wolf against scikit-learn, the H-score against hand-worked cases and the
paper's formula, weighted tau against scipy. scipy and scikit-learn are test-only dependencies."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from transferbench.errors import UserError
from transferbench.transferability import (
    ESTIMATORS,
    LOGME_MAX_ITER,
    LOGME_TOL,
    hscore_shrinkage,
    ledoit_wolf,
    logme,
    logme_fit,
    score,
    weighted_kendall_tau,
)

scipy_optimize = pytest.importorskip("scipy.optimize")
scipy_stats = pytest.importorskip("scipy.stats")
sk_covariance = pytest.importorskip("sklearn.covariance")


def blobs(rng, n, d, c, sep, rank=None, scale=1.0):
    """Features with class structure: class means `sep` apart in a `rank`-dim latent space, mapped to d dims."""
    y = np.arange(n) % c
    r = d if rank is None else rank
    z = rng.normal(size=(c, r))[y] * sep + rng.normal(size=(n, r))
    f = z if rank is None else z @ rng.normal(size=(r, d)) / math.sqrt(r)
    return f * scale, y


# ------------------------------------------------------------------------------------ LogME

def log_evidence(f, t, log_alpha, log_beta):
    """L(alpha, beta) straight from its definition, with A = alpha I + beta F^T F and m = beta A^-1 F^T t
    (no SVD, unlike the code under test), for arrays of log alpha and log beta of one shape."""
    n, d = f.shape
    a = np.exp(np.asarray(log_alpha, dtype=np.float64)).reshape(-1)
    b = np.exp(np.asarray(log_beta, dtype=np.float64)).reshape(-1)
    big_a = a[:, None, None] * np.eye(d) + b[:, None, None] * (f.T @ f)
    m = b[:, None] * np.linalg.solve(big_a, np.broadcast_to(f.T @ t, (a.size, d))[..., None])[..., 0]
    resid = np.sum((m @ f.T - t) ** 2, axis=1)
    logdet = np.linalg.slogdet(big_a)[1]
    out = (n / 2 * np.log(b) + d / 2 * np.log(a) - n / 2 * math.log(2 * math.pi) - b / 2 * resid
           - a / 2 * np.sum(m * m, axis=1) - logdet / 2)
    return out.reshape(np.shape(log_alpha))


def max_log_evidence(f, t, interior=True):
    """max over (alpha, beta) of L: a log grid, then Nelder-Mead from its best point; checks it is interior."""
    grid = np.arange(-6.0, 16.01, 0.5) if interior else np.arange(-6.0, 40.01, 0.5)
    la, lb = np.meshgrid(grid, grid, indexing="ij")
    values = log_evidence(f, t, la, lb)
    i, j = np.unravel_index(np.argmax(values), values.shape)
    res = scipy_optimize.minimize(lambda p: -float(log_evidence(f, t, p[0], p[1])), [grid[i], grid[j]],
                                  method="Nelder-Mead", options={"xatol": 1e-9, "fatol": 1e-12, "maxiter": 4000})
    assert not interior or (grid[0] + 1 < res.x[0] < grid[-1] - 1 and grid[0] + 1 < res.x[1] < grid[-1] - 1), res.x
    return -res.fun


def direct_logme(f, y):
    return float(np.mean([max_log_evidence(f, (y == c).astype(np.float64)) for c in range(y.max() + 1)]) / len(y))


@pytest.mark.parametrize("n, d, rank, sep", [
    (60, 8, None, 1.0),  # N > D: the D x D Gram path
    (40, 12, None, 2.0),
    (30, 40, 5, 2.0),  # N < D: the N x N Gram path, and rank 5 < N so the maximum is interior
    (40, 10, 4, 2.0),  # N > D but rank 4 < D: null directions in the D x D path
])
def test_logme_equals_direct_evidence_maximisation(n, d, rank, sep):
    rng = np.random.default_rng(n * 100 + d)
    f, y = blobs(rng, n, d, 3, sep, rank)
    res = logme_fit(f, y)
    assert res.converged.all(), res.iterations  # with these signals the reference's 11 steps suffice
    assert res.score == pytest.approx(direct_logme(f, y), abs=1e-4)
    assert logme(f, y) == res.score and score("logme", f, y) == res.score


def test_logme_ranks_feature_sets_like_the_direct_maximum():
    rng = np.random.default_rng(7)
    sets = [blobs(rng, 45, d, 3, sep) for d, sep in ((6, 0.8), (10, 1.6), (4, 2.5), (8, 1.2))]
    ours = [logme(f, y) for f, y in sets]
    direct = [direct_logme(f, y) for f, y in sets]
    np.testing.assert_allclose(ours, direct, atol=1e-4)
    assert np.argmax(ours) == np.argmax(direct) and list(np.argsort(ours)) == list(np.argsort(direct))


def test_logme_never_exceeds_the_evidence_maximum_even_unconverged():
    # No signal at all: the supremum is at alpha -> inf, which 11 fixed-point steps do not reach. The
    # score is still a true evidence value, hence below the supremum; `converged` says it stopped short.
    rng = np.random.default_rng(3)
    f, y = rng.normal(size=(16, 15)), np.arange(16) % 2
    res = logme_fit(f, y)
    assert not res.converged.all() and (res.iterations == LOGME_MAX_ITER).any()
    n = len(y)
    for c in range(2):
        t = (y == c).astype(np.float64)
        # The limit alpha -> inf (m = 0) maximised over beta = N / ||t||^2, and the best finite point found.
        at_infinity = n / 2 * math.log(n / (t @ t)) - n / 2 - n / 2 * math.log(2 * math.pi)
        supremum = max(at_infinity, max_log_evidence(f, t, interior=False))
        assert res.evidence[c] * n <= supremum + 1e-9
        assert res.evidence[c] * n == pytest.approx(float(log_evidence(f, t, math.log(res.alpha[c]),
                                                                       math.log(res.beta[c]))), abs=1e-8)


def test_logme_follows_the_reference_fixed_point():
    """alpha = beta = 1 to start, one MacKay update with 1e-5 in the denominators, stop at a 1e-3 relative
    change of alpha/beta, at most 11 updates: the reference's conventions, checked step by step."""
    rng = np.random.default_rng(8)
    f, y = blobs(rng, 25, 5, 2, 1.0)
    n, d = f.shape
    t = (y == 0).astype(np.float64)
    big_a = np.eye(d) + f.T @ f  # alpha = beta = 1
    m = np.linalg.solve(big_a, f.T @ t)
    gamma = d - np.trace(np.linalg.inv(big_a))
    alpha1 = gamma / (m @ m + 1e-5)
    beta1 = (n - gamma) / (np.sum((f @ m - t) ** 2) + 1e-5)
    one = logme_fit(f, y, max_iter=1)
    assert one.alpha[0] == pytest.approx(alpha1, rel=1e-10) and one.beta[0] == pytest.approx(beta1, rel=1e-10)
    assert one.evidence[0] * n == pytest.approx(float(log_evidence(f, t, math.log(alpha1), math.log(beta1))),
                                                rel=1e-10)
    # The trajectory of alpha/beta with tol = 0, then where the default tolerance must have stopped it.
    runs = [logme_fit(f, y, max_iter=j, tol=0) for j in range(1, LOGME_MAX_ITER + 1)]
    ratios = np.array([np.ones(2)] + [r.alpha / r.beta for r in runs])
    change = np.abs(np.diff(ratios, axis=0)) / ratios[:-1]  # change[j - 1]: relative change at update j
    default = logme_fit(f, y)
    for c in range(2):
        stop = 1 + int(np.argmax(change[:, c] <= LOGME_TOL))
        assert change[stop - 1, c] > LOGME_TOL / 2  # this seed stops just under tol: a stricter rule would not
        assert default.iterations[c] == stop and default.converged[c]
        assert default.alpha[c] / default.beta[c] == pytest.approx(ratios[stop, c], rel=1e-12)


def test_logme_counts_null_directions_in_log_det():
    # N < D and rank 4: log|A| of the D x D matrix A has D - 4 eigenvalues equal to alpha, which the
    # N x N path never sees; the evidence must count them (the reference's default leaves them out).
    rng = np.random.default_rng(5)
    f, y = blobs(rng, 20, 30, 2, 2.0, rank=4)
    t = (y == 1).astype(np.float64)
    res = logme_fit(f, y, max_iter=200, tol=1e-9)
    a, b = math.log(res.alpha[1]), math.log(res.beta[1])
    assert res.evidence[1] * 20 == pytest.approx(float(log_evidence(f, t, a, b)), abs=1e-8)


def test_logme_accepts_torch_and_lists():
    rng = np.random.default_rng(2)
    f, y = blobs(rng, 30, 6, 3, 1.5)
    f32 = torch.tensor(f, dtype=torch.float32)
    expected = logme(f32.numpy().astype(np.float64), y)
    assert logme(f32, torch.tensor(y)) == expected
    assert logme(f32.tolist(), y.tolist()) == expected


# ------------------------------------------------------------------------------------ Ledoit-Wolf and H-score

@pytest.mark.parametrize("n, d", [(50, 6), (9, 20), (30, 1), (3, 3)])
def test_ledoit_wolf_matches_sklearn(n, d):
    rng = np.random.default_rng(n + d)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 3.0, size=d) + 5.0
    x[:, 0] += 0.5 * x[:, -1]  # correlated columns
    cov, shrinkage = ledoit_wolf(x)
    ref_cov, ref_shrinkage = sk_covariance.ledoit_wolf(x)
    assert shrinkage == pytest.approx(ref_shrinkage, abs=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-10, atol=1e-12)


def test_hscore_hand_worked_cases():
    # D = 1: no shrinkage (delta = 0), S = 1, between-class covariance (2*1 + 2*1)/(N - 1) = 4/3.
    assert hscore_shrinkage([[-1.0], [-1.0], [1.0], [1.0]], [0, 0, 1, 1]) == pytest.approx(4 / 3, rel=1e-12)
    # D = 2, worked by hand: S = diag(1/2, 2), mu = 5/4, d2 = 9/16, b2 = (34 - 4 * 17/4)/(16 * 2) = 17/32,
    # delta = 17/18, cov_alpha = diag(21.75, 23.25)/18; class means +-(1/2, 1) give
    # sum n_c mu_c mu_c^T = [[1, 2], [2, 4]], over N - 1 = 3; times (1 - delta) = 1/18.
    x = [[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0], [0.0, -2.0]]
    assert ledoit_wolf(x)[1] == pytest.approx(17 / 18, rel=1e-12)
    assert hscore_shrinkage(x, [0, 0, 1, 1]) == pytest.approx((1 / 21.75 + 4 / 23.25) / 3, rel=1e-12)


def paper_hscore(f, y):
    """The published estimator, spelled out with scikit-learn: LedoitWolf on centred features, np.cov of
    the class-mean features, pinv(rcond=1e-15), times (1 - shrinkage)."""
    f = f - f.mean(axis=0)
    lw = sk_covariance.LedoitWolf().fit(f)
    g = np.zeros_like(f)
    for c in range(y.max() + 1):
        g[y == c] = f[y == c].mean(axis=0)
    between = np.atleast_2d(np.cov(g, rowvar=False))
    return float(np.trace(np.linalg.pinv(lw.covariance_, rcond=1e-15) @ ((1 - lw.shrinkage_) * between)))


@pytest.mark.parametrize("n, d, c", [(60, 8, 3), (12, 20, 4), (40, 1, 2)])
def test_hscore_matches_the_paper_formula(n, d, c):
    rng = np.random.default_rng(n * d)
    f, y = blobs(rng, n, d, c, 1.0)
    assert hscore_shrinkage(f, y) == pytest.approx(paper_hscore(f, y), rel=1e-9)
    assert score("hscore", f, y) == hscore_shrinkage(f, y)
    # Invariant to a shift of the features and to renaming the classes.
    perm = rng.permutation(c)
    assert hscore_shrinkage(f + 3.0, perm[y]) == pytest.approx(hscore_shrinkage(f, y), rel=1e-9)


# ------------------------------------------------------------------------------------ weighted tau

def scipy_tau(x, y):
    return float(scipy_stats.weightedtau(x, y).statistic)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["continuous", "ties", "joint-ties", "int-vs-float"])
def test_weighted_tau_matches_scipy(seed, kind):
    rng = np.random.default_rng(seed)
    n = [2, 7, 25, 60][seed]
    if kind == "continuous":
        x = rng.normal(size=n)
        y = x + rng.normal(size=n)
    elif kind == "ties":
        x, y = rng.integers(0, 4, size=n).astype(np.float64), rng.integers(0, 3, size=n).astype(np.float64)
    elif kind == "joint-ties":  # repeated (x, y) pairs: scipy's tie-break order decides their weights
        base = rng.normal(size=(max(1, n // 3), 2)).round(1)
        x, y = base[rng.integers(0, len(base), size=n)].T
    else:
        x, y = rng.integers(0, 5, size=n), rng.normal(size=n).round(1)
    ours, ref = weighted_kendall_tau(x, y), scipy_tau(x, y)
    assert (math.isnan(ours) and math.isnan(ref)) or ours == pytest.approx(ref, abs=1e-12)


def test_weighted_tau_known_values():
    assert weighted_kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert weighted_kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Worked by hand: weights 1, 1/2, 1/3 by importance; pairs weigh 5/6, 4/3 (concordant), 3/2 (discordant).
    assert weighted_kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(2 / 11, rel=1e-12)
    # scipy's documented example.
    assert weighted_kendall_tau([12, 2, 1, 12, 2], [1, 4, 7, 1, 0]) == pytest.approx(-0.56694968153682723, rel=1e-12)
    assert math.isnan(weighted_kendall_tau([3, 3, 3], [1, 2, 3])) and math.isnan(scipy_tau([3, 3, 3], [1, 2, 3]))


# ------------------------------------------------------------------------------------ registry and bad input

def test_registry():
    assert set(ESTIMATORS) == {"logme", "hscore"}
    with pytest.raises(UserError, match=r"unknown transferability estimator 'logm': choose from hscore, logme"
                                        r".*Did you mean: logme"):
        score("logm", [[0.0], [1.0]], [0, 1])


@pytest.mark.parametrize("features, labels, match", [
    ([1.0, 2.0, 3.0], [0, 1, 0], r"features must be a 2-D \(N, D\) array, got shape \(3,\)"),
    ([[1.0, 2.0]], [0], r"at least 2 rows"),
    ([[1.0], [float("nan")], [2.0]], [0, 1, 0], r"1 NaN/inf values \(rows 1\)"),
    ([["a"], ["b"]], [0, 1], r"features must be real numbers"),
    ([[1.0], [2.0, 3.0]], [0, 1], r"features could not be read as an array"),
    ([[1.0], [2.0], [3.0]], [0, 1], r"got 2 labels for 3 rows"),
    ([[1.0], [2.0]], [0.0, 1.0], r"labels must be integer class ids"),
    ([[1.0], [2.0]], [[0], [1]], r"labels must be a 1-D array"),
    ([[1.0], [2.0]], [-1, 0], r"negative ids -1"),
    ([[1.0], [2.0], [3.0]], [0, 2, 2], r"class\(es\) 1 have no samples: remap"),
    ([[1.0], [2.0]], [0, 0], r"single class"),
])
@pytest.mark.parametrize("name", ["logme", "hscore"])
def test_bad_input_says_what_is_wrong(name, features, labels, match):
    with pytest.raises(UserError, match=match):
        score(name, features, labels)


def test_bad_options_and_degenerate_input():
    with pytest.raises(UserError, match="max_iter must be a positive integer"):
        logme([[1.0], [2.0]], [0, 1], max_iter=0)
    with pytest.raises(UserError, match="tol must be a finite number"):
        logme([[1.0], [2.0]], [0, 1], tol=-1.0)
    with pytest.raises(UserError, match="features are all zero"):
        logme(np.zeros((4, 3)), [0, 1, 0, 1])
    with pytest.raises(UserError, match="need at least 2 pairs"):
        weighted_kendall_tau([1.0], [2.0])
    with pytest.raises(UserError, match="x and y must pair up, got 2 and 3"):
        weighted_kendall_tau([1, 2], [1, 2, 3])
    with pytest.raises(UserError, match=r"y contains NaN/inf at positions 1"):
        weighted_kendall_tau([1, 2], [1, float("nan")])
