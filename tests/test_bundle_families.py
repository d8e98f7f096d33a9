"""Bundles are copied, not shared (each can be downloaded alone, as in MONAI's model zoo), so
copies must not drift apart silently.

Each family lists its bundles and, per config file, the ids in which a member may differ from
the first member; any other difference fails, naming the bundle, the file and the id. Configs are
compared parsed (nested ids joined with ``#`` as MONAI writes them, list items by index), so
formatting and comments do not matter; the bundle's own name is replaced by ``{bundle}`` first,
so ``bundle_root: $echocare.bundle_dir('ddti_seg')`` and ``experiment_name: ddti_seg`` agree.

A change meant for the whole family is made in every member; a difference meant for one
member is listed here, with the reason.
"""

from __future__ import annotations

import configparser
import functools
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ALL = "*"  # in may_differ: any member

SEGMENTATION = ("ddti_seg", "musv_seg", "abdomen_seg")
CLASSIFICATION = ("busbra_cls", "thyroid_cls", "fll_cls")
CLIP_CLASSIFICATION = ("thyroid_cls", "fll_cls")
FINE_TUNING = (*SEGMENTATION, *CLASSIFICATION, "camus_ef", "focus_det", "brain_landmark", "usenhance", "usreport")
EVERY_BUNDLE = (*FINE_TUNING, "echocare_pretrain")
TASK_FILES = ("train.yaml", "evaluate.yaml", "inference.yaml", "multi_gpu_train.yaml", "logging.conf", "LICENSE")

#: The ids every fine-tuning bundle's files define alike: the bundle conventions (override ids),
#: how the network is built and fine-tuned, the tracking store, checkpoints and resuming, and
#: the run sections. Task data, transforms, metrics and writers differ by task.
FINE_TUNING_SHARED = {
    "train.yaml": (
        "bundle_root", "dataset_dir", "datalist", "output_dir", "network_size", "image_size", "pretrained_path",
        "checkpoint", "finetune_mode", "lora_rank", "encoder_lr", "weight_decay", "warmup_epochs", "train_fraction",
        "device", "val_batch_size", "num_workers", "cache_rate", "seed", "resume", "val_interval", "progress_bar",
        "check_images", "experiment_name", "run_name", "tracking_uri", "models_dir", "spatial_size", "is_not_rank0",
        "network", "param_groups", "optimizer", "lr_scheduler", "checkpoint_dict", "resume_checkpoint",
        "train#dataset", "train#dataloader", "train#checkpoint_handlers", "validate#dataloader",
        "initialize", "training", "run",
    ),
    "evaluate.yaml": ("checkpoint", "eval_dir", "evaluating", "run"),
    "inference.yaml": (
        "bundle_root", "output_dir", "input_dir", "datalist_key", "dataset_dir", "checkpoint", "tracking_uri",
        "predictions_dir", "network_size", "image_size", "num_workers", "device", "spatial_size", "inferring", "run",
    ),
}

#: What the clip classifiers (frames pooled over a clip) change from the image classifier.
CLIP_IDS = {
    "train.yaml": [
        "imports",  # no echocare.io: the clip loader reads the files
        "affine_translate",  # no RandAffined: clips are flipped and their intensities varied only
        "clip_frames", "clip_pooling", "network_def#clip_pooling", "load_transforms",
        "train#load_transforms", "train#augmentation", "train#preprocessing",  # clips: (F, C, H, W), flips on axis 2
    ],
    "inference.yaml": [
        "clip_frames", "clip_pooling", "network_def#clip_pooling",
        "datalist#per_frame",  # one prediction per clip, not per frame
        "preprocessing#transforms",
    ],
}


@dataclass(frozen=True)
class Family:
    """Bundles made from one copy. ``may_differ``: member (or ``*``) -> file -> ids (with everything
    under them) that may differ from the first member. ``only``: file -> the ids compared (default:
    all of them). ``files``: what is compared."""

    bundles: tuple[str, ...]
    files: tuple[str, ...] = TASK_FILES
    may_differ: Mapping[str, Mapping[str, list[str] | tuple[str, ...]]] = field(default_factory=dict)
    only: Mapping[str, tuple[str, ...]] | None = None


FAMILIES = {
    "segmentation": Family(
        SEGMENTATION,
        may_differ={ALL: {"train.yaml": ["class_names"], "inference.yaml": ["class_names"]}},
    ),
    "classification": Family(
        CLASSIFICATION,
        may_differ={
            ALL: {"train.yaml": ["class_names"], "inference.yaml": ["class_names"]},
            "thyroid_cls": CLIP_IDS,
            "fll_cls": CLIP_IDS,
        },
    ),
    "clip classification": Family(
        CLIP_CLASSIFICATION,
        may_differ={ALL: {"train.yaml": ["class_names"], "inference.yaml": ["class_names"]}},
    ),
    "fine-tuning": Family(FINE_TUNING, files=tuple(FINE_TUNING_SHARED), only=FINE_TUNING_SHARED),
    "multi-GPU overlay": Family(
        FINE_TUNING,
        files=("multi_gpu_train.yaml",),
        # every process validates on the whole list: AP needs all detections of the set
        may_differ={"focus_det": {"multi_gpu_train.yaml": ["validate#sampler", "validate#dataloader#sampler"]}},
    ),
    "every bundle": Family(EVERY_BUNDLE, files=("logging.conf", "LICENSE")),
}


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a#b#0": leaf}`` of a parsed config; an empty dict or list is a leaf."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}#{key}" if prefix else str(key)))
        return out
    if isinstance(node, list) and node:
        out = {}
        for index, value in enumerate(node):
            out.update(flatten(value, f"{prefix}#{index}" if prefix else str(index)))
        return out
    return {prefix: node}


