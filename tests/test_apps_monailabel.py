"""The MONAI Label app (apps/monailabel): label conversion in this environment, and the real
server in its own environment (created on first use by apps/monailabel/setup_env.sh), over
HTTP on 127.0.0.1, offline: /info/, segmentation and classification inference checked against
the bundles' own inference here, a train request on saved labels tracked in MLflow, and
echocare's readers under pydicom 2.4 / numpy 1.26 checked against this environment's reads.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import find_real_data
from dicom_helpers import write_dicom
from echocare.io import read_ultrasound
from echocare.phantoms.renderer import make_phantom_image
from echocare.tasks.supervised import EchoCareClassifier, EchoCareSegNet

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "apps" / "monailabel"
SERVER_ENV = REPO / ".monailabel_venv"
sys.path.insert(0, str(APP))

from lib.bundles import bundle_config, bundle_overrides, selected_models  # noqa: E402
from lib.labels import LabelFileError, labelled_items, read_class_label, split_items, task_datalist  # noqa: E402

SMALL = {"network_size": "tiny", "image_size": "64"}


# ------------------------------------------------------------------ data and checkpoints


def _phantom(rng: np.random.Generator, height: int = 72, width: int = 88) -> tuple[np.ndarray, np.ndarray]:
    """A grey phantom image (height, width) of a thyroid and its mask (0 background, 1 anything drawn)."""
    image, label = make_phantom_image(rng, size=96, organ="head & neck/thyroid")
    return image[:height, :width].copy(), (label[:height, :width] > 0).astype(np.uint8)


def _studies(root: Path, count: int = 4) -> tuple[Path, dict[str, np.ndarray]]:
    """A studies folder: phantom PNGs, a single-frame and a 3-frame DICOM; returns the masks by image id."""
    rng = np.random.default_rng(7)
    root.mkdir(parents=True, exist_ok=True)
    masks = {}
    for i in range(count):
        image, mask = _phantom(rng)
        Image.fromarray(image).save(root / f"us{i}.png")
        masks[f"us{i}"] = mask
    frames = np.stack([_phantom(rng, 64, 80)[0] for _ in range(3)])
    write_dicom(root / "cine.dcm", frames, "MONOCHROME2", FrameTime=33.0)
    write_dicom(root / "still.dcm", _phantom(rng, 64, 72)[0], "MONOCHROME2")
    return root, masks


def _save_checkpoints(output_root: Path) -> None:
    """Seeded tiny networks as ddti_seg's and busbra_cls's served checkpoints (``models/model.pt``)."""
    torch.manual_seed(0)
    networks = {
        "ddti_seg": EchoCareSegNet(network_size="tiny", out_channels=2),
        "busbra_cls": EchoCareClassifier(network_size="tiny", num_classes=4),
    }
    for name, network in networks.items():
        (output_root / name / "models").mkdir(parents=True, exist_ok=True)
        torch.save(network.state_dict(), output_root / name / "models" / "model.pt")


def _bundle_predict(name: str, output_root: Path, image: Path, frame: int = 0) -> torch.Tensor:
    """The bundle's own inference (config ids preprocessing, network, postprocessing) in this environment."""
    config = bundle_config(name, "inference.yaml", bundle_overrides(name, {"output_root": str(output_root), **SMALL}))
    config["device"] = torch.device("cpu")
    item = config.get_parsed_content("preprocessing")({"image": str(image), "frame": frame})
    network = config.get_parsed_content("network").eval()
    with torch.no_grad():
        pred = network(item["image"][None])[0]
    out = config.get_parsed_content("postprocessing")({"pred": pred})
    return out["pred"], item


# ------------------------------------------------------------------ conversion (this environment)


