"""``echocare predict``: bundles on DICOM, images and videos, with DICOM SEG / SR / Secondary Capture results."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from dicom_helpers import sr_numeric_values as _numeric_values
from dicom_helpers import write_dicom
from PIL import Image
from pydicom.uid import generate_uid
from test_io_readers import cut_video, png_header_only, write_video

from echocare.tasks.supervised import EchoCareClassifier, EchoCareSegNet
from echocare.predict import predict

SMALL = {"network_size": "tiny", "image_size": 64, "num_workers": 0, "batch_size": 8, "device": "cpu"}
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
MULTIFRAME_TRUE_COLOUR_SC = "1.2.840.10008.5.1.4.1.1.7.4"


def _patient_and_study(**extra) -> dict:
    """Patient, study and series attributes of a scanner's image (the synthetic sources)."""
    return {
        "PatientName": "Doe^Jane", "PatientID": "12345", "PatientBirthDate": "19700101", "PatientSex": "F",
        "StudyInstanceUID": generate_uid(), "StudyDate": "20240101", "StudyTime": "120000", "StudyID": "1",
        "ReferringPhysicianName": "", "AccessionNumber": "A1", "SeriesInstanceUID": generate_uid(),
        "SeriesNumber": 3, "InstanceNumber": 1, "Manufacturer": "Test", **extra,
    }


