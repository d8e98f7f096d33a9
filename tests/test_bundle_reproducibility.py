"""Every bundle's metrics from a fixed-seed tiny run, recorded: a refactoring must not change results.

Each bundle makes its phantom data (``echocare demo-data``; small made-up blob images for the
two bundles without a phantom, ``ddti_seg`` and ``busbra_cls``), trains one epoch with the tiny
encoder on a handful of items and evaluates the best checkpoint; the test compares
``eval/summary.json`` with the values in :data:`RECORDED`. The values were recorded on the tree
before the structure move (#16, commit 542ffbe) and reproduced after it.

Only the command line and the JSON files are used (``echocare demo-data``, ``python -m
monai.bundle run``), never a module path, so the same file runs on any version of the package.
All runs share one interpreter (one start-up of torch and MONAI); each bundle's config seeds
everything in its ``initialize`` step. The runs are on the CPU with one thread: with several
threads, or on a GPU, float sums may be reduced in another order.

The values depend on the CPU's floating-point kernels; on another machine they may differ in the
last digits (hence the relative tolerance). To re-record after a change that is meant to change
results: ``ECHOCARE_RECORD=1 pytest tests/test_bundle_reproducibility.py -s`` prints the dict.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bundle_helpers import REPO, blob_dataset

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

RELATIVE_TOLERANCE = 1e-6
WEIGHTS = "model.pt |weights| sum"  # recorded beside the metrics of eval/summary.json

# Every bundle: (phantom, extra training/evaluation ids). Phantom: (demo-data task, n, options), or
# "blobs_seg" / "blobs_cls" for the two bundles without a demo-data task.
COMMON = ["--network_size", "tiny", "--batch_size", "4", "--num_workers", "0", "--progress_bar", "False"]
# The UNETR-style decoders need 64 pixels (instance norm of the deepest map); the others take 32.
IMAGE_SIZE_64 = {"ddti_seg", "musv_seg", "abdomen_seg", "brain_landmark", "usenhance", "echocare_pretrain"}
BUNDLES: dict[str, tuple] = {
    "ddti_seg": ("blobs_seg", []),
    "musv_seg": (("musv_seg", 8, {}), []),
    "abdomen_seg": (("abdomen_seg", 8, {}), []),
    "busbra_cls": ("blobs_cls", []),
    "thyroid_cls": (("thyroid_cls", 12, {"frames": 2}), []),
    "fll_cls": (("fll_cls", 8, {"frames": 2}), []),
    "focus_det": (("focus_det", 8, {}), []),
    "brain_landmark": (("brain_landmark", 8, {}), []),
    "camus_ef": (("camus_ef", 8, {"frames": 2}), ["--num_frames", "2"]),
    "usenhance": (("usenhance", 8, {}), []),
    "usreport": (("usreport", 8, {}), ["--d_model", "32", "--decoder_layers", "1", "--decoder_heads", "2",
                                      "--max_report_length", "24", "--min_token_count", "1"]),
    "echocare_pretrain": (("pretrain", 8, {}), ["--mask_unit", "16"]),
}

# eval/summary.json of each bundle and its weights fingerprint (the tree before #16's move, one CPU thread).
# Re-recorded for #18: ddti_seg, musv_seg, abdomen_seg, busbra_cls and usreport (augmentation shifts in pixels,
# point 5), the segmentation bundles also scored at each image's original size (point 11).
RECORDED: dict[str, dict[str, float]] = {
    "abdomen_seg": {
        "dice_bladder": 0.0,
        "dice_kidney": 0.0440729483962,
        "dice_liver": 0.454079672694,
        "dice_pancreas": 0.0370813384652,
        "dice_spleen": 0.0,
        "mean_dice": 0.107046786696,
        "mean_nsd": 0.137311771512,
        "model.pt |weights| sum": 125734.548561,
        "nsd_bladder": 0.0,
        "nsd_kidney": 0.145367413759,
        "nsd_liver": 0.424931243062,
        "nsd_pancreas": 0.116260163486,
        "nsd_spleen": 0.0,
    },
    "brain_landmark": {
        "model.pt |weights| sum": 125720.96833,
        "mre_px": 27.2231594767,
        "mre_px_atrium_far": 40.5014615808,
        "mre_px_atrium_near": 18.3890198409,
        "mre_px_cerebellum_far": 35.0723902212,
        "mre_px_cerebellum_near": 26.6294786937,
        "mre_px_choroid_plexus_far": 32.4675218312,
        "mre_px_choroid_plexus_near": 15.2965965629,
        "mre_px_cisterna_magna": 30.5847278191,
        "mre_px_csp_anterior": 27.6894803706,
        "mre_px_csp_posterior": 29.9006074359,
        "mre_px_falx_anterior": 17.1566435855,
        "mre_px_falx_posterior": 18.781963151,
        "mre_px_frontal_horn_far": 33.1590044014,
        "mre_px_frontal_horn_near": 15.7741948551,
        "mre_px_skull_inner_anterior": 45.3492815152,
        "mre_px_skull_inner_far": 41.9348083936,
        "mre_px_skull_inner_near": 4.89012418592,
        "mre_px_skull_inner_posterior": 26.0638791798,
        "mre_px_skull_outer_anterior": 31.0240325572,
        "mre_px_skull_outer_far": 31.7873861708,
        "mre_px_skull_outer_near": 13.679126955,
        "mre_px_skull_outer_posterior": 24.0149627661,
        "mre_px_thalamus_far": 23.711652687,
        "mre_px_thalamus_near": 35.3512760005,
        "mre_px_vermis": 34.1462066815,
        "mse_px2": 862.552456993,
        "sdr_10px": 0.0625,
        "sdr_2px": 0.0208333333333,
        "sdr_4px": 0.0208333333333,
    },
    "busbra_cls": {
        "accuracy": 0.25,
        "balanced_accuracy": 0.25,
        "macro_f1": 0.166666666667,
        "model.pt |weights| sum": 69793.5026924,
    },
    "camus_ef": {
        "bias": 23.0562496185,
        "loa_high": 40.3309279494,
        "loa_low": 5.78157128769,
        "mae": 23.0562496185,
        "mae_se": 6.23216438293,
        "model.pt |weights| sum": 104341.480203,
        "pearson_r": 1.0,
        "rmse": 23.8836873068,
    },
    "ddti_seg": {
        "dice_nodule": 0.655455321074,
        "mean_dice": 0.655455321074,
        "mean_nsd": 0.518940031528,
        "model.pt |weights| sum": 125725.450288,
        "nsd_nodule": 0.518940031528,
    },
    "echocare_pretrain": {
        "anatomy_acc_organ": 0.0,
        "anatomy_acc_region": 0.0,
        "anatomy_acc_structure": 0.0,
        "masked_l1": 0.577944397926,
        "model.pt |weights| sum": 127141.926822,
    },
    "fll_cls": {
        "accuracy": 0.0,
        "balanced_accuracy": 0.0,
        "macro_f1": 0.0,
        "model.pt |weights| sum": 69781.650386,
    },
    "focus_det": {
        "ap50_heart": 0.0,
        "ap50_thorax": 0.50495049505,
        "ap_heart": 0.0,
        "ap_thorax": 0.10099009901,
        "ctr_accuracy": 0.57165302684,
        "ctr_mae": 0.241460414234,
        "iou_heart": 0.0541587822051,
        "iou_thorax": 0.361374238174,
        "map": 0.050495049505,
        "map50": 0.252475247525,
        "mean_iou": 0.20776651019,
        "model.pt |weights| sum": 69109.1769371,
    },
    "musv_seg": {
        "dice_artery": 0.0255822679028,
        "dice_vein": 0.102644607425,
        "mean_dice": 0.0641134362668,
        "mean_nsd": 0.0919552706182,
        "model.pt |weights| sum": 125723.308231,
        "nsd_artery": 0.0349589772522,
        "nsd_vein": 0.148951560259,
    },
    "thyroid_cls": {
        "accuracy": 0.75,
        "auc": 0.75,
        "f1": 0.666666666667,
        "macro_f1": 0.733333333333,
        "model.pt |weights| sum": 69772.2023895,
        "sensitivity": 0.5,
        "specificity": 1.0,
    },
    "usenhance": {
        "brisque": 63.7423805315,
        "fid_echocare": 188.413088487,
        "identity_brisque": 65.386145097,
        "identity_fid_echocare": 188.984509767,
        "identity_niqe": 34.8769267889,
        "identity_piqe": 43.7648143399,
        "identity_psnr": 13.4834761324,
        "identity_ssim": 0.170605279505,
        "model.pt |weights| sum": 125588.602713,
        "niqe": 33.2959643618,
        "piqe": 47.6263643911,
        "psnr": 13.4933102208,
        "ssim": 0.175086397678,
        "target_brisque": 10.8450793839,
        "target_niqe": 12.9646836598,
        "target_piqe": 55.4365907978,
    },
    "usreport": {
        "bleu1": 0.115302535286,
        "bleu2": 0.0,
        "bleu3": 0.0,
        "bleu4": 0.0,
        "findings_accuracy": 0.7,
        "findings_f1": 0.0,
        "findings_macro_f1": 0.0,
        "findings_precision": 0.0,
        "findings_recall": 0.0,
        "meteor": 0.0613677286591,
        "meteor_wordnet": 0.0,
        "model.pt |weights| sum": 67563.5419423,
        "rouge_l": 0.0689192680807,
    },
}

# One interpreter runs the whole plan; a failing bundle is recorded and the others go on.
_DRIVER = """
import json, sys, traceback
import fire, torch
torch.set_num_threads(1)
from monai.bundle import run
from echocare.cli import main as echocare
plan, status_file = json.loads(sys.argv[1]), sys.argv[2]
status = {}
for name, steps in plan:
    try:
        for kind, args in steps:
            if kind == "echocare":
                echocare(args)
            else:
                fire.Fire({"run": run}, command=["run", *args])
        status[name] = "ok"
    except BaseException:
        status[name] = traceback.format_exc()[-4000:]
    with open(status_file, "w") as f:
        json.dump(status, f)
