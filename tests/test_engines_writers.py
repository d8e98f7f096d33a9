"""The shared base of the file-writing handlers (:class:`echocare.engines.RunFileWriter`) and
the inference index files of :class:`~echocare.tasks.supervised.writers._PredictionWriter`, on a
bare Ignite engine whose iterations return decollated items as MONAI's engines do."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from ignite.engine import Engine

import pytest

from echocare.engines.writers import OUTPUT_NAME_KEY, PredictionWriter, RunFileWriter


def _engine(items_per_iteration: list[list[dict[str, Any]]]) -> Engine:
    """An engine whose iteration ``i`` sets ``state.batch`` / ``state.output`` to the i-th list."""

    def step(engine: Engine, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        engine.state.batch = [{"filename": item["filename"]} for item in batch]
        return [{k: v for k, v in item.items() if k != "filename"} for item in batch]

    return Engine(step), items_per_iteration


class _Recorder(RunFileWriter):
    """Records what the hooks see: pairs, picture names, and the runs it finished."""

    def __init__(self, output_dir: Path, max_images: int) -> None:
        self.finished: list[list[str]] = []
        super().__init__(output_dir, max_images)

    def reset(self) -> None:
        self.seen: list[float] = []
        self.pictures: list[str] = []

    def write_pair(self, source: dict[str, Any], output: dict[str, Any]) -> None:
        self.seen.append(output["value"])
        name = self.picture_name(source, output)
        if name is not None:
            self.pictures.append(name)

    def finish(self) -> None:
        self.finished.append(list(self.pictures))


def test_run_file_writer_resets_names_and_limits_pictures(tmp_path: Path) -> None:
    data = [
        [{"filename": "/a/case1.png", "value": 1.0}, {"filename": "/b/case1.png", "value": 2.0}],
        [{"filename": "/a/case2.dcm", "value": 3.0}],
    ]
    engine, loader = _engine(data)
    writer = _Recorder(tmp_path, max_images=2)
    writer.attach(engine)
    for _ in range(2):  # two runs (two validations): each starts afresh
        engine.run(loader, max_epochs=1)
        assert writer.seen == [1.0, 2.0, 3.0]
        # the second case1 gets a distinct stem; the third item is past max_images
        assert writer.pictures == ["case1", "case1_2"]
        assert writer.count == 2
    assert writer.finished == [["case1", "case1_2"], ["case1", "case1_2"]]


class _JsonWriter(PredictionWriter):
    def write_item(self, source: dict[str, Any], output: dict[str, Any]) -> dict[str, Any]:
        path, name, frame = self._name(source)
        record = {"image": path, "frame": frame or 0, **output}
        (self.output_dir / f"{name}.json").write_text(json.dumps(record, ensure_ascii=False))
        return record


def test_prediction_writer_index_lists_every_column_and_keeps_unicode(tmp_path: Path) -> None:
    data = [
        [{"filename": "/x/one.png", "report": "甲状腺结节", "score": 0.5}],
        [{"filename": "/x/two.png", "report": "normal", "score": 0.25, "extra": 7, "tokens": ["a", "b"]}],
    ]
    engine, loader = _engine(data)
    writer = _JsonWriter(tmp_path / "out", class_names=[])
    writer.attach(engine)
    engine.run(loader, max_epochs=1)
    records = json.loads((tmp_path / "out" / "predictions.json").read_text(encoding="utf-8"))
    assert [r["report"] for r in records] == ["甲状腺结节", "normal"]
    assert "甲状腺结节" in (tmp_path / "out" / "predictions.json").read_text(encoding="utf-8")  # not \\u escapes
    with (tmp_path / "out" / "predictions.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    # a column first seen in a later row is kept; list-valued fields stay in the JSON only
    assert list(rows[0]) == ["image", "frame", "report", "score", "extra"]
    assert rows[0]["extra"] == "" and rows[1]["extra"] == "7"
    assert rows[0]["report"] == "甲状腺结节"
    assert sorted(p.name for p in (tmp_path / "out").glob("*.json")) == ["one.json", "predictions.json", "two.json"]


@pytest.mark.parametrize("name", ["../escaped", "sub/name", "/tmp/abs", "..", "a\\b"])
def test_an_output_name_with_a_folder_in_it_is_refused(tmp_path: Path, name: str) -> None:
    writer = _JsonWriter(tmp_path / "out", class_names=[])
    writer.reset()
    with pytest.raises(ValueError, match=f"/x/one.png: {OUTPUT_NAME_KEY} .* is not a plain file name"):
        writer.write_pair({"filename": "/x/one.png", OUTPUT_NAME_KEY: name}, {"score": 0.5})
    assert not list(tmp_path.rglob("*.json"))


def test_a_given_output_name_names_the_files(tmp_path: Path) -> None:
    writer = _JsonWriter(tmp_path / "out", class_names=[])
    writer.reset()
    writer.write_pair({"filename": "/x/one.png", OUTPUT_NAME_KEY: "study_7"}, {"score": 0.5})
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["study_7.json"]