def _blob(height: int, width: int, frames: int = 1) -> np.ndarray:
    """(frames, H, W) uint8 ultrasound-like speckle with a bright disc whose centre moves per frame."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:height, :width]
    out = []
    for f in range(frames):
        disc = (yy - height / 2) ** 2 + (xx - width / 3 - 4 * f) ** 2 < (min(height, width) / 4) ** 2
        out.append(np.clip(40 + 150 * disc + rng.normal(0, 20, (height, width)), 0, 255).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module")
def seg_checkpoint(tmp_path_factory) -> Path:
    """Seeded random weights of the tiny segmentation network (what predict loads like any checkpoint)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("seg") / "model.pt"
    torch.save(EchoCareSegNet("tiny", out_channels=2).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    return make_study(tmp_path_factory.mktemp("study"))


def make_study(root: Path) -> dict:
    """A study folder: a SEG-able single frame, a cine without Frame of Reference, a frame without the
    patient module, a suffix-less DICOM, a corrupt DICOM, a PNG, an MP4 and a text file."""
    (root / "series").mkdir()
    frame = _blob(48, 64)[0]
    cine = _blob(40, 56, frames=3)
    files = {
        "single": write_dicom(root / "single.dcm", frame, "MONOCHROME2", NumberOfFrames=1,
                              **_patient_and_study(PixelSpacing=[0.1, 0.2])),
        "cine": write_dicom(root / "series" / "cine.dcm", np.repeat(cine[..., None], 3, axis=-1), "RGB",
                            NumberOfFrames=3, **_patient_and_study()),
        "no_patient": write_dicom(root / "no_patient.dcm", frame, "MONOCHROME2", NumberOfFrames=1,
                                  **{k: v for k, v in _patient_and_study().items() if not k.startswith("Patient")}),
        "suffixless": write_dicom(root / "series" / "IM0001", frame, "MONOCHROME2", NumberOfFrames=1,
                                  **_patient_and_study()),
        "png": root / "still.png",
        "video": write_video(root / "clip.mp4", 3, "libx264", h=48, w=64),
        "corrupt": root / "corrupt.dcm",
    }
    Image.fromarray(frame).save(files["png"])
    files["corrupt"].write_bytes(files["single"].read_bytes()[:-1000])  # cut inside the pixel data
    (root / "notes.txt").write_text("not an image")
    return {"root": root, **files}


def _rows(result) -> dict[str, object]:
    return {Path(r.input).name: r for r in result}


def _referenced_uids(ds) -> set[str]:
    """Every ReferencedSOPInstanceUID anywhere in a dataset."""
    return set(_references(ds))


def _references(ds) -> dict[str, set[str]]:
    """Referenced SOP Instance UID -> the SOP Class UIDs it is referenced with, anywhere in a dataset."""
    found: dict[str, set[str]] = {}
    for element in ds.iterall():
        if element.VR == "SQ":
            for item in element.value:
                if "ReferencedSOPInstanceUID" in item:
                    found.setdefault(str(item.ReferencedSOPInstanceUID), set()).add(str(item.get("ReferencedSOPClassUID")))
    return found


def test_segmentation_of_a_study_folder(study, seg_checkpoint, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    result = predict("ddti_seg", [study["root"]], out, checkpoint=str(seg_checkpoint), overrides=SMALL)
    printed = capsys.readouterr().out
    rows = _rows(result)
    assert set(rows) == {"single.dcm", "cine.dcm", "no_patient.dcm", "IM0001", "still.png", "clip.mp4", "corrupt.dcm"}

    # The corrupt file: one line naming it and the problem; the others went on.
    assert rows["corrupt.dcm"].status == "failed" and "corrupt.dcm: " in printed
    assert [line for line in printed.splitlines() if line.startswith("failed:")] == [
        f"failed: {rows['corrupt.dcm'].input}: {rows['corrupt.dcm'].reason}"
    ]
    assert "skipped 1 file(s)" in printed  # notes.txt
    assert all(r.status == "ok" for name, r in rows.items() if name != "corrupt.dcm")

    # Single frame with a patient module: a SEG whose mask is the bundle's mask, referencing the source.
    source = pydicom.dcmread(study["single"])
    seg = pydicom.dcmread(rows["single.dcm"].seg)
    assert seg.SOPClassUID == SEG_STORAGE and seg.SegmentationType == "BINARY"
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.PatientID == "12345"
    assert int(seg.NumberOfFrames) == 1 and seg.SegmentSequence[0].SegmentLabel == "nodule"
    mask = np.asarray(Image.open(out / "predictions" / "single.png"))
    assert 0 < (mask == 1).mean() < 1, "the random network should give a non-trivial mask"
    np.testing.assert_array_equal(seg.pixel_array.reshape(mask.shape), (mask == 1).astype(np.uint8))
    # Its SR: the nodule area in mm² (PixelSpacing 0.1 x 0.2 mm).
    sr = pydicom.dcmread(rows["single.dcm"].sr)
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    assert source.SOPInstanceUID in _referenced_uids(sr) and seg.SOPInstanceUID in _referenced_uids(sr)
    assert _numeric_values(sr, "Area") == pytest.approx([(mask == 1).sum() * 0.02])

    # Multi-frame without Frame of Reference: a Secondary Capture with one overlay per frame, and why.
    cine_source = pydicom.dcmread(study["cine"])
    sc = pydicom.dcmread(rows["cine.dcm"].secondary_capture)
    assert not rows["cine.dcm"].seg and "Frame of Reference" in rows["cine.dcm"].reason
    assert f"{rows['cine.dcm'].input}: Secondary Capture instead of SEG" in printed
    assert sc.SOPClassUID == MULTIFRAME_TRUE_COLOUR_SC and int(sc.NumberOfFrames) == 3 == rows["cine.dcm"].frames
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == cine_source.SOPInstanceUID
    assert list(sc.SourceImageSequence[0].ReferencedFrameNumber) == [1, 2, 3]
    assert sc.StudyInstanceUID == cine_source.StudyInstanceUID and "Frame of Reference" in sc.ImageComments
    from echocare.io.readers import read_ultrasound
    from echocare.visualize import overlay_rgb

    last = np.asarray(Image.open(out / "predictions" / "cine_frame0002.png"))
    expected = overlay_rgb(read_ultrasound(study["cine"], frames=2)[0].transpose(2, 0, 1), last)
    np.testing.assert_allclose(sc.pixel_array[2] / 255.0, expected, atol=1 / 255 + 1e-6)
    cine_sr = pydicom.dcmread(rows["cine.dcm"].sr)
    assert sc.SOPInstanceUID in _referenced_uids(cine_sr)
    assert len(_numeric_values(cine_sr, "Area")) == 3  # per frame, in pixels (no spacing)

    # No patient module: a Secondary Capture, with that reason.
    assert rows["no_patient.dcm"].secondary_capture and "patient module" in rows["no_patient.dcm"].reason
    assert rows["IM0001"].seg  # suffix-less DICOM of a PACS export

    # PNG and video: the bundle's masks per frame, no DICOM.
    assert rows["still.png"].frames == 1 and (out / "predictions" / "still.png").is_file()
    assert rows["clip.mp4"].format == "video" and rows["clip.mp4"].frames == 3
    assert [(out / "predictions" / f"clip_frame{f:04d}.png").is_file() for f in range(3)] == [True] * 3
    assert not rows["still.png"].seg and not rows["clip.mp4"].sr
    report = json.loads((out / "predict_report.json").read_text())
    assert {Path(r["input"]).name: r["status"] for r in report} == {n: r.status for n, r in rows.items()}
    assert (out / "predict_report.csv").read_text().count("\n") == len(rows) + 1


@pytest.mark.e2e
def test_max_frames_and_the_command_line(study, seg_checkpoint, tmp_path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "echocare.cli", "predict", "ddti_seg", "--input", str(study["cine"]),
               "--input", str(study["corrupt"]), "--out", str(out), "--checkpoint", str(seg_checkpoint),
               "--max-frames", "2", *[a for k, v in SMALL.items() for a in (f"--{k}", str(v))]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 1, result.stderr[-3000:]  # one input failed
    assert f"failed: {study['corrupt'].resolve()}: " in result.stdout
    (row,) = [r for r in json.loads((out / "predict_report.json").read_text()) if r["status"] == "ok"]
    assert row["frames"] == 2 and row["num_frames"] == 3
    sc = pydicom.dcmread(row["secondary_capture"])
    assert int(sc.NumberOfFrames) == 2 and list(sc.SourceImageSequence[0].ReferencedFrameNumber) == [1, 2]


def test_precheck_fails_truncated_and_huge_inputs(seg_checkpoint, tmp_path, capsys) -> None:
    """A truncated faststart MP4 (its index still declares 60 frames) and images over max_pixels fail the
    pre-check with one line each and are skipped before inference; the DICOM still gets its SEG and SR,
    the report has every input, and the command exits 1. (The MP4 passed the check before and then
    stopped the bundle mid-run, losing every output.)"""
    from echocare.cli import main

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    dicom = write_dicom(inputs / "single.dcm", _blob(48, 64)[0], "MONOCHROME2", NumberOfFrames=1,
                        **_patient_and_study(PixelSpacing=[0.1, 0.2]))
    full = write_video(tmp_path / "full.mp4", 60, "libx264", options={"movflags": "faststart"})
    clip = cut_video(full, inputs / "clip.mp4")
    huge = png_header_only(inputs / "huge.png", 12000, 12000)  # over the default 100 M pixels
    Image.fromarray(_blob(100, 120)[0]).save(inputs / "large.png")  # over --max-pixels 5000
    out = tmp_path / "out"
    argv = ["predict", "ddti_seg", "--input", str(inputs), "--out", str(out), "--checkpoint", str(seg_checkpoint),
            "--max-pixels", "5000", *[a for k, v in SMALL.items() for a in (f"--{k}", str(v))]]
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 1
    printed = capsys.readouterr().out

    report = {Path(r["input"]).name: r for r in json.loads((out / "predict_report.json").read_text())}
    assert set(report) == {"single.dcm", "clip.mp4", "huge.png", "large.png"}
    assert report["clip.mp4"]["status"] == "failed"
    assert re.fullmatch(r"only \d+ of the 60 frames it declares can be read \(the file is truncated or corrupt\)",
                        report["clip.mp4"]["reason"])
    assert report["huge.png"]["reason"] == ("frame of 12000x12000 = 144,000,000 pixels is over the max_pixels limit "
                                            "of 5,000 pixels per frame")
    assert report["large.png"]["reason"] == ("frame of 120x100 = 12,000 pixels is over the max_pixels limit of "
                                             "5,000 pixels per frame")
    failed = sorted(line for line in printed.splitlines() if line.startswith("failed:"))
    assert failed == sorted(f"failed: {report[n]['input']}: {report[n]['reason']}" for n in ("clip.mp4", "huge.png",
                                                                                           "large.png"))
    # Only the DICOM reached the bundle, and its results were written.
    row = report["single.dcm"]
    assert row["status"] == "ok" and row["frames"] == 1
    seg, sr = pydicom.dcmread(row["seg"]), pydicom.dcmread(row["sr"])
    assert seg.SOPClassUID == SEG_STORAGE and sr.SOPClassUID == COMPREHENSIVE_3D_SR
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == (
        pydicom.dcmread(dicom).SOPInstanceUID)
    assert [Path(r["image"]).name for r in json.loads((out / "predictions" / "predictions.json").read_text())] == [
        "single.dcm"]
    with pytest.raises(ValueError, match="max_pixels must be between 1 and 100,000,000"):
        predict("ddti_seg", [dicom], tmp_path / "out2", max_pixels=100_000_001)


def _probabilities(sr) -> list[list[float]]:
    """Per measurement group, the class probabilities of a classification SR."""
    groups = []
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeMeaning != "Imaging Measurements":
            continue
        for group in item.ContentSequence:
            groups.append([float(c.MeasuredValueSequence[0].NumericValue) for c in group.ContentSequence
                           if c.get("ValueType") == "NUM"])
    return groups


@pytest.mark.parametrize("bundle,classes,clip", [("busbra_cls", 4, False), ("thyroid_cls", 2, True)])
def test_classification_writes_a_structured_report(bundle, classes, clip, study, tmp_path) -> None:
    torch.manual_seed(0)
    checkpoint = tmp_path / "model.pt"
    torch.save(EchoCareClassifier("tiny", num_classes=classes).state_dict(), checkpoint)
    extra = {"clip_frames": 2} if clip else {}
    result = predict(bundle, [study["single"], study["cine"]], tmp_path / "out", checkpoint=str(checkpoint),
                     overrides={**SMALL, **extra}, echo=False)
    rows = _rows(result)
    predictions = json.loads((tmp_path / "out" / "predictions" / "predictions.json").read_text())
    for name, path in (("single.dcm", study["single"]), ("cine.dcm", study["cine"])):
        source = pydicom.dcmread(path)
        sr = pydicom.dcmread(rows[name].sr)
        assert sr.SOPClassUID == COMPREHENSIVE_3D_SR and source.SOPInstanceUID in _referenced_uids(sr)
        expected = [list(p["probabilities"].values()) for p in predictions if Path(p["image"]).name == name]
        groups = _probabilities(sr)
        assert len(groups) == (1 if clip or name == "single.dcm" else 3)
        np.testing.assert_allclose(groups, expected, atol=1e-5)
        assert np.allclose(np.sum(groups, axis=1), 1.0, atol=1e-4)
        frame_refs = [e.value for e in sr.iterall() if e.keyword == "ReferencedFrameNumber"]
        assert frame_refs == ([] if clip or name == "single.dcm" else [1, 2, 3])


def test_real_scanner_dicoms(real_data_dir, seg_checkpoint, tmp_path) -> None:
    """The issue's check: every scanner DICOM gets a SEG or a Secondary Capture (with its reason) that
    pydicom reads back with the source's UIDs and the predicted frames."""
    folder = real_data_dir / "dicom_us"
    result = predict("ddti_seg", [folder], tmp_path / "out", checkpoint=str(seg_checkpoint), max_frames=2,
                     overrides=SMALL, echo=False)
    rows = _rows(result)
    sources = sorted(p.name for p in folder.glob("*.dcm"))
    assert sorted(rows) == sources and len(sources) == 21
    kinds = {}
    for name in sources:
        row = rows[name]
        assert row.status == "ok", f"{name}: {row.reason}"
        source = pydicom.dcmread(folder / name, stop_before_pixels=True)
        frames = min(2, int(source.get("NumberOfFrames", 1) or 1))
        assert row.frames == frames
        if row.seg:
            out = pydicom.dcmread(row.seg)
            assert out.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
            assert int(out.NumberOfFrames) == frames and (out.Rows, out.Columns) == (source.Rows, source.Columns)
            kinds[name] = "SEG"
        else:
            out = pydicom.dcmread(row.secondary_capture)
            assert out.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
            assert int(out.NumberOfFrames) == frames and (out.Rows, out.Columns) == (source.Rows, source.Columns)
            assert row.reason.startswith("Secondary Capture instead of SEG: ")
            kinds[name] = "SC"
        assert out.StudyInstanceUID == source.StudyInstanceUID
        sr = pydicom.dcmread(row.sr)
        # Sources of retired SOP classes (color-pl/px) are referenced by their own class everywhere.
        for derived in (out, sr):
            assert _references(derived)[source.SOPInstanceUID] == {source.SOPClassUID}
    # Multi-frame sources have no Frame of Reference and three sources no patient module.
    assert {n for n, k in kinds.items() if k == "SC"} == {
        "OBXXXX1A_2frame.dcm", "OBXXXX1A_expb_2frame.dcm", "OBXXXX1A_rle_2frame.dcm", "color3d_jpeg_baseline.dcm",
        "pydicom_examples_ybr_color.dcm", "color-pl.dcm", "color-px.dcm", "pydicom_ExplVR_BigEnd.dcm",
    }


def test_precision_bf16_from_the_command_line_gives_the_float32_masks(study, seg_checkpoint, tmp_path, monkeypatch) -> None:
    """``echocare predict --precision bf16`` (issue #19): the same masks as float32 but for a few
    boundary pixels (seeded tiny weights; bfloat16 keeps 8 mantissa bits)."""
    from echocare.cli import main
    from echocare.networks.precision import BF16Inference

    wrapped = []
    original_init = BF16Inference.__init__
    monkeypatch.setattr(BF16Inference, "__init__", lambda self, *a, **k: (wrapped.append(1), original_init(self, *a, **k))[1])
    masks = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        argv = ["predict", "ddti_seg", "--input", str(study["png"]), "--out", str(out), "--checkpoint", str(seg_checkpoint),
                "--precision", precision, *[a for k, v in SMALL.items() for a in (f"--{k}", str(v))]]
        main(argv)
        (row,) = json.loads((out / "predict_report.json").read_text())
        assert row["status"] == "ok", row
        masks[precision] = np.asarray(Image.open(out / "predictions" / "still.png"))
        assert len(wrapped) == (precision == "bf16")  # the bundle's network ran in bf16 only when asked
    assert masks["bf16"].shape == masks["fp32"].shape == (48, 64)
    assert (masks["bf16"] == masks["fp32"]).mean() >= 0.97


def test_ray_engine_without_ray_names_the_extra_and_ray_options_need_it(study, tmp_path, monkeypatch) -> None:
    """``--engine ray`` where Ray is not installed: one line naming the extra, before anything is
    written; Ray's options with the local engine are refused."""
    from echocare.ray_cluster import RayClusterError

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    out = tmp_path / "out"
    with pytest.raises(RayClusterError, match=r"^--engine ray needs Ray, which is not installed: "
                                              r"pip install 'echocare\[scale\]'$"):
        predict("ddti_seg", [study["png"]], out, engine="ray")
    assert not out.exists()
    for options in ({"ray_address": "127.0.0.1:6379"}, {"workers": 2}):
        with pytest.raises(ValueError, match="only with --engine ray"):
            predict("ddti_seg", [study["png"]], out, **options)
    with pytest.raises(ValueError, match="engine: expected one of local, ray, got 'spark'"):
        predict("ddti_seg", [study["png"]], out, engine="spark")
    assert not out.exists()