def test_selected_models_and_overrides(tmp_path):
    assert selected_models("all")[:6] == ["ddti_seg", "musv_seg", "abdomen_seg", "busbra_cls", "thyroid_cls", "fll_cls"]
    assert selected_models("ddti_seg, busbra_cls") == ["ddti_seg", "busbra_cls"]
    with pytest.raises(ValueError, match=r"unknown bundle\(s\) \['ddti'\]"):
        selected_models("ddti")
    conf = {"output_root": str(tmp_path), "image_size": "64", "models": "all", "busbra_cls.image_size": "96",
            "ddti_seg.checkpoint": "models:/ddti_seg@champion"}
    overrides = bundle_overrides("ddti_seg", conf)
    assert overrides == {"output_dir": str(tmp_path / "ddti_seg"), "image_size": 64, "checkpoint": "models:/ddti_seg@champion"}
    assert bundle_overrides("busbra_cls", conf) == {"output_dir": str(tmp_path / "busbra_cls"), "image_size": 96}
    overrides = {"output_dir": str(tmp_path / "ddti_seg"), "image_size": 64}
    config = bundle_config("thyroid_cls", "inference.yaml", {**overrides, "clip_frames": 3, "unknown_id": 1})
    assert config.get_parsed_content("checkpoint") == str(tmp_path / "ddti_seg" / "models" / "model.pt")
    assert config.get_parsed_content("clip_frames") == 3 and "unknown_id" not in config
    # the EF bundle's frames per sequence: a number, as the bundle's transforms take it
    assert bundle_overrides("camus_ef", {"camus_ef.num_frames": "8"}) == {"num_frames": 8}
    config = bundle_config("camus_ef", "inference.yaml", bundle_overrides("camus_ef", {"camus_ef.num_frames": "8"}))
    assert config.get_parsed_content("num_frames") == 8
    assert config.get_parsed_content("load_transforms")[0].num_frames == 8


def test_class_label_files(tmp_path):
    names = ["BI-RADS 2", "BI-RADS 3", "BI-RADS 4", "BI-RADS 5"]
    cases = {"a": {"label": "bi-rads 4"}, "b": {"label": 3, "probabilities": {}}}
    for key, content in cases.items():
        (tmp_path / f"{key}.json").write_text(json.dumps(content))
    assert read_class_label(tmp_path / "a.json", names) == 2
    assert read_class_label(tmp_path / "b.json", names) == 3
    bad = {"c": '{"label": "BI-RADS 6"}', "d": '{"label": 4}', "e": "[1]", "f": "not json", "g": '{"label": true}'}
    expected = {"c": "unknown class 'BI-RADS 6'", "d": "label 4 is outside", "e": "JSON object", "f": "not a readable JSON",
                "g": "neither a class name"}
    for key, text in bad.items():
        (tmp_path / f"{key}.json").write_text(text)
        with pytest.raises(LabelFileError, match=expected[key]) as error:
            read_class_label(tmp_path / f"{key}.json", names)
        assert str(error.value).startswith(str(tmp_path / f"{key}.json"))


def test_split_items_is_seeded_and_keeps_both_lists():
    items = [{"image": str(i)} for i in range(10)]
    train, val = split_items(items, 0.2, seed=3)
    assert len(train) == 8 and len(val) == 2 and sorted(x["image"] for x in train + val) == sorted(x["image"] for x in items)
    assert split_items(items, 0.2, seed=3) == (train, val)
    assert split_items(items[:2], 0.01)[1] == [items[0]] or split_items(items[:2], 0.01)[1] == [items[1]]
    assert split_items(items[:3], 0) == (items[:3], items[:3])
    with pytest.raises(ValueError, match="at least 2 labelled images"):
        split_items(items[:1], 0.2)


class _Datastore:
    """The part of MONAI Label's datastore interface the train task reads, laid out as
    LocalDatastore keeps a studies folder (``labels/<tag>/<image id><ext>``)."""

    def __init__(self, root: Path, labels: dict[str, dict[str, str]]) -> None:
        self.root, self.labels = root, labels

    def list_images(self) -> list[str]:
        return sorted(self.labels)

    def get_labels_by_image_id(self, image_id: str) -> dict[str, str]:
        return {tag: image_id for tag in self.labels[image_id]}

    def get_image_uri(self, image_id: str) -> str:
        return str(self.root / f"{image_id}.png")

    def get_label_uri(self, label_id: str, label_tag: str) -> str:
        return str(self.root / "labels" / label_tag / f"{label_id}{self.labels[label_id][label_tag]}")


