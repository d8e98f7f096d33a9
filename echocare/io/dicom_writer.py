"""Model results as DICOM objects a PACS viewer opens (highdicom): segmentations as DICOM SEG,
classifications and measurements as a Structured Report, and a Secondary Capture overlay
where the source cannot carry a SEG.

Every object references its source instance (Study Instance UID, and the source's SOP Class
and SOP Instance UIDs in the referenced-series / source-image sequences), so a viewer shows
it beside the image it was computed from. Frames are numbered as in DICOM: frame ``k`` of a
source (0-based in our arrays) is ``ReferencedFrameNumber`` ``k + 1``, in references to sources
of a multi-frame SOP class (the standard allows no frame numbers for the others, such as cine
loops written under the single-frame Ultrasound Image class).

What is written passes dicom3tools' ``dciodvfy`` without errors of its own
(tests/test_io_dicom_writer.py); errors a source carries (invalid UIDs, say) are copied with it.

Masks are ``(frames, rows, columns)`` class indices at the source's size (0 = background),
as the segmentation bundles write them; classification results are per-frame (or per-clip)
class probabilities.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from echocare.visualize import overlay_rgb

__all__ = [
    "Algorithm",
    "ClassificationResult",
    "SegNotPossible",
    "class_concept",
    "missing_patient_and_study",
    "seg_refusal_reason",
    "segmented_property",
    "write_classification_report",
    "write_overlay_capture",
    "write_segmentation",
    "write_segmentation_report",
]

#: Coding scheme of EchoCare's own concepts (private: "99" prefix, PS3.16 section 8).
PRIVATE_SCHEME = "99ECHOCARE"
MANUFACTURER = "EchoCare"
#: Transfer syntax of the Secondary Captures: JPEG-LS Lossless (pydicom's encoder, with pyjpegls).
CAPTURE_TRANSFER_SYNTAX = "1.2.840.10008.1.2.4.80"

# Class names of the bundles with a SNOMED CT concept (pydicom's ``codes.SCT`` keyword):
# what a viewer shows as the segment's property type. Others get a private code.
_SCT_KEYWORDS = {
    "nodule": "Nodule",
    "lesion": "Lesion",
    "mass": "Mass",
    "tumor": "Tumor",
    "cyst": "Cyst",
    "liver": "Liver",
    "kidney": "Kidney",
    "pancreas": "Pancreas",
    "bladder": "Bladder",
    "spleen": "Spleen",
    "artery": "Artery",
    "vein": "Vein",
    "lumen": "Lumen",
    "head": "Head",
    "thyroid": "Thyroid",
    "breast": "Breast",
}
_ABNORMAL = {"nodule", "lesion", "mass", "tumor", "cyst"}


class SegNotPossible(ValueError):
    """highdicom cannot build a DICOM SEG from this source; the message says why."""


@dataclass
class Algorithm:
    """The model that produced a result: the bundle's name and version (``metadata.json``)."""

    name: str
    version: str

    def seg_identification(self):
        """The SEG's Segment Algorithm Identification (family: artificial intelligence)."""
        import highdicom as hd
        from pydicom.sr.codedict import codes

        return hd.AlgorithmIdentificationSequence(
            name=self.name, version=self.version, family=codes.cid7162.ArtificialIntelligence
        )

    def sr_identification(self):
        """The SR's Algorithm Name / Version concept modifiers."""
        import highdicom as hd

        return hd.sr.AlgorithmIdentification(name=self.name, version=self.version)


@dataclass
class ClassificationResult:
    """Class probabilities of one frame (``frame`` 0-based) or of the whole clip (``frame`` None)."""

    probabilities: list[float]
    frame: int | None = None

    @property
    def predicted(self) -> int:
        return int(np.argmax(self.probabilities))


# ----------------------------------------------------------------------------- codes


def _short_code(text: str, index: int, prefix: str = "") -> str:
    """A private code value (VR SH: at most 16 characters) for a free-text class name: the name
    itself in capitals when it fits, else ``CLASS-<index>``."""
    value = re.sub(r"[^A-Za-z0-9 ._-]", "", text).strip().upper()
    return prefix + value if 0 < len(prefix + value) <= 16 else f"{prefix}CLASS-{index}"


