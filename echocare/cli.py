"""The ``echocare`` command (python-fire).

    echocare demo [--out echocare_demo]            phantoms -> short tiny pretraining -> panels, in MLflow
    echocare demo-data --task pretrain --out DIR --n N   (tasks: pretrain, abdomen_seg, musv_seg, thyroid_cls, fll_cls)
    echocare datalist NAME --root DIR --out FILE [--fold K] [--seed S]
    echocare curate --src DIR [--src DIR ...] --mapping MAPPING.yaml --out OUT [--size 256] [--workers N]
    echocare experiment BUNDLE --name NAME --inits scratch,ENC.pt --seeds 5 --train-fractions 0.1,1.0 [--config OVERLAY]
        [--dataset_dir D --datalist L] [--output_dir experiments/NAME] [--override ID=VALUE ...]
    echocare compare --experiment NAME --metric mean_dice [--by init] [--tracking-uri URI] [--out DIR] [--lower-is-better]
    echocare export BUNDLE --checkpoint PATH --format torchscript|onnx --out FILE [--config OVERLAY] [--network_size tiny ...]
    echocare registry register --run RUN_ID --name NAME [--alias champion] [--tracking-uri URI | --output-dir OUT]
    echocare registry list [--name NAME] [--tracking-uri URI | --output-dir OUT]
    echocare registry promote NAME VERSION ALIAS [--tracking-uri URI | --output-dir OUT]
    echocare predict BUNDLE --input PATH [--input PATH ...] --out DIR [--checkpoint CKPT] [--config OVERLAY] [--max-frames N]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import fire

from echocare.bundle import bundle_dir

__all__ = ["EchoCareCLI", "main"]


def _run_bundle(run_id: str, config_files: list[str], **overrides: object) -> None:
    # Imported here so that `echocare --help` and `demo-data` start fast.
    from monai.bundle import run

    run(run_id, config_file=config_files, **overrides)


class RegistryCLI:
    """The MLflow model registry: register a bundle training run's best checkpoint, list models, move aliases.

    Store: --tracking-uri (sqlite:///OUT/mlruns.db or http://HOST:PORT), else MLFLOW_TRACKING_URI, else
    --output-dir OUT (the bundle run's output_dir, holding mlruns.db). Bundles load a registered model with
    --checkpoint models:/NAME@ALIAS or models:/NAME/VERSION. See echocare.registry.
    """

    def register(
        self, run: str, name: str, alias: str | None = None, tracking_uri: str | None = None, output_dir: str | None = None
    ) -> None:
        """Register training run RUN's best checkpoint, with its bundle's configs, metadata and metrics, as a new
        version of model NAME; --alias (e.g. champion) points at it."""
        from echocare.registry import RegistryError, register_run

        try:
            result = register_run(str(run), str(name), alias=str(alias) if alias else None,
                                  tracking_uri=tracking_uri, output_dir=output_dir)
        except RegistryError as error:
            raise SystemExit(f"echocare registry register: {error}") from None
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items())
        target = f"models:/{result['name']}@{result['alias']}" if result["alias"] else f"models:/{result['name']}/{result['version']}"
        print(f"registered {result['name']} version {result['version']}" + (f" (@{result['alias']})" if result["alias"] else "")
              + f": {result['bundle']} run {result['run_id']}, best {result['key_metric']} at epoch {result['best_epoch']}"
              + f" ({metrics})\nload it with --checkpoint {target}  [store {result['tracking_uri']}]")

    def list(self, name: str | None = None, tracking_uri: str | None = None, output_dir: str | None = None) -> None:
        """Every version of every registered model (or of --name NAME): aliases, bundle, key metric, run."""
        from echocare.registry import RegistryError, format_registry_table, list_registered

        try:
            rows = list_registered(tracking_uri=tracking_uri, output_dir=output_dir, name=str(name) if name else None)
        except RegistryError as error:
            raise SystemExit(f"echocare registry list: {error}") from None
        print(format_registry_table(rows) if rows else "no registered models")

    def promote(self, name: str, version: int, alias: str, tracking_uri: str | None = None, output_dir: str | None = None) -> None:
        """Point ALIAS (e.g. champion) of model NAME at VERSION."""
        from echocare.registry import RegistryError, promote

        try:
            result = promote(str(name), version, str(alias), tracking_uri=tracking_uri, output_dir=output_dir)
        except RegistryError as error:
            raise SystemExit(f"echocare registry promote: {error}") from None
        moved = f" (was version {result['previous']})" if result["previous"] is not None else ""
        print(f"{result['name']}@{result['alias']} -> version {result['version']}{moved}")


class EchoCareCLI:
    """EchoCare: ultrasound foundation model toolkit."""

    registry = RegistryCLI()

    def demo_data(
        self, task: str = "pretrain", out: str = "echocare_demo_data", n: int = 64, seed: int = 0, image_size: int = 256,
        **options,
    ) -> str:
        """Write phantom ultrasound data for TASK to OUT (images and datalist.json); prints the datalist path.
        Further ``--name value`` options go to the task's generator (e.g. ``--language zh`` for usreport)."""
        from echocare.phantoms import generate_demo_data

        return str(generate_demo_data(task, out, n=n, seed=seed, image_size=image_size, **options))

    def datalist(self, name: str, root: str, out: str, fold: int | None = None, seed: int = 0) -> str:
        """Convert a benchmark's download layout under ROOT into a MONAI datalist JSON at OUT."""
        from echocare.datasets.converters import convert_datalist

        content = convert_datalist(name, root, out, fold=fold, seed=seed)
        sizes = {k: len(v) for k, v in content.items() if isinstance(v, list) and k in ("training", "validation", "test")}
        print(f"{out}: {sizes}")
        return out

    def curate(
        self,
        src: str | list[str],
        mapping: str | None = None,
        out: str = "curated",
        size: int = 256,
        workers: int = 1,
        frame_step: int = 10,
        val_fraction: float = 0.02,
        **options: object,
    ) -> str:
        """Turn folders of mixed ultrasound sources into a pretraining set (images, datalist, report).

        SRC may be given several times (--src A --src B); MAPPING.yaml maps sources to anatomy paths.
        """
        from echocare.datasets.curation import curate

        sources = [src] if isinstance(src, str) else list(src)
        return str(
            curate(sources, mapping=mapping, out=out, size=size, workers=workers, frame_step=frame_step,
                   val_fraction=val_fraction, **options)
        )

    def experiment(
        self,
        bundle: str,
        name: str,
        inits: str | list[str] = "scratch",
        seeds: int | list[int] = 3,
        train_fractions: float | list[float] = 1.0,
        config: str | list[str] | None = None,
        dataset_dir: str | None = None,
        datalist: str | None = None,
        output_dir: str | None = None,
        override: str | list[str] | None = None,
        tracking_uri: str | None = None,
        evaluate: bool = True,
        metric: str | None = None,
        timeout: float | None = None,
        **bundle_args: object,
    ) -> None:
        """Repeated trials of BUNDLE: the grid inits x seeds x train fractions, into the MLflow experiment NAME.

        --inits scratch,ENC.pt[,LABEL=ENC2.pt]   models: from scratch and/or encoder weights
        --seeds N (seeds 0..N-1) or 0,4,9;  --train-fractions 0.1,0.25,0.5,1.0
        --config OVERLAY (repeatable; a path or a file in the bundle's configs/)
        --override ID=VALUE (repeatable) and any other --ID VALUE go to the bundle (e.g. --network_size tiny)
        --output_dir (default experiments/NAME): runs/<run>/ per run and mlruns.db (or MLFLOW_TRACKING_URI, --tracking-uri)
        Each run trains with train.yaml, then evaluates its best checkpoint with evaluate.yaml (--evaluate False
        skips it), in its own subprocess; MLflow runs are tagged init, seed, fraction. Rerunning skips finished
        runs and redoes failed ones. Exits with status 1 when a run failed. See echocare.experiments.
        """
        import sys

        from echocare import as_bool
        from echocare.experiments import run_experiment

        rows = run_experiment(
            bundle, name, inits=inits, seeds=seeds, train_fractions=train_fractions, config=config,
            dataset_dir=dataset_dir, datalist=datalist, output_dir=output_dir, overrides=override,
            tracking_uri=tracking_uri, evaluate=as_bool(evaluate), metric=metric, timeout=timeout, **bundle_args,
        )
        if any(r["status"] == "failed" for r in rows):
            sys.exit(1)

    def compare(
        self,
        experiment: str,
        metric: str,
        by: str = "init",
        tracking_uri: str | None = None,
        output_dir: str | None = None,
        out: str | None = None,
        lower_is_better: bool | None = None,
        min_pairs: int = 6,
    ) -> None:
        """Compare the models of an `echocare experiment` on METRIC (DESIGN's names: mean_dice, accuracy, mae, ...).

        Writes to --out (default <output_dir>/compare_<metric>, output_dir default experiments/NAME) and logs to a
        "compare" run of the experiment: summary (mean ± sd, n per model and fraction), tests (best model vs each
        other: two-sided Wilcoxon signed-rank on seed pairs, NaN below --min-pairs; Welch's t-test; stars),
        convergence (epochs and seconds to 95% of the best validation value), box plots and label-efficiency
        curves, as CSV, Markdown and PNG, plus report.md. --lower-is-better for error metrics (inferred for mae,
        mae_se, mre_px, mse_px2, niqe, brisque, piqe, fid and *loss). Store: --tracking-uri, MLFLOW_TRACKING_URI,
        or <output_dir>/mlruns.db.
        """
        from echocare import as_bool
        from echocare.experiments import compare_experiment

        result = compare_experiment(
            experiment, metric, by=by, tracking_uri=tracking_uri, output_dir=output_dir, out=out,
            lower_is_better=None if lower_is_better is None else as_bool(lower_is_better), min_pairs=int(min_pairs),
        )
        print((Path(result["out"]) / "summary.md").read_text())
        if result["tests"]:
            print((Path(result["out"]) / "tests.md").read_text())
        print(f"report: {Path(result['out']) / 'report.md'}" + (f" (MLflow run {result['run_id']})" if result["run_id"] else ""))

    def predict(
        self,
        bundle: str,
        input: str | list[str],
        out: str = "echocare_predictions",
        checkpoint: str | None = None,
        config: str | list[str] | None = None,
        max_frames: int | None = None,
        override: str | list[str] | None = None,
        **bundle_args: object,
    ) -> None:
        """Run BUNDLE (segmentation or classification) on images, DICOM files, study folders, videos.

        --input PATH (repeatable): files, folders (searched recursively, suffix-less DICOM included) or datalist JSON
        --out DIR: predictions/ (the bundle's masks or probabilities per frame), dicom/ (for DICOM inputs: STEM_seg.dcm,
        or STEM_sc.dcm, a Secondary Capture overlay where highdicom cannot make a SEG, with the reason; STEM_sr.dcm,
        a Structured Report of the classes or segmented areas), predict_report.json/.csv (one row per input).
        --checkpoint CKPT (default the bundle's models/model.pt); --config OVERLAY (variant overlays);
        --max-frames N: only the first N frames of multi-frame inputs; --override ID=VALUE and any other --ID VALUE
        (e.g. --network_size tiny --image_size 128 --device cpu) go to the bundle.
        A bad input is reported on one line (failed: PATH: reason) and skipped; exits with status 1 if any failed.
        """
        import sys

        from echocare.experiments import parse_overrides
        from echocare.predict import predict

        rows = predict(
            bundle, input, out, checkpoint=checkpoint, config=config,
            max_frames=None if max_frames is None else int(max_frames),
            overrides={**parse_overrides(override or []), **bundle_args},
        )
        if any(r.status == "failed" for r in rows):
            sys.exit(1)

    def export(
        self,
        bundle: str,
        checkpoint: str,
        format: str = "torchscript",
        out: str | None = None,
        config: str | list[str] | None = None,
        override: str | list[str] | None = None,
        tracking_uri: str | None = None,
        batch_size: int = 1,
        **bundle_args: object,
    ) -> None:
        """Export BUNDLE's network with CHECKPOINT (a file or models:/NAME@ALIAS) to --out FILE, carrying the bundle metadata.

        --format torchscript (traced at the bundle's image_size) or onnx (dynamic batch axis; run it with
        `--onnx_model FILE` in the segmentation/classification inference.yaml, through ONNX Runtime).
        --config OVERLAY (variants), --override ID=VALUE and any other --ID VALUE (e.g. --network_size tiny
        --image_size 128) set the bundle config. The exported file is checked against PyTorch on random inputs
        (largest absolute difference at most 1e-4). See echocare.networks.export.
        """
        from echocare.experiments import parse_overrides
        from echocare.networks.export import export_bundle

        out = out or f"{Path(bundle).name}.{'onnx' if format == 'onnx' else 'ts'}"
        metadata = export_bundle(
            bundle, str(checkpoint), str(format), out, config=config,
            overrides={**parse_overrides(override or []), **bundle_args}, tracking_uri=tracking_uri,
            batch_size=int(batch_size),
        )
        section = metadata["echocare_export"]
        shapes = ", ".join(f"{k} {tuple(v)}" for k, v in section["inputs"].items())
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in metadata.get("max_abs_diff", {}).items())
        print(f"{out}: {section['bundle']} ({section['network']}, {section['network_size']}) as {format}; inputs {shapes}; "
              f"outputs {', '.join(section['outputs'])}; max |exported - PyTorch|: {diffs}")

    def demo(
        self,
        out: str = "echocare_demo",
        n: int = 320,
        image_size: int = 64,
        epochs: int = 10,
        batch_size: int = 16,
        network_size: str = "tiny",
        seed: int = 0,
    ) -> None:
        """Phantom data, a short pretraining of the tiny encoder, its inference panels, all tracked in MLflow.

        About 3 minutes on 2 CPU cores with the defaults. Prints where the results,
        pictures and MLflow store are, and the command that opens the MLflow UI.
        """
        from echocare.phantoms import generate_demo_data

        start = time.time()
        out_dir = Path(out).resolve()
        data_dir = out_dir / "data"
        print(f"[1/3] phantom ultrasound images ({n}, {image_size}x{image_size}) -> {data_dir}")
        datalist = generate_demo_data("pretrain", data_dir, n=n, seed=seed, image_size=image_size)
        configs = Path(bundle_dir("echocare_pretrain")) / "configs"
        run_name = f"demo_{time.strftime('%Y%m%d_%H%M%S')}"
        common = {
            "network_size": network_size,
            "image_size": image_size,
            "mask_unit": 16,
            "output_dir": str(out_dir),
            "seed": seed,
            "num_workers": 2,
        }
        print(f"[2/3] pretraining the {network_size} encoder for {epochs} epochs (MLflow run {run_name})")
        _run_bundle(
            "training",
            [str(configs / "train.yaml")],
            dataset_dir=str(data_dir),
            datalist=str(datalist),
            batch_size=batch_size,
            learning_rate=2e-3,
            warmup_steps=10,
            total_steps=epochs * (n // batch_size + 1),
            checkpoint_interval=50,
            drop_path_rate=0.0,
            log_interval=10,
            tracking="mlflow",
            experiment_name="echocare_demo",
            run_name=run_name,
            **{"train#trainer#max_epochs": epochs},
            **common,
        )
        print("[3/3] inference on the validation images: reconstruction panels and anatomy predictions")
        _run_bundle(
            "inferring",
            [str(configs / "inference.yaml")],
            input_dir=str(datalist),
            datalist_key="validation",
            **common,
        )
        _log_to_run(out_dir / "mlruns.db", "echocare_demo", run_name, out_dir / "predictions", "predictions")
        predictions = json.loads((out_dir / "predictions" / "predictions.json").read_text())
        labelled = [p for p in predictions if _label_of(p["image"], datalist)]
        correct = sum(_region(p["anatomy_path"]) == _region(_label_of(p["image"], datalist)) for p in labelled)
        store = out_dir / "mlruns.db"
        print(
            "\nEchoCare demo finished in {:.0f} s.\n"
            "  results:      {}\n"
            "  encoder:      {} (released EchoCare layout)\n"
            "  pictures:     {} (validation panels per epoch), {}/*.png (inference)\n"
            "  predictions:  {} ({} images; region correct on {}/{} labelled)\n"
            "  MLflow store: {} (experiment echocare_demo, run {})\n"
            "  open the MLflow UI:  {} ui --backend-store-uri sqlite:///{}".format(
                time.time() - start,
                out_dir,
                out_dir / "models" / "encoder.pt",
                out_dir / "panels",
                out_dir / "predictions",
                out_dir / "predictions" / "predictions.json",
                len(predictions),
                correct,
                len(labelled),
                store,
                run_name,
                _mlflow_command(),
                store,
            )
        )


def _mlflow_command() -> str:
    """``mlflow`` when it is on PATH, else the one beside this Python (a venv not activated)."""
    import shutil
    import sys

    beside = Path(sys.executable).parent / "mlflow"
    return "mlflow" if shutil.which("mlflow") or not beside.exists() else str(beside)


def _log_to_run(store: Path, experiment: str, run_name: str, folder: Path, artifact_path: str) -> None:
    """Add a folder of artifacts to a finished MLflow run (the inference outputs of the demo)."""
    import os

    from mlflow.tracking import MlflowClient

    client = MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{store}")
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], f"attributes.run_name = '{run_name}'") if found else []
    if runs:
        client.log_artifacts(runs[0].info.run_id, str(folder), artifact_path=artifact_path)


