"""CPU inference: eager MONAI float32 reference, the fast exact path, and bf16; base encoder, 256x256.

Networks (as the ``ddti_seg`` and ``busbra_cls`` bundles build them):
``EchoCareSegNet("base", out_channels=2)`` and ``EchoCareClassifier("base", num_classes=4)``,
with **trained weights**: a clean clone has none (``*.pt`` is ignored by git), so each
network is first trained briefly on its real training split (DDTI training images; BUS-BRA
BI-RADS, fold 2's training images) and cached beside ``--out`` (``<out dir>/inference_cache/``;
a later run loads it). The short training (``--train-seconds`` per network, 180 by default,
bounded by wall time: the step that crosses the limit is the last) runs the fast paths under
bf16 autocast where the CPU has bf16 units, batches of 4 at 256x256 with random flips, AdamW
(lr 2e-4; Dice + cross-entropy for the masks, cross-entropy for the classes). It is not the
bundles' recipe: its only purpose is weights whose outputs look like a trained network's
(confident, structured), so that the bf16 agreement means something.

Paths, all on the same weights and inputs:

* ``reference``: the network as built, MONAI's modules run eagerly in float32 under
  ``torch.inference_mode()``;
* ``fast``: :func:`echocare.networks.fast.optimize_for_inference` on a copy (float32, exact:
  outputs within ``--atol`` of the reference or the script exits with an error);
* ``bf16``: :class:`echocare.networks.precision.BF16Inference` on a copy, exactly what a
  bundle runs with ``precision: bf16`` (bf16 autocast, fast paths, bfloat16 matrix weights,
  oneDNN AMX / AVX-512 BF16 kernels).

Timing: ``torch.set_num_threads(--threads)`` (2), every path of a case in one alternating
loop (one pass of each in turn, so that load from other jobs falls on all alike), best wall
time of ``--repeats`` passes after a warm-up (``--clock process``: CPU seconds, one thread).
Batch 1 (latency) and batch 8 (throughput), per image.

**Agreement** of bf16 with float32 (the fast exact path), on real images read as the bundles
read them (grey PNG, area-resized to the network's side, repeated to 3 channels, in [0, 1]):

* ``ddti_seg``: the DDTI validation images (``$ECHOCARE_DATA``, default ``../shared/data``; the
  converter's split by patient), mean Dice of the nodule masks (argmax), both empty counting 1;
* ``busbra_cls``: BUS-BRA fold 2's validation images, the fraction of equal predicted classes
  and the largest difference of a softmax probability;
* ``--agreement-images`` (100) caps each set (first images in datalist order).

``focus_det`` (``ellipse_iou_bf16``: mean IoU of the best ellipse of each class, decoded by the
bundle's own postprocessing) and ``camus_ef`` (``ef_diff_points_bf16``: largest difference of
the ejection fraction, percentage points) are measured on phantoms (no real data of theirs
exists here) with seeded, perturbed untrained weights (``base``; camus at 128x128, 8 frames),
and reported under their own keys, never in the cases.

**FP32 bound.** The FLOPs of one image are counted on the reference
(``torch.utils.flop_counter``, 2 per multiply-add) and a float32 ``2048^3`` matrix product is
timed in the same threads, written in place: in every round of each case's alternating loop,
16 products back to back (about as long as one pass of the paths, so that load from other jobs
and the clock frequency fall on the bound as on the paths); the best round is the case's bound
(its ``sgemm_gflops``; the top-level ``sgemm_gflops`` is the highest of the cases', and
``sgemm_gflops_one_product`` the best single product at the start). The process keeps freed
memory (:func:`~echocare.networks.fast.keep_freed_memory`) from the start, for every path and
the probe alike. ``fp32_fraction_of_bound`` = (FLOPs / sgemm rate) / fast time: 1.0 means the
fast path runs as if every operation were a large float32 matrix product.
``bf16_gemm_gflops`` times the same product in bfloat16.

JSON (``--out``), per case (network x batch): ``speedup_fp32`` (reference / fast),
``fp32_fraction_of_bound``, ``speedup_bf16`` (reference / bf16), ``agreement_bf16`` (Dice or
class agreement; ``max_prob_diff_bf16`` for classes), with the times, FLOPs and largest
differences; top level: the smallest value of each of those four keys, ``cpu_isa`` (which of
``amx_bf16``, ``avx512_bf16``, ``avx512f`` the CPU has), ``bf16_units``, ``sgemm_gflops``,
``bf16_gemm_gflops``, ``ellipse_iou_bf16``, ``ef_diff_points_bf16``, ``targets`` (issue #19:
on a CPU with ``amx_bf16``, ``speedup_bf16`` >= 2.5 and ``agreement_bf16`` >= 0.99 on every
case; ``fp32_fraction_of_bound`` >= 0.9), the training record of the cached weights, the
settings, machine, commit and the seconds of each phase.

``--quick``: ``tiny`` networks at 64x64, one thread, batch 1 and 2, one pass, 2 training steps, 4
agreement images (phantom images where ``$ECHOCARE_DATA`` is absent): checks that the
paths agree and that every key is written, for the test suite; its times mean nothing.

Usage: ``python benchmarks/inference.py --out inference.json`` (about 20 minutes on 2 cores,
training included; later runs reuse the cache). ``--onnx`` and ``--whole-batch`` add the
earlier separate rows (ONNX Runtime; the fast path without micro-batches).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from echocare.networks.fast import keep_freed_memory, optimize_for_inference, reference_paths, use_fast_paths  # noqa: E402
from echocare.networks.precision import BF16Inference, cpu_isa  # noqa: E402
from echocare.tasks.supervised import EchoCareClassifier, EchoCareSegNet  # noqa: E402

#: Issue #19's targets.
TARGET_SPEEDUP_BF16 = 2.5
TARGET_AGREEMENT_BF16 = 0.99
TARGET_FRACTION_OF_BOUND = 0.9
CASE_KEYS = ("speedup_fp32", "fp32_fraction_of_bound", "speedup_bf16", "agreement_bf16")


def _perturb(network: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return network.eval()


def build(name: str, size: str, seed: int = 0) -> torch.nn.Module:
    """The untrained network of bundle ``name`` (seeded, every tensor perturbed so that no
    constant initialisation hides a mistake)."""
    torch.manual_seed(seed)
    if name == "ddti_seg":
        network = EchoCareSegNet(size, out_channels=2)
    elif name == "busbra_cls":
        network = EchoCareClassifier(size, num_classes=4)
    else:
        raise ValueError(name)
    return _perturb(network, seed)


def _first(output):
    return output[-1] if isinstance(output, (list, tuple)) else output


#: The clock of :func:`time_alternating` (``--clock``): wall time, or this process's CPU time.
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "process": time.process_time}
_clock = CLOCKS["wall"]


def time_alternating(paths: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best seconds (of the ``--clock``) of each callable over ``repeats`` rounds, after one
    warm-up round; every round runs each path once, in turn."""
    best = {name: float("inf") for name in paths}
    with torch.inference_mode():
        for run in paths.values():
            run()
        for _ in range(repeats):
            for name, run in paths.items():
                start = _clock()
                run()
                best[name] = min(best[name], _clock() - start)
    return best


