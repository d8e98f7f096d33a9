"""One full pretraining step: eager MONAI reference against the fast paths.

A step is what ``echocare.tasks.pretrain.PretrainIteration`` does: forward of
``EchoCarePretrainNet`` (encoder + pixel decoder + anatomy classifier, masked input) under
bf16 autocast on CUDA (float32 on the CPU), ``PretrainLoss`` (masked L1 + hierarchy-coherent
anatomy BCE), backward, ``AdamW`` (lr 1e-4, weight decay 0.05). Inputs are 256x256 random
images with the recipe's masks (32-pixel units, ratio 0.5) and anatomy labels drawn from the
ontology; the weights are random (the same for every variant).

Variants, all in this process on the same batch:

* ``reference``: the network as built (MONAI modules, eager), ``torch.optim.AdamW`` defaults.
* ``fast``: :func:`echocare.networks.fast.use_fast_paths` on a deep copy (fused window
  attention, one token gather per Swin block, group-norm instance norms), ``AdamW(fused=True)``.
* ``fast+ckpt-mlp``, ``fast+ckpt-mlp+conv``, ``fast+ckpt-block``: the same with activation
  checkpointing (memory for compute) of the Swin MLP branches; of those and every residual
  conv block (Swin v2 stages, pixel decoder); of every Swin block and residual conv block.
* ``fast+compile`` (``--compile``): the fast network under ``torch.compile``.

Reported per variant: images/s (best window of ``--steps`` steps over ``--repeats`` windows,
after ``--warmup`` steps), peak memory per image, model FLOP/s (FLOPs of one step counted
once on the reference with ``torch.utils.flop_counter``, divided by each variant's step time:
the math is the same). Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` during a step
divided by the batch size (``peak_memory_per_image_mb``) and the part above what was allocated
before the step (``activation_memory_per_image_mb``); on the CPU the bytes the autograd graph
keeps for the backward pass (``saved_tensors_hooks``, distinct storages), per image.

Correctness: before timing, each variant's loss and gradients on the same batch and mask
(same seed for stochastic depth) are compared with the reference's. On the CPU (float32) a
variant passes when its loss is within 1e-4 (relative) and the relative L2 distance of its
gradients (all parameters together) to the reference's is within bf16 precision (2^-8); the
distances of both to a float64 run are reported too (the reference's own float32 gradients
differ from float64 by up to ~1 % in single tensors of the deep decoder, whose instance norms
act on 8x8 and 16x16 maps, so entry-wise comparisons are meaningless). On CUDA both run under
bf16 autocast and the reference is also run in float32: a variant passes when its gradients
are no further from the float32 gradients than twice the bf16 reference's (+1e-3, relative
L2) and its loss is within 2 %.

JSON (``--out``): ``speedup`` (over ``reference``, images/s) and ``memory_ratio`` (peak
memory per image over the reference's) of ``headline_variant`` (``--headline``; by default the
fastest variant with at most half the reference's memory per image, else ``fast``),
``variants`` (all rows), settings, device, commit.

Usage:
  CPU (tiny):   ``python benchmarks/pretrain_step.py --out cpu.json``
  GPU (base):   ``python benchmarks/pretrain_step.py --device cuda --out gpu.json``
  (defaults follow the device: ``base``, batch 64, bf16 on CUDA; ``tiny``, batch 8, float32 on the CPU)
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

from echocare.tasks.pretrain import EchoCarePretrainNet, PretrainLoss
from echocare.networks.fast import use_fast_paths  # noqa: E402
from echocare.ontology import load_ontology  # noqa: E402


#: bfloat16 machine epsilon (2^-8): the tolerance of the float32 gradient check.
BF16_EPS = 2.0**-8


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batch(ontology, batch_size: int, side: int, network: EchoCarePretrainNet, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(batch_size, 3, side, side, generator=generator)
    unit_mask = network.draw_mask(image, generator)
    labels, known = [], []
    for _ in range(batch_size):
        # a random node (any depth), or no label at all (one draw in ten), as in curated pools
        node = int(torch.randint(ontology.num_nodes + ontology.num_nodes // 9, (1,), generator=generator))
        lab, kn = ontology.label_vector(ontology.path(node) if node < ontology.num_nodes else None)
        labels.append(torch.as_tensor(lab))
        known.append(torch.as_tensor(kn))
    return image, unit_mask, torch.stack(labels), torch.stack(known)


class Variant:
    def __init__(self, name: str, network: torch.nn.Module, fused_adamw: bool, lr: float = 1e-4) -> None:
        self.name = name
        self.network = network
        kwargs = {"lr": lr, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05}
        if fused_adamw:
            try:
                self.optimizer = torch.optim.AdamW(network.parameters(), fused=True, **kwargs)
                self.optimizer_kind = "AdamW(fused=True)"
            except (RuntimeError, TypeError):
                self.optimizer = torch.optim.AdamW(network.parameters(), **kwargs)
                self.optimizer_kind = "AdamW"
        else:
            self.optimizer = torch.optim.AdamW(network.parameters(), **kwargs)
            self.optimizer_kind = "AdamW"


def forward_loss(network, loss_fn, batch, amp: bool, device: torch.device, seed: int | None = None):
    image, unit_mask, labels, known = batch
    if seed is not None:
        torch.manual_seed(seed)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        outputs = network(image, unit_mask)
    return loss_fn(outputs, image, labels, known)["loss"]


def step(variant: Variant, loss_fn, batch, amp: bool, device: torch.device) -> torch.Tensor:
    variant.network.train()
    variant.optimizer.zero_grad(set_to_none=True)
    loss = forward_loss(variant.network, loss_fn, batch, amp, device)
    loss.backward()
    variant.optimizer.step()
    return loss


def gradients(network, loss_fn, batch, amp: bool, device: torch.device) -> tuple[float, dict[str, torch.Tensor]]:
    network.train()
    network.zero_grad(set_to_none=True)
    loss = forward_loss(network, loss_fn, batch, amp, device, seed=1234)
    loss.backward()
    # torch.compile's wrapper names its parameters "_orig_mod.<name>": compare by the network's own names
    grads = {
        k.removeprefix("_orig_mod."): p.grad.detach().float().clone()
        for k, p in network.named_parameters()
        if p.grad is not None
    }
    network.zero_grad(set_to_none=True)
    return loss.item(), grads


def _rel_l2(a: dict, b: dict) -> float:
    num = sum(((a[k] - b[k]) ** 2).sum().item() for k in b)
    den = sum((b[k] ** 2).sum().item() for k in b)
    return (num / max(den, 1e-30)) ** 0.5


def _max_rel(a: dict, b: dict) -> tuple[float, str]:
    return max(((a[k] - b[k]).abs().max().item() / max(b[k].abs().max().item(), 1e-12), k) for k in b)


def saved_bytes(network, loss_fn, batch, amp: bool, device: torch.device) -> int:
    """Bytes of distinct storages the autograd graph keeps for the backward pass of one step."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):
            pass
        return t

    network.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward_loss(network, loss_fn, batch, amp, device, seed=1234)
    loss.backward()
    network.zero_grad(set_to_none=True)
    return sum(storages.values())


