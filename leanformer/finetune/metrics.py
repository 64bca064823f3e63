"""Classification metrics as GLUE reports them: accuracy, F1 of the positive class, Matthews correlation.

All take predicted and true label ids (equal-length sequences of ints). No scikit-learn needed; the
formulas agree with ``sklearn.metrics`` (``f1_score`` binary, ``matthews_corrcoef``), tested on known cases.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def _check(preds: Sequence[int], labels: Sequence[int]) -> None:
    if len(preds) != len(labels):
        raise ValueError(f"{len(preds)} predictions for {len(labels)} labels")
    if not labels:
        raise ValueError("no examples to score")


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Share of exact matches."""
    _check(preds, labels)
    return sum(int(p == y) for p, y in zip(preds, labels)) / len(labels)


def f1_binary(preds: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 of the class ``positive`` (GLUE's MRPC and QQP): 2TP / (2TP + FP + FN); 0 when all three are 0."""
    _check(preds, labels)
    tp = sum(1 for p, y in zip(preds, labels) if p == positive and y == positive)
    fp = sum(1 for p, y in zip(preds, labels) if p == positive and y != positive)
    fn = sum(1 for p, y in zip(preds, labels) if p != positive and y == positive)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation coefficient (GLUE's CoLA), in its multi-class form (Gorodkin 2004):

        MCC = (c·s − Σ_k p_k t_k) / √((s² − Σ_k p_k²)(s² − Σ_k t_k²))

    c correct predictions, s examples, p_k / t_k how often class k is predicted / true. For two classes it
    equals (TP·TN − FP·FN) / √((TP+FP)(TP+FN)(TN+FP)(TN+FN)). 0 when the denominator is 0 (one class only).
    """
    _check(preds, labels)
    s = len(labels)
    c = sum(int(p == y) for p, y in zip(preds, labels))
    pk, tk = Counter(preds), Counter(labels)
    classes = set(pk) | set(tk)
    cov_pt = c * s - sum(pk[k] * tk[k] for k in classes)
    cov_pp = s * s - sum(pk[k] ** 2 for k in classes)
    cov_tt = s * s - sum(tk[k] ** 2 for k in classes)
    denom = math.sqrt(cov_pp * cov_tt)
    return cov_pt / denom if denom else 0.0


def classification_metrics(preds: Sequence[int], labels: Sequence[int], num_labels: int) -> dict[str, float]:
    """``accuracy`` and ``mcc`` always; ``f1`` (of label id 1) when there are two labels."""
    out = {"accuracy": accuracy(preds, labels), "mcc": matthews(preds, labels)}
    if num_labels == 2:
        out["f1"] = f1_binary(preds, labels)
    return out
