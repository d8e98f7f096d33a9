"""Ignite glue every task shares: handlers, iteration helpers, metrics, MLflow helpers."""

from echocare.engines.distributed import gather_rows
from echocare.engines.handlers import (
    BestModelState,
    EncoderExporter,
    EvaluationReport,
    MLflowArtifactLogger,
    PretrainPredictionWriter,
    ReconstructionPanelWriter,
    ResumeError,
    SamplerEpochSetter,
    UniqueNames,
    find_mlflow_handler,
    find_resume_checkpoint,
    item_source,
    write_panel,
)
from echocare.engines.iteration import bf16_autocast, plain_tensor, unwrap_ddp
from echocare.engines.metrics import MeanOfOutput

__all__ = [
    "EncoderExporter",
    "EvaluationReport",
    "MLflowArtifactLogger",
    "MeanOfOutput",
    "PretrainPredictionWriter",
    "ReconstructionPanelWriter",
    "SamplerEpochSetter",
    "UniqueNames",
    "bf16_autocast",
    "find_mlflow_handler",
    "find_resume_checkpoint",
    "gather_rows",
    "item_source",
    "plain_tensor",
    "unwrap_ddp",
    "write_panel",
]
