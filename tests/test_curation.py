"""Tests of echocare.datasets.curation (`echocare curate`): crop, dedup, mapping, privacy,
failures, resume after a kill, and a run on a mix of real data."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_helpers import write_dicom as write_grey_dicom

from echocare.datasets.curation import (
    CurationError,
    HashIndex,
    curate,
    detect_echo_region,
    hamming,
    load_mapping,
    perceptual_hash,
    resolve_anatomy,
)
from echocare.phantoms.renderer import make_phantom_image

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
QUIET = {"progress": False}


# ------------------------------------------------------------------------- helpers


def phantom(seed: int, size: int = 96, geometry: str | None = None, organ: str = "other") -> np.ndarray:
    image, _ = make_phantom_image(np.random.default_rng(seed), size, geometry=geometry, organ=organ)
    return image


def save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def with_ui(image: np.ndarray, top: int = 60, left: int = 70, h: int = 300, w: int = 380) -> np.ndarray:
    """``image`` (grey) pasted at (top, left) into an RGB screenshot with a synthetic UI:
    text-like bright bars at the top and left, a colour bar at the right, a flat banner."""
    canvas = np.zeros((h, w, 3), np.uint8)
    canvas[:14, :] = (30, 60, 110)  # flat coloured banner across the top
    for k in range(4):  # "text": lines of short bright bars (glyphs) in the top-left
        y = 20 + 9 * k
        for x in range(6, 150, 7):
            canvas[y:y + 5, x:x + 4] = 230
    for k in range(5):  # "parameters" down the left side
        y = top + 10 + 14 * k
        canvas[y:y + 6, 8:50:3] = 255
    bar = np.linspace(255, 40, 110).astype(np.uint8)  # colour bar (gradient) at the right
    canvas[top + 20:top + 130, w - 22:w - 12] = np.stack([bar, 255 - bar, np.full_like(bar, 128)], axis=-1)[:, None]
    canvas[h - 16:h - 12, 60:300] = 200  # a thin horizontal scale line at the bottom
    ih, iw = image.shape
    canvas[top:top + ih, left:left + iw] = image[..., None]
    return canvas


def box_of(image: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(image)
    return int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1


def write_dicom(path: Path, arr: np.ndarray, **attrs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_grey_dicom(path, arr, "MONOCHROME2", **attrs)


def write_video(path: Path, frames: list[np.ndarray]) -> Path:
    import av

    h, w = frames[0].shape[:2]
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "12"}
        for img in frames:
            rgb = np.repeat(img[..., None], 3, axis=-1) if img.ndim == 2 else img
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def load_outputs(out: Path) -> tuple[dict, dict]:
    return json.loads((out / "datalist.json").read_text()), json.loads((out / "report.json").read_text())


def all_items(datalist: dict) -> list[dict]:
    return datalist["training"] + datalist["validation"]


def dropped_files(report: dict, reason: str) -> list[str]:
    return [Path(d["file"]).name for d in report["dropped"][reason]]


def build_mixed(root: Path) -> dict[str, list[str]]:
    """Two source folders with images, a DICOM, a video, a zip, duplicates, near
    duplicates, blanks and corrupt files. Returns what each file is expected to give."""
    a, b = root / "breast", root / "abdomen"
    rng = np.random.default_rng(0)
    imgs = [phantom(s, 96) for s in range(6)]
    save(a / "img0.png", imgs[0])
    save(a / "img1.png", imgs[1])
    save(a / "sub" / "img2.png", with_ui(imgs[2], 40, 50, 200, 240))
    save(a / "sub" / "img3.jpg", np.repeat(imgs[3][..., None], 3, axis=-1))
    # near duplicate of img1: a little noise and a brightness change
    noisy = np.clip(imgs[1].astype(np.int16) + rng.integers(-4, 5, imgs[1].shape) + 6, 0, 255).astype(np.uint8)
    noisy[imgs[1] == 0] = 0
    save(b / "near_img1.png", noisy)
    shutil.copy(a / "img0.png", b / "copy_of_img0.png")  # exact duplicate, other source
    save(b / "blank.png", np.zeros((80, 80), np.uint8))
    few = np.zeros((80, 80), np.uint8)
    few[10:20, 10:30] = 120  # 200 non-zero pixels: blank too
    save(b / "almost_blank.png", few)
    (b / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (b / "corrupt.dcm").write_bytes(b"\x00" * 128 + b"DICM" + b"\x01\x02" * 50)
    (b / "notes.txt").write_text("not an image\n")
    write_dicom(b / "scan.dcm", imgs[4])
    video = [phantom(100 + k // 10, 64, organ="abdomen/liver") for k in range(25)]
    write_video(b / "clip.mp4", video)  # frames 0, 10, 20: three different scenes
    with zipfile.ZipFile(b / "archive.zip", "w") as zf:
        zf.writestr("inner/img5.png", _png_bytes(imgs[5]))
        zf.writestr("inner/dup_img0.png", (a / "img0.png").read_bytes())
        zf.writestr("inner/broken.bmp", b"BM" + b"\x00" * 30)
    return {
        "kept": ["img0.png", "img1.png", "img2.png", "img3.jpg", "scan.dcm", "clip.mp4#0", "clip.mp4#10",
                 "clip.mp4#20", "archive.zip!inner/img5.png"],
        "exact_duplicate": ["copy_of_img0.png", "archive.zip!inner/dup_img0.png"],
        "near_duplicate": ["near_img1.png"],
        "blank": ["blank.png", "almost_blank.png"],
        "failed": ["corrupt.png", "corrupt.dcm", "archive.zip!inner/broken.bmp"],
        "skipped": ["notes.txt"],
    }


def _png_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def snapshot(out: Path) -> dict[str, bytes]:
    """Every output file (except the journal) by relative path -> bytes."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "progress.jsonl" and p.name != "report.png"}