"""


def _weights_abs_sum(path: Path) -> float:
    """Sum of the absolute values of every floating-point weight in a checkpoint: a fingerprint of the
    trained network that moves with any change of training (the metrics of a tiny run may not)."""
    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from tensors(v)

    state = torch.load(path, map_location="cpu", weights_only=True)
    return float(sum(t.double().abs().sum() for t in tensors(state) if t.is_floating_point()))


def _configs(name: str, *files: str) -> str:
    return repr([str(REPO / "bundles" / name / "configs" / f) for f in files])


def _plan(base: Path) -> list:
    """[(bundle, [(kind, args), ...]), ...]: the phantom, then training and evaluation."""
    plan = []
    for name, (phantom, extra) in BUNDLES.items():
        data, out = base / "data" / name, base / "runs" / name
        size = "64" if name in IMAGE_SIZE_64 else "32"
        steps = []
        if isinstance(phantom, tuple):
            task, n, options = phantom
            flags = [f"--{k}={v}" for k, v in options.items()]
            steps.append(("echocare", ["demo-data", "--task", task, "--out", str(data), "--n", str(n), "--seed", "0",
                                       "--image_size", size, "--val_fraction", "0.25", *flags]))
        else:
            blob_dataset(data, 8, phantom == "blobs_cls", shape=(32, 40), radius=(4, 2), centres=((12, 20), (12, 28)))
        # One epoch, with the full learning rate from the first step: a warm-up would start at 0, and an epoch of
        # one iteration would then leave the network as it started.
        if name == "echocare_pretrain":  # steps, not epochs, and no max_epochs alias
            schedule = ["--warmup_steps", "0", "--total_steps", "10", "--train#trainer#max_epochs", "1"]
        else:
            schedule = ["--warmup_epochs", "0", "--max_epochs", "1"]
        args = [*COMMON, "--image_size", size, *extra, *schedule]
        args += ["--dataset_dir", str(data), "--datalist", str(data / "datalist.json"), "--output_dir", str(out)]
        steps.append(("bundle", ["training", "--config_file", _configs(name, "train.yaml"), *args]))
        steps.append(("bundle", ["evaluating", "--config_file", _configs(name, "train.yaml", "evaluate.yaml"), *args]))
        plan.append((name, steps))
    return plan


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict | str]:
    """Bundle name -> its eval/summary.json and the fingerprint of models/model.pt, or the traceback of its failure."""
    base = tmp_path_factory.mktemp("reproducibility")
    status_file = base / "status.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    command = [sys.executable, "-c", _DRIVER, json.dumps(_plan(base)), str(status_file)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    status = json.loads(status_file.read_text()) if status_file.is_file() else {}
    out: dict[str, dict | str] = {}
    for name in BUNDLES:
        summary = base / "runs" / name / "eval" / "summary.json"
        if status.get(name) == "ok" and summary.is_file():
            out[name] = {**json.loads(summary.read_text()),
                         WEIGHTS: _weights_abs_sum(base / "runs" / name / "models" / "model.pt")}
        else:
            out[name] = status.get(name) or f"not run (exit {done.returncode}):\n{done.stderr[-4000:]}"
    if os.environ.get("ECHOCARE_RECORD"):
        recorded = {k: v for k, v in out.items() if isinstance(v, dict)}
        print("\nRECORDED = " + json.dumps(recorded, indent=4, sort_keys=True))
    return out


def _same(recorded: object, value: object) -> bool:
    numbers = (int, float)
    if not (isinstance(recorded, numbers) and isinstance(value, numbers)):
        return recorded == value
    if math.isnan(recorded) or math.isnan(value):
        return math.isnan(recorded) and math.isnan(value)
    return math.isclose(value, recorded, rel_tol=RELATIVE_TOLERANCE, abs_tol=1e-9)


@pytest.mark.parametrize("name", list(BUNDLES))
def test_fixed_seed_metrics_are_as_recorded(name: str, results) -> None:
    summary = results[name]
    assert isinstance(summary, dict), f"{name} failed:\n{summary}"
    if os.environ.get("ECHOCARE_RECORD"):
        pytest.skip("recording")
    recorded = RECORDED[name]
    assert set(summary) == set(recorded), f"{name}: metric names changed"
    changed = {k: (recorded[k], summary[k]) for k in recorded if not _same(recorded[k], summary[k])}
    assert not changed, f"{name}: (recorded, now) {changed}"
