"""Real-data study: does EchoCare pretraining help at this scale, and does its anatomy branch?

Pipeline (every step through the package's own commands and bundles):

1. Datalists of the four real sets under ``--data`` (``echocare datalist``): BUS-BRA (official
   fold 2 validates), DDTI, HC18 and carotid (8:2 splits by patient / recording).
2. A pooled pretraining set: the **training splits only** of the four sets, each image
   labelled with its anatomy path (BUS-BRA ``thorax/breast``, DDTI ``head & neck/thyroid``,
   HC18 ``fetus/fetal head``, carotid ``head & neck/carotid artery/common carotid artery``).
   The pretraining run's own validation images are a seeded 5% of these training images; the
   script checks that no image of any task's validation split is in the pool.
3. Two ``tiny`` encoders pretrained with ``echocare_pretrain`` on the pool: ``pretrained``
   (masked image modelling + anatomy, ``anatomy_weight: 1``) and ``pretrained_no_anatomy``
   (the ablation, ``anatomy_weight: 0``), same steps and seed.
4. ``echocare experiment`` grids (init x seed x label fraction) on three tasks: DDTI nodule
   segmentation (``ddti_seg``, ``mean_dice``), carotid lumen segmentation (``musv_seg`` +
   ``carotid.yaml``, ``mean_dice``) and BUS-BRA benign/malignant classification
   (``busbra_cls`` + ``pathology.yaml``, ``auc``). Each run trains on the training split,
   keeps the checkpoint with the best validation metric and is scored by evaluating it on the
   validation split (``final_<metric>``).
5. ``echocare compare`` per task (tables, Wilcoxon / Welch tests, box plots, label-efficiency
   curves), plus the paired effect of each pretrained encoder against scratch, written to
   ``OUT/report.md`` with the pictures copied next to it.

Everything goes into one MLflow store, ``OUT/mlruns.db``. Rerunning the same command skips
finished pretraining and finished grid runs (resumable).

Profiles: ``--profile cpu`` (default: tiny encoder, 64x64, sized for about an hour of 2 CPU
cores on a quiet machine) and ``--profile gpu`` (tiny encoder at 128x128, longer pretraining, more seeds and
fractions, for a lent GPU). Any size can be changed by its option.

Usage::

    python benchmarks/real_data_study.py --data ../shared/data --out study_out
    python benchmarks/real_data_study.py --profile gpu --out study_gpu
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from echocare.datasets.converters import convert_datalist
from echocare.experiments import compare_experiment, describe, run_experiment, welch_ttest, wilcoxon_paired  # noqa: E402

ANATOMY = {
    "busbra": "thorax/breast",
    "ddti": "head & neck/thyroid",
    "hc18": "fetus/fetal head",
    "carotid": "head & neck/carotid artery/common carotid artery",
}
FOLDS = {"busbra": 2}

# task name -> bundle, overlay, datalist, metric, per-task settings
TASKS: dict[str, dict[str, Any]] = {
    "ddti": {"bundle": "ddti_seg", "config": None, "data": "ddti", "metric": "mean_dice", "title": "DDTI thyroid nodule segmentation"},
    "carotid": {"bundle": "musv_seg", "config": "carotid.yaml", "data": "carotid", "metric": "mean_dice",
                "title": "Carotid lumen segmentation"},
    "busbra": {"bundle": "busbra_cls", "config": "pathology.yaml", "data": "busbra", "metric": "auc",
               "title": "BUS-BRA benign / malignant"},
}

PROFILES: dict[str, dict[str, Any]] = {
    "cpu": {"network_size": "tiny", "image_size": 64, "pretrain_epochs": 20, "pretrain_batch": 32, "pretrain_lr": 2e-3,
            "finetune_epochs": 5, "finetune_batch": 16, "seeds": 3, "fractions": "0.25,1.0",
            "carotid_epochs": 10},
    "gpu": {"network_size": "tiny", "image_size": 128, "pretrain_epochs": 300, "pretrain_batch": 64, "pretrain_lr": 2e-3,
            "finetune_epochs": 30, "finetune_batch": 16, "seeds": 10, "fractions": "0.1,0.25,0.5,1.0",
            "carotid_epochs": 60},
}


def _default_data() -> Path:
    return Path(os.environ.get("ECHOCARE_DATA") or REPO.parent / "shared" / "data")


def build_lists(data: Path, out: Path) -> dict[str, Path]:
    """Datalists of the four sets (absolute image paths added by ``dataset_dir`` at use)."""
    out.mkdir(parents=True, exist_ok=True)
    lists = {}
    for name in ANATOMY:
        path = out / f"{name}.json"
        if not path.is_file():
            convert_datalist(name, data / name, path, fold=FOLDS.get(name))
        lists[name] = path
    return lists


def _abs(root: Path, item_path: str) -> str:
    p = Path(item_path)
    return str(p if p.is_absolute() else (root / p).resolve())


def build_pretraining_pool(data: Path, lists: dict[str, Path], out: Path, size: int, val_fraction: float = 0.05,
                           seed: int = 0) -> Path:
    """The pooled pretraining set: the training images only, curated by ``echocare curate``.

    Each set's training images are linked into ``OUT/pool_sources/<set>/`` (never a
    validation image: checked here), then curated (echo-region crop, exact and near-duplicate
    removal, ``size`` x ``size`` PNGs) with the anatomy of their set; curation's own
    ``validation`` list is a seeded part of those training images.

    Raises:
        RuntimeError: an image of a task's validation split would enter the pool.
    """
    from echocare.datasets.curation import curate

    sources = out / "pool_sources"
    held_out, linked = set(), {}
    for name, path in lists.items():
        content = json.loads(path.read_text())
        for item in content.get("validation", []) + content.get("test", []):
            held_out.add(_abs(data / name, item["image"]))
        linked[name] = sorted({_abs(data / name, item["image"]) for item in content["training"]})
    leaked = [p for files in linked.values() for p in files if p in held_out]
    if leaked:
        raise RuntimeError(f"{len(leaked)} validation images in the pretraining pool, e.g. {leaked[0]}")
    for name, files in linked.items():
        folder = sources / name
        folder.mkdir(parents=True, exist_ok=True)
        for i, file in enumerate(files):
            link = folder / f"{i:05d}_{Path(file).name}"
            if not link.exists():
                link.symlink_to(file)
    mapping = out / "pool_mapping.yaml"
    mapping.write_text("".join(f'{name}: "{anatomy}"\n' for name, anatomy in ANATOMY.items()))
    datalist = curate([str(sources / name) for name in ANATOMY], mapping=str(mapping), out=str(out / "pool"), size=size,
                      workers=2, val_fraction=val_fraction, seed=seed)
    return Path(datalist)


def pretrain(name: str, pool: Path, out: Path, args: argparse.Namespace, anatomy_weight: float, tracking_uri: str) -> Path:
    """Pretrain one encoder with the ``echocare_pretrain`` bundle; returns its ``encoder.pt``."""
    run_dir = out / "pretrain" / name
    encoder = run_dir / "models" / "encoder.pt"
    done = run_dir / "DONE"
    if done.is_file() and encoder.is_file():
        print(f"[pretrain] {name}: done before ({encoder})")
        return encoder
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    n_train = len(json.loads(pool.read_text())["training"])
    iters = max(1, n_train // args.pretrain_batch)
    total = iters * args.pretrain_epochs
    overrides = {
        "dataset_dir": str(pool.parent), "datalist": str(pool), "output_dir": str(run_dir),
        "network_size": args.network_size, "image_size": args.image_size, "mask_unit": 16 if args.image_size <= 64 else 32,
        "batch_size": args.pretrain_batch, "learning_rate": args.pretrain_lr, "warmup_steps": max(1, total // 20),
        "total_steps": total, "drop_path_rate": 0.0, "checkpoint_interval": max(50, iters * 5), "log_interval": max(10, iters),
        "num_workers": 2, "seed": args.seed, "anatomy_weight": anatomy_weight, "train#trainer#max_epochs": args.pretrain_epochs,
        "val_interval": max(1, args.pretrain_epochs // 10), "tracking_uri": tracking_uri, "experiment_name": f"{args.name}_pretrain",
        "progress_bar": False,
    }
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
               str(REPO / "bundles" / "echocare_pretrain" / "configs" / "train.yaml"),
               "--tracking", "mlflow", "--run_name", f"{args.name}_{name}_{time.strftime('%Y%m%d_%H%M%S')}"]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    (run_dir / "command.txt").write_text(" ".join(command) + "\n")
    print(f"[pretrain] {name}: {args.pretrain_epochs} epochs x {iters} iterations (anatomy_weight {anatomy_weight}), log in {run_dir}/log.txt")
    start = time.time()
    with open(run_dir / "log.txt", "w") as log:
        rc = subprocess.call(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if rc != 0 or not encoder.is_file():
        raise RuntimeError(f"pretraining {name} failed (exit {rc}); see {run_dir / 'log.txt'}")
    minutes = (time.time() - start) / 60
    done.write_text(json.dumps({"minutes": minutes, "iterations": total}))
    print(f"[pretrain] {name}: {minutes:.1f} min")
    return encoder


def paired_effect(runs: list[dict[str, Any]], model: str, reference: str = "scratch") -> list[dict[str, Any]]:
    """Per fraction: mean difference ``model - reference`` over seeds and its tests."""
    rows = []
    for fraction in sorted({r["fraction"] for r in runs}):
        a = {str(r["seed"]): r["value"] for r in runs if r["fraction"] == fraction and r["model"] == model}
        b = {str(r["seed"]): r["value"] for r in runs if r["fraction"] == fraction and r["model"] == reference}
        if not a or not b:
            continue
        diffs = [a[s] - b[s] for s in a if s in b]
        mean, sd, n = describe(diffs)
        w = wilcoxon_paired(a, b, min_pairs=3)
        t = welch_ttest(list(a.values()), list(b.values()))
        rows.append({"fraction": fraction, "model": model, "mean_difference": mean, "sd_difference": sd, "n_pairs": n,
                     "wins": sum(d > 0 for d in diffs), "wilcoxon_p": w["p"], "welch_p": t["p"]})
    return rows


def _fmt(x: float, digits: int = 3) -> str:
    return "nan" if x != x else f"{x:.{digits}f}"


def write_report(out: Path, args: argparse.Namespace, results: dict[str, dict[str, Any]], pretrain_info: dict[str, Any],
                 pool_counts: dict[str, int], pictures: Path) -> Path:
    lines = [
        "# Real-data study", "",
        f"Profile `{args.profile}`: `{args.network_size}` encoder, {args.image_size}x{args.image_size}, "
        f"pretraining {args.pretrain_epochs} epochs (batch {args.pretrain_batch}) on the pooled training splits "
        f"({sum(pool_counts.values())} images: " + ", ".join(f"{k} {v}" for k, v in pool_counts.items()) + "); "
        f"fine-tuning {args.finetune_epochs} epochs (carotid {args.carotid_epochs}), seeds {args.seeds}, "
        f"label fractions {args.fractions}. Scores on each task's validation split.", "",
        "Pretraining: " + "; ".join(f"`{k}` {v['minutes']:.1f} min" for k, v in pretrain_info.items()) + ".", "",
    ]
    for task, res in results.items():
        spec = TASKS[task]
        lines += [f"## {spec['title']} (`{spec['bundle']}`{' + ' + spec['config'] if spec['config'] else ''}, `{spec['metric']}`)", ""]
        lines += ["| fraction | model | n | mean ± sd |", "|---|---|---|---|"]
        for row in res["summary"]:
            lines.append(f"| {row['fraction']:g} | {row['model']} | {row['n']} | {_fmt(row['mean'])} ± {_fmt(row['sd'])} |")
        lines += ["", "Pretrained minus scratch, paired by seed (two-sided Wilcoxon signed-rank; Welch's t-test):", "",
                  "| fraction | model | mean difference ± sd | wins/pairs | Wilcoxon p | Welch p |", "|---|---|---|---|---|---|"]
        for row in res["effects"]:
            lines.append(f"| {row['fraction']:g} | {row['model']} | {_fmt(row['mean_difference'])} ± {_fmt(row['sd_difference'])} | "
                         f"{row['wins']}/{row['n_pairs']} | {_fmt(row['wilcoxon_p'])} | {_fmt(row['welch_p'])} |")
        rel = os.path.relpath(pictures, out)
        lines += ["", f"![{task} box plots]({rel}/{task}_boxplot.png)", f"![{task} label efficiency]({rel}/{task}_label_efficiency.png)", ""]
    verdict = []
    for task, res in results.items():
        for row in res["effects"]:
            if row["model"] == "pretrained":
                verdict.append(f"{task} at fraction {row['fraction']:g}: {row['mean_difference']:+.3f} "
                               f"({row['wins']}/{row['n_pairs']} seeds better, Wilcoxon p {_fmt(row['wilcoxon_p'])})")
    lines += ["## Verdict (pretrained with anatomy against scratch)", "", *[f"- {v}" for v in verdict], ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=_default_data(), help="folder with busbra/, ddti/, hc18/, carotid/")
    parser.add_argument("--out", type=Path, default=Path("real_data_study"))
    parser.add_argument("--name", default="study")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--gpu", action="store_true", help="same as --profile gpu")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--pictures", type=Path, default=None, help="copy box plots and curves here (default OUT/pictures)")
    parser.add_argument("--seed", type=int, default=0, help="pretraining seed")
    for key in PROFILES["cpu"]:
        parser.add_argument(f"--{key.replace('_', '-')}", dest=key, default=None, help=f"profile default: cpu {PROFILES['cpu'][key]}")
    args = parser.parse_args(argv)
    if args.gpu:
        args.profile = "gpu"
    for key, value in PROFILES[args.profile].items():
        current = getattr(args, key)
        setattr(args, key, type(value)(current) if current is not None else value)
    data, out = args.data.resolve(), args.out.resolve()
    for name in ANATOMY:
        if not (data / name).is_dir():
            parser.error(f"{data / name}: not found (--data must hold busbra/, ddti/, hc18/ and carotid/)")
    out.mkdir(parents=True, exist_ok=True)
    pictures = (args.pictures or out / "pictures").resolve()
    pictures.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{out / 'mlruns.db'}"
    (out / "settings.json").write_text(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, indent=1))
    start = time.time()

    lists = build_lists(data, out / "lists")
    pool = build_pretraining_pool(data, lists, out, size=2 * args.image_size)
    pool_items = json.loads(pool.read_text())
    pool_counts = {name: sum(1 for split in ("training", "validation") for item in pool_items.get(split, [])
                             if item.get("anatomy") == anatomy) for name, anatomy in ANATOMY.items()}
    print(f"[pool] {pool}: {pool_counts}")
    encoders, pretrain_info = {}, {}
    for name, weight in (("pretrained", 1.0), ("pretrained_no_anatomy", 0.0)):
        encoders[name] = pretrain(name, pool, out, args, weight, tracking_uri)
        pretrain_info[name] = json.loads((encoders[name].parents[1] / "DONE").read_text())
    inits = ["scratch"] + [f"{k}={v}" for k, v in encoders.items()]

    results = {}
    for task in [t.strip() for t in args.tasks.split(",") if t.strip()]:
        spec = TASKS[task]
        epochs = args.carotid_epochs if task == "carotid" else args.finetune_epochs
        experiment = f"{args.name}_{task}"
        print(f"[{task}] {spec['title']}: grid {len(inits)} inits x {args.seeds} seeds x fractions {args.fractions}, {epochs} epochs")
        run_experiment(
            spec["bundle"], experiment, inits=inits, seeds=args.seeds, train_fractions=args.fractions, config=spec["config"],
            dataset_dir=str(data / spec["data"]), datalist=str(lists[spec["data"]]), output_dir=out / "experiments" / task,
            tracking_uri=tracking_uri, metric=spec["metric"],
            overrides={"network_size": args.network_size, "image_size": args.image_size, "max_epochs": epochs,
                       "warmup_epochs": 1, "batch_size": args.finetune_batch, "num_workers": 2,
                       "progress_bar": False},
        )
        compared = compare_experiment(experiment, spec["metric"], tracking_uri=tracking_uri,
                                      output_dir=out / "experiments" / task, out=out / "experiments" / task / "compare")
        effects = [row for model in encoders for row in paired_effect(compared["runs"], model)]
        results[task] = {"summary": compared["summary"], "effects": effects}
        for picture in ("boxplot.png", "label_efficiency.png"):
            shutil.copy(Path(compared["out"]) / picture, pictures / f"{task}_{picture}")
    report = write_report(out, args, results, pretrain_info, pool_counts, pictures)
    (out / "results.json").write_text(json.dumps({"results": results, "pretraining": pretrain_info, "pool": pool_counts,
                                                  "hours": (time.time() - start) / 3600}, indent=1, default=str))
    print(report.read_text())
    print(f"total {(time.time() - start) / 60:.1f} min; report {report}")


if __name__ == "__main__":
    main()