# ----------------------------------------------------------------------------- crop


@pytest.mark.parametrize("geometry", ["sector", "linear"])
def test_crop_recovers_the_echo_region_from_a_screenshot(tmp_path, geometry):
    image = phantom(3, 200, geometry=geometry, organ="abdomen/liver")
    screen = with_ui(image, top=60, left=70)
    (y0, y1, x0, x1), mask = detect_echo_region(screen)
    ty0, ty1, tx0, tx1 = box_of(image)
    expected = (ty0 + 60, ty1 + 60, tx0 + 70, tx1 + 70)
    assert np.allclose((y0, y1, x0, x1), expected, atol=3), ((y0, y1, x0, x1), expected)
    # nothing of the UI is inside the region; the echo data is
    assert not mask[:40].any() and not mask[:, :55].any() and not mask[:, -30:].any()
    assert mask[60:260, 70:270][image > 0].mean() > 0.97

    # through the pipeline: the written image is the crop, and the overlay exists
    save(tmp_path / "src" / "screen.png", screen)
    dl = curate([str(tmp_path / "src")], None, str(tmp_path / "out"), size=SIZE, overlay=True, **QUIET)
    (item,) = all_items(json.loads(dl.read_text()))
    name = Path(item["image"]).name
    assert (tmp_path / "out" / "overlays" / name).is_file()
    overlay = np.asarray(Image.open(tmp_path / "out" / "overlays" / name))
    assert overlay.shape == screen.shape
    written = np.asarray(Image.open(tmp_path / "out" / item["image"]))
    assert written.shape == (SIZE, SIZE)  # grey kept grey; the UI colour bar is gone
    direct = curate([str(tmp_path / "src")], None, str(tmp_path / "out_nocrop"), size=SIZE, crop=False, **QUIET)
    uncropped = np.asarray(Image.open(tmp_path / "out_nocrop" / all_items(json.loads(direct.read_text()))[0]["image"]))
    assert uncropped.ndim == 3  # without the crop the colour UI stays in


def test_crop_of_an_image_without_interface_keeps_it_whole():
    image = np.repeat(phantom(5, 128, geometry="linear")[..., None], 3, axis=-1)
    (y0, y1, x0, x1), mask = detect_echo_region(image)
    ty0, ty1, tx0, tx1 = box_of(image.max(axis=2))
    assert abs(y0 - ty0) <= 2 and abs(y1 - ty1) <= 2 and abs(x0 - tx0) <= 2 and abs(x1 - tx1) <= 2


# --------------------------------------------------------------------------- hashes