def count_flops(network, loss_fn, batch, amp: bool, device: torch.device) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    network.train()
    with FlopCounterMode(display=False) as counter:
        loss = forward_loss(network, loss_fn, batch, amp, device, seed=1234)
        loss.backward()
    network.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def attention_kernels(network, loss_fn, batch, amp: bool, device: torch.device) -> list[str]:
    """Names of the attention kernels one training step runs (which SDPA backend PyTorch chose)."""
    from torch.profiler import ProfilerActivity, profile

    network.train()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss = forward_loss(network, loss_fn, batch, amp, device, seed=1234)
        loss.backward()
    network.zero_grad(set_to_none=True)
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if "attention" in n and n != "aten::scaled_dot_product_attention")


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "echocare", "benchmarks"], cwd=REPO,
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+local changes" if dirty else "")
    except Exception:
        return "unknown"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads, {os.cpu_count()} CPU cores"
    except OSError:
        pass
    return platform.processor() or "cpu"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--size", default=None, help="encoder size (default: base on CUDA, tiny on the CPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 64 on CUDA, 8 on the CPU")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--amp", choices=["auto", "on", "off"], default="auto", help="bf16 autocast (auto: on CUDA only)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="steps per timed window")
    parser.add_argument("--repeats", type=int, default=None, help="timed windows (best counts)")
    parser.add_argument("--variants", default="fast,fast+ckpt-mlp,fast+ckpt-mlp+conv,fast+ckpt-block")
    parser.add_argument("--headline", default="auto",
                        help="variant behind the JSON's speedup/memory_ratio (auto: the fastest with at most"
                             " half the reference's memory per image, else fast)")
    parser.add_argument("--compile", action="store_true", help="also time the fast network under torch.compile")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth (the base recipe's 0.1)")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if not cuda:
        torch.set_num_threads(args.threads)
    size = args.size or ("base" if cuda else "tiny")
    batch_size = args.batch_size or (64 if cuda else 8)
    amp = cuda if args.amp == "auto" else args.amp == "on"
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    steps = args.steps or (10 if cuda else 2)
    repeats = args.repeats or (3 if cuda else 3)

    ontology = load_ontology()
    loss_fn = PretrainLoss(ontology)
    torch.manual_seed(0)
    reference = EchoCarePretrainNet(size, num_anatomy_nodes=ontology.num_nodes, drop_path_rate=args.drop_path)
    with torch.no_grad():  # no constant initialisation may hide a mistake
        generator = torch.Generator().manual_seed(0)
        for p in reference.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.02)
    batch = make_batch(ontology, batch_size, args.image_size, reference)
    batch = tuple(t.to(device) for t in batch)
    reference = reference.to(device)

    names = [n for n in args.variants.split(",") if n]
    variants = [Variant("reference", reference, fused_adamw=False)]
    modes = {"fast": None, "fast+ckpt-mlp": "mlp", "fast+ckpt-mlp+conv": "mlp+conv", "fast+ckpt-block": "block"}
    for name in names:
        variants.append(Variant(name, use_fast_paths(copy.deepcopy(reference), checkpoint=modes[name]), fused_adamw=True))
    if args.compile:
        compiled = use_fast_paths(copy.deepcopy(reference))
        v = Variant("fast+compile", compiled, fused_adamw=True)
        v.network = torch.compile(compiled)
        variants.append(v)

    print(f"device: {_device_name(device)}; encoder {size}; batch {batch_size}; {args.image_size}x{args.image_size}; "
          f"{'bf16 autocast' if amp else 'float32'}")
    # ---- correctness: loss and gradients of each variant against the reference -------------
    checks = {}
    if not args.skip_check:
        # High-precision reference: float64 on the CPU, float32 (no autocast) on CUDA.
        ref_loss, ref_grads = gradients(reference, loss_fn, batch, amp, device)
        if amp:
            hp_loss, hp_grads = gradients(reference, loss_fn, batch, False, device)
        else:
            double = copy.deepcopy(reference).double()
            batch64 = tuple(t.double() if t.is_floating_point() else t for t in batch)
            hp_loss, hp_grads = gradients(double, loss_fn, batch64, False, device)
            hp_grads = {k: g.float() for k, g in hp_grads.items()}
            del double
        ref_err = _rel_l2(ref_grads, hp_grads)
        for v in variants[1:]:
            loss, grads = gradients(v.network, loss_fn, batch, amp, device)
            if set(grads) != set(ref_grads):
                raise SystemExit(f"{v.name}: gradients of different parameters than the reference")
            err = _rel_l2(grads, hp_grads)
            rel_loss = abs(loss - ref_loss) / max(abs(ref_loss), 1e-12)
            to_reference = _rel_l2(grads, ref_grads)
            if amp:  # bf16 noise: no further from the float32 gradients than twice the bf16 reference
                ok = err <= 2.0 * ref_err + 1e-3 and rel_loss <= 0.02
            else:  # float32: within bf16 precision of the reference
                ok = to_reference <= BF16_EPS and rel_loss <= 1e-4
            worst, where = _max_rel(grads, ref_grads)
            checks[v.name] = {
                "loss": loss, "reference_loss": ref_loss, "high_precision_loss": hp_loss, "loss_rel_diff": rel_loss,
                "grad_rel_l2_vs_high_precision": err, "reference_grad_rel_l2_vs_high_precision": ref_err,
                "grad_rel_l2_vs_reference": to_reference, "grad_max_rel_diff_vs_reference": worst,
                "worst_tensor": where, "ok": ok,
            }
            print(f"check {v.name}: {'ok' if ok else 'FAILED'} {json.dumps({k: checks[v.name][k] for k in checks[v.name] if k != 'ok'})}")
        failed = [n for n, c in checks.items() if not c["ok"]]
        if failed:
            raise SystemExit(f"loss/gradients differ from the reference: {failed}")

    flops = count_flops(reference, loss_fn, batch, amp, device)
    kernels = attention_kernels(variants[1].network, loss_fn, batch, amp, device) if len(variants) > 1 else []
    if kernels:
        print(f"attention kernels of {variants[1].name} (forward and backward): {', '.join(kernels)}")

    # ---- memory ---------------------------------------------------------------------------
    memory = {}
    for v in variants:
        if cuda:
            step(v, loss_fn, batch, amp, device)  # optimizer state allocated
            _sync(device)
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step(v, loss_fn, batch, amp, device)
            _sync(device)
            peak = torch.cuda.max_memory_allocated(device)
            memory[v.name] = {"peak_memory_per_image_mb": peak / batch_size / 2**20,
                              "activation_memory_per_image_mb": (peak - before) / batch_size / 2**20}
        else:
            saved = saved_bytes(v.network, loss_fn, batch, amp, device)
            memory[v.name] = {"peak_memory_per_image_mb": saved / batch_size / 2**20,
                              "memory_kind": "autograd saved tensors (CPU)"}

    # ---- speed: windows alternate between the variants ----------------------------------------
    for v in variants:
        for _ in range(warmup):
            step(v, loss_fn, batch, amp, device)
    _sync(device)
    best = {v.name: float("inf") for v in variants}
    for _ in range(repeats):
        for v in variants:
            _sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                step(v, loss_fn, batch, amp, device)
            _sync(device)
            best[v.name] = min(best[v.name], (time.perf_counter() - start) / steps)

    rows = []
    ref_time, ref_mem = best["reference"], memory["reference"]["peak_memory_per_image_mb"]
    print(f"\n{'variant':<18} {'images/s':>9} {'speedup':>8} {'MB/image':>9} {'mem ratio':>9} {'TFLOP/s':>8}  optimizer")
    for v in variants:
        t = best[v.name]
        row = {
            "variant": v.name,
            "images_per_s": batch_size / t,
            "step_s": t,
            "speedup": ref_time / t,
            "model_flop_per_s": flops / t,
            "memory_ratio": memory[v.name]["peak_memory_per_image_mb"] / ref_mem,
            "optimizer": v.optimizer_kind,
            **memory[v.name],
        }
        if v.name in checks:
            row["check"] = checks[v.name]
        rows.append(row)
        print(f"{v.name:<18} {row['images_per_s']:>9.2f} {row['speedup']:>7.2f}x {row['peak_memory_per_image_mb']:>9.1f}"
              f" {row['memory_ratio']:>9.2f} {flops / t / 1e12:>8.3f}  {v.optimizer_kind}")
    ours = [r for r in rows if r["variant"] != "reference"]
    if args.headline == "auto":
        halved = [r for r in ours if r["memory_ratio"] <= 0.5]
        head = max(halved, key=lambda r: r["speedup"]) if halved else next((r for r in ours if r["variant"] == "fast"), ours[0])
    else:
        head = next(r for r in rows if r["variant"] == args.headline)
    result = {
        "benchmark": "pretrain_step",
        "speedup": head["speedup"],
        "memory_ratio": head["memory_ratio"],
        "headline_variant": head["variant"],
        "variants": rows,
        "flop_per_step": flops,
        "attention_kernels": kernels,
        "flop_per_image": flops / batch_size,
        "encoder_size": size,
        "batch_size": batch_size,
        "image_size": args.image_size,
        "precision": "bf16 autocast" if amp else "float32",
        "drop_path_rate": args.drop_path,
        "device": _device_name(device),
        "torch": torch.__version__,
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"\nFLOP per image per step: {flops / batch_size / 1e9:.1f} G; {head['variant']}: speedup"
          f" {result['speedup']:.2f}x, memory ratio {result['memory_ratio']:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
