"""The enhancement bundle (``usenhance``): network, loss, data, phantom, and the bundle end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bundle_helpers import REPO, bundles_in_one_process, mlflow_runs
from echocare.phantoms import generate_demo_data
from echocare.datasets.datalist import DatalistError
from echocare.tasks.enhancement.degradation import Degraded
from echocare.tasks.enhancement.data import load_enhancement_datalist
from echocare.tasks.enhancement import image_quality as iq
from echocare.tasks.supervised import EchoCareSegNet
from echocare.networks import build_encoder, configure_finetuning, initialise_network, save_encoder_weights
from echocare.tasks.enhancement.network import EchoCareEnhanceNet, EnhancementLoss, PatchDiscriminator

SMALL = ["--network_size", "tiny", "--image_size", "64", "--batch_size", "4", "--num_workers", "0", "--progress_bar", "False"]


def configs(*files: str) -> str:
    paths = [str(REPO / "bundles" / "usenhance" / "configs" / f) for f in files]
    return paths[0] if len(paths) == 1 else repr(paths)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("usenhance_phantom")
    generate_demo_data("usenhance", out, n=16, seed=0, image_size=64, val_fraction=0.25)
    return out


# ----------------------------------------------------------------------------- network and loss


def test_network_starts_as_identity_with_the_segmentation_layout(tmp_path) -> None:
    torch.manual_seed(0)
    net = EchoCareEnhanceNet("tiny")
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(net(x), x.mean(1, keepdim=True))  # zero last layer: the trivial baseline
    seg = EchoCareSegNet("tiny", out_channels=1)
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in seg.state_dict().items()}
    encoder = build_encoder("tiny")
    save_encoder_weights(encoder, tmp_path / "enc.pt")
    started = initialise_network(EchoCareEnhanceNet("tiny"), tmp_path / "enc.pt")
    assert torch.equal(started.encoder.layers1[0].blocks[0].attn.qkv.weight, encoder.layers1[0].blocks[0].attn.qkv.weight)
    groups = configure_finetuning(started, "frozen", head_lr=1e-3)
    trainable = {id(p) for g in groups for p in g["params"]}
    assert trainable == {id(p) for p in started.decoder.parameters()}


def test_loss_terms_by_hand() -> None:
    torch.manual_seed(0)
    target = torch.rand(2, 3, 64, 64)
    pred = target.mean(1, keepdim=True) + 0.05 * torch.randn(2, 1, 64, 64)
    loss = EnhancementLoss(l1_weight=2.0, ssim_weight=0.5)
    grey = target.mean(1, keepdim=True)
    expected = 2.0 * (pred - grey).abs().mean() + 0.5 * (1 - float(iq.ssim(pred, grey).mean()))
    assert float(loss(pred, target)) == pytest.approx(float(expected), rel=1e-4)
    assert float(loss(grey, target)) == pytest.approx(0.0, abs=1e-5)
    perceptual = EnhancementLoss(ssim_weight=0.0, perceptual_weight=1.0, perceptual_encoder=build_encoder("tiny"))
    assert float(perceptual(grey, target)) == pytest.approx(0.0, abs=1e-6)
    assert float(perceptual(pred, target)) > float(EnhancementLoss(ssim_weight=0.0)(pred, target))
    with pytest.raises(ValueError, match="needs a perceptual_encoder"):
        EnhancementLoss(perceptual_weight=1.0)


def test_adversarial_step_trains_generator_and_discriminator() -> None:
    from monai.engines import SupervisedTrainer

    from echocare.tasks.enhancement.engine import EnhancementIteration, prepare_pair

    torch.manual_seed(0)
    net, disc = EchoCareEnhanceNet("tiny"), PatchDiscriminator()
    before = [p.detach().clone() for p in disc.parameters()]
    data = [{"image": torch.rand(2, 3, 64, 64), "target": torch.rand(2, 3, 64, 64)} for _ in range(2)]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=data, network=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-3), loss_function=EnhancementLoss(), prepare_batch=prepare_pair,
        iteration_update=EnhancementIteration(disc, torch.optim.Adam(disc.parameters(), 1e-3), adversarial_weight=0.1),
    )
    trainer.run()
    assert trainer.state.iteration == 2 and np.isfinite(float(trainer.state.output["loss"]))
    assert float(trainer.state.output["discriminator_loss"]) > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, disc.parameters()))
    assert not torch.equal(net(data[0]["image"]), data[0]["image"].mean(1, keepdim=True))  # left the identity


# ----------------------------------------------------------------------------- data


def test_phantom_writes_the_usenhance_layout(phantom) -> None:
    from echocare.datasets.converters import convert_datalist

    lists = json.loads((phantom / "datalist.json").read_text())
    assert len(lists["training"]) == 12 and len(lists["validation"]) == 4
    item = lists["training"][0]
    assert item["image"].startswith("usenhance/train_datasets/") and "/low_quality/" in item["image"]
    assert item["target"] == item["image"].replace("/low_quality/", "/high_quality/")
    low, high = (np.asarray(Image.open(phantom / item[k]), dtype=np.float64) / 255 for k in ("image", "target"))
    assert low.shape == high.shape == (64, 64)
    assert 5 < iq.psnr(low, high)[0] < 30  # degraded, but the same scene
    # the official converter reads what the phantom wrote
    converted = convert_datalist("usenhance", phantom / "usenhance")
    assert len(converted["training"]) + len(converted["validation"]) == 16


def test_datalist_checks_name_the_files(tmp_path) -> None:
    Image.fromarray(np.zeros((32, 40), np.uint8)).save(tmp_path / "low.png")
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "high.png")
    (tmp_path / "d.json").write_text(json.dumps({
        "training": [{"image": "low.png", "target": "high.png"}, {"image": "low.png"}],
        "validation": [{"image": "low.png", "target": "gone.png"}],
    }))
    with pytest.raises(DatalistError, match="item 1 .*low.png.*no 'target'"):
        load_enhancement_datalist(tmp_path / "d.json", "training")
    with pytest.raises(DatalistError, match="gone.png not found"):
        load_enhancement_datalist(tmp_path / "d.json", "validation")
    (tmp_path / "e.json").write_text(json.dumps({"training": [{"image": "low.png", "target": "high.png"}]}))
    with pytest.raises(DatalistError, match="32x40 pixels but its target .*high.png is 32x32"):
        load_enhancement_datalist(tmp_path / "e.json", "training")
    unpaired = load_enhancement_datalist(tmp_path / "e.json", "training", paired=False)
    assert unpaired == [{"target": str(tmp_path / "low.png"), "case": str(tmp_path / "low.png")}]


def test_degraded_transform_is_fixed_per_file_in_validation() -> None:
    from monai.data import MetaTensor

    def item(name: str) -> dict:
        return {"target": MetaTensor(torch.full((3, 32, 32), 0.6), meta={"filename_or_obj": name})}

    fixed = Degraded(fixed=True, seed=3)
    a, b, c = fixed(item("a.png"))["image"], fixed(item("a.png"))["image"], fixed(item("b.png"))["image"]
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (3, 32, 32)
    assert float(a.mean()) < 0.6 * 0.86  # the gain range's neutral end is 0.85
    rand = Degraded().set_random_state(0)
    assert not torch.equal(rand(item("a.png"))["image"], rand(item("a.png"))["image"])


# ----------------------------------------------------------------------------- the bundle


def test_evaluation_keeps_the_degradation_of_the_variant(tmp_path) -> None:
    """evaluate.yaml, merged last, must not reset the degraded variant's ranges (its validation
    images and BRISQUE's levels would then be degraded by other ranges than training's)."""
    from monai.bundle import ConfigParser

    def ranges(*files: str) -> object:
        parser = ConfigParser()
        parser.read_config([str(REPO / "bundles" / "usenhance" / "configs" / f) if "/" not in f else f for f in files])
        assert parser["quality_models"]["degradation_ranges"] == "@degradation_ranges"
        return parser["degradation_ranges"]

    stronger = tmp_path / "stronger.yaml"
    stronger.write_text("degradation_ranges:\n  speckle: [0.2, 0.9]\n")
    degraded = {"downscale": [0.7, 0.35], "blur_sigma": [0.5, 2.0], "speckle": [0.15, 0.5], "gain": [0.85, 0.55]}
    assert ranges("train.yaml", "evaluate.yaml") == {}
    assert ranges("train.yaml", "degraded.yaml", "evaluate.yaml") == degraded
    assert ranges("train.yaml", "degraded.yaml", str(stronger), "evaluate.yaml") == {"speckle": [0.2, 0.9]}


@pytest.mark.slow
@pytest.mark.e2e
def test_bundle_trains_evaluates_infers_and_beats_identity(phantom, tmp_path) -> None:
    common = [*SMALL, "--dataset_dir", str(phantom), "--datalist", str(phantom / "datalist.json"), "--output_dir", str(tmp_path)]
    bundles_in_one_process(
        ["training", "--config_file", configs("train.yaml"), *common, "--max_epochs", "3",
         "--tracking", "mlflow", "--run_name", "enh_train"],
        ["evaluating", "--config_file", configs("train.yaml", "evaluate.yaml"), *common, "--num_pictures", "2",
         "--tracking", "mlflow", "--run_name", "enh_eval"],
        ["inferring", "--config_file", configs("inference.yaml"), "--input_dir", str(phantom / "datalist.json"),
         "--dataset_dir", str(phantom), "--output_dir", str(tmp_path), *SMALL[:4], "--num_workers", "0"],
    )
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    for name in ("psnr", "ssim", "niqe", "brisque", "piqe", "fid_echocare"):
        assert np.isfinite(summary[name]) and np.isfinite(summary[f"identity_{name}"])
    # the trained model beats the trivial baseline (output = the low-quality input)
    assert summary["psnr"] > summary["identity_psnr"] + 0.5
    assert 0 <= summary["piqe"] <= 100 and summary["target_niqe"] < summary["identity_niqe"]
    per_case = (tmp_path / "eval" / "per_case.csv").read_text().splitlines()
    assert len(per_case) == 1 + 4 and per_case[0].startswith("image,case,psnr,ssim,niqe")
    assert len(list((tmp_path / "eval" / "pictures").glob("*.png"))) == 2
    assert iq.load_niqe_model(tmp_path / "eval" / "niqe_model.npz").patch_size == 32

    client, runs = mlflow_runs(tmp_path / "mlruns.db")
    by_name = {r.info.run_name: r for r in runs}
    assert len(client.get_metric_history(by_name["enh_train"].info.run_id, "psnr")) == 3
    eval_metrics = by_name["enh_eval"].data.metrics
    assert eval_metrics["niqe"] == pytest.approx(summary["niqe"]) and "identity_fid_echocare" in eval_metrics
    artifacts = {a.path for a in client.list_artifacts(by_name["enh_eval"].info.run_id, "eval")}
    assert {"eval/summary.json", "eval/per_case.csv", "eval/pictures"} <= artifacts

    predictions = json.loads((tmp_path / "predictions" / "predictions.json").read_text())
    assert len(predictions) == 4
    enhanced = Image.open(predictions[0]["enhanced_png"])
    source = Image.open(predictions[0]["image"])
    assert enhanced.size == source.size and enhanced.mode == "L"


@pytest.mark.slow
@pytest.mark.e2e
def test_real_data_variant_runs(real_data_dir: Path, tmp_path: Path) -> None:
    common = [*SMALL, "--dataset_dir", str(real_data_dir), "--output_dir", str(tmp_path),
              "--max_training_per_dataset", "3", "--max_validation_per_dataset", "1"]
    bundles_in_one_process(
        ["training", "--config_file", configs("train.yaml", "degraded.yaml"), *common, "--max_epochs", "1",
         "--tracking", "mlflow", "--run_name", "real_smoke"],
        ["evaluating", "--config_file", configs("train.yaml", "degraded.yaml", "evaluate.yaml"), *common],
        ["inferring", "--config_file", configs("inference.yaml"), "--input_dir", str(tmp_path / "degraded_datalist.json"),
         "--dataset_dir", str(real_data_dir), "--output_dir", str(tmp_path), *SMALL[:4], "--num_workers", "0"],
    )
    lists = json.loads((tmp_path / "degraded_datalist.json").read_text())
    assert {i["dataset"] for i in lists["validation"]} == {"busbra", "ddti", "hc18"}
    # patient-level splits: no validation case is trained on
    assert not {i["case"] for i in lists["training"]} & {i["case"] for i in lists["validation"]}
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert {"psnr", "identity_psnr", "niqe", "brisque", "piqe", "fid_echocare"} <= set(summary)
    _, runs = mlflow_runs(tmp_path / "mlruns.db")
    assert [r.info.run_name for r in runs] == ["real_smoke"] and runs[0].info.status == "FINISHED"
    assert len(json.loads((tmp_path / "predictions" / "predictions.json").read_text())) == 3
