"""The MONAI Label app serves every task bundle (issue #18): detection (focus_det), landmarks
(brain_landmark), EF (camus_ef), enhancement (usenhance) and report (usreport). JSON labels are
read and checked here; the real server (its own environment, one per module, on 127.0.0.1)
answers inference equal to the bundles' own ``inferring`` runs here, refuses bad request fields
and labels with 422 naming the field, and trains each bundle for one epoch on saved labels.
"""

from __future__ import annotations

import io
import json
import sys
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dicom_helpers import write_dicom
from echocare.phantoms.renderer import make_phantom_image
from echocare.tasks.detection.writers import ellipse_label_map
from echocare.tasks.landmarks import BRAIN_LANDMARK_NAMES
from echocare.tasks.landmarks.writers import landmark_label_map
from echocare.tasks.report.tokenizer import ReportTokenizer
from test_apps_monailabel import APP, Server, _multipart, _refused, _request, server_env  # noqa: F401

sys.path.insert(0, str(APP))

from lib.bundles import OTHER_TASKS, bundle_config, bundle_overrides, selected_models  # noqa: E402
from lib.labels import LabelFileError, read_json_label, task_datalist  # noqa: E402

SMALL = {"network_size": "tiny", "image_size": "64"}
REPORTS = ["liver normal size smooth contour", "hepatic cyst in the right lobe", "fatty liver diffuse echogenicity"]
ELLIPSES = {"ellipses": [[44, 36, 30, 22, 10], [46, 38, 12, 9, -20]], "classes": ["thorax", 1]}


# ------------------------------------------------------------------ JSON labels (this environment)


def test_json_labels_are_checked_as_data(tmp_path):
    names = ["thorax", "heart"]
    cases = {
        "det.json": (ELLIPSES, "detection", names,
                     {"ellipses": [[44.0, 36.0, 30.0, 22.0, 10.0], [46.0, 38.0, 12.0, 9.0, -20.0]], "classes": [0, 1]}),
        "lm.json": ({"landmarks": {"a": [1, 2], "b": [3.5, 4]}, "image_size": [9, 9]}, "landmarks", ["b", "a"],
                    {"landmarks": [[3.5, 4.0], [1.0, 2.0]]}),
        "ef.json": ({"ef": 55.5, "es_frame": 3, "unit": "percent"}, "regression", [], {"ef": 55.5, "es_frame": 3}),
        "rep.json": ({"report": "$__import__('os')", "image2": "us1"}, "report", [],
                     {"report": "$__import__('os')", "image2": "us1"}),
    }
    for name, (content, task, task_names, expected) in cases.items():
        (tmp_path / name).write_text(json.dumps(content))
        assert read_json_label(tmp_path / name, task, task_names) == expected
    bad = [
        ('{"ellipses": [[1, 2, 3, 4]], "classes": [0]}', "detection", r"ellipse 0 \[1, 2, 3, 4\] is not"),
        ('{"ellipses": [[1, 2, 0, 4, 0]], "classes": [0]}', "detection", "semi-axis <= 0"),
        ('{"ellipses": [[1, 2, 3, 4, 0]], "classes": ["lung"]}', "detection", "class 'lung' is not one of"),
        ('{"ellipses": [[1, 2, 3, 4, 0]], "classes": []}', "detection", "one class per ellipse"),
        ('{"landmarks": [[1, 2]]}', "landmarks", "with 2 points"),
        ('{"landmarks": {"a": [1, 2], "c": [1, 2]}}', "landmarks", r"missing \['b'\], unknown \['c'\]"),
        ('{"ef": NaN}', "regression", "NaN is not a JSON number"),
        ('{"ef": 120}', "regression", "not a percentage"),
        ('{"ef": "55"}', "regression", "'55' is not a number"),
        ('{"ef": 50, "ed_frame": -1}', "regression", "not a frame index"),
        ('{"report": ""}', "report", "a report label is"),
        ('{"report": "x", "image2": "../us1"}', "report", "must be a plain name"),
        ("[1, 2]", "report", "is an object"),
        ("not json", "report", "not a usable JSON label"),
        (json.dumps({"report": "x" * 300_000}), "report", "bytes; a JSON label holds at most"),
    ]
    for k, (text, task, message) in enumerate(bad):
        (tmp_path / f"bad{k}.json").write_text(text)
        with pytest.raises(LabelFileError, match=message) as error:
            read_json_label(tmp_path / f"bad{k}.json", task, ["a", "b"])
        assert str(error.value).startswith(str(tmp_path / f"bad{k}.json"))


