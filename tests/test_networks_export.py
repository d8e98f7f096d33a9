"""echocare export: every bundle's network as traced TorchScript and as ONNX (dynamic batch) equals
PyTorch within 1e-4 in float32 and carries the bundle metadata; ONNX Runtime runs the segmentation,
classification and sequence-regression bundles' inference with their own pre/post-processing and writers.

Networks are the bundles' ``network_def`` at ``network_size=tiny`` and 64 px with random weights
(saved as the bundles save ``models/model.pt``).
"""

from __future__ import annotations

import json
import re
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.bundle import ConfigParser
from PIL import Image

from bundle_helpers import REPO
from echocare.cli import main
from echocare.phantoms import generate_demo_data
from echocare.networks import (
    OnnxRuntimeNetwork,
    export_bundle,
    load_exported,
    load_network_checkpoint,
    read_export_metadata,
)

BUNDLES = ["echocare_pretrain", "ddti_seg", "musv_seg", "abdomen_seg", "busbra_cls", "thyroid_cls", "fll_cls",
           "focus_det", "brain_landmark", "usenhance", "camus_ef"]
SMALL = {"network_size": "tiny", "image_size": 64}
# One segmentation, one clip classification and one sequence network in the quick run (pytest -m "not slow");
# every bundle's export in the full run (each export takes 5-20 s on a CPU).
QUICK = {"ddti_seg", "fll_cls", "camus_ef"}


def _parser(name: str, **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / name / "configs" / "inference.yaml"))
    parser.update({**SMALL, **overrides})
    return parser


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A randomly initialised network of every bundle, saved as a flat state dict."""
    root = tmp_path_factory.mktemp("export_checkpoints")
    out = {}
    for i, name in enumerate(BUNDLES):
        torch.manual_seed(i)
        network = _parser(name).get_parsed_content("network_def")
        with torch.no_grad():  # non-trivial norms and biases too (they start at 1 and 0)
            for p in network.parameters():
                p.add_(0.05 * torch.randn_like(p))
        torch.save(network.state_dict(), root / f"{name}.pt")
        out[name] = root / f"{name}.pt"
    return out


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory):
    """``exported(name, fmt)``: the bundle's random network exported once per module (tests share the files)."""
    root = tmp_path_factory.mktemp("exported")
    files: dict[tuple[str, str], Path] = {}

    def get(name: str, fmt: str) -> Path:
        if (name, fmt) not in files:
            out = root / f"{name}.{fmt}"
            # Compared in the tests with an independently built network; export_bundle's own check
            # against PyTorch is tested through the command.
            export_bundle(name, checkpoints[name], fmt, out, overrides=SMALL, verify=False)
            files[name, fmt] = out
        return files[name, fmt]

    return get


def _reference(name: str, checkpoint: Path) -> torch.nn.Module:
    return load_network_checkpoint(_parser(name).get_parsed_content("network_def"), checkpoint).eval()


def _inputs(name: str, batch: int) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(7)
    if name == "echocare_pretrain":
        return torch.rand(batch, 3, 64, 64, generator=generator), torch.rand(batch, 2, 2, generator=generator) < 0.5
    if name in ("thyroid_cls", "fll_cls"):
        return (torch.rand(batch, 8, 3, 64, 64, generator=generator),)
    if name == "camus_ef":  # num_frames of inference.yaml
        return (torch.rand(batch, 16, 3, 64, 64, generator=generator),)
    return (torch.rand(batch, 3, 64, 64, generator=generator),)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
@pytest.mark.parametrize("name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in BUNDLES])
def test_exported_network_equals_pytorch(name: str, fmt: str, checkpoints, exported) -> None:
    run, metadata = load_exported(exported(name, fmt))
    section = metadata["echocare_export"]
    bundle_metadata = json.loads((REPO / "bundles" / name / "configs" / "metadata.json").read_text())
    assert metadata["name"] == bundle_metadata["name"] and metadata["network_data_format"] == bundle_metadata["network_data_format"]
    assert section["bundle"] == name and section["format"] == fmt and section["network_size"] == "tiny"
    assert section["checkpoint"] == str(checkpoints[name])
    names_key = {"brain_landmark": "landmark_names", "usenhance": None, "camus_ef": None, "echocare_pretrain": None}.get(name, "class_names")
    assert section["class_names"] == (list(_parser(name).get_parsed_content(names_key)) if names_key else None)
    # TorchScript runs at its traced batch; ONNX at any batch (3 here, exported at 1).
    batch = 1 if fmt == "torchscript" else 3
    inputs = _inputs(name, batch)
    assert [list(t.shape[1:]) for t in inputs] == [shape[1:] for shape in section["inputs"].values()]
    reference = _reference(name, checkpoints[name])
    with torch.no_grad():
        expected = reference(*inputs)
    expected = tuple(expected[k] for k in section["outputs"]) if isinstance(expected, dict) else (expected,)
    got = run(*inputs)
    got = got if isinstance(got, tuple) else (got,)
    assert len(got) == len(expected) == len(section["outputs"])
    for e, g in zip(expected, got):
        assert g.shape == e.shape and g.shape[0] == batch
        assert float(e.std()) > 1e-3 if e.numel() > 1 else torch.isfinite(e).all()  # a real signal, not a constant
        assert float((g - e).abs().max()) <= 1e-4


def test_export_command_and_metadata(checkpoints, tmp_path: Path) -> None:
    out = tmp_path / "carotid.ts"
    printed = StringIO()
    with redirect_stdout(printed):
        main(["export", "musv_seg", "--checkpoint", str(checkpoints["ddti_seg"]), "--format", "torchscript", "--out", str(out),
              "--config", "carotid.yaml", "--network_size", "tiny", "--image_size", "64"])
    assert f"{out}: musv_seg (EchoCareSegNet, tiny) as torchscript; inputs image ('batch', 3, 64, 64); outputs pred" in printed.getvalue()
    checked = re.search(r"max \|exported - PyTorch\|: pred (\S+)", printed.getvalue())
    assert checked and float(checked.group(1)) <= 1e-4  # the command's own check against PyTorch
    metadata = read_export_metadata(out)
    assert metadata["echocare_export"]["class_names"] == ["background", "lumen"]  # the overlay's classes
    with pytest.raises(ValueError, match="unknown export format 'tflite'"):
        export_bundle("ddti_seg", checkpoints["ddti_seg"], "tflite", tmp_path / "x", overrides=SMALL)
    from echocare.networks import EncoderWeightsError, ExportError

    with pytest.raises(ExportError, match=r"usreport: report generation .* is not exported"):
        export_bundle("usreport", checkpoints["ddti_seg"], "onnx", tmp_path / "r.onnx", overrides=SMALL)

    with pytest.raises(EncoderWeightsError, match=r"busbra_cls\.pt: the checkpoint does not fit EchoCareSegNet"):
        export_bundle("ddti_seg", checkpoints["busbra_cls"], "onnx", tmp_path / "x.onnx", overrides=SMALL)


def _run_inference(name: str, data: Path, out: Path, **overrides) -> list[torch.Tensor]:
    """The bundle's inference.yaml evaluator, in-process; returns every item's ``pred`` (after postprocessing)."""
    parser = _parser(name, input_dir=str(data / "datalist.json"), datalist_key="training", dataset_dir=str(data),
                     output_dir=str(out), num_workers=0, batch_size=3, device="$torch.device('cpu')", **overrides)
    evaluator = parser.get_parsed_content("evaluator")
    preds: list[torch.Tensor] = []
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: preds.extend(o["pred"].clone() for o in e.state.output))
    evaluator.run()
    return preds


