"""The MONAI Label app treats request values as data (issue #15): the request schemas, the
studies-folder name and upload checks (this environment), and the server commands the docs
show. The real server is sent the injection payloads and traversal uploads in
tests/test_apps_monailabel.py (one server per module).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "monailabel"
sys.path.insert(0, str(APP))

from lib.validation import (  # noqa: E402
    BATCH_INFER_FIELDS,
    INFER_FIELDS,
    LABEL_EXTENSIONS,
    TRAIN_FIELDS,
    RequestFieldError,
    check_extension,
    check_store_name,
    validate_request,
)

# ------------------------------------------------------------------ schemas (this environment)

CONFIG_SYNTAX = ["$__import__('os').system('id')", "@device", "%/etc/passwd::x", "run#name", "../up", "a b", ""]


def test_train_schema_accepts_plain_values_and_refuses_config_syntax():
    good = {"model": "ddti_seg", "max_epochs": 3, "val_split": 0.25, "pretrained": False, "seed": 7,
            "label_tag": "busbra_cls", "device": "cuda:1", "tracking_uri": "http://127.0.0.1:5000",
            "tracking_experiment_name": "thyroid.v2", "run_name": "from-annotators_1", "gpus": "0,1"}
    assert validate_request(TRAIN_FIELDS, good) == good
    assert validate_request(TRAIN_FIELDS, {"run_name": "", "tracking_uri": None}) == {"run_name": "", "tracking_uri": ""}
    for device in ("cpu", "cuda", "cuda:0", "cuda:12"):
        assert validate_request(TRAIN_FIELDS, {"device": device}) == {"device": device}
    for uri in ("https://mlflow.example.org/tracking", "sqlite:////data/runs/mlruns.db", "file:///data/mlruns"):
        assert validate_request(TRAIN_FIELDS, {"tracking_uri": uri})["tracking_uri"] == uri

    refused = [
        ("device", "cpu') if __import__('os').system('id') else torch.device('cpu"), ("device", "$torch.device('cpu')"),
        ("device", "cuda:x"), ("device", 0), ("max_epochs", "5"), ("max_epochs", True), ("max_epochs", 2.5),
        ("max_epochs", 0), ("val_split", 1.0), ("val_split", "0.2"), ("val_split", float("nan")), ("seed", -1),
        ("pretrained", "yes"), ("gpus", "0;rm"), ("tracking_uri", "sqlite:///../../x.db"),
        ("tracking_uri", "http://user:pw@host"), ("tracking_uri", "ftp://host"), ("tracking_uri", "sqlite:///x.sqlite"),
        ("tracking_uri", "$os.environ"), ("tracking_uri", "http://host/#frag"),
    ]
    refused += [(field, value) for field in ("run_name", "tracking_experiment_name", "label_tag", "model")
                for value in CONFIG_SYNTAX if not (value == "" and field in ("run_name", "tracking_experiment_name"))]
    for field, value in refused:
        with pytest.raises(RequestFieldError) as error:
            validate_request(TRAIN_FIELDS, {field: value})
        assert error.value.field == field and str(error.value).startswith(f"{field}: "), (field, value)

    with pytest.raises(RequestFieldError, match=r"^checkpoint: unknown field; this task accepts device, gpus, label_tag"):
        validate_request(TRAIN_FIELDS, {"max_epochs": 1, "checkpoint": "$print(1)"})


def test_infer_schemas_refuse_unknown_fields_and_paths():
    good = {"model": "ddti_seg", "image": "IMG_0001", "frame": -1, "device": "cpu", "save_label": True,
            "label_tag": "original", "logging": "warning", "timeout": 30}
    assert validate_request(INFER_FIELDS, good) == {**good, "logging": "WARNING", "timeout": 30.0}
    assert validate_request(INFER_FIELDS, {"image": "/tmp/tmpab12.png"}) == {"image": "/tmp/tmpab12.png"}
    for field, value in [("image", "../studies/us0"), ("image", "a/b"), ("label", "us0"), ("frame", "2"),
                         ("logging", "TRACE"), ("timeout", 0), ("roi_size", [8, 8]), ("session", "id"),
                         ("label_tag", "../../x"), ("device", "meta")]:
        with pytest.raises(RequestFieldError) as error:
            validate_request(INFER_FIELDS, {field: value})
        assert error.value.field == field, (field, value)
    batch = {"model": "ddti_seg", "images": "unlabeled", "device": "cuda", "multi_gpu": True, "gpus": "all",
             "logging": "WARNING", "save_label": True, "label_tag": "original", "max_workers": 1, "max_batch_size": 0}
    assert validate_request(BATCH_INFER_FIELDS, batch) == batch  # MONAI Label's default batch request
    assert validate_request(BATCH_INFER_FIELDS, {"images": ["us0", "us1"]}) == {"images": ["us0", "us1"]}
    for field, value in [("images", ["../x"]), ("images", "some"), ("image", "us0"), ("label_tag", "@x")]:
        with pytest.raises(RequestFieldError) as error:
            validate_request(BATCH_INFER_FIELDS, {field: value})
        assert error.value.field == field, (field, value)


def test_store_names_and_upload_extensions():
    for name in ("us0", "IMG 0001 (2)", "final", "cine.2024"):
        assert check_store_name(name, "image") == name
    for name in ("../x", "..", "a/b", "a\\b", "/etc/passwd", "", "x\0y", None):
        with pytest.raises(RequestFieldError, match=r"^tag: "):
            check_store_name(name, "tag")
    assert check_extension("/tmp/tmp1.nii.gz", LABEL_EXTENSIONS, "label") == ".nii.gz"
    assert check_extension("SCAN.PNG", LABEL_EXTENSIONS, "label") == ".PNG"
    for name in ("main.py", "train.yaml", "x.png.sh", ".png", "labels"):
        with pytest.raises(RequestFieldError, match=r"^label: .* is not one of the file types this app serves"):
            check_extension(name, LABEL_EXTENSIONS, "label")


def test_server_commands_bind_to_localhost():
    """Every README line that starts a server binds it to 127.0.0.1; docs/security.md says how
    to expose one deliberately and the README links it."""
    documents = []
    for folder, subfolders, files in os.walk(REPO):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]  # environments, .git
        documents += [Path(folder, name) for name in files if name.endswith(".md")]
    lines = [line for path in [*documents, APP / "main.py"] for line in path.read_text().splitlines()
             if "monailabel start_server --" in line or "mlflow ui --" in line]  # commands, not prose
    assert len(lines) >= 5
    assert all("--host 127.0.0.1" in line for line in lines), lines
    # the MLflow UI command the demo prints
    assert "ui --backend-store-uri sqlite:///{} --host 127.0.0.1" in (REPO / "echocare" / "cli.py").read_text()
    security = (REPO / "docs" / "security.md").read_text()
    assert "MONAI_LABEL_AUTH_ENABLE" in security and "reverse proxy" in security
    assert "(docs/security.md)" in (REPO / "README.md").read_text()
