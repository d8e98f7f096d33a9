"""Task metrics that MONAI and Ignite lack."""

from echocare.metrics.classification import (
    CLASSIFICATION_SCORE_NAMES,
    ClassificationScore,
    binary_classification_scores,
    classification_scores,
    confusion_matrix,
    multiclass_classification_scores,
    roc_auc,
    roc_curve,
    youden_threshold,
)
from echocare.metrics.image_quality import (
    BrisqueModel,
    NiqeModel,
    brisque,
    fid,
    fit_brisque_model,
    fit_niqe_model,
    frechet_distance,
    load_brisque_model,
    load_niqe_model,
    niqe,
    piqe,
    psnr,
    ssim,
)
from echocare.metrics.pretrain import AnatomyLevelAccuracy, MeanOfOutput
from echocare.metrics.segmentation import SegmentationScored, class_key, segmentation_scores
from echocare.metrics.regression import (
    REGRESSION_SCORE_NAMES,
    RegressionScore,
    regression_metrics,
    regression_scores,
)
from echocare.metrics.text import FindingsVocabulary, ReportScore, report_metrics, report_scores
from echocare.metrics.sets import classification_metrics, segmentation_metrics

__all__ = [
    "BrisqueModel",
    "NiqeModel",
    "brisque",
    "fid",
    "fit_brisque_model",
    "fit_niqe_model",
    "frechet_distance",
    "load_brisque_model",
    "load_niqe_model",
    "niqe",
    "piqe",
    "psnr",
    "ssim",
    "CLASSIFICATION_SCORE_NAMES",
    "AnatomyLevelAccuracy",
    "ClassificationScore",
    "FindingsVocabulary",
    "MeanOfOutput",
    "ReportScore",
    "REGRESSION_SCORE_NAMES",
    "RegressionScore",
    "SegmentationScored",
    "binary_classification_scores",
    "class_key",
    "classification_metrics",
    "classification_scores",
    "confusion_matrix",
    "multiclass_classification_scores",
    "report_metrics",
    "report_scores",
    "regression_metrics",
    "regression_scores",
    "roc_auc",
    "roc_curve",
    "segmentation_metrics",
    "segmentation_scores",
    "youden_threshold",
]
