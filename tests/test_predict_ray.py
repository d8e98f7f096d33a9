"""``echocare predict --engine ray``: the same masks, probabilities, DICOM results and
``predict_report.json`` as the local engine, with the same per-file failures. One local Ray
instance (2 CPUs, conftest's ``ray_cluster``) serves the module."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from conftest import find_real_data
from test_predict import SMALL, make_study, seg_checkpoint  # noqa: F401  (seg_checkpoint: a fixture)

from echocare.predict import predict
from echocare.tasks.supervised import EchoCareClassifier

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

#: Batches of 2 items, so that the items (an odd number) make several batches, the last one short, over 2 actors.
RAY_SMALL = {**SMALL, "batch_size": 2}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """test_predict's study (DICOM SEG and Secondary Capture cases, a PNG, an MP4, a corrupt DICOM,
    a text file) plus a second ``still.png`` in another folder, whose outputs must be ``still_2``."""
    root = tmp_path_factory.mktemp("inputs")
    study = make_study(root)
    (root / "copy").mkdir()
    shutil.copy(study["png"], root / "copy" / "still.png")
    return root


def _relative(value, out: Path):
    """A report or index value with the output folder taken out of its paths."""
    if isinstance(value, dict):
        return {k: _relative(v, out) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v, out) for v in value]
    return value.replace(str(out), "OUT") if isinstance(value, str) else value


def _files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def _numbers(ds) -> list[str]:
    """Every numeric value of a DICOM dataset, nested ones included."""
    return [str(e.value) for e in ds.iterall() if e.keyword == "NumericValue"]


def _assert_same_outputs(local: Path, ray_out: Path) -> None:
    """Everything ``predict`` wrote in ``ray_out`` equals ``local``: the file names, the report and
    index (paths aside), every mask and per-input JSON, and the DICOM results' pixels and measurements
    (their UIDs and timestamps are new in each run)."""
    assert any(name.endswith(".dcm") for name in _files(local))
    assert _files(ray_out) == _files(local)
    for name in ("predict_report.json", "predictions/predictions.json", "predict_inputs.json"):
        assert _relative(json.loads((ray_out / name).read_text()), ray_out) == \
            _relative(json.loads((local / name).read_text()), local), name
    assert (ray_out / "predictions/predictions.csv").read_text().replace(str(ray_out), "OUT") == \
        (local / "predictions/predictions.csv").read_text().replace(str(local), "OUT")
    for name in _files(local):
        if name.endswith(".png"):
            np.testing.assert_array_equal(np.asarray(Image.open(ray_out / name)), np.asarray(Image.open(local / name)))
        elif name.endswith(".nii.gz"):
            np.testing.assert_array_equal(np.asanyarray(nibabel.load(ray_out / name).dataobj),
                                          np.asanyarray(nibabel.load(local / name).dataobj))
        elif name.startswith("predictions/") and name.endswith(".json") and name != "predictions/predictions.json":
            assert json.loads((ray_out / name).read_text()) == json.loads((local / name).read_text()), name
        elif name.endswith(".dcm"):
            ours, theirs = pydicom.dcmread(ray_out / name), pydicom.dcmread(local / name)
            assert ours.SOPClassUID == theirs.SOPClassUID and ours.SOPInstanceUID != theirs.SOPInstanceUID
            if "PixelData" in theirs:
                np.testing.assert_array_equal(ours.pixel_array, theirs.pixel_array)
            else:  # a Structured Report: its areas or class probabilities
                assert _numbers(ours) == _numbers(theirs) and _numbers(theirs), name


#: Scanner DICOMs of ../shared/data/dicom_us (when present): JPEG lossless, RLE two frames, JPEG 2000,
#: JPEG baseline with 120 frames, big-endian RGB, 16-bit palette.
REAL_DICOMS = ("JPGLosslessP14SV1_1s_1f_8b.dcm", "OBXXXX1A_rle_2frame.dcm", "US1_J2KR.dcm", "color3d_jpeg_baseline.dcm",
               "pydicom_ExplVR_BigEnd.dcm", "gdcm-US-ALOKA-16.dcm")


def test_ray_engine_gives_the_local_segmentation(ray_cluster, inputs, seg_checkpoint, tmp_path, capsys):  # noqa: F811
    """The study (with its corrupt DICOM) and, where the shared data is, six scanner DICOMs and one cut
    inside its pixel data: the first two frames of each, by both engines."""
    sources, broken = [inputs], []
    real = find_real_data()
    if real is not None and (real / "dicom_us").is_dir():
        sources += [real / "dicom_us" / name for name in REAL_DICOMS]
        broken = [tmp_path / "broken" / "US1_UNCR.dcm"]
        broken[0].parent.mkdir()
        broken[0].write_bytes((real / "dicom_us" / "US1_UNCR.dcm").read_bytes()[:-5000])
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    options = dict(checkpoint=str(seg_checkpoint), max_frames=2, overrides=RAY_SMALL)
    expected = predict("ddti_seg", sources + broken, local, **options)
    local_printed = capsys.readouterr().out
    result = predict("ddti_seg", sources + broken, ray_out, **options, engine="ray", workers=2)
    printed = capsys.readouterr().out

    assert [(r.input, r.status) for r in result] == [(r.input, r.status) for r in expected]
    rows = {Path(r.input).relative_to(inputs).as_posix(): r for r in result if Path(r.input).is_relative_to(inputs)}
    assert len(rows) == 8 and len(result) == 8 + len(sources) - 1 + len(broken)
    # The corrupt files: failed, one line each naming it, the others done; the same lines as the local run.
    failed = [line for line in printed.splitlines() if line.startswith("failed:")]
    assert failed == [f"failed: {r.input}: {r.reason}" for r in result if r.status == "failed"]
    assert failed == [line for line in local_printed.splitlines() if line.startswith("failed:")]
    assert [Path(r.input).name for r in result if r.status == "failed"] == ["corrupt.dcm"] + [b.name for b in broken]
    assert {n for n, r in rows.items() if r.seg} == {"single.dcm", "series/IM0001"}
    assert {n for n, r in rows.items() if r.secondary_capture} == {"no_patient.dcm", "series/cine.dcm"}
    assert rows["series/cine.dcm"].frames == 2 and rows["clip.mp4"].frames == 2
    # Two inputs named still.png: their masks named as one run names them.
    assert (ray_out / "predictions" / "still.png").is_file() and (ray_out / "predictions" / "still_2.png").is_file()
    mask = np.asarray(Image.open(ray_out / "predictions" / "single.png"))
    assert 0 < (mask == 1).mean() < 1, "the random network should give a non-trivial mask"
    _assert_same_outputs(local, ray_out)
    if not broken:
        pytest.skip("the study passed; no shared scanner DICOMs to add (ECHOCARE_DATA or ../shared/data/dicom_us)")


def test_ray_engine_gives_the_local_probabilities(ray_cluster, inputs, tmp_path):
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pt"
    torch.save(EchoCareClassifier("tiny", num_classes=4).state_dict(), checkpoint)
    sources = [inputs / "single.dcm", inputs / "series" / "cine.dcm", inputs / "still.png", inputs / "corrupt.dcm"]
    local, ray_out = tmp_path / "local", tmp_path / "ray"
    predict("busbra_cls", sources, local, checkpoint=str(checkpoint), overrides=RAY_SMALL, echo=False)
    predict("busbra_cls", sources, ray_out, checkpoint=str(checkpoint), overrides=RAY_SMALL, echo=False,
            engine="ray", workers=2)
    records = json.loads((ray_out / "predictions" / "predictions.json").read_text())
    assert len(records) == 5 and len({tuple(r["probabilities"].values()) for r in records}) > 1
    _assert_same_outputs(local, ray_out)