def test_task_datalists_of_the_other_tasks(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(make_phantom_image(rng, size=64)[0]).save(tmp_path / f"us{i}.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "r0.json").write_text(json.dumps({"report": REPORTS[0], "image2": "us1"}))
    (tmp_path / "r1.json").write_text(json.dumps({"report": REPORTS[1]}))
    (tmp_path / "r2.json").write_text(json.dumps({"report": REPORTS[2], "image2": "gone"}))
    items = [{"image": str(tmp_path / f"us{i}.png"), "label": str(tmp_path / f"r{i}.json")} for i in range(3)]
    datalist, skipped = task_datalist(items, "report", [], val_split=0, image_path=lambda i: (
        str(tmp_path / f"{i}.png") if (tmp_path / f"{i}.png").is_file() else ""))
    assert datalist["training"] == [
        {"images": [str(tmp_path / "us0.png"), str(tmp_path / "us1.png")], "report": REPORTS[0]},
        {"images": [str(tmp_path / "us1.png")] * 2, "report": REPORTS[1]}]
    assert len(skipped) == 1 and "image2 'gone' is not an image of the studies folder" in skipped[0]

    # EF: an ED/ES index past the study's frames is skipped and named, not left to fail the whole training
    frames = np.stack([make_phantom_image(rng, size=64)[0] for _ in range(3)])
    write_dicom(tmp_path / "cine.dcm", frames, "MONOCHROME2", FrameTime=33.0)
    (tmp_path / "ef_ok.json").write_text(json.dumps({"ef": 55.0, "ed_frame": 0, "es_frame": 2}))
    (tmp_path / "ef_late.json").write_text(json.dumps({"ef": 40.0, "ed_frame": 0, "es_frame": 3}))
    (tmp_path / "ef_still.json").write_text(json.dumps({"ef": 60.0, "es_frame": 1}))
    (tmp_path / "ef_none.json").write_text(json.dumps({"ef": 50.0}))
    efs = [{"image": str(tmp_path / "cine.dcm"), "label": str(tmp_path / "ef_ok.json")},
           {"image": str(tmp_path / "cine.dcm"), "label": str(tmp_path / "ef_late.json")},
           {"image": str(tmp_path / "us0.png"), "label": str(tmp_path / "ef_still.json")},
           {"image": str(tmp_path / "us0.png"), "label": str(tmp_path / "ef_none.json")}]
    datalist, skipped = task_datalist(efs, "regression", [], val_split=0)
    assert datalist["training"] == [{"image": str(tmp_path / "cine.dcm"), "ef": 55.0, "ed_frame": 0, "es_frame": 2},
                                    {"image": str(tmp_path / "us0.png"), "ef": 50.0}]
    assert skipped == [f"{tmp_path / 'cine.dcm'}: es_frame=3 but the sequence has 3 frames",
                       f"{tmp_path / 'us0.png'}: es_frame=1 but the sequence has 1 frames"]

    pairs = [{"image": str(tmp_path / "us0.png"), "label": str(tmp_path / "us1.png")},
             {"image": str(tmp_path / "us1.png"), "label": str(tmp_path / "small.png")},
             {"image": str(tmp_path / "us2.png"), "label": str(tmp_path / "r0.json")}]
    datalist, skipped = task_datalist(pairs, "enhancement", [], val_split=0)
    assert datalist["training"] == [{"image": str(tmp_path / "us0.png"), "target": str(tmp_path / "us1.png")}]
    assert "small.png: target of 10x10 pixels but its image" in skipped[0] and "r0.json" in skipped[1]


def test_label_maps_of_ellipses_and_landmarks():
    label = ellipse_label_map([[40, 30, 20, 10, 0], [40, 30, 5, 5, 0]], [0, 1], (60, 80))
    assert label.shape == (60, 80) and label.dtype == np.uint8
    assert label[30, 40] == 2 and label[30, 55] == 1 and label[30, 65] == 0 and label[45, 40] == 0
    assert abs((label > 0).sum() - np.pi * 20 * 10) < 0.1 * np.pi * 20 * 10  # PIL fills the edge pixels too
    discs = landmark_label_map([[10, 10], [50.5, 20]], (40, 60), radius=2)
    assert discs[10, 10] == 1 and discs[20, 50] == 2 and discs[20, 51] == 2 and discs[30, 30] == 0
    assert 9 <= (discs == 1).sum() <= 25  # a radius-2 disc: 3x3 to 5x5 pixels


def test_every_task_bundle_is_served():
    assert selected_models("all")[-5:] == list(OTHER_TASKS)
    assert len(selected_models("all")) == 11


# ------------------------------------------------------------------ the real server


def _studies(root: Path) -> Path:
    """Phantom PNGs (72x88), a second view, high-quality targets and a 3-frame cine DICOM."""
    rng = np.random.default_rng(11)
    root.mkdir(parents=True)
    for i in range(3):
        image = make_phantom_image(rng, size=96)[0][:72, :88]
        Image.fromarray(image).save(root / f"us{i}.png")
    frames = np.stack([make_phantom_image(rng, size=96)[0][:64, :80] for _ in range(3)])
    write_dicom(root / "cine.dcm", frames, "MONOCHROME2", FrameTime=33.0)
    return root


def _save_checkpoints(output_root: Path) -> None:
    """Seeded tiny networks as the five bundles' served checkpoints, built from each bundle's own
    ``network_def`` (usreport's tokenizer beside its checkpoint)."""
    torch.manual_seed(0)
    for name in OTHER_TASKS:
        models = output_root / name / "models"
        models.mkdir(parents=True)
        if name == "usreport":
            ReportTokenizer.train(REPORTS).save(models / "tokenizer.json")
        config = bundle_config(name, "inference.yaml", bundle_overrides(name, {"output_root": str(output_root), **SMALL}))
        torch.save(config.get_parsed_content("network_def").state_dict(), models / "model.pt")


def _bundle_inference(name: str, output_root: Path, image: Path, work: Path) -> dict:
    """The bundle's own ``run inferring`` here on one input: its predictions.json record."""
    from monai.bundle import run

    config_file = str(APP.parents[1] / "bundles" / name / "configs" / "inference.yaml")
    run("inferring", config_file=config_file, input_dir=str(image), output_dir=str(output_root / name),
        predictions_dir=str(work), num_workers=0, device="$torch.device('cpu')", network_size="tiny", image_size=64)
    records = json.loads((work / "predictions.json").read_text())
    return records[0]


@pytest.fixture(scope="module")
def served(server_env, tmp_path_factory):
    """One server for the module: the five bundles, each with a seeded tiny checkpoint."""
    root = tmp_path_factory.mktemp("monailabel_tasks")
    studies = _studies(root / "studies")
    _save_checkpoints(root / "outputs")
    server = Server(server_env, studies, root / "outputs", root / "server.log", ",".join(OTHER_TASKS))
    try:
        yield server, server.wait_ready(), root
    finally:
        server.stop()


def _infer(server: Server, model: str, query: str, params: dict | None = None, output: str = "all") -> tuple:
    """(result file bytes or None, result JSON) of POST /infer/<model>."""
    body, headers = _multipart({"params": json.dumps(params or {})}, {})
    raw = _request(f"{server.url}/infer/{model}?{query}&output=json", body, headers)
    result = json.loads(raw)
    file = None
    if output == "image":
        file = _request(f"{server.url}/infer/{model}?{query}&output=image", body, headers)
    return file, result


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.timeout(1800)
def test_server_infers_every_task_as_its_bundle(served, tmp_path):
    server, info, root = served
    outputs, studies = root / "outputs", root / "studies"
    assert set(info["models"]) == set(OTHER_TASKS) and set(info["trainers"]) == set(OTHER_TASKS), server.tail()
    assert info["models"]["focus_det"]["labels"] == {"thorax": 1, "heart": 2}
    assert len(info["models"]["brain_landmark"]["labels"]) == len(BRAIN_LANDMARK_NAMES)

    # detection: the bundle's ellipses and ratio; a label map of the best ellipse of each class
    png, result = _infer(server, "focus_det", "image=us1", output="image")
    expected = _bundle_inference("focus_det", outputs, studies / "us1.png", tmp_path / "det")
    assert result["ellipses"] == expected["ellipses"] and result["ctr"] == expected["ctr"], server.tail()
    assert result["best"] == expected["best"] and result["size"] == [72, 88]
    best = list(expected["best"].values())
    drawn = ellipse_label_map([[r["cx"], r["cy"], r["semi_major"], r["semi_minor"], r["angle"]] for r in best],
                              [r["class_index"] for r in best], (72, 88))
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), drawn) and drawn.any()

    # landmarks: the bundle's points, a disc per landmark index; frame 2 of the cine DICOM
    png, result = _infer(server, "brain_landmark", "image=cine", {"frame": 2}, output="image")
    record = _bundle_inference("brain_landmark", outputs, studies / "cine.dcm", tmp_path / "lm")
    assert record["frame"] == 0 and result["frame"] == 2 and result["size"] == [64, 80]
    _, result0 = _infer(server, "brain_landmark", "image=cine", {"frame": 0})
    assert result0["landmarks"] == record["landmarks"]
    label = np.asarray(Image.open(io.BytesIO(png)))
    assert label.shape == (64, 80) and set(np.unique(label)) - {0} <= set(range(1, len(BRAIN_LANDMARK_NAMES) + 1))
    assert np.array_equal(label, landmark_label_map([result["landmarks"][n] for n in BRAIN_LANDMARK_NAMES], (64, 80)))

    # EF: percent and the frames used, as the bundle's own run
    _, result = _infer(server, "camus_ef", "image=cine")
    record = _bundle_inference("camus_ef", outputs, studies / "cine.dcm", tmp_path / "ef")
    assert result["ef"] == record["ef"] and result["frames_used"] == record["frames_used"] == sorted(result["frames_used"])
    assert set(result["frames_used"]) == {0, 1, 2}

    # enhancement: the bundle's enhanced PNG at the image's size
    png, result = _infer(server, "usenhance", "image=us2", output="image")
    record = _bundle_inference("usenhance", outputs, studies / "us2.png", tmp_path / "en")
    assert result["size"] == [72, 88]
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), np.asarray(Image.open(record["enhanced_png"])))

    # report: the text of the bundle's run on the same two views
    _, result = _infer(server, "usreport", "image=us0", {"image2": "us0"})
    record = _bundle_inference("usreport", outputs, studies / "us0.png", tmp_path / "rep")
    assert result["report"] == record["report"] and result["tokens"] == record["tokens"]
    _, other = _infer(server, "usreport", "image=us0", {"image2": "us1"})
    assert isinstance(other["report"], str)


