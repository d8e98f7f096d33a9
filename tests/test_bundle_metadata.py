"""MONAI's own bundle checks at their defaults: ``verify_metadata`` on every bundle and
``verify_net_in_out`` (tiny network, CPU, MONAI's default ``n=1``: 32x32 images) on the bundles
whose metadata describes an image input (#18).

The same as ``python -m monai.bundle verify_net_in_out network_def --meta_file
bundles/NAME/configs/metadata.json --config_file bundles/NAME/configs/inference.yaml
--network_size tiny --device cpu`` from the repository root, run in-process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from monai.bundle import verify_metadata, verify_net_in_out

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "bundles"
SCHEMA = BUNDLES / "metadata_schema.json"

#: Bundles MONAI's verify_net_in_out is run on (their input is one image or one clip tensor).
NET_IN_OUT = ("ddti_seg", "musv_seg", "abdomen_seg", "busbra_cls", "fll_cls", "thyroid_cls",
              "brain_landmark", "usenhance")
CLIP_BUNDLES = ("fll_cls", "thyroid_cls")
ALL_BUNDLES = sorted(p.parent.parent.name for p in BUNDLES.glob("*/configs/metadata.json"))


def _files(name: str) -> tuple[str, str]:
    configs = BUNDLES / name / "configs"
    return str(configs / "metadata.json"), str(configs / "inference.yaml")


def test_every_bundle_is_listed() -> None:
    folders = {p.name for p in BUNDLES.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))}
    assert set(ALL_BUNDLES) == folders and set(NET_IN_OUT) <= folders and "echocare_pretrain" in folders


@pytest.mark.parametrize("name", ALL_BUNDLES)
def test_verify_metadata(name: str) -> None:
    meta_file, _ = _files(name)
    verify_metadata(meta_file=meta_file, filepath=str(SCHEMA))  # raises ValueError on a schema violation


@pytest.mark.parametrize("name", NET_IN_OUT)
def test_verify_net_in_out_at_defaults(name: str) -> None:
    meta_file, config_file = _files(name)
    # Raises when the network fails on MONAI's fake input or its output's channels or dtype
    # differ from the metadata's.
    verify_net_in_out(net_id="network_def", meta_file=meta_file, config_file=config_file,
                      device="cpu", network_size="tiny")


@pytest.mark.parametrize("name", CLIP_BUNDLES)
def test_clip_metadata_describes_the_clip_tensor(name: str) -> None:
    from monai.bundle.scripts import _get_fake_spatial_shape  # the shape MONAI builds its fake input from
    from monai.bundle import ConfigParser

    meta_file, config_file = _files(name)
    image = json.loads(Path(meta_file).read_text())["network_data_format"]["inputs"]["image"]
    frames = ConfigParser.load_config_file(config_file)["clip_frames"]
    # (B, F, 3, H, W): MONAI's channel place holds the default frame count, then RGB, then 32*n.
    assert image["num_channels"] == frames == 8
    assert _get_fake_spatial_shape(image["spatial_shape"], n=1) == (3, 32, 32)
    assert _get_fake_spatial_shape(image["spatial_shape"], n=4) == (3, 128, 128)
    assert len(image["channel_def"]) == frames


def test_verify_net_in_out_refuses_a_frame_variable(tmp_path: Path) -> None:
    """The clip form before #18, refused: MONAI allows only the variables p and n."""
    meta_file, config_file = _files("fll_cls")
    meta = json.loads(Path(meta_file).read_text())
    meta["network_data_format"]["inputs"]["image"]["spatial_shape"] = ["F", "32*n", "32*n"]
    old = tmp_path / "metadata.json"
    old.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="Only variables `p` and `n` currently supported"):
        verify_net_in_out(net_id="network_def", meta_file=str(old), config_file=config_file,
                          device="cpu", network_size="tiny")


def test_verify_net_in_out_fails_with_plain_instance_norms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the decoder's single-pixel norm, the 1x1 bottleneck of a 32x32 input fails MONAI's check."""
    import echocare.networks.decoders as decoders

    monkeypatch.setattr(decoders, "accept_single_pixel_maps", lambda module: module)
    meta_file, config_file = _files("ddti_seg")
    with pytest.raises(ValueError, match="Expected more than 1 spatial element"):
        verify_net_in_out(net_id="network_def", meta_file=meta_file, config_file=config_file,
                          device="cpu", network_size="tiny")
