"""Inference datasets that skip unreadable inputs instead of stopping the run.

A truncated PNG or a corrupt DICOM in a folder of a thousand inputs must not cost the
other 999 (docs/security.md). :class:`SkipUnreadableDataset` is the ``Dataset`` of every
bundle's ``inference.yaml``: an item whose loading transforms fail is replaced, for the
network, by a copy of an item that loads (so batches keep one shape and the DataLoader,
its workers and every engine stay unchanged), and marked in its :data:`SKIPPED_KEY`
field with the row the writers put in ``predictions.json`` / ``.csv`` instead of its
outputs (:func:`skipped_row`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from monai.data import Dataset

from echocare.datasets.datalist import DatalistError

__all__ = ["SKIPPED_KEY", "SkipUnreadableDataset", "skipped_row"]

#: Field of every item of a :class:`SkipUnreadableDataset`: ``""`` for an item that loaded,
#: else the JSON of its ``predictions.json`` row (a string, so batches collate).
SKIPPED_KEY = "skipped"


def _root_cause(error: BaseException) -> BaseException:
    """The innermost ``__cause__`` (MONAI wraps a transform's error in "applying transform ...")."""
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def _input_path(item: Any, image_key: str) -> str:
    value = item.get(image_key) if isinstance(item, Mapping) else item
    return str(value) if isinstance(value, (str, os.PathLike)) else ""


def skipped_row(item: Mapping[str, Any]) -> dict[str, Any] | None:
    """The ``predictions.json`` row of a skipped item (``{"image", ["frame",] ["case",]
    "status": "skipped", "reason"}``), or None for an item that loaded."""
    marker = item.get(SKIPPED_KEY) if isinstance(item, Mapping) else None
    return json.loads(marker) if marker else None


class SkipUnreadableDataset(Dataset):
    """A MONAI ``Dataset`` for inference that skips items whose transforms fail.

    Each item (a dict) comes out with :data:`SKIPPED_KEY`: ``""`` when its transforms ran,
    else the JSON of its row ``{"image": <input>, ["frame": <frame>,] ["case": <case>,]
    "status": "skipped", "reason": "<file>: <problem>"}``; the tensors of a skipped item are
    those of another item of the dataset (the first one after it that loads), so the batch
    has the same shapes as ever. The prediction writers read the marker and write the row
    instead of the network's outputs.

    Args:
        data: the inference items (dicts, e.g. ``{"image": path, "frame": 0, ...}``).
        transform: the loading and preprocessing transforms.
        image_key: the item field that names its input file.

    Raises:
        DatalistError: not a single item can be loaded (naming the first few and their
            problem): the run has nothing to predict.
    """

    def __init__(self, data: Sequence[dict[str, Any]], transform: Sequence[Callable] | Callable | None = None,
                 image_key: str = "image") -> None:
        super().__init__(data, transform)
        self.image_key = image_key
        # Per process (each DataLoader worker has its own copy): the stand-in for skipped
        # items and the problems already met, so that no input is read twice to fail twice.
        self._stand_in: dict[str, Any] | None = None
        self._problems: dict[int, str] = {}

    def _load(self, index: int) -> dict[str, Any] | None:
        """Item ``index`` transformed, or None (its problem kept in ``_problems``) when it fails."""
        if index in self._problems:
            return None
        try:
            item = super()._transform(index)
        except Exception as error:  # one bad input must not stop the run, whatever its reader raised
            cause = _root_cause(error)
            path = _input_path(self.data[index], self.image_key)
            reason = str(cause) or type(cause).__name__
            if path and path not in reason:
                reason = f"{path}: {reason}"
            self._problems[index] = reason
            return None
        if not isinstance(item, dict):
            raise TypeError(f"{type(self).__name__} needs dict items, the transforms returned {type(item).__name__}")
        return item

    def _transform(self, index: int) -> dict[str, Any]:
        item = self._load(index)
        if item is not None:
            if self._stand_in is None:
                self._stand_in = item
            return {**item, SKIPPED_KEY: ""}
        return {**self._stand_in_for(index), SKIPPED_KEY: json.dumps(self._row(index), ensure_ascii=False, default=str)}

    def _row(self, index: int) -> dict[str, Any]:
        source = self.data[index]
        row: dict[str, Any] = {"image": _input_path(source, self.image_key)}
        for key in ("frame", "case"):
            if isinstance(source, Mapping) and key in source:
                row[key] = source[key]
        row.update(status="skipped", reason=self._problems[index])
        return row

    def _stand_in_for(self, index: int) -> dict[str, Any]:
        if self._stand_in is None:
            count = len(self.data)
            for other in (*range(index + 1, count), *range(index)):
                item = self._load(other)
                if item is not None:
                    self._stand_in = item
                    break
        if self._stand_in is None:
            listed = "; ".join(self._problems[i] for i in sorted(self._problems)[:5])
            more = f" (and {len(self._problems) - 5} more)" if len(self._problems) > 5 else ""
            raise DatalistError(f"none of the {len(self.data)} inputs can be read: {listed}{more}")
        return self._stand_in