def test_labelled_items_by_tag(tmp_path):
    store = _Datastore(tmp_path, {"a": {"final": ".png", "busbra_cls": ".json"}, "b": {"final": ".png"}, "c": {}})
    assert labelled_items(store) == [
        {"image": str(tmp_path / "a.png"), "label": str(tmp_path / "labels" / "final" / "a.png")},
        {"image": str(tmp_path / "b.png"), "label": str(tmp_path / "labels" / "final" / "b.png")},
    ]
    assert labelled_items(store, "busbra_cls") == [
        {"image": str(tmp_path / "a.png"), "label": str(tmp_path / "labels" / "busbra_cls" / "a.json")}]
    assert labelled_items(store, "original") == []


def test_task_datalist_checks_and_skips_bad_labels(tmp_path):
    studies, masks = _studies(tmp_path / "studies", count=4)
    labels = tmp_path / "labels"
    labels.mkdir()
    seg = []
    for image_id, mask in masks.items():
        Image.fromarray(mask).save(labels / f"{image_id}.png")
        seg.append({"image": str(studies / f"{image_id}.png"), "label": str(labels / f"{image_id}.png")})
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(labels / "small.png")  # wrong size
    Image.fromarray(np.full((72, 88), 7, np.uint8)).save(labels / "seven.png")  # class 7 of 2
    seg += [{"image": str(studies / "us0.png"), "label": str(labels / "small.png")},
            {"image": str(studies / "us1.png"), "label": str(labels / "seven.png")}]
    datalist, skipped = task_datalist(seg, "segmentation", ["background", "nodule"], val_split=0.25, seed=0)
    assert len(datalist["training"]) == 3 and len(datalist["validation"]) == 1
    assert all(set(item) == {"image", "label"} for item in datalist["training"] + datalist["validation"])
    assert len(skipped) == 2
    assert "small.png is 10x10 pixels but its image" in skipped[0] and "us0.png is 72x88" in skipped[0]
    assert "seven.png" in skipped[1] and "[7]" in skipped[1]

    (labels / "c0.json").write_text(json.dumps({"label": "BI-RADS 3"}))
    (labels / "c1.json").write_text(json.dumps({"label": 0}))
    (labels / "c2.json").write_text(json.dumps({"label": "no such class"}))
    cls = [{"image": str(studies / "us0.png"), "label": str(labels / "c0.json")},
           {"image": str(studies / "cine.dcm"), "label": str(labels / "c1.json")},
           {"image": str(studies / "us2.png"), "label": str(labels / "c2.json")},
           {"image": str(studies / "missing.png"), "label": str(labels / "c1.json")}]
    names = ["BI-RADS 2", "BI-RADS 3", "BI-RADS 4", "BI-RADS 5"]
    datalist, skipped = task_datalist(cls, "classification", names, val_split=0.5, seed=0)
    assert sorted(item["label"] for item in datalist["training"] + datalist["validation"]) == [0, 1]
    assert len(skipped) == 2 and "no such class" in skipped[0] and "missing.png" in skipped[1]
    with pytest.raises(ValueError, match="at least 2 labelled images"):
        task_datalist(cls[2:], "classification", names)


# ------------------------------------------------------------------ the server environment


def _env_python() -> Path:
    return SERVER_ENV / "bin" / "python"


@pytest.fixture(scope="module")
def server_env() -> Path:
    """The server environment, created (or completed) by the one documented command."""
    start = time.time()
    result = subprocess.run(["bash", str(APP / "setup_env.sh"), str(SERVER_ENV)], capture_output=True, text=True,
                            timeout=1500, cwd=REPO)
    assert result.returncode == 0, f"setup_env.sh failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    print(f"server environment ready in {time.time() - start:.0f} s")
    return SERVER_ENV


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _request(url: str, data: bytes | None = None, headers: dict | None = None, method: str | None = None,
             timeout: float = 120) -> bytes:
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return response.read()