def gemm_probe(dtype: torch.dtype = torch.float32, side: int = 2048, products: int = 1) -> tuple[Callable[[], object], float]:
    """``products`` ``side`` x ``side`` matrix products in ``dtype``, back to back, written in
    place (the rate of the products alone, no allocation), and their FLOPs."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(side, side, generator=generator).to(dtype)
    b = torch.randn(side, side, generator=generator).to(dtype)
    product = torch.empty(side, side, dtype=dtype)

    def run() -> None:
        for _ in range(products):
            torch.mm(a, b, out=product)

    return run, 2.0 * side**3 * products


#: Products of the sgemm probe in each timing round (about a second on 2 cores, as long as a
#: pass of the paths): the bound is the rate the machine sustains over such a pass. One product
#: (50 ms) lands on short frequency bursts or dips: 281-409 GFLOP/s where 260-395 were sustained.
PROBE_PRODUCTS = 16


def gemm_gflops(dtype: torch.dtype = torch.float32, repeats: int = 5, side: int = 2048) -> float:
    """Matrix-product rate (GFLOP/s) of this process's threads in ``dtype``: the best of
    ``repeats`` products of two ``side`` x ``side`` matrices (:func:`gemm_probe`)."""
    run, flops = gemm_probe(dtype, side)
    seconds = time_alternating({"gemm": run}, repeats)["gemm"]
    return flops / seconds / 1e9


def count_gflop(network: torch.nn.Module, x: torch.Tensor) -> float:
    """Floating-point operations (GFLOP, 2 per multiply-add) of ``network(x)`` per image."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        network(x)
    return counter.get_total_flops() / 1e9 / x.shape[0]


