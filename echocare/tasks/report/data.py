"""Report-generation data: datalists of two-image cases with a report, inference inputs, the
tokenizer trained on the training reports, and the transforms of the ``usreport`` bundle.

Datalist items (docs/architecture.md, "Datalist keys", report): ``images`` [path, path] (one path is
repeated; more than two: the first two), ``report`` (text), optional ``case``. Loaded items
are ``{"image": abs path, "image2": abs path, "image_files": JSON list of both, "report",
"case"}``: the two images are read and resized separately (so MONAI's dictionary transforms
and augmentations apply to each), then stacked to ``images`` (2, 3, H, W) by
:class:`StackImagesd`.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from echocare.datasets.datalist import check_file, list_inputs, load_datalist, raise_problems
from echocare.tasks.report.tokenizer import ReportTokenizer
from echocare.tasks.supervised.data import subsample_training
from echocare.engines.writers import is_rank0

__all__ = [
    "ReportTokensd",
    "StackImagesd",
    "list_report_cases",
    "load_report_datalist",
    "train_report_tokenizer",
]

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("image", "image2")


def _case_item(paths: Sequence[str], report: str, case: str) -> dict[str, Any]:
    pair = (list(paths) * 2)[:2]
    return {"image": pair[0], "image2": pair[1], "image_files": json.dumps(pair), "report": report, "case": case}


def load_report_datalist(
    datalist: str | os.PathLike[str],
    key: str,
    base_dir: str | os.PathLike[str] | None = None,
    train_fraction: float = 1.0,
    seed: int = 0,
    check_images: bool = True,
    require_report: bool = True,
    num_threads: int = 4,
) -> list[dict[str, Any]]:
    """Read and check one list of a report datalist, raising one error naming every bad item.

    Args:
        datalist: MONAI datalist JSON with ``images`` and ``report`` items.
        key: ``training``, ``validation`` or ``test``.
        base_dir: root of relative paths (``dataset_dir``); default the datalist's folder.
        train_fraction: keep this fraction of the items (seeded by ``seed``).
        check_images: decode the first frame of every image now.
        require_report: an item without report text is a problem (inference: False).

    Returns:
        Items ``{"image", "image2", "image_files", "report", "case"}`` (absolute paths).

    Raises:
        DatalistError: missing file, unreadable image, no ``images``, empty report, empty list.
    """
    raw = load_datalist(datalist, key, base_dir=base_dir, image_keys=(), check_images=False)
    root = Path(base_dir) if base_dir else Path(datalist).parent
    problems: list[str] = []
    items: list[dict[str, Any]] = []
    to_decode: list[tuple[int, str]] = []
    for position, source in enumerate(raw):
        paths = source.get("images", source.get("image"))
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            problems.append(f"item {position}: no 'images' list of paths (got {paths!r})")
            continue
        resolved = []
        for p in paths[:2]:
            path = Path(p) if Path(p).is_absolute() else root / p
            resolved.append(str(path))
            if not path.is_file():
                problems.append(f"item {position}: {path}: file not found")
            elif check_images:
                to_decode.append((position, str(path)))
        report = source.get("report")
        if report is None:
            report = ""
        if not isinstance(report, str) or (require_report and not report.strip()):
            problems.append(f"item {position} ({resolved[0]}): no report text (got {report!r})")
            continue
        case = source.get("case") or source.get("id") or Path(resolved[0]).parent.name
        items.append(_case_item(resolved, report, str(case)))
    if to_decode:
        with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
            for (position, path), problem in zip(to_decode, pool.map(check_file, [p for _, p in to_decode])):
                if problem is not None:
                    problems.append(f"item {position}: {path}: {problem}")
    raise_problems(datalist, key, problems)
    return subsample_training(items, train_fraction, seed, stratify_key=None)


def list_report_cases(
    source: str | os.PathLike[str], key: str = "validation", base_dir: str | os.PathLike[str] | None = None
) -> list[dict[str, Any]]:
    """Inference cases from a report datalist JSON (its ``key`` list; reports optional), a
    folder, or one image file.

    A folder holding sub-folders of images is one case per sub-folder (named after it); a
    folder holding images only is one case. Each case's images are taken in sorted order:
    the first two (one image is used twice; more than two: the others are skipped with a
    warning naming the case).

    Raises:
        DatalistError: the source does not exist or holds no image.
    """
    source = Path(source)
    if source.is_file() and source.suffix.lower() == ".json":
        return load_report_datalist(source, key, base_dir=base_dir, check_images=False, require_report=False)
    files = [Path(item["image"]) for item in list_inputs(source)]
    if source.is_file():
        return [_case_item([str(source)], "", source.stem)]
    groups: dict[Path, list[Path]] = {}
    for f in files:
        groups.setdefault(f.parent, []).append(f)
    cases = []
    for folder in sorted(groups):
        images = sorted(groups[folder])
        name = folder.relative_to(source).as_posix() if folder != source else source.name
        if len(images) > 2:
            logger.warning("case %s has %d images: using the first two (%s, %s)", name, len(images), images[0].name, images[1].name)
        cases.append(_case_item([str(p) for p in images], "", name))
    return cases


def train_report_tokenizer(
    reports: Sequence[str], path: str | os.PathLike[str], min_count: int = 1, reuse: bool = False
) -> ReportTokenizer:
    """The tokenizer of a training run, trained on ``reports`` and written to ``path``
    (beside the checkpoints, as evaluation and inference read it from there).

    ``reuse``: when resuming, read the existing ``path`` instead, so token ids keep matching
    the checkpoint's embedding.
    """
    path = Path(path)
    if reuse and path.is_file():
        logger.info("resume: reusing the tokenizer %s", path)
        return ReportTokenizer.load(path)
    tokenizer = ReportTokenizer.train(reports, min_count=min_count)
    if is_rank0():
        # Under DDP every process trains the same tokenizer from the same reports; rank 0 writes it.
        tokenizer.save(path)
        logger.info("tokenizer of %d tokens trained on %d reports -> %s", len(tokenizer), len(reports), path)
    return tokenizer


class StackImagesd(MapTransform):
    """Stack the case's images (each (C, H, W), same size) into ``name`` (N, C, H, W); the
    keys after the first are removed (the first keeps its meta for naming outputs)."""

    def __init__(self, keys: KeysCollection = IMAGE_KEYS, name: str = "images") -> None:
        super().__init__(keys)
        self.name = name

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        images = [torch.as_tensor(d[k]) for k in self.key_iterator(d)]
        shapes = {tuple(i.shape) for i in images}
        if len(shapes) != 1:
            raise ValueError(f"images of a case differ in shape {sorted(shapes)}: resize them first")
        d[self.name] = torch.stack([i.as_tensor() if hasattr(i, "as_tensor") else i for i in images])
        for k in list(self.keys)[1:]:
            d.pop(k, None)
        return d


class ReportTokensd(MapTransform):
    """Encode ``report`` text to ``tokens``: a (max_length,) long tensor ``<bos>`` ... ``<eos>``
    padded with ``<pad>``; longer reports are cut (keeping ``<eos>``)."""

    def __init__(self, tokenizer: ReportTokenizer, max_length: int, key: str = "report", output_key: str = "tokens") -> None:
        super().__init__([key])
        if int(max_length) < 3:
            raise ValueError(f"max_length must be >= 3 (<bos>, a token, <eos>), got {max_length}")
        self.tokenizer, self.max_length, self.output_key = tokenizer, int(max_length), output_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        ids = self.tokenizer.encode(str(d.get(self.keys[0], "")), max_length=self.max_length - 2)
        tokens = torch.full((self.max_length,), self.tokenizer.pad_id, dtype=torch.long)
        tokens[: len(ids)] = torch.tensor(ids, dtype=torch.long)
        d[self.output_key] = tokens
        return d
