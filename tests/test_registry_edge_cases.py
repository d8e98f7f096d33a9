"""Registry edge cases without training: which epoch is "best" when lower is better (camus_ef's
MAE, brain_landmark's mre_px, pretraining's masked L1) and when higher is (musv_seg's Dice), and
the runs the registry refuses (no ``models/model.pt``, no executed config, a bundle that is not in
this checkout, no key-metric history).

Each run is made with ``MlflowClient`` on a temporary SQLite store as a bundle training run logs
it: metric histories by epoch, an executed ``config_YYYYMMDD_HHMMSS.json`` made from the
bundle's own ``train.yaml`` and a tiny ``models/model.pt``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from monai.bundle import ConfigParser

from bundle_helpers import REPO
from echocare.bundle import BUNDLES_DIR
from echocare.registry import RegistryError, describe_run, register_run
from echocare.tasks.landmarks import BRAIN_LANDMARK_NAMES

#: Key-metric history by epoch (1-based steps, as the bundles log validation): the lowest value
#: (0.8) first at epoch 3, again at epoch 5; the highest (2.5) first at epoch 2, again at epoch 4.
KEY_HISTORY = [1.7, 2.5, 0.8, 2.5, 0.8, 1.2]
LOWEST_EPOCH, HIGHEST_EPOCH = 3, 2

#: bundle -> (key metric, some of its other validation metrics, lower is better)
BUNDLES = {
    "camus_ef": ("mae", ["rmse", "bias", "pearson_r"], True),
    "brain_landmark": ("mre_px", ["mse_px2", "sdr_2px", "sdr_4px"], True),
    "echocare_pretrain": ("val_masked_l1", ["val_anatomy_acc_region", "val_anatomy_acc_organ"], True),
    "musv_seg": ("mean_dice", ["mean_nsd", "dice_artery", "dice_vein"], False),
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """``(client, tracking_uri, experiment_id, folder)`` of one SQLite store shared by the tests
    (each makes its own runs and registered models)."""
    folder = tmp_path_factory.mktemp("registry_edges")
    uri = f"sqlite:///{folder / 'mlruns.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("edges", artifact_location=(folder / "artifacts").as_uri())
    return client, uri, experiment, folder


def _executed_config(bundle: str, **overrides) -> dict:
    """The executed config a ``--tracking mlflow`` run of ``bundle`` logs: its train.yaml as
    written (``bundle_root: $echocare.bundle_dir('NAME')``) with the run's overrides."""
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / bundle / "configs" / "train.yaml"))
    return {**parser.get(), "network_size": "tiny", "image_size": 64, **overrides}


def _run(store, tmp_path: Path, name: str, config: dict | None, *, checkpoint: bool = True,
         history: dict[str, list[float]] | None = None, config_name: str = "config_20260101_120000.json") -> str:
    """A finished run in ``store``: ``history`` (metric -> value per epoch 1, 2, ...), the executed
    ``config`` as ``config_name`` (none when None) and, with ``checkpoint``, ``models/model.pt``."""
    client, _, experiment, _ = store
    run_id = client.create_run(experiment, run_name=name).info.run_id
    client.log_param(run_id, "network_size", "tiny")
    for metric, values in (history or {}).items():
        for epoch, value in enumerate(values, start=1):
            client.log_metric(run_id, metric, value, step=epoch)
    folder = tmp_path / name
    folder.mkdir()
    if config is not None:
        (folder / config_name).write_text(json.dumps(config))
        client.log_artifact(run_id, str(folder / config_name))
    if checkpoint:
        (folder / "model.pt").write_bytes(b"weights of " + name.encode())
        client.log_artifact(run_id, str(folder / "model.pt"), "models")
    client.set_terminated(run_id)
    return run_id