def _multipart(fields: dict[str, str], files: dict[str, Path]) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, value in fields.items():
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, path in files.items():
        body.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{path.name}"\r\n'
                   "Content-Type: application/octet-stream\r\n\r\n".encode())
        body.write(path.read_bytes())
        body.write(b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


class Server:
    """``monailabel start_server`` in the server environment (activated: the launcher runs the
    ``python`` found on PATH), on 127.0.0.1, stopped with its whole process group."""

    def __init__(self, env: Path, studies: Path, output_root: Path, log: Path, models: str) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        # the project environment's PYTHONPATH and MLflow store must not leak into the server
        environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "MLFLOW_TRACKING_URI")}
        environ.update(PATH=f"{env / 'bin'}:{environ.get('PATH', '')}", VIRTUAL_ENV=str(env), OMP_NUM_THREADS="1",
                       MONAI_LABEL_AUTO_UPDATE_SCORING="false")
        command = [str(env / "bin" / "monailabel"), "start_server", "--app", str(APP), "--studies", str(studies),
                   "--host", "127.0.0.1", "--port", str(self.port), "--conf", "models", models,
                   "--conf", "output_root", str(output_root), "--conf", "network_size", "tiny",
                   "--conf", "image_size", "64", "--conf", "num_workers", "0", "--conf", "batch_size", "2"]
        self.handle = log.open("w")
        self.process = subprocess.Popen(command, cwd=REPO, env=environ, stdout=self.handle, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def tail(self) -> str:
        return self.log.read_text()[-6000:]

    def wait_ready(self, timeout: float = 240) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.tail()}")
            try:
                return json.loads(_request(f"{self.url}/info/", timeout=10))
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(1)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        self.handle.close()


class Served:
    """The module's running server and its folders."""

    def __init__(self, server: Server, info: dict, root: Path, studies: Path, masks: dict[str, np.ndarray]) -> None:
        self.server, self.info, self.root, self.studies, self.masks = server, info, root, studies, masks
        self.output_root = root / "outputs"