@pytest.mark.slow
@pytest.mark.e2e
def test_server_refuses_bad_fields_and_labels(served):
    """New request fields and JSON labels are checked: 422 naming the field, nothing queued."""
    server, _, root = served
    cases = [
        ("usreport", {"image2": "../studies/us0"}, "image2: "),
        ("usreport", {"image2": "missing"}, "image2: no image 'missing'"),
        ("usreport", {"image2": str(root / "studies" / "us0.png")}, "image2: "),
        ("camus_ef", {"frame": 1}, "frame: unknown field"),
        ("focus_det", {"image2": "us0"}, "image2: unknown field"),
    ]
    for model, params, start in cases:
        body, headers = _multipart({"params": json.dumps(params)}, {})
        code, detail = _refused(f"{server.url}/infer/{model}?image=us0&output=json", body, headers)
        assert code == 422 and detail.startswith(start), (model, params, detail)
    json_type = {"Content-Type": "application/json"}
    for body, start in [({"label_tag": "final"}, "label_tag: unknown field"), ({"target_tag": "../x"}, "target_tag: ")]:
        code, detail = _refused(f"{server.url}/train/usenhance", json.dumps(body).encode(), json_type)
        assert code == 422 and detail.startswith(start), detail
    labels = root / "bad_labels"
    labels.mkdir()
    for name, text in [("big.json", json.dumps({"report": "x" * 300_000})), ("list.json", "[1]"),
                       ("nan.json", '{"ef": NaN}')]:
        (labels / name).write_text(text)
        body, headers = _multipart({}, {"label": labels / name})
        code, detail = _refused(f"{server.url}/datastore/label?image=us0&tag=final", body, headers, method="PUT")
        assert code == 422 and detail.startswith("label: "), (name, detail)
    assert not (root / "studies" / "labels" / "final" / "us0.json").exists()


