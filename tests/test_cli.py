"""The ``echocare`` command as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ECHOCARE = [sys.executable, "-m", "echocare.cli"]


def run(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([*ECHOCARE, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.e2e
def test_demo_data_writes_phantoms_and_datalist(tmp_path):
    result = run("demo-data", "--task", "pretrain", "--out", str(tmp_path / "d"), "--n", "12", "--image_size", "64")
    datalist = Path(result.stdout.strip().splitlines()[-1])
    content = json.loads(datalist.read_text())
    items = content["training"] + content["validation"]
    assert len(items) == 12
    assert all((datalist.parent / item["image"]).is_file() for item in items)


@pytest.mark.slow
@pytest.mark.e2e
def test_demo_short_run_prints_where_everything_is(tmp_path):
    out = tmp_path / "demo"
    result = run("demo", "--out", str(out), "--n", "40", "--epochs", "1", "--batch_size", "8")
    text = result.stdout
    assert "EchoCare demo finished" in text
    assert f"mlflow ui --backend-store-uri sqlite:///{out / 'mlruns.db'}" in text
    assert (out / "models" / "encoder.pt").is_file()
    predictions = json.loads((out / "predictions" / "predictions.json").read_text())
    assert len(predictions) == len(json.loads((out / "data" / "datalist.json").read_text())["validation"])
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    experiment = client.get_experiment_by_name("echocare_demo")
    (run_info,) = client.search_runs([experiment.experiment_id])
    artifacts = {a.path for a in client.list_artifacts(run_info.info.run_id)}
    assert {"models", "panels", "predictions"} <= artifacts
    assert len(client.get_metric_history(run_info.info.run_id, "train_loss")) == 4  # 32 training images / 8


@pytest.mark.e2e
def test_datalist_on_real_carotid(real_data_dir, tmp_path):
    out = tmp_path / "carotid.json"
    result = run("datalist", "carotid", "--root", str(real_data_dir / "carotid"), "--out", str(out))
    content = json.loads(out.read_text())
    assert len(content["training"]) + len(content["validation"]) == 60
    train_cases = {item["case"] for item in content["training"]}
    assert train_cases.isdisjoint(item["case"] for item in content["validation"])
    assert "training" in result.stdout


def test_repeated_src_flags_reach_curate_as_one_list():
    from echocare.cli import merge_repeated_flag

    merged = merge_repeated_flag(["curate", "--src", "a dir", "--out", "o", "--src=b"], "src")
    assert merged == ["curate", "--out", "o", '--src=["a dir", "b"]']
    assert merge_repeated_flag(["curate", "--src", "a"], "src") == ["curate", "--src", "a"]


@pytest.mark.e2e
def test_curate_takes_several_sources(tmp_path):
    from echocare.phantoms import generate_demo_data

    for name in ("one", "two"):
        generate_demo_data("pretrain", tmp_path / name, n=3, seed=len(name) * 7 + ord(name[0]), image_size=64)
    out = tmp_path / "curated"
    run("curate", "--src", str(tmp_path / "one"), "--src", str(tmp_path / "two"),
        "--out", str(out), "--size", "64", "--progress", "false")
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["source"] == {"one": 3, "two": 3}
    content = json.loads((out / "datalist.json").read_text())
    assert len(content["training"]) + len(content["validation"]) == 6