def _history(key: str, others: list[str]) -> dict[str, list[float]]:
    """``KEY_HISTORY`` for the key metric; other metric ``i`` is ``10 * (i + 1) + epoch``, so the
    epoch of a value is readable from it."""
    return {key: KEY_HISTORY, **{n: [10.0 * (i + 1) + e for e in range(1, 7)] for i, n in enumerate(others)}}


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_best_epoch_follows_the_key_metric_direction(store, tmp_path: Path, bundle: str) -> None:
    """The registered version is the epoch of the lowest key metric for camus_ef, brain_landmark
    and pretraining (their checkpoint savers' ``key_metric_negative_sign``), of the highest for
    musv_seg, the first one on ties (as Ignite keeps it); its metrics are those of that epoch."""
    client, uri, _, folder = store
    key, others, lower = BUNDLES[bundle]
    run_id = _run(store, tmp_path, f"{bundle}_run", _executed_config(bundle), history=_history(key, others))
    epoch = LOWEST_EPOCH if lower else HIGHEST_EPOCH

    record = describe_run(client, run_id, uri)
    assert (record.bundle, record.key_metric, record.lower_is_better) == (bundle, key, lower)
    assert record.bundle_root == BUNDLES_DIR / bundle

    registered = register_run(run_id, f"{bundle}_model", alias="champion", tracking_uri=uri)
    expected = {key: KEY_HISTORY[epoch - 1], **{n: 10.0 * (i + 1) + epoch for i, n in enumerate(others)}}
    assert registered["best_epoch"] == epoch and registered["key_metric"] == key
    assert {k: registered["metrics"][k] for k in expected} == pytest.approx(expected)
    version = client.get_model_version_by_alias(f"{bundle}_model", "champion")
    assert version.tags["best_epoch"] == str(epoch) and version.tags["bundle"] == bundle
    assert {k: float(version.tags[k]) for k in expected} == pytest.approx(expected)
    assert version.description.endswith(f"best {key} {KEY_HISTORY[epoch - 1]:.4f} at epoch {epoch}")
    # the registered bundle: the run's checkpoint, metadata with the metrics of that epoch
    local = Path(client.download_artifacts(run_id, "registered_model", str(folder / f"{bundle}_download")))
    assert (local / "models" / "model.pt").read_bytes() == f"weights of {bundle}_run".encode()
    eval_metrics = json.loads((local / "configs" / "metadata.json").read_text())["eval_metrics"]
    assert {k: eval_metrics[k] for k in expected} == pytest.approx(expected)


@pytest.mark.parametrize("bundle", sorted(p.parents[1].name for p in BUNDLES_DIR.glob("*/configs/train.yaml")))
def test_checkpoint_direction_matches_the_evaluator(bundle: str) -> None:
    """What the registry reads (``key_metric_negative_sign`` in ``validate#handlers``) agrees with
    how the bundle's evaluator ranks epochs (``metric_cmp_fn``, MONAI's default: higher is
    better), so the registered epoch is the one ``models/model.pt`` was saved at."""
    parser = ConfigParser()
    parser.read_config(str(BUNDLES_DIR / bundle / "configs" / "train.yaml"))
    savers = [h for h in parser.get("validate#handlers") if h.get("key_metric_filename") == "model.pt"]
    assert len(savers) == 1, f"{bundle}: expected one checkpoint saver of models/model.pt, found {len(savers)}"
    negative = savers[0].get("key_metric_negative_sign") is True
    if "validate#evaluator#metric_cmp_fn" in parser:
        compare = parser.get_parsed_content("validate#evaluator#metric_cmp_fn")
        evaluator_lower = bool(compare(1.0, 2.0)) and not compare(2.0, 1.0)
    else:
        evaluator_lower = False
    assert negative == evaluator_lower
    assert negative == (bundle in {"camus_ef", "brain_landmark", "echocare_pretrain"})


