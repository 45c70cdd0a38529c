"""Frozen-feature probes: logistic regression against scikit-learn, kNN against a brute-force loop."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from transferbench.errors import UserError
from transferbench.probes import DEFAULT_WDS, fit_logreg, knn_predict, knn_protocol, logreg_protocol


@pytest.fixture(autouse=True)
def one_thread():
    """These arrays are tiny: with several threads on a shared CPU, each op waits on thread barriers."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from threadpoolctl import threadpool_limits  # comes with scikit-learn; caps its BLAS / OpenMP
    except ImportError:
        yield
    else:
        with threadpool_limits(limits=1):
            yield
    torch.set_num_threads(before)


# Tight solver tolerance where a test compares models, so any difference is the objective's, not the stop's.
TIGHT = 1e-7


def blobs(n: int, d: int = 20, c: int = 4, seed: int = 0, dtype=torch.float64):
    """Overlapping Gaussian classes with badly scaled, offset features (like raw backbone features)."""
    g = torch.Generator().manual_seed(100)  # class means shared by every split
    means = torch.randn(c, d, generator=g, dtype=torch.float64) * 0.8
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, c, (n,), generator=g)
    scale = 1 + torch.arange(d, dtype=torch.float64) / 5
    x = means[y] + torch.randn(n, d, generator=g, dtype=torch.float64) * scale + 3.0
    return x.to(dtype), y


def acc(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).double().mean())


# ------------------------------------------------------------------------------------- logistic regression

@pytest.mark.parametrize("wd", [1e-2, 1.0, 100.0])
def test_fit_logreg_is_sklearns_model_for_c_equal_one_over_wd(wd):
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = blobs(300)
    xt, yt = blobs(200, seed=1)
    clf = sklearn.LogisticRegression(C=1.0 / wd, tol=1e-10, max_iter=10_000).fit(x.numpy(), y.numpy())
    weight, bias = fit_logreg(x, y, 4, wd, tol=TIGHT, max_iter=500)
    # Same objective => same minimiser: coefficients to 1e-4 of their largest entry (measured: ~2e-6).
    coef = torch.from_numpy(clf.coef_)
    assert (weight - coef).abs().max() <= 1e-4 * coef.abs().max()
    assert torch.allclose(bias, torch.from_numpy(clf.intercept_), atol=1e-3)
    sk_acc = float((clf.predict(xt.numpy()) == yt.numpy()).mean())
    assert abs(acc(xt @ weight.T + bias, yt) - sk_acc) <= 1e-3


def test_fit_logreg_float32_default_tolerance_predicts_like_sklearn():
    sklearn = pytest.importorskip("sklearn.linear_model")
    x, y = blobs(300)
    xt, yt = blobs(200, seed=1)
    clf = sklearn.LogisticRegression(C=1.0, tol=1e-10, max_iter=10_000).fit(x.numpy(), y.numpy())
    weight, bias = fit_logreg(x.float(), y, 4, 1.0)  # the production setting: float32, default tol
    assert weight.dtype == torch.float32
    coef = torch.from_numpy(clf.coef_).float()
    assert (weight - coef).abs().max() <= 1e-2 * coef.abs().max()
    sk_acc = float((clf.predict(xt.numpy()) == yt.numpy()).mean())
    assert abs(acc(xt.float() @ weight.T + bias, yt) - sk_acc) <= 1e-3


def test_fit_logreg_warm_start_reaches_the_same_optimum():
    x, y = blobs(300)
    cold = fit_logreg(x, y, 4, 1.0, tol=TIGHT, max_iter=500)
    neighbour = fit_logreg(x, y, 4, 100.0, tol=TIGHT, max_iter=500)  # as along the penalty path
    warm = fit_logreg(x, y, 4, 1.0, init=neighbour, tol=TIGHT, max_iter=500)
    assert (cold[0] - neighbour[0]).abs().max() > 0.1
    assert torch.allclose(cold[0], warm[0], atol=1e-5) and torch.allclose(cold[1], warm[1], atol=1e-4)


def small_splits(dtype=torch.float64):
    return (*blobs(240, d=12, c=3, seed=0, dtype=dtype), *blobs(90, d=12, c=3, seed=1, dtype=dtype),
            *blobs(150, d=12, c=3, seed=2, dtype=dtype))


