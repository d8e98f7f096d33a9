"""Ignite glue: iteration functions, handlers, MLflow helpers."""

from echocare.engines.handlers import EncoderExporter, EvaluationReport, MLflowArtifactLogger, PretrainPredictionWriter, ReconstructionPanelWriter, SamplerEpochSetter, UniqueNames, find_mlflow_handler, find_resume_checkpoint, item_source, write_panel

__all__ = ["EncoderExporter", "EvaluationReport", "MLflowArtifactLogger", "PretrainPredictionWriter", "ReconstructionPanelWriter", "SamplerEpochSetter", "UniqueNames", "find_mlflow_handler", "find_resume_checkpoint", "item_source", "write_panel"]
