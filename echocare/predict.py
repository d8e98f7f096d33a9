"""``echocare predict``: a bundle on images, DICOM files, study folders and videos, with DICOM results.

The bundle's own ``inference.yaml`` (plus overlays) does the inference, in this process
through ``monai.bundle``'s config parser, with overrides: its writers put masks (PNG and
NIfTI at the input's size) or class probabilities (JSON) per input frame, and
``predictions.json``, in ``<out>/predictions/``. This module then:

* collects the inputs (files, folders searched recursively including suffix-less DICOM
  files of PACS exports, datalist JSON files), checks each one with the readers' own checks
  (header: frame size against ``max_pixels``, frames a video can deliver against those it
  declares; then every frame the bundle will read) and reports a bad one on one line,
  ``failed: PATH: reason``, and leaves it out so the run goes on;
* optionally keeps the first ``max_frames`` frames of each multi-frame input;
* for DICOM inputs, writes into ``<out>/dicom/``: a DICOM SEG (segmentation bundles) or, where
  highdicom cannot make a SEG from the source, a Secondary Capture overlay with the reason
  stated; and a Structured Report with the classification or the segmented areas;
* writes ``<out>/predict_report.json`` and ``.csv``: one row per input with its status,
  frames, output files and, for a Secondary Capture or a failure, the reason.
"""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from echocare.bundle import resolve_bundle, resolve_overlays
from echocare.datasets.datalist import list_inputs
from echocare.engines.handlers import UniqueNames
from echocare.io import dicom_writer
from echocare.io.readers import (
    DEFAULT_MAX_PIXELS,
    UltrasoundReadError,
    count_frames,
    detect_format,
    iter_frames,
    read_metadata,
)

__all__ = ["InputResult", "collect_inputs", "predict"]

#: Files of a study folder that are never images (DICOMDIR indexes hold no pixels).
_NOT_INPUTS = {"dicomdir"}
TASK_OF_FORMAT = {"segmentation": "segmentation", "classes": "classification"}


@dataclass
class InputResult:
    """One row of ``predict_report``: an input and what became of it."""

    input: str
    format: str = ""
    status: str = "ok"  # ok | failed
    num_frames: int = 0  # frames in the file
    frames: int = 0  # frames predicted (or 1 for a clip-level result)
    seg: str = ""
    secondary_capture: str = ""
    sr: str = ""
    summary: str = ""  # the prediction in a few words
    reason: str = ""


# ----------------------------------------------------------------------------- inputs


def collect_inputs(paths: Sequence[str | os.PathLike[str]]) -> tuple[list[Path], list[InputResult], list[str]]:
    """The input files of ``paths``: files as given, folders searched recursively (sorted), the
    items of datalist JSON files.

    In folders, every file the readers know by suffix is taken, and suffix-less files with a
    DICOM preamble (PACS exports name them ``IM0001``); other files are skipped and counted.

    Returns:
        (files, failures: missing paths and unsupported files given by name, notes: one
        line per folder with skipped files).
    """

    files: list[Path] = []
    failures: list[InputResult] = []
    notes: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            skipped = 0
            for candidate in sorted(p for p in path.rglob("*") if p.is_file()):
                if candidate.name.startswith(".") or candidate.name.lower() in _NOT_INPUTS:
                    skipped += 1
                    continue
                try:
                    detect_format(candidate)
                except UltrasoundReadError:
                    skipped += 1
                    continue
                files.append(candidate)
            if skipped:
                notes.append(f"{path}: skipped {skipped} file(s) that are not images, DICOM, video or NIfTI")
        elif path.is_file() and path.suffix.lower() == ".json":
            try:
                files.extend(Path(item["image"]) for item in list_inputs(path))
            except (ValueError, OSError) as exc:  # DatalistError is a ValueError
                failures.append(InputResult(str(path), "datalist", "failed", reason=str(exc)))
        else:
            try:
                detect_format(path)
                files.append(path)
            except UltrasoundReadError as exc:
                failures.append(InputResult(str(path), status="failed", reason=exc.problem))
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return unique, failures, notes


def _check_frames(path: Path, count: int | None, max_pixels: int) -> None:
    """Decode the first ``count`` frames of ``path`` (all with None): what the bundle will read.

    Raises:
        UltrasoundReadError: a frame cannot be decoded, is larger than ``max_pixels``, or the
        file ends before ``count`` frames (or, with None, before the frames it declares).
    """
    for _ in islice(iter_frames(path, max_pixels=max_pixels), count):
        pass


# ----------------------------------------------------------------------------- bundle


