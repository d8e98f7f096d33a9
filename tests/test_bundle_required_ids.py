"""Bundles refuse to guess: a run without the ids it cannot guess (``--input_dir``, ``--datalist``)
stops before anything is built, with one message naming each missing id, what it is, and the
bundle README's example; the check is the first item of ``training``, ``evaluating`` and
``inferring`` and never part of what MONAI's ``verify_net_in_out`` or MONAI Label parse."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from echocare.bundle import MissingIdError, readme_example, require_ids

REPO = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p.parent.parent.name for p in (REPO / "bundles").glob("*/configs/train.yaml"))
#: run list -> (file, the id it requires)
RUNS = {"training": ("train.yaml", "datalist"), "evaluating": ("evaluate.yaml", "datalist"),
        "inferring": ("inference.yaml", "input_dir")}
#: (bundle, run) -> what stands in for the required id there: the pretraining bundle streams shards
ALTERNATIVES = {("echocare_pretrain", "training"): "{'datalist': {'shards': @shards}}"}
#: parsed without an input by MONAI's verify_net_in_out and MONAI Label
PARSED_WITHOUT_INPUT = ("network_def", "preprocessing", "postprocessing", "inferer")


def _readme_command(bundle: str, run: str) -> str:
    """The README's first ``python -m monai.bundle run RUN`` line, read here without the helper."""
    for line in (REPO / "bundles" / bundle / "docs" / "README.md").read_text().splitlines():
        if line.strip().startswith(f"python -m monai.bundle run {run} "):
            return line.strip()
    raise AssertionError(f"bundles/{bundle}/docs/README.md has no `python -m monai.bundle run {run}` command")


# --- the check itself -------------------------------------------------------------------------------


def test_given_ids_pass() -> None:
    assert require_ids({"datalist": "lists/ddti.json", "input_dir": "scans"}, None, "training") is None
    assert require_ids({"datalist": Path("a.json"), "count": 0}) is None  # a non-string value is given


@pytest.mark.parametrize("value", ["", "   ", None])
def test_missing_input_dir_is_refused_with_the_fixed_first_line(value: object) -> None:
    with pytest.raises(MissingIdError) as caught:
        require_ids({"input_dir": value}, None, "inferring")
    lines = str(caught.value).splitlines()
    assert lines[0] == "pass --input_dir (a file, folder or datalist)"
    assert lines[1] == "  inferring cannot guess it"
    assert any("--datalist_key" in line for line in lines[2:])  # the optional id that goes with it
    assert isinstance(caught.value, ValueError)  # the echocare command prints it as one line


def test_every_missing_id_is_named_in_one_message(tmp_path: Path) -> None:
    with pytest.raises(MissingIdError) as caught:
        require_ids({"datalist": "", "input_dir": None, "seed": 1}, tmp_path / "my_bundle", "training")
    lines = str(caught.value).splitlines()
    assert lines[0] == ('pass --datalist (a MONAI datalist JSON with "training" and "validation" lists of the '
                        "bundle's items), --input_dir (a file, folder or datalist)")
    assert lines[1] == "  my_bundle training cannot guess them"
    assert "--seed" not in str(caught.value)
    assert any(line.startswith("  --dataset_dir: ") for line in lines)
    assert not any("for example" in line for line in lines)  # the folder has no README


def test_example_comes_from_the_bundle_readme(tmp_path: Path) -> None:
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "README.md").write_text(
        "```bash\n"
        "echocare datalist ddti DATA --out L.json\n"
        "# train\n"
        "python -m monai.bundle run training --config_file c/train.yaml \\\n"
        "  --datalist L.json \\\n"
        "  --network_size tiny\n"
        "python -m monai.bundle run inferring --config_file c/inference.yaml --input_dir X\n"
        "```\n"
    )
    assert readme_example(tmp_path, "training") == [
        "echocare datalist ddti DATA --out L.json",
        "python -m monai.bundle run training --config_file c/train.yaml \\",
        "  --datalist L.json \\",
        "  --network_size tiny",
    ]
    assert readme_example(tmp_path, "inferring") == [
        "python -m monai.bundle run inferring --config_file c/inference.yaml --input_dir X"]
    assert readme_example(tmp_path, "evaluating") == []
    with pytest.raises(MissingIdError) as caught:
        require_ids({"datalist": ""}, tmp_path, "training")
    text = str(caught.value)
    assert f"  for example ({tmp_path / 'docs' / 'README.md'}):\n    echocare datalist ddti DATA --out L.json\n" in text
    assert text.endswith("      --network_size tiny")


def test_an_alternative_id_stands_in_and_both_are_named_when_neither_is_given() -> None:
    """Issue #18 point 3: the pretraining bundle needs ``datalist`` or ``shards``."""
    either = {"datalist": {"shards": "corpus/shards.json"}}
    assert require_ids({"datalist": ""}, None, "training", either=either) is None
    assert require_ids({"datalist": "d.json"}, None, "training", either={"datalist": {"shards": None}}) is None
    with pytest.raises(MissingIdError) as caught:
        require_ids({"datalist": " "}, None, "training", either={"datalist": {"shards": None}})
    lines = str(caught.value).splitlines()
    assert lines[0] == ('pass --datalist (a MONAI datalist JSON with "training" and "validation" lists of the '
                        "bundle's items) or --shards (a shards.json index of WebDataset shards, from echocare "
                        "curate --format webdataset)")
    assert lines[1] == "  training cannot guess it"


