"""The writer bases every task's handlers build on: files written over one engine run
(evaluation pictures, inference outputs), on rank 0 only, named after the inputs, and the
inference index files ``predictions.json`` / ``predictions.csv`` with a row per skipped input.

They read MONAI's decollated ``engine.state.batch`` / ``engine.state.output`` lists (one dict
per item).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from echocare.datasets.skipping import skipped_row
from echocare.engines.handlers import UniqueNames, item_source

__all__ = ["OUTPUT_NAME_KEY", "PredictionWriter", "RunFileWriter", "is_rank0", "iteration_pairs", "output_frame",
           "write_prediction_index"]

#: Item field naming an item's output files (the stem, without suffix). ``echocare predict`` sets it
#: from the whole run's inputs, so that a run split over several processes (``--engine ray``) names
#: its files as one process would; without it the writer names them itself, in the order it meets them.
OUTPUT_NAME_KEY = "output_name"

logger = logging.getLogger(__name__)


def is_rank0() -> bool:
    """True outside DDP and on rank 0 (handlers that write files run there only)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() > 0)


def iteration_pairs(engine: Engine) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(input item, output item) pairs of the last iteration, merged views."""
    outputs = engine.state.output if isinstance(engine.state.output, list) else []
    batch = engine.state.batch if isinstance(engine.state.batch, list) else [{}] * len(outputs)
    return [((b if isinstance(b, dict) else {}), o) for b, o in zip(batch, outputs)]


class RunFileWriter:
    """Shared part of the handlers that write files over one engine run (evaluation pictures,
    inference outputs): a fresh state at every run (``reset``), each decollated (input item,
    output item) pair of every iteration (``write_pair``), a last step when the run completes
    (``finish``); files are written on rank 0 only.

    Subclasses set ``self.output_dir`` (a ``Path``) and override the three hooks. ``count`` and
    ``names`` (:class:`~echocare.engines.handlers.UniqueNames`) are reset with each run; pictures
    take their names from :meth:`picture_name`.
    """

    def __init__(self, output_dir: str | os.PathLike[str], max_images: int = 16) -> None:
        self.output_dir = Path(output_dir)
        self.max_images = int(max_images)
        self._start(None)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        engine.add_event_handler(Events.COMPLETED, self._finish)

    def _start(self, engine: Engine | None) -> None:
        self.count, self.names = 0, UniqueNames()
        self.reset()

    def _iteration(self, engine: Engine) -> None:
        if not is_rank0():
            return
        for source, output in iteration_pairs(engine):
            self.write_pair(source, output)

    def _finish(self, engine: Engine) -> None:
        if is_rank0():
            self.finish()

    def picture_name(self, source: dict[str, Any], output: dict[str, Any]) -> str | None:
        """A unique file stem named after the item's input for the next of the first
        ``max_images`` pictures of the run, or ``None`` once they are drawn."""
        if self.count >= self.max_images:
            return None
        self.count += 1
        return self.names(item_source({**source, **output}, default=f"case{self.count - 1:03d}"))

    def reset(self) -> None:
        """Start of a run: drop what the last run collected."""

    def write_pair(self, source: dict[str, Any], output: dict[str, Any]) -> None:
        """One item: ``source`` is the batch item (input and its meta), ``output`` the
        postprocessed output item."""

    def finish(self) -> None:
        """End of the run (rank 0): pictures or files over the whole run."""


class PredictionWriter(RunFileWriter):
    """Shared part of the inference writers: naming after the input (and frame), the index
    files ``predictions.json`` / ``predictions.csv`` (one row per result: the record's plain
    fields) when the run completes. Subclasses write one input's files in ``write_item``
    and return its record.

    An input that :class:`~echocare.datasets.SkipUnreadableDataset` could not load gets its row
    ``{"image", ["frame",] "status": "skipped", "reason"}`` in both index files (and a
    warning naming it) instead of files."""

    def __init__(self, output_dir: str | os.PathLike[str], class_names: Sequence[str]) -> None:
        self.class_names = list(class_names)
        super().__init__(output_dir)

    def reset(self) -> None:
        self.records: list[dict[str, Any]] = []

    def _name(self, source: dict[str, Any]) -> tuple[str, str, int | None]:
        path = item_source(source, default=f"input{len(self.records):05d}")
        frame = output_frame(source)
        given = source.get(OUTPUT_NAME_KEY)
        if given:
            given = str(given)
            # a datalist is data: a name with a folder in it would write outside output_dir
            if Path(given).name != given or given in (".", "..") or "\\" in given:
                raise ValueError(f"{path}: {OUTPUT_NAME_KEY} {given!r} is not a plain file name "
                                 f"(outputs are written in {self.output_dir} only)")
            self.names.used.add(given)
            return path, given, frame
        return path, self.names(path, frame), frame

    def write_pair(self, source: dict[str, Any], output: dict[str, Any]) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        skipped = skipped_row(source)
        if skipped is not None:  # an input its dataset could not load: its row, no files
            logger.warning("skipped %s", skipped["reason"])
            self.records.append(skipped)
            return
        self.records.append(self.write_item(source, output))

    def write_item(self, source: dict[str, Any], output: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def finish(self) -> None:
        write_prediction_index(self.output_dir, self.records)
        logger.info("%d predictions written to %s", len(self.records), self.output_dir)


def output_frame(item: dict[str, Any]) -> int | None:
    """The frame an inference item's outputs are named after (``<stem>_frameNNNN``): its ``frame``
    for an item of a multi-frame input, None for a still image or a whole clip (``num_frames`` 1)."""
    frames = int(item.get("num_frames", 1) or 1)
    return int(item.get("frame", 0)) if frames > 1 else None


def write_prediction_index(output_dir: str | os.PathLike[str], records: Sequence[dict[str, Any]]) -> None:
    """``predictions.json`` (the records as they are) and ``predictions.csv`` (their plain fields) in
    ``output_dir``: the index of one inference run, one row per result or skipped input."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "predictions.json").write_text(json.dumps(list(records), ensure_ascii=False, indent=1), encoding="utf-8")
    flat = [{k: v for k, v in r.items() if not isinstance(v, (dict, list))} for r in records]
    if flat:
        # every column in first-seen order, the outputs' before those of skipped rows (status, reason)
        ordered = sorted(flat, key=lambda row: row.get("status") == "skipped")
        fields = list(dict.fromkeys(k for row in ordered for k in row))
        with (output_dir / "predictions.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(flat)
