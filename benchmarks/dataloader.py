"""Pretraining data loading: images per second per worker, from files on disk to 256x256 batches.

The pipeline is the pretraining bundle's own (``train#preprocessing`` of
``bundles/echocare_pretrain/configs/train.yaml``, parsed by MONAI's ConfigParser):
``LoadUltrasoundd`` -> ``Resized`` (area) -> ``AnatomyLabeld`` -> horizontal and vertical
flips -> ``RandResizedCropd`` -> ``RandGrayscaled`` -> ``RandColorJitterd``, then MONAI's
``DataLoader`` collates batches of ``--batch-size``.

The input files are generated in a temporary folder (phantom ultrasound images from
``echocare.phantoms.renderer``), one set per format:

* ``png_256``: 8-bit grey PNG at 256x256 (what ``echocare curate`` writes: the curated pool);
* ``png_480x640``: 8-bit grey PNG at 480x640 (a scanner frame exported as PNG);
* ``dicom_mono_480x640``: uncompressed 8-bit MONOCHROME2 DICOM;
* ``dicom_jpeg_rgb_480x640``: JPEG baseline (YBR_FULL_422) RGB DICOM, as many scanners store.

"Per worker" is measured in one process (``num_workers=0``: the main process does the
work a DataLoader worker does, collation included). ``--workers N`` adds a row with N
worker processes (bounded by the free cores of the machine). Each figure is the best of
``--repeats`` passes over the files (the first pass, which warms the page cache, is not
counted).

JSON (``--out``): ``images_per_s_per_worker`` (all formats mixed, equal numbers of files),
``per_format`` (images/s per worker by format), ``images_per_cpu_s`` and
``per_format_per_cpu_s`` (the same per CPU second of the process: what a worker with a core
to itself reaches, whatever else runs on the machine), ``workers`` rows, and the settings.

Every batch is checked (shape (B, 3, 256, 256), float32, values in [0, 1]). ``--quick`` (4 files per
format, one pass, no workers) checks that and the JSON keys for the test suite; its rates mean nothing.

Usage: ``python benchmarks/dataloader.py [--n 64] [--workers 2] [--out results.json]``
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
FORMATS = ("png_256", "png_480x640", "dicom_mono_480x640", "dicom_jpeg_rgb_480x640")


def _phantom(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, str]:
    from echocare.phantoms.renderer import PRETRAIN_ANATOMIES, make_phantom_image

    anatomy = PRETRAIN_ANATOMIES[int(rng.integers(len(PRETRAIN_ANATOMIES)))]
    side = max(shape)
    image, _ = make_phantom_image(rng, side, organ=anatomy)
    top, left = (side - shape[0]) // 2, (side - shape[1]) // 2
    return np.ascontiguousarray(image[top : top + shape[0], left : left + shape[1]]), anatomy


def _dicom_dataset(rows: int, cols: int):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UltrasoundImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = UltrasoundImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.Rows, ds.Columns = rows, cols
    return ds


def write_files(folder: Path, n: int, seed: int = 0) -> dict[str, list[dict]]:
    """``n`` files per format under ``folder``; returns the datalist items per format."""
    from PIL import Image
    from pydicom.encaps import encapsulate
    from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

    items: dict[str, list[dict]] = {f: [] for f in FORMATS}
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        small, anatomy = _phantom(rng, (256, 256))
        path = folder / f"png256_{i:04d}.png"
        Image.fromarray(small).save(path)
        items["png_256"].append({"image": str(path), "anatomy": anatomy})

        grey, anatomy = _phantom(rng, (480, 640))
        path = folder / f"png480_{i:04d}.png"
        Image.fromarray(grey).save(path)
        items["png_480x640"].append({"image": str(path), "anatomy": anatomy})

        ds = _dicom_dataset(480, 640)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.set_pixel_data(grey, photometric_interpretation="MONOCHROME2", bits_stored=8)
        path = folder / f"mono_{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        items["dicom_mono_480x640"].append({"image": str(path), "anatomy": anatomy})

        # A colour frame: grey echo with a coloured overlay (annotation / Doppler box).
        rgb = np.repeat(grey[..., None], 3, axis=-1)
        rgb[40:120, 60:220, 0] = 255
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=90, subsampling=1)  # 4:2:2
        ds = _dicom_dataset(480, 640)
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds["PixelData"].VR = "OB"
        path = folder / f"jpeg_{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        items["dicom_jpeg_rgb_480x640"].append({"image": str(path), "anatomy": anatomy})
    return items


def bundle_preprocessing(image_size: int = 256):
    """The pretraining bundle's ``train#preprocessing`` Compose, parsed from its train.yaml."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "echocare_pretrain" / "configs" / "train.yaml"))
    parser["image_size"] = image_size
    return parser.get_parsed_content("train#preprocessing", instantiate=True)


