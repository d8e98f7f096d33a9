"""Unit tests of the pieces the pretraining bundle is assembled from: augmentations, sampler,
datalist checks, metrics and handlers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from echocare.tasks.pretrain import AnatomyLabeld, RandColorJitterd, RandGrayscaled, RandResizedCropd
from echocare.datasets import DatalistError, ResumableSampler, check_image_size, list_inputs, load_datalist
from echocare.engines import find_resume_checkpoint, write_panel
from echocare.engines.metrics import MeanOfOutput
from echocare.tasks.pretrain import AnatomyLevelAccuracy
from echocare.ontology import UnknownAnatomyError, load_ontology


# ---------------------------------------------------------------- augmentations
def test_rand_resized_crop_zooms_into_one_box_for_all_keys():
    ramp = torch.linspace(0, 1, 64).reshape(1, 1, 64).expand(3, 64, 64).clone()
    crop = RandResizedCropd(["image", "other"], prob=1.0, scale=(0.25, 0.25), ratio=(1.0, 1.0))
    crop.set_random_state(0)
    out = crop({"image": ramp, "other": ramp.clone()})
    assert out["image"].shape == (3, 64, 64)
    assert torch.equal(out["image"], out["other"])  # same box for every key
    row = out["image"][0, 32]
    # a 32-pixel-wide box resized to 64: the ramp spans about half the range, still increasing
    assert 0.4 < float(row[-1] - row[0]) < 0.6 and bool((row[1:] >= row[:-1] - 1e-6).all())


def test_rand_resized_crop_with_prob_zero_is_identity():
    image = torch.rand(3, 32, 32)
    assert torch.equal(RandResizedCropd("image", prob=0.0)({"image": image})["image"], image)


def test_rand_grayscale_gives_luma_in_every_channel():
    image = torch.zeros(3, 4, 4)
    image[0] = 1.0  # pure red
    out = RandGrayscaled("image", prob=1.0)({"image": image})["image"]
    assert torch.allclose(out, torch.full((3, 4, 4), 0.299))


def test_color_jitter_stays_in_range_and_is_identity_at_zero_strength():
    image = torch.rand(3, 16, 16)
    same = RandColorJitterd("image", prob=1.0, brightness=0, contrast=0, saturation=0)({"image": image})["image"]
    assert torch.allclose(same, image, atol=1e-6)
    jitter = RandColorJitterd("image", prob=1.0, brightness=0.5, contrast=0.5, saturation=0.5)
    jitter.set_random_state(3)
    out = jitter({"image": image})["image"]
    assert out.min() >= 0 and out.max() <= 1 and not torch.allclose(out, image)


def test_anatomy_labeld_builds_label_and_known_vectors():
    ontology = load_ontology()
    labeled = AnatomyLabeld(ontology)({"image": "x.png", "anatomy": "thorax/heart"})
    heart, thorax = ontology.index("thorax/heart"), ontology.index("thorax")
    a4c = ontology.index("thorax/heart/apical four-chamber")
    labels, known = labeled["anatomy_labels"], labeled["anatomy_known"]
    assert labels[heart] == 1 and labels[thorax] == 1 and labels.sum() == 2
    assert not known[a4c] and known[ontology.index("abdomen/liver")]
    unlabelled = AnatomyLabeld(ontology)({"image": "x.png"})
    assert unlabelled["anatomy"] == "" and not unlabelled["anatomy_known"].any()


# ---------------------------------------------------------------- sampler
def test_resumed_epoch_yields_exactly_the_remaining_batches():
    data = list(range(50))
    full = ResumableSampler(data, batch_size=4, seed=7)
    full.set_epoch(3)
    order = list(full)
    resumed = ResumableSampler(data, batch_size=4, seed=7)
    resumed.set_epoch(3, start_batch=5)
    assert list(resumed) == order[20:]
    assert sorted(order) == data and len(full) == 50
    other_epoch = ResumableSampler(data, batch_size=4, seed=7)
    other_epoch.set_epoch(4)
    assert list(other_epoch) != order


def test_sampler_shards_are_disjoint_and_cover_the_data():
    data = list(range(11))
    shards = []
    for rank in range(2):
        sampler = ResumableSampler(data, batch_size=2, seed=1, num_replicas=2, rank=rank)
        sampler.set_epoch(1)
        shards.append(list(sampler))
    assert len(shards[0]) == len(shards[1]) == 6  # padded by wrapping to equal shares
    assert set(shards[0]) | set(shards[1]) == set(data)
    restored = ResumableSampler(data, batch_size=2, seed=99)
    restored.load_state_dict(ResumableSampler(data, batch_size=2, seed=1).state_dict())
    assert restored.seed == 1


# ---------------------------------------------------------------- datalist checks
@pytest.fixture()
def images(tmp_path) -> Path:
    for i in range(3):
        Image.fromarray(np.full((40, 48), 60 * i, np.uint8)).save(tmp_path / f"im{i}.png")
    Image.fromarray(np.zeros((8, 48), np.uint8)).save(tmp_path / "thin.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnope")
    return tmp_path


def test_load_datalist_resolves_paths_and_keeps_items(images):
    datalist = images / "list.json"
    datalist.write_text(json.dumps({"training": [{"image": "im0.png", "anatomy": "thorax/breast"}, "im1.png"]}))
    items = load_datalist(datalist, "training", ontology=load_ontology())
    assert [Path(i["image"]) for i in items] == [images / "im0.png", images / "im1.png"]
    assert items[0]["anatomy"] == "thorax/breast"


def test_load_datalist_reports_every_problem_at_once(images):
    datalist = images / "list.json"
    datalist.write_text(json.dumps({"training": [
        {"image": "missing.png"}, {"image": "broken.png"}, {"image": "thin.png"},
        {"image": "im2.png", "anatomy": "abdomen/livr"},
    ]}))
    with pytest.raises(DatalistError) as error:
        load_datalist(datalist, "training", ontology=load_ontology())
    message = str(error.value)
    assert message.startswith(f"{datalist} [training]: 4 problem(s)")
    assert "missing.png: file not found" in message
    assert "broken.png" in message and "thin.png: is 8x48 pixels" in message
    assert "abdomen/livr" in message and "abdomen/liver" in message  # the suggestion


def test_load_datalist_missing_list_and_bad_json(images):
    datalist = images / "list.json"
    datalist.write_text(json.dumps({"training": []}))
    with pytest.raises(DatalistError, match="no list 'validation'"):
        load_datalist(datalist, "validation")
    datalist.write_text("{not json")
    with pytest.raises(DatalistError, match="not valid JSON"):
        load_datalist(datalist)


def test_check_image_size():
    assert check_image_size(64) == (64, 64) and check_image_size([96, 128]) == (96, 128)
    for bad in (100, 0, [64, 48]):
        with pytest.raises(ValueError, match="not usable"):
            check_image_size(bad)


def test_list_inputs_from_folder_file_and_datalist(images):
    found = list_inputs(images)
    assert [Path(i["image"]).name for i in found] == ["broken.png", "im0.png", "im1.png", "im2.png", "thin.png"]
    assert all(i["anatomy"] == "" for i in found)
    assert list_inputs(images / "im0.png") == [{"image": str(images / "im0.png"), "anatomy": ""}]
    datalist = images / "list.json"
    datalist.write_text(json.dumps({"validation": [{"image": "im1.png", "anatomy": "other", "label": 3}]}))
    assert list_inputs(datalist) == [{"image": str(images / "im1.png"), "anatomy": "other"}]
    with pytest.raises(DatalistError, match="no such file or folder"):
        list_inputs(images / "nowhere")


# ---------------------------------------------------------------- metrics
def test_mean_of_output():
    metric = MeanOfOutput("masked_l1")
    metric.update([{"masked_l1": torch.tensor(0.5)}, {"masked_l1": 0.25}])
    metric.update([{"masked_l1": 0.0}])
    assert metric.compute() == pytest.approx(0.25)


def test_anatomy_level_accuracy_by_greedy_descent():
    ontology = load_ontology()

    def scores(*paths: str) -> torch.Tensor:
        s = torch.full((ontology.num_nodes,), 0.1)
        for path in paths:
            s[ontology.index(path)] = 0.9
        return s

    outputs = [
        {"anatomy": "thorax/heart/apical four-chamber", "anatomy_scores": scores("thorax", "thorax/heart", "thorax/heart/apical two-chamber")},
        {"anatomy": "abdomen/liver", "anatomy_scores": scores("abdomen", "abdomen/kidney")},
        {"anatomy": "thorax", "anatomy_scores": scores("abdomen")},
        {"anatomy": "", "anatomy_scores": scores("thorax")},  # unlabelled: not counted
    ]
    expected = {"region": 2 / 3, "organ": 1 / 2, "structure": 0 / 1}
    for level, value in expected.items():
        metric = AnatomyLevelAccuracy(ontology, level)
        metric.update(outputs)
        assert metric.compute() == pytest.approx(value), level
    empty = AnatomyLevelAccuracy(ontology, "structure")
    empty.update(outputs[1:])
    assert np.isnan(empty.compute())


# ---------------------------------------------------------------- handlers
def test_find_resume_checkpoint_prefers_latest_readable(tmp_path):
    assert find_resume_checkpoint(tmp_path, resume=True) is None
    torch.save({"trainer": {"iteration": 6}}, tmp_path / "checkpoint_iteration=6.pt")
    (tmp_path / "checkpoint_iteration=9.pt").write_bytes(b"cut short by a crash")
    assert find_resume_checkpoint(tmp_path, resume=False) is None
    assert find_resume_checkpoint(tmp_path, resume=True) == str(tmp_path / "checkpoint_iteration=6.pt")


def test_write_panel_lays_out_rows_and_columns(tmp_path):
    white, black = torch.ones(3, 8, 10), torch.zeros(3, 8, 10)
    path = write_panel([[white, black], [black, white]], tmp_path / "p.png", gap=2)
    panel = np.asarray(Image.open(path))
    assert panel.shape == (18, 22, 3)
    assert panel[0, 0].tolist() == [255, 255, 255] and panel[0, 12].tolist() == [0, 0, 0]
    assert panel[10, 0].tolist() == [0, 0, 0] and panel[10, 12].tolist() == [255, 255, 255]


def test_unknown_anatomy_error_is_a_value_error():
    assert issubclass(UnknownAnatomyError, ValueError)


def test_as_bool_reads_command_line_flags():
    from echocare import as_bool

    assert [as_bool(v) for v in ("true", "False", "1", "no", True, 0)] == [True, False, True, False, True, False]
    with pytest.raises(ValueError, match="not a yes/no value"):
        as_bool("maybe")
