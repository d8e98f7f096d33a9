"""Input and output: readers (images, DICOM, video, NIfTI), loading transforms, DICOM SEG/SR/SC writers."""

from echocare.io.readers import UltrasoundReadError, count_frames, detect_format, iter_frames, read_metadata, read_ultrasound
from echocare.io.loaders import LoadUltrasound, LoadUltrasoundd

__all__ = ["LoadUltrasound", "LoadUltrasoundd", "UltrasoundReadError", "count_frames", "detect_format", "iter_frames", "read_metadata", "read_ultrasound"]
