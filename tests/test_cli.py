"""The ``echocare`` command as a user runs it."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest

from echocare.cli import main, quote_path_arguments

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


# ---- errors users read, path arguments, tracking servers (issue #15) ---------------------------

MLFLOW_HTTP_VARIABLES = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_TIMEOUT")


def _exit_code(capsys, *args: str) -> tuple[int, str, str]:
    """``echocare ARGS`` in-process: (exit status, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    captured = capsys.readouterr()
    return exited.value.code, captured.out, captured.err


@pytest.fixture
def quiet_mlflow(monkeypatch: pytest.MonkeyPatch):
    """MLflow's HTTP settings restored after the test (echocare sets defaults in os.environ), no retries
    and a 3 s timeout meanwhile, so that code without the probe fails in seconds rather than minutes
    (and the test with it); no proxy for 127.0.0.1, so that no request leaves this machine."""
    for name in MLFLOW_HTTP_VARIABLES:
        monkeypatch.setenv(name, "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _refused_address() -> str:
    """http://127.0.0.1:PORT where nothing listens (a port bound, then released)."""
    with closing(socket.socket()) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def silent_server():
    """http://127.0.0.1:PORT of a socket that accepts TCP connections (the kernel's backlog) and never answers."""
    with closing(socket.socket()) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield f"http://127.0.0.1:{server.getsockname()[1]}"


def test_expected_errors_print_one_line_and_exit_2(tmp_path, capsys) -> None:
    root = tmp_path / "nosuch"
    code, _, err = _exit_code(capsys, "datalist", "carotid", "--root", str(root), "--out", str(tmp_path / "c.json"))
    assert (code, err) == (2, f"error: {root}: expected a dataset folder; found no such folder\n")

    code, _, err = _exit_code(capsys, "experiment", "nosuch_bundle", "--name", "n", "--output_dir", str(tmp_path / "e"))
    assert code == 2 and err.startswith("error: nosuch_bundle: no such bundle in ") and "ddti_seg, echocare_pretrain" in err
    assert err.count("\n") == 1

    datalist = tmp_path / "missing.json"
    code, _, err = _exit_code(capsys, "experiment", "ddti_seg", "--name", "n", "--datalist", str(datalist),
                              "--output_dir", str(tmp_path / "e"))
    assert (code, err) == (2, f"error: {datalist}: no such datalist file (--datalist)\n")
    assert not (tmp_path / "e").exists()  # refused before the grid's folder was made

    code, _, err = _exit_code(capsys, "compare", "--experiment", "n", "--metric", "mean_dice", "--output_dir", str(tmp_path / "e"))
    assert (code, err) == (2, f"error: {tmp_path / 'e' / 'mlruns.db'}: no MLflow store there; pass --tracking-uri or "
                              "--output_dir (the experiment's folder)\n")

    code, _, err = _exit_code(capsys, "registry", "list", "--output-dir", str(tmp_path / "e"))
    assert (code, err) == (2, f"error: sqlite:///{tmp_path / 'e' / 'mlruns.db'}: no MLflow store there "
                              "(no such file; train with --tracking mlflow first?)\n")

    code, _, err = _exit_code(capsys, "curate", "--src", str(tmp_path), "--out")
    assert (code, err) == (2, "error: --out: needs a value (a path)\n")
    code, _, err = _exit_code(capsys, "predict", "ddti_seg", "--input", "--out", str(tmp_path / "p"))  # a shell variable left empty
    assert (code, err) == (2, "error: --input: needs a value (a path)\n")
    code, _, err = _exit_code(capsys, "predict", "ddti_seg", "--input", str(tmp_path), "--out", str(tmp_path / "p"),
                              "--precision", "fp16")
    assert (code, err) == (2, "error: --precision: must be one of fp32, bf16, got 'fp16'\n")


def test_a_batch_with_failed_items_exits_1(tmp_path, capsys) -> None:
    missing = tmp_path / "nosuch.png"
    code, out, err = _exit_code(capsys, "predict", "ddti_seg", "--input", str(missing), "--out", str(tmp_path / "p"),
                                "--network_size", "tiny")
    assert code == 1 and f"failed: {missing}: file not found\n" in out
    assert "Traceback" not in out + err


def test_traceback_only_with_debug(tmp_path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    from echocare.datasets.converters import DatasetLayoutError

    args = ["datalist", "carotid", "--root", str(tmp_path / "nosuch"), "--out", str(tmp_path / "c.json")]
    code, out, err = _exit_code(capsys, *args)
    assert code == 2 and "Traceback" not in out + err
    with pytest.raises(DatasetLayoutError, match="expected a dataset folder"):
        main([*args, "--debug"])
    with pytest.raises(DatasetLayoutError, match="expected a dataset folder"):
        main(["--debug", *args])
    monkeypatch.setenv("ECHOCARE_DEBUG", "1")
    with pytest.raises(DatasetLayoutError, match="expected a dataset folder"):
        main(args)

    # A bug (not an expected error): one line naming it, exit status 1, the traceback with --debug.
    monkeypatch.delenv("ECHOCARE_DEBUG")

    def broken(*args, **kwargs):
        raise RuntimeError("phantom generator broke")

    monkeypatch.setattr("echocare.phantoms.generate_demo_data", broken)
    code, _, err = _exit_code(capsys, "demo-data", "--out", str(tmp_path / "d"))
    assert code == 1
    assert err == ("error: RuntimeError: phantom generator broke (an unexpected error: rerun with --debug or "
                   "ECHOCARE_DEBUG=1 for the traceback, and report it)\n")
    with pytest.raises(RuntimeError, match="phantom generator broke"):
        main(["demo-data", "--out", str(tmp_path / "d"), "--debug"])


def test_error_inside_a_bundle_config_is_reported_by_its_cause() -> None:
    """MONAI wraps an error raised while evaluating a bundle config in RuntimeError("Failed to
    evaluate ..."): the user reads the cause."""
    from echocare.cli import _expected_error, error_line

    try:
        try:
            raise FileNotFoundError("models/model.pt: checkpoint not found")
        except FileNotFoundError as cause:
            raise RuntimeError("Failed to evaluate ConfigExpression: \n'$load(@checkpoint)'") from cause
    except RuntimeError as wrapped:
        assert error_line(_expected_error(wrapped)) == "models/model.pt: checkpoint not found"
    assert _expected_error(RuntimeError("a bug")) is None
    assert error_line(FileNotFoundError(2, "No such file or directory", "a.json")) == "a.json: No such file or directory"


def test_path_arguments_stay_strings() -> None:
    argv = ["experiment", "2024", "--name", "7", "--output-dir", "True", "--datalist=1e3", "--dataset_dir", "",
            "--seeds", "3", "--network_size", "tiny", "--image_size", "64", "--tracking-uri=None", "--", "--help"]
    assert quote_path_arguments(argv) == [
        "experiment", '"2024"', '--name="7"', '--output_dir="True"', '--datalist="1e3"', '--dataset_dir=""',
        "--seeds", "3", "--network_size", "tiny", "--image_size", "64", '--tracking_uri="None"', "--", "--help"]


def test_numeric_and_true_paths_are_folders_named_so(tmp_path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("2024", "1e3"):  # fire would pass the int 2024 and the float 1000.0
        main(["demo-data", "--task", "pretrain", "--out", name, "--n", "2", "--image_size", "64"])
        assert capsys.readouterr().out.strip() == str(Path(name) / "datalist.json")
        assert len(list((tmp_path / name).rglob("*.png"))) == 2
    main(["curate", "--src", "2024", "--out=True", "--size", "64", "--progress", "false"])
    report = json.loads((tmp_path / "True" / "report.json").read_text())
    assert report["counts"]["source"] == {"2024": 2}
    code, _, err = _exit_code(capsys, "registry", "list", "--output-dir=2024")
    assert (code, err) == (2, f"error: sqlite:///{tmp_path / '2024' / 'mlruns.db'}: no MLflow store there "
                              "(no such file; train with --tracking mlflow first?)\n")
    code, _, err = _exit_code(capsys, "datalist", "carotid", "--root", "0x10", "--out", "False")
    assert (code, err) == (2, "error: 0x10: expected a dataset folder; found no such folder\n")


def test_unreachable_tracking_server_fails_fast_naming_it(tmp_path, capsys, quiet_mlflow, silent_server) -> None:
    refused = _refused_address()
    start = time.monotonic()
    code, _, err = _exit_code(capsys, "compare", "--experiment", "n", "--metric", "mean_dice", "--tracking-uri", refused)
    assert time.monotonic() - start < 30
    assert (code, err) == (2, f"error: {refused}: cannot reach the MLflow tracking server (connection refused); start it "
                              "(mlflow server --host 127.0.0.1 --port PORT) or check the address "
                              "(--tracking-uri, MLFLOW_TRACKING_URI)\n")

    out = tmp_path / "experiment"
    code, _, err = _exit_code(capsys, "experiment", "ddti_seg", "--name", "n", "--output_dir", str(out),
                              "--tracking_uri", refused)
    assert code == 2 and err.startswith(f"error: {refused}: cannot reach the MLflow tracking server")
    assert not out.exists()

    start = time.monotonic()
    code, _, err = _exit_code(capsys, "registry", "list", "--tracking-uri", silent_server)
    assert time.monotonic() - start < 30
    assert (code, err) == (2, f"error: {silent_server}: the MLflow tracking server did not answer within 5 s; check "
                              "that it is running and the address (--tracking-uri, MLFLOW_TRACKING_URI)\n")


def test_bundle_with_unreachable_tracking_server_fails_fast(monkeypatch: pytest.MonkeyPatch, quiet_mlflow) -> None:
    from monai.bundle import ConfigParser

    from echocare.tracking import TrackingServerError

    refused = _refused_address()
    # Also when the address comes from the environment, as the bundles' default tracking_uri reads it.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", refused)
    parser = ConfigParser()
    parser.read_config([str(Path(__file__).resolve().parents[1] / "bundles" / "musv_seg" / "configs" / "train.yaml")])
    parser.update({"network_size": "tiny", "image_size": 64, "device": "$torch.device('cpu')"})
    start = time.monotonic()
    with pytest.raises(RuntimeError) as raised:
        parser.get_parsed_content("network")  # built before the trainer (and its MLflow handler) starts
    assert time.monotonic() - start < 30
    cause = raised.value.__cause__
    assert isinstance(cause, TrackingServerError)
    assert str(cause).startswith(f"{refused}: cannot reach the MLflow tracking server (connection refused)")


def test_mlflow_retries_are_limited_unless_set(monkeypatch: pytest.MonkeyPatch, quiet_mlflow) -> None:
    from echocare.tracking import TrackingServerError, check_tracking_server

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "7")
    check_tracking_server("sqlite:///elsewhere/mlruns.db")  # not http: left alone
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    refused = _refused_address()
    with pytest.raises(TrackingServerError, match=r"^http://127\.0\.0\.1:\d+/mlflow: cannot reach"):
        check_tracking_server(refused.replace("http://", "http://user:secret@") + "/mlflow")  # no password shown
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == "1"
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "7"  # the user's value stays


# ---- help and output folders (issue #18) -------------------------------------------------------

COMMANDS = {"compare", "curate", "datalist", "demo", "demo_data", "experiment", "export", "predict", "registry"}


def _help(capsys, *args: str) -> str:
    """The help text of ``echocare ARGS`` (python-fire writes it to stderr)."""
    code, _, err = _exit_code(capsys, *args)
    assert code == 0
    return err


def _listed(help_text: str) -> set[str]:
    """The names fire lists under GROUPS and COMMANDS (one per line, indented by 5 spaces)."""
    return set(re.findall(r"^     (\w+)$", help_text, re.M))


def test_help_lists_every_command(capsys) -> None:
    from echocare.cli import EchoCareCLI

    out = _help(capsys, "--help")
    assert _listed(out) == COMMANDS == {name for name in vars(EchoCareCLI) if not name.startswith("_")}
    assert _listed(_help(capsys, "-h")) == COMMANDS
    assert _listed(_help(capsys, "registry", "--help")) == {"register", "list", "promote"}


def test_help_of_a_command_runs_nothing(tmp_path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for command in ("demo-data", "demo", "curate", "predict", "experiment", "export"):  # all take further --ID options
        out = _help(capsys, command, "--help")
        assert out.startswith(f"NAME\n    echocare {command} - ")
        assert list(tmp_path.iterdir()) == [], command
    out = _help(capsys, "demo-data", "--task", "musv_seg", "-h")
    assert "--task=TASK" in out and list(tmp_path.iterdir()) == []


def test_datalist_help_names_every_dataset(capsys) -> None:
    from echocare.datasets.converters import DATALIST_CONVERTERS

    out = _help(capsys, "datalist", "--help")
    names = re.search(r"NAME is one of: ([\w,\s]+)\.", out).group(1)
    assert sorted(n.strip() for n in names.split(",")) == sorted(DATALIST_CONVERTERS)


def test_wrong_bundle_name_lists_the_bundles(tmp_path, capsys) -> None:
    known = sorted(p.parent.name for p in (Path(__file__).resolve().parents[1] / "bundles").glob("*/configs"))
    for args in (["predict", "ddti_sge", "--input", str(tmp_path), "--out", str(tmp_path / "p")],
                 ["export", "ddti_sge", "--checkpoint", str(tmp_path / "m.pt"), "--out", str(tmp_path / "m.ts")],
                 ["experiment", "ddti_sge", "--name", "n", "--output_dir", str(tmp_path / "e")]):
        code, _, err = _exit_code(capsys, *args)
        assert code == 2 and err.startswith("error: ddti_sge: no such bundle in "), (args, err)
        assert f"(known: {', '.join(known)})" in err and err.count("\n") == 1


@pytest.mark.parametrize("flag", ["--output_dir", "--output-dir"])
def test_both_spellings_of_output_dir(flag, tmp_path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    main(["demo-data", "--task", "pretrain", flag, str(tmp_path / "d"), "--n", "2", "--image_size", "64"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "d" / "datalist.json")
    assert len(list((tmp_path / "d").rglob("*.png"))) == 2

    main(["curate", "--src", str(tmp_path / "d"), flag, str(tmp_path / "c"), "--size", "64", "--progress", "false"])
    assert json.loads((tmp_path / "c" / "report.json").read_text())["counts"]["source"] == {"d": 2}

    missing = tmp_path / "nosuch.png"
    code, out, _ = _exit_code(capsys, "predict", "ddti_seg", "--input", str(missing), flag, str(tmp_path / "p"),
                              "--network_size", "tiny")
    assert code == 1 and f"failed: {missing}: file not found\n" in out
    assert (tmp_path / "p" / "predict_report.json").is_file()

    code, _, err = _exit_code(capsys, "registry", "list", flag, str(tmp_path / "e"))
    assert (code, err) == (2, f"error: sqlite:///{tmp_path / 'e' / 'mlruns.db'}: no MLflow store there "
                              "(no such file; train with --tracking mlflow first?)\n")

    seen = {}
    monkeypatch.setattr("echocare.experiments.run_experiment", lambda *a, **k: seen.setdefault("experiment", k) and [])
    monkeypatch.setattr("echocare.experiments.compare_experiment", lambda *a, **k: seen.setdefault("compare", k) and 1 / 0)
    main(["experiment", "ddti_seg", "--name", "n", flag, str(tmp_path / "e")])
    assert seen["experiment"]["output_dir"] == str(tmp_path / "e")
    _exit_code(capsys, "compare", "--experiment", "n", "--metric", "mean_dice", flag, str(tmp_path / "e"))
    assert seen["compare"]["output_dir"] == str(tmp_path / "e")

    code, _, err = _exit_code(capsys, "demo-data", "--out", str(tmp_path / "a"), flag, str(tmp_path / "b"))
    assert (code, err) == (2, "error: --out and --output_dir name the same folder: pass one of them\n")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
