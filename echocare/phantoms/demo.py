"""The demo-data registry: one phantom generator per task (``echocare demo-data --task NAME``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from echocare.phantoms.detection import generate_focus_det
from echocare.phantoms.enhancement import generate_usenhance
from echocare.phantoms.landmarks import generate_brain_landmark
from echocare.phantoms.pretrain import generate_pretrain
from echocare.phantoms.regression import generate_camus_ef
from echocare.phantoms.report import generate_usreport
from echocare.phantoms.supervised import generate_abdomen_seg, generate_fll_cls, generate_musv_seg, generate_thyroid_cls

__all__ = ["TASKS", "generate_demo_data"]

#: Demo-data generator per task: ``fn(out, n, seed, image_size, val_fraction, **options)``
#: writes the files under ``out`` and returns the datalist dict (paths relative to out).
#: The benchmark phantoms (:mod:`echocare.phantoms.supervised`) write their dataset's
#: official layout under ``out/<dataset>/`` and return its converter's datalist:
#: ``abdomen_seg`` (out/abdomen), ``musv_seg`` (out/musv), ``thyroid_cls``
#: (out/thyroid_cine + out/thyroid_cine_clips), ``fll_cls`` (out/fll_ceus).
TASKS: dict[str, Callable[..., dict[str, list[dict]]]] = {
    "pretrain": generate_pretrain,
    "abdomen_seg": generate_abdomen_seg,
    "musv_seg": generate_musv_seg,
    "thyroid_cls": generate_thyroid_cls,
    "fll_cls": generate_fll_cls,
    "camus_ef": generate_camus_ef,
    "brain_landmark": generate_brain_landmark,
    "usreport": generate_usreport,
    "focus_det": generate_focus_det,
    "usenhance": generate_usenhance,
}


def generate_demo_data(
    task: str,
    out: str | Path,
    n: int = 64,
    seed: int = 0,
    image_size: int = 256,
    val_fraction: float = 0.2,
    **options,
) -> Path:
    """Write a synthetic data set for ``task`` and its MONAI datalist.

    ``pretrain`` writes ``out/images/pretrain_<i>.png`` (8-bit grey). The benchmark
    tasks (``abdomen_seg``, ``musv_seg``, ``thyroid_cls``, ``fll_cls``) write their
    dataset's official download layout under ``out/<dataset>/`` and convert it with the
    dataset's converter (see :mod:`echocare.phantoms.supervised`). Every task writes
    ``out/datalist.json`` with ``training`` and ``validation`` lists whose paths are
    relative to ``out`` (the bundles' ``dataset_dir``).

    Args:
        task: one of :data:`TASKS` (``"pretrain"``, ``"abdomen_seg"``, ...).
        out: output folder (created).
        n: number of items in total (images, or clips for the classification tasks).
        seed: random seed; the same seed writes the same files.
        image_size: side length of the square images in pixels.
        val_fraction: fraction of items in the validation list.
        **options: task-specific options passed to the task's generator.

    Returns:
        Path of ``datalist.json``.

    Raises:
        ValueError: unknown task.
    """
    if task not in TASKS:
        raise ValueError(f"unknown demo-data task {task!r}; known tasks: {sorted(TASKS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lists = TASKS[task](out, n, seed, image_size, val_fraction, **options)
    path = out / "datalist.json"
    path.write_text(json.dumps(lists, indent=2) + "\n")
    return path
