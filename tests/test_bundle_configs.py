"""Bundle configs read plainly and parse: no long ``$`` expressions, no constants read from the
phantom generators, one tracking-URI rule, every ``_target_`` component named with arguments its
target takes, and every bundle's network parses at ``network_size tiny`` (no data, no training)."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from monai.bundle import ConfigParser
from monai.bundle.config_item import ComponentLocator

REPO = Path(__file__).resolve().parents[1]
BUNDLES = sorted(p.parent.parent.name for p in (REPO / "bundles").glob("*/configs/train.yaml"))
CONFIGS = sorted((REPO / "bundles").glob("*/configs/*.yaml"))
MAX_EXPRESSION = 120  # longer `$` expressions become `_target_` components with named arguments
TRACKING_URI = "$echocare.bundle.tracking_uri(@output_dir)"


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _walk(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(id, value) of every node, ids joined with ``#`` as MONAI writes them."""
    yield prefix, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{prefix}#{key}" if prefix else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{prefix}#{index}" if prefix else str(index))


def _load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("path", CONFIGS, ids=_rel)
def test_expressions_are_short(path: Path) -> None:
    long = [f"{i} ({len(v)} characters)" for i, v in _walk(_load(path)) if isinstance(v, str) and v.startswith("$")
            and len(v) > MAX_EXPRESSION]
    assert not long, f"{_rel(path)}: `$` expressions over {MAX_EXPRESSION} characters (make them `_target_` components): {long}"


@pytest.mark.parametrize("path", CONFIGS, ids=_rel)
def test_configs_do_not_read_phantom_generators(path: Path) -> None:
    """Constants a bundle needs live in its task package; phantoms are test and demo data."""
    reads = [i for i, v in _walk(_load(path)) if isinstance(v, str) and "echocare.phantoms" in v]
    assert not reads, f"{_rel(path)}: reads echocare.phantoms at {reads}; take the constant from echocare.tasks"


@pytest.mark.parametrize("path", CONFIGS, ids=_rel)
def test_tracking_uri_rule_is_defined_once(path: Path) -> None:
    """Every config that sets ``tracking_uri`` calls ``echocare.bundle.tracking_uri``; none repeats the rule."""
    config = _load(path)
    if "tracking_uri" in config:
        assert config["tracking_uri"] == TRACKING_URI, f"{_rel(path)}: tracking_uri should be {TRACKING_URI!r}"
    repeated = [i for i, v in _walk(config) if isinstance(v, str) and ("MLFLOW_TRACKING_URI" in v or "path_to_sqlite_uri" in v)]
    assert not repeated, f"{_rel(path)}: the tracking-URI rule repeated at {repeated}; use {TRACKING_URI!r}"


def test_bundle_tracking_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from echocare.bundle import tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlruns.db'}"
    assert tracking_uri(tmp_path, "http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////elsewhere/mlruns.db")
    assert tracking_uri(tmp_path) == "sqlite:////elsewhere/mlruns.db"
    assert tracking_uri(tmp_path, "http://127.0.0.1:5000") == "http://127.0.0.1:5000"


_LOCATOR = ComponentLocator()


def _target(name: str) -> Any:
    """The object ``_target_: name`` instantiates (a dotted path, or a MONAI short name such as ``Compose``)."""
    if "." in name:
        module, _, attribute = name.rpartition(".")
        try:
            return getattr(importlib.import_module(module), attribute)
        except ModuleNotFoundError:  # a nested attribute (Class.method)
            return getattr(_target(module), attribute)
    modules = _LOCATOR.get_component_module_name(name)
    assert modules, f"no MONAI component named {name!r}"
    module = modules if isinstance(modules, str) else modules[0]
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("path", CONFIGS, ids=_rel)
def test_components_name_arguments_their_target_takes(path: Path) -> None:
    problems = []
    for node_id, node in _walk(_load(path)):
        if not (isinstance(node, dict) and "_target_" in node):
            continue
        target = _target(node["_target_"])
        parameters = inspect.signature(target).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            continue
        unknown = [k for k in node if not (k.startswith("_") and k.endswith("_")) and k not in parameters]
        if unknown:
            problems.append(f"{node_id or '<root>'}: {node['_target_']} takes no {unknown}")
    assert not problems, f"{_rel(path)}:\n" + "\n".join(problems)


def _parser(name: str, *files: str, **overrides: Any) -> ConfigParser:
    configs = REPO / "bundles" / name / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / f) for f in files])
    parser.update({"network_size": "tiny", "image_size": 64, "device": "$torch.device('cpu')", **overrides})
    if name == "usreport":  # its network's vocabulary is the tokenizer's, trained on the datalist
        parser["network_def"]["vocab_size"] = 32
    return parser


@pytest.mark.parametrize("name", BUNDLES)
@pytest.mark.parametrize("files", [("train.yaml",), ("inference.yaml",)], ids=["train", "inference"])
def test_bundle_network_parses(name: str, files: tuple[str, ...]) -> None:
    """What MONAI Label and ``monai.bundle run`` read first: the config files and ``network_def``."""
    import torch

    network = _parser(name, *files).get_parsed_content("network_def")
    assert isinstance(network, torch.nn.Module)


@pytest.mark.parametrize("name", BUNDLES)
def test_evaluation_ids_parse(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The evaluation report's per-case columns (a list of names) and the run's tracking store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    parser = _parser(name, "train.yaml", "evaluate.yaml", output_dir=str(tmp_path))
    handlers = parser["validate"]["handlers"]
    index = next(i for i, h in enumerate(handlers) if h.get("_target_", "").endswith("EvaluationReport"))
    fields = parser.get_parsed_content(f"validate#handlers#{index}#per_case_fields")
    assert isinstance(fields, list) and fields and all(isinstance(f, str) for f in fields)
    assert parser.get_parsed_content("tracking_uri") == f"sqlite:///{tmp_path.resolve() / 'mlruns.db'}"


def _affine_translate_ids(name: str) -> list[str]:
    """Config ids of the ``translate_range`` of every ``RandAffined`` in the bundle's train.yaml."""
    config = _load(REPO / "bundles" / name / "configs" / "train.yaml")
    return [
        f"{node_id}#translate_range"
        for node_id, node in _walk(config)
        if isinstance(node, dict) and str(node.get("_target_", "")).endswith("RandAffined") and "translate_range" in node
    ]


@pytest.mark.parametrize("name", BUNDLES)
def test_affine_translate_range_is_in_pixels(name: str) -> None:
    """``RandAffined`` shifts by ``translate_range`` pixels, not by a fraction of the image: at the bundle's
    default ``image_size`` the resolved range is one value per spatial axis, each at least 1 px (#18)."""
    ids = _affine_translate_ids(name)
    if not ids:
        pytest.skip(f"{name} applies no RandAffined shift")
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / name / "configs" / "train.yaml"))
    spatial_size = parser.get_parsed_content("spatial_size")
    for node_id in ids:
        shifts = parser.get_parsed_content(node_id)
        if not isinstance(shifts, (list, tuple)):  # one number: MONAI uses it for every axis
            shifts = [shifts] * len(spatial_size)
        assert len(shifts) == len(spatial_size), f"{name}: {node_id} = {shifts}, one per axis of {spatial_size}"
        assert all(s >= 1.0 for s in shifts), f"{name}: {node_id} = {shifts} px at spatial_size {spatial_size}"
        assert all(s <= side / 4 for s, side in zip(shifts, spatial_size)), f"{name}: {node_id} = {shifts} px"