def class_concept(name: str, index: int):
    """The coded concept of class ``name`` (index ``index`` in the bundle's class list):
    SNOMED CT where the name is a known structure, else a private ``99ECHOCARE`` code."""
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    keyword = _SCT_KEYWORDS.get(name.strip().lower())
    if keyword is not None:
        code = getattr(codes.SCT, keyword)
        return CodedConcept(code.value, code.scheme_designator, code.meaning)
    return CodedConcept(_short_code(name, index), PRIVATE_SCHEME, name[:64])


def segmented_property(name: str, index: int):
    """(category, type) concepts of a segment for class ``name``."""
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    category = codes.SCT.MorphologicallyAbnormalStructure if name.strip().lower() in _ABNORMAL else (
        codes.SCT.AnatomicalStructure if name.strip().lower() in _SCT_KEYWORDS else codes.SCT.Tissue
    )
    return CodedConcept(category.value, category.scheme_designator, category.meaning), class_concept(name, index)


# ----------------------------------------------------------------------------- helpers


def _series_number(source: Any, offset: int) -> int:
    """A series number beside the source's (derived series are numbered after their source)."""
    try:
        return int(source.SeriesNumber) * 100 + offset
    except (AttributeError, TypeError, ValueError):
        return offset


def num_frames(source: Any) -> int:
    """Frames of a DICOM dataset (1 for a single-frame object)."""
    try:
        return max(int(source.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


#: Image SOP classes whose IOD has the Multi-frame module (PS3.3 Annex A), retired ones included.
#: Only these may be referenced frame by frame (Referenced Frame Number, PS3.3 C.12.1.1.3 /
#: C.17.3.2.1): scanners also write cine loops under the single-frame Ultrasound Image class,
#: whose frames a reference cannot name.
_MULTIFRAME_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image (retired)
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image
    "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume
    "1.2.840.10008.5.1.4.1.1.6.3",  # Photoacoustic Image
    "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color Secondary Capture
    "1.2.840.10008.5.1.4.1.1.12.1",  # X-Ray Angiographic Image
    "1.2.840.10008.5.1.4.1.1.12.1.1",  # Enhanced XA Image
    "1.2.840.10008.5.1.4.1.1.12.2",  # X-Ray Radiofluoroscopic Image
    "1.2.840.10008.5.1.4.1.1.12.2.1",  # Enhanced XRF Image
    "1.2.840.10008.5.1.4.1.1.20",  # Nuclear Medicine Image
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET Image
    "1.2.840.10008.5.1.4.1.1.77.1.1.1",  # Video Endoscopic Image
    "1.2.840.10008.5.1.4.1.1.77.1.2.1",  # Video Microscopic Image
    "1.2.840.10008.5.1.4.1.1.77.1.4.1",  # Video Photographic Image
    "1.2.840.10008.5.1.4.1.1.77.1.5.1",  # Ophthalmic Photography 8 Bit Image
    "1.2.840.10008.5.1.4.1.1.77.1.5.2",  # Ophthalmic Photography 16 Bit Image
})


def _frames_addressable(source: Any) -> bool:
    """Whether references to ``source`` may name its frames: a multi-frame object of a
    multi-frame SOP class."""
    return num_frames(source) > 1 and str(source.get("SOPClassUID", "")) in _MULTIFRAME_SOP_CLASSES


