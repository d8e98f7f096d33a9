"""Ignite glue: iteration functions, handlers, MLflow helpers."""

from echocare.engines.handlers import (
    BestModelState,
    EncoderExporter,
    EvaluationReport,
    MLflowArtifactLogger,
    PretrainPredictionWriter,
    ReconstructionPanelWriter,
    ResumeError,
    SamplerEpochSetter,
    find_mlflow_handler,
    find_resume_checkpoint,
    write_panel,
)
from echocare.engines.pretrain import PretrainEvalIteration, PretrainIteration, mask_generator
from echocare.engines.handlers import UniqueNames, item_source
from echocare.engines.supervised import (
    ClassificationFigureWriter,
    ClassificationPredictionWriter,
    RunFileWriter,
    SegmentationOverlayWriter,
    SegmentationPredictionWriter,
    is_rank0,
)
from echocare.engines.regression import RegressionFigureWriter, RegressionPredictionWriter