@pytest.fixture(scope="module")
def served(server_env, tmp_path_factory):
    """One server for the module (it is slow to start): ddti_seg and busbra_cls with seeded
    checkpoints, musv_seg without, on phantom images and DICOMs; stopped at the end."""
    root = tmp_path_factory.mktemp("monailabel")
    studies, masks = _studies(root / "studies")
    _save_checkpoints(root / "outputs")
    # viewer sessions (POST /session/) are kept in the test's folder, not in ~/.cache
    saved = os.environ.get("MONAI_LABEL_SESSION_PATH")
    os.environ["MONAI_LABEL_SESSION_PATH"] = str(root / "sessions")
    try:
        server = Server(server_env, studies, root / "outputs", root / "server.log", "ddti_seg,busbra_cls,musv_seg")
    finally:
        if saved is None:
            os.environ.pop("MONAI_LABEL_SESSION_PATH")
        else:
            os.environ["MONAI_LABEL_SESSION_PATH"] = saved
    try:
        yield Served(server, server.wait_ready(), root, studies, masks)
    finally:
        server.stop()
    assert server.process.returncode is not None


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.timeout(1800)
def test_server_serves_and_trains_bundles_offline(served, tmp_path):
    """The real server: /info/, a mask and class probabilities equal to the bundles' own
    inference here, a DICOM frame, labels saved and a 1-epoch train request in MLflow, then
    the retrained checkpoint served."""
    server, studies, masks, output_root = served.server, served.studies, served.masks, served.output_root
    info = served.info
    # musv_seg has no checkpoint: listed as a train task only
    assert set(info["models"]) == {"ddti_seg", "busbra_cls"}, server.tail()
    assert set(info["trainers"]) == {"ddti_seg", "busbra_cls", "musv_seg"}
    assert info["models"]["ddti_seg"]["labels"] == {"nodule": 1}
    assert info["models"]["busbra_cls"]["type"] == "classification"

    # segmentation: a PNG of class indices at the image's own size, as the bundle predicts here
    mask = np.asarray(Image.open(io.BytesIO(_request(f"{server.url}/infer/ddti_seg?image=us1&output=image",
                                                     method="POST"))))
    assert mask.shape == (72, 88) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    from echocare.tasks.supervised.writers import probabilities_to_mask

    probs, item = _bundle_predict("ddti_seg", output_root, studies / "us1.png")
    expected = probabilities_to_mask(probs, item["original_size"])
    assert (mask == expected).mean() > 0.999, server.tail()

    # an uploaded multi-frame DICOM, frame 2
    body, headers = _multipart({"params": json.dumps({"frame": 2})}, {"file": studies / "cine.dcm"})
    frame_mask = np.asarray(Image.open(io.BytesIO(_request(f"{server.url}/infer/ddti_seg?output=image", body, headers))))
    probs, item = _bundle_predict("ddti_seg", output_root, studies / "cine.dcm", frame=2)
    assert frame_mask.shape == (64, 80)
    assert (frame_mask == probabilities_to_mask(probs, item["original_size"])).mean() > 0.999

    # an unreadable upload: HTTP 422 naming the problem
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    body, headers = _multipart({}, {"file": tmp_path / "broken.png"})
    with pytest.raises(urllib.error.HTTPError) as error:
        _request(f"{server.url}/infer/ddti_seg?output=image", body, headers)
    assert error.value.code == 422 and "cannot decode image" in error.value.read().decode()

    # classification: probabilities as the bundle predicts here
    result = json.loads(_request(f"{server.url}/infer/busbra_cls?image=still&output=json", method="POST"))
    params = result.get("params", result)
    probs, _ = _bundle_predict("busbra_cls", output_root, studies / "still.dcm")
    np.testing.assert_allclose([params["probabilities"][n] for n in ("BI-RADS 2", "BI-RADS 3", "BI-RADS 4", "BI-RADS 5")],
                               probs.reshape(-1).numpy(), atol=1e-4)
    assert params["label"] == ["BI-RADS 2", "BI-RADS 3", "BI-RADS 4", "BI-RADS 5"][int(probs.argmax())]

    # annotators save final labels (one of the wrong size, and a class label under its own
    # tag); a 1-epoch train request runs the bundle's train.yaml in MLflow on the good masks
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "label_us3.png")
    (tmp_path / "label_us0.json").write_text(json.dumps({"label": "BI-RADS 3"}))
    for image_id, name, tag in (("us0", "label_us0.png", "final"), ("us1", "label_us1.png", "final"),
                                ("us2", "label_us2.png", "final"), ("us3", "label_us3.png", "final"),
                                ("us0", "label_us0.json", "busbra_cls")):
        if name.endswith(".png") and image_id in masks and image_id != "us3":
            Image.fromarray(masks[image_id]).save(tmp_path / name)
        body, headers = _multipart({"params": "{}"}, {"label": tmp_path / name})
        _request(f"{server.url}/datastore/label?image={image_id}&tag={tag}", body, headers, method="PUT")
    checkpoint = output_root / "ddti_seg" / "models" / "model.pt"
    before = checkpoint.stat().st_mtime
    request = json.dumps({"max_epochs": 1, "val_split": 0.34, "run_name": "from_annotators"}).encode()
    _request(f"{server.url}/train/ddti_seg", request, {"Content-Type": "application/json"}, method="POST")
    deadline = time.time() + 600
    while time.time() < deadline:
        status = json.loads(_request(f"{server.url}/train/"))
        if status.get("status") in ("DONE", "ERROR"):
            break
        time.sleep(2)
    assert status.get("status") == "DONE", f"{status}\n{server.tail()}"
    stats = json.loads((output_root / "ddti_seg" / "monailabel" / "train_stats.json").read_text())
    assert stats["training"] == 2 and stats["validation"] == 1
    assert len(stats["skipped"]) == 1 and "us3.png is 10x12 pixels but its image" in stats["skipped"][0]
    datalist = json.loads((output_root / "ddti_seg" / "monailabel" / "datalist.json").read_text())
    used = sorted(Path(item["image"]).name for item in datalist["training"] + datalist["validation"])
    assert used == ["us0.png", "us1.png", "us2.png"]
    assert checkpoint.stat().st_mtime > before
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{output_root / 'ddti_seg' / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("ddti_seg").experiment_id])
    assert [r.info.run_name for r in runs] == ["from_annotators"]
    assert "mean_dice" in runs[0].data.metrics and runs[0].info.status == "FINISHED"

    # the retrained checkpoint is what the server now serves
    mask = np.asarray(Image.open(io.BytesIO(_request(f"{server.url}/infer/ddti_seg?image=us3&output=image",
                                                     method="POST"))))
    probs, item = _bundle_predict("ddti_seg", output_root, studies / "us3.png")
    assert (mask == probabilities_to_mask(probs, item["original_size"])).mean() > 0.999


