"""The MLflow model registry: register, list, promote and load by alias, on the bundles' default
SQLite store and on a real ``mlflow server`` on 127.0.0.1.

One tiny musv_seg training run per store (2 epochs on phantoms, trained side by side) is shared
by the tests of that store.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch

from mlflow.tracking import MlflowClient
from monai.bundle import ConfigParser

from bundle_helpers import REPO, mlflow_runs
from echocare.cli import main
from echocare.phantoms import generate_demo_data
from echocare.tasks.supervised import EchoCareSegNet
from echocare.networks import load_network_checkpoint
from echocare.registry import RegistryError, checkpoint_sidecar, fetch_checkpoint, list_registered, promote, register_run

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # every test shares bundle training runs and a tracking server

SMALL = ["--network_size", "tiny", "--image_size", "64", "--batch_size", "4", "--num_workers", "0", "--progress_bar", "False"]
TRAIN = str(REPO / "bundles" / "musv_seg" / "configs" / "train.yaml")
EVALUATE = str(REPO / "bundles" / "musv_seg" / "configs" / "evaluate.yaml")


def _cli(*args: str) -> str:
    out = StringIO()
    with redirect_stdout(out):
        main(list(args))
    return out.getvalue()


def _start_training(data: Path, output_dir: Path, run_name: str, *extra: str) -> subprocess.Popen:
    """A 2-epoch tiny musv_seg training run with --tracking mlflow, as ``bundle_helpers.bundle`` runs it, in the background."""
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", TRAIN, *SMALL,
               "--dataset_dir", str(data), "--datalist", str(data / "datalist.json"), "--output_dir", str(output_dir),
               "--max_epochs", "2", "--tracking", "mlflow", "--run_name", run_name, *extra]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> str:
    """The training's output (stdout and stderr) once it has finished."""
    output, _ = process.communicate(timeout=600)
    if process.returncode != 0:
        raise AssertionError(f"bundle training failed ({process.returncode}):\n{output[-5000:]}")
    return output


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_network_checkpoint(EchoCareSegNet("tiny", 3), path).state_dict()