def test_logreg_protocol_walks_45_penalties_and_picks_the_val_best():
    tr_x, tr_y, va_x, va_y, te_x, te_y = small_splits()
    out = logreg_protocol(tr_x, tr_y, va_x, va_y, te_x, te_y, 3, tol=1e-6)
    curve = out["val_curve"]
    assert len(curve) == 45 == len(DEFAULT_WDS)
    wds = [c["wd"] for c in curve]
    assert wds == sorted(DEFAULT_WDS, reverse=True)  # strong -> weak
    assert math.isclose(wds[0], 1e5) and math.isclose(wds[-1], 1e-6)
    best = max(c["val_acc"] for c in curve)
    assert out["chosen_wd"] == min(c["wd"] for c in curve if c["val_acc"] == best)  # ties: smallest wd
    # The warm-started path gives the cold fit's model: spot-check val accuracy at three penalties.
    for c in curve[5], curve[20], curve[40]:
        w, b = fit_logreg(tr_x, tr_y, 3, c["wd"], tol=TIGHT, max_iter=500)
        assert acc(va_x @ w.T + b, va_y) == pytest.approx(c["val_acc"], abs=1e-9)
    assert out["test_logits"].shape == (150, 3)
    assert out["test_acc"] == pytest.approx(acc(out["test_logits"], te_y))
    assert out["fit_time_s"] > 0


def test_logreg_protocol_refits_on_train_plus_val():
    tr_x, tr_y, va_x, va_y, te_x, te_y = small_splits()
    out = logreg_protocol(tr_x, tr_y, va_x, va_y, te_x, te_y, 3, wds=[0.1, 10.0, 1000.0], tol=TIGHT, max_iter=500)
    wd = out["chosen_wd"]
    on_trval = fit_logreg(torch.cat([tr_x, va_x]), torch.cat([tr_y, va_y]), 3, wd, tol=TIGHT, max_iter=500)
    on_train = fit_logreg(tr_x, tr_y, 3, wd, tol=TIGHT, max_iter=500)
    assert torch.allclose(out["weight"], on_trval[0], atol=1e-5)
    assert torch.allclose(out["bias"], on_trval[1], atol=1e-4)
    assert (out["weight"] - on_train[0]).abs().max() > 1e-2  # the val rows did change the model
    assert torch.allclose(out["test_logits"], te_x @ out["weight"].T + out["bias"])


def test_logreg_protocol_folds_standardisation_into_the_head():
    sk = pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    tr_x, tr_y, va_x, va_y, te_x, te_y = small_splits()
    out = logreg_protocol(tr_x, tr_y, va_x, va_y, te_x, te_y, 3, wds=[0.3, 30.0], standardize=True,
                          tol=TIGHT, max_iter=500)
    # The same pipeline in scikit-learn: scaler fitted on train+val, then C = 1 / chosen wd.
    trval_x, trval_y = torch.cat([tr_x, va_x]).numpy(), torch.cat([tr_y, va_y]).numpy()
    scaler = StandardScaler().fit(trval_x)
    clf = LogisticRegression(C=1.0 / out["chosen_wd"], tol=1e-10, max_iter=10_000)
    clf.fit(scaler.transform(trval_x), trval_y)
    expected = torch.from_numpy(clf.decision_function(scaler.transform(te_x.numpy())))
    # Raw features in, same logits out (up to a per-row shift, which softmax ignores).
    got = te_x @ out["weight"].T + out["bias"]
    assert torch.allclose(got - got.mean(1, keepdim=True), expected - expected.mean(1, keepdim=True), atol=1e-4)
    assert torch.allclose(out["test_logits"], got)
    assert sk is not None


@pytest.mark.parametrize("call, match", [
    (lambda x, y: fit_logreg(x, y + 10, 4, 1.0), "labels in"),
    (lambda x, y: fit_logreg(x, y, 4, 0.0), "positive"),
    (lambda x, y: fit_logreg(x, y, 4, float("nan")), "positive"),
    (lambda x, y: fit_logreg(x[:, :, None], y, 4, 1.0), "2-D"),
    (lambda x, y: fit_logreg(x, y[:-1], 4, 1.0), "labels but"),
    (lambda x, y: fit_logreg(x, y.double(), 4, 1.0), "integer"),
    (lambda x, y: fit_logreg(x.index_fill(0, torch.tensor([3]), float("nan")), y, 4, 1.0), "NaN"),
    (lambda x, y: fit_logreg(x, y.clamp(max=2), 4, 1.0), r"no example of class\(es\) \[3\]"),
    (lambda x, y: fit_logreg(x, y, 1, 1.0), "num_classes"),
    (lambda x, y: logreg_protocol(x, y, x[:, :5], y, x, y, 4), "feature dims"),
    (lambda x, y: logreg_protocol(x, y, x, y, x, y, 4, wds=[]), "wds is empty"),
])
def test_logreg_bad_input_is_a_user_error(call, match):
    x, y = blobs(40)
    with pytest.raises(UserError, match=match):
        call(x, y)


# ------------------------------------------------------------------------------------------------------ kNN