def onnx_runtime_network(name: str, network: torch.nn.Module, size: str, side: int, folder: Path, threads: int):
    """``network`` exported by :func:`echocare.networks.export.export_bundle` (bundle ``name``,
    its ``network_def`` with these weights) and loaded in ONNX Runtime on ``threads`` threads."""
    from echocare.networks.export import OnnxRuntimeNetwork, export_bundle

    folder.mkdir(parents=True, exist_ok=True)
    checkpoint, model = folder / f"{name}_{size}.pt", folder / f"{name}_{size}_{side}.onnx"
    torch.save(network.state_dict(), checkpoint)
    export_bundle(name, checkpoint, "onnx", model, overrides={"network_size": size, "image_size": side}, verify=False)
    return OnnxRuntimeNetwork(model, num_threads=threads)


# ----------------------------------------------------------------------------- real images


def default_data() -> Path:
    return Path(os.environ.get("ECHOCARE_DATA") or REPO.parent / "shared" / "data")


def _read_grey(path: Path, side: int, mask: bool = False) -> torch.Tensor:
    """(1, side, side): an image in [0, 1] (area resize) or a binary mask (nearest)."""
    from PIL import Image

    with Image.open(path) as im:
        array = np.asarray(im.convert("L"), dtype=np.float32)
    t = torch.from_numpy(array)[None, None]
    if mask:
        return (F.interpolate(t, size=(side, side), mode="nearest")[0] > 127).float()
    return F.interpolate(t / 255.0, size=(side, side), mode="area")[0]


def load_task_images(name: str, data: Path, side: int, split: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, side, side) and targets of ``split`` (``training`` / ``validation``):
    DDTI nodule masks (N, 1, side, side) for ``ddti_seg``, BUS-BRA BI-RADS classes (N,) of
    fold 2 for ``busbra_cls``."""
    from echocare.datasets.converters import convert_datalist

    folder = "ddti" if name == "ddti_seg" else "busbra"
    datalist = convert_datalist(folder, data / folder, None, fold=None if folder == "ddti" else 2)
    items = datalist[split][:limit] if limit else datalist[split]
    images = torch.stack([_read_grey(data / folder / it["image"], side) for it in items]).repeat(1, 3, 1, 1)
    if name == "ddti_seg":
        targets = torch.stack([_read_grey(data / folder / it["label"], side, mask=True) for it in items])
    else:
        targets = torch.tensor([int(it["label"]) for it in items])
    return images, targets


def phantom_task_images(name: str, side: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand-ins of :func:`load_task_images` where the real data is absent (``--quick`` only):
    phantom images with a bright disc (its mask, or its size class)."""
    from echocare.phantoms.renderer import make_phantom_image

    rng = np.random.default_rng(seed)
    images, masks, classes = [], [], []
    yy, xx = np.mgrid[:side, :side]
    for _ in range(n):
        image, _ = make_phantom_image(rng, side, organ="thyroid")
        r = rng.uniform(0.1, 0.3) * side
        disc = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 < r**2
        image = np.where(disc, 40, image).astype(np.float32) / 255.0
        images.append(torch.from_numpy(image)[None].repeat(3, 1, 1))
        masks.append(torch.from_numpy(disc.astype(np.float32))[None])
        classes.append(min(3, int(r / side / 0.05) - 2))
    targets = torch.stack(masks) if name == "ddti_seg" else torch.tensor(classes)
    return torch.stack(images), targets


