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

Two engines run these steps: ``local`` (the default) in this process, the bundle run once over
every item; ``ray`` as a Ray Data pipeline (checks and DICOM writing as Ray tasks, the bundle's
own evaluator in a pool of model actors, on the batches the local run forms), with the same
outputs. Both call the same step functions below; docs/scaling.md has the cluster recipe.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
import uuid
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
from echocare.engines.writers import OUTPUT_NAME_KEY, output_frame, write_prediction_index
from echocare.io import dicom_writer
from echocare.io.readers import (
    DEFAULT_MAX_PIXELS,
    UltrasoundReadError,
    count_frames,
    detect_format,
    iter_frames,
    read_metadata,
)
from echocare.ray_cluster import ray_session, require_ray

__all__ = ["ENGINES", "InputResult", "PredictJob", "collect_inputs", "predict"]

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
    """The bundle writer's records (its ``predictions.json``) grouped by input file, in frame order."""
    index = predictions_dir / "predictions.json"
    return _group_predictions(json.loads(index.read_text())) if index.is_file() else {}


def _group_predictions(records: Sequence[dict[str, Any]]) -> dict[Path, list[dict[str, Any]]]:
    """``records`` of the bundle writer grouped by input file, in frame order."""
    grouped: dict[Path, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
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


def _dicom_stems(rows: dict[Path, InputResult], ok: Sequence[Path], predictions: dict) -> dict[Path, str]:
    """The file stem of each DICOM input's results (``<stem>_seg.dcm``, ...), unique over the run,
    given in input order to the inputs with a prediction."""
    names = UniqueNames()
    return {path: names(str(path)) for path in ok if predictions.get(path) and rows[path].format == "dicom"}


def _write_input_results(
    job: PredictJob, row: InputResult, path: Path, records: Sequence[dict[str, Any]], items: Sequence[dict[str, Any]],
    class_names: list[str], stem: str,
) -> list[str]:
    """Summarise one input's predictions and write its DICOM results (DICOM inputs); an input
    without a prediction, or whose DICOM results cannot be written, fails alone. Returns notes to print."""
    row.summary = _summary(records, job.task, class_names)
    if not records:
        row.status, row.reason = "failed", "the bundle wrote no prediction for it"
        return []
    if row.format != "dicom":
        return []
    algorithm = dicom_writer.Algorithm(name=job.bundle_name, version=str(job.meta.get("version", "")))
    try:
        return _dicom_results(row, path, records, job.task, _is_per_clip(items, row), class_names, algorithm, stem,
                              job.out / "dicom")
    except Exception as exc:  # one bad source must not stop the batch: report it, go on
        row.status, row.reason = "failed", f"cannot write DICOM results ({type(exc).__name__}: {exc})"
        return []


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


# ----------------------------------------------------------------------------- the steps both engines run


@dataclass
class PredictJob:
    """What every step of one predict run needs, whichever engine runs it (plain values: the Ray
    engine ships it to its tasks and actors)."""

    bundle_name: str
    config_files: list[str]
    task: str  # segmentation | classification
    meta: dict[str, Any]  # the bundle's metadata.json
    out: Path  # absolute
    overrides: dict[str, Any]  # bundle config ids (network_size, checkpoint, ...), the inputs aside
    max_frames: int | None
    max_pixels: int

    @property
    def predictions_dir(self) -> Path:
        return self.out / "predictions"

    @property
    def inputs_file(self) -> Path:
        """``predict_inputs.json``: the datalist of the inputs whose header is readable."""
        return self.out / "predict_inputs.json"

    def parser(self, inputs_file: Path):
        """The bundle's inference config over the datalist ``inputs_file``, writing to ``predictions/``."""
        return _parser(self.config_files, {
            **self.overrides,
            "input_dir": str(inputs_file),
            "datalist_key": "validation",
            "dataset_dir": "",
            "predictions_dir": str(self.predictions_dir),
        })


def _prepare_job(bundle: str, out: str | os.PathLike[str], checkpoint: str | None, config: Any,
                 max_frames: int | None, overrides: dict[str, Any] | None, max_pixels: int) -> PredictJob:
    name, configs = resolve_bundle(bundle)
    config_files = [str(configs / "inference.yaml"), *resolve_overlays(config, configs)]
    task, meta = _bundle_task(configs)
    max_pixels = _check_limits(max_frames, max_pixels)
    bundle_overrides = {
        **{k: v for k, v in (overrides or {}).items() if v is not None},
        **({"checkpoint": str(checkpoint)} if checkpoint else {}),
    }
    return PredictJob(name, config_files, task, meta, Path(out).resolve(), bundle_overrides,
                      None if max_frames is None else int(max_frames), max_pixels)


def _write_inputs_file(inputs_file: Path, readable: Sequence[Path]) -> None:
    inputs_file.write_text(json.dumps({"validation": [{"image": str(p)} for p in readable]}, indent=1))


def _check_inputs(job: PredictJob, files: Sequence[Path], inputs_file: Path
                  ) -> tuple[dict[Path, InputResult], list[Path], dict[Path, list[dict[str, Any]]], Any]:
    """Check ``files`` as the bundle will read them: headers, the bundle's own items (datalist
    written to ``inputs_file``), every frame decoded.

    Returns:
        (one row per file, failed or ok; the files whose header is readable; the bundle's items of
        each file that passed; the bundle's parser over ``inputs_file``).
    """
    rows = _check_headers(files, job.max_pixels)
    readable = [p for p, r in rows.items() if r.status == "ok"]
    _write_inputs_file(inputs_file, readable)
    parser = job.parser(inputs_file)
    items_of = _bundle_items(parser, readable, job.max_frames)
    _check_decoding(rows, readable, items_of, job.max_pixels)
    return rows, readable, items_of, parser


def _kept_items(rows: dict[Path, InputResult], items_of: dict[Path, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The bundle items of the inputs that passed, in input order, each with the stem of its
    output files (:data:`OUTPUT_NAME_KEY`), named as one bundle run names them."""
    kept = [item for path, row in rows.items() if row.status == "ok" for item in items_of[path]]
    names = UniqueNames()
    for item in kept:
        item[OUTPUT_NAME_KEY] = names(str(item["image"]), output_frame(item))
    return kept


def _run_bundle(parser, items: list[dict[str, Any]], network: Any = None) -> None:
    """The bundle's own ``run`` (its evaluator and writers) over ``items``; with ``network``, that
    network (already built) instead of building the bundle's again."""
    parser["datalist"] = items
    if network is not None:
        parser["network"] = network
    parser.get_parsed_content("run")


# ----------------------------------------------------------------------------- predict


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
    engine: str = "local",
    ray_address: str | None = None,
    workers: int | None = None,
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
        engine: ``local`` (this process) or ``ray``: the same steps as a Ray Data pipeline
            (:func:`_predict_on_ray`), with the same outputs.
        ray_address: engine ``ray``: the cluster to join; None: a local instance (127.0.0.1, no
            dashboard) of ``workers`` CPUs, or the Ray already initialised in this process.
        workers: engine ``ray``: the CPUs of the local instance (default 1); on a cluster, at
            most this many model actors (default one per GPU, else one per CPU).

    Raises:
        ValueError: ``max_frames`` below 1, ``max_pixels`` outside 1..100 M, an unknown engine,
            or Ray options with ``engine="local"``.

    Returns:
        One :class:`InputResult` per input (also in ``predict_report.json``).
    """
    say = print if echo else (lambda *a, **k: None)
    engine = _check_engine(engine, ray_address, workers)
    job = _prepare_job(bundle, out, checkpoint, config, max_frames, overrides, max_pixels)
    if engine == "ray":
        require_ray()  # before anything is written
    job.out.mkdir(parents=True, exist_ok=True)

    files, failed, notes = collect_inputs([inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs))
    for note in notes:
        say(note)
    if engine == "ray":
        rows = _predict_on_ray(job, files, say, ray_address, workers)
    else:
        rows = _predict_here(job, files, say)
    all_rows = [*failed, *rows.values()]
    _finish_report(job.out, all_rows, say)
    return all_rows


ENGINES = ("local", "ray")


def _check_engine(engine: str, ray_address: str | None, workers: int | None) -> str:
    engine = str(engine).strip().lower()
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    if engine != "ray" and (ray_address or workers is not None):
        raise ValueError("ray_address and workers: only with --engine ray")
    if workers is not None and int(workers) < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return engine


def _predict_here(job: PredictJob, files: Sequence[Path], say: Any) -> dict[Path, InputResult]:
    """The local engine: every step in this process, the bundle run once over every item."""
    rows, readable, items_of, parser = _check_inputs(job, files, job.inputs_file)
    class_names = [str(c) for c in parser.get_parsed_content("class_names")]
    kept = _kept_items(rows, items_of)
    if kept:
        _run_bundle(parser, kept)
    predictions = _read_predictions(job.predictions_dir) if kept else {}
    ok = [p for p in readable if rows[p].status == "ok"]
    stems = _dicom_stems(rows, ok, predictions)
    for path in _progress(ok, "writing results", len(ok)):
        for note in _write_input_results(job, rows[path], path, predictions.get(path, []), items_of[path],
                                         class_names, stems.get(path, "")):
            say(note)
    return rows


# ----------------------------------------------------------------------------- the Ray engine

#: Files per task of the Ray engine's checking and writing steps.
RAY_FILES_PER_TASK = 8
#: Bundle batches per call of a model actor (one evaluator run).
RAY_BATCHES_PER_CALL = 4


def _predict_on_ray(job: PredictJob, files: Sequence[Path], say: Any, address: str | None,
                    workers: int | None) -> dict[Path, InputResult]:
    """The Ray engine: the local engine's steps as a Ray Data pipeline, with the same outputs.

    1. read: tasks of :data:`RAY_FILES_PER_TASK` files check headers, the bundle's items and every
       frame (:func:`_check_inputs`, as the local engine);
    2. the driver names the outputs over the whole run and cuts the items into the bundle's own
       batches (``batch_size`` consecutive items, as the bundle's DataLoader cuts them);
    3. ``map_batches`` over a pool of model actors (:class:`_BundlePredictor`: one per GPU of the
       cluster, else one per CPU): each builds the bundle's parser and network once and runs the
       bundle's evaluator (its preprocessing, inferer, postprocessing, writer) on whole batches, so
       every item meets the same batch as in a local run;
    4. write: tasks of :data:`RAY_FILES_PER_TASK` inputs write the DICOM results
       (:func:`_write_input_results`, as the local engine).

    The driver keeps one row per input (path, status, its items), as the local engine does. Inputs,
    checkpoint and ``out`` must be at the same path on every node (a shared file system).
    """
    with ray_session(address, workers or 1) as ray:
        import ray.data  # noqa: F401  (Ray Data is imported on use: `import ray` does not load it)

        # 1. read and check
        rows: dict[Path, InputResult] = {}
        items_of: dict[Path, list[dict[str, Any]]] = {}
        readable: list[Path] = []
        checked = []
        if files:
            checked = _in_order(ray.data.from_items([{"index": i, "path": str(p)} for i, p in enumerate(files)])
                                .map_batches(_check_batch, batch_size=RAY_FILES_PER_TASK, fn_kwargs={"job": job},
                                             num_cpus=1, batch_format="numpy"))
        for result in checked:
            path = files[int(result["index"])]
            rows[path] = InputResult(**json.loads(result["row"]))
            if result["readable"]:
                readable.append(path)
                items_of[path] = json.loads(result["items"])
        _write_inputs_file(job.inputs_file, readable)
        parser = job.parser(job.inputs_file)
        class_names = [str(c) for c in parser.get_parsed_content("class_names")]

        # 2-3. the bundle on its own batches, in a pool of model actors
        kept = _kept_items(rows, items_of)
        predictions: dict[Path, list[dict[str, Any]]] = {}
        if kept:
            size = int(parser.get_parsed_content("batch_size"))
            batches = [kept[i:i + size] for i in range(0, len(kept), size)]
            gpus = int(ray.cluster_resources().get("GPU", 0))
            actors = gpus or int(ray.cluster_resources().get("CPU", 1))
            actors = max(1, min(actors, int(workers or actors), len(batches)))
            predicted = ray.data.from_items([{"index": i, "items": json.dumps(b)} for i, b in enumerate(batches)])
            predicted = predicted.map_batches(
                _BundlePredictor, batch_size=RAY_BATCHES_PER_CALL, fn_constructor_kwargs={"job": job},
                concurrency=actors, batch_format="numpy", **({"num_gpus": 1} if gpus else {"num_cpus": 1}))
            records = [record for result in _in_order(predicted) for record in json.loads(result["records"])]
            write_prediction_index(job.predictions_dir, records)
            predictions = _group_predictions(records)

        # 4. write
        ok = [p for p in files if p in items_of and rows[p].status == "ok"]
        stems = _dicom_stems(rows, ok, predictions)
        work = [{"index": i, "path": str(p), "row": json.dumps(asdict(rows[p])),
                 "records": json.dumps(predictions.get(p, [])), "items": json.dumps(items_of[p]),
                 "stem": stems.get(p, "")} for i, p in enumerate(ok)]
        if work:
            written = ray.data.from_items(work).map_batches(
                _write_batch, batch_size=RAY_FILES_PER_TASK, fn_kwargs={"job": job, "class_names": class_names},
                num_cpus=1, batch_format="numpy")
            for result in _in_order(written):
                path = ok[int(result["index"])]
                rows[path] = InputResult(**json.loads(result["row"]))
                for note in json.loads(result["notes"]):
                    say(note)
    return rows


def _in_order(dataset: Any) -> list[dict[str, Any]]:
    """The rows of a Ray dataset (the results of one step), in the order of their ``index``."""
    return sorted(dataset.iter_rows(), key=lambda row: int(row["index"]))


def _check_batch(batch: dict[str, np.ndarray], job: PredictJob) -> dict[str, list[Any]]:
    """Step 1 of the Ray engine (a Ray task): a batch of files checked as the local engine checks
    them, the bundle's datalist written to a scratch folder of the worker."""
    files = [Path(str(p)) for p in batch["path"]]
    with tempfile.TemporaryDirectory(prefix="echocare-predict-") as scratch:
        rows, readable, items_of, _ = _check_inputs(job, files, Path(scratch) / "predict_inputs.json")
    return {
        "index": [int(i) for i in batch["index"]],
        "row": [json.dumps(asdict(rows[p])) for p in files],
        "readable": [p in readable for p in files],
        "items": [json.dumps(items_of.get(p, [])) for p in files],
    }


class _BundlePredictor:
    """Step 3 of the Ray engine (a model actor): the bundle's inference parser and network, built
    once; each call runs the bundle's own ``run`` over whole bundle batches of items.

    The bundle's writer writes into a scratch folder of ``predictions/`` per call (its index files
    would collide with other actors' in ``predictions/``); the outputs, already named for the
    whole run, then move into ``predictions/`` and the call returns the index records."""

    def __init__(self, job: PredictJob) -> None:
        self.job = job
        self.parser = job.parser(job.inputs_file)
        self.network = self.parser.get_parsed_content("network")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        # In batch order, so that the last bundle batch (the only one that may be short) comes last.
        order = sorted(range(len(batch["index"])), key=lambda k: int(batch["index"][k]))
        per_batch = [json.loads(batch["items"][k]) for k in order]
        items = [item for bundle_batch in per_batch for item in bundle_batch]
        scratch = self.job.predictions_dir / f".part-{uuid.uuid4().hex}"
        self.parser["predictions_dir"] = str(scratch)
        _run_bundle(self.parser, items, self.network)
        records = json.loads((scratch / "predictions.json").read_text())
        if len(records) != len(items):
            raise RuntimeError(f"{scratch}: the bundle wrote {len(records)} records for {len(items)} items")
        records = _move_outputs(scratch, self.job.predictions_dir, records)
        split, start = [], 0
        for bundle_batch in per_batch:
            split.append(json.dumps(records[start:start + len(bundle_batch)]))
            start += len(bundle_batch)
        return {"index": [int(batch["index"][k]) for k in order], "records": split}


def _move_outputs(scratch: Path, final: Path, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Move a scratch run's output files into ``final`` (their names are unique over the run), drop
    its index files and folder, and return its records with the paths moved."""
    for name in ("predictions.json", "predictions.csv"):
        (scratch / name).unlink(missing_ok=True)
    for written in scratch.iterdir():
        os.replace(written, final / written.name)
    scratch.rmdir()
    prefix = str(scratch) + os.sep
    return [{k: (str(final / v[len(prefix):]) if isinstance(v, str) and v.startswith(prefix) else v)
             for k, v in record.items()} for record in records]


def _write_batch(batch: dict[str, np.ndarray], job: PredictJob, class_names: list[str]) -> dict[str, list[Any]]:
    """Step 4 of the Ray engine (a Ray task): the results of a batch of inputs, written as the
    local engine writes them."""
    out_rows, out_notes = [], []
    for text, path, records, items, stem in zip(batch["row"], batch["path"], batch["records"], batch["items"],
                                                 batch["stem"]):
        row = InputResult(**json.loads(text))
        notes = _write_input_results(job, row, Path(str(path)), json.loads(records), json.loads(items),
                                     class_names, str(stem))
        out_rows.append(json.dumps(asdict(row)))
        out_notes.append(json.dumps(notes))
    return {"index": [int(i) for i in batch["index"]], "row": out_rows, "notes": out_notes}
