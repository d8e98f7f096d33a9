"""Readers for clinical ultrasound: still images, DICOM, video and NIfTI.

Every reader returns frames as ``float32`` RGB in ``[0, 1]``:

* :func:`read_ultrasound` -> ``(frames, height, width, 3)`` (all or selected frames),
* :func:`iter_frames` -> ``(height, width, 3)`` frames one at a time (streaming).

Conventions (the same for every format, so that a model never sees a difference
between an exported PNG and the DICOM it came from):

* Orientation: row 0 is the top of the image as a person sees it on screen, column 0
  its left. (MONAI's own 2D readers return ``(width, height)`` by default; these do not.)
* Grey images are repeated to 3 channels; colour is always RGB (YBR, palette and
  other encodings are converted).
* Intensities are scaled by the *stored* bit depth (8 bit by 255, 12 bit by 4095,
  16 bit by 65535, ...), never by the image's own min/max, so that brightness means
  the same across files of one source.

Measurement metadata (``with_metadata=True``) is limited to a whitelist of
acquisition/geometry attributes: patient and study attributes (names, IDs, dates,
institution, UIDs) never leave the reader.

Supported formats, by suffix (DICOM is also recognised by its ``DICM`` preamble):
PNG, JPEG, BMP, TIFF, GIF (Pillow); DICOM (pydicom >= 3 with pylibjpeg decoders for
RLE, JPEG baseline/lossless and JPEG 2000; also pydicom 2.4, for the MONAI Label server
environment, where a file's frames are decoded all at once); MP4, AVI, MOV, MKV, WEBM (PyAV);
NIfTI ``.nii``/``.nii.gz`` (nibabel).

Safety (for batch tools that read files they did not write):

* ``max_pixels`` (default :data:`DEFAULT_MAX_PIXELS`, ``None`` for no limit) refuses a file
  whose frames are larger than that many pixels (height x width) from its header, before
  any pixel is decoded: a 200 KB PNG can declare 12000x12000 pixels (6 GB as float32 RGB).
  Pillow's own decompression-bomb check (``PIL.Image.MAX_IMAGE_PIXELS``) is replaced by
  this one for the files these readers open.
* A file never yields fewer frames than it declares without saying so: a video cut short
  (e.g. a copy interrupted mid-transfer) raises :class:`UltrasoundReadError` naming both
  counts, unless ``allow_partial=True``, which warns (``UserWarning``) and returns the
  frames that can be read. Truncated DICOM pixel data and NIfTI voxel data are always an
  error (their frames cannot be told apart reliably).
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "UltrasoundReadError",
    "FrameSelection",
    "SUPPORTED_SUFFIXES",
    "detect_format",
    "read_ultrasound",
    "read_ultrasound_chw",
    "iter_frames",
    "count_frames",
    "read_metadata",
]

#: ``None`` (all frames), a frame index (negative counts from the end), a slice or a
#: sequence of indices.
FrameSelection = Union[None, int, slice, Sequence[int]]

#: Default limit of the readers' ``max_pixels``: pixels (height x width) per frame. 100 M
#: is 10000x10000, far above any ultrasound frame, and a frame of it is 1.2 GB as float32 RGB.
DEFAULT_MAX_PIXELS = 100_000_000

#: What a reader does when a file holds fewer frames than it declares: raise
#: (the default), warn (``allow_partial=True``) or accept silently (a second look at a
#: file the caller has already been warned about).
_OnShort = Literal["raise", "warn", "accept"]

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif"}
_DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
_VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}
_NIFTI_SUFFIXES = {".nii", ".nii.gz"}

#: File name suffixes that :func:`detect_format` recognises.
SUPPORTED_SUFFIXES: frozenset[str] = frozenset(
    _IMAGE_SUFFIXES | _DICOM_SUFFIXES | _VIDEO_SUFFIXES | _NIFTI_SUFFIXES
)


class UltrasoundReadError(ValueError):
    """A file is missing, unreadable, of an unsupported kind, truncated, or has frames over
    ``max_pixels``.

    The message is one line: the file's path, then the problem, e.g.
    ``"/data/x.dcm: DICOM has no pixel data"``.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


# --------------------------------------------------------------------------- helpers


def _suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def detect_format(path: str | os.PathLike[str]) -> str:
    """The reader family of ``path``: ``"image"``, ``"dicom"``, ``"video"`` or ``"nifti"``.

    Raises:
        UltrasoundReadError: the file does not exist or its kind is not supported.
    """
    p = Path(path)
    if not p.exists():
        raise UltrasoundReadError(p, "file not found")
    if p.is_dir():
        raise UltrasoundReadError(p, "is a directory, not a file")
    suffix = _suffix(p)
    if suffix in _IMAGE_SUFFIXES:
        return "image"
    if suffix in _DICOM_SUFFIXES:
        return "dicom"
    if suffix in _VIDEO_SUFFIXES:
        return "video"
    if suffix in _NIFTI_SUFFIXES:
        return "nifti"
    # DICOM files from PACS exports often have no suffix at all ("IM0001").
    if _has_dicom_preamble(p):
        return "dicom"
    raise UltrasoundReadError(
        p, f"unsupported file type {suffix or '(no suffix)'!r}; expected one of "
        f"{', '.join(sorted(SUPPORTED_SUFFIXES))} or a DICOM file"
    )


