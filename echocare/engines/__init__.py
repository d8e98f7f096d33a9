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
from echocare.engines.writers import PredictionWriter, RunFileWriter, is_rank0, iteration_pairs

__all__ = [
    "BestModelState",
    "EncoderExporter",
    "EvaluationReport",
    "MLflowArtifactLogger",
    "MeanOfOutput",
    "PredictionWriter",
    "PretrainPredictionWriter",
    "ReconstructionPanelWriter",
    "ResumeError",
    "RunFileWriter",
    "SamplerEpochSetter",
    "UniqueNames",
    "bf16_autocast",
    "find_mlflow_handler",
    "find_resume_checkpoint",
    "gather_rows",
    "is_rank0",
    "item_source",
    "iteration_pairs",
    "plain_tensor",
    "unwrap_ddp",
    "write_panel",
]