def _message(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_a_run_without_a_checkpoint_is_refused(store, tmp_path: Path) -> None:
    client, uri, _, _ = store
    run_id = _run(store, tmp_path, "evaluation_only", _executed_config("camus_ef"), checkpoint=False,
                  history={"mae": KEY_HISTORY})
    with pytest.raises(RegistryError) as error:
        register_run(run_id, "never", tracking_uri=uri)
    assert _message(error) == (f"run {run_id} (evaluation_only): no models/model.pt among its artifacts "
                               "(an evaluation run, or training that did not finish?)")
    assert client.search_registered_models("name='never'") == []


@pytest.mark.parametrize("config_name", [None, "config.json", "train_config_20260101_120000.json"])
def test_a_run_without_an_executed_config_is_refused(store, tmp_path: Path, config_name: str | None) -> None:
    """Only ``config_YYYYmmdd_HHMMSS.json`` is an executed config; other JSON files are not."""
    _, uri, _, _ = store
    config = None if config_name is None else _executed_config("camus_ef")
    run_id = _run(store, tmp_path, "no_config", config, history={"mae": KEY_HISTORY},
                  **({"config_name": config_name} if config_name else {}))
    with pytest.raises(RegistryError) as error:
        register_run(run_id, "never", tracking_uri=uri)
    assert _message(error) == (f"run {run_id}: no executed config (config_*.json) among its artifacts; "
                               "register a bundle training run made with --tracking mlflow")


def test_a_moved_bundle_folder_is_read_from_this_checkout(store, tmp_path: Path) -> None:
    """``bundle_root`` written as the folder the run trained in: the registry uses its name and this
    checkout's bundle of that name, wherever that folder was; a name this checkout lacks is refused."""
    client, uri, _, _ = store
    moved = _executed_config("brain_landmark", bundle_root="/old/machine/echocare/bundles/brain_landmark")
    run_id = _run(store, tmp_path, "moved", moved, history={"mre_px": KEY_HISTORY})
    record = describe_run(client, run_id, uri)
    assert record.bundle_root == BUNDLES_DIR / "brain_landmark"
    assert (record.best_epoch, record.lower_is_better) == (LOWEST_EPOCH, True)

    known = ", ".join(sorted(p.parent.name for p in BUNDLES_DIR.glob("*/configs") if p.is_dir()))
    for name, root in (("renamed", "/old/machine/echocare/bundles/brain_landmark_v0"),
                       ("unknown", "$echocare.bundle_dir('brain_landmark_v0')")):
        run_id = _run(store, tmp_path, name, _executed_config("brain_landmark", bundle_root=root),
                      history={"mre_px": KEY_HISTORY})
        with pytest.raises(RegistryError) as error:
            register_run(run_id, "never", tracking_uri=uri)
        assert _message(error) == (
            f"run {run_id}: its bundle 'brain_landmark_v0' (bundle_root {root!r} of its executed config) is not in "
            f"{BUNDLES_DIR} or ./bundles (known: {known}); register it from a checkout holding that bundle")


def test_the_newest_executed_config_names_the_bundle(store, tmp_path: Path) -> None:
    """A run resumed with other settings logs a second executed config: the newest one counts."""
    client, uri, _, _ = store
    run_id = _run(store, tmp_path, "resumed", _executed_config("musv_seg"), history={"mae": KEY_HISTORY},
                  config_name="config_20260101_120000.json")
    folder = tmp_path / "resumed_newer"
    folder.mkdir()
    (folder / "config_20260102_080000.json").write_text(json.dumps(_executed_config("camus_ef")))
    client.log_artifact(run_id, str(folder / "config_20260102_080000.json"))
    record = describe_run(client, run_id, uri)
    assert (record.bundle, record.key_metric, record.best_epoch) == ("camus_ef", "mae", LOWEST_EPOCH)


def test_a_run_without_key_metric_history_is_refused(store, tmp_path: Path) -> None:
    """A checkpoint and config but no validation (its history holds another bundle's key metric)."""
    _, uri, _, _ = store
    run_id = _run(store, tmp_path, "not_validated", _executed_config("camus_ef"), history={"mean_dice": KEY_HISTORY})
    with pytest.raises(RegistryError) as error:
        register_run(run_id, "never", tracking_uri=uri)
    assert _message(error) == f"run {run_id}: no history of its key metric 'mae' (no validation ran?)"


def test_landmark_names_follow_a_registered_checkpoint(store, tmp_path: Path) -> None:
    """A brain_landmark run trained on other landmarks (HC18's four axis ends, say) registers their
    names; ``--checkpoint models:/...`` then builds its inference and evaluation networks with as
    many heatmap channels, unless ``landmark_names`` is given. Before, the 24 brain landmarks were
    assumed and the checkpoint failed to load."""
    client, uri, _, _ = store
    names = ["major_axis_end_1", "major_axis_end_2", "minor_axis_end_1", "minor_axis_end_2"]
    key, others, _ = BUNDLES["brain_landmark"]
    run_id = _run(store, tmp_path, "hc18_axes", _executed_config("brain_landmark"), history=_history(key, others))
    client.log_param(run_id, "landmark_names", ",".join(names))  # as train.yaml's MLflow params log it
    register_run(run_id, "axes_model", alias="champion", tracking_uri=uri)
    assert client.get_model_version_by_alias("axes_model", "champion").tags["landmark_names"] == ",".join(names)

    configs = REPO / "bundles" / "brain_landmark" / "configs"
    for files in ([configs / "inference.yaml"], [configs / "train.yaml", configs / "evaluate.yaml"]):
        parser = ConfigParser()
        parser.read_config([str(f) for f in files])
        parser.update({"checkpoint": "models:/axes_model@champion", "tracking_uri": uri, "output_dir": str(tmp_path)})
        assert parser.get_parsed_content("landmark_names") == names, files
        assert parser.get_parsed_content("network_def#num_landmarks") == 4
        parser = ConfigParser()
        parser.read_config([str(f) for f in files])
        parser.update({"checkpoint": "models:/axes_model@champion", "tracking_uri": uri, "landmark_names": ["a", "b"]})
        assert parser.get_parsed_content("network_def#num_landmarks") == 2  # given on the command line: it wins
    parser = ConfigParser()
    parser.read_config(str(configs / "inference.yaml"))
    assert parser.get_parsed_content("network_def#num_landmarks") == len(BRAIN_LANDMARK_NAMES)  # no registered checkpoint