def _probe(server_env: Path, tmp_path: Path, reads: list) -> tuple[dict, list[np.ndarray]]:
    spec = tmp_path / "probe.json"
    spec.write_text(json.dumps({"out": str(tmp_path / "probe"), "reads": reads}))
    result = subprocess.run([str(_env_python()), str(Path(__file__).parent / "monailabel_env_probe.py"), str(spec)],
                            capture_output=True, text=True, timeout=600, cwd=REPO)
    assert result.returncode == 0, result.stderr[-5000:]
    report = json.loads((tmp_path / "probe" / "report.json").read_text())
    return report, [np.load(tmp_path / "probe" / f"read_{i}.npy") for i in range(len(reads))]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_server_env_versions_and_dicom_reads(server_env, tmp_path):
    """In the server environment: pydicom 2.4, numpy 1.26, our CPU torch, every echocare
    requirement satisfied (setup.cfg's ranges hold there), and DICOMs read as here: generated
    ones (multi-frame selection, MONOCHROME1, 12 bit, RGB, YBR_FULL) and, when the real data is
    present, every scanner DICOM (palette, YBR JPEG, JPEG 2000, JPEG lossless, RLE, big endian)."""
    from pydicom.pixels import convert_color_space

    rng = np.random.default_rng(3)
    grey = rng.integers(0, 256, (3, 20, 24), dtype=np.uint8)
    rgb = rng.integers(0, 256, (18, 22, 3), dtype=np.uint8)
    reads = [
        (write_dicom(tmp_path / "cine.dcm", grey, "MONOCHROME2"), [2, 0]),
        (write_dicom(tmp_path / "m1.dcm", grey[0], "MONOCHROME1"), None),
        (write_dicom(tmp_path / "b12.dcm", grey[1].astype(np.uint16) * 16, "MONOCHROME2", bits_stored=12), None),
        (write_dicom(tmp_path / "rgb.dcm", rgb, "RGB"), None),
        (write_dicom(tmp_path / "ybr.dcm", convert_color_space(rgb, "RGB", "YBR_FULL"), "YBR_FULL"), None),
    ]
    real = find_real_data()
    scanner = sorted((real / "dicom_us").glob("*.dcm")) if real is not None else []
    reads += [(path, [0, -1]) for path in scanner]
    report, arrays = _probe(server_env, tmp_path, [[str(path), frames] for path, frames in reads])
    versions = report["versions"]
    assert versions["pydicom"].startswith("2.4.") and versions["numpy"].startswith("1.26.")
    assert versions["torch"] == torch.__version__ and versions["monailabel"] == "0.8.5"
    assert report["unmet"] == []
    assert Path(report["echocare_file"]).resolve().parent == (REPO / "echocare").resolve()
    assert len(scanner) in (0, 21)
    for (path, frames), array in zip(reads, arrays):
        here = read_ultrasound(path, frames=frames)
        assert array.shape == here.shape, path.name
        # the same decoders (Pillow, pylibjpeg) under both: equal to within one 8-bit level
        assert np.abs(array - here).max() <= 1 / 255 + 1e-6, path.name


