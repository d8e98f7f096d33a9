"""CPU inference: eager MONAI reference against the fast exact path, base encoder, 256x256.

Networks (as the ``ddti_seg`` and ``busbra_cls`` bundles build them):
``EchoCareSegNet("base", out_channels=2)`` and ``EchoCareClassifier("base", num_classes=4)``.
Their weights are random (seeded; every tensor perturbed so that no constant initialisation
hides a mistake); speed does not depend on the values.

* ``reference``: the network as built, i.e. MONAI's ``SwinTransformer`` / ``UnetrBasicBlock`` /
  ``UnetrUpBlock`` modules run eagerly in float32 under ``torch.inference_mode()``.
* ``fast``: a deep copy of the same network after
  :func:`echocare.networks.fast.optimize_for_inference` (same weights, same state dict),
  float32, ``torch.inference_mode()``.

Both run in this process on the same inputs, with ``torch.set_num_threads(--threads)``
(default 2), alternating reference and fast passes; each figure is the best (minimum) wall
time of ``--repeats`` passes after a warm-up pass. On a CPU shared with other jobs,
``--threads 1 --clock process`` times CPU seconds instead (what one thread computes, not
how long it waited for a core; with two threads a busy machine mostly measures how often a
parallel operation waits for its second thread). Latency is per image at batch 1,
throughput is images per second at batch 8. The outputs of the two paths must agree within
``--atol`` (1e-4); the script exits with an error otherwise.

``--bf16`` adds a reduced-precision row per case, reported separately and never counted in
``speedup``: the fast path with bfloat16 weights and inputs (oneDNN AMX/AVX-512 kernels),
with its deviation from the float32 reference and the agreement of its predictions
(argmax class / argmax label per pixel).

``--whole-batch`` adds a row per batch size above 1, reported separately: the fast path
without micro-batches (``optimize_for_inference(..., micro_batch=None)``), to check the
default (one image at a time in the encoder and the high-resolution decoder blocks) on the
machine at hand.

``--onnx`` adds an ONNX Runtime row per case (CPU execution provider, all graph
optimisations, ``--threads`` intra-op threads), reported separately: the network exported
by :func:`echocare.networks.export.export_bundle` (the bundle's ``network_def`` with the
same weights; exporting the ``base`` segmentation network takes about a minute and 1 GB of
disk under ``--onnx-dir``).

Every path of a case is timed in the same loop, one pass of each in turn, so that load
from other jobs falls on all of them alike.

**FP32 bound.** The floating-point operations of one image are counted on the reference
(``torch.utils.flop_counter``: matrix products and convolutions, 2 per multiply-add), and a
float32 ``2048^3`` matrix product is timed in the same process and threads (``sgemm``, the
best of several runs). ``fp32_bound_speedup`` = reference time / (FLOPs / sgemm rate): the
speedup that any float32 implementation of the same arithmetic would reach if every one of
its operations ran at that matrix-product rate (in practice it cannot: convolutions and
small matrices run below it). A speedup above it needs less arithmetic (e.g. Winograd
convolutions) or lower precision (the bf16 row).

JSON (``--out``): ``speedup`` (the smallest fast/reference speedup over the networks and
batch sizes), ``cases`` (one entry per network and batch size, with ``gflop_per_image``,
``fp32_bound_speedup`` and the optional ``bf16`` / ``onnxruntime`` entries), ``encoder``
(the encoder alone, for reference), ``sgemm_gflops``, the settings, machine and commit.

Usage: ``python benchmarks/inference.py [--repeats 5] [--bf16] [--onnx] [--out results.json]``
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

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from echocare.tasks.supervised import EchoCareClassifier, EchoCareSegNet
from echocare.networks.fast import optimize_for_inference  # noqa: E402


def _perturb(network: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in network.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    return network.eval()


def build(name: str, size: str, seed: int = 0) -> torch.nn.Module:
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


def sgemm_gflops(repeats: int = 5, side: int = 2048) -> float:
    """Float32 matrix-product rate (GFLOP/s) of this process's threads: the best of ``repeats``
    products of two ``side`` x ``side`` matrices."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(side, side, generator=generator)
    b = torch.randn(side, side, generator=generator)
    seconds = time_alternating({"sgemm": lambda: torch.mm(a, b)}, repeats)["sgemm"]
    return 2 * side**3 / seconds / 1e9


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


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="base", help="encoder size (base as released)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per path (best counts)")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--networks", default="ddti_seg,busbra_cls")
    parser.add_argument("--atol", type=float, default=1e-4)
    parser.add_argument("--bf16", action="store_true", help="also time a bfloat16 fast path (reported separately)")
    parser.add_argument("--whole-batch", action="store_true",
                        help="also time the fast path without micro-batches (micro_batch=None) at batch > 1 (separate row)")
    parser.add_argument("--onnx", action="store_true", help="also time ONNX Runtime on the exported network (separate row)")
    parser.add_argument("--onnx-dir", default="/tmp/echocare_inference_onnx", help="where --onnx writes the exports")
    parser.add_argument("--no-encoder", action="store_true", help="skip the encoder-alone rows")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="'process': CPU seconds of this process, with --threads 1 only (on a CPU shared "
                             "with other jobs, one thread's CPU time does not count the time it waits for the cores)")
    parser.add_argument("--out", default="", help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.clock == "process" and args.threads != 1:
        parser.error("--clock process needs --threads 1 (CPU time adds up the threads, waiting ones included)")
    global _clock
    _clock = CLOCKS[args.clock]

    torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    side = args.image_size
    generator = torch.Generator().manual_seed(1)
    inputs = {b: torch.rand(b, 3, side, side, generator=generator) for b in batch_sizes}
    cases, encoder_rows, failures = [], [], []
    gemm = sgemm_gflops()
    print(f"sgemm {gemm:.0f} GFLOP/s on {args.threads} threads")
    print(f"{'case':<22} {'batch':>5} {'reference':>12} {'fast':>12} {'speedup':>8} {'max |diff|':>11} {'fp32 bound':>10}")
    for name in args.networks.split(","):
        reference = build(name, args.size)
        fast = optimize_for_inference(copy.deepcopy(reference))
        if set(fast.state_dict()) != set(reference.state_dict()):
            raise RuntimeError("the fast path changed the state dict keys")
        gflop = count_gflop(reference, inputs[1] if 1 in inputs else inputs[batch_sizes[0]][:1])
        lowp = optimize_for_inference(copy.deepcopy(reference)).to(torch.bfloat16) if args.bf16 else None
        whole = optimize_for_inference(copy.deepcopy(reference), micro_batch=None) if args.whole_batch else None
        ort = onnx_runtime_network(name, reference, args.size, side, Path(args.onnx_dir), args.threads) if args.onnx else None
        for b in batch_sizes:
            x = inputs[b]
            with torch.inference_mode():
                ref_out, fast_out = _first(reference(x)), _first(fast(x))
            diff = (ref_out - fast_out).abs().max().item()
            paths = {"reference": lambda: reference(x), "fast": lambda: fast(x)}
            if lowp is not None:
                x_low = x.to(torch.bfloat16)
                paths["bf16"] = lambda: lowp(x_low)
            if ort is not None:
                paths["onnxruntime"] = lambda: ort(x)
            if whole is not None and b > 1:
                paths["whole_batch"] = lambda: whole(x)
            times = time_alternating(paths, args.repeats if b == 1 else max(2, args.repeats // 2))
            t_ref, t_fast = times["reference"], times["fast"]
            case = {
                "network": name,
                "batch_size": b,
                "reference_ms_per_image": 1e3 * t_ref / b,
                "fast_ms_per_image": 1e3 * t_fast / b,
                "reference_images_per_s": b / t_ref,
                "fast_images_per_s": b / t_fast,
                "speedup": t_ref / t_fast,
                "max_abs_diff": diff,
                "output_max_abs": ref_out.abs().max().item(),
                "gflop_per_image": gflop,
                "fp32_bound_speedup": t_ref / b / (gflop / gemm),
            }
            label = "latency" if b == 1 else "throughput"
            print(f"{name + ' ' + label:<22} {b:>5} {case['reference_ms_per_image']:>9.0f} ms {case['fast_ms_per_image']:>9.0f} ms"
                  f" {case['speedup']:>7.2f}x {diff:>11.1e} {case['fp32_bound_speedup']:>9.2f}x")
            if diff > args.atol:
                failures.append(f"{name} batch {b}: max |diff| {diff:.2e} > {args.atol}")
            if lowp is not None:
                t_low = times["bf16"]
                with torch.inference_mode():
                    low_out = _first(lowp(x_low)).float()
                agree = (low_out.argmax(1) == ref_out.argmax(1)).float().mean().item()
                case["bf16"] = {
                    "ms_per_image": 1e3 * t_low / b,
                    "speedup_over_reference": t_ref / t_low,
                    "max_abs_diff": (low_out - ref_out).abs().max().item(),
                    "argmax_agreement": agree,
                }
                print(f"{'  bf16 (separate)':<22} {b:>5} {'':>12} {1e3 * t_low / b:>9.0f} ms {t_ref / t_low:>7.2f}x"
                      f" {case['bf16']['max_abs_diff']:>11.1e}  argmax agreement {agree:.3f}")
            for key, label, network in (("onnxruntime", "onnxruntime (sep.)", ort), ("fast_whole_batch", "fast, whole batch", whole)):
                timing = "whole_batch" if key == "fast_whole_batch" else key
                if network is None or timing not in times:
                    continue
                t_row = times[timing]
                with torch.inference_mode():
                    row_diff = (_first(network(x)) - ref_out).abs().max().item()
                case[key] = {"ms_per_image": 1e3 * t_row / b, "speedup_over_reference": t_ref / t_row, "max_abs_diff": row_diff}
                print(f"{'  ' + label:<22} {b:>5} {'':>12} {1e3 * t_row / b:>9.0f} ms {t_ref / t_row:>7.2f}x {row_diff:>11.1e}")
            cases.append(case)
        if not args.no_encoder and name == args.networks.split(",")[0]:
            b = batch_sizes[0]
            x = inputs[b]
            times = time_alternating({"reference": lambda: reference.encoder(x), "fast": lambda: fast.encoder(x)}, args.repeats)
            t_ref, t_fast = times["reference"], times["fast"]
            enc_gflop = count_gflop(reference.encoder, x[:1])
            encoder_rows.append({"batch_size": b, "reference_ms_per_image": 1e3 * t_ref / b,
                                 "fast_ms_per_image": 1e3 * t_fast / b, "speedup": t_ref / t_fast,
                                 "gflop_per_image": enc_gflop, "fp32_bound_speedup": t_ref / b / (enc_gflop / gemm)})
            print(f"{'encoder alone':<22} {b:>5} {1e3 * t_ref / b:>9.0f} ms {1e3 * t_fast / b:>9.0f} ms {t_ref / t_fast:>7.2f}x"
                  f" {'':>11} {encoder_rows[-1]['fp32_bound_speedup']:>9.2f}x")
        del reference, fast, lowp, ort, whole

    result = {
        "benchmark": "inference",
        "speedup": min(c["speedup"] for c in cases),
        "fp32_bound_speedup": min(c["fp32_bound_speedup"] for c in cases),
        "sgemm_gflops": gemm,
        "cases": cases,
        "encoder": encoder_rows,
        "encoder_size": args.size,
        "image_size": side,
        "threads": args.threads,
        "clock": args.clock,
        "repeats": args.repeats,
        "atol": args.atol,
        "outputs_equal": not failures,
        "machine": f"{_cpu_name()}, {os.cpu_count()} CPU cores",
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
    }
    print(f"\nspeedup (smallest over networks and batch sizes): {result['speedup']:.2f}x; "
          f"FP32 bound of that case set: {result['fp32_bound_speedup']:.2f}x (at {gemm:.0f} GFLOP/s)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    if failures:
        raise SystemExit("outputs differ: " + "; ".join(failures))
    return result


if __name__ == "__main__":
    main()
