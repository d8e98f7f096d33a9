"""``echocare experiment`` and ``echocare compare``: statistics against SciPy, the plots'
content, the report on a made-up MLflow store, and a real grid on a bundle (tiny sizes),
resumed after a crash, then compared."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from echocare.experiments import run as experiment_run
from echocare.experiments import (
    boxplot_figure,
    compare_experiment,
    describe,
    infer_lower_is_better,
    label_efficiency_figure,
    model_colours,
    parse_fractions,
    parse_inits,
    parse_overrides,
    parse_seeds,
    stars,
    time_to_fraction_of_best,
    welch_ttest,
    wilcoxon_paired,
)

# ----------------------------------------------------------------------------- statistics


def test_stars() -> None:
    assert [stars(p) for p in (0.0005, 0.001, 0.005, 0.01, 0.049, 0.05, 0.7)] == ["***", "**", "**", "*", "*", "ns", "ns"]
    assert stars(math.nan) == "" and stars(None) == ""


def test_describe_is_mean_and_sample_sd() -> None:
    values = [0.71, 0.74, 0.69, 0.80, 0.77]
    mean, sd, n = describe(values)
    assert n == 5 and mean == pytest.approx(np.mean(values)) and sd == pytest.approx(np.std(values, ddof=1))
    assert math.isnan(describe([0.5])[1]) and describe([])[2] == 0
    assert describe([1.0, math.nan, 3.0])[:2] == (2.0, pytest.approx(math.sqrt(2)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wilcoxon_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.normal(0.80, 0.03, 12)
    b = a - rng.normal(0.01, 0.02, 12)
    result = wilcoxon_paired(dict(enumerate(a)), dict(enumerate(b)))
    expected = stats.wilcoxon(a, b)
    assert result["n_pairs"] == 12 and result["note"] == ""
    assert result["statistic"] == pytest.approx(expected.statistic) and result["p"] == pytest.approx(expected.pvalue)


def test_wilcoxon_by_hand_and_pairing_by_seed() -> None:
    # Six pairs, all differences positive: W- = 0 and the exact two-sided p = 2 / 2**6.
    better = {s: 0.9 + 0.01 * s for s in range(6)}
    worse = {s: 0.8 + 0.003 * s for s in range(6)}
    result = wilcoxon_paired(better, worse)
    assert result["statistic"] == 0.0 and result["p"] == pytest.approx(2 / 64) and stars(result["p"]) == "*"
    # Differences +1, -2, +3, +4, +5, +6: W- = 2 (rank of |-2|), exact p = 2 * 3 / 64 (W <= 2 in 3 of 64 sign patterns).
    a = {s: 10.0 + d for s, d in enumerate([1, -2, 3, 4, 5, 6])}
    b = {s: 10.0 for s in range(6)}
    result = wilcoxon_paired(a, b)
    assert result["statistic"] == 2.0 and result["p"] == pytest.approx(6 / 64)
    # Only seeds both models ran are paired; too few pairs give NaN with a note.
    a = {0: 0.9, 1: 0.8, 2: 0.85, 7: 0.1}
    b = {1: 0.7, 2: 0.75, 3: 0.9}
    result = wilcoxon_paired(a, b)
    assert result["n_pairs"] == 2 and math.isnan(result["p"]) and ">= 6" in result["note"]
    result = wilcoxon_paired(a, b, min_pairs=2)
    assert result["p"] == pytest.approx(stats.wilcoxon([0.8, 0.85], [0.7, 0.75]).pvalue) == pytest.approx(0.5)


def test_welch_ttest_matches_scipy_and_formula() -> None:
    a = [0.82, 0.85, 0.80, 0.84, 0.86, 0.83]
    b = [0.70, 0.78, 0.65, 0.81, 0.74]
    result = welch_ttest(a, b)
    expected = stats.ttest_ind(a, b, equal_var=False)
    assert result["statistic"] == pytest.approx(expected.statistic) and result["p"] == pytest.approx(expected.pvalue)
    # Welch's formula by hand: t = (ma - mb) / sqrt(va/na + vb/nb), Welch-Satterthwaite df.
    va, vb, na, nb = np.var(a, ddof=1), np.var(b, ddof=1), len(a), len(b)
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va / na + vb / nb)
    df = (va / na + vb / nb) ** 2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
    assert result["statistic"] == pytest.approx(t) and result["df"] == pytest.approx(df)
    assert result["p"] == pytest.approx(2 * stats.t.sf(abs(t), df))
    assert result["p"] != pytest.approx(stats.ttest_ind(a, b).pvalue)  # not Student's
    one = welch_ttest([0.8], [0.7, 0.75])
    assert math.isnan(one["p"]) and "2 runs" in one["note"]
    flat = welch_ttest([0.8, 0.8], [0.7, 0.7])
    assert math.isnan(flat["p"]) and "spread" in flat["note"]


def test_time_to_95_percent_of_best() -> None:
    start = 1_000_000
    history = [(1, 0.40, start + 10_000), (2, 0.70, start + 20_000), (3, 0.78, start + 30_000), (4, 0.80, start + 40_000), (5, 0.79, start + 50_000)]
    assert time_to_fraction_of_best(history, start) == (3.0, 30.0)  # 0.78 >= 0.95 * 0.80
    shuffled = [history[i] for i in (4, 0, 3, 1, 2)]
    assert time_to_fraction_of_best(shuffled, start) == (3.0, 30.0)
    errors = [(1, 9.0, start + 5_000), (2, 4.1, start + 9_000), (3, 4.0, start + 12_000), (4, 5.0, start + 20_000)]
    assert time_to_fraction_of_best(errors, start, lower_is_better=True) == (2.0, 9.0)  # 4.1 <= 4.0 * 1.05
    assert time_to_fraction_of_best(errors, start, lower_is_better=False)[0] == 1.0  # 9.0 is the best if higher
    assert all(math.isnan(v) for v in time_to_fraction_of_best([], start))


def test_lower_is_better_inference() -> None:
    assert all(infer_lower_is_better(m) for m in ("mae", "mre_px", "mse_px2", "fid", "niqe", "final_mae", "train_loss"))
    assert not any(infer_lower_is_better(m) for m in ("mean_dice", "accuracy", "auc", "sdr_2px", "psnr", "bleu4"))


def test_parsing_of_grid_arguments(tmp_path: Path) -> None:
    assert parse_seeds(3) == [0, 1, 2] and parse_seeds((0, 5, 7)) == [0, 5, 7] and parse_seeds("4,9") == [4, 9]
    assert parse_fractions((1.0, 0.1, 0.25)) == [0.1, 0.25, 1.0] and parse_fractions("0.5") == [0.5]
    with pytest.raises(ValueError):
        parse_fractions("0,1")
    a, b = tmp_path / "a" / "enc.pt", tmp_path / "b" / "enc.pt"
    assert parse_inits(f"scratch,{tmp_path / 'x.pt'}") == [("scratch", ""), ("x", str(tmp_path / "x.pt"))]
    assert [label for label, _ in parse_inits(["scratch", str(a), str(b)])] == ["scratch", "a-enc", "b-enc"]
    assert parse_inits(("mim=" + str(a),)) == [("mim", str(a))]
    assert parse_overrides(["image_size=64", "train#trainer#max_epochs=2", "finetune_mode=lora", "lr=1e-3"]) == {
        "image_size": 64, "train#trainer#max_epochs": 2, "finetune_mode": "lora", "lr": 1e-3}
    with pytest.raises(ValueError):
        parse_overrides(["image_size"])


def test_cli_keeps_hash_in_overrides() -> None:
    from echocare.cli import _list_flag

    assert _list_flag(["experiment", "x", "--override", "train#trainer#max_epochs=2"], "override") == [
        "experiment", "x", '--override=["train#trainer#max_epochs=2"]']
    assert _list_flag(["experiment", "--override", "a=1", "--override=b=2"], "override") == ["experiment", '--override=["a=1", "b=2"]']


# ----------------------------------------------------------------------------- plots


def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))


def _colour_pixels(png: Path, hex_colour: str) -> int:
    pixels = np.asarray(Image.open(png).convert("RGB")).reshape(-1, 3)
    return int((np.abs(pixels.astype(int) - _rgb(hex_colour)).sum(axis=1) <= 6).sum())


def test_plots_have_one_box_and_one_curve_per_model(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    models = ["scratch", "echocare", "mim"]
    values = {f: {m: list(rng.normal(0.5 + 0.3 * f + 0.05 * i, 0.02, 5)) for i, m in enumerate(models)} for f in (0.1, 0.5, 1.0)}
    values[0.1]["mim"] = []  # a model without runs at one fraction: no box there, its curve starts later
    fig = boxplot_figure(values, models, "mean_dice", {1.0: {"scratch": "**"}})
    boxes = [len([p for p in ax.patches if type(p).__name__ == "PathPatch"]) for ax in fig.axes]
    assert boxes == [2, 3, 3]
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["scratch", "echocare"]
    assert "**" in [t.get_text() for t in fig.axes[2].texts]
    fig.savefig(tmp_path / "box.png", dpi=80)
    colours = model_colours(models)
    assert all(_colour_pixels(tmp_path / "box.png", colours[m]) > 50 for m in models)
    assert _colour_pixels(tmp_path / "box.png", model_colours(models + ["x"])["x"]) == 0

    fig = label_efficiency_figure(values, models, "mean_dice")
    ax = fig.axes[0]
    assert len(ax.lines) == 3 and len(ax.collections) == 3  # one mean line and one ± sd band per model
    assert [len(line.get_xdata()) for line in ax.lines] == [3, 3, 2]
    mean_line = ax.lines[1]
    assert list(mean_line.get_ydata()) == pytest.approx([np.mean(values[f]["echocare"]) for f in (0.1, 0.5, 1.0)])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == models
    fig.savefig(tmp_path / "curves.png", dpi=80)
    assert all(_colour_pixels(tmp_path / "curves.png", colours[m]) > 30 for m in models)


# ----------------------------------------------------------------------------- compare on a made-up store


def _made_up_store(tmp_path: Path) -> str:
    """Runs as ``echocare experiment`` leaves them: 3 models x 6 seeds x 2 fractions, per-epoch
    histories of mean_dice and mae, final_* metrics; plus a failed run and a compare run to ignore."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("made_up")
    rng = np.random.default_rng(3)
    for model, shift in (("scratch", 0.0), ("echocare", 0.1), ("mim", 0.09)):
        for fraction in (0.25, 1.0):
            for seed in range(6):
                run = client.create_run(experiment, run_name=f"made_up_{model}_s{seed}_f{fraction:g}", start_time=1_000_000,
                                        tags={"init": model, "seed": str(seed), "fraction": f"{fraction:g}",
                                              "echocare.role": "run", "echocare.status": "finished"})
                best = 0.6 + shift + 0.1 * fraction + 0.01 * seed + rng.normal(0, 0.003)
                curve = [best * f for f in (0.5, 0.9, 0.96, 1.0, 0.99)]
                history = [Metric("mean_dice", v, 1_000_000 + 1000 * (e + 1) * (2 if model == "scratch" else 1), e + 1)
                           for e, v in enumerate(curve)]
                history += [Metric("mae", 10 - 10 * v, 1_000_000 + 1000 * (e + 1), e + 1) for e, v in enumerate(curve)]
                finals = [Metric("final_mean_dice", best, 0, 0), Metric("final_mae", 10 - 10 * best, 0, 0), Metric("wall_time_s", 60.0, 0, 0)]
                client.log_batch(run.info.run_id, metrics=history + finals)
                client.set_terminated(run.info.run_id)
    failed = client.create_run(experiment, run_name="made_up_broken", tags={"init": "broken", "seed": "0", "fraction": "1",
                                                                            "echocare.status": "failed"})
    client.log_metric(failed.info.run_id, "final_mean_dice", 0.0)
    client.create_run(experiment, run_name="old_compare", tags={"echocare.role": "compare", "echocare.status": "finished", "init": "x"})
    return uri


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_compare_on_made_up_runs(tmp_path: Path) -> None:
    uri = _made_up_store(tmp_path)
    result = compare_experiment("made_up", "mean_dice", tracking_uri=uri, out=tmp_path / "out")
    out = tmp_path / "out"
    assert result["models"] == ["scratch", "echocare", "mim"] and result["fractions"] == [0.25, 1.0]
    for name in ("runs.csv", "summary.csv", "summary.md", "tests.csv", "tests.md", "convergence.csv", "convergence.md",
                 "boxplot.png", "label_efficiency.png", "report.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    runs = _read_csv(out / "runs.csv")
    assert len(runs) == 36 and {r["source"] for r in runs} == {"final_mean_dice"}  # the failed and compare runs are left out
    summary = _read_csv(out / "summary.csv")
    assert len(summary) == 6
    for row in summary:
        mine = [float(r["value"]) for r in runs if r["model"] == row["model"] and float(r["fraction"]) == float(row["fraction"])]
        assert int(row["n"]) == 6 and float(row["mean"]) == pytest.approx(np.mean(mine))
        assert float(row["sd"]) == pytest.approx(np.std(mine, ddof=1))
        assert row["mean_sd"] == f"{float(row['mean']):.4f} ± {float(row['sd']):.4f}"
        assert row["best"] == ("yes" if row["model"] == "echocare" else "")

    tests = _read_csv(out / "tests.csv")
    assert [(t["fraction"], t["best"], t["other"]) for t in tests] == [
        ("0.25", "echocare", "scratch"), ("0.25", "echocare", "mim"), ("1.0", "echocare", "scratch"), ("1.0", "echocare", "mim")]
    for t in tests:
        def values(model: str) -> list[float]:
            rows = [r for r in runs if r["model"] == model and float(r["fraction"]) == float(t["fraction"])]
            return [float(r["value"]) for r in sorted(rows, key=lambda r: int(r["seed"]))]

        w = stats.wilcoxon(values("echocare"), values(t["other"]))
        welch = stats.ttest_ind(values("echocare"), values(t["other"]), equal_var=False)
        assert int(t["n_pairs"]) == 6
        assert float(t["wilcoxon_p"]) == pytest.approx(w.pvalue) and float(t["welch_p"]) == pytest.approx(welch.pvalue)
        assert t["wilcoxon_sig"] == stars(w.pvalue) and t["welch_sig"] == stars(welch.pvalue)
    scratch_test = tests[0]
    assert float(scratch_test["wilcoxon_p"]) == pytest.approx(2 / 64) and scratch_test["wilcoxon_sig"] == "*"
    assert scratch_test["welch_sig"] == "***"
    assert "*" in (out / "tests.md").read_text() and "| 0.25 | echocare | scratch |" in (out / "tests.md").read_text()

    convergence = {(c["model"], c["fraction"]): c for c in _read_csv(out / "convergence.csv")}
    assert float(convergence[("echocare", "1.0")]["epochs_to_95_mean"]) == 3.0  # 0.96 of the best at epoch 3
    assert float(convergence[("echocare", "1.0")]["seconds_to_95_mean"]) == pytest.approx(3.0)
    assert float(convergence[("scratch", "1.0")]["seconds_to_95_mean"]) == pytest.approx(6.0)

    report = (out / "report.md").read_text()
    assert "Welch" in report and "![box plots](boxplot.png)" in report and "higher is better" in report
    with Image.open(out / "boxplot.png") as box, Image.open(out / "label_efficiency.png") as curves:
        assert box.size[0] > 400 and curves.size[0] > 400
    colours = model_colours(result["models"])
    for png in ("boxplot.png", "label_efficiency.png"):
        assert all(_colour_pixels(out / png, colours[m]) > 30 for m in result["models"]), png

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    logged = {a.path for a in client.list_artifacts(result["run_id"], "compare_mean_dice")}
    assert {"compare_mean_dice/tests.csv", "compare_mean_dice/boxplot.png", "compare_mean_dice/report.md"} <= logged
    assert client.get_run(result["run_id"]).data.tags["echocare.role"] == "compare"

    # An error metric: lower is better is inferred, so the best model is the one with the smallest mae.
    errors = compare_experiment("made_up", "mae", tracking_uri=uri, out=tmp_path / "mae", log_to_mlflow=False)
    assert errors["lower_is_better"] and {t["best"] for t in errors["tests"]} == {"echocare"}
    assert "lower is better" in (tmp_path / "mae" / "report.md").read_text()
    forced = compare_experiment("made_up", "mae", tracking_uri=uri, out=tmp_path / "mae2", lower_is_better=False, log_to_mlflow=False)
    assert {t["best"] for t in forced["tests"]} == {"scratch"}
    with pytest.raises(ValueError, match="no MLflow experiment"):
        compare_experiment("nothing", "mean_dice", tracking_uri=uri, out=tmp_path / "x")


# ----------------------------------------------------------------------------- a real grid


def _tiny_seg_dataset(root: Path, n: int = 8) -> Path:
    """Grey 48x56 images with a bright ellipse and its mask (0/255), as DDTI's; n - 4 for training."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:48, :56]
    items = []
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        radius = 6 + 3 * (i % 4)
        cy, cx = rng.integers(16, 32), rng.integers(16, 40)
        inside = ((yy - cy) / radius) ** 2 + ((xx - cx) / (radius * 1.3)) ** 2 <= 1
        image = np.clip(rng.normal(60, 20, (48, 56)) + 120 * inside, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"b{i}.png")
        Image.fromarray((inside * 255).astype(np.uint8)).save(root / "masks" / f"b{i}.png")
        items.append({"image": f"images/b{i}.png", "label": f"masks/b{i}.png", "case": f"P{i}"})
    content = {"training": items[: n - 4], "validation": items[n - 4 :], "mask_values": {"background": 0, "nodule": 255}}
    (root / "datalist.json").write_text(json.dumps(content))
    return root


@pytest.mark.slow
@pytest.mark.e2e
def test_experiment_runs_resumes_and_compares(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """2 inits x 2 seeds (one fraction: the multi-fraction report is checked on the made-up
    store above) on ddti_seg; one run crashes the first time and is redone on the rerun."""
    from mlflow.tracking import MlflowClient

    from echocare.cli import main
    from echocare.networks import build_encoder, save_encoder_weights

    data = _tiny_seg_dataset(tmp_path / "data")
    save_encoder_weights(build_encoder("tiny"), tmp_path / "echocare.pt")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the runs' subprocesses: faster on a busy 2-core machine
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    grid = tmp_path / "grid"
    store = f"sqlite:///{grid / 'mlruns.db'}"
    argv = ["experiment", "ddti_seg", "--name", "trial", "--inits", f"scratch,{tmp_path / 'echocare.pt'}", "--seeds", "2",
            "--train-fractions", "0.5", "--dataset_dir", str(data), "--datalist", str(data / "datalist.json"),
            "--output_dir", str(grid), "--override", "network_size=tiny", "--override", "image_size=64",
            "--override", "train#trainer#max_epochs=1", "--max_epochs", "1", "--batch_size", "4", "--num_workers", "0",
            "--progress_bar", "False"]

    launched: list[str] = []
    real_launch = experiment_run._launch

    def crash_once(spec_path: Path, log_path: Path, timeout):
        spec = json.loads(spec_path.read_text())
        launched.append(spec["train"]["run_name"])
        if spec["train"]["run_name"] == "trial_scratch_s1_f0.5" and launched.count("trial_scratch_s1_f0.5") == 1:
            # Dies in the middle of training: its MLflow run is left RUNNING, with no tags.
            client = MlflowClient(spec["train"]["tracking_uri"])
            client.create_run(client.get_experiment_by_name("trial").experiment_id, run_name=spec["train"]["run_name"])
            return subprocess.run([sys.executable, "-c", "raise SystemExit(3)"], check=False).returncode
        return real_launch(spec_path, log_path, timeout)

    monkeypatch.setattr(experiment_run, "_launch", crash_once)  # run_experiment launches through it
    with pytest.raises(SystemExit) as failed:
        main(argv)
    assert failed.value.code == 1
    printed = capsys.readouterr().out
    assert "3 finished, 0 skipped, 1 failed" in printed and "trial_scratch_s1_f0.5" in printed
    assert launched == ["trial_scratch_s0_f0.5", "trial_scratch_s1_f0.5", "trial_echocare_s0_f0.5", "trial_echocare_s1_f0.5"]

    main(argv)  # resumes: redoes the failed run only
    assert launched[4:] == ["trial_scratch_s1_f0.5"]
    assert "1 finished, 3 skipped, 0 failed" in capsys.readouterr().out

    rows = experiment_run.run_experiment("ddti_seg", "trial", inits=["scratch", str(tmp_path / "echocare.pt")], seeds=2,
                                          train_fractions=0.5, output_dir=grid, progress=False)
    assert [r["status"] for r in rows] == ["skipped"] * 4 and len(launched) == 5

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("trial")
    runs = client.search_runs([experiment.experiment_id], "tags.`echocare.role` = 'run'")
    assert sorted(r.info.run_name for r in runs) == sorted(launched[:4])  # the crashed attempt was deleted
    for run in runs:
        tags, metrics = run.data.tags, run.data.metrics
        assert tags["echocare.status"] == "finished" and run.info.status == "FINISHED"
        assert tags["init"] in ("scratch", "echocare") and tags["seed"] in ("0", "1") and tags["fraction"] == "0.5"
        assert tags["init_path"] == ("scratch" if tags["init"] == "scratch" else str(tmp_path / "echocare.pt"))
        assert run.data.params["train_fraction"] == "0.5" and run.data.params["network_size"] == "tiny"
        assert len(client.get_metric_history(run.info.run_id, "mean_dice")) == 1  # per-epoch validation history
        assert 0.0 <= metrics["final_mean_dice"] <= 1.0 and metrics["wall_time_s"] > metrics["train_time_s"] > 0
        assert "eval/summary.json" in {a.path for a in client.list_artifacts(run.info.run_id, "eval")}
        folder = grid / "runs" / run.info.run_name
        assert json.loads((folder / "eval" / "summary.json").read_text())["mean_dice"] == pytest.approx(metrics["final_mean_dice"])
        assert "python -m monai.bundle run training" in (folder / "commands.sh").read_text()
        assert json.loads((folder / "experiment_run.json").read_text())["status"] == "finished"

    main(["compare", "--experiment", "trial", "--metric", "mean_dice", "--output_dir", str(grid)])
    out = grid / "compare_mean_dice"
    assert "report:" in capsys.readouterr().out
    summary = _read_csv(out / "summary.csv")
    assert sorted((r["model"], r["n"]) for r in summary) == [("echocare", "2"), ("scratch", "2")]
    (test,) = _read_csv(out / "tests.csv")
    assert int(test["n_pairs"]) == 2 and test["wilcoxon_p"] == "nan" and "seed-paired" in test["note"]
    values = {m: [float(r["value"]) for r in _read_csv(out / "runs.csv") if r["model"] == m] for m in ("scratch", "echocare")}
    expected = stats.ttest_ind(values[test["best"]], values[test["other"]], equal_var=False).pvalue
    assert (math.isnan(expected) and test["welch_p"] == "nan") or float(test["welch_p"]) == pytest.approx(expected)
    assert {c["epochs_to_95_mean"] for c in _read_csv(out / "convergence.csv")} == {"1.0"}
    fig_files = {p.name for p in out.glob("*.png")}
    assert fig_files == {"boxplot.png", "label_efficiency.png"}
    compare_runs = client.search_runs([experiment.experiment_id], "tags.`echocare.role` = 'compare'")
    assert len(compare_runs) == 1


def test_a_grid_without_its_datalist_is_refused_before_any_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                capsys) -> None:
    from echocare.bundle import MissingIdError
    from echocare.cli import main

    launched: list[Path] = []
    monkeypatch.setattr(experiment_run, "_launch", lambda spec, log, timeout: launched.append(spec) or 0)
    grid = tmp_path / "grid"
    with pytest.raises(MissingIdError, match=r"^pass --datalist"):
        experiment_run.run_experiment("ddti_seg", "nodata", seeds=2, output_dir=grid, progress=False)
    with pytest.raises(SystemExit) as refused:
        main(["experiment", "busbra_cls", "--name", "nodata", "--seeds", "2", "--output_dir", str(grid)])
    assert refused.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and "--datalist" in errors[0]
    assert launched == [] and not (grid / "runs").exists()
    # the pretraining bundle streams shards instead: its own rule applies (--datalist or --shards)
    _, pretrain_files, _ = experiment_run._config_files("echocare_pretrain", None)
    with pytest.raises(MissingIdError, match=r"^pass --datalist .* or --shards"):
        experiment_run._check_required_ids(pretrain_files, {})
    experiment_run._check_required_ids(pretrain_files, {"shards": str(tmp_path / "shards.json")})


def test_a_run_folder_holding_other_files_is_never_emptied(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    launched: list[Path] = []
    monkeypatch.setattr(experiment_run, "_launch", lambda spec, log, timeout: launched.append(spec) or 1)
    data = _tiny_seg_dataset(tmp_path / "data")
    grid = tmp_path / "grid"
    mine = grid / "runs" / "mine_scratch_s1_f1" / "notes.txt"  # the grid's second run's folder, not the grid's
    mine.parent.mkdir(parents=True)
    mine.write_text("my notes")
    args = dict(seeds=2, dataset_dir=str(data), datalist=str(data / "datalist.json"), output_dir=grid, progress=False)
    with pytest.raises(FileExistsError, match=r"mine_scratch_s1_f1: holds files this experiment did not write"):
        experiment_run.run_experiment("ddti_seg", "mine", **args)
    assert mine.read_text() == "my notes" and launched == []
    mine.unlink()  # an empty folder, or one the experiment wrote (a failed attempt), is the experiment's to redo
    rows = experiment_run.run_experiment("ddti_seg", "mine", **args)
    assert [r["status"] for r in rows] == ["failed", "failed"] and len(launched) == 2
    rows = experiment_run.run_experiment("ddti_seg", "mine", **args)
    assert len(launched) == 4 and (grid / "runs" / "mine_scratch_s1_f1" / "spec.json").is_file()


def test_run_table_names_each_runs_mlflow_id() -> None:
    """The summary `echocare experiment` prints ends each run's line with its MLflow run name and id
    (what `echocare registry register --run` takes)."""
    rows = [{"run_name": "t_scratch_s0_f1", "run_id": "0f3a9c", "init": "scratch", "seed": 0, "fraction": 1.0,
             "status": "finished", "wall_time_s": 3.21, "final_mean_dice": 0.5},
            {"run_name": "t_scratch_s1_f1", "init": "scratch", "seed": 1, "fraction": 1.0, "status": "failed"}]
    lines = experiment_run.format_run_table(rows).splitlines()
    assert lines[0].split() == ["run", "run_id", "init", "seed", "fraction", "status", "wall_s", "mean_dice"]
    assert lines[2].split() == ["t_scratch_s0_f1", "0f3a9c", "scratch", "0", "1", "finished", "3.2", "0.5000"]
    assert lines[3].split()[:2] == ["t_scratch_s1_f1", "-"]
    assert lines[4] == "1 finished, 0 skipped, 1 failed"