def _assert_same_weights(network: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    state = network.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_for_health(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if server.poll() is not None or time.time() > deadline:
            raise AssertionError(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _stop_group(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, then SIGKILL to whatever of it is left (uvicorn runs in a child)."""
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(server.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One training run in the bundle's default store (<output_dir>/mlruns.db) and one on a real
    ``mlflow server`` on 127.0.0.1 (SQLite backend, proxied artifacts), trained side by side.

    Yields ``{"data": Path, "sqlite": (output_dir, run_id), "server": (output_dir, url), "sqlite_output": str}``
    (the SQLite training's printed output).
    """
    data = tmp_path_factory.mktemp("musv_data")
    generate_demo_data("musv_seg", data, n=8, seed=0, image_size=64)
    sqlite_out, server_out, root = (tmp_path_factory.mktemp(n) for n in ("musv_sqlite", "musv_server", "mlflow_server"))
    sqlite_training = _start_training(data, sqlite_out, "to_register")
    port = _free_port()
    beside = Path(sys.executable).parent / "mlflow"
    command = [str(beside) if beside.exists() else "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log = root / "server.log"
    # No background job runner (its worker processes outlive the server); the server in its own
    # process group, so that stopping the group stops every process it started.
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with log.open("w") as handle:
        server = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, cwd=root, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    server_training = None
    try:
        _wait_for_health(url, server, log)
        server_training = _start_training(data, server_out, "server_run", "--tracking_uri", url)
        sqlite_output = _finish(sqlite_training)
        _finish(server_training)
        _, found = mlflow_runs(sqlite_out / "mlruns.db")
        (run,) = [r for r in found if r.info.run_name == "to_register"]
        yield {"data": data, "sqlite": (sqlite_out, run.info.run_id), "server": (server_out, url), "sqlite_output": sqlite_output}
    finally:
        for process in (sqlite_training, server_training):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        _stop_group(server)


def test_register_list_promote_and_load_by_alias_on_sqlite(runs, monkeypatch: pytest.MonkeyPatch) -> None:
    out, run_id = runs["sqlite"]
    data = runs["data"]
    store = f"sqlite:///{out / 'mlruns.db'}"
    client, _ = mlflow_runs(out / "mlruns.db")
    best = max(m.value for m in client.get_metric_history(run_id, "mean_dice"))

    printed = _cli("registry", "register", "--run", run_id, "--name", "musv", "--alias", "champion", "--output-dir", str(out))
    assert "registered musv version 1 (@champion)" in printed and "models:/musv@champion" in printed
    printed = _cli("registry", "register", "--run", run_id, "--name", "musv", "--output-dir", str(out))
    assert "registered musv version 2:" in printed

    # The version: the run's best mean_dice (the epoch model.pt was saved at), bundle, network size, source.
    version = client.get_model_version("musv", "1")
    assert float(version.tags["mean_dice"]) == pytest.approx(best, abs=1e-6)
    assert version.tags["bundle"] == "musv_seg" and version.tags["key_metric"] == "mean_dice"
    assert version.tags["network_size"] == "tiny" and version.run_id == run_id
    assert {"mean_nsd", "dice_artery", "dice_vein"} <= set(version.tags)
    # Its files: a MONAI bundle with the best checkpoint, configs and metadata holding the metrics.
    local = Path(client.download_artifacts(run_id, "registered_model", str(out / "downloaded")))
    assert {"train.yaml", "evaluate.yaml", "inference.yaml", "metadata.json", "run_config.json"} <= {
        p.name for p in (local / "configs").iterdir()}
    metadata = json.loads((local / "configs" / "metadata.json").read_text())
    assert metadata["eval_metrics"]["mean_dice"] == pytest.approx(best, abs=1e-6)
    assert metadata["name"].startswith("EchoCare")
    assert json.loads((local / "configs" / "run_config.json").read_text())["network_size"] == "tiny"
    reference = _state(out / "models" / "model.pt")
    _assert_same_weights(load_network_checkpoint(EchoCareSegNet("tiny", 3), local / "models" / "model.pt"), reference)

    printed = _cli("registry", "promote", "musv", "2", "champion", "--output-dir", str(out))
    assert "musv@champion -> version 2 (was version 1)" in printed
    rows = {r["version"]: r for r in list_registered(store)}
    assert rows[2]["aliases"] == "champion" and rows[1]["aliases"] == ""
    assert rows[2]["value"] == pytest.approx(best, abs=1e-6) and rows[2]["run_id"] == run_id
    table = _cli("registry", "list", "--tracking-uri", store)
    assert "| musv | 2 | champion | musv_seg | mean_dice |" in table

    # Load by alias and by version, in Python and through the bundle's evaluation config (its default
    # store <output_dir>/mlruns.db), in-process.
    for uri in ("models:/musv@champion", "models:/musv/1"):
        _assert_same_weights(load_network_checkpoint(EchoCareSegNet("tiny", 3), uri, tracking_uri=store), reference)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    parser = ConfigParser()
    parser.read_config([TRAIN, EVALUATE])
    parser.update({"network_size": "tiny", "image_size": 64, "num_workers": 0, "dataset_dir": str(data),
                   "datalist": str(data / "datalist.json"), "output_dir": str(out), "device": "$torch.device('cpu')",
                   "checkpoint": "models:/musv@champion"})
    parser.get_parsed_content("validate#evaluator").run()
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["mean_dice"] == pytest.approx(best, abs=1e-4)  # the same weights on the same validation list


def test_unknown_names_versions_aliases_and_runs_are_named(runs, capsys: pytest.CaptureFixture) -> None:
    out, run_id = runs["sqlite"]
    store = f"sqlite:///{out / 'mlruns.db'}"
    register_run(run_id, "musv_errors", tracking_uri=store)
    network = EchoCareSegNet("tiny", 3)
    with pytest.raises(RegistryError, match=r"no registered model 'nosuch' in sqlite:///.*\(registered: .*musv_errors"):
        load_network_checkpoint(network, "models:/nosuch@champion", tracking_uri=store)
    with pytest.raises(RegistryError, match=r"'musv_errors' has no alias 'staging' .*\(aliases: none\)"):
        load_network_checkpoint(network, "models:/musv_errors@staging", tracking_uri=store)
    with pytest.raises(RegistryError, match=r"'musv_errors' has no version 7 .*\(versions: 1\)"):
        fetch_checkpoint("models:/musv_errors/7", out, tracking_uri=store)
    with pytest.raises(RegistryError, match=r"models:/musv_errors/latest: not a registered model URI"):
        fetch_checkpoint("models:/musv_errors/latest", out, tracking_uri=store)
    with pytest.raises(RegistryError, match=r"no MLflow run '0123abcd'"):
        register_run("0123abcd", "musv_errors", tracking_uri=store)
    with pytest.raises(RegistryError, match=r"has no version 3"):
        promote("musv_errors", 3, "champion", tracking_uri=store)
    capsys.readouterr()
    with pytest.raises(SystemExit, match="^2$"):
        _cli("registry", "promote", "musv_errors", "3", "champion", "--tracking-uri", store)
    assert re.fullmatch(r"error: registered model 'musv_errors' has no version 3 .*\n", capsys.readouterr().err)
    missing = out / "elsewhere"
    with pytest.raises(SystemExit, match="^2$"):
        _cli("registry", "list", "--output-dir", str(missing))
    assert capsys.readouterr().err.startswith(f"error: sqlite:///{missing}/mlruns.db: no MLflow store there")
    assert not missing.exists()  # no empty store created


def test_side_files_travel_with_the_registered_checkpoint(runs, tmp_path: Path) -> None:
    """A file the run logged in models/ beside its checkpoints (usreport's tokenizer.json) becomes
    part of the registered version, also when the run was registered before it was logged."""
    out, run_id = runs["sqlite"]
    store = f"sqlite:///{out / 'mlruns.db'}"
    register_run(run_id, "musv_side_before", tracking_uri=store)
    with pytest.raises(RegistryError, match=r"models:/musv_side_before/1 \(version 1 of 'musv_side_before'\) holds no models/tokenizer\.json"):
        checkpoint_sidecar("models:/musv_side_before/1", "tokenizer.json", "unused", tmp_path / "dl", tracking_uri=store)

    client, _ = mlflow_runs(out / "mlruns.db")
    side = tmp_path / "tokenizer.json"
    side.write_text('{"tokens": ["<pad>", "甲状腺"]}', encoding="utf-8")
    client.log_artifact(run_id, str(side), "models")
    register_run(run_id, "musv_side", alias="champion", tracking_uri=store)
    for uri, folder in (("models:/musv_side@champion", "champion"), ("models:/musv_side/1", "1")):
        fetched = checkpoint_sidecar(uri, "tokenizer.json", "unused", tmp_path / "dl", tracking_uri=store)
        assert Path(fetched) == tmp_path / "dl" / "musv_side" / folder / "tokenizer.json"
        assert Path(fetched).read_text(encoding="utf-8") == side.read_text(encoding="utf-8")
    # the earlier version shares the run's registered bundle, which now holds the file too
    fetched = checkpoint_sidecar("models:/musv_side_before/1", "tokenizer.json", "unused", tmp_path / "dl", tracking_uri=store)
    assert Path(fetched).read_text(encoding="utf-8") == side.read_text(encoding="utf-8")
    # checkpoint files: the file beside the checkpoint when it is there, else the default
    beside = tmp_path / "run" / "models"
    beside.mkdir(parents=True)
    (beside / "model.pt").write_bytes(b"")
    assert checkpoint_sidecar(beside / "model.pt", "tokenizer.json", "fallback.json", tmp_path / "dl") == "fallback.json"
    (beside / "tokenizer.json").write_text("{}")
    assert checkpoint_sidecar(beside / "model.pt", "tokenizer.json", "fallback.json", tmp_path / "dl") == str(beside / "tokenizer.json")


def test_register_promote_and_load_by_alias_on_a_tracking_server(runs, monkeypatch: pytest.MonkeyPatch) -> None:
    out, mlflow_server = runs["server"]
    assert not (out / "mlruns.db").exists()  # everything went to the server
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("musv_seg").experiment_id], "attributes.run_name = 'server_run'")
    run_id = run.info.run_id
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # artifacts travel through the server

    first = register_run(run_id, "musv_server", alias="champion", tracking_uri=mlflow_server)
    second = register_run(run_id, "musv_server", tracking_uri=mlflow_server)
    assert (first["version"], second["version"]) == (1, 2)
    best = max(m.value for m in client.get_metric_history(run_id, "mean_dice"))
    assert first["metrics"]["mean_dice"] == pytest.approx(best, abs=1e-6)
    assert promote("musv_server", 2, "champion", tracking_uri=mlflow_server)["previous"] == 1
    assert client.get_model_version_by_alias("musv_server", "champion").version == "2"
    rows = list_registered(mlflow_server, name="musv_server")
    assert [(r["version"], r["aliases"]) for r in rows] == [(2, "champion"), (1, "")]

    reference = _state(out / "models" / "model.pt")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)  # the store load_network_checkpoint falls back to
    _assert_same_weights(load_network_checkpoint(EchoCareSegNet("tiny", 3), "models:/musv_server@champion"), reference)


def _forged_run(out: Path, run_id: str, tmp_path: Path, edit) -> str:
    """A copy of training run ``run_id`` in the same store (checkpoint, key-metric history) whose
    executed config is the original passed through ``edit``: what anyone who can write to a shared
    tracking store could log."""
    import mlflow.artifacts

    client, _ = mlflow_runs(out / "mlruns.db")
    store = f"sqlite:///{out / 'mlruns.db'}"
    original = client.get_run(run_id)
    (name,) = [a.path for a in client.list_artifacts(run_id) if re.match(r"config_\d{8}_\d{6}\.json$", a.path)][-1:]
    config = json.loads(Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name, dst_path=str(tmp_path),
                                                                  tracking_uri=store)).read_text())
    forged = client.create_run(original.info.experiment_id, run_name="forged").info.run_id
    folder = tmp_path / "forged"
    folder.mkdir()
    (folder / "config_20990101_000000.json").write_text(json.dumps(edit(config)))
    client.log_artifact(forged, str(folder / "config_20990101_000000.json"))
    client.log_artifact(forged, str(out / "models" / "model.pt"), "models")
    for metric in client.get_metric_history(run_id, "mean_dice"):
        client.log_metric(forged, metric.key, metric.value, step=metric.step)
    client.set_terminated(forged)
    return forged


