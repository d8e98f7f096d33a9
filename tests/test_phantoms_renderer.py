"""Tests of the synthetic ultrasound phantoms and the demo-data writer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from echocare.phantoms.renderer import (
    LABEL_NAMES,
    PRETRAIN_ANATOMIES,
    _speckle,
    coarsen_anatomy,
    make_canvas,
    make_phantom_image,
    render_bmode,
)
from echocare.phantoms import generate_demo_data


def _homogeneous(geometry: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A field of plain soft tissue (no texture), rendered; returns (image, fov)."""
    rng = np.random.default_rng(seed)
    canvas = make_canvas(rng, 256, geometry)
    canvas.texture = 0.0
    return render_bmode(canvas, rng).astype(np.float64), canvas.fov


def _ancestors(path: str) -> set[str]:
    parts = path.split("/")
    return {"/".join(parts[:k]) for k in range(1, len(parts) + 1)}


def test_image_types_and_shapes():
    for organ in PRETRAIN_ANATOMIES:
        image, label = make_phantom_image(np.random.default_rng(1), 128, organ=organ)
        assert image.shape == label.shape == (128, 128)
        assert image.dtype == np.uint8 and label.dtype == np.uint8
        assert set(np.unique(label)) <= set(LABEL_NAMES)
        assert 40 < image.mean() < 200, organ  # neither blank nor saturated


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sector_black_outside_fan_and_filled_inside(seed):
    image, fov = _homogeneous("sector", seed)
    assert 0.3 < fov.mean() < 0.95  # a fan, not the whole square
    assert image[~fov].max() == 0
    assert (image[fov] > 0).mean() > 0.97
    assert image[fov].mean() > 60
    # The apex is above the top edge: the top corners are outside the fan.
    assert not fov[0, 0] and not fov[0, -1]
    # Same through the public entry point, whose anatomies use sector probes.
    image, _ = make_phantom_image(np.random.default_rng(seed), organ="abdomen/liver")
    assert image[:8, :8].max() == 0 and image[:8, -8:].max() == 0
    assert image[100:140, 118:138].mean() > 30


def test_linear_fills_the_rectangle():
    image, fov = _homogeneous("linear", 0)
    assert fov.all()
    assert (image > 0).mean() > 0.97


@pytest.mark.parametrize("geometry", ["sector", "linear"])
def test_mean_intensity_falls_with_depth(geometry):
    for seed in range(3):
        image, fov = _homogeneous(geometry, seed)
        rows = [image[a:b][fov[a:b]].mean() for a, b in ((20, 60), (100, 140), (190, 230))]
        assert rows[0] > rows[1] > rows[2], rows
        assert rows[0] - rows[2] > 15  # visibly darker, not noise


def test_speckle_statistics():
    # Envelope: magnitude of a complex Gaussian is Rayleigh, CV = sqrt(4/pi - 1) = 0.523.
    env = _speckle(np.random.default_rng(0), (256, 256), (1.0, 2.5))
    cv_env = env.std() / env.mean()
    assert abs(cv_env - math.sqrt(4 / math.pi - 1)) < 0.03
    assert abs(np.mean(env**2) - 1.0) < 1e-3  # unit mean power
    # After log compression to 8 bits, a homogeneous tissue patch keeps a granular
    # texture: this model gives CV ~0.25-0.33 at mid-depth (real B-mode liver ~0.2-0.4).
    cvs = []
    for seed in range(4):
        image, _ = _homogeneous("linear", seed)
        patch = image[110:150, 100:160]
        cvs.append(patch.std() / patch.mean())
    assert all(0.18 < cv < 0.42 for cv in cvs), cvs
    # Speckle grains are longer laterally than axially (resolution cell).
    image, _ = _homogeneous("linear", 5)
    p = image[100:160, 60:200] - image[100:160, 60:200].mean()
    ax = np.mean(p[1:] * p[:-1]) / p.var()
    lat = np.mean(p[:, 1:] * p[:, :-1]) / p.var()
    assert lat > ax + 0.1, (ax, lat)


@pytest.mark.parametrize("organ", ["pelvis/bladder", "head & neck/carotid artery", "thorax/heart/apical four-chamber"])
def test_anechoic_structures_darker_than_surroundings(organ):
    for seed in range(3):
        image, label = make_phantom_image(np.random.default_rng(seed), organ=organ)
        fluid = label == 1
        assert fluid.sum() > 200
        inner = ndimage.binary_erosion(fluid, iterations=3)
        around = ndimage.binary_dilation(fluid, iterations=10) & ~ndimage.binary_dilation(fluid, iterations=5)
        around &= (label == 0) | (label == 3)
        around &= image > 0
        assert image[inner].mean() < 40  # near black; deep fluid picks up some TGC gain
        assert image[around].mean() > image[inner].mean() + 50


def test_posterior_enhancement_below_bladder():
    image, label = make_phantom_image(np.random.default_rng(3), organ="pelvis/bladder")
    rows = np.nonzero((label == 1).any(axis=1))[0]
    cols = np.nonzero((label == 1).any(axis=0))[0]
    mid = slice(int(np.percentile(cols, 35)), int(np.percentile(cols, 65)))
    side = slice(int(np.percentile(cols, 0)) - 40, int(np.percentile(cols, 0)) - 10)
    below = slice(rows.max() + 8, rows.max() + 30)
    behind = image[below, mid]
    beside = image[below, side]
    beside = beside[beside > 0]
    if beside.size > 50:  # the side strip may leave a narrow fan
        assert behind.mean() > beside.mean() + 10