# ------------------------------------------------------------------ request values are data (#15)


def _refused(url: str, data: bytes | None = None, headers: dict | None = None, method: str = "POST") -> tuple[int, str]:
    """The HTTP status and ``detail`` of a request the server must refuse."""
    with pytest.raises(urllib.error.HTTPError) as error:
        _request(url, data, headers, method=method)
    return error.value.code, json.loads(error.value.read().decode())["detail"]


def _train_payloads(marker: Path) -> list[tuple[str, dict]]:
    """(field, train request) pairs, each trying to ``touch marker`` through the bundle config."""
    touch = f"__import__('os').system('touch {marker}')"
    return [
        ("device", {"device": f"cpu') if {touch} else torch.device('cpu"}),
        ("run_name", {"run_name": f"${touch}"}),
        ("tracking_uri", {"tracking_uri": f"${touch}"}),
        ("tracking_experiment_name", {"tracking_experiment_name": "@device"}),
        ("label_tag", {"label_tag": "../../final"}),
        ("pretrained_path", {"pretrained_path": f"${touch}"}),
    ]


@pytest.mark.slow
@pytest.mark.e2e
def test_server_train_requests_run_no_code(served):
    """Injection payloads in POST /train (with final labels saved, so a request that got through
    would run the bundle): run_sync requests answer 422 naming the field, an asynchronous one
    is refused before it is queued (no train task exists afterwards), and the payload's file
    never appears; a batch infer request likewise."""
    server, marker = served.server, served.root / "pwned_train"
    for image_id in ("us0", "us1"):
        Image.fromarray(served.masks[image_id]).save(served.root / f"final_{image_id}.png")
        body, headers = _multipart({}, {"label": served.root / f"final_{image_id}.png"})
        _request(f"{server.url}/datastore/label?image={image_id}&tag=final", body, headers, method="PUT")
    json_type = {"Content-Type": "application/json"}
    for field, body in _train_payloads(marker):
        code, detail = _refused(f"{server.url}/train/musv_seg?run_sync=true",
                                json.dumps({"max_epochs": 1, **body}).encode(), json_type)
        assert code == 422 and detail.startswith(f"{field}: "), (field, code, detail)
    queued = _train_tasks(server)
    code, detail = _refused(f"{server.url}/train/musv_seg", json.dumps(_train_payloads(marker)[0][1]).encode(), json_type)
    assert code == 422 and detail.startswith("device: ") and "use cpu, cuda or cuda:N" in detail
    assert _train_tasks(server) == queued  # nothing was queued
    code, detail = _refused(f"{server.url}/batch/infer/ddti_seg?run_sync=true",
                            json.dumps({"label_tag": "../../x", "device": "cpu"}).encode(), json_type)
    assert code == 422 and detail.startswith("label_tag: ")
    assert not marker.exists()


def _train_tasks(server: Server) -> list[dict]:
    """The train tasks MONAI Label has run or queued (GET /train/ answers 404 when there are none)."""
    try:
        return json.loads(_request(f"{server.url}/train/?all=true", method="GET"))
    except urllib.error.HTTPError as error:
        assert error.code == 404, error.read()
        return []


