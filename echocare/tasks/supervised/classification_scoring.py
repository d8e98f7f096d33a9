"""Classification scores (AUC, F1, Youden cut-off, macro-F1, ...) and their Ignite metric.

Plain numpy functions score a whole evaluation set; ``ClassificationScore`` accumulates the
decollated evaluator outputs of an epoch (gathered across processes under DDP) and returns one
of those scores.

Conventions:

- Binary tasks: the positive class is index 1 and scores are read from its probability.
  ``auc`` is the ROC AUC with ties counted half (the Mann-Whitney U statistic over
  n_pos * n_neg). ``f1``, ``accuracy``, ``sensitivity``, ``specificity``,
  ``balanced_accuracy`` and ``macro_f1`` are taken at the Youden cut-off (see
  ``youden_threshold``): predict positive when ``prob >= threshold``.
- Multi-class tasks: predictions are the argmax of the probabilities; ``macro_f1`` is the
  mean of per-class F1 over the classes that occur in the labels or in the predictions;
  ``balanced_accuracy`` is the mean recall over the classes that occur in the labels.
- A ratio whose denominator is zero is NaN (e.g. sensitivity with no positive label).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import ignite.distributed as idist
import numpy as np
import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced

from echocare.engines.distributed import gather_rows

__all__ = [
    "CLASSIFICATION_SCORE_NAMES",
    "ClassificationScore",
    "binary_classification_scores",
    "classification_scores",
    "confusion_matrix",
    "multiclass_classification_scores",
    "roc_auc",
    "roc_curve",
    "youden_threshold",
]

#: names ``ClassificationScore`` accepts (keys of ``classification_scores``).
CLASSIFICATION_SCORE_NAMES = (
    "auc",
    "f1",
    "accuracy",
    "sensitivity",
    "specificity",
    "macro_f1",
    "balanced_accuracy",
)

#: cut-off used when the Youden index is undefined (only one class in the labels).
DEGENERATE_THRESHOLD = 0.5


def _np(x: Any, dtype: Any = None) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _binary_inputs(prob_pos: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _np(prob_pos, np.float64).reshape(-1)
    y = _np(labels).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{p.size} probabilities but {y.size} labels")
    if y.size and not np.isin(y, (0, 1)).all():
        raise ValueError("binary labels must be 0 or 1")
    return p, y.astype(bool)


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den else float("nan")


def confusion_matrix(pred_labels: Any, labels: Any, num_classes: int) -> np.ndarray:
    """Counts of (true, predicted) pairs.

    Args:
        pred_labels: (N,) predicted class indices.
        labels: (N,) true class indices.
        num_classes: C; indices must lie in ``[0, C)``.

    Returns:
        (C, C) int64 array, rows = true class, columns = predicted class.
    """
    p = _np(pred_labels).reshape(-1).astype(np.int64)
    y = _np(labels).reshape(-1).astype(np.int64)
    if p.shape != y.shape:
        raise ValueError(f"{p.size} predictions but {y.size} labels")
    for a, what in ((p, "pred_labels"), (y, "labels")):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"{what} has class indices outside [0, {num_classes})")
    return np.bincount(y * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def roc_auc(prob_pos: Any, labels: Any) -> float:
    """ROC AUC of scores ``prob_pos`` (N,) for binary ``labels`` (N,) in {0, 1}.

    Equals the probability that a random positive scores higher than a random negative, ties
    counted half (Mann-Whitney U / (n_pos * n_neg)), computed from mid-ranks. NaN when only one
    class is present.
    """
    p, y = _binary_inputs(prob_pos, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # mid-ranks (1-based): tied scores share the mean of the ranks they span
    uniq, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    midrank = upper - (counts - 1) / 2.0
    ranks = midrank[inverse]
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _roc_counts(p: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(tp, fp, thresholds) of "positive when ``p >= t``" for every distinct score, decreasing."""
    order = np.argsort(-p, kind="stable")
    p_sorted, y_sorted = p[order], y[order]
    # last index of each run of equal scores: all samples scoring >= t are positive at t
    last = np.r_[np.nonzero(np.diff(p_sorted))[0], p_sorted.size - 1] if p_sorted.size else np.array([], int)
    return np.cumsum(y_sorted)[last], np.cumsum(~y_sorted)[last], p_sorted[last]


