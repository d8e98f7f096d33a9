"""Ignite handlers shared by EchoCare bundles."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointSaver, MLFlowHandler
from PIL import Image

from echocare.datasets.samplers import ResumableSampler
from echocare.datasets.shard_stream import ShardStream
from echocare.datasets.skipping import skipped_row
from echocare.networks.encoder import encoder_of, encoder_state_dict

__all__ = [
    "BestModelState",
    "EncoderExporter",
    "EvaluationReport",
    "MLflowArtifactLogger",
    "PretrainPredictionWriter",
    "ReconstructionPanelWriter",
    "ResumeError",
    "SamplerEpochSetter",
    "find_resume_checkpoint",
    "find_mlflow_handler",
    "run_summary",
]

logger = logging.getLogger(__name__)

_ITERATION_IN_NAME = re.compile(r"(?:iteration|epoch)=(\d+)")


class ResumeError(RuntimeError):
    """``resume`` was asked for but no checkpoint can be resumed from: the message names the
    models folder and each checkpoint's problem."""


def _checkpoint_problem(path: Path) -> str | None:
    """Why a training checkpoint cannot be resumed from (cut short by a crash while it was
    being written, not a checkpoint, no trainer state), or None when it can."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or foreign files raise many types
        return f"cannot be read ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
    try:
        int(state["trainer"]["iteration"])
    except Exception:
        return "holds no trainer state (not a training checkpoint of this bundle)"
    return None


def find_resume_checkpoint(models_dir: str | os.PathLike[str], resume: bool) -> str | None:
    """The readable checkpoint holding the latest trainer iteration in ``models_dir`` when ``resume``.

    Candidates are the interval checkpoints (``checkpoint_iteration=N.pt``) and the final
    one (``checkpoint_final.pt``). A file that cannot be read (a crash while it was being
    written) is skipped with a warning, falling back to the previous one. Returns None
    when ``resume`` is false; when it is true and there is no checkpoint at all, logs a
    warning and returns None (a fresh start).

    Raises:
        ResumeError: ``resume`` is true and there are checkpoints but none can be read:
            training from scratch would silently drop them, so the message names
            ``models_dir`` and each file's problem.
    """
    if not resume:
        return None
    named = []
    for path in Path(models_dir).glob("checkpoint*.pt"):
        match = _ITERATION_IN_NAME.search(path.name)
        named.append((int(match.group(1)) if match else -1, path))
    problems = []
    for _, path in sorted(named, reverse=True):
        problem = _checkpoint_problem(path)
        if problem is None:
            return str(path)
        logger.warning("resume: skipping checkpoint %s: it %s", path, problem)
        problems.append(f"{path.name} {problem}")
    if problems:
        raise ResumeError(
            f"{models_dir}: cannot resume, none of its {len(problems)} checkpoints can be read: {'; '.join(problems)}. "
            "Move them away to train from scratch, or point output_dir at the run to resume."
        )
    logger.warning("resume requested but %s holds no checkpoint: starting from scratch", models_dir)
    return None


class BestModelState:
    """The best validation result of a training run, kept in its checkpoints so that a resumed
    run replaces ``models/model.pt`` only with a better model.

    What decides that ``model.pt`` is replaced lives in memory: the key-metric ``Checkpoint``
    of the validator's ``CheckpointSaver(save_key_metric=True)`` (its saved ``(priority,
    file)`` list: a new score is written only when it beats the saved one) and the
    evaluator's ``state.best_metric`` / ``best_metric_epoch`` (what MONAI logs as the best).
    A new process starts with both empty, so without this object the first validation
    after ``--resume true`` overwrote ``model.pt`` even with a worse model. Listed in the
    bundle's ``checkpoint_dict``, it is saved with the trainer and restored by the
    ``CheckpointLoader``::

        checkpoint_dict:
          ...
          best_model: "$echocare.engines.BestModelState(@validate#evaluator)"

    Args:
        evaluator: the validation engine (MONAI ``Evaluator``).
        saver: its ``CheckpointSaver`` of the best model; by default the one attached to
            ``evaluator`` with ``save_key_metric=True``.
    """

    def __init__(self, evaluator: Engine, saver: CheckpointSaver | None = None) -> None:
        self.evaluator = evaluator
        self.saver = saver

    def _key_metric_checkpoint(self) -> Any | None:
        """The ``ignite.handlers.Checkpoint`` that writes the best model, or None."""
        if self.saver is None:
            for handler, _, _ in self.evaluator._event_handlers.get(Events.EPOCH_COMPLETED, []):
                owner = getattr(handler, "__self__", None)
                if isinstance(owner, CheckpointSaver) and owner._key_metric_checkpoint is not None:
                    self.saver = owner
                    break
        return getattr(self.saver, "_key_metric_checkpoint", None)

    def state_dict(self) -> dict[str, Any]:
        """``best_metric`` (float), ``best_metric_epoch`` (int, -1 before any validation) and
        ``saved``: the best-model checkpoint's ``(priority, file name)`` pairs (the priority is
        the key metric, negated for ``key_metric_negative_sign``)."""
        checkpoint = self._key_metric_checkpoint()
        saved = checkpoint.state_dict()["_saved"] if checkpoint is not None else []
        return {
            "best_metric": float(self.evaluator.state.best_metric),
            "best_metric_epoch": int(self.evaluator.state.best_metric_epoch),
            "saved": [[float(priority), str(name)] for priority, name in saved],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.evaluator.state.best_metric = float(state["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])
        checkpoint = self._key_metric_checkpoint()
        if checkpoint is not None:
            checkpoint.load_state_dict({"_saved": [(float(p), str(n)) for p, n in state["saved"]]})
        if int(state["best_metric_epoch"]) >= 0:
            logger.info(
                "resume: best validation %.6g at epoch %d; the best model is replaced only by a better one",
                float(state["best_metric"]), int(state["best_metric_epoch"]),
            )


class SamplerEpochSetter:
    """Before each epoch, point a :class:`ResumableSampler` (or a
    :class:`~echocare.datasets.ShardStream`, which orders itself) at the epoch and the first batch to run.

    After ``CheckpointLoader`` restored iteration ``e * L + k``, Ignite resumes epoch ``e + 1``
    at its ``k``-th iteration; the sampler then skips the ``k`` batches already trained on.
    """

    def __init__(self, sampler: ResumableSampler | ShardStream) -> None:
        self.sampler = sampler

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        epoch_length = engine.state.epoch_length or 0
        done_in_epoch = engine.state.iteration - (engine.state.epoch - 1) * epoch_length
        self.sampler.set_epoch(engine.state.epoch, start_batch=done_in_epoch)


def _to_uint8(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    array = torch.as_tensor(image).detach().float().clamp(0, 1).cpu().numpy()
    return (np.moveaxis(array, 0, -1) * 255.0 + 0.5).astype(np.uint8)


def write_panel(rows: Sequence[Sequence[torch.Tensor]], path: str | os.PathLike[str], gap: int = 4) -> Path:
    """Write a grid PNG: one row per image, one column per (3, H, W) tensor in the row."""
    tiles = [[_to_uint8(t) for t in row] for row in rows]
    height = max(t.shape[0] for row in tiles for t in row)
    width = max(t.shape[1] for row in tiles for t in row)
    columns = max(len(row) for row in tiles)
    canvas = np.full(
        (len(tiles) * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, dtype=np.uint8
    )
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            y, x = r * (height + gap), c * (width + gap)
            canvas[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path


class ReconstructionPanelWriter:
    """After each validation run, write the first batch's original / masked / reconstruction panel.

    Files: ``<output_dir>/panels/epoch_<EEEE>.png`` (one row per image) and a copy
    ``latest.png``. Expects the decollated outputs of ``PretrainEvalIteration``.
    """

    def __init__(self, output_dir: str | os.PathLike[str], num_images: int = 8) -> None:
        self.panel_dir = Path(output_dir) / "panels"
        self.num_images = num_images
        self.written: list[Path] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), self)

    def __call__(self, engine: Engine) -> None:
        items = engine.state.output[: self.num_images]
        rows = [[item["image"], item["masked"], item["reconstruction"]] for item in items]
        path = write_panel(rows, self.panel_dir / f"epoch_{engine.state.epoch:04d}.png")
        write_panel(rows, self.panel_dir / "latest.png")
        self.written.append(path)


def item_source(item: dict[str, Any], default: str = "") -> str:
    """The input file of a decollated item: its ``filename`` field, else the image's meta."""
    if item.get("filename"):
        return str(item["filename"])
    image = item.get("image")
    if isinstance(image, (str, os.PathLike)):
        return str(image)
    meta = getattr(image, "meta", None) or {}
    return str(meta.get("filename_or_obj") or default)


