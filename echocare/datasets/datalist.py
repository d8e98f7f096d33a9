"""Datalist loading with up-front checks, so that bad input fails before training starts."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from echocare.io.readers import SUPPORTED_SUFFIXES, UltrasoundReadError, iter_frames
from echocare.ontology import AnatomyOntology, UnknownAnatomyError

__all__ = ["DatalistError", "check_file", "check_image_size", "list_inputs", "load_datalist", "raise_problems"]

#: The encoder needs sides divisible by this (patch 2, four 2x merges).
SIDE_MULTIPLE = 32
#: Smallest source side we accept: below it, resizing to the training size only invents pixels.
MIN_SOURCE_SIDE = 16


class DatalistError(ValueError):
    """A datalist that cannot be used: the message names the file and every problem found."""


def check_image_size(image_size: int | Sequence[int], multiple: int = SIDE_MULTIPLE) -> tuple[int, int]:
    """Validate a training/inference size: positive and divisible by ``multiple``; returns (H, W)."""
    sides = (int(image_size), int(image_size)) if isinstance(image_size, (int, float)) else tuple(map(int, image_size))
    if len(sides) != 2 or any(s <= 0 or s % multiple for s in sides):
        raise ValueError(
            f"image_size {image_size!r} is not usable: the EchoCare encoder needs sides that are positive "
            f"multiples of {multiple} (e.g. 64, 224, 256)"
        )
    return sides  # type: ignore[return-value]


def check_file(path: str) -> str | None:
    """None when ``path`` decodes with usable sides, else the problem."""
    try:
        frame = next(iter_frames(path))
    except UltrasoundReadError as error:
        return error.problem
    except StopIteration:
        return "holds no frame"
    height, width = frame.shape[:2]
    if min(height, width) < MIN_SOURCE_SIDE:
        return f"is {height}x{width} pixels, smaller than {MIN_SOURCE_SIDE} on a side"
    return None


def raise_problems(datalist: str | os.PathLike[str], key: str, problems: Sequence[str], limit: int = 20) -> None:
    """Raise one :class:`DatalistError` listing ``problems`` (the first ``limit``) of list
    ``key`` of ``datalist``; nothing when there are none."""
    if not problems:
        return
    shown = "\n  ".join(problems[:limit])
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    raise DatalistError(f"{datalist} [{key}]: {len(problems)} problem(s):\n  {shown}{more}")


def load_datalist(
    datalist: str | os.PathLike[str],
    key: str = "training",
    base_dir: str | os.PathLike[str] | None = None,
    image_keys: Sequence[str] = ("image",),
    ontology: AnatomyOntology | None = None,
    check_images: bool = True,
    num_threads: int = 4,
) -> list[dict[str, Any]]:
    """Read one list of a MONAI datalist JSON and check it, raising one error for all problems.

    Args:
        datalist: the JSON file (``{"training": [...], "validation": [...]}``).
        key: which list to return.
        base_dir: root that relative paths resolve against (``dataset_dir``); default the
            datalist's folder.
        image_keys: item keys holding file paths to resolve and check.
        ontology: when given, each item's ``anatomy`` path must be a node of it.
        check_images: decode the first frame of every file (catches unreadable files and
            too-small images before training starts).

    Returns:
        The items with absolute paths.

    Raises:
        DatalistError: missing JSON, missing list, missing/unreadable files, unknown
            anatomy paths; the message names the datalist, each bad item and its problem.
    """
    datalist = Path(datalist)
    if not datalist.is_file():
        raise DatalistError(f"{datalist}: datalist not found")
    try:
        content = json.loads(datalist.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatalistError(f"{datalist}: not valid JSON ({error})") from error
    if not isinstance(content, dict) or not isinstance(content.get(key), list):
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise DatalistError(f"{datalist}: no list {key!r} (found {found})")
    root = Path(base_dir) if base_dir else datalist.parent
    items: list[dict[str, Any]] = []
    problems: list[str] = []
    to_decode: list[tuple[int, str]] = []
    for position, raw in enumerate(content[key]):
        item = dict(raw) if isinstance(raw, dict) else {"image": raw}
        for image_key in image_keys:
            if image_key not in item:
                problems.append(f"item {position}: no {image_key!r} key")
                continue
            path = Path(item[image_key])
            path = path if path.is_absolute() else root / path
            item[image_key] = str(path)
            if path.is_dir():
                continue  # a clip given as a folder of frames (classification bundles read it)
            if not path.is_file():
                problems.append(f"item {position}: {path}: file not found")
            elif check_images:
                to_decode.append((position, str(path)))
        if ontology is not None and item.get("anatomy"):
            try:
                ontology.index(item["anatomy"])
            except UnknownAnatomyError as error:
                problems.append(f"item {position} ({item.get('image')}): {error}")
        items.append(item)
    if to_decode:
        with ThreadPoolExecutor(max_workers=max(1, num_threads)) as pool:
            results = pool.map(check_file, [path for _, path in to_decode])
            for (position, path), problem in zip(to_decode, results):
                if problem is not None:
                    problems.append(f"item {position}: {path}: {problem}")
    raise_problems(datalist, key, problems)
    if not items:
        raise DatalistError(f"{datalist}: the list {key!r} is empty")
    return items


def list_inputs(
    source: str | os.PathLike[str], key: str = "validation", base_dir: str | os.PathLike[str] | None = None
) -> list[dict[str, Any]]:
    """Inference inputs as ``[{"image": path, "anatomy": label or ""}, ...]`` from a folder (searched recursively for
    images, DICOMs, videos and NIfTI, in sorted order), a single file, or a datalist JSON
    (its ``key`` list, paths resolved against ``base_dir`` or the datalist's folder).

    Raises:
        DatalistError: the source does not exist or holds no readable kind of file.
    """
    source = Path(source)
    if source.is_dir():
        files = sorted(
            p for p in source.rglob("*")
            if p.is_file() and (p.suffix.lower() in SUPPORTED_SUFFIXES or p.name.lower().endswith(".nii.gz"))
        )
        if not files:
            raise DatalistError(f"{source}: no image, DICOM, video or NIfTI file in this folder")
        return [{"image": str(p), "anatomy": ""} for p in files]
    if source.suffix.lower() == ".json":
        items = load_datalist(source, key, base_dir=base_dir, check_images=False)
        # Only what inference uses, with the same keys in every item so batches collate.
        return [{"image": item["image"], "anatomy": item.get("anatomy") or ""} for item in items]
    if source.is_file():
        return [{"image": str(source), "anatomy": ""}]
    raise DatalistError(f"{source}: no such file or folder")
