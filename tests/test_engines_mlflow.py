"""What the engines' MLflow handlers tell the user (issue #18: training prints its run)."""

from __future__ import annotations

from pathlib import Path

import pytest
from ignite.engine import Engine
from mlflow.tracking import MlflowClient
from monai.handlers import MLFlowHandler

from echocare.engines import MLflowArtifactLogger


def test_training_prints_its_mlflow_run_id_and_name_at_the_end(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = f"sqlite:///{tmp_path / 'mlruns.db'}"
    engine = Engine(lambda engine, batch: {"loss": 0.5})
    MLflowArtifactLogger(params={"seed": 3}).attach(engine)  # before the MLFlowHandler, as in the bundles
    MLFlowHandler(tracking_uri=store, experiment_name="printed", run_name="printed_run",
                  output_transform=lambda output: output["loss"]).attach(engine)
    engine.run([0, 1], max_epochs=1)
    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("printed").experiment_id])
    assert run.info.run_name == "printed_run" and run.data.params["seed"] == "3"
    assert capsys.readouterr().out.endswith(
        f"MLflow run {run.info.run_id} (name printed_run) in {store}\n"
        f"register it: echocare registry register --run {run.info.run_id} --name NAME --tracking-uri {store}\n")

    untracked = Engine(lambda engine, batch: {"loss": 0.5})
    MLflowArtifactLogger().attach(untracked)
    untracked.run([0], max_epochs=1)
    assert "MLflow run" not in capsys.readouterr().out  # nothing to name without --tracking mlflow


def test_printed_store_hides_credentials() -> None:
    from types import SimpleNamespace

    from echocare.engines.handlers import run_summary

    class Client:
        tracking_uri = "https://user:secret@mlflow.example.org:5000/path"

        def get_run(self, run_id):
            return SimpleNamespace(info=SimpleNamespace(run_id=run_id, run_name="r1"))

    assert run_summary(Client(), "abc") == (
        "MLflow run abc (name r1) in https://mlflow.example.org:5000/path\n"
        "register it: echocare registry register --run abc --name NAME --tracking-uri https://mlflow.example.org:5000/path")
