"""Classification metrics, their files and figures, each against a case small enough to compute by hand."""
from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from transferbench import UserError
from transferbench.metrics import (
    classification_metrics,
    confusion_matrix,
    most_confused_pairs,
    top_k,
    write_confusion_csv,
    write_predictions,
)
from transferbench.plots import confusion_figure, per_class_figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def logits_for(preds: list[int], num_classes: int) -> torch.Tensor:
    """Logits whose argmax is `preds[i]` in row i, the rest of each row distinct so top-k order is known."""
    rows = torch.arange(num_classes, dtype=torch.float32).repeat(len(preds), 1) * -0.1  # 0 > -0.1 > -0.2 ...
    rows[torch.arange(len(preds)), torch.tensor(preds)] = 5.0
    return rows


# Four classes, five images. Class 3 never occurs in the labels; class 2 is never predicted.
#   labels = [0, 0, 1, 1, 2]
#   preds  = [0, 1, 1, 3, 0]   -> correct [T, F, T, F, F]: top1 = 2/5
#   per class: 0 -> 1/2, 1 -> 1/2, 2 -> 0/1, 3 -> None;  mean over present classes = (0.5 + 0.5 + 0) / 3
LABELS = torch.tensor([0, 0, 1, 1, 2])
PREDS = [0, 1, 1, 3, 0]


def test_accuracies_with_an_unlabelled_and_an_unpredicted_class():
    m = classification_metrics(logits_for(PREDS, 4), LABELS)
    assert m["count"] == 5
    assert m["top1"] == pytest.approx(0.4)
    assert m["per_class_acc"][:3] == pytest.approx([0.5, 0.5, 0.0])
    assert m["per_class_acc"][3] is None  # no test image of class 3: no accuracy, not 0
    assert m["mean_per_class_acc"] == pytest.approx(1 / 3)  # class 3 is not averaged in as a 0 or a 1
    assert m["top5"] is None  # 4 classes: top-5 would always be 1
    # Everything is a plain Python value that strict JSON accepts.
    assert all(type(v) in (int, float, list, type(None)) for v in m.values())
    json.dumps(m, allow_nan=False)


def test_top5_none_for_three_classes_and_counted_for_six():
    assert classification_metrics(logits_for([0, 1, 2], 3), torch.tensor([0, 1, 2]))["top5"] is None
    # Six classes; logits_for ranks the non-argmax classes 0 > 1 > 2 > ... so class 5 is always last:
    #   row 0: argmax 0, label 4 -> in the top 5 (0,1,2,3,4);  row 1: argmax 0, label 5 -> 6th, a miss;
    #   row 2: argmax 5, label 5 -> top-1 hit.  top5 = 2/3, top1 = 1/3.
    m = classification_metrics(logits_for([0, 0, 5], 6), torch.tensor([4, 5, 5]))
    assert m["top5"] == pytest.approx(2 / 3)
    assert m["top1"] == pytest.approx(1 / 3)


def test_tied_logits_rank_classes_by_index_like_argmax():
    # Constant logits (a dead model): every class ties, so class i has rank i, as argmax (class 0) implies.
    # Label 0 -> rank 0, a top-1 hit; label 4 -> rank 4, a top-5 hit only: top1 = 1/2, top5 = 1.
    # (Ranking ties the other way round would give ranks 5 and 1: top1 = 0, top5 = 1/2.)
    m = classification_metrics(torch.zeros(2, 6), torch.tensor([0, 4]))
    assert (m["top1"], m["top5"]) == (0.5, 1.0)
    assert (m["per_class_acc"][0], m["per_class_acc"][4]) == (1.0, 0.0)
    assert top_k(torch.zeros(1, 6), k=3)[0].tolist() == [[0, 1, 2]]  # column 0 is the argmax prediction


