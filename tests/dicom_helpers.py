"""DICOM files for tests, written with pydicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_dicom(path: Path, arr: np.ndarray, pi: str, bits_stored: int | None = None,
                big_endian: bool = False, **attrs) -> Path:
    """Write an uncompressed ultrasound DICOM holding ``arr`` (as stored, no conversion)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    ds.set_pixel_data(arr, photometric_interpretation=pi, bits_stored=bits_stored or arr.dtype.itemsize * 8)
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def sr_numeric_values(sr, meaning: str) -> list[float]:
    """The numeric values of the SR content items whose concept name has ``meaning``, in order."""
    values = []
    for item in sr.iterall():
        if item.keyword == "ContentSequence":
            for content in item.value:
                if content.get("ValueType") == "NUM" and content.ConceptNameCodeSequence[0].CodeMeaning == meaning:
                    values.append(float(content.MeasuredValueSequence[0].NumericValue))
    return values