_PATIENT_MODULE = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
_STUDY_MODULE = ("StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


def seg_refusal_reason(source: Any) -> str | None:
    """Why highdicom will not build a SEG from ``source``, or None when it can.

    highdicom makes a SEG of several frames only where it can place each frame: a Frame of
    Reference and per-frame plane positions (the functional groups of an enhanced multi-frame
    object; an ultrasound cine has neither, or a Frame of Reference alone). It copies the
    Patient and General Study attributes (Type 2: present, possibly empty) from the source,
    failing on a missing one. Asking first gives the user a sentence instead of a library
    traceback. (highdicom tells a multi-frame source by its SOP class; scanners also write
    several frames under the single-frame Ultrasound Image Storage class, so the frame count
    is what is checked here.)
    """
    frames = num_frames(source)
    placed = all(k in source for k in ("FrameOfReferenceUID", "SharedFunctionalGroupsSequence",
                                       "PerFrameFunctionalGroupsSequence"))
    if frames > 1 and not placed:
        return (
            f"multi-frame source ({frames} frames) without a Frame of Reference and per-frame plane "
            "positions: highdicom makes a SEG of such a source for a single frame only"
        )
    missing = [k for k in _PATIENT_MODULE if k not in source]
    if missing:
        return f"source lacks the patient module ({', '.join(missing)}): highdicom copies it into a SEG"
    missing = [k for k in _STUDY_MODULE if k not in source]
    if missing:
        return f"source lacks General Study attributes ({', '.join(missing)}): highdicom copies them into a SEG"
    return None


@contextlib.contextmanager
def _names_as_given() -> Iterator[None]:
    """Silence highdicom's warning about one-component patient names ("Anonymized"): the name
    is copied from the source as it is, so the warning is nothing the user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name.*")
        yield


def _save(dataset: Any, path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path


# ----------------------------------------------------------------------------- SEG


def write_segmentation(
    source: Any,
    masks: np.ndarray,
    class_names: Sequence[str],
    algorithm: Algorithm,
    path: str | os.PathLike[str],
    frames: Sequence[int] | None = None,
):
    """Write a BINARY DICOM SEG of ``masks`` on ``source``, one segment per foreground class.

    Args:
        source: the source image (pydicom dataset).
        masks: (F, rows, columns) class indices (0 = background), frame ``frames[i]`` of the
            source in ``masks[i]``; a single (rows, columns) mask for a single-frame source.
        class_names: the bundle's classes, background first.
        algorithm: the model (segment algorithm identification).
        path: the ``.dcm`` to write.
        frames: the source frames (0-based) the masks belong to; default all, in order.

    Returns:
        The SEG dataset (also written to ``path``).

    Raises:
        SegNotPossible: highdicom refuses the source (the message says why).
    """
    import highdicom as hd

    reason = seg_refusal_reason(source)
    if reason:
        raise SegNotPossible(reason)
    source = _conformant_dates(source)
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    total = num_frames(source)
    frames = list(range(total)) if frames is None else [int(f) for f in frames]
    if len(frames) != masks.shape[0]:
        raise ValueError(f"{len(frames)} frame indices for {masks.shape[0]} masks")
    if masks.shape[1:] != (int(source.Rows), int(source.Columns)):
        raise ValueError(f"masks of size {masks.shape[1:]} for a source of {source.Rows}x{source.Columns}")
    if frames != list(range(total)):
        # An empty SEG frame means "nothing there", which a frame never predicted is not.
        raise SegNotPossible(
            f"only {len(frames)} of the source's {total} frames were predicted (--max-frames): "
            "a SEG of a multi-frame source covers all its frames"
        )
    segments = []
    for k, name in enumerate(class_names):
        if k == 0:
            continue
        category, kind = segmented_property(name, k)
        segments.append(
            hd.seg.SegmentDescription(
                segment_number=k,
                segment_label=name[:64],
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm.seg_identification(),
                tracking_uid=hd.UID(),
                tracking_id=f"{algorithm.name} {name}"[:64],
            )
        )
    try:
        with _names_as_given(), _known_sop_class(source) as known:
            seg = hd.seg.Segmentation(
                source_images=[known],
                pixel_array=masks.astype(np.uint8) if total > 1 else masks[0].astype(np.uint8),
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=segments,
                series_instance_uid=hd.UID(),
                series_number=_series_number(source, 91),
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer=MANUFACTURER,
                manufacturer_model_name=algorithm.name[:64],
                software_versions=algorithm.version,
                device_serial_number="0",
                series_description=f"{algorithm.name} segmentation"[:64],
                omit_empty_frames=False,
            )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # Conditions highdicom checks that seg_refusal_reason does not anticipate.
        message = " ".join(str(exc).split())  # one line
        raise SegNotPossible(f"highdicom refused the SEG ({type(exc).__name__}: {message})") from None
    _restore_sop_class(seg, source)
    # General Image, Type 2C (required where the SEG has no plane orientation, as without a
    # Frame of Reference): the source's, whose pixel grid the SEG shares; empty = unknown.
    if "PatientOrientation" not in seg:
        seg.PatientOrientation = source.get("PatientOrientation", "")
    _save(seg, path)
    return seg


# ----------------------------------------------------------------------------- Secondary Capture


def _uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def write_overlay_capture(
    source: Any,
    images: Iterable[np.ndarray],
    masks: np.ndarray,
    algorithm: Algorithm,
    reason: str,
    path: str | os.PathLike[str],
    frames: Sequence[int] | None = None,
):
    """Write a (Multi-frame True Colour) Secondary Capture of the masks drawn on the source.

    The fallback where a SEG cannot be made: each frame shows the source frame with every
    foreground class filled and outlined in its colour (:func:`echocare.visualize.overlay_rgb`),
    in the source's study, referencing the source instance and frames (Source Image
    Sequence). ``reason`` (why there is no SEG) goes into the Image Comments. Frames are timed
    as in the source (Frame Time / Frame Time Vector; an untimed source's frames carry their
    source frame numbers as Page Number Vector), and the pixels are JPEG-LS lossless.

    Args:
        source: the source image (pydicom dataset).
        images: the F source frames as read, each (rows, columns, 3) float RGB in [0, 1] (any
            iterable, so that a long cine is never held in memory as floats).
        masks: (F, rows, columns) class indices.
        algorithm: the model.
        reason: why a SEG was not written.
        path: the ``.dcm`` to write.
        frames: the source frames (0-based) in ``images``; default 0..F-1.

    Returns:
        The Secondary Capture dataset (also written to ``path``).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import MultiFrameTrueColorSecondaryCaptureImageStorage, generate_uid

    masks = np.asarray(masks)
    frames = list(range(masks.shape[0])) if frames is None else [int(f) for f in frames]
    drawn = [_uint8(overlay_rgb(np.asarray(image).transpose(2, 0, 1), mask)) for image, mask in zip(images, masks)]
    if len(drawn) != masks.shape[0] or len(frames) != masks.shape[0]:
        raise ValueError(f"{len(drawn)} images and {len(frames)} frame numbers for {masks.shape[0]} masks")
    pixels = np.stack(drawn)
    del drawn

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.SOPClassUID = MultiFrameTrueColorSecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    _copy_patient_and_study(_conformant_dates(source), ds)
    now = datetime.datetime.now()
    # General Series / SC Equipment / General Image: a derived series in the source's study.
    ds.Modality = str(source.get("Modality", "OT") or "OT")
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = _series_number(source, 92)
    ds.SeriesDescription = f"{algorithm.name} overlay"[:64]
    # General Series, Type 2C for paired body parts: the source's side (empty = unknown).
    ds.Laterality = source.get("Laterality", "")
    ds.ConversionType = "WSD"
    ds.Manufacturer = MANUFACTURER
    ds.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    ds.SecondaryCaptureDeviceManufacturerModelName = algorithm.name[:64]
    ds.SecondaryCaptureDeviceSoftwareVersions = algorithm.version
    ds.DateOfSecondaryCapture = now.strftime("%Y%m%d")
    ds.TimeOfSecondaryCapture = now.strftime("%H%M%S")
    ds.ContentDate, ds.ContentTime = ds.DateOfSecondaryCapture, ds.TimeOfSecondaryCapture
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "YES"  # the masks are drawn into the pixels
    ds.ImageComments = f"EchoCare {algorithm.name} {algorithm.version} segmentation overlay; no DICOM SEG: {reason}"[:10240]
    ds.DerivationDescription = ds.ImageComments[:1024]
    ds.SourceImageSequence = [_source_reference(source, frames)]
    ds.ReferencedSeriesSequence = [_series_reference(source)]
    ds.NumberOfFrames = len(frames)
    for keyword, value in _frame_increment(source, frames).items():
        setattr(ds, keyword, value)
    ds.set_pixel_data(pixels, photometric_interpretation="RGB", bits_stored=8)
    # Lossless compression (a 120-frame 640x480 cine is 110 MB uncompressed, about a fifth
    # as JPEG-LS), bit-exact; the SOP Instance UID stays the one referenced above.
    ds.compress(CAPTURE_TRANSFER_SYNTAX, generate_instance_uid=False)
    _save(ds, path)
    return ds