def brute_force_knn(bank_x, bank_y, query_x, num_classes, k, T):
    """DINO's rule written out per query, in float64."""
    bank = [v / np.linalg.norm(v) for v in bank_x.double().numpy()]
    scores = np.zeros((len(query_x), num_classes))
    for i, q in enumerate(query_x.double().numpy()):
        q = q / np.linalg.norm(q)
        sims = sorted(((float(q @ b), j) for j, b in enumerate(bank)), reverse=True)[:k]
        for sim, j in sims:
            scores[i, int(bank_y[j])] += math.exp(sim / T)
    return torch.from_numpy(scores)


def knn_data(seed=0, n_bank=60, n_query=23, d=8, c=3):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n_bank, d, generator=g), torch.randint(0, c, (n_bank,), generator=g),
            torch.randn(n_query, d, generator=g), torch.randint(0, c, (n_query,), generator=g))


@pytest.mark.parametrize("k, T", [(1, 0.07), (7, 0.07), (20, 0.5)])
def test_knn_predict_matches_brute_force(k, T):
    bank_x, bank_y, q_x, _ = knn_data()
    got = knn_predict(bank_x, bank_y, q_x * 3.0, 3, k, T=T, batch_size=4)  # several batches; scale-free
    want = brute_force_knn(bank_x, bank_y, q_x, 3, k, T)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=0)


def test_knn_k_larger_than_bank_is_clipped():
    bank_x, bank_y, q_x, q_y = knn_data(n_bank=15)
    assert torch.equal(knn_predict(bank_x, bank_y, q_x, 3, 1000), knn_predict(bank_x, bank_y, q_x, 3, 15))
    out = knn_protocol(bank_x, bank_y, q_x, q_y, q_x, q_y, 3, ks=(5, 1000))
    assert out["val_curve"][1] == {"k": 1000, "k_used": 15, "val_acc": pytest.approx(out["val_curve"][1]["val_acc"])}
    assert out["chosen_k"] in (5, 1000)  # a requested k; knn_predict clips it the same way
    scores = knn_predict(bank_x, bank_y, q_x, 3, out["chosen_k"])
    assert torch.equal(out["test_scores"], scores)


def test_knn_temperature_trades_the_nearest_neighbour_against_the_crowd():
    # Query (1, 0): one class-0 item at cosine 0.99, three class-1 items at cosine 0.9.
    def at(cos):
        return [cos, math.sqrt(1 - cos * cos)]
    bank_x = torch.tensor([at(0.99), at(0.9), at(0.9), at(0.9)])
    bank_y = torch.tensor([0, 1, 1, 1])
    q = torch.tensor([[1.0, 0.0]])
    sharp = knn_predict(bank_x, bank_y, q, 2, k=4, T=0.07)  # e^(0.99/.07) > 3 e^(0.9/.07): nearest wins
    flat = knn_predict(bank_x, bank_y, q, 2, k=4, T=1.0)    # e^0.99 < 3 e^0.9: the majority wins
    assert sharp.argmax(1).item() == 0 and flat.argmax(1).item() == 1
    assert sharp[0, 0].item() == pytest.approx(math.exp(0.99 / 0.07), rel=1e-5)


def test_knn_protocol_chooses_k_on_val_and_tests_once_with_the_train_bank():
    bank_x, bank_y, q_x, q_y = knn_data(n_bank=80, n_query=40)
    va_x, va_y, te_x, te_y = q_x[:20], q_y[:20], q_x[20:], q_y[20:]
    ks = (1, 3, 10, 30)
    out = knn_protocol(bank_x, bank_y, va_x, va_y, te_x, te_y, 3, ks=ks)
    curve = [acc(knn_predict(bank_x, bank_y, va_x, 3, k), va_y) for k in ks]  # one top-k reused == separate runs
    assert [c["val_acc"] for c in out["val_curve"]] == pytest.approx(curve)
    assert out["chosen_k"] == ks[int(np.argmax(curve))]  # first best k on ties
    assert torch.allclose(out["test_scores"], knn_predict(bank_x, bank_y, te_x, 3, out["chosen_k"]))
    assert out["test_acc"] == pytest.approx(acc(out["test_scores"], te_y))


@pytest.mark.parametrize("kwargs, match", [
    ({"k": 0}, "positive integer"),
    ({"k": 5, "T": 0.0}, "temperature"),
    ({"k": 5, "T": 0.005}, "overflow"),
    ({"k": 5, "batch_size": 0}, "batch_size"),
])
def test_knn_bad_input_is_a_user_error(kwargs, match):
    bank_x, bank_y, q_x, _ = knn_data()
    with pytest.raises(UserError, match=match):
        knn_predict(bank_x, bank_y, q_x, 3, **kwargs)


def test_knn_query_dims_must_match_the_bank():
    bank_x, bank_y, q_x, _ = knn_data()
    with pytest.raises(UserError, match="feature dims"):
        knn_predict(bank_x, bank_y, q_x[:, :4], 3, 5)
