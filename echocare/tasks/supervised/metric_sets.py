"""The metric set of each bundle kind, as Ignite metrics for MONAI evaluators, named as in
docs/architecture.md ("Metric names").

MONAI's ``SupervisedEvaluator`` takes one key metric (which picks the best checkpoint) and
a dict of additional ones; these functions give both halves from the bundle's classes.
"""

from __future__ import annotations

from collections.abc import Sequence

from ignite.metrics import Metric

from echocare.engines.metrics import MeanOfOutput
from echocare.tasks.supervised.classification_scoring import ClassificationScore
from echocare.tasks.supervised.segmentation_scoring import class_key

__all__ = ["classification_metrics", "segmentation_metrics"]


def segmentation_metrics(class_names: Sequence[str], key_metric: bool) -> dict[str, Metric]:
    """``{"mean_dice"}`` (the key metric) or the others: ``mean_nsd``, ``dice_<class>`` and
    ``nsd_<class>`` for every foreground class (``class_names[1:]``). Each is the mean over
    items of the per-item score that :class:`~echocare.tasks.supervised.SegmentationScored` stores."""
    if key_metric:
        return {"mean_dice": MeanOfOutput(key="mean_dice")}
    names = ["mean_nsd"] + [f"{kind}_{class_key(c)}" for c in class_names[1:] for kind in ("dice", "nsd")]
    return {name: MeanOfOutput(key=name) for name in names}


def classification_metrics(num_classes: int, key_metric: bool) -> dict[str, Metric]:
    """Two classes: key ``auc``; others ``f1``, ``accuracy``, ``sensitivity``, ``specificity``
    (at the Youden cut-off) and ``macro_f1``. More classes: key ``accuracy``; others
    ``macro_f1`` and ``balanced_accuracy``."""
    if int(num_classes) == 2:
        key, others = "auc", ["f1", "accuracy", "sensitivity", "specificity", "macro_f1"]
    else:
        key, others = "accuracy", ["macro_f1", "balanced_accuracy"]
    names = [key] if key_metric else others
    return {name: ClassificationScore(name) for name in names}