def _source_frame_times(source: Any) -> list[float] | None:
    """Acquisition time of each source frame in ms after the first (Cine module: Frame Time,
    or Frame Time Vector of increments), or None where the source gives no timing."""
    count = num_frames(source)
    try:
        if "FrameTimeVector" in source:
            steps = [float(v) for v in source.FrameTimeVector]
            if len(steps) == count:
                return list(np.cumsum([0.0, *steps[1:]]))
        if source.get("FrameTime") not in (None, ""):
            return [k * float(source.FrameTime) for k in range(count)]
    except (TypeError, ValueError):
        pass
    return None


def _frame_increment(source: Any, frames: Sequence[int]) -> dict[str, Any]:
    """Frame Increment Pointer (Type 1C: more than one frame only) of a capture of the source's
    ``frames`` (0-based), and the attribute it points to: the frames' times from the source
    (Cine module: Frame Time where evenly spaced, else Frame Time Vector); for a source without
    timing, the Page Number Vector holding each frame's number in the source (1-based)."""
    from pydicom.valuerep import DSfloat

    if len(frames) < 2:
        return {}
    times = _source_frame_times(source)
    if times is None or max(frames) >= len(times):
        return {"FrameIncrementPointer": 0x00182001, "PageNumberVector": [int(f) + 1 for f in frames]}
    steps = [times[b] - times[a] for a, b in zip(frames, frames[1:])]
    if max(steps) - min(steps) < 1e-6:
        return {"FrameIncrementPointer": 0x00181063, "FrameTime": DSfloat(steps[0], auto_format=True)}
    return {"FrameIncrementPointer": 0x00181065,
            "FrameTimeVector": [DSfloat(v, auto_format=True) for v in (0.0, *steps)]}