def test_determinism_by_seed():
    for organ in ("abdomen/kidney", "other"):
        a = make_phantom_image(np.random.default_rng(7), organ=organ)
        b = make_phantom_image(np.random.default_rng(7), organ=organ)
        c = make_phantom_image(np.random.default_rng(8), organ=organ)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        assert not np.array_equal(a[0], c[0])


def test_geometry_override_and_ancestor_and_errors():
    image, _ = make_phantom_image(np.random.default_rng(0), organ="abdomen/liver", geometry="linear")
    assert image[:8, :8].min() > 0 or image[:8, :8].mean() > 20  # no black corner
    image, _ = make_phantom_image(np.random.default_rng(0), organ="thorax/heart")
    assert image.shape == (256, 256)
    with pytest.raises(ValueError):
        make_phantom_image(np.random.default_rng(0), organ="upper limb/elbow")
    with pytest.raises(ValueError):
        make_canvas(np.random.default_rng(0), 64, "curved")


def test_coarsen_anatomy():
    assert coarsen_anatomy("thorax/heart/apical four-chamber") == "thorax/heart"
    assert coarsen_anatomy("thorax/heart/apical four-chamber", 2) == "thorax"
    assert coarsen_anatomy("abdomen/liver") == "abdomen"
    assert coarsen_anatomy("other") is None


def test_anatomies_are_separable_by_simple_features():
    """Mean grey level and dark fraction inside the field of view separate bladder from
    liver phantoms (an anatomy classifier has something to learn)."""

    def features(organ):
        out = []
        for seed in range(12):
            image, _ = make_phantom_image(np.random.default_rng(100 + seed), organ=organ)
            fov = ndimage.binary_fill_holes(image > 0)  # anechoic pixels are inside too
            out.append(((image[fov] < 25).mean(), image[fov].mean()))
        return np.array(out)

    liver, bladder = features("abdomen/liver"), features("pelvis/bladder")
    assert bladder[:, 0].mean() > 3 * liver[:, 0].mean()
    assert bladder[:, 0].min() > np.median(liver[:, 0])
    # The linear neck and breast scenes fill the square, the sector ones do not.
    thyroid = make_phantom_image(np.random.default_rng(0), organ="head & neck/thyroid")[0]
    heart = make_phantom_image(np.random.default_rng(0), organ="thorax/heart/apical four-chamber")[0]
    assert (thyroid[:, :4] > 0).mean() > 0.9 and (heart[:, :4] > 0).mean() < 0.5


def test_generate_demo_data_pretrain(tmp_path):
    path = generate_demo_data("pretrain", tmp_path / "demo", n=20, seed=3)
    assert path == tmp_path / "demo" / "datalist.json"
    data = json.loads(path.read_text())
    assert data["training"] and data["validation"]
    items = data["training"] + data["validation"]
    assert len(items) == 20 and len(data["validation"]) == 4
    allowed = set().union(*(_ancestors(p) for p in PRETRAIN_ANATOMIES))
    for item in items:
        assert not item["image"].startswith("/")
        file = tmp_path / "demo" / item["image"]
        assert file.is_file()
        with Image.open(file) as im:
            assert im.mode == "L" and im.size == (256, 256)
            assert np.asarray(im).max() > 0
        if "anatomy" in item:
            assert item["anatomy"] in allowed
    assert len(list((tmp_path / "demo" / "images").glob("*.png"))) == 20
    anatomies = {item.get("anatomy") for item in items}
    assert len(anatomies - {None}) >= 6  # balanced over the covered anatomies


def test_generate_demo_data_partial_labels(tmp_path):
    path = generate_demo_data("pretrain", tmp_path, n=60, seed=0, image_size=64)
    items = [i for split in json.loads(path.read_text()).values() for i in split]
    unlabelled = sum("anatomy" not in i for i in items)
    coarse = sum(i.get("anatomy") in {"thorax/heart", "abdomen", "thorax", "head & neck"} for i in items)
    assert 1 <= unlabelled <= 15
    assert coarse >= 2


def test_generate_demo_data_deterministic(tmp_path):
    a = generate_demo_data("pretrain", tmp_path / "a", n=6, seed=5, image_size=64)
    b = generate_demo_data("pretrain", tmp_path / "b", n=6, seed=5, image_size=64)
    c = generate_demo_data("pretrain", tmp_path / "c", n=6, seed=6, image_size=64)
    assert a.read_text() == b.read_text()
    name = "images/pretrain_0003.png"
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


def test_generate_demo_data_sizes_option(tmp_path):
    path = generate_demo_data("pretrain", tmp_path, n=6, seed=1, sizes=[64, 96])
    items = [i for split in json.loads(path.read_text()).values() for i in split]
    sizes = {Image.open(tmp_path / i["image"]).size for i in items}
    assert sizes <= {(64, 64), (96, 96)}


def test_unknown_task(tmp_path):
    with pytest.raises(ValueError, match="pretrain"):
        generate_demo_data("no-such-task", tmp_path)
