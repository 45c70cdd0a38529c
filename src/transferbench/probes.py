"""Evaluation protocols on frozen (cached) features: the field's linear probe and weighted kNN.

This module owns two pure-tensor protocols, run on whatever device the features are on:

* Multinomial logistic regression, the Kornblith et al. (2019) / Ericsson et al. (ssl-transfer) protocol:
  an L2 penalty picked on the validation split from 45 log-spaced values, then refit on train+val and
  tested once (``fit_logreg``, ``logreg_protocol``).
* Weighted kNN, the DINO protocol: cosine similarity on L2-normalised features, the k nearest bank items
  vote with weight exp(sim / T) (``knn_predict``, ``knn_protocol``).

Nothing here reads files or models; callers pass feature and label tensors.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import UserError

log = logging.getLogger(__name__)

# ssl-transfer's grid, torch.logspace(-6, 5, 45), read as weight decay wd with scikit-learn's C = 1 / wd.
DEFAULT_WDS: tuple[float, ...] = tuple(float(v) for v in torch.logspace(-6, 5, 45, dtype=torch.float64))
DEFAULT_KS: tuple[int, ...] = (10, 20, 100, 200)
DEFAULT_T = 0.07

# Convergence of one L-BFGS fit (details in _lbfgs): stop when the next quasi-Newton step would move the training
# logits by <= LOGREG_TOL of their RMS size, or after LOGREG_MAX_ITER iterations. At 1e-3 the whole 45-penalty
# path took ~6 passes over the data per penalty, and val accuracies stayed within 0.1% of scikit-learn run to
# tol=1e-9 (5,000 x 128 synthetic features); 1e-4 costs ~3x the passes for half that gap.
LOGREG_TOL = 1e-3
LOGREG_MAX_ITER = 100
_HISTORY = 10        # L-BFGS memory (curvature pairs), as in scipy's default
_ARMIJO_C1 = 1e-4    # sufficient-decrease constant of the backtracking line search
_MAX_BACKTRACKS = 10  # shrinks t below 1e-3: a quasi-Newton step failing that far is noise


# --------------------------------------------------------------------------------------------- checks

def _features(x: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise UserError(f"{name} must be a torch.Tensor of shape (N, D), got {type(x).__name__}")
    if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise UserError(f"{name} must be a non-empty 2-D feature tensor (N, D), got shape {tuple(x.shape)}")
    # Half-precision features are common in caches; the solvers need float32 at least.
    x = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if not bool(torch.isfinite(x).all()):
        raise UserError(f"{name} contains NaN or infinite values; recompute or clean the cached features")
    return x


def _labels(y: torch.Tensor, n: int, num_classes: int, name: str) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.ndim != 1:
        raise UserError(f"{name} must be a 1-D integer label tensor, got "
                        f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise UserError(f"{name} must hold integer class indices, got dtype {y.dtype}")
    if y.shape[0] != n:
        raise UserError(f"{name} has {y.shape[0]} labels but its features have {n} rows")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= num_classes:
        raise UserError(f"{name} holds labels in [{lo}, {hi}] but num_classes={num_classes}: "
                        f"labels must lie in [0, {num_classes - 1}]")
    return y.long()


def _num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise UserError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return num_classes


def _splits(num_classes: int, **splits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Check (x, y) pairs given as name_x=..., name_y=...; all on the first split's device and dtype."""
    num_classes = _num_classes(num_classes)
    out: dict[str, torch.Tensor] = {}
    device = dtype = dim = None
    for key, x in splits.items():
        if not key.endswith("_x"):
            continue
        x = _features(x, key)
        if device is None:
            device, dtype, dim = x.device, x.dtype, x.shape[1]
        if x.shape[1] != dim:
            raise UserError(f"{key} has {x.shape[1]} feature dims but train_x has {dim}; all splits must come "
                            "from the same backbone layer")
        out[key] = x.to(device=device, dtype=dtype)
        ykey = key[:-2] + "_y"
        out[ykey] = _labels(splits[ykey], x.shape[0], num_classes, ykey).to(device)
    return out


