"""Benchmark datalist converters: real data (skips when absent) and layout fixtures."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from echocare.datasets.converters import (
    DATALIST_CONVERTERS,
    DatasetLayoutError,
    convert_datalist,
    fit_ellipse,
    ramanujan_perimeter,
)
from fixtures_datalists import (
    make_abdomen,
    make_brain_landmark,
    make_camus,
    make_ddti_original,
    make_focus,
    make_fll_ceus,
    make_hc18_official,
    make_paired,
    make_thyroid_cine,
    make_usenhance,
    make_usreport,
)


def _all(d):
    return d["training"] + d["validation"] + d.get("test", [])


def _cases(items):
    return {it["case"] for it in items}


def _assert_files_exist(d, root, keys=("image", "label", "mask", "target", "ed_label", "es_label")):
    for it in _all(d):
        for k in keys:
            if isinstance(it.get(k), str):
                assert (root / it[k]).exists(), (k, it[k])
        for p in it.get("images", []):
            assert (root / p).exists(), p


def _assert_grouped(d):
    parts = [_cases(d[k]) for k in ("training", "validation", "test") if k in d]
    for i in range(len(parts)):
        for j in range(i + 1, len(parts)):
            assert not parts[i] & parts[j]
    assert all("case" in it for it in _all(d))


# ----------------------------------------------------------------------------- real data


def test_busbra_fold2_real(real_data_dir, tmp_path):
    root = real_data_dir / "busbra"
    out = tmp_path / "busbra.json"
    d = convert_datalist("busbra", root, out=out, fold=2)
    assert json.loads(out.read_text()) == d
    with open(root / "5-fold-cv.csv") as f:
        kfold = {r["ID"]: int(r["kFold"]) for r in csv.DictReader(f)}
    n_images = len(list((root / "Images").glob("*.png")))
    expected_val = sum(1 for i, k in kfold.items() if k == 2 and (root / "Images" / f"{i}.png").exists())
    assert len(d["validation"]) == expected_val > 0
    assert len(d["training"]) + len(d["validation"]) == n_images
    assert all(kfold[(root / it["image"]).stem] == 2 for it in d["validation"])
    assert all(kfold[(root / it["image"]).stem] != 2 for it in d["training"])
    assert {it["label"] for it in _all(d)} <= {0, 1, 2, 3}
    assert {it["pathology"] for it in _all(d)} <= {"benign", "malignant"}
    _assert_files_exist(d, root)
    _assert_grouped(d)  # the official folds are patient-level
    with pytest.raises(DatasetLayoutError, match="kFold 5"):
        convert_datalist("busbra", root, fold=5)


@pytest.mark.parametrize("name", ["ddti", "carotid"])
def test_grouped_real(real_data_dir, name):
    root = real_data_dir / name
    d = convert_datalist(name, root, seed=0)
    assert d["training"] and d["validation"]
    _assert_grouped(d)
    _assert_files_exist(d, root)
    assert d == convert_datalist(name, root, seed=0)  # deterministic
    if name == "ddti":
        n_cases = len(_cases(_all(d)))
        assert len(_cases(d["validation"])) == round(0.2 * n_cases)
        assert convert_datalist(name, root, seed=1)["validation"] != d["validation"]
    else:
        assert {it["case"] for it in _all(d)} == {p.stem.split("_slice")[0] for p in (root / "images").glob("*.png")}


def test_hc18_real_circumference(real_data_dir):
    root = real_data_dir / "hc18"
    d = convert_datalist("hc18", root)
    items = _all(d)
    assert len(items) == len(list((root / "images").glob("*.png")))
    _assert_grouped(d)
    _assert_files_exist(d, root)
    rel = np.array([it["hc_fit_mm"] / it["value"] - 1 for it in items])
    assert np.all(np.abs(rel) < 0.03), rel
    for it in items:
        cx, cy, a, b, ang = it["ellipses"][0]
        assert a >= b > 0 and -90 <= ang < 90 and it["classes"] == [0]
        assert len(it["landmarks"]) == 4 and it["spacing"][0] > 0


# ----------------------------------------------------------------------------- fixtures


def test_fit_ellipse_synthetic():
    from skimage.draw import ellipse

    m = np.zeros((300, 400), bool)
    rr, cc = ellipse(150, 200, 60, 110, shape=m.shape, rotation=np.radians(-30))  # rotation is (row, col)
    m[rr, cc] = True
    cx, cy, a, b, ang = fit_ellipse(m)
    assert abs(cx - 200) < 1 and abs(cy - 150) < 1
    assert abs(a - 110) < 1.5 and abs(b - 60) < 1.5
    # skimage's rotation turns the col axis towards -row: the major axis (along cols) ends
    # up at +30 deg from +x towards +y (y down)
    assert abs(ang - 30) < 1


def test_hc18_official_layout(tmp_path):
    root, truth = make_hc18_official(tmp_path / "hc18")
    out = tmp_path / "lists" / "hc18.json"
    d = convert_datalist("hc18", root, out=out)
    items = _all(d)
    assert len(items) == 5
    _assert_files_exist(d, root)
    assert (tmp_path / "lists" / "hc18_masks" / "001_HC_Mask.png").exists()
    assert {it["case"] for it in items} == {"001", "002", "003", "004"}
    _assert_grouped(d)  # 001_HC and 001_2HC stay together
    for it in items:
        name = it["image"].split("/")[-1][:-4]
        cx, cy, a, b, ang, ps, hc = truth[name]
        fx, fy, fa, fb, fang = it["ellipses"][0]
        assert abs(fx - cx) < 1.5 and abs(fy - cy) < 1.5
        assert abs(fa - a) < 2.5 and abs(fb - b) < 2.5
        if a - b > 5:
            assert abs(((fang - ang) + 90) % 180 - 90) < 2
        assert abs(it["hc_fit_mm"] / it["value"] - 1) < 0.03
        assert it["annotation"].endswith("_Annotation.png")
    d2 = convert_datalist("hc18", root)  # without out: no masks written, no label
    assert all("label" not in it for it in _all(d2))


def test_camus_fixture(tmp_path):
    root = make_camus(tmp_path / "CAMUS_public")
    d = convert_datalist("camus", root)
    assert [len(d[k]) for k in ("training", "validation", "test")] == [6, 2, 2]
    assert _cases(d["test"]) == {"patient0005"}
    _assert_grouped(d)
    _assert_files_exist(d, root)
    it = next(i for i in d["training"] if i["case"] == "patient0002" and i["view"] == "4CH")
    assert it["image"] == "database_nifti/patient0002/patient0002_4CH_half_sequence.nii.gz"
    assert it["ef"] == 42.0 and it["ed_frame"] == 0 and it["es_frame"] == 7  # cfg ES 8, 1-based
    assert it["ed_label"].endswith("_4CH_ED_gt.nii.gz")
    # without the official split: 8:2 by patient
    root2 = make_camus(tmp_path / "nosplit", with_split=False)
    d2 = convert_datalist("camus", root2 / "database_nifti", seed=3)
    assert len(_cases(d2["validation"])) == 1 and "test" not in d2
    _assert_grouped(d2)


def test_musv_fixture(tmp_path):
    root = make_paired(tmp_path / "musv", [f"s{i}_{k}" for i in range(5) for k in range(3)])
    d = convert_datalist("musv", root, seed=0)
    assert len(_all(d)) == 15 and len(_cases(d["validation"])) == 1
    _assert_grouped(d)
    _assert_files_exist(d, root)
    assert d["class_names"] == ["background", "artery", "vein"]


def test_abdomen_fixture(tmp_path):
    root = make_abdomen(tmp_path / "abd")
    d = convert_datalist("abdomen", root)
    assert len(_all(d)) == 10 and _cases(_all(d)) == {f"P{i}" for i in range(5)}
    _assert_grouped(d)
    _assert_files_exist(d, root)
    (root / "images" / "extra.png").write_bytes((root / "images" / "img00.png").read_bytes())
    with pytest.raises(DatasetLayoutError, match="no row for extra.png"):
        convert_datalist("abdomen", root)


def test_thyroid_cine_fixture(tmp_path):
    root = make_thyroid_cine(tmp_path / "aimi")
    d = convert_datalist("thyroid_cine", root)
    items = _all(d)
    assert d["skipped"] == ["106_"]
    labels = {it["case"]: it["label"] for it in items}
    assert labels == {"10": 0, "14": 1, "103": 1, "104": 0}
    _assert_grouped(d)
    import h5py

    with h5py.File(root / "dataset.hdf5") as f:
        fn = f["frame_num"][()]
        for it in items:
            assert list(fn[it["rows"]]) == sorted(fn[it["rows"]])
    out = tmp_path / "lists" / "thyroid.json"
    d2 = convert_datalist("thyroid_cine", root, out=out)
    _assert_files_exist(d2, root)
    from PIL import Image

    it = next(i for i in _all(d2) if i["case"] == "14")
    with Image.open(root / it["image"]) as im:
        assert im.n_frames == 4
        with h5py.File(root / "dataset.hdf5") as f:
            im.seek(0)
            assert np.array_equal(np.asarray(im), f["image"][it["rows"][0]])


def test_fll_ceus_fixture(tmp_path):
    root = make_fll_ceus(tmp_path / "fll")
    d = convert_datalist("fll_ceus", root)
    items = _all(d)
    assert len(items) == 8
    assert sorted(it["label"] for it in items) == [0, 0, 0, 1, 1, 1, 2, 2]
    assert any(it["image"] == "HEM/p08_clip.mp4" for it in items)
    _assert_grouped(d)
    _assert_files_exist(d, root)


@pytest.mark.parametrize("splits", [True, False])
def test_focus_fixture(tmp_path, splits):
    root = make_focus(tmp_path / "focus", splits=splits)
    d = convert_datalist("focus", root)
    if splits:
        assert [len(d[k]) for k in ("training", "validation", "test")] == [3, 1, 1]
    else:
        assert len(d["validation"]) == 2 and "test" not in d
    _assert_grouped(d)
    _assert_files_exist(d, root)
    it = _all(d)[0]
    assert it["classes"] == [0, 1] and it["ellipses"][1] == [95.0, 75.0, 30.0, 20.0, -35.0]
    assert math.isclose(it["ctr"], ramanujan_perimeter(30, 20) / ramanujan_perimeter(60, 50), rel_tol=1e-3)


def test_brain_landmark_fixture(tmp_path):
    root = make_brain_landmark(tmp_path / "brain")
    d = convert_datalist("brain_landmark", root)
    items = _all(d)
    assert len(items) == 6 and all(len(it["landmarks"]) == 24 for it in items)
    it = next(i for i in items if i["image"] == "images/s01_plane.png")
    assert it["landmarks"][0] == [1.5, 3.0] and it["landmarks"][23] == [24.5, 49.0]
    assert _cases(items) == {"S0", "S1", "S2"}
    _assert_grouped(d)


def test_usenhance_fixture(tmp_path):
    root = make_usenhance(tmp_path / "usenhance")
    d = convert_datalist("usenhance", root)
    assert len(d["training"]) + len(d["validation"]) == 10 and len(d["validation"]) == 2
    assert len(d["test"]) == 2 and all("target" not in it for it in d["test"])
    it = d["training"][0]
    assert it["image"].replace("low_quality", "high_quality") == it["target"]
    _assert_grouped(d)
    _assert_files_exist(d, root)


def test_usreport_fixture(tmp_path):
    root = make_usreport(tmp_path / "usreport")
    d = convert_datalist("usreport", root)
    assert [len(d[k]) for k in ("training", "validation", "test")] == [4, 1, 1]
    it = d["training"][0]
    assert it["images"] == ["images/000/0.png", "images/000/1.png"] and it["report"].startswith("The liver")
    _assert_grouped(d)
    _assert_files_exist(d, root)


def test_ddti_original_layout(tmp_path):
    root = make_ddti_original(tmp_path / "ddti_xml")
    out = tmp_path / "lists" / "ddti.json"
    d = convert_datalist("ddti", root, out=out)
    items = _all(d)
    assert len(items) == 10 and len(_cases(d["validation"])) == 1
    _assert_grouped(d)
    _assert_files_exist(d, root)
    from PIL import Image

    it = next(i for i in items if i["image"] == "1_1.jpg")
    m = np.asarray(Image.open(root / it["label"]))
    assert m.shape == (90, 120) and set(np.unique(m)) == {0, 255} and m[40, 50] == 255 and m[5, 5] == 0
    assert it["tirads"] == "4a" and it["suspicious"] == 1
    assert next(i for i in items if i["case"] == "2")["suspicious"] == 0


# ----------------------------------------------------------------------------- wrong folders


@pytest.mark.parametrize("name", sorted(DATALIST_CONVERTERS))
def test_wrong_folder(tmp_path, name):
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "readme.txt").write_text("not a dataset")
    with pytest.raises(DatasetLayoutError) as e:
        convert_datalist(name, wrong)
    msg = str(e.value)
    assert str(wrong) in msg and "expected" in msg and "readme.txt" in msg
    with pytest.raises(DatasetLayoutError, match="no such folder"):
        convert_datalist(name, tmp_path / "missing")


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown datalist"):
        convert_datalist("nope", ".")