def _bundle_task(configs: Path) -> tuple[str, dict[str, Any]]:
    """(``segmentation`` | ``classification``, metadata) of the bundle whose configs are in ``configs``."""
    meta_file = configs / "metadata.json"
    meta = json.loads(meta_file.read_text())
    formats = {v.get("format") for v in meta.get("network_data_format", {}).get("outputs", {}).values()}
    tasks = {TASK_OF_FORMAT[f] for f in formats if f in TASK_OF_FORMAT}
    if len(tasks) != 1:
        raise ValueError(
            f"{meta_file}: echocare predict runs segmentation and classification bundles; this one outputs "
            f"{sorted(str(f) for f in formats)}"
        )
    return tasks.pop(), meta


def _parser(config_files: Sequence[str], overrides: dict[str, Any]):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(list(config_files))
    parser.update(overrides)
    return parser


def _read_predictions(predictions_dir: Path) -> dict[Path, list[dict[str, Any]]]:
    """The bundle writer's records grouped by input file, in frame order."""
    index = predictions_dir / "predictions.json"
    if not index.is_file():
        return {}
    grouped: dict[Path, list[dict[str, Any]]] = defaultdict(list)
    for record in json.loads(index.read_text()):
        if record.get("status") == "skipped":  # the bundle could not load it: no outputs to read
            continue
        grouped[Path(record["image"]).resolve()].append(record)
    for records in grouped.values():
        records.sort(key=lambda r: int(r.get("frame", 0)))
    return grouped


# ----------------------------------------------------------------------------- DICOM results


def _load_masks(records: Sequence[dict[str, Any]]) -> np.ndarray:
    """(F, H, W) uint8 class indices from the bundle's mask PNGs."""
    from PIL import Image

    return np.stack([np.asarray(Image.open(r["mask_png"])) for r in records]).astype(np.uint8)


def _frames_of(path: Path, count: int) -> Iterator[np.ndarray]:
    return islice(iter_frames(path), count)


def _dicom_results(
    row: InputResult,
    path: Path,
    records: Sequence[dict[str, Any]],
    task: str,
    per_clip: bool,
    class_names: Sequence[str],
    algorithm: dicom_writer.Algorithm,
    stem: str,
    dicom_dir: Path,
) -> list[str]:
    """Write the SEG (or Secondary Capture) and SR of one DICOM input; returns notes to print."""
    import pydicom


    source = pydicom.dcmread(path, stop_before_pixels=True)
    notes = []
    if task == "classification":
        results = [
            dicom_writer.ClassificationResult(
                probabilities=[float(r["probabilities"][n]) for n in class_names],
                frame=None if per_clip or row.num_frames == 1 else int(r["frame"]),
            )
            for r in records
        ]
        sr_path = dicom_dir / f"{stem}_sr.dcm"
        dicom_writer.write_classification_report(source, results, class_names, algorithm, sr_path)
        row.sr = str(sr_path)
        return notes
    frames = [int(r["frame"]) for r in records]
    masks = _load_masks(records)
    try:
        seg_path = dicom_dir / f"{stem}_seg.dcm"
        derived = dicom_writer.write_segmentation(source, masks, class_names, algorithm, seg_path, frames=frames)
        row.seg = str(seg_path)
    except dicom_writer.SegNotPossible as exc:
        sc_path = dicom_dir / f"{stem}_sc.dcm"
        reason = str(exc)
        # Frames are the file's first ones, in order (the bundle's datalist, cut to max_frames).
        images = _frames_of(path, len(frames))
        derived = dicom_writer.write_overlay_capture(source, images, masks, algorithm, reason, sc_path, frames=frames)
        row.secondary_capture, row.reason = str(sc_path), f"Secondary Capture instead of SEG: {reason}"
        notes.append(f"{path}: {row.reason}")
    spacing = read_metadata(path).get("pixel_spacing_mm")
    sr_path = dicom_dir / f"{stem}_sr.dcm"
    dicom_writer.write_segmentation_report(
        source, masks, class_names, algorithm, sr_path, frames=frames, spacing_mm=spacing, segmentation=derived
    )
    row.sr = str(sr_path)
    return notes


# ----------------------------------------------------------------------------- predict