def test_register_evaluates_nothing_from_the_tracking_store(runs, tmp_path: Path) -> None:
    """The executed config in a run's artifacts is data: a forged bundle_root expression is refused
    before anything runs, and expressions elsewhere in it are never evaluated (the key metric comes
    from the bundle's own train.yaml)."""
    out, run_id = runs["sqlite"]
    store = f"sqlite:///{out / 'mlruns.db'}"
    marker = tmp_path / "pwned"
    payload = f"$__import__('os').system('touch {marker}') or 'x'"

    def forge_root(config):
        return {**config, "bundle_root": payload}

    forged = _forged_run(out, run_id, tmp_path / "a", forge_root)
    with pytest.raises(RegistryError, match=r"bundle_root .* is neither a folder nor \$echocare\.bundle_dir\('NAME'\)"):
        register_run(forged, "musv_forged_root", tracking_uri=store)
    assert not marker.exists()

    def forge_metric(config):
        validate = json.loads(json.dumps(config["validate"]))
        validate["evaluator"]["key_val_metric"] = payload
        return {**config, "validate": validate, "class_names": payload}

    forged = _forged_run(out, run_id, tmp_path / "b", forge_metric)
    registered = register_run(forged, "musv_forged_metric", tracking_uri=store)
    assert not marker.exists()
    assert (registered["bundle"], registered["key_metric"]) == ("musv_seg", "mean_dice")
    best = max(m.value for m in MlflowClient(store).get_metric_history(run_id, "mean_dice"))
    assert registered["metrics"]["mean_dice"] == pytest.approx(best)