def _check_max_pixels(max_pixels: int | None) -> int | None:
    """``max_pixels`` validated: None (no limit) or a positive integer."""
    if max_pixels is None:
        return None
    if isinstance(max_pixels, bool) or int(max_pixels) != max_pixels or int(max_pixels) < 1:
        raise ValueError(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    return int(max_pixels)


def _check_frame_size(path: Path, height: int, width: int, max_pixels: int | None) -> None:
    """Refuse a frame of ``height`` x ``width`` pixels above ``max_pixels`` (before decoding it)."""
    pixels = int(height) * int(width)
    if max_pixels is not None and pixels > max_pixels:
        raise UltrasoundReadError(
            path, f"frame of {width}x{height} = {pixels:,} pixels is over the max_pixels limit of "
            f"{max_pixels:,} pixels per frame"
        )


def _short_read(path: Path, readable: int, declared: int, on_short: _OnShort) -> None:
    """A file holds ``readable`` of the ``declared`` frames: raise, or warn, as ``on_short`` says."""
    problem = f"only {readable} of the {declared} frames it declares can be read (the file is truncated or corrupt)"
    if on_short == "raise":
        raise UltrasoundReadError(path, problem)
    if on_short == "warn":
        warnings.warn(f"{path}: {problem}; reading the {readable}", UserWarning, stacklevel=2)


def _select(frames: FrameSelection, n: int, path: Path) -> list[int]:
    """Normalise a frame selection to a list of non-negative indices below ``n``."""
    if frames is None:
        return list(range(n))
    if isinstance(frames, slice):
        return list(range(*frames.indices(n)))
    if isinstance(frames, (int, np.integer)):
        items = [int(frames)]
    else:
        items = [int(i) for i in frames]
    out = []
    for i in items:
        j = i + n if i < 0 else i
        if not 0 <= j < n:
            raise UltrasoundReadError(path, f"frame index {i} out of range for {n} frame(s)")
        out.append(j)
    return out


def _scale_uint(arr: np.ndarray, bits: int, signed: bool = False) -> np.ndarray:
    """Integer samples -> float32 in [0, 1] by the stored bit depth ``bits``."""
    source = np.asarray(arr)
    arr = source.astype(np.float32)
    if signed:
        # Two's complement range [-2^(b-1), 2^(b-1)-1] maps to [0, 1].
        arr += float(2 ** (bits - 1))
    out = np.divide(arr, float(2**bits - 1), out=arr)
    # Values above the declared depth do occur (sloppy encoders); clip rather than
    # let them exceed the documented range. (Unsigned samples whose type cannot exceed
    # the depth, e.g. 8-bit samples stored in uint8, need no clipping.)
    if signed or not (source.dtype.kind == "u" and source.dtype.itemsize * 8 <= bits):
        np.clip(out, 0.0, 1.0, out=out)
    return out


def _hwc(frame: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) -> (H, W, C) float32, C-contiguous; grey stays one channel."""
    if frame.ndim == 2:
        frame = frame[..., None]
    return np.ascontiguousarray(frame, dtype=np.float32)


def _to_rgb(frame: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 1|3) float -> (H, W, 3) float32 (grey is repeated)."""
    frame = _hwc(frame)
    if frame.shape[-1] == 1:
        frame = np.repeat(frame, 3, axis=-1)
    return frame


# ---------------------------------------------------------------------- still images


#: Serialises the changes of Pillow's module-wide decompression-bomb limit.
_PILLOW_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _pillow_checks_off() -> Iterator[None]:
    """Pillow's own decompression-bomb check off, for a header read followed by our
    ``max_pixels`` check, or for decoding a frame that check has passed.

    Pillow warns above ``Image.MAX_IMAGE_PIXELS`` (89 M) and refuses above twice that,
    whatever the caller's ``max_pixels``: with both checks on, an image allowed by
    ``max_pixels`` could still be refused, or a refused one also warned about.
    The limit is a module global: it is off only while this holds the lock, for a header
    read or a frame seek (microseconds), or the decoding of a frame already checked.
    """
    from PIL import Image

    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _open_pil(path: Path, max_pixels: int | None):
    """Open ``path`` with Pillow (header only: no pixel is decoded) and check its size."""
    from PIL import Image, UnidentifiedImageError

    try:
        with _pillow_checks_off():
            img = Image.open(path)
    except UnidentifiedImageError:
        raise UltrasoundReadError(path, "cannot decode image (not a recognised image format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UltrasoundReadError(path, f"cannot open image ({exc})") from None
    try:
        _check_frame_size(path, img.height, img.width, max_pixels)
    except UltrasoundReadError:
        img.close()
        raise
    return img


def _pil_load(img: Any) -> None:
    """Decode the current frame of ``img``, whose size ``max_pixels`` has allowed."""
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS is not None and img.width * img.height > Image.MAX_IMAGE_PIXELS:
        # Pillow checks some formats' sizes again while decoding (TIFF tiles); the
        # check (and the lock) is only needed for images above its own limit.
        with _pillow_checks_off():
            img.load()
    else:
        img.load()


def _pil_frame_to_float(img: Any, path: Path) -> np.ndarray:
    """One Pillow frame -> (H, W, 1|3) float32 in [0, 1], by the mode's bit depth."""
    from PIL import Image, ImageOps

    try:
        _pil_load(img)
        # Cameras and some PACS viewers store JPEG/TIFF rotation in EXIF: apply it so
        # that the array is "as a person sees it".
        img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        msg = str(exc)
        if "truncated" in msg.lower():
            msg = "truncated file"
        raise UltrasoundReadError(path, f"cannot decode image ({msg})") from None

    mode = img.mode
    if mode == "1":
        return _hwc(np.asarray(img, dtype=np.float32))
    if mode == "L":
        return _hwc(_scale_uint(np.asarray(img), 8))
    if mode.startswith("I;16"):
        return _hwc(_scale_uint(np.asarray(img).astype(np.uint16), 16))
    if mode == "I":
        # 32-bit integer mode: Pillow uses it for 16-bit PNGs (older versions) and for
        # 16/32-bit TIFFs. Take the stored depth from the file where it is declared.
        bits = 16
        if img.format == "TIFF":
            bps = getattr(img, "tag_v2", {}).get(258, (16,))
            bits = int(bps[0] if isinstance(bps, (tuple, list)) else bps)
        arr = np.asarray(img)
        return _hwc(_scale_uint(arr, bits, signed=bool(arr.min() < 0) and bits == 32))
    if mode == "F":
        # Float images carry no bit depth: they are taken to be in [0, 1] already.
        arr = np.asarray(img, dtype=np.float32)
        return _hwc(np.clip(arr, 0.0, 1.0))
    if mode in ("LA", "La"):
        arr = _scale_uint(np.asarray(img.convert("LA")), 8)
        grey, alpha = arr[..., :1], arr[..., 1:]
        return _hwc(grey * alpha)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "RGBa", "PA"):
        # Composite over black: the ultrasound background is black, and transparent
        # pixels carry no echo whatever RGB values they happen to hold.
        arr = _scale_uint(np.asarray(img.convert("RGBA")), 8)
        return _hwc(arr[..., :3] * arr[..., 3:4])
    # RGB, P (palette), CMYK, YCbCr, LAB, HSV ...: Pillow's conversion to 8-bit RGB.
    return _hwc(_scale_uint(np.asarray(img.convert("RGB")), 8))


def _image_num_frames(img: Any, path: Path) -> int:
    from PIL import Image

    try:
        # n_frames walks the frame chain (GIF, TIFF), where Pillow checks sizes again.
        with _pillow_checks_off():
            return int(getattr(img, "n_frames", 1) or 1)
    except (EOFError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise UltrasoundReadError(path, f"cannot read the image's frames ({exc})") from None


def _iter_image(
    path: Path, indices: list[int] | None, step: int, max_pixels: int | None, on_short: _OnShort
) -> Iterator[np.ndarray]:
    from PIL import Image

    img = _open_pil(path, max_pixels)
    with img:
        n = _image_num_frames(img, path)
        order = indices if indices is not None else list(range(0, n, step))
        for i in order:
            if n > 1:
                try:
                    with _pillow_checks_off():
                        img.seek(i)
                except (EOFError, OSError, Image.DecompressionBombError) as exc:
                    raise UltrasoundReadError(path, f"cannot decode image frame {i} ({exc})") from None
                # Frames of a TIFF (or GIF canvas growth) may differ in size from the first.
                _check_frame_size(path, img.height, img.width, max_pixels)
            yield _pil_frame_to_float(img, path)


def _image_meta(path: Path, max_pixels: int | None, on_short: _OnShort) -> dict[str, Any]:
    img = _open_pil(path, max_pixels)
    with img:
        # Pillow's n_frames walks the file's frame chain (GIF, TIFF IFDs): the frames that
        # are there, not a declared count.
        n = _image_num_frames(img, path)
        # DPI tags are a print property, not the probe's geometry: still images
        # carry no trustworthy spacing, so none is reported.
        return {
            "pixel_spacing_mm": None,
            "frame_time_ms": None,
            "num_frames": n,
            "source_format": (img.format or "image").lower(),
        }


# ---------------------------------------------------------------------------- DICOM


#: JPEG Baseline (Process 1) transfer syntax: 8-bit lossy JPEG.
_JPEG_BASELINE = "1.2.840.10008.1.2.4.50"


def _dcmread(path: Path, stop_before_pixels: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as exc:
        raise UltrasoundReadError(path, f"not a valid DICOM file ({exc})") from None
    except (OSError, EOFError, ValueError, KeyError, TypeError) as exc:
        raise UltrasoundReadError(path, f"cannot read DICOM ({exc})") from None


def _pixel_functions() -> tuple[Any, Any]:
    """pydicom's ``(apply_color_lut, convert_color_space)``: from ``pydicom.pixels`` (pydicom 3),
    else from ``pydicom.pixel_data_handlers.util`` (pydicom 2.4, the same functions)."""
    try:
        from pydicom.pixels import apply_color_lut, convert_color_space
    except ImportError:
        from pydicom.pixel_data_handlers.util import apply_color_lut, convert_color_space
    return apply_color_lut, convert_color_space


def _dicom_num_frames(ds: Any) -> int:
    n = ds.get("NumberOfFrames", 1)
    try:
        return max(int(n), 1)
    except (TypeError, ValueError):
        return 1


def _palette_depth(ds: Any) -> int:
    """Bits per entry declared by the red palette descriptor (8 or 16)."""
    for kw in ("RedPaletteColorLookupTableDescriptor", "SegmentedRedPaletteColorLookupTableDescriptor"):
        desc = ds.get(kw)
        if desc is not None:
            try:
                return int(desc[2])
            except (TypeError, IndexError, ValueError):
                pass
    return 8


def _is_little_endian(ds: Any) -> bool:
    try:
        return not ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.2"
    except AttributeError:
        enc = getattr(ds, "original_encoding", (None, True))
        return enc[1] is not False


def _apply_palette(arr: np.ndarray, ds: Any) -> np.ndarray:
    """Apply the PALETTE COLOR lookup table: (H, W) indices -> (H, W, 3) table entries.

    pydicom 3.0's ``apply_color_lut`` reads non-segmented table data in the machine's
    byte order, which breaks Explicit VR Big Endian files (their 16-bit entries come
    out byte-swapped, i.e. nearly black). Those tables are read here with the file's
    byte order; segmented tables, which pydicom reads correctly, go to pydicom.
    """
    apply_color_lut, _ = _pixel_functions()

    if "RedPaletteColorLookupTableData" not in ds:
        return apply_color_lut(arr, ds)
    desc = ds.RedPaletteColorLookupTableDescriptor
    n_entries = int(desc[0]) or 2**16
    first = int(desc[1])
    order = "<" if _is_little_endian(ds) else ">"
    luts = []
    for colour in ("Red", "Green", "Blue"):
        raw = ds[f"{colour}PaletteColorLookupTableData"].value
        # The data length tells the real entry size: 8-bit entries may be packed in
        # bytes even when the descriptor says 16.
        itemsize = max(1, len(raw) // n_entries)
        dtype = np.dtype(f"{order}u{itemsize}")
        luts.append(np.frombuffer(raw, dtype=dtype, count=n_entries).astype(np.uint16 if itemsize > 1 else np.uint8))
    # Indices below the first mapped value take the first entry, above take the last
    # (PS3.3 C.7.6.3.1.5).
    index = np.clip(arr.astype(np.int64) - first, 0, n_entries - 1)
    return np.stack([lut[index] for lut in luts], axis=-1)


def _dicom_frame_to_float(arr: np.ndarray, info: dict[str, Any], ds: Any, path: Path) -> np.ndarray:
    """One decoded DICOM frame -> (H, W, 1|3) float32 in [0, 1] (grey not repeated).

    ``info`` is the decoder's description of the *decoded* array (its photometric
    interpretation is already RGB where the decoder converted YBR).
    """
    _, convert_color_space = _pixel_functions()

    pi = str(info.get("photometric_interpretation", ds.get("PhotometricInterpretation", ""))).strip()
    bits = int(info.get("bits_stored") or ds.get("BitsStored") or arr.dtype.itemsize * 8)
    signed = int(info.get("pixel_representation", ds.get("PixelRepresentation", 0)) or 0) == 1

    if pi == "PALETTE COLOR":
        try:
            rgb = _apply_palette(arr, ds)
        except Exception as exc:  # pydicom raises several kinds for broken LUTs
            raise UltrasoundReadError(path, f"cannot apply DICOM palette ({exc})") from None
        # The table's declared entry depth, not the pixels' depth, sets the scale.
        return _hwc(_scale_uint(rgb, _palette_depth(ds)))
    if pi in ("YBR_FULL", "YBR_FULL_422"):
        # Reached only when a decoder kept YCbCr (as_rgb is on by default).
        if arr.dtype != np.uint8:
            arr = arr.astype(np.uint8) if bits <= 8 else arr
        arr = convert_color_space(arr, pi, "RGB")
        return _hwc(_scale_uint(arr, bits))
    if pi in ("YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "YBR_PARTIAL_422"):
        # JPEG 2000 / JPEG decoders undo these transforms themselves and report RGB;
        # still seeing one here means a decoder that did not, which cannot be undone
        # reliably afterwards.
        raise UltrasoundReadError(path, f"photometric interpretation {pi} was not converted by the decoder")
    if pi == "MONOCHROME1":
        # MONOCHROME1: minimum value is white; invert so that echo is bright.
        return _hwc(1.0 - _scale_uint(arr, bits, signed))
    if pi in ("MONOCHROME2", "RGB", ""):
        return _hwc(_scale_uint(arr, bits, signed))
    raise UltrasoundReadError(path, f"unsupported DICOM photometric interpretation {pi!r}")


#: The start of an encapsulated (compressed) Pixel Data element: tag (7FE0,0010), VR OB,
#: undefined length; explicit VR little endian, as every compressed transfer syntax is.
_ENCAPSULATED_PIXEL_DATA = b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff"


def _dicom_size_check(ds: Any, path: Path, max_pixels: int | None) -> None:
    """Refuse a DICOM whose Rows x Columns (header) is above ``max_pixels``."""
    try:
        rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    except (TypeError, ValueError):
        return  # the decoder reports unusable dimensions
    _check_frame_size(path, rows, columns, max_pixels)


def _native_pixel_bytes_check(ds: Any, path: Path, n: int) -> None:
    """Uncompressed Pixel Data shorter than its frames need: the file is truncated.

    (pydicom's decoder would refuse it too, but only as "less than expected", without
    saying how many of the frames are there.)
    """
    if getattr(ds["PixelData"], "is_undefined_length", False):
        return  # encapsulated: the decoder checks its fragments
    try:
        from pydicom.pixels.utils import get_expected_length
    except ImportError:  # pydicom 2.4
        from pydicom.pixel_data_handlers.util import get_expected_length
    try:
        expected = int(get_expected_length(ds, unit="bytes"))
        have = len(ds.PixelData)
    except (AttributeError, TypeError, ValueError, KeyError):
        return  # missing Image Pixel attributes: the decoder names them
    if have < expected:
        complete = have * n // expected if expected else 0
        raise UltrasoundReadError(
            path, f"truncated pixel data: {have:,} of {expected:,} bytes, {complete} of the {n} frames it declares"
        )


def _iter_dicom(
    path: Path, indices: list[int] | None, step: int, max_pixels: int | None, on_short: _OnShort
) -> Iterator[np.ndarray]:
    ds = _dcmread(path)
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        # pydicom drops an element the file ends inside of (with a warning): a compressed
        # file cut short has lost its Pixel Data element, not never had one.
        with open(path, "rb") as fh:
            if _ENCAPSULATED_PIXEL_DATA in fh.read():
                raise UltrasoundReadError(
                    path, "truncated pixel data: the file ends inside its compressed pixel data"
                )
        raise UltrasoundReadError(path, "DICOM has no pixel data")
    if "PixelData" not in ds:
        raise UltrasoundReadError(path, "DICOM float pixel data is not supported")
    _dicom_size_check(ds, path, max_pixels)

    n = _dicom_num_frames(ds)
    _native_pixel_bytes_check(ds, path, n)
    order = indices if indices is not None else list(range(0, n, step))
    if not order:
        return
    try:
        ts = ds.file_meta.TransferSyntaxUID
    except AttributeError:
        raise UltrasoundReadError(path, "DICOM has no transfer syntax (file meta missing)") from None
    try:
        from pydicom.pixels import get_decoder
    except ImportError:  # pydicom 2.4
        yield from _iter_dicom_pydicom2(ds, path, order, n)  # max_pixels was checked above
        return
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise UltrasoundReadError(path, f"unsupported DICOM transfer syntax {ts} ({exc})") from None
    if not decoder.is_available:
        raise UltrasoundReadError(
            path,
            f"no decoder installed for transfer syntax {ts.name}; install pylibjpeg, "
            "pylibjpeg-libjpeg, pylibjpeg-openjpeg and pylibjpeg-rle",
        )
    # The decoder's iterator decodes one frame at a time: a 120-frame cine is never
    # held in memory twice, and a frame selection only decodes the selected frames.
    # It wants increasing indices; re-order afterwards for arbitrary selections.
    unique = sorted(set(order))
    options: dict[str, Any] = {}
    if ts == _JPEG_BASELINE and "pillow" in decoder.available_plugins:
        # 8-bit baseline JPEG (what most ultrasound scanners store): Pillow's libjpeg-turbo
        # decodes a 640x480 colour frame several times faster than pylibjpeg's libjpeg.
        # Colour is then converted to RGB by pydicom's own routine, as for other decoders.
        options = {"decoding_plugin": "pillow", "as_rgb": False}
    decoded: dict[int, np.ndarray] = {}
    count = 0
    try:
        frames_iter = decoder.iter_array(ds, indices=unique, **options)
        for i, (arr, info) in zip(unique, frames_iter):
            count += 1
            if unique == order:
                yield _dicom_frame_to_float(arr, info, ds, path)
            else:
                decoded[i] = _dicom_frame_to_float(arr, info, ds, path)
    except UltrasoundReadError:
        raise
    except Exception as exc:  # decoders raise RuntimeError/ValueError/... on bad data
        raise UltrasoundReadError(path, f"cannot decode DICOM pixel data ({type(exc).__name__}: {exc})") from None
    if count < len(unique):
        # zip stops at the shorter: a decoder that ran out of frames must not pass as done.
        raise UltrasoundReadError(
            path, f"truncated pixel data: frame {unique[count]} of the {n} frames it declares cannot be decoded"
        )
    if unique != order:
        for i in order:
            yield decoded[i]


#: JPEG 2000 transfer syntaxes: their decoders undo the YBR_ICT / YBR_RCT colour transform.
_JPEG2000 = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"}


def _iter_dicom_pydicom2(ds: Any, path: Path, order: list[int], n: int) -> Iterator[np.ndarray]:
    """Frames ``order`` of a DICOM with pydicom 2.4 (the MONAI Label server environment).

    pydicom 2.4 has no frame iterator: its pixel data handlers decode every frame at once
    (``ds.pixel_array``). They return pixels in the stored photometric interpretation,
    except JPEG 2000, whose decoders return RGB; frames are then converted exactly as
    in the pydicom 3 path.
    """
    try:
        arr = ds.pixel_array
    except Exception as exc:  # handlers raise RuntimeError/ValueError/NotImplementedError on bad data
        raise UltrasoundReadError(path, f"cannot decode DICOM pixel data ({type(exc).__name__}: {exc})") from None
    if n == 1:  # a single frame comes without the frame axis
        arr = arr[None]
    pi = str(ds.get("PhotometricInterpretation", "")).strip()
    if ds.file_meta.TransferSyntaxUID in _JPEG2000 and pi in ("YBR_ICT", "YBR_RCT"):
        pi = "RGB"
    info = {
        "photometric_interpretation": pi,
        "bits_stored": ds.get("BitsStored"),
        "pixel_representation": ds.get("PixelRepresentation", 0),
    }
    for i in order:
        yield _dicom_frame_to_float(arr[i], info, ds, path)


# Unit codes of PhysicalUnitsX/YDirection (PS3.3 C.8.5.5.1.15): only cm is a length.
_US_UNIT_CM = 3
# RegionSpatialFormat 1 = 2D tissue image (the B-mode sector), what spacing is for.
_US_REGION_2D = 1


def _us_region_spacing(ds: Any) -> list[float] | None:
    """[row, col] spacing in mm from SequenceOfUltrasoundRegions, or None."""
    regions = ds.get("SequenceOfUltrasoundRegions")
    if not regions:
        return None
    candidates = []
    for r in regions:
        ux, uy = r.get("PhysicalUnitsXDirection"), r.get("PhysicalUnitsYDirection")
        dx, dy = r.get("PhysicalDeltaX"), r.get("PhysicalDeltaY")
        if ux != _US_UNIT_CM or uy != _US_UNIT_CM or dx is None or dy is None:
            continue
        dx, dy = abs(float(dx)), abs(float(dy))
        if not (dx > 0 and dy > 0 and math.isfinite(dx) and math.isfinite(dy)):
            continue
        area = 0
        try:
            area = (int(r.RegionLocationMaxX1) - int(r.RegionLocationMinX0)) * (
                int(r.RegionLocationMaxY1) - int(r.RegionLocationMinY0)
            )
        except (AttributeError, TypeError, ValueError):
            pass
        is_2d = r.get("RegionSpatialFormat") == _US_REGION_2D
        # Prefer the 2D tissue region, then the largest one (a small M-mode or
        # Doppler strip may also be in cm but with another scale).
        candidates.append((is_2d, area, [dy * 10.0, dx * 10.0]))
    if not candidates:
        return None
    candidates.sort(key=lambda c: (c[0], c[1]), reverse=True)
    return candidates[0][2]


def _dicom_spacing(ds: Any) -> list[float] | None:
    spacing = _us_region_spacing(ds)
    if spacing is not None:
        return spacing
    for kw in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(kw)
        if value is not None:
            try:
                row, col = (float(v) for v in value)
                if row > 0 and col > 0:
                    return [row, col]
            except (TypeError, ValueError):
                pass
    return None


def _dicom_frame_time(ds: Any) -> float | None:
    for kw in ("FrameTime",):
        value = ds.get(kw)
        if value not in (None, ""):
            try:
                t = float(value)
                if t > 0:
                    return t
            except (TypeError, ValueError):
                pass
    ftv = ds.get("FrameTimeVector")
    if ftv:
        try:
            # The first entry is 0 by definition (time of frame 1 relative to itself).
            times = [float(t) for t in list(ftv)[1:]]
            if times:
                return float(np.mean(times))
        except (TypeError, ValueError):
            pass
    for kw in ("RecommendedDisplayFrameRate", "CineRate"):
        value = ds.get(kw)
        if value:
            try:
                return 1000.0 / float(value)
            except (TypeError, ValueError, ZeroDivisionError):
                pass
    return None


def _dicom_meta(path: Path, max_pixels: int | None, on_short: _OnShort) -> dict[str, Any]:
    # The header only (stop_before_pixels): num_frames is NumberOfFrames as declared;
    # whether the pixel data holds them is known when it is read.
    ds = _dcmread(path, stop_before_pixels=True)
    _dicom_size_check(ds, path, max_pixels)
    # A whitelist: nothing identifying the patient, study, institution or instance.
    return {
        "pixel_spacing_mm": _dicom_spacing(ds),
        "frame_time_ms": _dicom_frame_time(ds),
        "num_frames": _dicom_num_frames(ds),
        "source_format": "dicom",
        "photometric_interpretation": str(ds.get("PhotometricInterpretation", "")).strip() or None,
        "bits_stored": int(ds.BitsStored) if "BitsStored" in ds else None,
        "transfer_syntax": getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        and ds.file_meta.TransferSyntaxUID.name,
        "modality": str(ds.get("Modality", "")) or None,
    }


# ---------------------------------------------------------------------------- video


def _open_video(path: Path, max_pixels: int | None):
    """Open ``path`` with PyAV and check the frame size its container declares."""
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as exc:
        raise UltrasoundReadError(path, f"cannot open video ({exc})") from None
    if not container.streams.video:
        container.close()
        raise UltrasoundReadError(path, "file has no video stream")
    context = container.streams.video[0].codec_context
    try:
        # The stream parameters come from the container header (0 where it does not say):
        # known before the decoder allocates a frame.
        _check_frame_size(path, context.height or 0, context.width or 0, max_pixels)
    except UltrasoundReadError:
        container.close()
        raise
    return container


def _video_count(path: Path, max_pixels: int | None, on_short: _OnShort) -> int:
    """Number of frames that can be read, by demuxing (reading packets, not decoding them).

    A container that declares a frame count (MP4/MOV sample tables, AVI headers) declares
    it up front: a file cut short after its header (an MP4 written with ``faststart``, an
    AVI) still declares them all. The count of complete packets is what the decoder will
    deliver; fewer than declared is a short read (``on_short``).
    """
    import av

    container = _open_video(path, max_pixels)
    with container:
        stream = container.streams.video[0]
        declared = int(stream.frames or 0)
        readable = corrupt = discard = 0
        try:
            for packet in container.demux(stream):
                if not packet.size:
                    continue  # the demuxer's end-of-stream flush packet
                if packet.is_corrupt:
                    corrupt += 1
                elif packet.is_discard:
                    discard += 1
                else:
                    readable += 1
        except av.error.FFmpegError as exc:
            raise UltrasoundReadError(path, f"cannot read video ({exc})") from None
    expected = max(declared - discard, readable + corrupt)
    if readable < expected:
        _short_read(path, readable, expected, on_short)
    return readable


def _decoded_frames(container: Any, stream: Any, tally: dict[str, int]) -> Iterator[Any]:
    """The decoded frames of ``stream``; ``tally`` counts the packets skipped as cut short
    (``"corrupt"``) and those the container marks for discarding (``"discard"``: decoded
    as references, never output, e.g. before an MP4 edit list's start)."""
    for packet in container.demux(stream):
        if packet.size:
            if packet.is_corrupt:
                # A file cut short ends in a partial packet. Given one, FFmpeg's frame-threaded
                # decoder drops the frames it still holds without an error; skipped, it is
                # one frame missing, which the count check reports.
                tally["corrupt"] += 1
                continue
            if packet.is_discard:
                tally["discard"] += 1
        yield from packet.decode()


def _iter_video(
    path: Path, indices: list[int] | None, step: int, max_pixels: int | None, on_short: _OnShort
) -> Iterator[np.ndarray]:
    import av

    wanted = None if indices is None else set(indices)
    last = None if indices is None else max(indices, default=-1)
    keep: dict[int, np.ndarray] = {}
    in_order = indices is None or indices == sorted(set(indices))
    tally = {"corrupt": 0, "discard": 0}
    container = _open_video(path, max_pixels)
    with container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        declared = int(stream.frames or 0)
        i = -1
        found = 0
        to_the_end = True
        try:
            for frame in _decoded_frames(container, stream, tally):
                i += 1
                if last is not None and i > last:
                    to_the_end = False
                    break
                if wanted is None:
                    if i % step:
                        continue
                elif i not in wanted:
                    continue
                _check_frame_size(path, frame.height, frame.width, max_pixels)
                rgb = _scale_uint(frame.to_ndarray(format="rgb24"), 8)
                found += 1
                if in_order:
                    yield rgb
                else:
                    keep[i] = rgb
        except av.error.FFmpegError as exc:
            raise UltrasoundReadError(path, f"cannot decode video frame {i + 1} ({exc})") from None
    decoded = i + 1
    if to_the_end:
        # Streaming readers learn that a file is short only here, at its end.
        expected = max(declared - tally["discard"], decoded + tally["corrupt"])
        if decoded < expected:
            _short_read(path, decoded, expected, on_short)
    if wanted is not None and found < len(wanted):
        missing = min((j for j in wanted if j >= decoded), default=decoded)
        raise UltrasoundReadError(path, f"video has no frame {missing} ({decoded} frame(s) can be read)")
    if not in_order:
        for j in indices:  # type: ignore[union-attr]
            yield keep[j]


def _video_meta(path: Path, max_pixels: int | None, on_short: _OnShort) -> dict[str, Any]:
    container = _open_video(path, max_pixels)
    with container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fmt = (container.format.name or "video").split(",")[0]
    return {
        "pixel_spacing_mm": None,
        "frame_time_ms": 1000.0 / float(rate) if rate else None,
        # Demuxed, not the header's count: the frames the file can deliver.
        "num_frames": _video_count(path, max_pixels, on_short),
        "source_format": fmt,
    }


# ---------------------------------------------------------------------------- NIfTI


def _load_nifti(path: Path):
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises ImageFileError, OSError, EOFError, ...
        raise UltrasoundReadError(path, f"cannot read NIfTI ({exc})") from None
    return img


def _nifti_layout(img: Any) -> tuple[int, bool]:
    """(number of frames, is_colour) of a NIfTI after dropping singleton axes."""
    shape = [s for k, s in enumerate(img.shape) if k < 2 or s != 1]
    dtype = img.get_data_dtype()
    if dtype.names:  # RGB24/RGBA32 structured voxels
        return (int(np.prod(shape[2:])) if len(shape) > 2 else 1), True
    if len(shape) == 2:
        return 1, False
    if len(shape) == 3:
        return shape[2], False
    if len(shape) == 4 and shape[3] in (3, 4):
        return shape[2], True
    raise ValueError(f"unsupported NIfTI shape {tuple(img.shape)}")


def _nifti_scale(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if np.issubdtype(dtype, np.integer):
        bits = dtype.itemsize * 8
        return _scale_uint(arr, bits, signed=np.issubdtype(dtype, np.signedinteger))
    # Float voxels have no stored depth: [0, 1] data is kept, otherwise the 8-bit or
    # 16-bit range is assumed (ultrasound exported to float keeps its grey levels).
    arr = arr.astype(np.float32)
    top = float(np.nanmax(arr)) if arr.size else 0.0
    if top > 255.0:
        arr = arr / 65535.0
    elif top > 1.0:
        arr = arr / 255.0
    return np.clip(np.nan_to_num(arr), 0.0, 1.0)


def _nifti_size_check(img: Any, path: Path, max_pixels: int | None) -> None:
    """Refuse a NIfTI whose frames (its first two axes, from the header) exceed ``max_pixels``."""
    shape = tuple(int(s) for s in img.shape) + (1, 1)
    _check_frame_size(path, shape[1], shape[0], max_pixels)  # (i, j) = (column, row)


def _nifti_file_check(img: Any, path: Path) -> None:
    """An uncompressed ``.nii`` shorter than its header's voxel offset + voxel bytes is truncated
    (cheap: the file size; a ``.nii.gz`` shows it only when decompressed)."""
    if _suffix(path) != ".nii":
        return
    try:
        offset = int(img.header.get_data_offset())
        expected = offset + int(np.prod(img.shape, dtype=np.int64)) * img.get_data_dtype().itemsize
    except (AttributeError, TypeError, ValueError):
        return
    have = path.stat().st_size
    if have < expected:
        raise UltrasoundReadError(path, f"truncated voxel data: {max(have - offset, 0):,} of {expected - offset:,} bytes")


def _iter_nifti(
    path: Path, indices: list[int] | None, step: int, max_pixels: int | None, on_short: _OnShort
) -> Iterator[np.ndarray]:
    img = _load_nifti(path)
    try:
        n, colour = _nifti_layout(img)
    except ValueError as exc:
        raise UltrasoundReadError(path, str(exc)) from None
    _nifti_size_check(img, path, max_pixels)
    _nifti_file_check(img, path)
    dtype = img.get_data_dtype()
    # Unscaled voxels: the stored integers carry the bit depth; scl_slope is a
    # physical calibration, irrelevant to display brightness.
    try:
        data = np.asanyarray(img.dataobj.get_unscaled() if hasattr(img.dataobj, "get_unscaled") else img.dataobj)
    except (OSError, EOFError, ValueError, zlib.error) as exc:
        # nibabel: "Expected N bytes, got M bytes" (.nii); gzip: "Compressed file ended
        # before the end-of-stream marker was reached" (.nii.gz). Their messages span lines.
        detail = " ".join(str(exc).split())
        raise UltrasoundReadError(path, f"truncated or unreadable voxel data ({detail})") from None
    keep_axes = tuple(slice(None) if (k < 2 or s != 1) else 0 for k, s in enumerate(data.shape))
    data = data[keep_axes]
    if dtype.names:
        data = np.stack([data[c] for c in dtype.names[:3]], axis=-1)
        dtype = np.dtype(data.dtype)
        if data.ndim == 3:
            data = data[:, :, None, :]
    elif not colour:
        data = data[..., None] if data.ndim == 2 else data
        data = data[..., None]
    # Now (X, Y, T, C). NIfTI's first voxel axis i runs along the image's columns and
    # j along its rows (ITK and the scanner exports write it so): rows = j.
    order = indices if indices is not None else list(range(0, n, step))
    for t in order:
        frame = np.asarray(data[:, :, t, :3]).transpose(1, 0, 2)
        yield _hwc(_nifti_scale(frame, dtype))


def _nifti_meta(path: Path, max_pixels: int | None, on_short: _OnShort) -> dict[str, Any]:
    img = _load_nifti(path)
    try:
        n, _ = _nifti_layout(img)
    except ValueError as exc:
        raise UltrasoundReadError(path, str(exc)) from None
    _nifti_size_check(img, path, max_pixels)
    _nifti_file_check(img, path)
    zooms = img.header.get_zooms()
    units = img.header.get_xyzt_units()
    spacing = None
    factor = {"mm": 1.0, "meter": 1000.0, "micron": 1e-3}.get(units[0])
    if factor is not None and len(zooms) >= 2 and zooms[0] > 0 and zooms[1] > 0:
        spacing = [float(zooms[1]) * factor, float(zooms[0]) * factor]
    frame_time = None
    tfactor = {"sec": 1000.0, "msec": 1.0, "usec": 1e-3}.get(units[1])
    if tfactor is not None and len(img.shape) >= 4 and len(zooms) >= 4 and zooms[3] > 0:
        frame_time = float(zooms[3]) * tfactor
    return {
        "pixel_spacing_mm": spacing,
        "frame_time_ms": frame_time,
        "num_frames": n,
        "source_format": "nifti",
    }


# ------------------------------------------------------------------------ public API

_ITERS = {"image": _iter_image, "dicom": _iter_dicom, "video": _iter_video, "nifti": _iter_nifti}
_METAS = {"image": _image_meta, "dicom": _dicom_meta, "video": _video_meta, "nifti": _nifti_meta}


def count_frames(
    path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS, allow_partial: bool = False
) -> int:
    """Number of frames in ``path`` without decoding pixel data (1 for still images).

    For video, the frames the file can deliver (see :func:`read_metadata`).

    Raises:
        UltrasoundReadError: as :func:`read_metadata`.
    """
    p = Path(path)
    fmt = detect_format(p)
    max_pixels = _check_max_pixels(max_pixels)
    on_short: _OnShort = "warn" if allow_partial else "raise"
    if fmt == "video":
        return _video_count(p, max_pixels, on_short)
    return int(_METAS[fmt](p, max_pixels, on_short)["num_frames"])


def read_metadata(
    path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS, allow_partial: bool = False
) -> dict[str, Any]:
    """Measurement metadata of ``path`` (no pixel decoding).

    Returns a dict with ``pixel_spacing_mm`` (``[row, col]`` in mm, or None),
    ``frame_time_ms`` (ms between frames, or None), ``num_frames``,
    ``source_format`` and, for DICOM, ``photometric_interpretation``, ``bits_stored``,
    ``transfer_syntax`` and ``modality``. Never any patient or study attribute.

    For DICOM the spacing comes first from the ultrasound region calibration
    (SequenceOfUltrasoundRegions, PhysicalDeltaY/X in cm -> mm, the 2D region first),
    then PixelSpacing, then ImagerPixelSpacing.

    ``num_frames`` is, for video, the number of complete packets of its video stream
    (demuxed, not decoded: it reads the file but decodes nothing), checked against the
    count the container declares; for multi-frame images (GIF, TIFF) the frames found in
    the file; for DICOM the header's NumberOfFrames and for NIfTI the header's shape
    (an uncompressed ``.nii`` shorter than its header says is refused; whether DICOM pixel
    data or a ``.nii.gz`` holds every frame shows when they are read).

    Args:
        path: the file.
        max_pixels: refuse frames of more than this many pixels (height x width, from the
            header); None for no limit.
        allow_partial: for a video that holds fewer frames than it declares (cut short),
            warn (``UserWarning``) and report the frames it holds instead of raising.

    Raises:
        UltrasoundReadError: missing, unreadable or unsupported file, frames larger than
            ``max_pixels``, or fewer frames than declared (without ``allow_partial``).
    """
    p = Path(path)
    return _METAS[detect_format(p)](p, _check_max_pixels(max_pixels), "warn" if allow_partial else "raise")


def iter_frames(
    path: str | os.PathLike[str],
    step: int = 1,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    allow_partial: bool = False,
) -> Iterator[np.ndarray]:
    """Stream the frames of ``path`` one at a time: every ``step``-th from frame 0.

    Args:
        path: the file.
        step: yield frames 0, step, 2 * step, ...
        max_pixels: refuse frames of more than this many pixels (height x width), before
            decoding them; None for no limit.
        allow_partial: for a video that holds fewer frames than it declares, warn
            (``UserWarning``) at the end of the stream instead of raising.

    Yields:
        ``(height, width, 3)`` float32 arrays in [0, 1], row 0 at the top.
        Video is decoded lazily with PyAV; multi-frame DICOM frame by frame.

    Raises:
        UltrasoundReadError: missing, unreadable or unsupported file, or frames larger than
        ``max_pixels`` (raised on the first ``next()``, since this is a generator); a video
        that ends before the frames it declares, when the stream reaches its end (after
        the frames it holds were yielded), naming both counts.
    """
    if int(step) < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    max_pixels = _check_max_pixels(max_pixels)
    p = Path(path)
    fmt = detect_format(p)
    for frame in _ITERS[fmt](p, None, int(step), max_pixels, "warn" if allow_partial else "raise"):
        yield _to_rgb(frame)


def read_ultrasound(
    path: str | os.PathLike[str],
    frames: FrameSelection = None,
    with_metadata: bool = False,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    allow_partial: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, Any]]:
    """Read an ultrasound image, DICOM, video or NIfTI as RGB frames.

    Args:
        path: the file (PNG/JPG/BMP/TIFF/GIF, DICOM, MP4/AVI/..., NIfTI).
        frames: ``None`` for all frames, an index (negative from the end), a slice, or
            a sequence of indices (any order, repeats allowed). Only the selected
            frames are decoded where the format allows it.
        with_metadata: also return the measurement metadata (see
            :func:`read_metadata`; ``num_frames`` is the file's frame count).
        max_pixels: refuse frames of more than this many pixels (height x width, from the
            header), before decoding them; None for no limit.
        allow_partial: for a video that holds fewer frames than it declares (cut short),
            warn (``UserWarning``, naming the file and both counts) and return the frames
            it holds; a selection is then taken from those.

    Returns:
        ``(frames, height, width, 3)`` float32 in [0, 1] (a single index still gives a
        leading frame axis of 1), or ``(array, meta)`` with ``with_metadata=True``.

    Raises:
        UltrasoundReadError: missing, unreadable or unsupported file, no pixel data,
        truncated pixel data, fewer frames than declared (without ``allow_partial``),
        frames larger than ``max_pixels``, or a frame index out of range.
    """
    array, meta = _read(path, frames, with_metadata, False, max_pixels, allow_partial)
    return (array, meta) if with_metadata else array


def read_ultrasound_chw(
    path: str | os.PathLike[str],
    frames: FrameSelection = None,
    with_metadata: bool = False,
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    allow_partial: bool = False,
) -> np.ndarray | tuple[np.ndarray, dict[str, Any]]:
    """:func:`read_ultrasound` with the channel axis first: ``(frames, 3, height, width)``.

    The same values as ``read_ultrasound(...).transpose(0, 3, 1, 2)`` (C-contiguous),
    built without the intermediate channel-last copy (grey frames are decoded once and
    written to the three channels directly): the layout MONAI transforms take.
    """
    array, meta = _read(path, frames, with_metadata, True, max_pixels, allow_partial)
    return (array, meta) if with_metadata else array


def _read(
    path: str | os.PathLike[str],
    frames: FrameSelection,
    with_metadata: bool,
    channels_first: bool,
    max_pixels: int | None,
    allow_partial: bool,
) -> tuple[np.ndarray, dict[str, Any] | None]:
    max_pixels = _check_max_pixels(max_pixels)
    on_short: _OnShort = "warn" if allow_partial else "raise"
    p = Path(path)
    fmt = detect_format(p)
    meta = None
    if frames is None:
        indices = None
    else:
        if fmt == "video":
            n = _video_count(p, max_pixels, on_short)
        else:
            meta = _METAS[fmt](p, max_pixels, on_short)  # read once: it also gives the frame count
            n = int(meta["num_frames"])
        on_short = "accept"  # a short file has been refused or warned about: once is enough
        indices = _select(frames, n, p)
    out = list(_ITERS[fmt](p, indices, 1, max_pixels, on_short))
    if not out:
        if indices is not None and not indices:
            raise UltrasoundReadError(p, f"frame selection {frames!r} selects no frame")
        raise UltrasoundReadError(p, "file has no frames")
    height, width = out[0].shape[:2]
    if any(f.shape[:2] != (height, width) for f in out):
        raise UltrasoundReadError(p, "frames of different sizes")
    if channels_first:
        array = np.empty((len(out), 3, height, width), dtype=np.float32)
        for i, frame in enumerate(out):
            # (H, W, 1) grey broadcasts to the three channels; (H, W, 3) is transposed.
            array[i] = frame.transpose(2, 0, 1)
    else:
        array = np.empty((len(out), height, width, 3), dtype=np.float32)
        for i, frame in enumerate(out):
            array[i] = frame
    if with_metadata and meta is None:
        meta = _METAS[fmt](p, max_pixels, "accept")  # the frames were read (or warned about) above
    return array, meta