def _wd(wd: float) -> float:
    try:
        wd = float(wd)
    except (TypeError, ValueError):
        raise UserError(f"weight decay wd must be a positive number, got {wd!r}") from None
    if not math.isfinite(wd) or wd <= 0:
        raise UserError(f"weight decay wd must be positive and finite (scikit-learn C = 1/wd), got {wd!r}")
    return wd


# ----------------------------------------------------------------------------- logistic regression

class _LogregProblem:
    """mean cross-entropy + lam/2 ||W||^2 on one (x, y) split, with the pieces L-BFGS needs.

    This is scikit-learn's objective C * sum(CE) + 1/2 ||W||^2 divided by C * N (so lam = wd / N): the same
    minimiser, with values of order 1 that float32 can resolve. Two exact reformulations make it cheap:

    * x is centred. The bias is unpenalised, so logits (x - mu) W^T + b' are the same model with
      b = b' - W mu, but the bias no longer couples to the weights, which conditions the problem.
    * L-BFGS works in the eigenbasis V of the feature covariance S (coordinates U = W V; ||U|| = ||W||, so
      the penalty is unchanged) and starts each quasi-Newton step from the preconditioner
      diag(1 / (a s_j + lam)), a = 1/C being the softmax curvature at uniform predictions. That is the
      Hessian of the objective near W = 0, so steps are close to Newton steps from the first iteration:
      raw deep features are strongly correlated and badly scaled, and plain L-BFGS crawls on them.

    The same eigendecomposition makes the convergence test cheap: the RMS change of the training logits
    under a step u is sqrt(mean_c sum_j s_j u_cj^2 + b_c^2), no pass over x needed (see logit_rms).
    Neither use needs the exact covariance, so it may be estimated (covariance_basis) or borrowed.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                 basis: tuple[torch.Tensor, torch.Tensor] | None = None):
        self.n, self.d = x.shape
        self.c = num_classes
        self.dtype, self.device = x.dtype, x.device
        self.mean = x.mean(0)
        self.xc = x - self.mean
        self.y = y
        # On CPU a chunk of x (2^23 values, 32 MB in float32) is reused from cache between the logits and
        # the gradient product: measured ~2-3x faster than two whole passes, as streaming x is the cost.
        self.chunk = self.n if x.device.type == "cuda" else max(256, (1 << 23) // self.d)
        self.evals, self.evecs = self.covariance_basis() if basis is None else basis
        self.curv = 1.0 / num_classes

    def covariance_basis(self, max_rows: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues and eigenvectors of the feature covariance, estimated on at most max_rows rows.

        Only the preconditioner and the stopping metric use it, so an estimate is enough, and an evenly
        strided subset makes the O(N D^2) product (the slowest step of setup at 50k x 1280) ~3x cheaper.
        """
        rows = self.xc[:: max(1, -(-self.n // max_rows))]
        cov = (rows.T @ rows).double() / rows.shape[0]
        evals, evecs = torch.linalg.eigh(cov)  # float64: a float32 eigh smears the small eigenvalues
        return evals.clamp_min(0).to(self.dtype), evecs.to(self.dtype)

    # parameters travel as theta = [U | b'] of shape (C, D + 1)
    def theta_from(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        weight = weight.to(self.device, self.dtype)
        bias_c = bias.to(self.device, self.dtype) + weight @ self.mean
        return torch.cat([weight @ self.evecs, bias_c[:, None]], 1)

    def weight_bias(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W, b) in the original (uncentred) feature space: logits = x @ W.T + b."""
        weight = theta[:, :-1] @ self.evecs.T
        bias = theta[:, -1] - weight @ self.mean
        return weight, bias - bias.mean()  # softmax ignores a shift; zero-mean bias, as scikit-learn has

    def precond(self, lam: float) -> torch.Tensor:
        return torch.cat([1.0 / (self.curv * self.evals + lam), self.evals.new_full((1,), 1.0 / self.curv)])

    def logit_rms(self, step: torch.Tensor) -> float:
        """RMS change of the training logits under a parameter step (C, D + 1) in these coordinates."""
        # x is centred and V diagonalises its covariance, so E_x (x . u)^2 = sum_j s_j u_j^2, no cross terms.
        per_class = (step[:, :-1] ** 2) @ self.evals + step[:, -1] ** 2
        return math.sqrt(float(per_class.mean()))

    def loss_grad(self, theta: torch.Tensor, lam: float) -> tuple[float, torch.Tensor]:
        weight = theta[:, :-1] @ self.evecs.T
        bias = theta[:, -1]
        gw = torch.zeros_like(weight)
        gb = torch.zeros_like(bias)
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        for xs, ys in zip(self.xc.split(self.chunk), self.y.split(self.chunk)):
            # Softmax in float64 (it is only (chunk, C)): under weak penalties training data is often
            # separated, per-sample losses are log(1 + 1e-10)-small, and float32 rounds them to 0, which
            # leaves the line search a staircase to walk on. Few whole-chunk ops: each pays a thread sync.
            logp = torch.log_softmax(torch.addmm(bias, xs, weight.T).double(), 1)
            loss -= logp.gather(1, ys[:, None]).sum()
            p = logp.exp_()
            p.scatter_add_(1, ys[:, None], p.new_full((len(ys), 1), -1.0))  # d CE / d logits = p - onehot
            p = p.to(self.dtype)
            gw.addmm_(p.T, xs)
            gb += p.sum(0)
        u = theta[:, :-1]
        f = loss.item() / self.n + 0.5 * lam * float((u.double() ** 2).sum())
        grad = torch.cat([(gw / self.n) @ self.evecs + lam * u, (gb / self.n)[:, None]], 1)
        return f, grad


class _LbfgsState:
    """Iterate, value, gradient and curvature history: kept between fits along the penalty path."""

    def __init__(self, theta: torch.Tensor):
        self.theta = theta
        self.lam: float | None = None
        self.f = math.nan
        self.grad: torch.Tensor | None = None
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def set_lam(self, prob: _LogregProblem, lam: float) -> None:
        if self.lam == lam and self.grad is not None:
            return
        if self.grad is None:
            self.f, self.grad = prob.loss_grad(self.theta, lam)
        else:
            # The penalty is the only lam-dependent term and is quadratic, so value, gradient and the stored
            # curvature pairs (y += shift * s) move to the new lam exactly without another pass over x:
            # the next fit starts with a warm iterate AND a warm quasi-Newton history. Bias is unpenalised.
            shift = lam - self.lam
            u = self.theta[:, :-1]
            self.f += 0.5 * shift * float((u.double() ** 2).sum())
            self.grad = self.grad.clone()
            self.grad[:, :-1] += shift * u
            kept = []
            for s, y in self.pairs:
                y = y.clone()
                y[:, :-1] += shift * s[:, :-1]
                if float((s * y).sum()) > 1e-12 * float(s.norm() * y.norm()):
                    kept.append((s, y))
            self.pairs = kept
        self.lam = lam


def _lbfgs_direction(g: torch.Tensor, h: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]
                     ) -> torch.Tensor:
    """-H g by the two-loop recursion; H0 is the preconditioner h scaled by the newest pair's curvature."""
    q = g.clone()
    alphas = []
    for s, y in reversed(pairs):
        rho = 1.0 / float((s * y).sum())
        a = rho * float((s * q).sum())
        q -= a * y
        alphas.append((a, rho))
    gamma = 1.0
    if pairs:
        s, y = pairs[-1]
        gamma = float((s * y).sum()) / float((y * h * y).sum())
    r = gamma * h * q
    for (s, y), (a, rho) in zip(pairs, reversed(alphas)):
        r += (a - rho * float((y * r).sum())) * s
    return -r


def _lbfgs(prob: _LogregProblem, state: _LbfgsState, lam: float, max_iter: int, tol: float) -> tuple[int, str]:
    """Minimise prob's objective at lam from state (updated in place).

    Convergence: the quasi-Newton step d (the L-BFGS estimate of the way to the optimum) would change the
    training logits by <= tol times their own size, both root-mean-square over samples and classes:
    rms(X d) <= tol * rms(X (theta + d)). Measured on logits, it does not depend on the features' scale,
    and unlike a gradient test it does not stop early where the objective is flat (weak penalties), which is
    where a warm-started path otherwise "converges" without moving.
    Returns (iterations, status) with status "converged", "max_iter", or "stalled" (the line search found
    no decrease: working precision ran out before tol).
    """
    state.set_lam(prob, lam)
    h = prob.precond(lam)
    for it in range(max_iter + 1):
        g = state.grad
        d = _lbfgs_direction(g, h, state.pairs)
        gd = float((g * d).sum())
        if gd >= 0:  # lost descent through round-off: restart from the preconditioned gradient
            state.pairs.clear()
            d = -h * g
            gd = float((g * d).sum())
        # Relative to the logits' own spread: under strong penalties logits are tiny, and an absolute test
        # there would accept a model that is still far off.
        if prob.logit_rms(d) <= tol * max(prob.logit_rms(state.theta + d), 1e-12):
            return it, "converged"
        if it == max_iter:
            return it, "max_iter"
        found = _line_search(prob, state, d, gd, lam)
        if found is None and state.pairs:
            # A poor quasi-Newton direction (stale history): retry once along the preconditioned gradient.
            state.pairs.clear()
            d = -h * g
            found = _line_search(prob, state, d, float((g * d).sum()), lam)
        if found is None:
            return it, "stalled"  # no step passes even when tiny: working precision ran out before tol
        theta_new, f_new, g_new = found
        s, y = theta_new - state.theta, g_new - g
        if float((s * y).sum()) > 1e-12 * float(s.norm() * y.norm()):
            state.pairs.append((s, y))
            del state.pairs[:-_HISTORY]
        state.theta, state.f, state.grad = theta_new, f_new, g_new
    return max_iter, "max_iter"  # unreachable: the loop returns


def _line_search(prob: _LogregProblem, state: _LbfgsState, d: torch.Tensor, gd: float, lam: float
                 ) -> tuple[torch.Tensor, float, torch.Tensor] | None:
    """Backtrack from the quasi-Newton step t = 1; return (theta, f, grad) at the accepted point, or None.

    The objective is strictly convex, so any accepted step has s.y > 0 and a Wolfe curvature test buys
    nothing. Sufficient decrease is Armijo's test or, where f is flat to working precision (decreases of
    ~1e-9 on f ~ 1e-3 under weak penalties), Hager & Zhang's approximate-Wolfe test, which reads the
    slope (accurate) instead of differences of f (noise).
    """
    t, f0 = 1.0, state.f
    f_noise = 16 * torch.finfo(prob.dtype).eps * abs(f0)
    for _ in range(_MAX_BACKTRACKS):
        theta_new = state.theta + t * d
        f_new, g_new = prob.loss_grad(theta_new, lam)
        if not math.isfinite(f_new):
            t *= 0.1
            continue
        slope = float((g_new * d).sum())  # d f(theta + t d) / dt at t; gd at t = 0
        if f_new <= f0 + _ARMIJO_C1 * t * gd or (f_new <= f0 + f_noise and slope <= -0.8 * gd):
            return theta_new, f_new, g_new
        # Zero of the slope's secant between 0 and t (f is convex along d), kept within [0.1 t, 0.5 t].
        t_sec = t * gd / (gd - slope) if slope > gd else 0.1 * t
        t = min(max(t_sec, 0.1 * t), 0.5 * t)
    return None


def fit_logreg(x: torch.Tensor, y: torch.Tensor, num_classes: int, wd: float,
               init: tuple[torch.Tensor, torch.Tensor] | None = None, max_iter: int = LOGREG_MAX_ITER,
               tol: float = LOGREG_TOL) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial L2 logistic regression on fixed features; scikit-learn's model for C = 1 / wd.

    Minimises C * sum_i CE(x_i W^T + b, y_i) + 1/2 ||W||_F^2 with C = 1 / wd (bias unpenalised), which is
    scikit-learn's ``LogisticRegression(C=1/wd)`` (multinomial, lbfgs) objective, so the same wd gives the
    same model. No feature scaling happens here (centring is internal and exact; see _LogregProblem).

    Full-batch L-BFGS in torch on x's device, in x's precision (half precision is promoted to float32; the
    per-sample softmax runs in float64). Stops when the next quasi-Newton step would change the training
    logits by <= ``tol`` of their RMS size, or after ``max_iter`` iterations (logged as a warning).

    Args:
        x: (N, D) features. y: (N,) integer labels in [0, num_classes).
        wd: the penalty; scikit-learn's C is 1 / wd.
        init: optional (weight (C, D), bias (C,)) to start from (warm start).
    Returns:
        (weight (C, D), bias (C,)) with logits = x @ weight.T + bias; bias is shifted to zero mean.
    """
    _max_iter(max_iter)
    wd, tol = _wd(wd), _tol(tol)
    data = _splits(num_classes, train_x=x, train_y=y)
    _require_all_classes(data["train_y"], num_classes, "y")
    prob = _LogregProblem(data["train_x"], data["train_y"], num_classes)
    state = _LbfgsState(_init_theta(prob, init))
    n_iter, status = _lbfgs(prob, state, wd / prob.n, max_iter, tol)
    if status != "converged":
        log.warning("fit_logreg(wd=%g): L-BFGS %s after %d iterations before reaching tol=%g",
                    wd, status, n_iter, tol)
    return prob.weight_bias(state.theta)


def _max_iter(max_iter: int) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise UserError(f"max_iter must be a non-negative integer, got {max_iter!r}")


def _tol(tol: float) -> float:
    try:
        tol = float(tol)
    except (TypeError, ValueError):
        raise UserError(f"tol must be a non-negative number, got {tol!r}") from None
    if not tol >= 0:
        raise UserError(f"tol must be a non-negative number, got {tol!r}")
    return tol


def _require_all_classes(y: torch.Tensor, num_classes: int, name: str) -> None:
    missing = (torch.bincount(y, minlength=num_classes) == 0).nonzero().flatten().tolist()
    if missing:
        raise UserError(f"{name} has no example of class(es) {missing[:10]}{' ...' if len(missing) > 10 else ''}"
                        f" out of num_classes={num_classes}: the unpenalised bias of a class never seen in "
                        "training diverges to -inf. Fix the split or num_classes.")


def _init_theta(prob: _LogregProblem, init: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    if init is None:
        return torch.zeros(prob.c, prob.d + 1, dtype=prob.dtype, device=prob.device)
    try:
        weight, bias = init
    except (TypeError, ValueError):
        raise UserError("init must be a (weight, bias) pair of tensors") from None
    if tuple(weight.shape) != (prob.c, prob.d) or tuple(bias.shape) != (prob.c,):
        raise UserError(f"init must be (weight ({prob.c}, {prob.d}), bias ({prob.c},)), got "
                        f"({tuple(weight.shape)}, {tuple(bias.shape)})")
    return prob.theta_from(weight, bias)


def _standardizer(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std per feature, as scikit-learn's StandardScaler (population std; 1 where it is 0)."""
    mean = x.mean(0)
    std = x.var(0, unbiased=False).sqrt()
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).double().mean())


def logreg_protocol(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                    test_x: torch.Tensor, test_y: torch.Tensor, num_classes: int,
                    wds: Sequence[float] | None = None, progress: bool = False, standardize: bool = False,
                    max_iter: int = LOGREG_MAX_ITER, tol: float = LOGREG_TOL) -> dict:
    """The Kornblith / ssl-transfer linear probe: choose the L2 penalty on val, refit on train+val, test once.

    Penalty convention: ``wds`` are weight decays with scikit-learn's C = 1 / wd, exactly as ssl-transfer
    (linear.py: ``wd_range = torch.logspace(-6, 5, 45)``, ``C = 1. / wd``); the default is that grid. The
    objective is C * sum CE + 1/2 ||W||^2 (bias unpenalised), as in ``fit_logreg``, so the refit on
    train+val at the same wd has more data against the same penalty, as in ssl-transfer.

    Path: fits go from the strongest penalty to the weakest, each warm-started from the previous solution
    (and its L-BFGS curvature history). The chosen wd is the one with the highest val accuracy; ties go to
    the smallest wd, which is what ssl-transfer's scan (ascending wd, strict ``>``) picks.
    Refit: the chosen wd on train+val, warm-started from the path's solution at that wd, tested once.

    Features: raw by default, as ssl-transfer (which feeds raw backbone features to scikit-learn);
    ``standardize=True`` z-scores each feature with the fitting split's mean and std (train for the path,
    train+val for the refit). Either way ``weight``/``bias`` act on the ORIGINAL features:
    logits = x @ weight.T + bias (any standardisation is folded in), ready to install as a linear head.

    Returns a dict: chosen_wd, val_curve [{"wd", "val_acc", "n_iter", "status"}] in path order (status as
    in _lbfgs: "converged", "max_iter" or "stalled"), test_logits (N_test, C), test_acc, weight (C, D),
    bias (C,), fit_time_s (path + refit, seconds), refit_n_iter, refit_status.
    """
    _max_iter(max_iter)
    tol = _tol(tol)
    data = _splits(num_classes, train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y,
                   test_x=test_x, test_y=test_y)
    _require_all_classes(data["train_y"], num_classes, "train_y")
    grid = DEFAULT_WDS if wds is None else tuple(wds)
    if not grid:
        raise UserError("wds is empty: give at least one weight decay (default: 45 values in [1e-6, 1e5])")
    path = sorted({_wd(w) for w in grid}, reverse=True)  # strong -> weak: each fit starts near the next one
    start = time.perf_counter()

    def standardized(x: torch.Tensor, stats: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        return x if stats is None else (x - stats[0]) / stats[1]

    def fold(weight: torch.Tensor, bias: torch.Tensor, stats) -> tuple[torch.Tensor, torch.Tensor]:
        # logits = ((x - m) / s) W^T + b = x (W / s)^T + (b - (W / s) m)
        if stats is None:
            return weight, bias
        weight = weight / stats[1]
        return weight, bias - weight @ stats[0]

    stats = _standardizer(data["train_x"]) if standardize else None
    prob = _LogregProblem(standardized(data["train_x"], stats), data["train_y"], num_classes)
    val_x = standardized(data["val_x"], stats)
    state = _LbfgsState(_init_theta(prob, None))
    curve, solutions = [], {}
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(path) + 1, desc="logreg path", leave=False)
    for wd in path:
        n_iter, status = _lbfgs(prob, state, wd / prob.n, max_iter, tol)
        weight, bias = prob.weight_bias(state.theta)
        acc = _accuracy(torch.addmm(bias, val_x, weight.T), data["val_y"])
        curve.append({"wd": wd, "val_acc": acc, "n_iter": n_iter, "status": status})
        solutions[wd] = (weight, bias)
        if bar is not None:
            bar.set_postfix(wd=f"{wd:.2g}", val_acc=f"{acc:.4f}", iters=n_iter)
            bar.update()
    best = max(range(len(curve)), key=lambda i: (curve[i]["val_acc"], -curve[i]["wd"]))
    chosen = curve[best]["wd"]
    capped = [c["wd"] for c in curve if c["status"] == "max_iter"]
    if capped:
        log.info("logreg path: %d of %d fits stopped at max_iter=%d (largest such wd: %g)",
                 len(capped), len(curve), max_iter, max(capped))

    # Refit on train+val. Start from the path's solution at the chosen wd, mapped to the refit's space.
    trval_x = torch.cat([data["train_x"], data["val_x"]])
    trval_y = torch.cat([data["train_y"], data["val_y"]])
    stats_tv = _standardizer(trval_x) if standardize else None
    # The path's covariance basis preconditions the refit too: train is most of train+val.
    refit = _LogregProblem(standardized(trval_x, stats_tv), trval_y, num_classes, basis=(prob.evals, prob.evecs))
    del trval_x, prob, state  # the centred copies of the features are the memory that matters here
    init_w, init_b = fold(*solutions[chosen], stats)
    if stats_tv is not None:  # express the warm start on the refit's standardised features
        init_b = init_b + init_w @ stats_tv[0]
        init_w = init_w * stats_tv[1]
    state = _LbfgsState(refit.theta_from(init_w, init_b))
    n_iter, status = _lbfgs(refit, state, chosen / refit.n, max_iter, tol)
    if status != "converged":
        log.warning("logreg refit (wd=%g): L-BFGS %s after %d iterations before reaching tol=%g",
                    chosen, status, n_iter, tol)
    weight, bias = fold(*refit.weight_bias(state.theta), stats_tv)
    if bar is not None:
        bar.update()
        bar.close()
    fit_time = time.perf_counter() - start
    test_logits = torch.addmm(bias, data["test_x"], weight.T)
    return {
        "chosen_wd": chosen,
        "val_curve": curve,
        "test_logits": test_logits,
        "test_acc": _accuracy(test_logits, data["test_y"]),
        "weight": weight,
        "bias": bias,
        "fit_time_s": fit_time,
        "refit_n_iter": n_iter,
        "refit_status": status,
    }


# ------------------------------------------------------------------------------------------------ kNN

def _knn_args(k_values: Sequence[int], T: float, batch_size: int | None) -> None:
    for k in k_values:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UserError(f"k must be a positive integer, got {k!r}")
    if not isinstance(T, (int, float)) or isinstance(T, bool) or not math.isfinite(T) or T <= 0:
        raise UserError(f"temperature T must be a positive number, got {T!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or batch_size < 1):
        raise UserError(f"batch_size must be a positive integer or None, got {batch_size!r}")


def _check_overflow(T: float, k: int, dtype: torch.dtype) -> None:
    # Votes are exp(sim / T) <= exp(1 / T); a class score sums up to k of them and must stay finite.
    log_max = math.log(torch.finfo(dtype).max)
    if 1.0 / T + math.log(k) >= log_max:
        raise UserError(f"temperature T={T} is too small: k={k} votes of up to exp(1/T) overflow {dtype} "
                        f"(scores would be inf); use T >= {1.0 / (log_max - math.log(k)):.4g} or float64 features")


def _default_batch(n_bank: int) -> int:
    # A query batch's (B, N_bank) similarity block is the peak memory: cap it near 2^24 entries (64 MB fp32).
    return max(1, (1 << 24) // n_bank)


def _knn_scores_multi(bank_n: torch.Tensor, bank_y: torch.Tensor, query_n: torch.Tensor, num_classes: int,
                      ks: Sequence[int], T: float, batch_size: int) -> dict[int, torch.Tensor]:
    """Vote scores for every k in ks (already clipped to the bank size), one top-k per query batch.

    topk at the largest k returns neighbours sorted by similarity, so the first k columns are the k
    nearest for every smaller k: one similarity matmul and one top-k serve the whole k sweep.
    """
    kmax = max(ks)
    out = {k: torch.zeros(query_n.shape[0], num_classes, dtype=query_n.dtype, device=query_n.device)
           for k in ks}
    for lo in range(0, query_n.shape[0], batch_size):
        sims = query_n[lo:lo + batch_size] @ bank_n.T
        top_sim, top_idx = sims.topk(kmax, dim=1, largest=True, sorted=True)
        del sims
        votes = (top_sim / T).exp()
        labels = bank_y[top_idx]
        for k in ks:
            out[k][lo:lo + batch_size].scatter_add_(1, labels[:, :k], votes[:, :k])
    return out


def knn_predict(bank_x: torch.Tensor, bank_y: torch.Tensor, query_x: torch.Tensor, num_classes: int, k: int,
                T: float = DEFAULT_T, batch_size: int | None = None) -> torch.Tensor:
    """DINO's weighted kNN: class scores (N_query, C) for each query against a labelled memory bank.

    Features are L2-normalised; similarity is cosine; each of the k most similar bank items votes for its
    class with weight exp(sim / T); a class's score is the sum of its votes (argmax = prediction). A k
    larger than the bank is clipped to the bank size. Queries are processed ``batch_size`` at a time
    (default: about 2^24 / N_bank) so memory stays bounded by a (batch, N_bank) similarity block.
    """
    _knn_args([k], T, batch_size)
    data = _splits(num_classes, bank_x=bank_x, bank_y=bank_y)
    query = _features(query_x, "query_x")
    if query.shape[1] != data["bank_x"].shape[1]:
        raise UserError(f"query_x has {query.shape[1]} feature dims but bank_x has {data['bank_x'].shape[1]}")
    bank_n = F.normalize(data["bank_x"], dim=1)
    query_n = F.normalize(query.to(bank_n.device, bank_n.dtype), dim=1)
    k_used = _clip_k(k, bank_n.shape[0])
    _check_overflow(float(T), k_used, bank_n.dtype)
    batch = batch_size or _default_batch(bank_n.shape[0])
    return _knn_scores_multi(bank_n, data["bank_y"], query_n, num_classes, [k_used], float(T), batch)[k_used]


class KNNClassifier(torch.nn.Module):
    """knn_predict as a module over feature batches, its memory bank normalised once (not per batch)."""

    def __init__(self, bank_x: torch.Tensor, bank_y: torch.Tensor, num_classes: int, k: int, T: float = DEFAULT_T):
        super().__init__()
        _knn_args([k], T, None)
        data = _splits(num_classes, bank_x=bank_x, bank_y=bank_y)
        self.register_buffer("bank", F.normalize(data["bank_x"], dim=1))
        self.register_buffer("labels", data["bank_y"])
        self.num_classes, self.k, self.T = num_classes, _clip_k(k, len(bank_y)), float(T)
        _check_overflow(self.T, self.k, self.bank.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = F.normalize(x.to(self.bank.dtype), dim=1)
        batch = _default_batch(self.bank.shape[0])
        return _knn_scores_multi(self.bank, self.labels, query, self.num_classes, [self.k], self.T, batch)[self.k]


def _clip_k(k: int, n_bank: int) -> int:
    if k > n_bank:
        log.info("kNN: k=%d exceeds the memory bank (%d items); using k=%d", k, n_bank, n_bank)
    return min(k, n_bank)


def knn_protocol(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 test_x: torch.Tensor, test_y: torch.Tensor, num_classes: int,
                 ks: Sequence[int] = DEFAULT_KS, T: float = DEFAULT_T, batch_size: int | None = None) -> dict:
    """The DINO kNN probe with k chosen on validation.

    The training set is the memory bank for both steps: each k in ``ks`` is scored on val, the best val
    accuracy wins (ties go to the earlier k in ``ks``), and test is scored once with that k. A k larger than
    the bank is clipped to the bank size; ``val_curve`` keeps the requested ``k`` and the ``k_used``.
    (DINO itself reports every k on the test set; choosing k on val keeps test untouched.)

    Returns a dict: chosen_k (the winning entry of ``ks``, so knn_predict(..., chosen_k) reproduces the test
    scores; the k actually used is min(chosen_k, bank size), its val_curve ``k_used``), val_curve
    [{"k", "k_used", "val_acc"}] in ``ks`` order, test_scores (N_test, C), test_acc.
    """
    ks = tuple(ks)
    if not ks:
        raise UserError("ks is empty: give at least one k (default: 10, 20, 100, 200)")
    _knn_args(ks, T, batch_size)
    data = _splits(num_classes, train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y,
                   test_x=test_x, test_y=test_y)
    bank_n = F.normalize(data["train_x"], dim=1)
    batch = batch_size or _default_batch(bank_n.shape[0])
    used = {k: _clip_k(k, bank_n.shape[0]) for k in ks}
    _check_overflow(float(T), max(used.values()), bank_n.dtype)
    val_scores = _knn_scores_multi(bank_n, data["train_y"], F.normalize(data["val_x"], dim=1), num_classes,
                                   sorted(set(used.values())), float(T), batch)
    curve = [{"k": k, "k_used": used[k], "val_acc": _accuracy(val_scores[used[k]], data["val_y"])} for k in ks]
    best = max(range(len(curve)), key=lambda i: (curve[i]["val_acc"], -i))
    chosen, k_used = curve[best]["k"], curve[best]["k_used"]
    test_scores = _knn_scores_multi(bank_n, data["train_y"], F.normalize(data["test_x"], dim=1), num_classes,
                                    [k_used], float(T), batch)[k_used]
    return {
        "chosen_k": chosen,
        "val_curve": curve,
        "test_scores": test_scores,
        "test_acc": _accuracy(test_scores, data["test_y"]),
    }
