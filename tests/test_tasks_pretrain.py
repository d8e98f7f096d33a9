"""The echocare_pretrain bundle end to end, as a user runs it (``python -m monai.bundle ...``)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from echocare.phantoms import generate_demo_data
from echocare.networks import build_encoder, load_encoder_weights
from bundle_helpers import REPO, bundle, checkpoint_readable, mlflow_runs

CONFIGS = REPO / "bundles" / "echocare_pretrain" / "configs"
TRAIN = str(CONFIGS / "train.yaml")
MULTI_GPU = str(CONFIGS / "multi_gpu_train.yaml")
INFERENCE = str(CONFIGS / "inference.yaml")

# Tiny, fast settings shared by every run (32 training images -> 4 iterations per epoch).
SMALL = [
    "--network_size", "tiny", "--image_size", "64", "--mask_unit", "16", "--batch_size", "8",
    "--num_workers", "0", "--warmup_steps", "2", "--total_steps", "100", "--progress_bar", "False",
]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantoms")
    generate_demo_data("pretrain", out, n=40, seed=0, image_size=64)  # 32 training, 8 validation
    return out


@pytest.fixture(scope="module")
def trained(phantoms, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    bundle(
        "training", "--config_file", TRAIN, *SMALL, "--dataset_dir", str(phantoms),
        "--datalist", str(phantoms / "datalist.json"), "--output_dir", str(out),
        "--train#trainer#max_epochs", "2", "--checkpoint_interval", "3", "--tracking", "mlflow", "--run_name", "phantom_run",
    )
    return out


@pytest.mark.slow
@pytest.mark.e2e
def test_training_writes_checkpoints_and_released_encoder(trained):
    models = trained / "models"
    assert (models / "model.pt").is_file() and (models / "checkpoint_final.pt").is_file()
    final = torch.load(models / "checkpoint_final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 8
    assert set(final) == {"model", "optimizer", "lr_scheduler", "trainer", "sampler", "best_model"}
    assert final["best_model"]["best_metric_epoch"] >= 1
    assert final["sampler"]["seed"] == 0
    encoder = build_encoder("tiny")
    load_encoder_weights(encoder, models / "encoder.pt")  # strict: the released layout
    flat = torch.load(models / "encoder.pt", weights_only=True)
    assert "mask_token" in flat and not any(k.startswith("encoder.") for k in flat)
    assert torch.equal(encoder.mask_token, flat["mask_token"])


@pytest.mark.slow
@pytest.mark.e2e
def test_mlflow_holds_losses_metrics_config_and_pictures(trained):
    client, runs = mlflow_runs(trained / "mlruns.db")
    assert [r.info.run_name for r in runs] == ["phantom_run"]
    run = runs[0]
    assert run.info.status == "FINISHED"
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == list(range(1, 9))
    assert all(np.isfinite(m.value) and m.value > 0 for m in losses)
    assert len(client.get_metric_history(run.info.run_id, "lr_group_0")) == 8
    for name in ("val_masked_l1", "val_anatomy_acc_region", "val_anatomy_acc_organ", "val_anatomy_acc_structure"):
        assert len(client.get_metric_history(run.info.run_id, name)) == 2, name
    masked_l1 = [m.value for m in client.get_metric_history(run.info.run_id, "val_masked_l1")]
    assert 0 < masked_l1[-1] < 1
    assert run.data.params["network_size"] == "tiny" and run.data.params["mask_ratio"] == "0.5"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"models", "panels"} <= artifacts
    assert any(p.startswith("config_") and p.endswith(".json") for p in artifacts)
    panels = {a.path for a in client.list_artifacts(run.info.run_id, "panels")}
    assert {"panels/epoch_0001.png", "panels/epoch_0002.png"} <= panels
    models = {a.path for a in client.list_artifacts(run.info.run_id, "models")}
    assert {"models/model.pt", "models/encoder.pt"} <= models


@pytest.mark.slow
@pytest.mark.e2e
def test_validation_panel_shows_original_masked_and_reconstruction(trained):
    panel = np.asarray(Image.open(trained / "panels" / "latest.png"))
    # 8 validation images, one row each, three 64-pixel columns separated by 4-pixel gaps.
    assert panel.shape == (8 * 64 + 7 * 4, 3 * 64 + 2 * 4, 3)
    original, masked = panel[:64, :64], panel[:64, 68:132]
    grey_units = np.all(masked == 128, axis=-1).mean()  # masked units are drawn mid-grey
    assert 0.3 < grey_units <= 0.55
    assert not np.array_equal(original, masked)


@pytest.mark.slow
@pytest.mark.e2e
def test_inference_writes_a_panel_and_anatomy_per_image(trained, phantoms):
    bundle(
        "inferring", "--config_file", INFERENCE, "--network_size", "tiny", "--image_size", "64", "--mask_unit", "16",
        "--num_workers", "0", "--output_dir", str(trained), "--input_dir", str(phantoms / "images"),
    )
    predictions = json.loads((trained / "predictions" / "predictions.json").read_text())
    assert len(predictions) == 40
    from echocare.ontology import load_ontology

    ontology = load_ontology()
    for item in predictions[:5]:
        assert Path(item["panel"]).is_file()
        assert Path(item["image"]).name.split(".")[0] == Path(item["panel"]).stem
        scores = item["anatomy_scores"]
        assert list(scores) == ontology.nodes
        for i, path in enumerate(ontology.nodes):  # coherent: no child above its parent
            if ontology.parent[i] >= 0:
                assert scores[path] <= scores[ontology.nodes[ontology.parent[i]]] + 1e-6
        assert item["anatomy_path"] is None or item["anatomy_path"] in ontology.nodes


@pytest.mark.slow
@pytest.mark.e2e
def test_evaluation_writes_summary_per_case_and_mlflow(trained, phantoms):
    bundle(
        "evaluating", "--config_file", f"['{TRAIN}','{str(CONFIGS / 'evaluate.yaml')}']", *SMALL,
        "--dataset_dir", str(phantoms), "--datalist", str(phantoms / "datalist.json"), "--output_dir", str(trained),
        "--tracking", "mlflow", "--run_name", "phantom_eval",
    )
    summary = json.loads((trained / "eval" / "summary.json").read_text())
    assert set(summary) == {"masked_l1", "anatomy_acc_region", "anatomy_acc_organ", "anatomy_acc_structure"}
    rows = (trained / "eval" / "per_case.csv").read_text().splitlines()
    assert rows[0] == "image,masked_l1,anatomy,anatomy_pred" and len(rows) == 1 + 8
    per_case = [float(r.split(",")[1]) for r in rows[1:]]
    assert summary["masked_l1"] == pytest.approx(np.mean(per_case), rel=1e-5)
    client, runs = mlflow_runs(trained / "mlruns.db")
    run = next(r for r in runs if r.info.run_name == "phantom_eval")
    assert run.info.status == "FINISHED"
    assert run.data.metrics["val_masked_l1"] == pytest.approx(summary["masked_l1"])
    assert {"eval/summary.json", "eval/per_case.csv", "eval/panels"} <= {a.path for a in client.list_artifacts(run.info.run_id, "eval")}


@pytest.mark.slow
def test_evaluation_of_a_registered_model_takes_its_settings(trained, tmp_path, monkeypatch):
    """``--checkpoint models:/NAME@ALIAS`` alone: the evaluation's network and masking are the ones
    the run trained with (tiny, 64 px, 16 px mask units), not the bundle's defaults."""
    from monai.bundle import ConfigParser
    from echocare.registry import register_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _, runs = mlflow_runs(trained / "mlruns.db")
    run = next(r for r in runs if r.info.run_name == "phantom_run")
    register_run(run.info.run_id, "pretrain_settings", alias="champion", output_dir=trained)
    settings = ("network_size", "image_size", "mask_unit", "mask_ratio")
    evaluation = ConfigParser()
    evaluation.read_config([TRAIN, str(CONFIGS / "evaluate.yaml")])
    evaluation.update({"checkpoint": "models:/pretrain_settings@champion", "output_dir": str(tmp_path)})
    assert [evaluation.get_parsed_content(k) for k in settings] == ["tiny", 64, 16, 0.5]
    evaluation.update({"image_size": 96})  # given on the command line: it wins
    assert evaluation.get_parsed_content("image_size") == 96
    training = ConfigParser()  # training never takes a checkpoint's settings
    training.read_config(TRAIN)
    training.update({"checkpoint": "models:/pretrain_settings@champion", "output_dir": str(tmp_path)})
    assert [training.get_parsed_content(k) for k in settings] == ["base", 256, 32, 0.5]