class UniqueNames:
    """Output file stems named after inputs: ``<stem>`` (``<stem>_frame0003`` for a frame of
    a multi-frame input), with ``_2``, ``_3`` ... when two inputs in different folders
    share a stem."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, source: str, frame: int | None = None) -> str:
        stem = Path(source).name.split(".")[0] or "image"
        if frame is not None:
            stem = f"{stem}_frame{int(frame):04d}"
        name, n = stem, 1
        while name in self.used:
            n += 1
            name = f"{stem}_{n}"
        self.used.add(name)
        return name


def find_mlflow_handler(engine: Engine) -> MLFlowHandler | None:
    """The ``MLFlowHandler`` attached to ``engine`` (by ``--tracking mlflow``), if any."""
    for handler, _, _ in engine._event_handlers.get(Events.STARTED, []):
        owner = getattr(handler, "__self__", None)
        if isinstance(owner, MLFlowHandler):
            return owner
    return None


class MLflowArtifactLogger:
    """Log parameters and artifacts to the MLflow run of the engine's ``MLFlowHandler``.

    Does nothing when the run is not tracked, so bundles can always list it. Attach it
    *before* the ``MLFlowHandler`` (as ``--tracking mlflow`` does by appending its handler),
    so that artifacts are logged before the run is closed. When the engine completes it prints
    the run's id, name and store, and the command that registers it.

    Args:
        artifacts: files or folders to log when the engine completes (missing ones skipped).
        newest_artifacts: glob patterns of which only the newest match is logged (e.g. the
            executed config that MONAI writes for each tracked run).
        params: parameters logged once, after the first iteration (when the run exists).
        artifact_path: folder inside the run's artifacts.
    """

    def __init__(
        self,
        artifacts: Sequence[str | os.PathLike[str]] = (),
        params: Mapping[str, Any] | None = None,
        artifact_path: str | None = None,
        newest_artifacts: Sequence[str] = (),
    ) -> None:
        self.artifacts = [Path(a) for a in artifacts]
        self.newest_artifacts = list(newest_artifacts)
        self.params = dict(params or {})
        self.artifact_path = artifact_path

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), self.log_params)
        engine.add_event_handler(Events.COMPLETED, self.log_artifacts)

    def _run(self, engine: Engine) -> tuple[Any, str] | None:
        handler = find_mlflow_handler(engine)
        if handler is None or handler.cur_run is None:
            return None
        return handler.client, handler.cur_run.info.run_id

    def log_params(self, engine: Engine) -> None:
        run = self._run(engine)
        if run is None or not self.params:
            return
        client, run_id = run
        existing = client.get_run(run_id).data.params
        for key, value in self.params.items():
            if key not in existing:  # a resumed run keeps its first values; MLflow refuses changes
                client.log_param(run_id, key, value)

    def log_artifacts(self, engine: Engine) -> None:
        run = self._run(engine)
        if run is None:
            return
        client, run_id = run
        newest = []
        for pattern in self.newest_artifacts:
            matches = sorted(Path(pattern).parent.glob(Path(pattern).name), key=lambda p: p.stat().st_mtime)
            newest.extend(matches[-1:])
        for path in [*self.artifacts, *newest]:
            if path.is_dir():
                client.log_artifacts(run_id, str(path), artifact_path=self._subdir(path))
            elif path.is_file():
                client.log_artifact(run_id, str(path), artifact_path=self.artifact_path)
        print(run_summary(client, run_id), flush=True)

    def _subdir(self, path: Path) -> str:
        return f"{self.artifact_path}/{path.name}" if self.artifact_path else path.name


def run_summary(client: Any, run_id: str) -> str:
    """What a finished training prints: its MLflow run's id, name and store, and the command that
    registers it (``echocare registry register`` takes the id, or the name where it is unique)."""
    run = client.get_run(run_id)
    store, parts = str(client.tracking_uri), urlsplit(str(client.tracking_uri))
    if "@" in parts.netloc:  # without its user:password@ (printed output ends up in logs)
        store = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))
    return (f"MLflow run {run_id} (name {run.info.run_name}) in {store}\n"
            f"register it: echocare registry register --run {run_id} --name NAME --tracking-uri {store}")


class EncoderExporter:
    """When training completes, write the encoder in the released EchoCare layout.

    Takes the encoder from the best checkpoint (``best_checkpoint``) when it exists, else
    from the network as it ends, and writes ``output_path`` (flat state dict with
    ``mask_token``).
    """

    def __init__(self, network: torch.nn.Module, output_path: str | os.PathLike[str], best_checkpoint: str | os.PathLike[str] | None = None) -> None:
        self.network = network
        self.output_path = Path(output_path)
        self.best_checkpoint = Path(best_checkpoint) if best_checkpoint else None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() > 0:
            return
        live_encoder = encoder_of(self.network)
        expected = set(live_encoder.state_dict())
        if self.best_checkpoint is not None and self.best_checkpoint.is_file():
            state = encoder_state_dict(torch.load(self.best_checkpoint, map_location="cpu", weights_only=True), expected)
        else:
            state = {k: v.detach().cpu() for k, v in live_encoder.state_dict().items()}
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, self.output_path)
        logger.info("encoder weights (released EchoCare layout) written to %s", self.output_path)


class PretrainPredictionWriter:
    """Inference outputs of the pretraining bundle, one per input image.

    Writes ``<output_dir>/<stem>.png`` (original / masked / reconstruction panel) and, when
    the run completes, ``<output_dir>/predictions.json``: a list of ``{"image", "panel",
    "anatomy_path", "anatomy_scores"}`` where ``anatomy_scores`` maps every node path to its
    hierarchy-coherent probability and ``anatomy_path`` is the deepest confident path
    (null when no region reaches the threshold). An input that
    :class:`~echocare.datasets.SkipUnreadableDataset` could not load gets the row ``{"image",
    "status": "skipped", "reason"}`` instead.
    """

    def __init__(self, output_dir: str | os.PathLike[str], ontology: Any) -> None:
        self.output_dir = Path(output_dir)
        self.ontology = ontology
        self.predictions: list[dict[str, Any]] = []
        self._name = UniqueNames()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._write_batch)
        engine.add_event_handler(Events.COMPLETED, self._write_json)

    def _reset(self, engine: Engine) -> None:
        self.predictions, self._name = [], UniqueNames()

    def _write_batch(self, engine: Engine) -> None:
        batch = engine.state.batch if isinstance(engine.state.batch, list) else [{}] * len(engine.state.output)
        for item, loaded in zip(engine.state.output, batch):
            skipped = skipped_row(loaded)
            if skipped is not None:  # an input the dataset could not load: its row, no panel
                logger.warning("skipped %s", skipped["reason"])
                self.predictions.append(skipped)
                continue
            source = str(item.get("filename", f"image_{len(self.predictions):05d}"))
            panel = write_panel([[item["image"], item["masked"], item["reconstruction"]]], self.output_dir / f"{self._name(source)}.png")
            scores = torch.as_tensor(item["anatomy_scores"]).float().cpu().tolist()
            self.predictions.append(
                {
                    "image": source,
                    "panel": str(panel),
                    "anatomy_path": item["anatomy_pred"] or None,
                    "masked_l1": float(item["masked_l1"]),
                    "anatomy_scores": {path: round(s, 6) for path, s in zip(self.ontology.nodes, scores)},
                }
            )

    def _write_json(self, engine: Engine) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "predictions.json").write_text(json.dumps(self.predictions, indent=1))
        logger.info("%d predictions written to %s", len(self.predictions), self.output_dir)


class EvaluationReport:
    """Write an evaluation's results: ``summary.json``, ``per_case.csv``, logged to MLflow if tracked.

    ``summary.json`` maps each metric of ``engine.state.metrics`` (without a ``val_`` prefix,
    so names match docs/architecture.md's "Metric names" across summary, MLflow and ``echocare compare``) to its value.
    ``per_case.csv`` has one row per image: ``image`` and the listed per-item output fields
    (scalars or strings of MONAI's decollated outputs).

    Args:
        eval_dir: output folder (``<output_dir>/eval``).
        per_case_fields: output keys to write per image.
        extra_artifacts: more files or folders to log with the report (e.g. pictures).
        close_mlflow_run: end the MLflow run afterwards (a stand-alone evaluation, whose
            validator-style ``MLFlowHandler`` from ``--tracking mlflow`` leaves it open).
    """

    def __init__(
        self,
        eval_dir: str | os.PathLike[str],
        per_case_fields: Sequence[str] = (),
        extra_artifacts: Sequence[str | os.PathLike[str]] = (),
        close_mlflow_run: bool = False,
    ) -> None:
        self.close_mlflow_run = close_mlflow_run
        self.eval_dir = Path(eval_dir)
        self.per_case_fields = list(per_case_fields)
        self.extra_artifacts = [Path(p) for p in extra_artifacts]
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    @staticmethod
    def _scalar(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.item() if value.numel() == 1 else value.tolist()
        return value

    def _collect(self, engine: Engine) -> None:
        batch = engine.state.batch if isinstance(engine.state.batch, list) else [{}] * len(engine.state.output)
        for item, source in zip(engine.state.output, batch):
            # Output fields first (scores, predictions), then the input item's (case, ...).
            merged = {**(source if isinstance(source, dict) else {}), **item}
            row = {"image": item_source(merged, default=str(len(self.rows)))}
            row.update({field: self._scalar(merged.get(field)) for field in self.per_case_fields})
            self.rows.append(row)

    def _write(self, engine: Engine) -> None:
        import csv

        self.eval_dir.mkdir(parents=True, exist_ok=True)
        summary = {name.removeprefix("val_"): float(value) for name, value in engine.state.metrics.items()}
        summary_path = self.eval_dir / "summary.json"
        summary_path.write_text(json.dumps(summary, indent=1))
        per_case_path = self.eval_dir / "per_case.csv"
        with per_case_path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["image", *self.per_case_fields])
            writer.writeheader()
            writer.writerows(self.rows)
        logger.info("evaluation of %d images: %s -> %s", len(self.rows), summary, self.eval_dir)
        handler = find_mlflow_handler(engine)
        if handler is not None and handler.cur_run is not None:
            run_id = handler.cur_run.info.run_id
            for path in (summary_path, per_case_path):
                handler.client.log_artifact(run_id, str(path), artifact_path="eval")
            for path in self.extra_artifacts:
                if path.is_dir():
                    handler.client.log_artifacts(run_id, str(path), artifact_path=f"eval/{path.name}")
                elif path.is_file():
                    handler.client.log_artifact(run_id, str(path), artifact_path="eval")
            if self.close_mlflow_run:
                handler.close()