_LABEL_CACHE: dict[str, dict[str, str]] = {}


def _label_of(image: str, datalist: Path) -> str | None:
    key = str(datalist)
    if key not in _LABEL_CACHE:
        content = json.loads(Path(datalist).read_text())
        _LABEL_CACHE[key] = {
            str((Path(datalist).parent / item["image"]).resolve()): item.get("anatomy", "")
            for item in content.get("validation", [])
        }
    return _LABEL_CACHE[key].get(str(Path(image).resolve())) or None


def _region(path: str | None) -> str | None:
    return path.split("/")[0] if path else None


def merge_repeated_flag(argv: list[str], flag: str) -> list[str]:
    """Fire keeps only the last of a repeated flag: turn ``--src A --src B`` into one list value."""
    values, rest, i = [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == f"--{flag}" and i + 1 < len(argv):
            values.append(argv[i + 1])
            i += 2
            continue
        if arg.startswith(f"--{flag}="):
            values.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    if len(values) <= 1:
        return argv
    return [*rest, f"--{flag}={json.dumps(values)}"]


def _list_flag(argv: list[str], flag: str) -> list[str]:
    """Every ``--FLAG V`` (repeated or not) as one JSON list value: fire reads a bare value
    as Python, which cuts ``train#trainer#max_epochs=2`` at the ``#``."""
    merged = merge_repeated_flag(argv, flag)
    if merged is not argv:
        return merged
    for i, arg in enumerate(argv):
        if arg == f"--{flag}" and i + 1 < len(argv):
            return [*argv[:i], f"--{flag}={json.dumps([argv[i + 1]])}", *argv[i + 2 :]]
        if arg.startswith(f"--{flag}="):
            return [*argv[:i], f"--{flag}={json.dumps([arg.split('=', 1)[1]])}", *argv[i + 1 :]]
    return argv


def _string_flag(argv: list[str], flag: str) -> list[str]:
    """Every ``--FLAG V`` as ``--FLAG="V"``, which python-fire keeps as the string V."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == f"--{flag}" and i + 1 < len(argv):
            out.append(f"--{flag}={json.dumps(argv[i + 1])}")
            i += 2
            continue
        out.append(f"--{flag}={json.dumps(arg.split('=', 1)[1])}" if arg.startswith(f"--{flag}=") else arg)
        i += 1
    return out


def main(argv: list[str] | None = None) -> None:
    import sys

    args = merge_repeated_flag(list(sys.argv[1:] if argv is None else argv), "src")
    args = merge_repeated_flag(args, "input")  # echocare predict --input A --input B
    for flag in ("override", "config"):  # echocare experiment: always a list, so fire keeps '#' in ids
        args = _list_flag(args, flag)
    if args[:1] == ["registry"]:  # run ids and names stay strings (fire reads "1234e5..." as a number)
        for flag in ("run", "name", "alias"):
            args = _string_flag(args, flag)
    fire.Fire(EchoCareCLI, command=args, name="echocare")


if __name__ == "__main__":
    main()