def test_perceptual_hash_and_index():
    rng = np.random.default_rng(1)
    a, b = phantom(1, 128), phantom(2, 128)
    noisy = np.clip(a + rng.normal(0, 4, a.shape) + 8, 0, 255).astype(np.uint8)
    ha, hb, hn = perceptual_hash(a), perceptual_hash(b), perceptual_hash(noisy)
    assert hamming(ha, hn) <= 6 < hamming(ha, hb)
    index = HashIndex(6)
    index.add(ha, "a")
    assert index.query(hn)[0] == "a"
    assert index.query(hb) is None
    # the multi-index probe finds every hash within the radius (vs. a linear scan)
    hashes = [int(h) for h in rng.integers(0, 2**63, 300, dtype=np.int64)]
    index = HashIndex(7)
    for k, h in enumerate(hashes):
        index.add(h, str(k))
    for k in range(0, 300, 7):
        q = hashes[k] ^ sum(1 << int(bit) for bit in rng.choice(64, 7, replace=False))
        assert index.query(q) == (str(k), 7)


# -------------------------------------------------------------------------- mapping


def test_mapping_is_validated_and_resolved(tmp_path):
    good = tmp_path / "mapping.yaml"
    good.write_text("breast: thorax/breast\nabdomen: abdomen\nabdomen/liver_scans: Abdomen/Liver\n"
                    "'*heart*': thorax/heart/apical four-chamber\narchive.zip/inner: pelvis\n")
    amap = load_mapping(good)
    assert resolve_anatomy(amap, "breast", "sub/x.png") == "thorax/breast"
    assert resolve_anatomy(amap, "abdomen", "liver_scans/x.png") == "abdomen/liver"
    assert resolve_anatomy(amap, "abdomen", "liver_scans_2/x.png") == "abdomen"
    assert resolve_anatomy(amap, "abdomen", "a4c_heart_1.png") == "thorax/heart/apical four-chamber"
    assert resolve_anatomy(amap, "breast", "archive.zip!inner/a.png") == "pelvis"
    assert resolve_anatomy(amap, "other", "x.png") is None
    bad = tmp_path / "bad.yaml"
    bad.write_text("breast: thorax/breast\nkidneys: abdomen/kidnee\n")
    with pytest.raises(CurationError, match=r"bad\.yaml: key 'kidneys': unknown anatomy path 'abdomen/kidnee'"):
        load_mapping(bad)
    (tmp_path / "src").mkdir()
    with pytest.raises(CurationError, match=r"bad\.yaml"):
        curate([str(tmp_path / "src")], str(bad), str(tmp_path / "out"), **QUIET)
    with pytest.raises(CurationError, match="unknown curate option"):
        curate([str(tmp_path / "src")], None, str(tmp_path / "out"), bogus=1)


# ------------------------------------------------------------------ the whole thing