# ----------------------------------------------------------------------------- short training


def short_training(
    name: str, network: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor,
    seconds: float, max_steps: int, batch_size: int = 4, seed: int = 0,
) -> dict:
    """Train ``network`` in place for at most ``seconds`` (wall) or ``max_steps`` steps
    (fast paths; bf16 autocast where the CPU has bf16 units). Returns the training record."""
    from monai.losses import DiceCELoss

    generator = torch.Generator().manual_seed(seed)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True) if name == "ddti_seg" else torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.AdamW(network.parameters(), lr=2e-4, weight_decay=0.01)
    autocast = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    use_fast_paths(network)
    network.train()
    start, steps, losses = time.perf_counter(), 0, []
    while steps < max_steps and time.perf_counter() - start < seconds:
        index = torch.randint(len(images), (batch_size,), generator=generator)
        x, y = images[index].clone(), targets[index].clone()
        for dim in (2, 3):  # random flips, of the mask too
            flip = torch.rand(batch_size, generator=generator) < 0.5
            x[flip] = x[flip].flip(dim)
            if name == "ddti_seg":
                y[flip] = y[flip].flip(dim)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = _first(network(x))
        loss = loss_function(out.float(), y.long() if name == "busbra_cls" else y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        steps += 1
    reference_paths(network)
    network.eval()
    return {
        "steps": steps,
        "batch_size": batch_size,
        "seconds": round(time.perf_counter() - start, 1),
        "bf16_autocast": autocast,
        "first_loss": losses[0] if losses else None,
        "last_loss_mean_of_5": float(np.mean(losses[-5:])) if losses else None,
        "training_images": len(images),
    }


def trained_network(name: str, size: str, side: int, args: argparse.Namespace, cache: Path) -> tuple[torch.nn.Module, dict]:
    """The network of ``name`` with short-run weights: loaded from ``cache`` when there, else
    trained (:func:`short_training`) and saved there."""
    weights = cache / f"{name}_{size}_{side}_{args.train_seconds:g}s.pt"
    record_file = weights.with_suffix(".json")
    network = build(name, size)
    if weights.is_file() and record_file.is_file():
        network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        record = json.loads(record_file.read_text())
        record["loaded_from"] = str(weights)
        return network.eval(), record
    data = default_data()
    if (data / ("ddti" if name == "ddti_seg" else "busbra")).is_dir():
        images, targets = load_task_images(name, data, side, "training", args.train_images)
        source = f"{data} (training split)"
    elif args.quick:
        images, targets = phantom_task_images(name, side, 8)
        source = "phantoms (no real data)"
    else:
        raise SystemExit(f"{data}: no {name} data; set ECHOCARE_DATA to the shared data folder (or run --quick)")
    record = short_training(name, network, images, targets, args.train_seconds, args.train_steps)
    record["data"] = source
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(network.state_dict(), weights)
    record_file.write_text(json.dumps(record, indent=2))
    record["saved_to"] = str(weights)
    return network, record


# ----------------------------------------------------------------------------- agreement


def dice_agreement(first: torch.Tensor, second: torch.Tensor) -> list[float]:
    """Per-image Dice of two (N, H, W) boolean masks; 1 where both are empty."""
    inter = (first & second).flatten(1).sum(1).double()
    total = (first.flatten(1).sum(1) + second.flatten(1).sum(1)).double()
    return torch.where(total > 0, 2 * inter / total.clamp(min=1), torch.ones_like(total)).tolist()


def agreement(name: str, fp32: torch.nn.Module, bf16: torch.nn.Module, images: torch.Tensor, batch: int = 8) -> dict:
    """bf16 against float32 on ``images``: mean Dice of the foreground masks (``ddti_seg``), or
    the fraction of equal classes and the largest softmax-probability difference."""
    dice, equal, prob_diff = [], [], 0.0
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = images[i : i + batch]
            a, b = _first(fp32(x)).float(), _first(bf16(x)).float()
            if name == "ddti_seg":
                dice += dice_agreement(a.argmax(1) > 0, b.argmax(1) > 0)
            else:
                equal += (a.argmax(1) == b.argmax(1)).tolist()
                prob_diff = max(prob_diff, (a.softmax(1) - b.softmax(1)).abs().max().item())
    if name == "ddti_seg":
        return {"agreement_bf16": float(np.mean(dice)), "min_dice_bf16": float(np.min(dice)), "images": len(dice)}
    return {"agreement_bf16": float(np.mean(equal)), "max_prob_diff_bf16": prob_diff, "images": len(equal)}


def _bundle_parser(bundle: str, overrides: dict):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "inference.yaml"))
    for key, value in overrides.items():
        parser[key] = value
    return parser