def _copy_patient_and_study(source: Any, target: Any) -> None:
    """Patient and General Study attributes from the source (Type 2: empty where it has none)."""
    for keyword in (*_PATIENT_MODULE, *_STUDY_MODULE):
        setattr(target, keyword, source.get(keyword, ""))
    if not target.StudyInstanceUID:
        from pydicom.uid import generate_uid

        target.StudyInstanceUID = generate_uid()


def _source_reference(source: Any, frames: Sequence[int] | None = None):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frames is not None and _frames_addressable(source):
        item.ReferencedFrameNumber = [int(f) + 1 for f in frames]
    return item


def _series_reference(source: Any):
    from pydicom.dataset import Dataset

    series = Dataset()
    series.SeriesInstanceUID = source.get("SeriesInstanceUID", "")
    series.ReferencedInstanceSequence = [_source_reference(source)]
    return series


# ----------------------------------------------------------------------------- Structured Reports


def _observation_context(algorithm: Algorithm):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=hd.UID(), name=algorithm.name[:64], manufacturer_name=MANUFACTURER, model_name=algorithm.name[:64]
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )


def _source_for_group(source: Any, frame: int | None):
    import highdicom as hd

    frames = [int(frame) + 1] if frame is not None and _frames_addressable(source) else None
    # The constructor, not from_source_image: that one takes frame numbers only for multi-frame
    # SOP classes, and scanners write cine loops under the single-frame US Image Storage too.
    return hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID, referenced_frame_numbers=frames)


