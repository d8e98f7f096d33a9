"""DICOM SEG, Structured Reports and Secondary Captures (echocare.io.dicom_writer): dicom3tools'
``dciodvfy`` finds no error of ours in anything written from the scanner DICOMs of the real data,
multi-segment SEGs, a multi-frame source with a Frame of Reference, lossless captures, and the
writers' refusals.

Masks are synthetic (no network): what is checked is the DICOM around them.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from itertools import islice
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_helpers import sr_numeric_values, write_dicom
from pydicom.dataset import Dataset
from pydicom.uid import JPEGLSLossless, generate_uid

from echocare.io import dicom_writer
from echocare.io.dicom_writer import Algorithm, ClassificationResult, SegNotPossible
from echocare.io.readers import iter_frames
from echocare.visualize import overlay_rgb

REPO = Path(__file__).resolve().parents[1]
ALGORITHM = Algorithm(name="ddti_seg", version="0.1.0")
NODULE = ["background", "nodule"]
FRAMES = 2  # frames written of a multi-frame source, as `echocare predict --max-frames 2`

DCIODVFY = shutil.which("dciodvfy")
needs_dciodvfy = pytest.mark.skipif(
    DCIODVFY is None, reason="dciodvfy not installed (Debian: apt-get install dicom3tools; .ci/run does)"
)

#: Errors a derived object inherits from its source, by (source file, start of dciodvfy's message),
#: with the reason they cannot be ours to fix.
INHERITED = {
    ("color-pl.dcm", "Illegal root for UID = <999.999.2.19941105.112000"):
        "the source's own Study, Series and SOP Instance UIDs (root 999 is not a registered root): "
        "a derived object stays in the source's study and references the source by these UIDs",
    ("color-px.dcm", "Illegal root for UID = <999.999.2.19941105.112000"):
        "the source's own Study, Series and SOP Instance UIDs, as for color-pl.dcm",
}


def dciodvfy_errors(path: Path) -> list[tuple[str, str]]:
    """dciodvfy's errors on ``path`` as (where, message): ``Error - </Where> - Message`` lines."""
    result = subprocess.run([DCIODVFY, "-new", str(path)], capture_output=True, text=True, timeout=60)
    errors = []
    for line in (result.stdout + result.stderr).splitlines():
        if line.startswith("Error - "):
            where, _, message = line[len("Error - "):].partition("> - ")
            errors.append((where.lstrip("<"), message) if message else ("", where))
    return errors


def ours(source_name: str, path: Path, used: set | None = None) -> list[str]:
    """dciodvfy's errors on ``path`` less those the source ``source_name`` brought (INHERITED)."""
    left = []
    for where, message in dciodvfy_errors(path):
        keys = [k for k in INHERITED if k[0] == source_name and message.startswith(k[1])]
        if keys:
            used is not None and used.update(keys)
        else:
            left.append(f"{path.name}: {where}: {message}")
    return left