def test_nll_matches_cross_entropy_and_a_hand_value():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(7, 5, generator=g) * 3, torch.tensor([0, 1, 2, 3, 4, 4, 1])
    expected = F.cross_entropy(logits.double(), labels).item()
    assert classification_metrics(logits, labels)["nll"] == pytest.approx(expected, rel=1e-12)
    # softmax(log p) = p: label 0 with p = 0.5 and label 2 with p = 0.25 -> NLL = (ln 2 + ln 4) / 2.
    p = torch.tensor([[0.5, 0.25, 0.25], [0.5, 0.25, 0.25]])
    assert classification_metrics(p.log(), torch.tensor([0, 2]))["nll"] == pytest.approx(1.5 * math.log(2))


def test_ece_hand_computed_with_two_samples_sharing_a_bin():
    # Two classes, logits = log(p) so the max softmax probability (confidence) is exactly the p chosen.
    # 15 bins of width 1/15, (lo, hi]:
    #   conf 0.90 correct, conf 0.88 wrong -> both in (13/15, 14/15] = (0.867, 0.933]: acc 0.5, mean conf 0.89
    #   conf 0.70 correct                  -> (10/15, 11/15] = (0.667, 0.733]:       acc 1.0, conf 0.70
    #   conf 0.55 wrong                    -> (8/15, 9/15]   = (0.533, 0.600]:       acc 0.0, conf 0.55
    # ECE = 2/4 * |0.5 - 0.89| + 1/4 * |1 - 0.70| + 1/4 * |0 - 0.55| = 0.195 + 0.075 + 0.1375 = 0.4075
    # (per-sample |correct - conf| would give 0.4575 and a single bin 0.2575, so the binning is what is tested).
    p = torch.tensor([[0.90, 0.10], [0.88, 0.12], [0.30, 0.70], [0.55, 0.45]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 1])
    assert classification_metrics(p.log(), labels)["ece"] == pytest.approx(0.4075)


def test_ece_keeps_confidence_exactly_one_in_the_last_bin():
    # Softmax of [100, -100] is 1.0 in float64; wrong, so ECE = |0 - 1| = 1. A [lo, hi) binning would drop it (0).
    m = classification_metrics(torch.tensor([[100.0, -100.0]]), torch.tensor([1]))
    assert m["ece"] == pytest.approx(1.0)


def test_confusion_matrix_and_most_confused_pairs():
    # The case above plus one more image of class 1 predicted as 3, so (1 -> 3) is the largest confusion.
    cm = confusion_matrix(torch.tensor(PREDS + [3]), torch.tensor(LABELS.tolist() + [1]), 4)
    assert cm.dtype == torch.int64
    assert cm.tolist() == [
        [1, 1, 0, 0],
        [0, 1, 0, 2],
        [1, 0, 0, 0],
        [0, 0, 0, 0],  # class 3 has no true image; column 2 is empty because class 2 is never predicted
    ]
    assert most_confused_pairs(cm) == [(1, 3, 2), (0, 1, 1), (2, 0, 1)]  # ties in (true, pred) order
    assert most_confused_pairs(cm, n=1) == [(1, 3, 2)]


def test_top_k_clips_k_to_the_number_of_classes():
    classes, probs = top_k(logits_for([2, 0], 3), k=5)
    assert classes.dtype == torch.int64 and probs.dtype == torch.float32
    assert classes.tolist() == [[2, 0, 1], [0, 1, 2]]
    assert torch.allclose(probs.sum(1), torch.ones(2)) and (probs[:, :-1] >= probs[:, 1:]).all()


def test_predictions_npz_round_trip(tmp_path):
    path = tmp_path / "preds" / "test.npz"
    logits = logits_for([2, 0, 1, 1], 3)
    write_predictions(path, logits, torch.tensor([2, 1, 1, 0]), ["cat", "dog", "ünïcode"], k=5)
    with np.load(path) as z:  # allow_pickle stays False: no object arrays
        assert sorted(z.files) == ["class_names", "label", "topk_classes", "topk_probs"]
        assert z["label"].tolist() == [2, 1, 1, 0]
        assert z["topk_classes"].shape == (4, 3) and z["topk_classes"][:, 0].tolist() == [2, 0, 1, 1]
        assert z["topk_probs"].dtype == np.float32
        np.testing.assert_allclose(z["topk_probs"], torch.softmax(logits, 1).sort(1, descending=True).values, 1e-6)
        assert z["class_names"].tolist() == ["cat", "dog", "ünïcode"]
    assert [p.name for p in path.parent.iterdir()] == ["test.npz"]  # no temporary file left behind