def test_register_by_run_name(runs, capsys: pytest.CaptureFixture) -> None:
    """Bundle training ends by printing its MLflow run's id and name; ``registry register --run``
    takes the name where it is unique in the store; a name shared by several runs is refused on
    one line listing their ids."""
    out, run_id = runs["sqlite"]
    store = f"sqlite:///{out / 'mlruns.db'}"
    assert (f"\nMLflow run {run_id} (name to_register) in {store}\nregister it: echocare registry register --run {run_id} "
            f"--name NAME --tracking-uri {store}\n") in runs["sqlite_output"]
    printed = _cli("registry", "register", "--run", "to_register", "--name", "musv_by_name", "--output_dir", str(out))
    assert f"registered musv_by_name version 1: musv_seg run {run_id}," in printed
    assert MlflowClient(store).get_model_version("musv_by_name", "1").run_id == run_id
    assert register_run(run_id, "musv_by_name", tracking_uri=store)["run_id"] == run_id  # the id still works

    client = MlflowClient(store)
    experiment = client.get_run(run_id).info.experiment_id
    twins = sorted(client.create_run(experiment, run_name="twin").info.run_id for _ in range(2))
    capsys.readouterr()
    with pytest.raises(SystemExit, match="^2$"):
        _cli("registry", "register", "--run", "twin", "--name", "musv_by_name", "--tracking-uri", store)
    assert capsys.readouterr().err == (f"error: run name 'twin' is not unique in {store}: runs {twins[0]}, {twins[1]}; "
                                       "pass one of these ids\n")
    with pytest.raises(RegistryError, match=r"^no MLflow run 'no_such_name' in sqlite:///.* \(no run has that id or that name\)$"):
        register_run("no_such_name", "musv_by_name", tracking_uri=store)
    assert sorted(int(v.version) for v in client.search_model_versions("name = 'musv_by_name'")) == [1, 2]  # no refusal added one