def focus_det_agreement(size: str, side: int, n: int) -> dict:
    """``ellipse_iou_bf16``: mean IoU between the float32 and bf16 best ellipse of each class
    (the bundle's ``DecodeEllipsesd``), on ``n`` phantom four-chamber images."""
    from echocare.phantoms.detection import make_focus_image
    from echocare.tasks.detection.metrics import ellipse_iou

    parser = _bundle_parser("focus_det", {"network_size": size, "image_size": side})
    network = _perturb(parser.get_parsed_content("network_def"), 0)
    decode = parser.get_parsed_content("postprocessing")
    fp32 = optimize_for_inference(copy.deepcopy(network))
    bf16 = BF16Inference(copy.deepcopy(network))
    rng = np.random.default_rng(0)
    images = torch.stack([torch.from_numpy(make_focus_image(rng, side)[0].astype(np.float32) / 255.0)[None] for _ in range(n)])
    x = images.repeat(1, 3, 1, 1)
    ious = []
    with torch.inference_mode():
        a, b = fp32(x).float(), bf16(x).float()
    for pa, pb in zip(a, b):
        da, db = decode({"pred": pa}), decode({"pred": pb})
        for k in range(decode.num_classes):
            ea = da["pred_ellipses"][da["pred_classes"] == k]
            eb = db["pred_ellipses"][db["pred_classes"] == k]
            if len(ea) == 0 and len(eb) == 0:
                ious.append(1.0)
            elif len(ea) == 0 or len(eb) == 0:
                ious.append(0.0)
            else:
                ious.append(ellipse_iou(ea[0].tolist(), eb[0].tolist()))
    return {"ellipse_iou_bf16": float(np.mean(ious)), "min_ellipse_iou_bf16": float(np.min(ious)), "images": n,
            "image_size": side, "weights": "untrained (seeded, perturbed)", "data": "phantoms"}


def camus_ef_agreement(size: str, side: int, frames: int, n: int) -> dict:
    """``ef_diff_points_bf16``: largest difference (percentage points) between the float32 and
    bf16 ejection fraction of ``n`` phantom clips (ED to ES, ``frames`` frames)."""
    from echocare.phantoms.regression import make_camus_sequence

    parser = _bundle_parser("camus_ef", {"network_size": size, "image_size": side, "num_frames": frames})
    network = _perturb(parser.get_parsed_content("network_def"), 0)
    scale = float(parser.get_parsed_content("target_scale"))
    fp32 = optimize_for_inference(copy.deepcopy(network))
    bf16 = BF16Inference(copy.deepcopy(network))
    rng = np.random.default_rng(0)
    clips = [torch.from_numpy(make_camus_sequence(rng, side, frames, float(rng.uniform(30, 70)))[0].astype(np.float32) / 255.0)
             for _ in range(n)]
    x = torch.stack(clips)[:, :, None].repeat(1, 1, 3, 1, 1)  # (N, T, 3, H, W)
    with torch.inference_mode():
        a, b = fp32(x).float().reshape(-1) * scale, bf16(x).float().reshape(-1) * scale
    diff = (a - b).abs()
    return {"ef_diff_points_bf16": diff.max().item(), "mean_ef_diff_points_bf16": diff.mean().item(), "clips": n,
            "image_size": side, "frames": frames, "weights": "untrained (seeded, perturbed)", "data": "phantoms"}