def test_confusion_csv(tmp_path):
    cm = torch.tensor([[3, 1], [0, 2]])
    write_confusion_csv(tmp_path / "cm.csv", cm, ["plain", "with, comma"])
    rows = list(csv.reader(io.StringIO((tmp_path / "cm.csv").read_text())))
    assert rows == [["true\\pred", "plain", "with, comma"], ["plain", "3", "1"], ["with, comma", "0", "2"]]


@pytest.mark.parametrize("call, match", [
    (lambda: classification_metrics(torch.zeros(2, 3), torch.tensor([0, 3])), r"\[0, 3\).*\[3\]"),
    (lambda: classification_metrics(torch.zeros(2, 3), torch.tensor([0, 1, 2])), "3 entries but there are 2"),
    (lambda: classification_metrics(torch.zeros(3), torch.tensor([0, 1, 2])), r"shape \(N, C\)"),
    (lambda: classification_metrics(torch.tensor([[0.0, float("nan")]]), torch.tensor([0])), "NaN or inf"),
    (lambda: classification_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)), "empty"),
    (lambda: classification_metrics(torch.zeros(2, 3), torch.tensor([0.0, 1.0])), "integer class indices"),
    (lambda: confusion_matrix(torch.tensor([0, 5]), torch.tensor([0, 1]), 3), "pred must lie in"),
    (lambda: write_predictions("x.npz", torch.zeros(1, 3), torch.tensor([0]), ["a", "b"]), "2 class names"),
])
def test_bad_input_is_a_user_error_saying_what(call, match):
    with pytest.raises(UserError, match=match):
        call()


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=40)  # low dpi: the test is that it renders, not how it looks
    return buf.getvalue()


def test_figures_for_three_classes_render():
    m = classification_metrics(logits_for(PREDS, 4), LABELS)
    cm = confusion_matrix(torch.tensor(PREDS), LABELS, 4)
    names = ["a", "b", "c", "d"]
    fig = confusion_figure(cm, names, "test")
    assert len(fig.axes[0].images) == 1  # a heatmap, labelled with the class names
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == names
    assert _png(fig).startswith(PNG_MAGIC)
    fig = per_class_figure(m["per_class_acc"], names, "test")
    assert len(fig.axes[0].patches) == 3  # class d has no test image: no bar
    assert _png(fig).startswith(PNG_MAGIC)
    # Three classes exactly (the brief's small case), every class present.
    three = confusion_figure(confusion_matrix(torch.tensor([0, 2, 1]), torch.tensor([0, 1, 1]), 3), names[:3], "t")
    assert _png(three).startswith(PNG_MAGIC)


def test_figures_for_many_classes_switch_layout_and_render():
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(150).repeat(2)
    pred = torch.where(torch.rand(300, generator=g) < 0.7, labels, torch.randint(0, 150, (300,), generator=g))
    cm = confusion_matrix(pred, labels, 150)
    names = [f"class {i}" for i in range(150)]
    fig = confusion_figure(cm, names, "many")
    assert not fig.axes[0].images and len(fig.axes[0].patches) == min(20, len(most_confused_pairs(cm)))
    assert _png(fig).startswith(PNG_MAGIC)
    acc = (cm.diag().double() / cm.sum(1).double()).tolist()
    fig = per_class_figure(acc, names, "many")
    assert len(fig.axes[0].patches) == 30  # 15 worst and 15 best
    assert _png(fig).startswith(PNG_MAGIC)
    # In between (30 < C <= 100) it is still a heatmap, but without the unreadable class names.
    mid = confusion_figure(cm[:50, :50], names[:50], "mid")
    assert len(mid.axes[0].images) == 1 and "class 0" not in [t.get_text() for t in mid.axes[0].get_xticklabels()]
