"""Ignite glue of the report bundle: teacher-forcing training step, generation step, report writer.

The iterations are MONAI engines' ``iteration_update`` functions (as the pretraining ones):
the batch holds ``images`` (B, 2, 3, H, W), ``tokens`` (B, L) (``<bos>`` report ``<eos>``,
padded), ``report`` (reference text), ``case`` and ``image_files`` (JSON list of the paths).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents

from echocare.tasks.report.tokenizer import ReportTokenizer
from echocare.engines.iteration import bf16_autocast, plain_tensor, unwrap_ddp
from echocare.engines.writers import PredictionWriter

__all__ = ["ReportEvalIteration", "ReportTrainIteration", "ReportWriter"]

logger = logging.getLogger(__name__)


class ReportTrainIteration:
    """One teacher-forcing step: the network reads ``tokens[:, :-1]`` and is scored by the
    engine's ``loss_function`` (:class:`~echocare.tasks.report.network.ReportLoss`) on
    ``tokens[:, 1:]``; the batch is cut to its longest report first.

    Args:
        amp: bf16 autocast on CUDA.
        grad_clip_norm: clip the global gradient norm (None: no clipping).
    """

    def __init__(self, amp: bool = True, grad_clip_norm: float | None = 1.0) -> None:
        self.amp = amp
        self.grad_clip_norm = grad_clip_norm

    def __call__(self, engine: Engine, batch: dict[str, Any]) -> dict[str, Any]:
        device = torch.device(engine.state.device)
        network, optimizer = engine.network, engine.optimizer
        images = plain_tensor(batch["images"], device)
        tokens = plain_tensor(batch["tokens"], device)
        pad_id = unwrap_ddp(network).pad_id
        length = int((tokens != pad_id).sum(dim=1).max())
        tokens = tokens[:, :length]
        network.train()
        optimizer.zero_grad(set_to_none=True)
        with bf16_autocast(device, self.amp):
            logits = network(images, tokens[:, :-1])
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        loss = engine.loss_function(logits, tokens[:, 1:])
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if self.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(network.parameters(), self.grad_clip_norm)
        optimizer.step()
        # A per-case field makes MONAI's decollation give one dict per case with the batch
        # loss replicated, the shape its tracking handlers read (from_engine(['loss'], first=True)).
        engine.state.output = {"loss": loss.detach(), "num_tokens": (tokens[:, 1:] != pad_id).sum(dim=1)}
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class ReportEvalIteration:
    """Generate each case's report (beam search, greedy for ``beam_size`` 1).

    Returns per case: ``generated`` (text), ``report`` (the reference, "" when none),
    ``token_ids`` (generated ids, space-separated, ``<eos>`` included), ``tokens`` (their
    text tokens, space-separated), ``score`` (length-normalised log-probability), ``case``,
    ``image_files`` and ``filename`` (the first image).

    Args:
        tokenizer: the run's tokenizer.
        beam_size, max_length, length_penalty: see
            :meth:`~echocare.tasks.report.network.EchoCareReportNet.generate`.
    """

    def __init__(
        self, tokenizer: ReportTokenizer, beam_size: int = 3, max_length: int | None = None, length_penalty: float = 1.0, amp: bool = True
    ) -> None:
        self.tokenizer = tokenizer
        self.beam_size, self.max_length, self.length_penalty, self.amp = int(beam_size), max_length, float(length_penalty), amp

    @torch.no_grad()
    def __call__(self, engine: Engine, batch: dict[str, Any]) -> dict[str, Any]:
        device = torch.device(engine.state.device)
        network = engine.network
        network.eval()
        images = plain_tensor(batch["images"], device)
        with bf16_autocast(device, self.amp):
            sequences, scores = unwrap_ddp(network).generate(images, self.beam_size, self.max_length, self.length_penalty)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        n = len(sequences)
        files = [json.loads(f) for f in batch.get("image_files", ["[]"] * n)]
        engine.state.output = {
            "generated": [self.tokenizer.decode(s) for s in sequences],
            "report": [str(r) for r in batch.get("report", [""] * n)],
            "token_ids": [" ".join(str(i) for i in s) for s in sequences],
            "tokens": [" ".join(self.tokenizer.tokens[i] for i in s) for s in sequences],
            "score": [float(s) for s in scores],
            "case": [str(c) for c in batch.get("case", [""] * n)],
            "image_files": [json.dumps(f) for f in files],
            "filename": [f[0] if f else "" for f in files],
        }
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class ReportWriter(PredictionWriter):
    """Inference output, one pair of files per case named after it: ``<case>.txt`` (the
    report) and ``<case>.json`` (``case``, ``report``, ``tokens`` (list of text tokens),
    ``token_ids``, ``score``, ``images``), plus ``predictions.json`` / ``.csv`` for all.
    Writes on rank 0 only."""

    def __init__(self, output_dir: str | os.PathLike[str]) -> None:
        super().__init__(output_dir, class_names=[])

    def write_item(self, source: dict[str, Any], output: dict[str, Any]) -> dict[str, Any]:
        case = output.get("case") or output.get("filename") or f"case{len(self.records):05d}"
        name = self.names(str(case).replace("/", "_"))
        record = {
            "case": str(output.get("case", "")),
            "report": str(output["generated"]),
            "tokens": str(output["tokens"]).split(),
            "token_ids": [int(i) for i in str(output["token_ids"]).split()],
            "score": round(float(output["score"]), 6),
            "images": json.loads(output.get("image_files") or "[]"),
        }
        text_file, json_file = self.output_dir / f"{name}.txt", self.output_dir / f"{name}.json"
        text_file.write_text(record["report"] + "\n", encoding="utf-8")
        json_file.write_text(json.dumps(record, ensure_ascii=False, indent=1), encoding="utf-8")
        return {**record, "text_file": str(text_file), "json_file": str(json_file)}