# --- where the bundles call it ----------------------------------------------------------------------


@pytest.mark.parametrize("bundle", BUNDLES)
def test_the_check_is_the_first_item_of_every_run_list(bundle: str) -> None:
    for run, (file, required) in RUNS.items():
        config = yaml.safe_load((REPO / "bundles" / bundle / "configs" / file).read_text())
        first = config[run][0]
        alternative = f", {ALTERNATIVES[bundle, run]}" if (bundle, run) in ALTERNATIVES else ""
        assert first.startswith(f"$echocare.bundle.require_ids({{'{required}': @{required}}}, @bundle_root, '{run}'{alternative})"), (
            f"bundles/{bundle}/configs/{file}: `{run}` starts with {first!r}")
        assert config[run][1:], f"bundles/{bundle}/configs/{file}: `{run}` runs nothing after the check"
        for part in PARSED_WITHOUT_INPUT:
            assert "require_ids" not in yaml.safe_dump(config.get(part)), f"bundles/{bundle}/configs/{file}: `{part}`"


# --- through `python -m monai.bundle run`, as a user meets it ---------------------------------------


def _run_bundle(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "MLFLOW_TRACKING_URI": ""}
    return subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _error_message(stderr: str) -> list[str]:
    """The MissingIdError's lines from a traceback (MONAI re-raises it as 'Failed to evaluate')."""
    lines = stderr.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("echocare.bundle.MissingIdError: "))
    end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith(" ")), len(lines))
    return [lines[start].removeprefix("echocare.bundle.MissingIdError: "), *lines[start + 1:end]]


@pytest.mark.slow
@pytest.mark.parametrize("bundle", ["ddti_seg", "busbra_cls", "usreport"])
def test_inferring_without_input_dir_refuses_and_writes_nothing(bundle: str, tmp_path: Path, monkeypatch) -> None:
    """Before: it scanned the current folder and wrote ``bundles/NAME/predictions/``. ddti_seg runs
    through the command line as a user meets it; the others through MONAI's ``run`` in this process
    (what the command line calls; a fresh interpreter costs about 6 s)."""
    (tmp_path / "scan.png").write_bytes(b"")  # something a folder scan would have picked up
    bundle_dir = REPO / "bundles" / bundle
    before = _files(bundle_dir)
    config_file = str(bundle_dir / "configs" / "inference.yaml")
    if bundle == "ddti_seg":
        result = _run_bundle(["inferring", "--config_file", config_file, "--network_size", "tiny", "--image_size", "32"],
                             tmp_path)
        assert result.returncode != 0, result.stdout[-2000:]
        message = _error_message(result.stderr)
    else:
        from monai.bundle import run as monai_run

        monkeypatch.chdir(tmp_path)
        with pytest.raises(RuntimeError) as caught:
            monai_run("inferring", config_file=config_file, network_size="tiny", image_size=32)
        assert isinstance(caught.value.__cause__, MissingIdError), repr(caught.value)
        message = str(caught.value.__cause__).splitlines()
    assert message[0] == "pass --input_dir (a file, folder or datalist)", message
    assert message[1] == f"  {bundle} inferring cannot guess it"
    assert f"    {_readme_command(bundle, 'inferring')}" in message
    assert _files(tmp_path) == {"scan.png"}
    assert _files(bundle_dir) == before and not (bundle_dir / "predictions").exists()


@pytest.mark.slow
def test_training_without_datalist_names_the_ids_and_the_readme_example(tmp_path: Path) -> None:
    """Before: ``.: datalist not found``."""
    config = REPO / "bundles" / "ddti_seg" / "configs" / "train.yaml"
    result = _run_bundle(["training", "--config_file", str(config), "--output_dir", str(tmp_path / "out"),
                          "--network_size", "tiny", "--image_size", "32"], tmp_path)
    assert result.returncode != 0, result.stdout[-2000:]
    message = _error_message(result.stderr)
    assert message[0].startswith("pass --datalist (a MONAI datalist JSON"), result.stderr[-3000:]
    assert message[1] == "  ddti_seg training cannot guess it"
    assert any(line.startswith("  --dataset_dir: ") for line in message)
    assert f"    {_readme_command('ddti_seg', 'training')}" in message
    assert "not found" not in "\n".join(message)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bundle,run", [("echocare_pretrain", "training"), ("camus_ef", "evaluating")])
def test_pretraining_and_evaluating_need_a_datalist(bundle: str, run: str, tmp_path: Path) -> None:
    """The same check, in-process through MONAI's own ``run`` (what the command line calls)."""
    from monai.bundle import run as monai_run

    configs = REPO / "bundles" / bundle / "configs"
    files = [str(configs / "train.yaml")] + ([str(configs / "evaluate.yaml")] if run == "evaluating" else [])
    with pytest.raises(RuntimeError) as caught:
        monai_run(run, config_file=files, output_dir=str(tmp_path / "out"), network_size="tiny", image_size=32)
    cause = caught.value.__cause__
    assert isinstance(cause, MissingIdError), repr(caught.value)
    assert str(cause).splitlines()[0].startswith("pass --datalist ")
    assert (" or --shards (" in str(cause).splitlines()[0]) == (bundle == "echocare_pretrain")
    assert str(cause).splitlines()[1] == f"  {bundle} {run} cannot guess it"
    assert not (tmp_path / "out").exists()
