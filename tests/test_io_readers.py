"""Tests of echocare.io.readers: every format, every DICOM of the real set, error paths."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_helpers import write_dicom

from echocare.io.readers import UltrasoundReadError, count_frames, iter_frames, read_metadata, read_ultrasound

EPS8 = 1.0 / 255.0 + 1e-6


# ------------------------------------------------------------------ generated DICOM


def gradient(h: int = 40, w: int = 60) -> np.ndarray:
    """uint8 (h, w): bright at the top, dark at the bottom; a marker at the left."""
    arr = np.linspace(255, 0, h).astype(np.uint8)[:, None].repeat(w, axis=1)
    arr[:, :5] = 77
    return arr


def colour_bars(h: int = 30, w: int = 60) -> np.ndarray:
    """uint8 (h, w, 3): red, green, blue vertical bars (left to right)."""
    arr = np.zeros((h, w, 3), np.uint8)
    for k in range(3):
        arr[:, k * w // 3:(k + 1) * w // 3, k] = 200
    arr[0, :, :] = 255  # white top row: a vertical flip would move it
    return arr


class TestGeneratedDicom:
    def test_monochrome1_is_inverted_monochrome2(self, tmp_path):
        g = gradient()
        m2 = read_ultrasound(write_dicom(tmp_path / "m2.dcm", g, "MONOCHROME2"))
        m1 = read_ultrasound(write_dicom(tmp_path / "m1.dcm", 255 - g, "MONOCHROME1"))
        assert m1.shape == m2.shape == (1, 40, 60, 3)
        np.testing.assert_allclose(m1, m2, atol=1e-6)
        assert m2[0, 0, 30, 0] == pytest.approx(1.0)  # row 0 is the top (bright)
        assert m2[0, -1, 30, 0] == pytest.approx(0.0)

    def test_uncompressed_ybr_full_equals_rgb_twin(self, tmp_path):
        from pydicom.pixels import convert_color_space

        rgb = colour_bars()
        ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
        a = read_ultrasound(write_dicom(tmp_path / "rgb.dcm", rgb, "RGB"))
        b = read_ultrasound(write_dicom(tmp_path / "ybr.dcm", ybr, "YBR_FULL"), with_metadata=True)
        assert b[1]["photometric_interpretation"] == "YBR_FULL"
        np.testing.assert_allclose(b[0], a, atol=3 * EPS8)  # two 8-bit roundings
        assert a[0, 15, 5].tolist() == pytest.approx([200 / 255, 0, 0])
        assert a[0, 15, 30].tolist() == pytest.approx([0, 200 / 255, 0])
        assert a[0, 15, 55].tolist() == pytest.approx([0, 0, 200 / 255])

    def test_planar_configuration_1(self, tmp_path):
        rgb = colour_bars()
        a = read_ultrasound(write_dicom(tmp_path / "px.dcm", rgb, "RGB"))
        # Planar configuration 1: the three colour planes one after the other.
        p = write_dicom(tmp_path / "pl.dcm", rgb, "RGB")
        import pydicom

        ds = pydicom.dcmread(p)
        ds.PlanarConfiguration = 1
        ds.PixelData = np.ascontiguousarray(rgb.transpose(2, 0, 1)).tobytes()
        ds.save_as(p)
        np.testing.assert_array_equal(read_ultrasound(p), a)

    def test_16bit_scaled_by_bits_stored(self, tmp_path):
        arr = np.zeros((8, 10), np.uint16)
        arr[0] = 4095
        arr[1] = 2048
        out = read_ultrasound(write_dicom(tmp_path / "b12.dcm", arr, "MONOCHROME2", bits_stored=12))
        assert out.dtype == np.float32
        assert out[0, 0, 0].tolist() == pytest.approx([1.0] * 3)
        assert out[0, 1, 0, 0] == pytest.approx(2048 / 4095)
        assert out[0, 2:].max() == 0.0
        # a 16-bit image that only uses a low range stays dark (no min/max stretch)
        arr16 = (arr // 16).astype(np.uint16)
        out16 = read_ultrasound(write_dicom(tmp_path / "b16.dcm", arr16, "MONOCHROME2", bits_stored=16))
        assert out16.max() == pytest.approx(255 / 65535)

    def test_8bit_dark_image_not_stretched(self, tmp_path):
        arr = np.full((10, 10), 20, np.uint8)
        arr[0, 0] = 40
        out = read_ultrasound(write_dicom(tmp_path / "dark.dcm", arr, "MONOCHROME2"))
        assert out.max() == pytest.approx(40 / 255)

    def test_multiframe_selection_and_iteration(self, tmp_path):
        frames = np.stack([np.full((6, 8), 10 * k, np.uint8) for k in range(7)])
        p = write_dicom(tmp_path / "cine.dcm", frames, "MONOCHROME2", FrameTime=25.0)
        assert count_frames(p) == 7
        all_ = read_ultrasound(p)
        assert all_.shape == (7, 6, 8, 3)
        assert [round(float(f[0, 0, 0]) * 255) for f in all_] == [0, 10, 20, 30, 40, 50, 60]
        assert read_ultrasound(p, frames=-1)[0, 0, 0, 0] == pytest.approx(60 / 255)
        sel = read_ultrasound(p, frames=[5, 1, 5])
        assert [round(float(f[0, 0, 0]) * 255) for f in sel] == [50, 10, 50]
        assert read_ultrasound(p, frames=slice(0, None, 3)).shape[0] == 3
        streamed = list(iter_frames(p, step=2))
        assert len(streamed) == 4 and streamed[0].shape == (6, 8, 3)
        assert streamed[3][0, 0, 0] == pytest.approx(60 / 255)
        meta = read_metadata(p)
        assert meta["frame_time_ms"] == pytest.approx(25.0)
        assert meta["num_frames"] == 7
        with pytest.raises(UltrasoundReadError, match="out of range"):
            read_ultrasound(p, frames=7)

    def test_ultrasound_region_calibration(self, tmp_path):
        from pydicom.dataset import Dataset

        def region(fmt, x0, y0, x1, y1, ux, uy, dx, dy):
            r = Dataset()
            r.RegionSpatialFormat = fmt
            r.RegionLocationMinX0, r.RegionLocationMinY0 = x0, y0
            r.RegionLocationMaxX1, r.RegionLocationMaxY1 = x1, y1
            r.PhysicalUnitsXDirection, r.PhysicalUnitsYDirection = ux, uy
            r.PhysicalDeltaX, r.PhysicalDeltaY = dx, dy
            return r

        doppler = region(3, 0, 30, 59, 39, 4, 7, 0.01, 0.5)  # seconds x cm/s: not a length
        bmode = region(1, 0, 0, 59, 29, 3, 3, 0.01, 0.02)  # cm per pixel
        p = write_dicom(tmp_path / "cal.dcm", gradient(), "MONOCHROME2",
                        SequenceOfUltrasoundRegions=[doppler, bmode], PixelSpacing=[9, 9])
        _, meta = read_ultrasound(p, with_metadata=True)
        assert meta["pixel_spacing_mm"] == pytest.approx([0.2, 0.1])  # [row, col] = [dY, dX] * 10
        # without regions, PixelSpacing is used
        q = write_dicom(tmp_path / "ps.dcm", gradient(), "MONOCHROME2", PixelSpacing=[0.3, 0.4])
        assert read_metadata(q)["pixel_spacing_mm"] == pytest.approx([0.3, 0.4])
        assert read_metadata(write_dicom(tmp_path / "none.dcm", gradient(), "MONOCHROME2"))[
            "pixel_spacing_mm"] is None

    def test_no_patient_attributes_in_metadata(self, tmp_path):
        p = write_dicom(
            tmp_path / "pat.dcm", gradient(), "MONOCHROME2",
            PatientName="Doe^Jane", PatientID="PID-12345", PatientBirthDate="19700101",
            StudyDate="20240102", InstitutionName="Secret Hospital", AccessionNumber="ACC999",
            ReferringPhysicianName="Dr^Who", StudyInstanceUID="1.2.3.4.5.6",
        )
        _, meta = read_ultrasound(p, with_metadata=True)
        assert set(meta) <= {"pixel_spacing_mm", "frame_time_ms", "num_frames", "source_format",
                             "photometric_interpretation", "bits_stored", "transfer_syntax", "modality"}
        text = repr(meta)
        for secret in ("Doe", "PID-12345", "1970", "2024", "Secret", "ACC999", "Who", "1.2.3.4.5.6"):
            assert secret not in text

    def test_no_pixel_data(self, tmp_path):
        import pydicom

        p = write_dicom(tmp_path / "nopix.dcm", gradient(), "MONOCHROME2")
        ds = pydicom.dcmread(p)
        del ds.PixelData
        ds.save_as(p)
        with pytest.raises(UltrasoundReadError, match=r"nopix\.dcm: DICOM has no pixel data"):
            read_ultrasound(p)

    def test_not_a_dicom(self, tmp_path):
        p = tmp_path / "junk.dcm"
        p.write_bytes(b"this is not dicom at all" * 10)
        with pytest.raises(UltrasoundReadError, match=r"junk\.dcm: "):
            read_ultrasound(p)

    def test_dicom_without_suffix_is_recognised(self, tmp_path):
        p = write_dicom(tmp_path / "IM0001", gradient(), "MONOCHROME2")
        assert read_ultrasound(p).shape == (1, 40, 60, 3)

    def test_16bit_palette_scaled_by_declared_depth(self, tmp_path):
        import pydicom

        idx = np.array([[0, 1], [2, 3]], np.uint8)
        p = write_dicom(tmp_path / "pal.dcm", idx, "MONOCHROME2")
        ds = pydicom.dcmread(p)
        ds.PhotometricInterpretation = "PALETTE COLOR"
        red = np.array([0, 65535, 0, 32768], np.uint16)
        green = np.array([0, 0, 65535, 32768], np.uint16)
        blue = np.array([0, 0, 0, 32768], np.uint16)
        for name, lut in (("Red", red), ("Green", green), ("Blue", blue)):
            ds.add_new(f"{name}PaletteColorLookupTableDescriptor", "US", [4, 0, 16])
            ds.add_new(f"{name}PaletteColorLookupTableData", "OW", lut.tobytes())
        ds.save_as(p)
        out = read_ultrasound(p)[0]
        assert out[0, 1].tolist() == pytest.approx([1, 0, 0])
        assert out[1, 0].tolist() == pytest.approx([0, 1, 0])
        assert out[1, 1].tolist() == pytest.approx([32768 / 65535] * 3)


# --------------------------------------------------------------------- real DICOMs

D = "dicom_us"
PALETTE_TOP_BLUE = {"OBXXXX1A.dcm", "OBXXXX1A_expb.dcm", "OBXXXX1A_rle.dcm", "OBXXXX1A_2frame.dcm",
                    "OBXXXX1A_expb_2frame.dcm", "OBXXXX1A_rle_2frame.dcm", "pydicom_examples_palette.dcm"}

# name -> (shape, photometric interpretation in the file)
REAL = {
    "JPGLosslessP14SV1_1s_1f_8b.dcm": ((1, 768, 1024, 3), "MONOCHROME2"),
    "OBXXXX1A.dcm": ((1, 600, 800, 3), "PALETTE COLOR"),
    "OBXXXX1A_2frame.dcm": ((2, 600, 800, 3), "PALETTE COLOR"),
    "OBXXXX1A_expb.dcm": ((1, 600, 800, 3), "PALETTE COLOR"),
    "OBXXXX1A_expb_2frame.dcm": ((2, 600, 800, 3), "PALETTE COLOR"),
    "OBXXXX1A_rle.dcm": ((1, 600, 800, 3), "PALETTE COLOR"),
    "OBXXXX1A_rle_2frame.dcm": ((2, 600, 800, 3), "PALETTE COLOR"),
    "US1_J2KI.dcm": ((1, 480, 640, 3), "YBR_ICT"),
    "US1_J2KR.dcm": ((1, 480, 640, 3), "YBR_RCT"),
    "US1_UNCI.dcm": ((1, 480, 640, 3), "RGB"),
    "US1_UNCR.dcm": ((1, 480, 640, 3), "RGB"),
    "color-pl.dcm": ((1, 120, 256, 3), "RGB"),
    "color-px.dcm": ((1, 120, 256, 3), "RGB"),
    "color3d_jpeg_baseline.dcm": ((120, 480, 640, 3), "YBR_FULL_422"),
    "gdcm-US-ALOKA-16.dcm": ((1, 480, 640, 3), "PALETTE COLOR"),
    "gdcm-US-ALOKA-16_big.dcm": ((1, 480, 640, 3), "PALETTE COLOR"),
    "pydicom_ExplVR_BigEnd.dcm": ((1, 60, 80, 3), "RGB"),
    "pydicom_examples_jpeg2k.dcm": ((1, 480, 640, 3), "YBR_RCT"),
    "pydicom_examples_palette.dcm": ((1, 350, 800, 3), "PALETTE COLOR"),
    "pydicom_examples_rgb_color.dcm": ((1, 240, 320, 3), "RGB"),
    "pydicom_examples_ybr_color.dcm": ((30, 240, 320, 3), "YBR_FULL_422"),
}

_cache: dict[tuple[str, object], np.ndarray] = {}


def load(root: Path, name: str, frames=None) -> np.ndarray:
    key = (name, repr(frames))
    if key not in _cache:
        _cache[key] = read_ultrasound(root / D / name, frames=frames)
    return _cache[key]


def half(a: np.ndarray) -> np.ndarray:
    """2x2 mean downsampling of (H, W, 3)."""
    h, w = a.shape[0] // 2, a.shape[1] // 2
    return a[: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).mean(axis=(1, 3))


def saturated_fraction(a: np.ndarray, thr: float = 0.25) -> float:
    return float(((a.max(-1) - a.min(-1)) > thr).mean())


def test_real_set_is_complete(real_data_dir):
    names = sorted(p.name for p in (real_data_dir / D).glob("*.dcm"))
    assert names == sorted(REAL)


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_dicom(real_data_dir, name):
    root = real_data_dir
    shape, pi = REAL[name]
    multi = shape[0] > 1
    # For long cines read three frames only (keeps the suite fast); shape via metadata.
    frames = [0, shape[0] // 2, shape[0] - 1] if shape[0] > 30 else None
    arr = load(root, name, frames)
    meta = read_metadata(root / D / name)
    assert meta["num_frames"] == shape[0]
    assert meta["photometric_interpretation"] == pi
    assert "PatientName" not in meta and "PatientID" not in meta
    assert arr.dtype == np.float32
    assert arr.shape[1:] == shape[1:]
    assert arr.shape[0] == (3 if frames else shape[0])
    assert 0.0 <= arr.min() and arr.max() <= 1.0 and arr.max() > 0.5
    if multi:
        assert np.abs(arr[0] - arr[-1]).mean() > 0.005, "frames of a cine should differ"

    f0 = arr[0]
    if name == "JPGLosslessP14SV1_1s_1f_8b.dcm":
        np.testing.assert_array_equal(f0[..., 0], f0[..., 2])  # grey repeated to 3 channels
        assert np.round(f0[300, 512:520, 0] * 255).tolist() == [26, 26, 25, 22, 19, 16, 14, 15]
        assert np.round(f0[600, 512:520, 1] * 255).tolist() == [45, 43, 41, 38, 33, 30, 26, 21]
    elif name in PALETTE_TOP_BLUE:
        # Top rows are the scanner's blue header bar (palette index 244), bottom black.
        r, g, b = f0[0, 400]
        assert b > g > r and b - r > 0.15
        if name != "pydicom_examples_palette.dcm":  # that one is a crop of the top 350 rows
            assert f0[-1].max() == 0.0
        assert saturated_fraction(f0, 0.1) > 0.01  # palette images are coloured
        twin = "OBXXXX1A_2frame.dcm" if multi else "OBXXXX1A.dcm"
        if name != "pydicom_examples_palette.dcm":
            np.testing.assert_array_equal(arr, load(root, twin))  # endian / RLE twins
        else:
            np.testing.assert_array_equal(f0, load(root, "OBXXXX1A.dcm")[0, :350])
        if multi:  # frame 2 is frame 1 with inverted indices: a black top row becomes light
            assert not np.allclose(arr[1, 0, 400], arr[0, 0, 400])
    elif name.startswith("US1_") or name == "pydicom_examples_jpeg2k.dcm":
        ref = load(root, "US1_UNCR.dcm")
        if name in ("US1_J2KR.dcm", "pydicom_examples_jpeg2k.dcm"):
            np.testing.assert_array_equal(arr, ref)  # lossless
        elif name == "US1_J2KI.dcm":
            np.testing.assert_allclose(arr, load(root, "US1_UNCI.dcm"), atol=EPS8)
            assert np.abs(arr - ref).mean() < 0.02  # lossy but close
        # Doppler colour box: orange/yellow flow (red > green > blue) on a grey image
        flow = (f0[..., 0] > 0.6) & (f0[..., 2] < 0.3)
        assert flow.mean() > 0.01
        assert np.abs(f0[..., 0] - f0[..., 2])[~flow].mean() < 0.1
    elif name in ("color-pl.dcm", "color-px.dcm"):
        np.testing.assert_array_equal(arr, load(root, "color-px.dcm"))  # planar 1 == planar 0
        # A TEE colour Doppler frame: blue flow at (30, 123) and (96, 133), speckle grey
        # at (50, 140). Swapped channels or planes would move or recolour these.
        assert np.round(f0[96, 133] * 255).tolist() == [16, 64, 248]
        assert np.round(f0[30, 123] * 255).tolist() == [16, 16, 160]
        assert f0[50, 140, 2] - f0[50, 140, 0] < 0.05
        assert saturated_fraction(f0) > 0.02
    elif name == "color3d_jpeg_baseline.dcm":
        assert meta["frame_time_ms"] == pytest.approx(33.333, abs=1e-3)
        assert meta["pixel_spacing_mm"] == pytest.approx([0.5105, 0.5105], abs=1e-4)
        # mostly grey echo (YBR converted, not left as Y/Cb/Cr, which would be pink/green)
        assert np.abs(f0[..., 1] - f0[..., 2]).mean() < 0.02
    elif name == "pydicom_examples_ybr_color.dcm":
        # the same cine at half size: its first frame matches color3d's, downsampled
        big = load(root, "color3d_jpeg_baseline.dcm", [0, 60, 119])[0]
        assert np.abs(half(big) - f0).mean() < 0.01
    elif name.startswith("gdcm-US-ALOKA-16"):
        np.testing.assert_array_equal(arr, load(root, "gdcm-US-ALOKA-16.dcm"))
        # 16-bit palette: the green marker line at the top left stays green
        assert (f0[23, 32:37, 1] - f0[23, 32:37, 0] > 0.3).all()
        assert meta["bits_stored"] == 16
    elif name == "pydicom_ExplVR_BigEnd.dcm":
        # pydicom's reference values for this big-endian planar-1 RGB file
        assert np.round(f0[9, 3:6] * 255).tolist() == [[171, 171, 171], [255, 255, 255], [255, 255, 0]]
        assert np.round(f0[58, 8:12] * 255).tolist() == [[255, 236, 0], [255, 183, 0], [255, 175, 0], [255, 183, 0]]
    elif name == "pydicom_examples_rgb_color.dcm":
        assert np.abs(half(load(root, "US1_UNCR.dcm")[0]) - f0).mean() < 0.02
    else:  # pragma: no cover - REAL and the branches above must agree
        pytest.fail(f"no content check for {name}")


def test_real_cine_streams_lazily(real_data_dir):
    p = real_data_dir / D / "color3d_jpeg_baseline.dcm"
    it = iter_frames(p, step=40)
    first = next(it)
    assert first.shape == (480, 640, 3)
    rest = list(it)
    assert len(rest) == 2  # frames 40, 80


# ---------------------------------------------------------------------- still images


class TestImages:
    def test_png_8bit_grey_orientation(self, tmp_path):
        g = gradient(40, 60)
        Image.fromarray(g).save(tmp_path / "g.png")
        out, meta = read_ultrasound(tmp_path / "g.png", with_metadata=True)
        assert out.shape == (1, 40, 60, 3) and out.dtype == np.float32
        assert out[0, 0, 30].tolist() == pytest.approx([1.0] * 3)  # top row bright
        assert out[0, -1, 30].tolist() == pytest.approx([0.0] * 3)
        assert out[0, 20, 2, 0] == pytest.approx(77 / 255)  # marker on the left
        assert meta == {"pixel_spacing_mm": None, "frame_time_ms": None, "num_frames": 1, "source_format": "png"}

    def test_png_16bit_scaled_by_65535(self, tmp_path):
        arr = np.zeros((10, 12), np.uint16)
        arr[0, 0] = 65535
        arr[1, 0] = 1000
        Image.fromarray(arr).save(tmp_path / "g16.png")
        out = read_ultrasound(tmp_path / "g16.png")
        assert out[0, 0, 0, 0] == pytest.approx(1.0)
        assert out[0, 1, 0, 0] == pytest.approx(1000 / 65535)
        # a dim 16-bit image stays dim
        Image.fromarray((arr // 64).astype(np.uint16)).save(tmp_path / "dim.png")
        assert read_ultrasound(tmp_path / "dim.png").max() == pytest.approx(1023 / 65535)

    def test_tiff_16bit_and_bmp_and_jpeg(self, tmp_path):
        arr = np.zeros((10, 12), np.uint16)
        arr[2, 3] = 30000
        Image.fromarray(arr).save(tmp_path / "g16.tif")
        assert read_ultrasound(tmp_path / "g16.tif")[0, 2, 3, 1] == pytest.approx(30000 / 65535)
        rgb = colour_bars()
        Image.fromarray(rgb).save(tmp_path / "c.bmp")
        np.testing.assert_allclose(read_ultrasound(tmp_path / "c.bmp")[0], rgb / 255.0, atol=1e-6)
        Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=95)
        jpg = read_ultrasound(tmp_path / "c.jpg")[0]
        assert jpg[15, 5, 0] > 0.7 and jpg[15, 5, 1] < 0.15 and jpg[15, 55, 2] > 0.7

    def test_rgba_composited_over_black(self, tmp_path):
        rgba = np.zeros((4, 4, 4), np.uint8)
        rgba[..., 0] = 255
        rgba[0, :, 3] = 255  # opaque red row
        rgba[1, :, 3] = 0  # transparent red row -> black
        Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
        out = read_ultrasound(tmp_path / "a.png")[0]
        assert out[0, 0].tolist() == pytest.approx([1, 0, 0])
        assert out[1, 0].tolist() == pytest.approx([0, 0, 0])

    def test_palette_png(self, tmp_path):
        img = Image.fromarray(colour_bars()).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
        img.save(tmp_path / "p.png")
        out = read_ultrasound(tmp_path / "p.png")[0]
        assert out[15, 5, 0] > 0.7 and out[15, 5, 2] < 0.1

    def test_corrupt_image(self, tmp_path):
        Image.fromarray(gradient(200, 200)).save(tmp_path / "t.png")
        data = (tmp_path / "t.png").read_bytes()
        (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
        with pytest.raises(UltrasoundReadError, match=r"t\.png: cannot decode image \(truncated"):
            read_ultrasound(tmp_path / "t.png")
        (tmp_path / "n.png").write_bytes(b"not a png")
        with pytest.raises(UltrasoundReadError, match=r"n\.png: cannot decode image"):
            read_ultrasound(tmp_path / "n.png")

    def test_missing_and_unsupported(self, tmp_path):
        with pytest.raises(UltrasoundReadError, match=r"nowhere\.png: file not found") as err:
            read_ultrasound(tmp_path / "nowhere.png")
        assert isinstance(err.value, ValueError)
        (tmp_path / "x.xyz").write_text("hello")
        with pytest.raises(UltrasoundReadError, match=r"x\.xyz: unsupported file type"):
            read_ultrasound(tmp_path / "x.xyz")
        with pytest.raises(UltrasoundReadError, match=r"gone\.mp4: file not found"):
            next(iter_frames(tmp_path / "gone.mp4"))

    def test_real_png(self, real_data_dir):
        files = sorted((real_data_dir / "hc18").rglob("*.png"))
        if not files:
            pytest.skip("no hc18 PNGs")
        img = next(f for f in files if "mask" not in str(f).lower())
        out = read_ultrasound(img)
        assert out.shape == (1, 540, 800, 3)  # HC18 images are 800 wide, 540 high


# ---------------------------------------------------------------------------- video


def write_video(path: Path, n: int, codec: str, h: int = 48, w: int = 64, options: dict | None = None) -> Path:
    """``n`` frames of ``h`` x ``w``; ``options`` go to the muxer (e.g. ``{"movflags": "faststart"}``)."""
    import av

    with av.open(str(path), "w", options=options or {}) as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        for k in range(n):
            img = np.zeros((h, w, 3), np.uint8)
            img[: h // 2] = (20 + 20 * k) % 256  # brightness rises with time (12 frames); top half only
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


@pytest.mark.parametrize("suffix,codec", [(".mp4", "libx264"), (".avi", "mpeg4")])
def test_video(tmp_path, suffix, codec):
    p = write_video(tmp_path / f"v{suffix}", 10, codec)
    arr, meta = read_ultrasound(p, with_metadata=True)
    assert arr.shape == (10, 48, 64, 3) and arr.dtype == np.float32
    means = [float(f[: 24].mean()) for f in arr]
    assert all(b > a for a, b in zip(means, means[1:]))  # frame order kept
    assert means[0] == pytest.approx(20 / 255, abs=0.03)
    assert arr[:, 30:].max() < 0.1  # bottom half dark: not flipped
    assert meta["num_frames"] == 10 and meta["frame_time_ms"] == pytest.approx(40.0)
    assert meta["pixel_spacing_mm"] is None
    stepped = list(iter_frames(p, step=3))
    assert len(stepped) == 4
    np.testing.assert_allclose(stepped[1], arr[3], atol=1e-6)
    sel = read_ultrasound(p, frames=[7, 2])
    np.testing.assert_allclose(sel, arr[[7, 2]], atol=1e-6)
    assert read_ultrasound(p, frames=-1).shape == (1, 48, 64, 3)


def test_corrupt_video(tmp_path):
    (tmp_path / "bad.mp4").write_bytes(b"\x00" * 1000)
    with pytest.raises(UltrasoundReadError, match=r"bad\.mp4: cannot open video"):
        read_ultrasound(tmp_path / "bad.mp4")


# ---------------------------------------------------------------------------- NIfTI


def test_nifti(tmp_path):
    import nibabel as nib

    img = gradient(40, 60)  # (rows, cols)
    # NIfTI stores (i, j) = (column, row)
    affine = np.diag([0.3, 0.2, 1.0, 1.0])
    nii = nib.Nifti1Image(np.ascontiguousarray(img.T), affine)
    nii.header.set_xyzt_units("mm", "sec")
    nib.save(nii, tmp_path / "a.nii.gz")
    out, meta = read_ultrasound(tmp_path / "a.nii.gz", with_metadata=True)
    assert out.shape == (1, 40, 60, 3)
    np.testing.assert_allclose(out[0, ..., 0], img / 255.0, atol=1e-6)
    assert meta["pixel_spacing_mm"] == pytest.approx([0.2, 0.3])  # [row, col]
    assert meta["source_format"] == "nifti"

    cine = np.stack([img.T // (k + 1) for k in range(4)], axis=-1).astype(np.uint8)  # (X, Y, T)
    nib.save(nib.Nifti1Image(cine, np.eye(4)), tmp_path / "c.nii")
    out = read_ultrasound(tmp_path / "c.nii")
    assert out.shape == (4, 40, 60, 3)
    assert out[2, 0, 30, 0] == pytest.approx((255 // 3) / 255)
    assert len(list(iter_frames(tmp_path / "c.nii", step=2))) == 2


# ------------------------------------------------------------- truncated files (#15)


def cut_video(full: Path, cut: Path, fraction: float = 0.6) -> Path:
    """A copy of ``full`` cut inside its media data: ``fraction`` of the bytes after the MP4
    ``mdat`` box header (the AVI ``movi`` list), as an interrupted copy leaves it."""
    data = full.read_bytes()
    start = max(data.find(b"mdat"), data.find(b"movi"))
    assert start > 0
    cut.write_bytes(data[: start + int((len(data) - start) * fraction)])
    return cut


@pytest.mark.parametrize("suffix,codec,options", [(".mp4", "libx264", {"movflags": "faststart"}), (".avi", "mpeg4", None)])
def test_truncated_video_is_not_read_short(tmp_path, suffix, codec, options):
    """An MP4 with its index at the front (faststart) or an AVI, cut short, still declares all 60
    frames: every reader says how many of them it can read, or (allow_partial) warns and reads them."""
    import re
    import warnings

    full = write_video(tmp_path / f"full{suffix}", 60, codec, options=options)
    if options:
        data = full.read_bytes()
        assert data.find(b"moov") < data.find(b"mdat")  # faststart: the sample index comes first
    p = cut_video(full, tmp_path / f"cut{suffix}")
    name = re.escape(str(p))
    short = rf"^{name}: only (\d+) of the 60 frames it declares can be read \(the file is truncated or corrupt\)$"

    with pytest.raises(UltrasoundReadError, match=short) as err:
        read_ultrasound(p)
    readable = int(re.match(short, str(err.value)).group(1))
    assert 0 < readable < 60
    with pytest.raises(UltrasoundReadError, match=short):
        read_metadata(p)
    with pytest.raises(UltrasoundReadError, match=short):
        count_frames(p)
    with pytest.raises(UltrasoundReadError, match=short):
        read_ultrasound(p, frames=[0])  # a selection is resolved against the frames there are
    # Streaming: the frames that are there come first, the error at the end of the stream.
    streamed = []
    with pytest.raises(UltrasoundReadError, match=short):
        for frame in iter_frames(p):
            streamed.append(frame)
    assert len(streamed) == readable

    expected = read_ultrasound(full)[:readable]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        partial, meta = read_ultrasound(p, allow_partial=True, with_metadata=True)
    assert [str(w.message) for w in caught if w.category is UserWarning] == [
        f"{p}: only {readable} of the 60 frames it declares can be read (the file is truncated or corrupt); "
        f"reading the {readable}"
    ]
    assert partial.shape == (readable, 48, 64, 3) and meta["num_frames"] == readable
    np.testing.assert_allclose(partial, expected, atol=1e-6)
    np.testing.assert_array_equal(np.stack(streamed), partial)
    with pytest.warns(UserWarning, match=short[1:-1]):
        assert read_metadata(p, allow_partial=True)["num_frames"] == readable
    with pytest.warns(UserWarning, match=short[1:-1]):
        last = read_ultrasound(p, frames=-1, allow_partial=True)
    np.testing.assert_allclose(last[0], expected[-1], atol=1e-6)
    with pytest.warns(UserWarning, match=short[1:-1]):
        assert len(list(iter_frames(p, allow_partial=True))) == readable


def test_truncated_mp4_without_faststart_cannot_be_opened(tmp_path):
    """Without faststart the MP4 index is at the end: a cut file has none, and says so."""
    p = cut_video(write_video(tmp_path / "full.mp4", 60, "libx264"), tmp_path / "cut.mp4")
    for read in (read_ultrasound, read_metadata, lambda q: next(iter_frames(q))):
        with pytest.raises(UltrasoundReadError, match=rf"^{re.escape(str(p))}: cannot open video \("):
            read(p)


def _rle_dicom(path: Path, frames: int = 2) -> Path:
    """An RLE Lossless multi-frame DICOM, encoded by pydicom."""
    import pydicom
    from pydicom.uid import RLELossless

    stack = np.stack([gradient() // (k + 1) for k in range(frames)])
    p = write_dicom(path, stack, "MONOCHROME2", NumberOfFrames=frames)
    ds = pydicom.dcmread(p)
    ds.compress(RLELossless)
    ds.save_as(p)
    return p


def test_truncated_compressed_dicom_says_truncated(tmp_path):
    """pydicom drops the Pixel Data element a file ends inside of: that is truncated pixel
    data, not "no pixel data"; an uncompressed one says how many frames are complete."""
    full = _rle_dicom(tmp_path / "rle.dcm")
    np.testing.assert_allclose(read_ultrasound(full)[1, ..., 0], (gradient() // 2) / 255.0, atol=1e-6)
    data = full.read_bytes()
    cut = tmp_path / "rle_cut.dcm"
    cut.write_bytes(data[: len(data) - 100])
    message = rf"^{re.escape(str(cut))}: truncated pixel data: the file ends inside its compressed pixel data$"
    with pytest.warns(UserWarning, match="End of file reached"):  # pydicom's own warning
        with pytest.raises(UltrasoundReadError, match=message):
            read_ultrasound(cut)

    native = write_dicom(tmp_path / "native.dcm", np.stack([gradient()] * 3), "MONOCHROME2", NumberOfFrames=3)
    data = native.read_bytes()
    (tmp_path / "native_cut.dcm").write_bytes(data[: len(data) - 2400 - 10])  # into the third frame
    with pytest.raises(UltrasoundReadError, match=r"native_cut\.dcm: truncated pixel data: 4,790 of 7,200 bytes, "
                                                  r"1 of the 3 frames it declares$"):
        read_ultrasound(tmp_path / "native_cut.dcm")


@pytest.mark.parametrize("name", ["OBXXXX1A_rle_2frame.dcm", "pydicom_examples_ybr_color.dcm", "US1_J2KR.dcm",
                                  "JPGLosslessP14SV1_1s_1f_8b.dcm"])
def test_truncated_real_compressed_dicom(real_data_dir, tmp_path, name):
    data = (real_data_dir / D / name).read_bytes()
    cut = tmp_path / name
    cut.write_bytes(data[: int(len(data) * 0.7)])
    with pytest.warns(UserWarning, match="End of file reached"):
        with pytest.raises(UltrasoundReadError, match="truncated pixel data") as err:
            read_ultrasound(cut)
    assert "no pixel data" not in str(err.value)


def test_truncated_nifti(tmp_path):
    import nibabel as nib

    cine = np.stack([gradient().T] * 4, axis=-1)  # (X, Y, T)
    for suffix in (".nii", ".nii.gz"):
        nib.save(nib.Nifti1Image(cine, np.eye(4)), tmp_path / f"c{suffix}")
        data = (tmp_path / f"c{suffix}").read_bytes()
        cut = tmp_path / f"cut{suffix}"
        cut.write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(UltrasoundReadError, match=rf"^{re.escape(str(cut))}: truncated") as err:
            read_ultrasound(cut)
        assert "\n" not in str(err.value)
    # An uncompressed .nii's size is checked from its header: its metadata says so too.
    with pytest.raises(UltrasoundReadError, match=r"cut\.nii: truncated voxel data: [\d,]+ of 9,600 bytes$"):
        read_metadata(tmp_path / "cut.nii")


# ----------------------------------------------------------------- max_pixels (#15)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width`` x ``height`` grey pixels and holds none (a few dozen bytes):
    what a reader sees before it decodes anything."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [12000, 20000])
def test_max_pixels_refuses_a_huge_png_before_decoding(tmp_path, side):
    """12000² passed Pillow's limit (with a warning) and was decoded (6.3 GB); 20000² raised
    Pillow's DecompressionBombError past the readers. Both are refused from the header."""
    p = png_header_only(tmp_path / "huge.png", side, side)
    message = (rf"^{re.escape(str(p))}: frame of {side}x{side} = {side * side:,} pixels is over the max_pixels "
               rf"limit of 100,000,000 pixels per frame$")
    for read in (read_ultrasound, read_metadata, lambda q: next(iter_frames(q)), count_frames):
        with pytest.raises(UltrasoundReadError, match=message):
            read(p)