def test_mixed_sources_keep_drop_fail_and_map(tmp_path):
    expected = build_mixed(tmp_path / "in")
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("breast: thorax/breast\nabdomen: abdomen\n'clip.mp4': abdomen/liver\n")
    out = tmp_path / "out"
    dl_path = curate([str(tmp_path / "in" / "breast"), str(tmp_path / "in" / "abdomen")], str(mapping), str(out),
                     size=SIZE, workers=2, frame_step=10, val_fraction=0.3, overlay=True, **QUIET)
    datalist, report = load_outputs(out)
    assert dl_path == out / "datalist.json"
    items = all_items(datalist)
    assert report["kept"] == len(items) == len(expected["kept"])
    assert datalist["training"] and datalist["validation"]
    names = [it["image"] for it in items]
    assert len(set(names)) == len(names)
    assert sorted(os.listdir(out / "images")) == sorted(Path(n).name for n in names)
    assert sorted(os.listdir(out / "overlays")) == sorted(Path(n).name for n in names)
    for it in items:
        img = np.asarray(Image.open(out / it["image"]))
        assert img.shape[:2] == (SIZE, SIZE)
        assert it["anatomy"] in ("thorax/breast", "abdomen", "abdomen/liver")
    for reason in ("exact_duplicate", "near_duplicate", "blank"):
        got = sorted(Path(d["file"]).name if "!" not in d["file"] else "archive.zip!" + d["file"].split("!")[1]
                     for d in report["dropped"][reason])
        assert got == sorted(expected[reason]), reason
    assert report["dropped"]["exact_duplicate"][0]["duplicate_of"] in names
    failed = {Path(f["file"].split("!")[0]).name + ("!" + f["file"].split("!")[1] if "!" in f["file"] else ""): f["reason"]
              for f in report["failed"]}
    assert sorted(failed) == sorted(expected["failed"])
    assert all(reason for reason in failed.values())
    assert [Path(s["file"]).name for s in report["skipped"]] == ["notes.txt"]
    counts = report["counts"]
    assert counts["source"] == {"abdomen": 5, "breast": 4}
    assert counts["modality"] == {"dicom": 1, "image": 5, "video": 3}
    assert counts["region"] == {"abdomen": 5, "thorax": 4}
    assert counts["organ"] == {"(none)": 2, "abdomen/liver": 3, "thorax/breast": 4}
    assert (out / "report.png").stat().st_size > 1000
    # frames of one video stay on one side of the split
    clip = [it for it in items if it.get("anatomy") == "abdomen/liver"]
    sides = {("validation" if it in datalist["validation"] else "training") for it in clip}
    assert len(clip) == 3 and len(sides) == 1

    # The same inputs with 1 worker (and a rerun into the finished folder) give the same result.
    out1 = tmp_path / "out1"
    curate([str(tmp_path / "in" / "breast"), str(tmp_path / "in" / "abdomen")], str(mapping), str(out1),
           size=SIZE, workers=1, frame_step=10, val_fraction=0.3, overlay=True, **QUIET)
    assert snapshot(out1) == snapshot(out)
    curate([str(tmp_path / "in" / "breast"), str(tmp_path / "in" / "abdomen")], str(mapping), str(out1),
           size=SIZE, workers=1, frame_step=10, val_fraction=0.3, overlay=True, **QUIET)
    assert snapshot(out1) == snapshot(out)
    # other settings into the same folder are refused, not mixed
    with pytest.raises(CurationError, match="other settings"):
        curate([str(tmp_path / "in" / "breast")], None, str(out1), size=SIZE, **QUIET)


def test_no_patient_attribute_in_any_output(tmp_path, capsys, caplog):
    secrets = ["Doe^Jane", "Doe", "Jane", "123456789", "Secret Hospital", "20240101", "ACC998877"]
    src = tmp_path / "src"
    write_dicom(src / "study" / "image.dcm", phantom(7, 96), PatientName="Doe^Jane", PatientID="123456789",
                InstitutionName="Secret Hospital", StudyDate="20240101", PatientBirthDate="20240101",
                AccessionNumber="ACC998877")
    multi = np.stack([phantom(8 + k, 96) for k in range(3)])
    write_dicom(src / "study" / "cine.dcm", multi, PatientName="Doe^Jane", PatientID="123456789",
                InstitutionName="Secret Hospital", StudyDate="20240101", NumberOfFrames=3)
    broken = (src / "study" / "image.dcm").read_bytes()[:600]  # header with the name, no pixels
    (src / "study" / "broken.dcm").write_bytes(broken)
    out = tmp_path / "out"
    caplog.set_level("DEBUG")
    curate([str(src)], None, str(out), size=SIZE, frame_step=1, overlay=True, progress=True, val_fraction=0.5)
    datalist, report = load_outputs(out)
    assert report["kept"] == 4 and len(report["failed"]) == 1
    logs = capsys.readouterr()
    texts = [logs.out, logs.err, caplog.text]
    for p in out.rglob("*"):
        texts.append(str(p.relative_to(out)))
        if p.is_file():
            texts.append(p.read_bytes().decode("latin-1"))
    for secret in secrets:
        for text in texts:
            assert secret not in text, secret


# ------------------------------------------------------------------- kill and resume