def _write_report(out: Path, rows: Sequence[InputResult]) -> Path:
    table = [asdict(r) for r in rows]
    (out / "predict_report.json").write_text(json.dumps(table, indent=1))
    with (out / "predict_report.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]) if table else ["input"])
        writer.writeheader()
        writer.writerows(table)
    return out / "predict_report.json"


def _summary(records: Sequence[dict[str, Any]], task: str, class_names: Sequence[str]) -> str:
    """The bundle's records of one input in a few words: the predicted class (most frequent over
    frames) or, per foreground class, in how many frames it was found."""
    if task == "classification":
        predicted = [str(r["predicted"]) for r in records]
        top = max(set(predicted), key=predicted.count)
        return f"{top} ({predicted.count(top)}/{len(predicted)} frames)" if len(predicted) > 1 else top
    found = [f"{n} in {sum(int(r.get(f'pixels_{n}', 0)) > 0 for r in records)}/{len(records)} frames" for n in class_names[1:]]
    return ", ".join(found)


def _progress(items: Iterable[Any], description: str, total: int) -> Iterable[Any]:
    from tqdm import tqdm

    return tqdm(items, desc=description, total=total, unit="input", leave=True)


def _check_limits(max_frames: int | None, max_pixels: int) -> int:
    """``max_pixels`` as an int once both limits are checked."""
    if max_frames is not None and int(max_frames) < 1:
        raise ValueError(f"max_frames must be >= 1, got {max_frames}")
    if isinstance(max_pixels, bool) or not 1 <= int(max_pixels) <= DEFAULT_MAX_PIXELS:
        raise ValueError(
            f"max_pixels must be between 1 and {DEFAULT_MAX_PIXELS:,} (the bundle's reader refuses larger frames), "
            f"got {max_pixels}"
        )
    return int(max_pixels)


def _check_headers(files: Sequence[Path], max_pixels: int) -> dict[Path, InputResult]:
    """One row per file: of a known kind, with a readable header within ``max_pixels`` and (for
    video) the frames it declares there to read, or failed with the reason."""
    rows: dict[Path, InputResult] = {}
    for path in files:
        row = rows[path] = InputResult(str(path))
        try:
            row.format = detect_format(path)
            row.num_frames = count_frames(path, max_pixels=max_pixels)
        except UltrasoundReadError as exc:
            row.status, row.reason = "failed", exc.problem
    return rows


def _bundle_items(parser, readable: Sequence[Path], max_frames: int | None) -> dict[Path, list[dict[str, Any]]]:
    """The bundle's own datalist items of each readable input (one per frame, or per clip),
    cut to the first ``max_frames`` frames."""
    items_of: dict[Path, list[dict[str, Any]]] = defaultdict(list)
    if readable:
        for item in parser.get_parsed_content("datalist"):
            if max_frames is None or int(item.get("frame", 0)) < int(max_frames):
                items_of[Path(item["image"]).resolve()].append(item)
    return items_of


def _is_per_clip(items: Sequence[dict[str, Any]], row: InputResult) -> bool:
    """Whether a multi-frame input is one clip-level item rather than one item per frame."""
    return len(items) == 1 and int(items[0].get("num_frames", 1)) == 1 and row.num_frames > 1


def _check_decoding(rows: dict[Path, InputResult], readable: Sequence[Path], items_of: dict, max_pixels: int) -> None:
    """Decode every frame the bundle will read, so that a corrupt file is reported here rather
    than stopping the whole run; failed inputs leave ``items_of``."""
    for path in _progress(readable, "checking inputs", len(readable)):
        row, items = rows[path], items_of.get(path, [])
        try:
            if not items:
                raise UltrasoundReadError(path, "the bundle's datalist left it out (see the warning above)")
            _check_frames(path, None if _is_per_clip(items, row) else len(items), max_pixels)
            row.frames = len(items)
        except UltrasoundReadError as exc:
            row.status, row.reason = "failed", exc.problem
            items_of.pop(path, None)


def _write_dicom_results(
    rows: dict[Path, InputResult], ok: Sequence[Path], items_of: dict, predictions: dict, meta: dict[str, Any],
    bundle_name: str, task: str, class_names: list[str], dicom_dir: Path, say: Any,
) -> None:
    """Summarise each input's predictions and write the DICOM results of DICOM inputs; an input
    without a prediction, or whose DICOM results cannot be written, fails alone."""
    algorithm = dicom_writer.Algorithm(name=bundle_name, version=str(meta.get("version", "")))
    names = UniqueNames()
    for path in _progress(ok, "writing results", len(ok)):
        row, records = rows[path], predictions.get(path, [])
        row.summary = _summary(records, task, class_names)
        if not records:
            row.status, row.reason = "failed", "the bundle wrote no prediction for it"
            continue
        if row.format != "dicom":
            continue
        per_clip = _is_per_clip(items_of[path], row)
        try:
            notes = _dicom_results(row, path, records, task, per_clip, class_names, algorithm, names(str(path)),
                                   dicom_dir)
        except Exception as exc:  # one bad source must not stop the batch: report it, go on
            row.status, row.reason = "failed", f"cannot write DICOM results ({type(exc).__name__}: {exc})"
            continue
        for note in notes:
            say(note)


def _finish_report(out: Path, all_rows: list[InputResult], say: Any) -> None:
    """``predict_report.json``/``.csv``, a ``failed:`` line per failed input and a summary."""
    report = _write_report(out, all_rows)
    for row in all_rows:
        if row.status == "failed":
            say(f"failed: {row.input}: {row.reason}")
    done = [r for r in all_rows if r.status == "ok"]
    say(
        f"{len(all_rows)} input(s): {len(done)} done ({sum(bool(r.seg) for r in done)} SEG, "
        f"{sum(bool(r.secondary_capture) for r in done)} Secondary Capture, {sum(bool(r.sr) for r in done)} SR), "
        f"{len(all_rows) - len(done)} failed; outputs in {out}, report {report}"
    )


def predict(
    bundle: str,
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    checkpoint: str | None = None,
    config: Any = None,
    max_frames: int | None = None,
    overrides: dict[str, Any] | None = None,
    echo: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[InputResult]:
    """Run bundle ``bundle`` on ``inputs`` and write its results, DICOM ones included, to ``out``.

    Args:
        bundle: a bundle name (``bundles/NAME``) or folder; segmentation or classification.
        inputs: files (images, DICOM, videos, NIfTI), folders (searched recursively) or
            datalist JSON files.
        out: output folder: ``predictions/`` (the bundle's own outputs), ``dicom/``
            (``<stem>_seg.dcm`` or ``<stem>_sc.dcm``, ``<stem>_sr.dcm``) and
            ``predict_report.json``/``.csv``.
        checkpoint: network weights (default: the bundle's ``models/model.pt``).
        config: overlay configs merged after ``inference.yaml`` (a path or a file name in
            the bundle's ``configs/``; several as a list or ``a,b``).
        max_frames: predict only the first ``max_frames`` frames of multi-frame inputs
            (clip-level bundles still see the whole clip).
        overrides: other bundle config ids (``network_size``, ``image_size``, ``device``,
            ``batch_size``, ``num_workers``, ...).
        echo: print one line per failed input and per Secondary Capture fallback, and a
            summary.
        max_pixels: inputs with frames of more pixels (height x width, from the header) fail
            before anything is decoded. At most the readers' default, 100 M
            (:data:`echocare.io.readers.DEFAULT_MAX_PIXELS`), which the bundle's own loader
            applies: a larger value would let an input past this check only to stop the bundle.

    Raises:
        ValueError: ``max_frames`` below 1 or ``max_pixels`` outside 1..100 M.

    Returns:
        One :class:`InputResult` per input (also in ``predict_report.json``).
    """
    say = print if echo else (lambda *a, **k: None)
    name, configs = resolve_bundle(bundle)
    config_files = [str(configs / "inference.yaml"), *resolve_overlays(config, configs)]
    task, meta = _bundle_task(configs)
    max_pixels = _check_limits(max_frames, max_pixels)
    out = Path(out).resolve()
    predictions_dir = out / "predictions"
    out.mkdir(parents=True, exist_ok=True)

    files, failed, notes = collect_inputs([inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs))
    for note in notes:
        say(note)
    rows = _check_headers(files, max_pixels)
    readable = [p for p, r in rows.items() if r.status == "ok"]

    datalist_file = out / "predict_inputs.json"
    datalist_file.write_text(json.dumps({"validation": [{"image": str(p)} for p in readable]}, indent=1))
    bundle_overrides = {
        **{k: v for k, v in (overrides or {}).items() if v is not None},
        "input_dir": str(datalist_file),
        "datalist_key": "validation",
        "dataset_dir": "",
        "predictions_dir": str(predictions_dir),
        **({"checkpoint": str(checkpoint)} if checkpoint else {}),
    }
    parser = _parser(config_files, bundle_overrides)
    class_names = [str(c) for c in parser.get_parsed_content("class_names")]
    items_of = _bundle_items(parser, readable, max_frames)
    _check_decoding(rows, readable, items_of, max_pixels)

    kept = [item for path in readable if rows[path].status == "ok" for item in items_of[path]]
    if kept:
        parser["datalist"] = kept
        parser.get_parsed_content("run")
    predictions = _read_predictions(predictions_dir) if kept else {}

    ok = [p for p in readable if rows[p].status == "ok"]
    _write_dicom_results(rows, ok, items_of, predictions, meta, name, task, class_names, out / "dicom", say)
    all_rows = [*failed, *rows.values()]
    _finish_report(out, all_rows, say)
    return all_rows