def roc_curve(prob_pos: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points of the rule "positive when ``prob >= t``" for every distinct score ``t``.

    Args:
        prob_pos: (N,) scores of the positive class.
        labels: (N,) in {0, 1}.

    Returns:
        ``(fpr, tpr, thresholds)``, each (K + 1,): thresholds are the K distinct scores in
        decreasing order preceded by ``+inf`` (nothing positive, the point (0, 0)); the last
        point is (1, 1). ``fpr`` (``tpr``) is NaN throughout when there is no negative
        (positive) label.
    """
    p, y = _binary_inputs(prob_pos, labels)
    tp, fp, thresholds = _roc_counts(p, y)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    tpr = np.r_[0.0, tp] / n_pos if n_pos else np.full(tp.size + 1, np.nan)
    fpr = np.r_[0.0, fp] / n_neg if n_neg else np.full(fp.size + 1, np.nan)
    return fpr.astype(np.float64), tpr.astype(np.float64), np.r_[np.inf, thresholds].astype(np.float64)


def youden_threshold(prob_pos: Any, labels: Any) -> float:
    """Cut-off maximising Youden's J = sensitivity + specificity - 1 over the ROC points.

    Candidates are the distinct observed scores; the rule is "positive when ``prob >=
    threshold``". When several candidates reach the maximal J the highest one is returned
    (the most conservative positive call among equally good ones). The lowest score always
    gives J = 0, so the maximum is >= 0 and always attained at an observed score.

    Returns ``DEGENERATE_THRESHOLD`` (0.5) when the labels hold only one class (J undefined),
    and NaN for empty input.
    """
    p, y = _binary_inputs(prob_pos, labels)
    if p.size == 0:
        return float("nan")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return DEGENERATE_THRESHOLD
    tp, fp, thresholds = _roc_counts(p, y)
    # J * n_pos * n_neg in exact integers: with float rates, equal J values (2/3 - 0 and
    # 1 - 1/3) can differ in the last bit and break the tie rule
    j = tp.astype(np.int64) * n_neg - fp.astype(np.int64) * n_pos
    # thresholds decrease along the curve: the first maximum is the highest threshold
    return float(thresholds[int(np.argmax(j))])


def _binary_counts(pred: np.ndarray, y: np.ndarray) -> tuple[int, int, int, int]:
    tp = int(np.sum(pred & y))
    fp = int(np.sum(pred & ~y))
    fn = int(np.sum(~pred & y))
    tn = int(np.sum(~pred & ~y))
    return tp, fp, fn, tn


def _per_class_f1(cm: np.ndarray) -> np.ndarray:
    """F1 per class from a confusion matrix; NaN where the class has no true and no predicted sample."""
    tp = np.diag(cm).astype(np.float64)
    den = 2 * tp + (cm.sum(0) - tp) + (cm.sum(1) - tp)  # 2TP + FP + FN
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, 2 * tp / den, np.nan)


def _macro_f1(cm: np.ndarray) -> float:
    f1 = _per_class_f1(cm)
    return float(np.nanmean(f1)) if np.isfinite(f1).any() else float("nan")


def _balanced_accuracy(cm: np.ndarray) -> float:
    support = cm.sum(1)
    present = support > 0
    return float(np.mean(np.diag(cm)[present] / support[present])) if present.any() else float("nan")


def binary_classification_scores(prob_pos: Any, labels: Any) -> dict[str, float]:
    """Scores of a binary classifier from positive-class probabilities.

    Args:
        prob_pos: (N,) probability (or any score, higher = more positive) of class 1.
        labels: (N,) true labels in {0, 1}.

    Returns:
        ``auc``; at the Youden cut-off ``threshold``: ``f1`` (of the positive class),
        ``accuracy``, ``sensitivity``, ``specificity``, ``balanced_accuracy`` (their mean) and
        ``macro_f1`` (mean F1 of the two classes). Floats.

    Degenerate input: with one class only, ``auc`` is NaN, the cut-off is 0.5, and the other
    scores are computed at 0.5 with zero-denominator ratios NaN (so with only negatives,
    ``sensitivity`` is NaN and ``specificity`` is the fraction predicted negative). Empty input
    gives NaN everywhere.
    """
    p, y = _binary_inputs(prob_pos, labels)
    threshold = youden_threshold(p, y)
    nan = float("nan")
    if p.size == 0:
        return {k: nan for k in ("auc", "threshold", "f1", "accuracy", "sensitivity", "specificity",
                                 "balanced_accuracy", "macro_f1")}
    pred = p >= threshold
    tp, fp, fn, tn = _binary_counts(pred, y)
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    cm = np.array([[tn, fp], [fn, tp]])
    return {
        "auc": roc_auc(p, y),
        "threshold": float(threshold),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, p.size),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "balanced_accuracy": _balanced_accuracy(cm),
        "macro_f1": _macro_f1(cm),
    }


def multiclass_classification_scores(probs: Any, labels: Any) -> dict[str, float]:
    """Scores of a C-class classifier from its (N, C) probabilities and (N,) class indices.

    Returns:
        ``accuracy`` (of the argmax), ``macro_f1`` (mean per-class F1 over the classes present
        in the labels or in the predictions; a class with neither is left out of the mean
        rather than counted as 0 or 1), ``balanced_accuracy`` (mean per-class recall over the
        classes present in the labels). Floats; NaN for empty input.
    """
    pr = _np(probs, np.float64)
    if pr.ndim != 2:
        raise ValueError(f"probs must be (N, C), got shape {pr.shape}")
    y = _np(labels).reshape(-1).astype(np.int64)
    if y.size != pr.shape[0]:
        raise ValueError(f"{pr.shape[0]} predictions but {y.size} labels")
    cm = confusion_matrix(np.argmax(pr, axis=1), y, pr.shape[1])
    return {
        "accuracy": _ratio(np.trace(cm), cm.sum()),
        "macro_f1": _macro_f1(cm),
        "balanced_accuracy": _balanced_accuracy(cm),
    }


def classification_scores(probs: Any, labels: Any, class_names: Sequence[str] | None = None) -> dict[str, float]:
    """Scores under the metric names of docs/architecture.md, chosen by the number of classes.

    Args:
        probs: (N, C) class probabilities; (N,) or (N, 1) is read as the positive-class
            probability of a binary task.
        labels: (N,) class indices.
        class_names: optional; when given its length must be C (checked, catches a config
            mismatch between the head and the label set).

    Returns:
        C <= 2: ``binary_classification_scores`` of ``probs[:, 1]`` (``auc``, ``f1``,
        ``accuracy``, ``sensitivity``, ``specificity``, ``balanced_accuracy``, ``macro_f1``,
        ``threshold``; all at the Youden cut-off). C > 2: ``multiclass_classification_scores``
        (``accuracy``, ``macro_f1``, ``balanced_accuracy``).
    """
    pr = _np(probs, np.float64)
    if pr.ndim == 1 or (pr.ndim == 2 and pr.shape[1] == 1):
        pr = pr.reshape(-1)
        num_classes = 2
    elif pr.ndim == 2:
        num_classes = pr.shape[1]
    else:
        raise ValueError(f"probs must be (N, C) or (N,), got shape {pr.shape}")
    if class_names is not None and len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    if pr.ndim == 1:
        return binary_classification_scores(pr, labels)
    if num_classes == 2:
        return binary_classification_scores(pr[:, 1], labels)
    return multiclass_classification_scores(pr, labels)


def _identity(output: Any) -> Any:
    return output


def _label_index(label: Any) -> int:
    """Class index from an int, a 0-d / 1-element tensor, or a one-hot vector (argmax)."""
    t = torch.as_tensor(label).detach().reshape(-1)
    if t.numel() == 1:
        return int(t[0])
    return int(torch.argmax(t))


class ClassificationScore(Metric):
    """One classification score over an epoch, as an Ignite metric.

    Reads ``engine.state.output`` as MONAI leaves it after decollation: a list of per-item
    dicts with ``pred`` = (C,) class probabilities (already softmaxed) and ``label`` = class
    index (int, 0-d or 1-element tensor; a longer vector is read as one-hot). A
    ``(y_pred (B, C), y (B,))`` pair is accepted too. Predictions of every process are gathered
    under DDP; ``compute()`` returns ``classification_scores(probs, labels)[name]``.

    After ``compute()`` the gathered arrays are in ``probs`` (N, C) and ``labels`` (N,)
    (also via ``arrays()``), for the evaluation report's ROC curve and confusion matrix.

    Args:
        name: one of ``CLASSIFICATION_SCORE_NAMES``.
    """

    def __init__(self, name: str, output_transform: Callable = _identity, device: str | torch.device = "cpu") -> None:
        if name not in CLASSIFICATION_SCORE_NAMES:
            raise ValueError(f"unknown classification score {name!r}; valid: {', '.join(CLASSIFICATION_SCORE_NAMES)}")
        self.name = name
        self.probs: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._preds: list[torch.Tensor] = []
        self._labels: list[int] = []

    @reinit__is_reduced
    def update(self, output: Any) -> None:
        if isinstance(output, (tuple, list)) and len(output) == 2 and all(isinstance(o, torch.Tensor) for o in output):
            y_pred, y = output
            items = [{"pred": p, "label": t} for p, t in zip(y_pred, y)]
        else:
            items = output
        for item in items:
            pred = torch.as_tensor(item["pred"]).detach().reshape(-1).to(self._device, torch.float64)
            self._preds.append(pred)
            self._labels.append(_label_index(item["label"]))

    def _gathered(self) -> tuple[np.ndarray, np.ndarray]:
        if self._preds:
            sizes = {p.numel() for p in self._preds}
            if len(sizes) != 1:
                raise ValueError(f"predictions have different numbers of classes: {sorted(sizes)}")
            probs = torch.stack(self._preds)
        else:
            probs = torch.zeros((0, 0), dtype=torch.float64, device=self._device)
        labels = torch.tensor(self._labels, dtype=torch.long, device=self._device)
        if idist.get_world_size() > 1:
            # a process may have seen no item: agree on C first so that the shapes match
            num_classes = int(idist.all_reduce(torch.tensor(probs.shape[1], device=self._device), op="MAX"))
            if probs.shape[1] != num_classes:
                probs = probs.reshape(0, num_classes)
            probs, labels = gather_rows(probs), gather_rows(labels)
        return probs.cpu().numpy(), labels.cpu().numpy()

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``(probs (N, C), labels (N,))`` of the whole epoch, gathered across processes.

        Collective under DDP: call it on every process (``compute()`` already does and caches
        the result in ``probs`` / ``labels``).
        """
        self.probs, self.labels = self._gathered()
        return self.probs, self.labels

    def compute(self) -> float:
        probs, labels = self.arrays()
        if labels.size == 0:
            return float("nan")
        scores = classification_scores(probs, labels)
        if self.name not in scores:
            raise ValueError(
                f"{self.name!r} is not defined for {probs.shape[1]} classes; available: {', '.join(sorted(scores))}"
            )
        return float(scores[self.name])
