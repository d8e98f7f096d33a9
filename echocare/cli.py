"""The ``echocare`` command (python-fire).

    echocare demo [--out echocare_demo]            phantoms -> short tiny pretraining -> panels, in MLflow
    echocare demo-data --task pretrain --out DIR --n N   (tasks: pretrain, abdomen_seg, musv_seg, thyroid_cls, fll_cls)
    echocare datalist NAME --root DIR --out FILE [--split data_lists/NAME.json] [--fold K] [--seed S]
    echocare curate --src DIR [--src DIR ...] --mapping MAPPING.yaml --out OUT [--size 256] [--workers N]
    echocare experiment BUNDLE --name NAME --inits scratch,ENC.pt --seeds 5 --train-fractions 0.1,1.0 [--config OVERLAY]
        [--dataset_dir D --datalist L] [--output_dir experiments/NAME] [--override ID=VALUE ...]
    echocare compare --experiment NAME --metric mean_dice [--by init] [--tracking-uri URI] [--out DIR] [--lower-is-better]
    echocare export BUNDLE --checkpoint PATH --format torchscript|onnx --out FILE [--config OVERLAY] [--network_size tiny ...]
    echocare registry register --run RUN_ID_OR_NAME --name NAME [--alias champion] [--tracking-uri URI | --output-dir OUT]
    echocare registry list [--name NAME] [--tracking-uri URI | --output-dir OUT]
    echocare registry promote NAME VERSION ALIAS [--tracking-uri URI | --output-dir OUT]
    echocare predict BUNDLE --input PATH [--input PATH ...] --out DIR [--checkpoint CKPT] [--config OVERLAY] [--max-frames N] [--precision bf16]
        [--engine ray [--ray-address HOST:PORT] [--workers N]]

A refused command prints ``error: <file>: <problem>`` and exits 2; a batch with failed items prints
``failed: <file>: <problem>`` per item and exits 1. ``--debug`` (anywhere) or ``ECHOCARE_DEBUG=1`` shows
the traceback instead. ``--output_dir`` and ``--output-dir`` are one flag, and name the output
folder of demo, demo-data, curate and predict as ``--out`` does. Path values are taken as typed
(``--out 2024`` is the folder 2024). An http(s) ``--tracking-uri`` (or ``MLFLOW_TRACKING_URI``) that
does not answer within 5 s fails, named, before any work.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import fire

from echocare.bundle import bundle_dir
from echocare.errors import EchoCareError
from echocare.tracking import check_tracking_server

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
        version of model NAME; --alias (e.g. champion) points at it. RUN is the run's id, or its name where
        that is unique in the store (training prints both at its end)."""
        from echocare.registry import register_run

        result = register_run(str(run), str(name), alias=str(alias) if alias else None,
                              tracking_uri=tracking_uri, output_dir=output_dir)
        metrics = ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items())
        target = f"models:/{result['name']}@{result['alias']}" if result["alias"] else f"models:/{result['name']}/{result['version']}"
        print(f"registered {result['name']} version {result['version']}" + (f" (@{result['alias']})" if result["alias"] else "")
              + f": {result['bundle']} run {result['run_id']}, best {result['key_metric']} at epoch {result['best_epoch']}"
              + f" ({metrics})\nload it with --checkpoint {target}  [store {result['tracking_uri']}]")

    def list(self, name: str | None = None, tracking_uri: str | None = None, output_dir: str | None = None) -> None:
        """Every version of every registered model (or of --name NAME): aliases, bundle, key metric, run."""
        from echocare.registry import format_registry_table, list_registered

        rows = list_registered(tracking_uri=tracking_uri, output_dir=output_dir, name=str(name) if name else None)
        print(format_registry_table(rows) if rows else "no registered models")

    def promote(self, name: str, version: int, alias: str, tracking_uri: str | None = None, output_dir: str | None = None) -> None:
        """Point ALIAS (e.g. champion) of model NAME at VERSION."""
        from echocare.registry import promote

        result = promote(str(name), version, str(alias), tracking_uri=tracking_uri, output_dir=output_dir)
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
        --out (or --output_dir, --output-dir) is the folder. Further ``--name value`` options go to the task's generator (e.g. ``--language zh`` for usreport)."""
        from echocare.phantoms import generate_demo_data

        return str(generate_demo_data(task, out, n=n, seed=seed, image_size=image_size, **options))

    def datalist(
        self, name: str, root: str, out: str, fold: int | None = None, seed: int = 0, split: str | None = None
    ) -> str:
        """Convert a benchmark's download layout under ROOT into a MONAI datalist JSON at OUT.

        NAME is one of: abdomen, brain_landmark, busbra, camus, carotid, ddti, fll_ceus, focus, hc18, musv,
        thyroid_cine, usenhance, usreport. --split data_lists/NAME.json: exactly that split file's parts
        (official where published; cases it does not cover are reported in one line each);
        --fold K: BUS-BRA's validation fold (its published 5-fold partition);
        --seed S: without --split, the seeded patient-level split of the datasets without a published one.
        """
        from echocare.datasets.converters import convert_datalist

        content = convert_datalist(name, root, out, fold=fold, seed=seed, split=split)
        for line in content.get("split_report", []):
            print(line)
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
        OUT (--out, --output_dir or --output-dir) must be new, empty, or an earlier curate run's folder (resumed);
        never a source or inside one.
        --max-pixels N (default 100000000): files with frames of more than N pixels fail before decoding.
        --hide-source-paths: report.json and the journal name files by sha256("<source>/<path>")[:16].
        --engine ray [--ray-address HOST:PORT]: the per-file work as Ray tasks (pip install 'echocare[scale]');
        without an address, a local Ray instance of --workers CPUs on 127.0.0.1. SRC may be an fsspec URL.
        --format webdataset --shard-size N: OUT/shards/shard-NNNNNN.tar and OUT/shards.json instead of images.
        Each file that failed is printed (failed: FILE: reason); exits with status 1 if any failed.
        """
        from echocare.datasets.curation import curate

        sources = [src] if isinstance(src, str) else list(src)
        datalist = curate(sources, mapping=mapping, out=out, size=size, workers=workers, frame_step=frame_step,
                          val_fraction=val_fraction, **options)
        failed = json.loads((datalist.parent / "report.json").read_text())["failed"]
        for item in failed:
            print(f"failed: {item['file']}: {item['reason']}", file=sys.stderr)
        if failed:
            print(datalist)  # the result exists all the same
            sys.exit(1)
        return str(datalist)

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
        """Compare the models of an `echocare experiment` on METRIC (the names of docs/architecture.md: mean_dice, accuracy, mae, ...).

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
        max_pixels: int | None = None,
        precision: str | None = None,
        engine: str = "local",
        ray_address: str | None = None,
        workers: int | None = None,
        **bundle_args: object,
    ) -> None:
        """Run BUNDLE (segmentation or classification) on images, DICOM files, study folders, videos.

        --input PATH (repeatable): files, folders (searched recursively, suffix-less DICOM included) or datalist JSON
        --out DIR (or --output_dir, --output-dir): predictions/ (the bundle's masks or probabilities per frame), dicom/ (for DICOM inputs: STEM_seg.dcm,
        or STEM_sc.dcm, a Secondary Capture overlay where highdicom cannot make a SEG, with the reason; STEM_sr.dcm,
        a Structured Report of the classes or segmented areas), predict_report.json/.csv (one row per input).
        --checkpoint CKPT (default the bundle's models/model.pt); --config OVERLAY (variant overlays);
        --max-frames N: only the first N frames of multi-frame inputs; --max-pixels N: inputs with frames of more
        than N pixels (height x width, from the header; default, and at most, 100000000) fail before decoding;
        --precision fp32 (the bundle's default) or bf16: bf16 autocast (on the CPU: the fast paths with bf16 matrix units, AMX or
        AVX-512 BF16); see the bundle's README for whether its answers change in bf16.
        --override ID=VALUE and any other --ID VALUE (e.g. --network_size tiny --image_size 128 --device cpu) go to
        the bundle.
        --engine ray [--ray-address HOST:PORT] [--workers N]: the same steps as a Ray Data pipeline, with the same
        outputs (pip install 'echocare[scale]'): checking and writing as Ray tasks, the bundle in a pool of model
        actors (one per GPU, else one per CPU; at most N); without an address, a local Ray instance of --workers
        CPUs (default 1) on 127.0.0.1. Inputs, checkpoint and --out must be at the same path on every node.
        A bad input is reported on one line (failed: PATH: reason) and skipped; exits with status 1 if any failed.
        """
        import sys

        from echocare.io.readers import DEFAULT_MAX_PIXELS
        from echocare.experiments import parse_overrides
        from echocare.networks.precision import PRECISIONS
        from echocare.predict import predict

        if precision is not None and precision not in PRECISIONS:
            raise ValueError(f"--precision: must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        rows = predict(
            bundle, input, out, checkpoint=checkpoint, config=config,
            max_frames=None if max_frames is None else int(max_frames),
            overrides={**parse_overrides(override or []), **bundle_args, **({"precision": precision} if precision else {})},
            max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels),
            engine=engine, ray_address=ray_address, workers=None if workers is None else int(workers),
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

        --out DIR (or --output_dir, --output-dir) holds everything. About 3 minutes on 2 CPU cores with the defaults. Prints where the results,
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
            "  open the MLflow UI:  {} ui --backend-store-uri sqlite:///{} --host 127.0.0.1".format(
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


def _is_flag(arg: str) -> bool:
    """A flag as python-fire sees one: ``--name[=value]`` or ``-n``, not a negative number."""
    return arg.startswith("--") or re.match(r"^-[a-zA-Z]", arg) is not None


def _string_flag(argv: list[str], flag: str) -> list[str]:
    """Every ``--FLAG V`` as ``--FLAG="V"``, which python-fire keeps as the string V (a bare ``--FLAG``,
    followed by another flag or nothing, is left for fire)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == f"--{flag}" and i + 1 < len(argv) and not _is_flag(argv[i + 1]):
            out.append(f"--{flag}={json.dumps(argv[i + 1])}")
            i += 2
            continue
        out.append(f"--{flag}={json.dumps(arg.split('=', 1)[1])}" if arg.startswith(f"--{flag}=") else arg)
        i += 1
    return out


#: Flags whose values are paths, addresses or folder names, passed on as typed: python-fire reads
#: ``--src 2024`` as the int 2024 and ``--out True`` as a bool. So are flags ending in one of
#: :data:`PATH_FLAG_SUFFIXES` (``--output_dir``, ``--dataset-dir``, ``--tracking-uri``, ``--bundle_root``).
PATH_FLAGS = frozenset({"src", "input", "out", "root", "mapping", "datalist", "checkpoint", "config", "bundle", "onnx_model",
                        "name", "experiment", "split"})
PATH_FLAG_SUFFIXES = ("_dir", "_path", "_file", "_uri", "_root")
#: Flags that become lists of strings (repeatable), handled by :func:`merge_repeated_flag` / :func:`_list_flag`.
_LIST_FLAGS = frozenset({"src", "input", "config", "override"})
#: Commands whose first positional argument is a bundle name or folder.
_BUNDLE_COMMANDS = frozenset({"experiment", "predict", "export"})


def _is_path_flag(key: str) -> bool:
    return key in PATH_FLAGS or key.endswith(PATH_FLAG_SUFFIXES)


class UsageError(ValueError):
    """A command line that cannot mean what its user wants (a path flag without its path)."""


def quote_path_arguments(argv: list[str]) -> list[str]:
    """Path flags' values, and the BUNDLE of ``experiment``/``predict``/``export``, as quoted strings.

    ``--out 2024``, ``--out=2024`` and ``--output-dir True`` become ``--out="2024"`` and
    ``--output_dir="True"``, which python-fire hands over as the strings ``2024`` and ``True``
    (folders named so), where it would otherwise pass the int 2024 and the bool True. Repeatable
    flags (:data:`_LIST_FLAGS`) are left to :func:`merge_repeated_flag`; everything after a bare
    ``--`` (fire's own flags) is left alone.

    Raises:
        UsageError: a path flag without a value (``--out`` last, or followed by another flag).
    """
    out, i, positionals = [], 0, []
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return [*out, *argv[i:]]
        if not _is_flag(arg):
            command = positionals[0] if positionals else None
            quoted = len(positionals) == 1 and command in _BUNDLE_COMMANDS
            positionals.append(arg)
            out.append(json.dumps(arg) if quoted else arg)
            i += 1
            continue
        key, has_value, value = arg.lstrip("-").partition("=")
        key = key.replace("-", "_")  # fire's spelling: --output-dir is output_dir
        takes_next = not has_value and i + 1 < len(argv) and not _is_flag(argv[i + 1])
        if not arg.startswith("--") or not _is_path_flag(key):
            out.extend(argv[i : i + 1 + takes_next])
            i += 1 + takes_next
            continue
        if not has_value and not takes_next:
            raise UsageError(f"--{key}: needs a value (a path)")
        if key in _LIST_FLAGS:
            out.extend(argv[i : i + 1 + takes_next])
            i += 1 + takes_next
            continue
        out.append(f"--{key}={json.dumps(argv[i + 1] if takes_next else value)}")
        i += 1 + takes_next
    return out


def _help_last(argv: list[str]) -> list[str]:
    """A line asking for help (``--help`` or ``-h`` before any bare ``--``) as ``COMMAND -- --help``.

    python-fire reads ``--help`` as a request for help only after ``--``, and even there it first
    runs the command with whatever arguments it was given (``demo-data --task X -- --help`` writes
    the data, then describes the result): so only the command's words are kept (``registry``
    and its subcommand), never its arguments, and nothing runs.
    """
    cut = argv.index("--") if "--" in argv else len(argv)
    if not any(a in ("--help", "-h") for a in argv[:cut]):
        return argv
    words = [a for a in argv[:cut] if not _is_flag(a)]
    command = words[:2] if words[:1] == ["registry"] else words[:1]
    return [*command, "--", "--help"]


#: Commands whose output folder is ``--out``: ``--output_dir``/``--output-dir`` name it too, as they do
#: for experiment, compare and registry.
_OUT_FOLDER_COMMANDS = frozenset({"demo", "demo-data", "demo_data", "curate", "predict"})


def _output_dir_as_out(args: list[str]) -> list[str]:
    """``--output_dir=DIR`` as ``--out=DIR`` for :data:`_OUT_FOLDER_COMMANDS` (on a line that
    :func:`quote_path_arguments` has prepared: flags spelt with ``_`` and ``=``).

    Raises:
        UsageError: both ``--out`` and ``--output_dir`` are given.
    """
    cut = args.index("--") if "--" in args else len(args)
    if not args or args[0] not in _OUT_FOLDER_COMMANDS:
        return args
    head = [f"--out={a.split('=', 1)[1]}" if a.startswith("--output_dir=") else a for a in args[:cut]]
    if any(a.startswith("--output_dir=") for a in args[:cut]) and any(a.startswith("--out=") for a in args[:cut]):
        raise UsageError("--out and --output_dir name the same folder: pass one of them")
    return [*head, *args[cut:]]


def _prepare_arguments(argv: list[str]) -> list[str]:
    """The command line as python-fire should read it: help last, repeated flags merged into lists, paths as strings."""
    args = _output_dir_as_out(quote_path_arguments(_help_last(argv)))
    for flag in ("src", "input"):  # echocare curate --src A --src B, echocare predict --input A --input B
        merged = merge_repeated_flag(args, flag)
        args = merged if merged is not args else _string_flag(args, flag)
    for flag in ("override", "config"):  # echocare experiment: always a list, so fire keeps '#' in ids
        args = _list_flag(args, flag)
    if args[:1] == ["registry"]:  # run ids and aliases stay strings (fire reads "1234e5..." as a number)
        for flag in ("run", "alias"):
            args = _string_flag(args, flag)
    return args


def _tracking_uri_argument(argv: list[str]) -> str | None:
    """The value of ``--tracking-uri``/``--tracking_uri`` on a prepared command line (the last one wins, as in fire)."""
    found = None
    for arg in argv:
        if arg == "--":
            break
        if arg.startswith("--tracking_uri="):
            found = json.loads(arg.split("=", 1)[1])
    return found


def _debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """Whether ``--debug`` (or ``--debug=BOOL``) is on the command line or ``ECHOCARE_DEBUG`` is set
    to a true value; and the command line without ``--debug``."""
    from echocare.bundle import as_bool

    debug = os.environ.get("ECHOCARE_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
    rest = []
    for arg in argv:
        if arg == "--debug":
            debug = True
        elif arg.startswith("--debug="):
            debug = debug or as_bool(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    return debug, rest


def _expected_error_types() -> tuple[type[BaseException], ...]:
    """What a user can cause (bad input, missing file, refused request), as opposed to a bug.

    The project's errors subclass :class:`~echocare.errors.EchoCareError` or ``ValueError``
    (``UltrasoundReadError``, ``CurationError``, ``RegistryError``, ...); ``OSError`` covers missing
    files and unreachable servers. MLflow's and the exporter's errors count where their modules are
    loaded (only the commands using them import them).
    """
    types: list[type[BaseException]] = [EchoCareError, OSError, ValueError]
    for module, name in (("mlflow.exceptions", "MlflowException"), ("echocare.networks.export", "ExportError")):
        if module in sys.modules:
            types.append(getattr(sys.modules[module], name))
    return tuple(types)


def _expected_error(error: BaseException) -> BaseException | None:
    """The innermost expected error along ``error``'s causes: MONAI wraps an error raised while
    evaluating a bundle config in a ``RuntimeError("Failed to evaluate ...")``."""
    expected, found, seen = _expected_error_types(), None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, expected):
            found = error
        error = error.__cause__
    return found


def error_line(error: BaseException) -> str:
    """``<file>: <problem>`` on one line: an ``OSError`` with a file name as ``NAME: strerror``,
    others as their message with line breaks joined by ``; ``."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        text = f"{error.filename}: {error.strerror}"
    else:
        text = str(error) or type(error).__name__
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> None:
    """Run the ``echocare`` command line ``argv`` (default ``sys.argv[1:]``).

    An expected error (:func:`_expected_error_types`) prints ``error: <file>: <problem>`` on one
    line to stderr and exits with status 2; any other exception (a bug) prints ``error:`` with its
    type and message and exits with status 1. ``--debug`` anywhere on the command line, or
    ``ECHOCARE_DEBUG=1``, lets the exception through with its traceback instead. Commands that
    finish a batch with failed items print ``failed: <file>: <problem>`` per item and exit 1.
    """
    debug, args = _debug_requested(list(sys.argv[1:] if argv is None else argv))
    try:
        args = _prepare_arguments(args)
        # A server named on the command line is probed before any work (predict checks every input
        # first, experiment creates its folders): a wrong address fails in seconds, named.
        check_tracking_server(_tracking_uri_argument(args))
        # An instance, not the class: fire lists a class's methods as nothing (`echocare --help` showed only `registry`).
        fire.Fire(EchoCareCLI(), command=args, name="echocare")
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as error:
        if debug:
            raise
        expected = _expected_error(error)
        if expected is not None:
            print(f"error: {error_line(expected)}", file=sys.stderr)
            raise SystemExit(2) from None
        print(f"error: {type(error).__name__}: {error_line(error)} (an unexpected error: rerun with --debug "
              "or ECHOCARE_DEBUG=1 for the traceback, and report it)", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
