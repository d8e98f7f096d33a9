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
time of ``--repeats`` passes after a warm-up pass. Latency is per image at batch 1,
throughput is images per second at batch 8. The outputs of the two paths must agree within
``--atol`` (1e-4); the script exits with an error otherwise.

``--bf16`` adds a reduced-precision row per case, reported separately and never counted in
``speedup``: the fast path with bfloat16 weights and inputs (oneDNN AMX/AVX-512 kernels),
with its deviation from the float32 reference and the agreement of its predictions
(argmax class / argmax label per pixel).

JSON (``--out``): ``speedup`` (the smallest fast/reference speedup over the networks and
batch sizes), ``cases`` (one entry per network and batch size), ``encoder`` (the encoder
alone, for reference), the settings, machine and commit.

Usage: ``python benchmarks/inference.py [--repeats 5] [--bf16] [--out results.json]``
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
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from echocare.networks import EchoCareClassifier, EchoCareSegNet  # noqa: E402
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


def time_pair(reference, fast, x, repeats: int) -> tuple[float, float]:
    """Best wall seconds of ``reference(x)`` and ``fast(x)`` over ``repeats`` alternating passes."""
    best_ref = best_fast = float("inf")
    with torch.inference_mode():
        reference(x)
        fast(x)
        for _ in range(repeats):
            start = time.perf_counter()
            reference(x)
            best_ref = min(best_ref, time.perf_counter() - start)
            start = time.perf_counter()
            fast(x)
            best_fast = min(best_fast, time.perf_counter() - start)
    return best_ref, best_fast


def time_one(network, x, repeats: int) -> float:
    """Best wall seconds of ``network(x)`` over ``repeats`` passes after a warm-up pass."""
    best = float("inf")
    with torch.inference_mode():
        network(x)
        for _ in range(repeats):
            start = time.perf_counter()
            network(x)
            best = min(best, time.perf_counter() - start)
    return best


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
    parser.add_argument("--no-encoder", action="store_true", help="skip the encoder-alone rows")
    parser.add_argument("--out", default="", help="write the results as JSON")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    side = args.image_size
    generator = torch.Generator().manual_seed(1)
    inputs = {b: torch.rand(b, 3, side, side, generator=generator) for b in batch_sizes}
    cases, encoder_rows, failures = [], [], []
    print(f"{'case':<22} {'batch':>5} {'reference':>12} {'fast':>12} {'speedup':>8} {'max |diff|':>11}")
    for name in args.networks.split(","):
        reference = build(name, args.size)
        fast = optimize_for_inference(copy.deepcopy(reference))
        if set(fast.state_dict()) != set(reference.state_dict()):
            raise RuntimeError("the fast path changed the state dict keys")
        lowp = None
        if args.bf16:
            lowp = optimize_for_inference(copy.deepcopy(reference)).to(torch.bfloat16)
        for b in batch_sizes:
            x = inputs[b]
            with torch.inference_mode():
                ref_out, fast_out = _first(reference(x)), _first(fast(x))
            diff = (ref_out - fast_out).abs().max().item()
            t_ref, t_fast = time_pair(reference, fast, x, args.repeats if b == 1 else max(2, args.repeats // 2))
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
            }
            label = "latency" if b == 1 else "throughput"
            print(f"{name + ' ' + label:<22} {b:>5} {case['reference_ms_per_image']:>9.0f} ms {case['fast_ms_per_image']:>9.0f} ms"
                  f" {case['speedup']:>7.2f}x {diff:>11.1e}")
            if diff > args.atol:
                failures.append(f"{name} batch {b}: max |diff| {diff:.2e} > {args.atol}")
            if lowp is not None:
                t_low = time_one(lowp, x.to(torch.bfloat16), max(2, args.repeats // 2))
                with torch.inference_mode():
                    low_out = _first(lowp(x.to(torch.bfloat16))).float()
                agree = (low_out.argmax(1) == ref_out.argmax(1)).float().mean().item()
                case["bf16"] = {
                    "ms_per_image": 1e3 * t_low / b,
                    "speedup_over_reference": t_ref / t_low,
                    "max_abs_diff": (low_out - ref_out).abs().max().item(),
                    "argmax_agreement": agree,
                }
                print(f"{'  bf16 (separate)':<22} {b:>5} {'':>12} {1e3 * t_low / b:>9.0f} ms {t_ref / t_low:>7.2f}x"
                      f" {case['bf16']['max_abs_diff']:>11.1e}  argmax agreement {agree:.3f}")
            cases.append(case)
        if not args.no_encoder and name == args.networks.split(",")[0]:
            x = inputs[batch_sizes[0]]
            t_ref, t_fast = time_pair(reference.encoder, fast.encoder, x, args.repeats)
            b = batch_sizes[0]
            encoder_rows.append({"batch_size": b, "reference_ms_per_image": 1e3 * t_ref / b,
                                 "fast_ms_per_image": 1e3 * t_fast / b, "speedup": t_ref / t_fast})
            print(f"{'encoder alone':<22} {b:>5} {1e3 * t_ref / b:>9.0f} ms {1e3 * t_fast / b:>9.0f} ms {t_ref / t_fast:>7.2f}x")
        del reference, fast, lowp

    result = {
        "benchmark": "inference",
        "speedup": min(c["speedup"] for c in cases),
        "cases": cases,
        "encoder": encoder_rows,
        "encoder_size": args.size,
        "image_size": side,
        "threads": args.threads,
        "repeats": args.repeats,
        "atol": args.atol,
        "outputs_equal": not failures,
        "machine": f"{_cpu_name()}, {os.cpu_count()} CPU cores",
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
    }
    print(f"\nspeedup (smallest over networks and batch sizes): {result['speedup']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    if failures:
        raise SystemExit("outputs differ: " + "; ".join(failures))
    return result


if __name__ == "__main__":
    main()