def _tracking(label: str):
    import highdicom as hd

    return hd.sr.TrackingIdentifier(uid=hd.UID(), identifier=label[:64])


def missing_patient_and_study(source: Any) -> list[str]:
    """Patient and General Study attributes (Type 2) that ``source`` lacks."""
    return [k for k in (*_PATIENT_MODULE, *_STUDY_MODULE) if k not in source]


def _with_empty_type2(source: Any) -> Any:
    """``source``, or a copy with its missing Patient / General Study attributes present
    and empty (Type 2: "unknown"), which highdicom's SR copies from its first evidence."""
    missing = missing_patient_and_study(source)
    if not missing:
        return source
    filled = copy.deepcopy(source)
    for keyword in missing:
        setattr(filled, keyword, "")
    return filled


#: Retired ultrasound SOP classes (still written by older scanners) and their successors, which
#: have the same modules: highdicom looks modules up by SOP class and knows only the latter.
_RETIRED_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.6": "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image Storage
    "1.2.840.10008.5.1.4.1.1.3": "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image Storage
}


_US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
_US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"


@contextlib.contextmanager
def _known_sop_class(source: Any) -> Iterator[Any]:
    """Give highdicom ``source`` under a SOP class it handles; afterwards, the caller's object is
    made to reference the source by its real SOP class again (:func:`_restore_sop_class`).

    Retired ultrasound classes become their successors. A one-frame object of the Ultrasound
    Multi-frame class (scanners write single images so) becomes an Ultrasound Image: highdicom
    reads multi-frame classes as enhanced objects with functional groups, which these lack.
    """
    sop_class = str(source.get("SOPClassUID", ""))
    successor = _RETIRED_SOP_CLASSES.get(sop_class, sop_class)
    one_frame = successor == _US_MULTIFRAME and num_frames(source) == 1
    if successor == sop_class and not one_frame:
        yield source
        return
    proxy = copy.deepcopy(source)
    proxy.SOPClassUID = _US_IMAGE if one_frame else successor
    if one_frame and "NumberOfFrames" in proxy:
        del proxy.NumberOfFrames
    yield proxy


def _restore_sop_class(dataset: Any, source: Any) -> None:
    """Every reference to ``source`` in ``dataset`` names the source's own SOP Class UID."""
    uid, sop_class = str(source.SOPInstanceUID), str(source.SOPClassUID)
    for element in list(dataset.iterall()):
        if element.VR == "SQ":
            for item in element.value:
                if str(item.get("ReferencedSOPInstanceUID", "")) == uid and "ReferencedSOPClassUID" in item:
                    item.ReferencedSOPClassUID = sop_class


_DATES = ("StudyDate", "PatientBirthDate")
_DA_FORM = re.compile(r"\d{8}")
_TM_FORM = re.compile(r"\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?")
_TIMES = ("StudyTime",)


def _conformant_dates(source: Any) -> Any:
    """``source``, or a copy whose study / birth dates and times in the old ACR-NEMA
    forms (``1994.11.05``, ``11:20:00``, which older scanners still write) are in DICOM's
    (``19941105``, ``112000``), and unreadable ones empty: highdicom copies these values
    into the objects it makes and refuses non-conformant ones."""
    fixes = {}
    for keywords, separator, form in ((_DATES, ".", _DA_FORM), (_TIMES, ":", _TM_FORM)):
        for keyword in keywords:
            text = str(source.get(keyword, "") or "").strip()
            if text and not form.fullmatch(text):
                legacy = text.replace(separator, "")
                fixes[keyword] = legacy if form.fullmatch(legacy) else ""
    if not fixes:
        return source
    fixed = copy.deepcopy(source)
    for keyword, value in fixes.items():
        setattr(fixed, keyword, value)
    return fixed