def test_killed_run_resumes_to_the_same_result(tmp_path):
    expected = build_mixed(tmp_path / "in")
    for k in range(8):  # more files, so that the kill lands mid-run
        save(tmp_path / "in" / "breast" / "more" / f"extra{k}.png", phantom(50 + k, 80))
    sources = [str(tmp_path / "in" / "breast"), str(tmp_path / "in" / "abdomen")]
    args = dict(size=SIZE, frame_step=10, val_fraction=0.3, overlay=True)

    reference = tmp_path / "reference"
    curate(sources, None, str(reference), workers=1, **args, **QUIET)

    out = tmp_path / "out"
    code = (
        "import sys; from echocare.datasets.curation import curate\n"
        f"curate({sources!r}, None, {str(out)!r}, workers=2, progress=False, _delay=0.25, **{args!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path)
    journal = out / "progress.jsonl"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if journal.exists() and sum(1 for line in journal.read_text().splitlines() if '"fr"' in line) >= 4:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "datalist.json").exists()
    done_before = journal.read_text().count('"done":true')
    assert done_before < 20

    curate(sources, None, str(out), workers=1, **args, **QUIET)
    assert snapshot(out) == snapshot(reference)
    datalist, report = load_outputs(out)
    assert report["kept"] == len(expected["kept"]) + 8
    # the rerun did not redo the files finished before the kill
    lines = [json.loads(line) for line in journal.read_text().splitlines()]
    finished = [r["k"] for r in lines if r.get("done")]
    assert len(finished) == len(set(finished))


# ------------------------------------------------------------------------ real data


def test_real_data_mix(tmp_path, real_data_dir):
    """Real images, the real DICOMs, a generated MP4, a zip, duplicates, near duplicates,
    blanks and corrupt files: every valid image kept once, every duplicate, blank and
    corrupt file accounted for."""
    src = tmp_path / "real"
    picked = []
    for folder, pattern, n in (("busbra", "Images/*.png", 3), ("hc18", "*.png", 3), ("carotid", "*.png", 2),
                               ("ddti", "*.png", 3)):
        files = sorted(p for p in (real_data_dir / folder).rglob(pattern) if "mask" not in str(p).lower())
        if folder == "carotid":  # one frame per recording: frames of one recording are near duplicates
            files = list({p.name.split("_slice")[0]: p for p in reversed(files)}.values())
        (src / folder).mkdir(parents=True)
        for p in files[:n]:
            picked.append(p)
            shutil.copy(p, src / folder / p.name)
    assert len(picked) >= 8
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(picked[0], extra / "same_as_first.png")  # exact duplicate
    a = np.asarray(Image.open(picked[1]).convert("L")).astype(np.int16)
    rng = np.random.default_rng(0)
    save(extra / "near.png", np.clip(a + rng.integers(-3, 4, a.shape) + 5, 0, 255).astype(np.uint8))
    save(extra / "blank.png", np.zeros((100, 120), np.uint8))
    (extra / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    write_video(extra / "clip.mp4", [phantom(200 + k // 10, 64, organ="thorax/heart") for k in range(15)])
    with zipfile.ZipFile(extra / "more.zip", "w") as zf:
        zf.write(picked[2], "zipped/dup.png")  # duplicate inside an archive
        zf.writestr("zipped/new.png", _png_bytes(phantom(300, 96)))
    dicom_dir = real_data_dir / "dicom_us"
    out = tmp_path / "out"
    curate([str(src), str(dicom_dir), str(extra)], None, str(out), size=SIZE, workers=2, frame_step=10,
           **QUIET)
    datalist, report = load_outputs(out)
    kept_units = report["kept"]
    exact = dropped_files(report, "exact_duplicate")
    assert "same_as_first.png" in exact
    assert any(d["file"].endswith("more.zip!zipped/dup.png") for d in report["dropped"]["exact_duplicate"])
    assert "near.png" in dropped_files(report, "near_duplicate")
    assert dropped_files(report, "blank") == ["blank.png"]
    assert [Path(f["file"]).name for f in report["failed"] if "extra" in f["file"]] == ["corrupt.jpg"]
    # every real image kept once; every DICOM accounted for (kept, dropped or failed)
    assert report["counts"]["source"]["real"] == len(picked)
    reported = {Path(d["file"]).name for v in report["dropped"].values() for d in v}
    reported |= {Path(f["file"]).name for f in report["failed"]}
    dicoms = sorted(p.name for p in dicom_dir.glob("*.dcm"))
    kept_dicom = report["counts"]["modality"].get("dicom", 0)
    assert kept_dicom >= 5
    for name in ("OBXXXX1A_2frame.dcm", "OBXXXX1A_rle.dcm", "gdcm-US-ALOKA-16_big.dcm"):
        assert name in exact  # the same pixels in another encoding
    assert set(dicoms) - reported, "some DICOM must have been kept"
    assert kept_units == len(all_items(datalist)) == len(os.listdir(out / "images"))