# ----------------------------------------------------------------------------- report


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "echocare", "benchmarks"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+local changes" if dirty else "")
    except Exception:
        return "unknown"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def targets(result: dict) -> dict:
    """Issue #19's targets, judged on ``result`` (``None`` where the CPU cannot be held to one)."""
    amx = "amx_bf16" in result["cpu_isa"]
    return {
        "speedup_bf16_ge_2.5": (result["speedup_bf16"] >= TARGET_SPEEDUP_BF16) if amx else None,
        "agreement_bf16_ge_0.99": result["agreement_bf16"] >= TARGET_AGREEMENT_BF16,
        "fp32_fraction_of_bound_ge_0.9": result["fp32_fraction_of_bound"] >= TARGET_FRACTION_OF_BOUND,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="base", help="encoder size (base as released)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per path at batch 1 (best counts; 2 at batch > 1)")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--networks", default="ddti_seg,busbra_cls")
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--train-seconds", type=float, default=180, help="wall-time budget of each short training")
    parser.add_argument("--train-steps", type=int, default=10_000, help="step limit of each short training")
    parser.add_argument("--train-images", type=int, default=0, help="cap on the training images read (0: all)")
    parser.add_argument("--agreement-images", type=int, default=100, help="cap on the validation images of each agreement (0: all)")
    parser.add_argument("--cache", default="", help="trained weights folder (default: inference_cache/ beside --out)")
    parser.add_argument("--no-other-bundles", action="store_true", help="skip focus_det and camus_ef")
    parser.add_argument("--whole-batch", action="store_true",
                        help="also time the fast path without micro-batches (micro_batch=None) at batch > 1 (separate row)")
    parser.add_argument("--onnx", action="store_true", help="also time ONNX Runtime on the exported network (separate row)")
    parser.add_argument("--onnx-dir", default="/tmp/echocare_inference_onnx", help="where --onnx writes the exports")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="'process': CPU seconds of this process, with --threads 1 only")
    parser.add_argument("--quick", action="store_true",
                        help="tiny networks, 64x64, one pass, 2 training steps: correctness and JSON keys only (tests)")
    parser.add_argument("--out", default="", help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.clock == "process" and args.threads != 1:
        parser.error("--clock process needs --threads 1 (CPU time adds up the threads, waiting ones included)")
    if args.quick:
        args.size, args.image_size, args.repeats, args.batch_sizes, args.threads = "tiny", 64, 1, "1,2", 1
        args.train_seconds, args.train_steps, args.agreement_images, args.train_images = 60, 2, 4, 8
    return args


def run_case(name: str, b: int, x: torch.Tensor, paths: dict, args: argparse.Namespace, gflop: float, gemm: float) -> dict:
    """One network at one batch size: every path timed in one loop, outputs compared."""
    reference, fast = paths["reference"], paths["fast"]
    with torch.inference_mode():
        ref_out, fast_out, bf16_out = _first(reference(x)), _first(fast(x)), _first(paths["bf16"](x)).float()
    diff = (ref_out - fast_out).abs().max().item()
    timed = {key: (lambda net=net: net(x)) for key, net in paths.items() if net is not None}
    # the sgemm probe runs in the same rounds as the paths, about as long as one pass, so that
    # load from other jobs and the clock frequency fall on the bound as on the paths
    timed["sgemm"], probe_flops = gemm_probe(torch.float32, products=1 if args.quick else PROBE_PRODUCTS)
    times = time_alternating(timed, args.repeats if b == 1 else max(1, min(2, args.repeats)))
    t_ref, t_fast, t_bf16 = times["reference"], times["fast"], times["bf16"]
    one_product, gemm = gemm, probe_flops / times["sgemm"] / 1e9
    case = {
        "network": name,
        "batch_size": b,
        "reference_ms_per_image": 1e3 * t_ref / b,
        "fast_ms_per_image": 1e3 * t_fast / b,
        "bf16_ms_per_image": 1e3 * t_bf16 / b,
        "speedup_fp32": t_ref / t_fast,
        "fp32_fraction_of_bound": gflop / gemm / (t_fast / b),
        "sgemm_gflops": gemm,
        # against the single product at the start (a 50 ms sample: a burst or a dip)
        "fp32_fraction_of_one_product_bound": gflop / one_product / (t_fast / b),
        "speedup_bf16": t_ref / t_bf16,
        "max_abs_diff": diff,
        "bf16_max_abs_diff": (bf16_out - ref_out).abs().max().item(),
        "output_max_abs": ref_out.abs().max().item(),
        "gflop_per_image": gflop,
    }
    for key in ("onnxruntime", "whole_batch"):
        if key in times:
            with torch.inference_mode():
                row_diff = (_first(paths[key](x)) - ref_out).abs().max().item()
            case[key] = {"ms_per_image": 1e3 * times[key] / b, "speedup_over_reference": t_ref / times[key], "max_abs_diff": row_diff}
    return case


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    global _clock
    _clock = CLOCKS[args.clock]
    started = time.perf_counter()
    phases: dict[str, float] = {}

    torch.set_num_threads(args.threads)
    # as optimize_for_inference does: every path (and the sgemm probe) under the same allocator
    keep_freed_memory()
    isa = cpu_isa()
    bf16_units = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and bool({"amx_bf16", "avx512_bf16"} & set(isa))
    if not bf16_units:
        print("this CPU has no bf16 units (amx_bf16 / avx512_bf16): bf16 runs emulated; the figures follow")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    side = args.image_size
    out = Path(args.out) if args.out else None
    cache = Path(args.cache) if args.cache else (out.parent if out else Path.cwd()) / "inference_cache"
    generator = torch.Generator().manual_seed(1)
    inputs = {b: torch.rand(b, 3, side, side, generator=generator) for b in batch_sizes}
    gemm, bf16_gemm = gemm_gflops(torch.float32), gemm_gflops(torch.bfloat16)
    phases["gemm"] = time.perf_counter() - started
    print(f"cpu_isa {isa}; sgemm {gemm:.0f} GFLOP/s, bf16 GEMM {bf16_gemm:.0f} GFLOP/s on {args.threads} threads")
    print(f"{'case':<22} {'batch':>5} {'reference':>12} {'fast':>10} {'bf16':>10} {'fp32 x':>7} {'of bound':>8} {'bf16 x':>7} {'agreement':>9}")
    cases, training, agreements, failures = [], {}, {}, []
    data = default_data()
    for name in args.networks.split(","):
        t0 = time.perf_counter()
        reference, training[name] = trained_network(name, args.size, side, args, cache)
        phases[f"{name}_weights"] = time.perf_counter() - t0
        paths = {
            "reference": reference,
            "fast": optimize_for_inference(copy.deepcopy(reference)),
            "bf16": BF16Inference(copy.deepcopy(reference)),
            "whole_batch": optimize_for_inference(copy.deepcopy(reference), micro_batch=None) if args.whole_batch else None,
            "onnxruntime": onnx_runtime_network(name, reference, args.size, side, Path(args.onnx_dir), args.threads)
            if args.onnx else None,
        }
        if set(paths["fast"].state_dict()) != set(reference.state_dict()):
            raise RuntimeError("the fast path changed the state dict keys")
        t0 = time.perf_counter()
        if (data / ("ddti" if name == "ddti_seg" else "busbra")).is_dir():
            images, _ = load_task_images(name, data, side, "validation", args.agreement_images or None)
            source = f"{data} (validation split)"
        else:
            images, _ = phantom_task_images(name, side, args.agreement_images, seed=1)
            source = "phantoms (no real data)"
        agreements[name] = {**agreement(name, paths["fast"], paths["bf16"], images), "data": source}
        phases[f"{name}_agreement"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        gflop = count_gflop(reference, inputs[batch_sizes[0]][:1])
        for b in batch_sizes:
            case = run_case(name, b, inputs[b], {k: v for k, v in paths.items() if v is not None}, args, gflop, gemm)
            case.update({k: v for k, v in agreements[name].items() if k.endswith("_bf16")})
            cases.append(case)
            label = "latency" if b == 1 else "throughput"
            print(f"{name + ' ' + label:<22} {b:>5} {case['reference_ms_per_image']:>9.0f} ms {case['fast_ms_per_image']:>7.0f} ms"
                  f" {case['bf16_ms_per_image']:>7.0f} ms {case['speedup_fp32']:>6.2f}x {case['fp32_fraction_of_bound']:>8.2f}"
                  f" {case['speedup_bf16']:>6.2f}x {case['agreement_bf16']:>9.4f}")
            if case["max_abs_diff"] > args.atol:
                failures.append(f"{name} batch {b}: max |diff| {case['max_abs_diff']:.2e} > {args.atol}")
        phases[f"{name}_timing"] = time.perf_counter() - t0
        del paths, reference

    other: dict[str, dict] = {}
    if not args.no_other_bundles:
        t0 = time.perf_counter()
        other["focus_det"] = focus_det_agreement(args.size, side, 2 if args.quick else 8)
        other["camus_ef"] = camus_ef_agreement(args.size, 64 if args.quick else 128, 2 if args.quick else 8, 2 if args.quick else 4)
        phases["other_bundles"] = time.perf_counter() - t0
        print(f"focus_det ellipse_iou_bf16 {other['focus_det']['ellipse_iou_bf16']:.4f}; "
              f"camus_ef ef_diff_points_bf16 {other['camus_ef']['ef_diff_points_bf16']:.3f}")

    result = {
        "benchmark": "inference",
        **{key: min(c[key] for c in cases) for key in CASE_KEYS},
        "cpu_isa": isa,
        "bf16_units": bf16_units,
        "sgemm_gflops": max(c["sgemm_gflops"] for c in cases),
        "sgemm_gflops_one_product": gemm,
        "bf16_gemm_gflops": bf16_gemm,
        "ellipse_iou_bf16": other.get("focus_det", {}).get("ellipse_iou_bf16"),
        "ef_diff_points_bf16": other.get("camus_ef", {}).get("ef_diff_points_bf16"),
        "cases": cases,
        "agreement": agreements,
        "other_bundles": other,
        "training": training,
        "encoder_size": args.size,
        "image_size": side,
        "threads": args.threads,
        "clock": args.clock,
        "repeats": args.repeats,
        "atol": args.atol,
        "quick": args.quick,
        "outputs_equal": not failures,
        "machine": f"{_cpu_name()}, {os.cpu_count()} CPU cores",
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
    }
    result["targets"] = targets(result)
    phases["total"] = time.perf_counter() - started
    result["seconds"] = {k: round(v, 1) for k, v in phases.items()}
    print("\nsmallest: " + ", ".join(f"{k} {result[k]:.3f}" for k in CASE_KEYS) + f"; targets {result['targets']}"
          f"; {phases['total']:.0f} s")
    if out:
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    if failures:
        raise SystemExit("outputs differ: " + "; ".join(failures))
    return result


if __name__ == "__main__":
    main()