def _write_report(source: Any, groups: list, algorithm: Algorithm, title_meaning: str, evidence: list,
                  path: str | os.PathLike[str]):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    source = _conformant_dates(_with_empty_type2(source))
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(algorithm),
        procedure_reported=codes.SCT.Ultrasonography,
        imaging_measurements=groups,
    )
    with _names_as_given(), _known_sop_class(source) as known:
        sr = hd.sr.Comprehensive3DSR(
            evidence=[known, *evidence],
            content=report,
            series_instance_uid=hd.UID(),
            series_number=_series_number(source, 93),
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            series_description=f"{algorithm.name} {title_meaning}"[:64],
            is_complete=True,
        )
    _restore_sop_class(sr, source)
    _save(sr, path)
    return sr


def write_classification_report(
    source: Any,
    results: Sequence[ClassificationResult],
    class_names: Sequence[str],
    algorithm: Algorithm,
    path: str | os.PathLike[str],
):
    """Write a Comprehensive 3D SR (TID 1500 measurement report) of classification results.

    One measurement group per result, referencing the source (and its frame, for per-frame
    results of a multi-frame source): a qualitative evaluation "Finding" = the predicted
    class, and one numeric "Probability of <class>" per class (unit 1).

    Returns:
        The SR dataset (also written to ``path``).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from highdicom.sr import CodedConcept

    groups = []
    for result in results:
        if len(result.probabilities) != len(class_names):
            raise ValueError(f"{len(result.probabilities)} probabilities for {len(class_names)} classes")
        where = "clip" if result.frame is None else f"frame {result.frame + 1}"
        measurements = [
            hd.sr.Measurement(
                name=CodedConcept(_short_code(name, k, prefix="P-"), PRIVATE_SCHEME, f"Probability of {name}"[:64]),
                value=float(p),
                unit=codes.UCUM.NoUnits,
                algorithm_id=algorithm.sr_identification(),
            )
            for k, (name, p) in enumerate(zip(class_names, result.probabilities))
        ]
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(f"{algorithm.name} {where}"),
                algorithm_id=algorithm.sr_identification(),
                source_images=[_source_for_group(source, result.frame)],
                qualitative_evaluations=[
                    hd.sr.QualitativeEvaluation(
                        name=codes.DCM.Finding,
                        value=class_concept(class_names[result.predicted], result.predicted),
                    )
                ],
                measurements=measurements,
            )
        )
    return _write_report(source, groups, algorithm, "classification", [], path)


def write_segmentation_report(
    source: Any,
    masks: np.ndarray,
    class_names: Sequence[str],
    algorithm: Algorithm,
    path: str | os.PathLike[str],
    frames: Sequence[int] | None = None,
    spacing_mm: Sequence[float] | None = None,
    segmentation: Any | None = None,
):
    """Write a Comprehensive 3D SR of the areas of the segmented classes, per frame.

    One measurement group per (frame, foreground class), with finding type = the class and
    an "Area" measurement: in mm² when ``spacing_mm`` (row, column) is known, else in pixels
    (UCUM ``{pixels}``). ``segmentation`` (the SEG or Secondary Capture written beside it) is
    listed as evidence, so the report leads to it.

    Returns:
        The SR dataset (also written to ``path``).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from highdicom.sr import CodedConcept

    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[None]
    frames = list(range(masks.shape[0])) if frames is None else [int(f) for f in frames]
    if spacing_mm is not None:
        pixel_area, unit = float(spacing_mm[0]) * float(spacing_mm[1]), codes.UCUM.SquareMillimeter
    else:
        pixel_area, unit = 1.0, CodedConcept("{pixels}", "UCUM", "pixels")
    groups = []
    for frame, mask in zip(frames, masks):
        for k, name in enumerate(class_names):
            if k == 0:
                continue
            area = float((mask == k).sum()) * pixel_area
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=_tracking(f"{name} frame {frame + 1}"),
                    finding_type=class_concept(name, k),
                    algorithm_id=algorithm.sr_identification(),
                    source_images=[_source_for_group(source, frame)],
                    measurements=[
                        hd.sr.Measurement(
                            name=codes.SCT.Area, value=area, unit=unit, algorithm_id=algorithm.sr_identification()
                        )
                    ],
                )
            )
    return _write_report(source, groups, algorithm, "measurements", [segmentation] if segmentation is not None else [], path)