@pytest.mark.parametrize("name", ["musv_seg", "fll_cls", "camus_ef"])
def test_onnx_runtime_runs_the_bundle_inference(name: str, checkpoints, exported, tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate_demo_data(name, data, n=6, seed=0, image_size=64)
    onnx_file = exported(name, "onnx")

    torch_preds = _run_inference(name, data, tmp_path / "torch", checkpoint=str(checkpoints[name]))
    ort_preds = _run_inference(name, data, tmp_path / "ort", onnx_model=str(onnx_file))
    items = json.loads((data / "datalist.json").read_text())["training"]
    assert len(ort_preds) == len(torch_preds) >= len(items) >= 4  # batches of 3, the last one smaller
    for t, o in zip(torch_preds, ort_preds):
        assert o.shape == t.shape and float((o - t).abs().max()) <= 1e-4

    torch_rows = json.loads((tmp_path / "torch" / "predictions" / "predictions.json").read_text())
    ort_rows = json.loads((tmp_path / "ort" / "predictions" / "predictions.json").read_text())
    assert [r["image"] for r in ort_rows] == [r["image"] for r in torch_rows]
    for t, o in zip(torch_rows, ort_rows):
        if name == "camus_ef":  # EF in percent: the network's 1e-4 is 1e-2 points
            assert abs(o["ef"] - t["ef"]) <= 1e-2 and o["frames_used"] == t["frames_used"]
        elif name == "musv_seg":
            a, b = np.asarray(Image.open(t["mask_png"])), np.asarray(Image.open(o["mask_png"]))
            assert a.shape == b.shape and (a == b).mean() >= 0.999  # argmax ties within 1e-4 may flip a pixel
        else:
            assert o["predicted"] == t["predicted"]
            assert all(abs(o["probabilities"][k] - v) <= 1e-4 for k, v in t["probabilities"].items())


def test_onnx_runtime_network_refuses_another_input_size(exported, tmp_path: Path) -> None:
    network = OnnxRuntimeNetwork(exported("ddti_seg", "onnx"))
    assert network.metadata["echocare_export"]["inputs"]["image"] == ["batch", 3, 64, 64]
    with pytest.raises(ValueError, match=r"ddti_seg\.onnx: input 'image' must be \('B', 3, 64, 64\) .*got \(1, 3, 128, 128\)"):
        network(torch.rand(1, 3, 128, 128))
    with pytest.raises(FileNotFoundError, match=r"missing\.onnx: ONNX model not found"):
        OnnxRuntimeNetwork(tmp_path / "missing.onnx")


def test_landmark_options_export_with_a_dynamic_batch(tmp_path: Path) -> None:
    """brain_landmark's coordinate channels and symmetric-pair ordering (a data-dependent swap in
    the eval forward) trace and export: export_bundle's own check runs ONNX at another batch size."""
    overrides = {**SMALL, "coord_channels": True, "landmark_names": ["a", "b", "c", "d"],
                 "symmetric_pairs": [[0, 1, "x"], [2, 3, "y"]]}
    torch.manual_seed(0)
    network = _parser("brain_landmark", **overrides).get_parsed_content("network_def")
    torch.save(network.state_dict(), tmp_path / "landmarks.pt")
    for fmt in ("torchscript", "onnx"):
        metadata = export_bundle("brain_landmark", tmp_path / "landmarks.pt", fmt, tmp_path / f"landmarks.{fmt}", overrides=overrides)
        assert metadata["echocare_export"]["class_names"] == ["a", "b", "c", "d"]
        assert metadata["max_abs_diff"]["pred"] <= 1e-4