def images_per_s(items: list[dict], transform, batch_size: int, workers: int, repeats: int, seed: int = 0):
    """Best images/s over ``repeats`` full passes of a MONAI DataLoader over ``items``:
    ``(per wall second, per CPU second of this process)``; the second is only meaningful
    with ``workers=0`` (all the work in this process) and is robust to other processes
    competing for the cores."""
    from monai.data import DataLoader, Dataset

    transform.set_random_state(seed) if hasattr(transform, "set_random_state") else None
    loader = DataLoader(
        Dataset(items, transform), batch_size=batch_size, shuffle=False, num_workers=workers,
        persistent_workers=workers > 0,
    )
    best_wall = best_cpu = 0.0
    for r in range(repeats + 1):
        start, cpu_start = time.perf_counter(), time.process_time()
        count = 0
        for batch in loader:
            image = batch["image"]
            if tuple(image.shape[1:]) != (3, 256, 256) or image.dtype != torch.float32:
                raise RuntimeError(f"unexpected batch {tuple(image.shape)} {image.dtype}")
            if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
                raise RuntimeError(f"batch values outside [0, 1]: {image.min().item()} .. {image.max().item()}")
            count += image.shape[0]
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        if r > 0:  # the first pass warms the page cache and the workers
            best_wall = max(best_wall, count / wall)
            best_cpu = max(best_cpu, count / cpu)
    return best_wall, best_cpu


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=64, help="files per format")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes (best counts)")
    parser.add_argument("--workers", type=int, default=2, help="also time a DataLoader with this many workers (0: skip)")
    parser.add_argument("--out", type=str, default="", help="write the results as JSON")
    parser.add_argument("--quick", action="store_true",
                        help="4 files per format, batches of 4, one pass, no workers: checks batches and JSON keys (tests)")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.batch_size, args.repeats, args.workers = 4, 4, 1, 0

    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
    transform = bundle_preprocessing(256)
    rows = []
    with tempfile.TemporaryDirectory(prefix="echocare_dataloader_") as tmp:
        start = time.perf_counter()
        items = write_files(Path(tmp), args.n)
        print(f"wrote {args.n} files per format in {time.perf_counter() - start:.1f} s")
        per_format, per_format_cpu = {}, {}
        for fmt in FORMATS:
            per_format[fmt], per_format_cpu[fmt] = images_per_s(items[fmt], transform, args.batch_size, 0, args.repeats)
            rows.append((fmt, 0, per_format[fmt], per_format_cpu[fmt]))
        mixed = [item for group in zip(*(items[f] for f in FORMATS)) for item in group]
        overall, overall_cpu = images_per_s(mixed, transform, args.batch_size, 0, args.repeats)
        rows.append(("mixed", 0, overall, overall_cpu))
        worker_rows = []
        if args.workers > 0:
            rate, _ = images_per_s(mixed, transform, args.batch_size, args.workers, args.repeats)
            worker_rows.append({"workers": args.workers, "images_per_s": rate,
                                "images_per_s_per_worker": rate / args.workers})
            rows.append(("mixed", args.workers, rate, float("nan")))

    print(f"\n{'input':<26} {'workers':>7} {'images/s':>9} {'per worker':>10} {'per CPU-s':>10}")
    for name, workers, rate, cpu_rate in rows:
        print(f"{name:<26} {workers:>7} {rate:>9.1f} {rate / max(workers, 1):>10.1f} {cpu_rate:>10.1f}")
    result = {
        "benchmark": "dataloader",
        "images_per_s_per_worker": overall,
        "per_format": per_format,
        "images_per_cpu_s": overall_cpu,
        "per_format_per_cpu_s": per_format_cpu,
        "workers": worker_rows,
        "image_size": 256,
        "files_per_format": args.n,
        "quick": args.quick,
        "batch_size": args.batch_size,
        "pipeline": "bundles/echocare_pretrain/configs/train.yaml train#preprocessing",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores",
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