@pytest.mark.slow
@pytest.mark.e2e
def test_resume_after_kill_continues_from_last_checkpoint(phantoms, tmp_path):
    out = tmp_path / "resume"
    args = [
        "training", "--config_file", TRAIN, *SMALL, "--dataset_dir", str(phantoms), "--datalist",
        str(phantoms / "datalist.json"), "--output_dir", str(out), "--train#trainer#max_epochs", "4",
        "--checkpoint_interval", "3", "--tracking", "mlflow", "--run_name", "resumable",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "monai.bundle", "run", *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while time.time() < deadline and not any(checkpoint_readable(p) for p in (out / "models").glob("checkpoint_iteration=*.pt")):
        assert process.poll() is None, "training ended before its first checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = [p for p in (out / "models").glob("checkpoint_iteration=*.pt") if checkpoint_readable(p)]
    assert not (out / "models" / "checkpoint_final.pt").exists()
    done = max(int(p.stem.split("=")[1]) for p in saved)
    assert done % 4 != 0  # killed in the middle of an epoch (4 iterations per epoch)
    result = bundle(*args, "--resume", "true")
    assert f"Restored all variables from {out / 'models' / f'checkpoint_iteration={done}.pt'}" in result.stdout + result.stderr
    final = torch.load(out / "models" / "checkpoint_final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 16
    client, runs = mlflow_runs(out / "mlruns.db")
    assert len(runs) == 1  # the resumed run continues the same MLflow run
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")]
    assert steps[-1] == 16 and set(range(done + 1, 17)) <= set(steps)


@pytest.mark.slow
def test_multi_process_training_on_cpu(phantoms, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "monai.bundle", "run", "training",
        "--config_file", f"['{TRAIN}','{MULTI_GPU}']", *SMALL, "--batch_size", "4", "--dataset_dir", str(phantoms),
        "--datalist", str(phantoms / "datalist.json"), "--output_dir", str(out), "--train#trainer#max_epochs", "2",
        "--tracking", "mlflow", "--run_name", "ddp_run",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-5000:]
    log = result.stdout + result.stderr
    assert log.count("Epoch[2] Metrics") == 1  # only rank 0 reports
    final = torch.load(out / "models" / "checkpoint_final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 8  # 32 images / (2 processes x 4) per epoch, 2 epochs
    client, runs = mlflow_runs(out / "mlruns.db")
    assert [r.info.run_name for r in runs] == ["ddp_run"]
    assert len(client.get_metric_history(runs[0].info.run_id, "train_loss")) == 8
    assert (out / "models" / "encoder.pt").is_file()


REAL_SOURCES = {  # folder, image glob, anatomy path of every image there
    "busbra": ("busbra/Images", "*.png", "thorax/breast"),
    "ddti": ("ddti/images", "*.png", "head & neck/thyroid"),
    "hc18": ("hc18/images", "*.png", "fetus/fetal head"),
    "carotid": ("carotid/images", "*.png", "head & neck/carotid artery"),
}


@pytest.mark.slow
@pytest.mark.e2e
def test_training_on_real_images(real_data_dir, tmp_path):
    items = []
    for folder, pattern, anatomy in REAL_SOURCES.values():
        files = sorted((real_data_dir / folder).glob(pattern))[:6]
        if not files:  # layouts differ in case; fall back to any PNG under the dataset
            files = sorted((real_data_dir / folder.split("/")[0]).rglob("*.png"))[:6]
            files = [f for f in files if "mask" not in str(f).lower()]
        items += [{"image": str(f.relative_to(real_data_dir)), "anatomy": anatomy} for f in files]
    assert len(items) >= 16
    datalist = tmp_path / "real.json"
    datalist.write_text(json.dumps({"training": items[::2] + items[1::4], "validation": items[3::4]}))
    out = tmp_path / "real_run"
    bundle(
        "training", "--config_file", TRAIN, *SMALL, "--dataset_dir", str(real_data_dir), "--datalist", str(datalist),
        "--output_dir", str(out), "--train#trainer#max_epochs", "1", "--tracking", "mlflow", "--run_name", "real_run",
    )
    client, runs = mlflow_runs(out / "mlruns.db")
    assert runs[0].info.status == "FINISHED"
    assert 0 < runs[0].data.metrics["val_masked_l1"] < 1
    assert (out / "panels" / "epoch_0001.png").is_file()


@pytest.mark.parametrize(
    "problem",
    ["missing_datalist", "missing_image", "unreadable_image", "unknown_anatomy", "bad_image_size", "missing_pretrained"],
)
@pytest.mark.slow
@pytest.mark.e2e
def test_bad_input_fails_before_training_with_the_file_named(problem, phantoms, tmp_path):
    items = [{"image": f"images/pretrain_{i:04d}.png", "anatomy": "thorax/breast"} for i in range(4)]
    datalist = tmp_path / "datalist.json"
    extra: list[str] = []
    expected = str(datalist)
    if problem == "missing_image":
        items[1]["image"] = "images/nope.png"
        expected = "nope.png: file not found"
    elif problem == "unreadable_image":
        broken = tmp_path / "images" / "broken.png"
        broken.parent.mkdir()
        broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
        items[2]["image"] = str(broken)
        expected = "broken.png"
    elif problem == "unknown_anatomy":
        items[3]["anatomy"] = "thorax/hart"
        expected = "thorax/hart"
    elif problem == "bad_image_size":
        extra = ["--image_size", "100"]
        expected = "image_size 100 is not usable"
    elif problem == "missing_pretrained":
        extra = ["--pretrained_path", str(tmp_path / "nowhere.pt")]
        expected = "nowhere.pt: encoder checkpoint not found"
    if problem != "missing_datalist":
        datalist.write_text(json.dumps({"training": items, "validation": items[:2]}))
    else:
        expected = f"{datalist}: datalist not found"
    out = tmp_path / "out"
    result = bundle(
        "training", "--config_file", TRAIN, *SMALL, "--dataset_dir", str(phantoms), "--datalist", str(datalist),
        "--output_dir", str(out), *extra, check=False, timeout=300,
    )
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr[-3000:]
    assert "Engine run resuming" not in result.stdout + result.stderr  # nothing trained


@pytest.mark.slow
@pytest.mark.e2e
def test_inference_refuses_a_checkpoint_of_another_architecture(phantoms, tmp_path):
    wrong = tmp_path / "wrong.pt"
    torch.save({"model": build_encoder("tiny").state_dict()}, wrong)
    result = bundle(
        "inferring", "--config_file", INFERENCE, "--network_size", "tiny", "--image_size", "64", "--mask_unit", "16",
        "--checkpoint", str(wrong), "--input_dir", str(phantoms / "images"), "--output_dir", str(tmp_path),
        check=False, timeout=300,
    )
    assert result.returncode != 0
    assert f"{wrong}: the checkpoint does not fit EchoCarePretrainNet" in result.stderr
    assert "missing keys" in result.stderr


@pytest.mark.e2e
def test_metadata_is_valid_against_our_schema(tmp_path):
    schema = REPO / "bundles" / "metadata_schema.json"
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(CONFIGS / "metadata.json"),
         "--filepath", str(schema)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 0 and "metadata is verified with no error" in result.stdout + result.stderr
    import jsonschema

    broken = json.loads((CONFIGS / "metadata.json").read_text())
    del broken["network_data_format"]["inputs"]["image"]["num_channels"]
    with pytest.raises(jsonschema.ValidationError, match="num_channels"):
        jsonschema.validate(broken, json.loads(schema.read_text()))