def _train(server: Server, model: str, body: dict, run_sync: bool = False) -> dict:
    """POST /train/<model>: in the server's own process with ``run_sync`` (MONAI Label's option:
    the answer is the train task's stats), else as the viewers ask, in a background process that
    loads the app anew (about 20 s here), polled until done."""
    query = "?run_sync=true" if run_sync else ""
    try:
        answer = _request(f"{server.url}/train/{model}{query}", json.dumps({"max_epochs": 1, **body}).encode(),
                          {"Content-Type": "application/json"}, method="POST", timeout=600)
    except urllib.error.HTTPError as error:
        raise AssertionError(f"{model}: training answered {error.code}\n{server.tail()}") from error
    if run_sync:
        return {"status": "DONE", "result": json.loads(answer)}
    deadline = time.time() + 600
    while time.time() < deadline:
        status = json.loads(_request(f"{server.url}/train/"))
        if status.get("status") in ("DONE", "ERROR"):
            return status
        time.sleep(0.5)
    raise AssertionError(f"{model}: training did not finish\n{server.tail()}")


def _save_label(server: Server, image_id: str, tag: str, path: Path) -> None:
    body, headers = _multipart({}, {"label": path})
    _request(f"{server.url}/datastore/label?image={image_id}&tag={tag}", body, headers, method="PUT")


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.timeout(1800)
def test_server_trains_every_task_on_saved_labels(served):
    """JSON labels (tag final) and enhancement targets (tag target) saved over REST; one epoch of
    each bundle in MLflow; a bad label skipped and named; a report's text is data."""
    server, _, root = served
    outputs, labels = root / "outputs", root / "train_labels"
    labels.mkdir()
    marker = root / "pwned_report"
    landmarks = {n: [10 + 2 * k, 12 + k] for k, n in enumerate(BRAIN_LANDMARK_NAMES)}
    per_task = {
        "focus_det": [ELLIPSES, ELLIPSES, {"ellipses": [[1, 2, 3]], "classes": [0]}],
        "brain_landmark": [{"landmarks": landmarks}, {"landmarks": list(landmarks.values())},
                           {"landmarks": list(landmarks.values())}],
        "camus_ef": [{"ef": 60.0}, {"ef": 48.0}, {"ef": 35.5, "ed_frame": 0, "es_frame": 2}],  # frames: on the cine
        "usreport": [{"report": REPORTS[0], "image2": "us1"},
                     {"report": f"$__import__('os').system('touch {marker}')"}, {"report": REPORTS[2]}],
    }
    images = ["us0", "us1", "cine"]
    expected_skipped = {"focus_det": 1}
    for model, contents in per_task.items():
        for image_id, content in zip(images, contents):
            path = labels / f"{model}_{image_id}.json"
            path.write_text(json.dumps(content))
            _save_label(server, image_id, "final", path)  # one final label per image: saved per task, in turn
        before = (outputs / model / "models" / "model.pt").stat().st_mtime
        # in the server's process: the per-task path (labels, datalist, bundle) is what differs;
        # enhancement below goes through the background process the viewers use
        status = _train(server, model, {"val_split": 0, "run_name": f"{model}_annotated"}, run_sync=True)
        assert status["status"] == "DONE", f"{model}: {status}\n{server.tail()}"
        stats = json.loads((outputs / model / "monailabel" / "train_stats.json").read_text())
        assert stats["training"] == 3 - expected_skipped.get(model, 0), (model, stats)
        assert len(stats["skipped"]) == expected_skipped.get(model, 0), (model, stats)
        assert (outputs / model / "models" / "model.pt").stat().st_mtime > before
        _assert_run(outputs / model, model)
    assert "ellipse 0 [1, 2, 3] is not" in json.loads(
        (outputs / "focus_det" / "monailabel" / "train_stats.json").read_text())["skipped"][0]
    assert not marker.exists()
    datalist = json.loads((outputs / "usreport" / "monailabel" / "datalist.json").read_text())
    views = {Path(item["images"][0]).name: [Path(p).name for p in item["images"]] for item in datalist["training"]}
    assert views["us0.png"] == ["us0.png", "us1.png"]  # the request's second view; one view otherwise twice

    # enhancement: targets under their own tag
    rng = np.random.default_rng(5)
    for image_id in ("us0", "us1"):
        target = labels / f"target_{image_id}.png"
        Image.fromarray(make_phantom_image(rng, size=96)[0][:72, :88]).save(target)
        _save_label(server, image_id, "target", target)
    status = _train(server, "usenhance", {"val_split": 0, "run_name": "usenhance_annotated"})
    assert status["status"] == "DONE", f"{status}\n{server.tail()}"
    stats = json.loads((outputs / "usenhance" / "monailabel" / "train_stats.json").read_text())
    assert stats["training"] == 2 and stats["skipped"] == []
    _assert_run(outputs / "usenhance", "usenhance")


def _assert_run(output_dir: Path, model: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{output_dir / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name(model).experiment_id])
    assert [r.info.run_name for r in runs] == [f"{model}_annotated"] and runs[0].info.status == "FINISHED"
