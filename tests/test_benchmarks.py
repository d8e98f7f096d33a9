"""The benchmarks' ``--quick`` modes: correctness and the JSON keys, never times (issue #19)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_inference_quick_writes_every_key_and_bf16_agrees(tmp_path):
    out = tmp_path / "inference.json"
    result = _benchmark("inference").main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["outputs_equal"] and result["quick"]
    assert set(result["cpu_isa"]) <= {"amx_bf16", "avx512_bf16", "avx512f"}
    assert result["sgemm_gflops"] > 0 and result["bf16_gemm_gflops"] > 0 and result["sgemm_gflops_one_product"] > 0
    # the bound is the best of the probes timed in the cases' rounds
    assert result["sgemm_gflops"] == max(c["sgemm_gflops"] for c in result["cases"])
    cases = {(c["network"], c["batch_size"]) for c in result["cases"]}
    assert cases == {("ddti_seg", 1), ("ddti_seg", 2), ("busbra_cls", 1), ("busbra_cls", 2)}
    for case in result["cases"]:
        assert case["max_abs_diff"] <= 1e-4  # the fast path is exact
        for key in ("speedup_fp32", "fp32_fraction_of_bound", "fp32_fraction_of_one_product_bound", "speedup_bf16", "agreement_bf16"):
            assert math.isfinite(case[key]) and case[key] > 0, key
        for key in ("speedup_fp32", "fp32_fraction_of_bound", "speedup_bf16", "agreement_bf16"):
            assert result[key] == min(c[key] for c in result["cases"])
    # bf16 against float32 on the (real or phantom) validation images of the briefly trained tiny networks
    assert result["agreement"]["ddti_seg"]["agreement_bf16"] >= 0.9
    assert result["agreement"]["busbra_cls"]["agreement_bf16"] >= 0.75
    assert result["agreement"]["busbra_cls"]["max_prob_diff_bf16"] < 0.1
    assert 0.5 <= result["ellipse_iou_bf16"] <= 1.0
    assert 0 <= result["ef_diff_points_bf16"] < 5.0
    assert set(result["targets"]) == {"speedup_bf16_ge_2.5", "agreement_bf16_ge_0.99", "fp32_fraction_of_bound_ge_0.9"}
    for name in ("ddti_seg", "busbra_cls"):
        record = result["training"][name]
        assert record["steps"] == 2 and Path(record["saved_to"]).is_file()
    # a second run loads the cached weights instead of training again
    again = _benchmark("inference").main(["--quick", "--networks", "busbra_cls", "--no-other-bundles", "--out", str(out)])
    assert "loaded_from" in again["training"]["busbra_cls"]
    assert again["agreement"]["busbra_cls"] == result["agreement"]["busbra_cls"]


def test_dataloader_quick_checks_batches_and_keys(tmp_path):
    out = tmp_path / "dataloader.json"
    result = _benchmark("dataloader").main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["images_per_s_per_worker"] == result["images_per_s_per_worker"] > 0
    assert set(result["per_format"]) == {"png_256", "png_480x640", "dicom_mono_480x640", "dicom_jpeg_rgb_480x640"}
    assert result["files_per_format"] == 4 and result["quick"]


def test_shard_stream_quick_reads_the_same_images_as_the_datalist(tmp_path):
    out = tmp_path / "shard_stream.json"
    result = _benchmark("shard_stream").main(["--quick", "--size", "32", "--batch-size", "5", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["images_equal"] and result["images"] == 24 and result["quick"]
    assert set(result) == {"images", "image_size", "batch_size", "shard_size", "datalist_images_per_s_per_worker",
                           "shards_images_per_s_per_worker", "ratio", "images_equal", "quick"}


@pytest.mark.slow
def test_gpu_pretrain_step_dry_run_on_cpu(tmp_path):
    """``gpu_pretrain_step.sh --dry-run``: the GPU command's code path on the CPU at tiny sizes
    (bf16 autocast, loss and gradient checks before timing); here the reference and ``fast``
    only, without torch.compile (whose C++ build takes minutes on a CPU; the full dry run with
    every variant and compile is checked by hand, see benchmarks/README.md)."""
    env = {**os.environ, "PYTHON": sys.executable, "COMPILE": ""}
    run = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_pretrain_step.sh"), "--dry-run", str(tmp_path),
                          "--variants", "fast"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    result = json.loads((tmp_path / "pretrain_step_dry_run.json").read_text())
    rows = {row["variant"]: row for row in result["variants"]}
    assert set(rows) == {"reference", "fast"}
    assert result["precision"] == "bf16 autocast"
    assert all(row["check"]["ok"] for name, row in rows.items() if name != "reference")


@pytest.mark.slow
def test_scale_runs_each_engine_and_worker_count_to_the_same_outputs(tmp_path):
    """``scale.py --sizes 50,200``: local and ray at 1 and 2 workers, each size; keys and
    correctness only (every run curates every phantom, nearly all kept, and all runs of a size
    write the same files)."""
    pytest.importorskip("ray")
    out = tmp_path / "scale.json"
    result = _benchmark("scale").main(["--sizes", "50,200", "--image-side", "64", "--size", "64", "--out", str(out)])
    assert json.loads(out.read_text()) == result
    configs = [("local", 1), ("local", 2), ("ray", 1), ("ray", 2)]
    assert [(r["engine"], r["workers"], r["inputs"]) for r in result["runs"]] == [
        (e, w, n) for n in (50, 200) for e, w in configs]
    for run in result["runs"]:
        assert {"engine", "workers", "inputs", "images_per_s", "driver_peak_rss_mb", "worker_peak_rss_mb",
                "driver_cpu_ms_per_input"} <= set(run)
        assert run["driver_cpu_ms_per_input"] > 0
        kept = {r["kept"] for r in result["runs"] if r["inputs"] == run["inputs"]}
        assert run["units"] == run["inputs"] and kept == {run["kept"]} and run["kept"] >= 0.9 * run["inputs"]
        assert run["images_per_s"] > 0 and run["driver_peak_rss_mb"] >= run["driver_rss_after_import_mb"] > 0
        # the pool's or Ray's workers were measured; local with 1 worker works in the driver
        assert (run["worker_peak_rss_mb"] is None) == (run["engine"] == "local" and run["workers"] == 1)
    assert result["outputs_equal"] == {"50": True, "200": True}
    assert len({r["output_sha256"] for r in result["runs"]}) == 2  # one per size
    assert [(g["engine"], g["workers"]) for g in result["driver_peak_rss_ratio"]] == configs