def test_max_pixels_replaces_pillows_limit(tmp_path, monkeypatch):
    """Pillow's decompression-bomb check agrees with max_pixels: an image that max_pixels allows is
    read without Pillow's warning or error, whatever PIL.Image.MAX_IMAGE_PIXELS says."""
    import warnings

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow would refuse 100x100 (> 2000)
    Image.fromarray(gradient(100, 100)).save(tmp_path / "g.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail the test
        out = read_ultrasound(tmp_path / "g.png")
    assert out.shape == (1, 100, 100, 3) and out[0, 0, 50, 0] == pytest.approx(1.0)
    assert read_ultrasound(tmp_path / "g.png", max_pixels=10_000).shape == (1, 100, 100, 3)
    with pytest.raises(UltrasoundReadError, match=r"g\.png: frame of 100x100 = 10,000 pixels is over the max_pixels "
                                                  r"limit of 9,999 pixels per frame$"):
        read_ultrasound(tmp_path / "g.png", max_pixels=9_999)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored
    # Every frame of a multi-frame TIFF is checked (they may differ in size).
    Image.fromarray(gradient(10, 10)).save(tmp_path / "m.tif", save_all=True,
                                           append_images=[Image.fromarray(gradient(40, 50))])
    assert [f.shape for f in iter_frames(tmp_path / "m.tif", max_pixels=2000)] == [(10, 10, 3), (40, 50, 3)]
    frames = iter_frames(tmp_path / "m.tif", max_pixels=1999)
    assert next(frames).shape == (10, 10, 3)
    with pytest.raises(UltrasoundReadError, match=r"m\.tif: frame of 50x40 = 2,000 pixels is over"):
        next(frames)


def test_max_pixels_dicom_video_nifti(tmp_path):
    import nibabel as nib
    import pydicom

    dcm = write_dicom(tmp_path / "g.dcm", gradient(), "MONOCHROME2")  # 40 rows x 60 columns
    video = write_video(tmp_path / "v.mp4", 3, "libx264")  # 48 x 64
    nib.save(nib.Nifti1Image(np.ascontiguousarray(gradient().T), np.eye(4)), tmp_path / "g.nii.gz")
    cases = [(dcm, 60, 40), (video, 64, 48), (tmp_path / "g.nii.gz", 60, 40)]
    for path, width, height in cases:
        limit = width * height
        assert read_ultrasound(path, max_pixels=limit).shape[1:] == (height, width, 3)
        refused = rf"{re.escape(path.name)}: frame of {width}x{height} = {limit:,} pixels is over the max_pixels limit of {limit - 1:,}"
        for read in (read_ultrasound, read_metadata, lambda q, **k: next(iter_frames(q, **k))):
            with pytest.raises(UltrasoundReadError, match=refused):
                read(path, max_pixels=limit - 1)
    # The DICOM header's Rows x Columns is checked before its pixel data is looked at.
    ds = pydicom.dcmread(dcm)
    ds.Rows = ds.Columns = 30000
    ds.save_as(tmp_path / "huge.dcm")
    with pytest.raises(UltrasoundReadError, match=r"huge\.dcm: frame of 30000x30000 = 900,000,000 pixels is over"):
        read_ultrasound(tmp_path / "huge.dcm")
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="max_pixels must be a positive integer or None"):
            read_ultrasound(dcm, max_pixels=bad)
    assert read_ultrasound(dcm, max_pixels=None).shape == (1, 40, 60, 3)