def read(bundle: str, name: str) -> dict[str, Any]:
    """The file's ids and values, with the bundle's own name replaced by ``{bundle}``."""
    return _parse(REPO / "bundles" / bundle / ("LICENSE" if name == "LICENSE" else f"configs/{name}"), bundle, name)


@functools.lru_cache(maxsize=None)
def _parse(path: Path, bundle: str, name: str) -> dict[str, Any]:
    text = path.read_text().replace(bundle, "{bundle}")
    if name.endswith(".yaml"):
        return flatten(yaml.safe_load(text) or {})
    if name.endswith(".conf"):
        parser = configparser.ConfigParser(interpolation=None)
        parser.read_string(text)
        return {f"{s}#{k}": v for s in parser.sections() for k, v in parser[s].items()}
    return {"text": " ".join(text.split())}


def _under(node_id: str, ids: Any) -> bool:
    return any(node_id == i or node_id.startswith(f"{i}#") for i in ids)


def differences(family: Family, bundle: str, name: str) -> list[str]:
    """The ids of ``name`` in which ``bundle`` differs from the family's first member, unlisted."""
    reference, other = read(family.bundles[0], name), read(bundle, name)
    allowed = [*family.may_differ.get(ALL, {}).get(name, []), *family.may_differ.get(bundle, {}).get(name, [])]
    only = family.only.get(name) if family.only else None
    out = []
    for node_id in sorted(set(reference) | set(other)):
        if only is not None and not _under(node_id, only):
            continue
        mine, theirs = other.get(node_id, "<absent>"), reference.get(node_id, "<absent>")
        if mine != theirs and not _under(node_id, allowed):
            out.append(f"bundles/{bundle}: {name} `{node_id}` is {mine!r}, {family.bundles[0]} has {theirs!r}")
    return out


CASES = [(f, b, n) for f, fam in FAMILIES.items() for b in fam.bundles[1:] for n in fam.files]


@pytest.mark.parametrize("family,bundle,name", CASES, ids=[f"{f}-{b}-{n}" for f, b, n in CASES])
def test_family_members_differ_only_where_listed(family: str, bundle: str, name: str) -> None:
    found = differences(FAMILIES[family], bundle, name)
    assert not found, (
        f"{family} family: unlisted differences (make the change in every member of {FAMILIES[family].bundles}, "
        "or list the id in tests/test_bundle_families.py FAMILIES with the reason):\n" + "\n".join(found)
    )


def test_listed_differences_still_exist() -> None:
    """A listed id that no longer differs is stale: the list says what really differs."""
    stale = []
    for name, family in FAMILIES.items():
        for member, files in family.may_differ.items():
            members = family.bundles[1:] if member == ALL else (member,)
            for file, ids in files.items():
                reference = read(family.bundles[0], file)
                for node_id in ids:
                    def part(values: dict[str, Any], node_id: str = node_id) -> dict[str, Any]:
                        return {k: v for k, v in values.items() if _under(k, [node_id])}

                    if all(part(read(m, file)) == part(reference) for m in members):
                        stale.append(f"{name}: {member} {file} `{node_id}`")
    assert not stale, "listed as differing but equal in every member (remove from FAMILIES):\n" + "\n".join(stale)


def test_every_bundle_is_in_a_family_or_alone_on_purpose() -> None:
    """A new bundle joins the families it was copied from (at least the shared fine-tuning ids)."""
    bundles = {p.parent.parent.name for p in (REPO / "bundles").glob("*/configs/train.yaml")}
    assert bundles == set(EVERY_BUNDLE), f"add {sorted(bundles - set(EVERY_BUNDLE))} to FINE_TUNING or EVERY_BUNDLE"


def test_drift_is_reported_with_bundle_file_and_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The failure names what drifted: copy two members, change one id in one of them."""
    for bundle in SEGMENTATION[:2]:
        source = REPO / "bundles" / bundle
        (tmp_path / "bundles" / bundle / "configs").mkdir(parents=True)
        (tmp_path / "bundles" / bundle / "LICENSE").write_text((source / "LICENSE").read_text())
        for f in (source / "configs").iterdir():
            (tmp_path / "bundles" / bundle / "configs" / f.name).write_text(f.read_text())
    train = tmp_path / "bundles" / SEGMENTATION[1] / "configs" / "train.yaml"
    train.write_text(train.read_text().replace("include_background: false", "include_background: true"))
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    found = differences(FAMILIES["segmentation"], SEGMENTATION[1], "train.yaml")
    assert found == [f"bundles/{SEGMENTATION[1]}: train.yaml `loss#include_background` is True, {SEGMENTATION[0]} has False"]