def _masks(frames: int, rows: int, columns: int, classes: int = 2) -> np.ndarray:
    """(frames, rows, columns) label maps: one box per foreground class, moving with the frame."""
    masks = np.zeros((frames, rows, columns), np.uint8)
    for f in range(frames):
        for k in range(1, classes):
            top, left = rows * k // (classes + 1), columns // 4 + f
            masks[f, top:top + max(rows // (2 * classes), 1), left:left + columns // 3] = k
    return masks


def _expected_overlay(path: Path, masks: np.ndarray) -> np.ndarray:
    """The capture's pixels as the writer draws them: the source frames with the masks, 8 bit."""
    frames = islice(iter_frames(path), masks.shape[0])
    drawn = [overlay_rgb(frame.transpose(2, 0, 1), mask) for frame, mask in zip(frames, masks)]
    return np.floor(np.clip(np.stack(drawn), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _class_names(bundle: str) -> list[str]:
    meta = json.loads((REPO / "bundles" / bundle / "configs" / "metadata.json").read_text())
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    return [channels[str(k)] for k in range(len(channels))]


@pytest.fixture(scope="module")
def dicom_us(real_data_dir) -> Path:
    folder = real_data_dir / "dicom_us"
    if not folder.is_dir():
        pytest.skip(f"{folder}: no scanner DICOMs")
    return folder


# ------------------------------------------------------------------ every scanner DICOM


@needs_dciodvfy
def test_every_source_gives_conformant_seg_or_capture_and_reports(dicom_us, tmp_path) -> None:
    """SEG (or Secondary Capture), measurement SR and classification SR of every scanner DICOM:
    no dciodvfy error but the source's own; the captures are lossless JPEG-LS, timed as the source."""
    sources = sorted(dicom_us.glob("*.dcm"))
    assert len(sources) == 21
    problems, used, kinds = [], set(), {}
    for path in sources:
        source = pydicom.dcmread(path, stop_before_pixels=True)
        total = dicom_writer.num_frames(source)
        frames = list(range(min(total, FRAMES)))
        masks = _masks(len(frames), int(source.Rows), int(source.Columns))
        try:
            derived_path = tmp_path / f"{path.stem}_seg.dcm"
            derived = dicom_writer.write_segmentation(source, masks, NODULE, ALGORITHM, derived_path, frames=frames)
            kinds[path.name] = "SEG"
        except SegNotPossible as exc:
            derived_path = tmp_path / f"{path.stem}_sc.dcm"
            derived = dicom_writer.write_overlay_capture(
                source, islice(iter_frames(path), len(frames)), masks, ALGORITHM, str(exc), derived_path, frames=frames)
            kinds[path.name] = "SC"
        sr_path, cls_path = tmp_path / f"{path.stem}_sr.dcm", tmp_path / f"{path.stem}_cls.dcm"
        dicom_writer.write_segmentation_report(source, masks, NODULE, ALGORITHM, sr_path, frames=frames,
                                               segmentation=derived)
        per_frame = [ClassificationResult([0.3, 0.7], frame=f) for f in frames] if total > 1 else [
            ClassificationResult([0.3, 0.7])]
        dicom_writer.write_classification_report(source, per_frame, ["benign", "malignant"], ALGORITHM, cls_path)
        for written in (derived_path, sr_path, cls_path):
            problems += ours(path.name, written, used)

    assert problems == []
    assert used == set(INHERITED), f"allow-list entries no longer needed: {set(INHERITED) - used}"
    # Multi-frame sources have no plane positions, three sources no patient module: captures.
    assert {n for n, k in kinds.items() if k == "SC"} == {
        "OBXXXX1A_2frame.dcm", "OBXXXX1A_expb_2frame.dcm", "OBXXXX1A_rle_2frame.dcm", "color3d_jpeg_baseline.dcm",
        "pydicom_examples_ybr_color.dcm", "color-pl.dcm", "color-px.dcm", "pydicom_ExplVR_BigEnd.dcm",
    }

    # A capture is JPEG-LS lossless and reads back bit-exactly; none has a Frame Label Vector.
    captures = {p.name: pydicom.dcmread(p) for p in tmp_path.glob("*_sc.dcm")}
    assert {str(c.file_meta.TransferSyntaxUID) for c in captures.values()} == {JPEGLSLossless}
    assert not any("FrameLabelVector" in c for c in captures.values())
    cine = captures["color3d_jpeg_baseline_sc.dcm"]
    masks = _masks(FRAMES, int(cine.Rows), int(cine.Columns))
    np.testing.assert_array_equal(cine.pixel_array, _expected_overlay(dicom_us / "color3d_jpeg_baseline.dcm", masks))
    raw_bytes = cine.pixel_array.nbytes
    assert (tmp_path / "color3d_jpeg_baseline_sc.dcm").stat().st_size < 0.4 * raw_bytes
    # Timed as the source (Frame Time 33.333 ms); referenced frame by frame (a multi-frame class).
    assert cine.FrameIncrementPointer == 0x00181063 and float(cine.FrameTime) == pytest.approx(33.333)
    assert list(cine.SourceImageSequence[0].ReferencedFrameNumber) == [1, 2]
    # Two frames under the single-frame US Image class, untimed: source frame numbers as page
    # numbers; the reference cannot name frames there.
    untimed = captures["OBXXXX1A_2frame_sc.dcm"]
    assert untimed.FrameIncrementPointer == 0x00182001 and list(untimed.PageNumberVector) == [1, 2]
    assert "ReferencedFrameNumber" not in untimed.SourceImageSequence[0]
    # One frame: no Frame Increment Pointer.
    single = captures["color-pl_sc.dcm"]
    assert int(single.NumberOfFrames) == 1 and "FrameIncrementPointer" not in single
    # SEGs carry the General Image module's Patient Orientation (Type 2C).
    assert all("PatientOrientation" in pydicom.dcmread(p) for p in tmp_path.glob("*_seg.dcm"))


# ------------------------------------------------------------------ multi-segment SEG


@needs_dciodvfy
@pytest.mark.parametrize("bundle", ["musv_seg", "abdomen_seg"])
def test_multi_segment_seg(dicom_us, bundle, tmp_path) -> None:
    """A label map of every class of the bundle: one segment per class, each the class's pixels."""
    names = _class_names(bundle)
    assert len(names) >= 3
    source = pydicom.dcmread(dicom_us / "US1_UNCR.dcm", stop_before_pixels=True)
    masks = _masks(1, int(source.Rows), int(source.Columns), classes=len(names))
    assert set(np.unique(masks)) == set(range(len(names)))
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    seg = dicom_writer.write_segmentation(source, masks, names, ALGORITHM, seg_path)
    dicom_writer.write_segmentation_report(source, masks, names, ALGORITHM, sr_path, segmentation=seg,
                                           spacing_mm=(0.5, 0.25))
    assert ours("US1_UNCR.dcm", seg_path) + ours("US1_UNCR.dcm", sr_path) == []

    seg = pydicom.dcmread(seg_path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == names[1:]
    assert [int(s.SegmentNumber) for s in seg.SegmentSequence] == list(range(1, len(names)))
    segment_of_frame = [int(g.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                        for g in seg.PerFrameFunctionalGroupsSequence]
    for frame, k in zip(seg.pixel_array.reshape(-1, *masks.shape[1:]), segment_of_frame):
        np.testing.assert_array_equal(frame, (masks[0] == k).astype(np.uint8))
    areas = sr_numeric_values(pydicom.dcmread(sr_path), "Area")
    assert areas == pytest.approx([(masks[0] == k).sum() * 0.125 for k in range(1, len(names))])


# ------------------------------------------------------------------ multi-frame with a Frame of Reference


@needs_dciodvfy
def test_multiframe_source_with_a_frame_of_reference(dicom_us, tmp_path) -> None:
    """The 30-frame ultrasound cine given a Frame of Reference: without plane positions still no
    SEG (a clear reason, then a conformant capture); as an enhanced multi-frame object with plane
    positions, a SEG of every frame, each referencing its source frame."""
    cine_path = dicom_us / "pydicom_examples_ybr_color.dcm"
    cine = pydicom.dcmread(cine_path, stop_before_pixels=True)
    cine.FrameOfReferenceUID, cine.PositionReferenceIndicator = generate_uid(), ""
    total = dicom_writer.num_frames(cine)
    assert total == 30
    masks = _masks(total, int(cine.Rows), int(cine.Columns))
    with pytest.raises(SegNotPossible, match=r"^multi-frame source \(30 frames\) without a Frame of Reference "
                                             r"and per-frame plane positions: "):
        dicom_writer.write_segmentation(cine, masks, NODULE, ALGORITHM, tmp_path / "refused.dcm")
    assert not (tmp_path / "refused.dcm").exists()
    sc_path = tmp_path / "sc.dcm"
    dicom_writer.write_overlay_capture(cine, islice(iter_frames(cine_path), 3), masks[:3], ALGORITHM, "no SEG",
                                       sc_path, frames=[0, 1, 2])
    assert ours(cine_path.name, sc_path) == []

    # The same pixels as an Enhanced US Volume: orientation shared, a position per frame.
    volume = copy.deepcopy(cine)
    volume.SOPClassUID = "1.2.840.10008.5.1.4.1.1.6.2"
    orientation, measures, shared = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.PixelSpacing, measures.SliceThickness = [0.2, 0.2], 1.0
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = [orientation], [measures]
    volume.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for k in range(total):
        position, group = Dataset(), Dataset()
        position.ImagePositionPatient = [0.0, 0.0, float(k)]
        group.PlanePositionSequence = [position]
        per_frame.append(group)
    volume.PerFrameFunctionalGroupsSequence = per_frame
    seg_path, sr_path = tmp_path / "seg.dcm", tmp_path / "sr.dcm"
    seg = dicom_writer.write_segmentation(volume, masks, NODULE, ALGORITHM, seg_path)
    results = [ClassificationResult([0.6, 0.4], frame=f) for f in (0, 29)]
    dicom_writer.write_segmentation_report(volume, masks, NODULE, ALGORITHM, sr_path, segmentation=seg)
    dicom_writer.write_classification_report(volume, results, ["benign", "malignant"], ALGORITHM, tmp_path / "cls.dcm")
    assert ours(cine_path.name, seg_path) + ours(cine_path.name, sr_path) + ours(cine_path.name, tmp_path / "cls.dcm") == []

    seg = pydicom.dcmread(seg_path)
    assert seg.FrameOfReferenceUID == cine.FrameOfReferenceUID and int(seg.NumberOfFrames) == total
    source_frame = [int(g.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
                    for g in seg.PerFrameFunctionalGroupsSequence]
    assert sorted(source_frame) == list(range(1, total + 1))
    for frame, number in zip(seg.pixel_array, source_frame):
        np.testing.assert_array_equal(frame, masks[number - 1])
    cls_frames = [e.value for e in pydicom.dcmread(tmp_path / "cls.dcm").iterall() if e.keyword == "ReferencedFrameNumber"]
    assert cls_frames == [1, 30]
    # Part of a multi-frame SEG: refused (an empty frame would mean "nothing there").
    with pytest.raises(SegNotPossible, match=r"^only 2 of the source's 30 frames were predicted"):
        dicom_writer.write_segmentation(volume, masks[:2], NODULE, ALGORITHM, tmp_path / "part.dcm", frames=[0, 1])


# ------------------------------------------------------------------ refusals


def _study(tmp_path: Path, name: str, frames: int = 1, **attrs) -> pydicom.Dataset:
    """A small ultrasound DICOM (20 x 24, ``frames`` frames) with a patient and study unless
    ``attrs`` drop them (value None)."""
    header = {"PatientName": "Doe^Jane", "PatientID": "42", "PatientBirthDate": "", "PatientSex": "F",
              "StudyInstanceUID": generate_uid(), "StudyDate": "20240101", "StudyTime": "120000",
              "ReferringPhysicianName": "", "StudyID": "1", "AccessionNumber": "", "SeriesInstanceUID": generate_uid(),
              "NumberOfFrames": frames, **attrs}
    pixels = np.random.default_rng(0).integers(0, 256, (frames, 20, 24) if frames > 1 else (20, 24), dtype=np.uint8)
    path = write_dicom(tmp_path / f"{name}.dcm", pixels, "MONOCHROME2",
                       **{k: v for k, v in header.items() if v is not None})
    return pydicom.dcmread(path)


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and message
    return message


@pytest.mark.parametrize(
    ("frames", "attrs", "expected"),
    [
        (3, {}, "multi-frame source (3 frames) without a Frame of Reference and per-frame plane positions: "
                "highdicom makes a SEG of such a source for a single frame only"),
        (1, {"PatientID": None, "PatientSex": None},
         "source lacks the patient module (PatientID, PatientSex): highdicom copies it into a SEG"),
        (1, {"StudyID": None}, "source lacks General Study attributes (StudyID): highdicom copies them into a SEG"),
    ],
)
def test_seg_refusals_name_the_reason(tmp_path, frames, attrs, expected) -> None:
    source = _study(tmp_path, "source", frames=frames, **attrs)
    assert dicom_writer.seg_refusal_reason(source) is not None
    with pytest.raises(SegNotPossible) as refused:
        dicom_writer.write_segmentation(source, np.zeros((frames, 20, 24), np.uint8), NODULE, ALGORITHM,
                                        tmp_path / "seg.dcm")
    assert _one_line(refused) == expected
    assert not (tmp_path / "seg.dcm").exists()


def test_writer_refusals_of_inconsistent_input(tmp_path) -> None:
    source = _study(tmp_path, "source")
    mask = np.zeros((1, 20, 24), np.uint8)
    cases = [
        (lambda: dicom_writer.write_segmentation(source, mask, NODULE, ALGORITHM, tmp_path / "a.dcm", frames=[0, 1]),
         ValueError, "2 frame indices for 1 masks"),
        (lambda: dicom_writer.write_segmentation(source, np.zeros((1, 10, 24), np.uint8), NODULE, ALGORITHM,
                                                 tmp_path / "b.dcm"),
         ValueError, "masks of size (10, 24) for a source of 20x24"),
        (lambda: dicom_writer.write_overlay_capture(source, [], mask, ALGORITHM, "why", tmp_path / "c.dcm"),
         ValueError, "0 images and 1 frame numbers for 1 masks"),
        (lambda: dicom_writer.write_classification_report(source, [ClassificationResult([1.0])], NODULE, ALGORITHM,
                                                          tmp_path / "d.dcm"),
         ValueError, "1 probabilities for 2 classes"),
    ]
    for call, error, message in cases:
        with pytest.raises(error) as refused:
            call()
        assert _one_line(refused) == message
    assert list(tmp_path.glob("[abcd].dcm")) == []


def test_highdicom_refusal_is_one_line(tmp_path) -> None:
    """What highdicom refuses beyond seg_refusal_reason's checks arrives as one SegNotPossible line."""
    source = _study(tmp_path, "source")
    source.SOPClassUID = "1.2.826.0.1.3680043.10.1"  # a private SOP class: highdicom knows no IOD for it
    with pytest.raises(SegNotPossible) as refused:
        dicom_writer.write_segmentation(source, np.zeros((1, 20, 24), np.uint8), NODULE, ALGORITHM, tmp_path / "s.dcm")
    assert _one_line(refused) == "highdicom refused the SEG (KeyError: '1.2.826.0.1.3680043.10.1')"
    assert not (tmp_path / "s.dcm").exists()