INFERENCE = str(REPO / "bundles" / "musv_seg" / "configs" / "inference.yaml")


def _masks(folder: Path) -> dict[str, "np.ndarray"]:
    import numpy as np
    from PIL import Image

    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_a_registered_model_carries_its_settings_and_its_store(runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The run trained at network_size tiny and image_size 64 (the bundle defaults: base, 256). Registered,
    # it is used with --checkpoint models:/NAME@ALIAS alone: the recorded sizes and class names apply,
    # and its store is found from the registration (the inference's own --output_dir holds none).
    out, run_id = runs["sqlite"]
    data = runs["data"]
    index = tmp_path / "model_stores.json"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["ECHOCARE_MODEL_STORES"] = str(index)
    monkeypatch.setenv("ECHOCARE_MODEL_STORES", str(index))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    register_run(run_id, "musv_settings", alias="champion", output_dir=out)
    assert json.loads(index.read_text())["musv_settings"] == [f"sqlite:///{(out / 'mlruns.db').resolve()}"]

    inputs = str(data / "datalist.json")
    common = ["--input_dir", inputs, "--datalist_key", "validation", "--num_workers", "0"]
    registered, local = tmp_path / "registered", tmp_path / "local"
    from bundle_helpers import bundle, bundles_in_one_process

    bundles_in_one_process(  # one interpreter; it inherits ECHOCARE_MODEL_STORES and no MLFLOW_TRACKING_URI
        ["inferring", "--config_file", INFERENCE, *common, "--output_dir", str(registered),
         "--checkpoint", "models:/musv_settings@champion"],
        ["inferring", "--config_file", INFERENCE, *common, "--output_dir", str(local),
         "--checkpoint", str(out / "models" / "model.pt"), "--network_size", "tiny", "--image_size", "64"],
    )
    by_registered, by_file = _masks(registered / "predictions"), _masks(local / "predictions")
    assert by_registered and by_registered.keys() == by_file.keys()
    for name, mask in by_file.items():
        assert (by_registered[name] == mask).all(), name

    # What the config resolves to, in-process: recorded values unless given; evaluation too.
    parser = ConfigParser()
    parser.read_config(INFERENCE)
    parser.update({"checkpoint": "models:/musv_settings/1", "output_dir": str(tmp_path / "other")})
    assert (parser.get_parsed_content("network_size"), parser.get_parsed_content("image_size")) == ("tiny", 64)
    assert parser.get_parsed_content("class_names") == ["background", "artery", "vein"]
    parser.update({"image_size": 96})  # given on the command line: it wins
    assert parser.get_parsed_content("image_size") == 96 and parser.get_parsed_content("network_size") == "tiny"
    evaluation = ConfigParser()
    evaluation.read_config([TRAIN, EVALUATE])
    evaluation.update({"checkpoint": "models:/musv_settings@champion", "output_dir": str(tmp_path / "other")})
    assert (evaluation.get_parsed_content("network_size"), evaluation.get_parsed_content("image_size")) == ("tiny", 64)
    training = ConfigParser()  # training starts from a checkpoint's weights, never from its settings
    training.read_config(TRAIN)
    training.update({"checkpoint": "models:/musv_settings@champion"})
    assert (training.get_parsed_content("network_size"), training.get_parsed_content("image_size")) == ("base", 256)

    # No store holds the model: one line naming --tracking_uri.
    index.write_text("{}")
    with pytest.raises(RegistryError) as refused:
        fetch_checkpoint("models:/musv_settings@champion", tmp_path, tracking_uri=f"sqlite:///{tmp_path / 'none.db'}")
    assert "--tracking_uri" in str(refused.value) and "\n" not in str(refused.value)
    result = bundle("inferring", "--config_file", INFERENCE, *common, "--output_dir", str(tmp_path / "nowhere"),
                    "--checkpoint", "models:/musv_settings@champion", env=dict(env, ECHOCARE_MODEL_STORES=str(index)), check=False)
    assert result.returncode != 0 and "--tracking_uri" in result.stderr