@pytest.mark.slow
@pytest.mark.e2e
def test_server_infer_requests_are_checked(served):
    """POST /infer: a device payload, a traversing label tag, an unknown field and a server
    path as the image answer 422 naming the field, and write nothing; a plain request answers."""
    server, root = served.server, served.root
    marker = root / "pwned_infer"
    before = sorted(path.relative_to(root) for path in (root / "studies").rglob("*"))
    cases = [
        ("device", {"device": f"cpu') if __import__('os').system('touch {marker}') else ('cpu"}),
        ("label_tag", {"label_tag": "../../../escaped", "save_label": True}),
        ("roi_size", {"roi_size": [8, 8]}),
        ("image", {"image": str(REPO / "setup.cfg")}),
        ("image", {"image": "../studies/us0"}),
    ]
    for field, params in cases:
        body, headers = _multipart({"params": json.dumps(params)}, {})
        code, detail = _refused(f"{server.url}/infer/ddti_seg?image=us0&output=json", body, headers)
        assert code == 422 and detail.startswith(f"{field}: "), (field, code, detail)
    body, headers = _multipart({"params": json.dumps({"frame": 0, "device": "cpu"})}, {})
    result = json.loads(_request(f"{server.url}/infer/ddti_seg?image=us1&output=json", body, headers))
    assert result["size"] == [72, 88] and result["frame"] == 0
    assert not marker.exists() and not (root.parent / "escaped").exists()
    assert sorted(path.relative_to(root) for path in (root / "studies").rglob("*")) == before


@pytest.mark.slow
@pytest.mark.e2e
def test_server_uploads_stay_in_the_studies_folder(served):
    """PUT /datastore: traversing image ids and label tags, absolute ids, files of other kinds
    and an upload over an existing study are refused; a viewer session archive is not unpacked;
    a plain upload lands in the folder."""
    server, root, studies = served.server, served.root, served.studies
    image = root / "scan.png"
    Image.fromarray(np.full((20, 24), 128, np.uint8)).save(image)
    (root / "main.py").write_text("print('replaced')\n")
    (root / "train.yaml").write_text("device: $print(1)\n")
    original = (studies / "us0.png").read_bytes()
    escaped = [os.path.normpath(studies / "../../escaped_image.png"), str(root / "abs_image.png"),
               os.path.normpath(studies / "labels" / "../../../escaped_tag" / "us0.png"), str(studies / "main.py"),
               str(studies / "labels" / "final" / "us0.yaml"), str(root / "escaped_session.png")]
    cases = [
        ("image", "datastore/?image=../../escaped_image", {"file": image}),
        ("image", f"datastore/image?image={root / 'abs_image'}", {"file": image}),
        ("tag", "datastore/label?image=us0&tag=../../../escaped_tag", {"label": image}),
        ("file", "datastore/image", {"file": root / "main.py"}),
        ("label", "datastore/label?image=us0&tag=final", {"label": root / "train.yaml"}),
    ]
    for field, path, files in cases:
        body, headers = _multipart({}, files)
        code, detail = _refused(f"{server.url}/{path}", body, headers, method="PUT")
        assert code == 422 and detail.startswith(f"{field}: "), (path, code, detail)
    code, detail = _refused(f"{server.url}/datastore/label?id=us0&tag=../final", method="DELETE")
    assert code == 422 and detail.startswith("tag: ")
    body, headers = _multipart({}, {"file": image})
    code, detail = _refused(f"{server.url}/datastore/image?image=us0", body, headers, method="PUT")
    assert code == 409 and detail.startswith("image: 'us0' is already in the studies folder")
    assert (studies / "us0.png").read_bytes() == original
    # a viewer session archive with a member that climbs out of the folder it is unpacked to
    archive, content = root / "session.tar", image.read_bytes()
    with tarfile.open(archive, "w") as tar:
        member = tarfile.TarInfo("../" * 12 + str(root / "escaped_session.png").lstrip("/"))
        member.size = len(content)
        tar.addfile(member, io.BytesIO(content))
    body, headers = _multipart({}, {"files": archive})
    code, detail = _refused(f"{server.url}/session/?uncompress=true", body, headers, method="PUT")
    assert code == 422 and detail.startswith("uncompress: ")
    assert not any(os.path.lexists(path) for path in escaped)

    body, headers = _multipart({}, {"file": image})
    assert json.loads(_request(f"{server.url}/datastore/image?image=new_scan", body, headers, method="PUT")) == {
        "image": "new_scan"}
    assert (studies / "new_scan.png").read_bytes() == image.read_bytes()
