"""The usreport bundle end to end on the report phantom: train, evaluate, infer as a user runs them
(``--tracking mlflow``), the phantom-trained model against the constant-report baseline, and the
Chinese path (tokenizer, metrics, reports written as UTF-8)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from bundle_helpers import REPO, bundles_in_one_process, mlflow_runs
from echocare.phantoms import generate_demo_data
from echocare.tasks.report.data import list_report_cases, load_report_datalist
from echocare.datasets.datalist import DatalistError
from echocare.tasks.report.metrics import FindingsVocabulary, report_scores

CONFIGS = REPO / "bundles" / "usreport" / "configs"
TRAIN, EVALUATE, INFER = (str(CONFIGS / f) for f in ("train.yaml", "evaluate.yaml", "inference.yaml"))
NETWORK = ["--network_size", "tiny", "--image_size", "32", "--d_model", "64", "--decoder_layers", "2",
           "--decoder_heads", "4", "--max_report_length", "40", "--num_workers", "0"]
SMALL = [*NETWORK, "--batch_size", "8", "--progress_bar", "False", "--min_token_count", "1"]


def test_phantom_layout_and_loading(tmp_path):
    datalist = generate_demo_data("usreport", tmp_path, n=8, seed=1, image_size=32, language="zh")
    content = json.loads(datalist.read_text())
    annotation = json.loads((tmp_path / "usreport" / "annotation.json").read_text())
    assert sum(len(annotation[k]) for k in ("train", "val", "test")) == 8
    assert len(content["training"]) + len(content["validation"]) == 8
    items = load_report_datalist(datalist, "training")
    assert all(Path(i["image"]).is_file() and Path(i["image2"]).is_file() and i["image"] != i["image2"] for i in items)
    assert all(i["report"].startswith(("肝脏", "甲状腺", "乳腺")) for i in items)
    bad = json.loads(datalist.read_text())
    bad["training"][0]["images"] = ["missing.png"]
    bad["training"][1]["report"] = ""
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(DatalistError, match=r"2 problem\(s\)[\s\S]*missing.png[\s\S]*no report text"):
        load_report_datalist(tmp_path / "bad.json", "training")
    # inference inputs: a folder of case folders, one case per folder
    cases = list_report_cases(tmp_path / "usreport" / "images")
    assert len(cases) == 8 and all(json.loads(c["image_files"])[0].endswith("0.png") for c in cases)


@pytest.mark.slow
@pytest.mark.e2e
def test_bundle_beats_constant_report(tmp_path):
    data = tmp_path / "data"
    datalist = generate_demo_data("usreport", data, n=120, seed=0, image_size=32)
    zh = tmp_path / "zh"
    zh_datalist = generate_demo_data("usreport", zh, n=8, seed=0, image_size=32, language="zh")
    out, zh_out = tmp_path / "out", tmp_path / "zh_out"
    common = [*SMALL, "--dataset_dir", str(data), "--datalist", str(datalist), "--output_dir", str(out)]
    zh_common = [*SMALL, "--dataset_dir", str(zh), "--datalist", str(zh_datalist), "--output_dir", str(zh_out)]
    bundles_in_one_process(
        ["training", "--config_file", TRAIN, *common, "--max_epochs", "8", "--val_interval", "4",
         "--encoder_lr", "2e-3", "--head_lr", "3e-3", "--tracking", "mlflow", "--run_name", "usreport_train"],
        ["evaluating", "--config_file", repr([TRAIN, EVALUATE]), *common, "--tracking", "mlflow", "--run_name", "usreport_eval"],
        ["inferring", "--config_file", INFER, *NETWORK, "--input_dir", str(datalist), "--output_dir", str(out)],
        ["training", "--config_file", TRAIN, *zh_common, "--max_epochs", "1"],
        ["evaluating", "--config_file", repr([TRAIN, EVALUATE]), *zh_common],
    )
    models = out / "models"
    assert (models / "model.pt").is_file() and (models / "checkpoint_final.pt").is_file() and (models / "tokenizer.json").is_file()

    # the phantom-trained model against the most frequent training report, on the validation cases
    summary = json.loads((out / "eval" / "summary.json").read_text())
    content = json.loads(datalist.read_text())
    constant = Counter(i["report"] for i in content["training"]).most_common(1)[0][0]
    references = [i["report"] for i in content["validation"]]
    baseline = report_scores([constant] * len(references), references, FindingsVocabulary.from_yaml(CONFIGS / "findings.yaml"))
    assert set(summary) == set(baseline) | {"meteor_wordnet"}
    assert summary["meteor_wordnet"] == 0.0  # the bundle's fixed default: METEOR without WordNet, said in the output
    assert summary["findings_f1"] > baseline["findings_f1"] + 0.2, (summary, baseline)
    assert summary["bleu4"] > baseline["bleu4"], (summary, baseline)
    with (out / "eval" / "per_case.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(references) and {r["report"] for r in rows} == set(references)
    assert len({r["generated"] for r in rows}) >= 3  # the report depends on the images

    # inference: one .txt and .json per case, the same reports as the evaluation (same beam search)
    predictions = out / "predictions"
    record = json.loads((predictions / f"{content['validation'][0]['case']}.json").read_text())
    assert set(record) == {"case", "report", "tokens", "token_ids", "score", "images"} and len(record["images"]) == 2
    assert (predictions / f"{record['case']}.txt").read_text().strip() == record["report"]
    generated = {r["case"]: r["generated"] for r in rows}
    assert record["report"] == generated[record["case"]] and record["token_ids"][-1] == 2
    assert len(json.loads((predictions / "predictions.json").read_text())) == len(references)

    client, runs = mlflow_runs(out / "mlruns.db")
    by_name = {r.info.run_name: r for r in runs}
    train_run = by_name["usreport_train"]
    assert len(client.get_metric_history(train_run.info.run_id, "bleu4")) == 2  # validated at epochs 4 and 8
    assert client.get_metric_history(train_run.info.run_id, "train_loss")
    assert train_run.data.params["network_size"] == "tiny" and train_run.data.params["num_training_items"] == str(len(content["training"]))
    assert by_name["usreport_eval"].data.metrics["findings_f1"] == pytest.approx(summary["findings_f1"])

    # registered: the version carries the tokenizer, so inference from models:/ needs no --tokenizer_path
    from echocare.registry import register_run

    store = f"sqlite:///{out / 'mlruns.db'}"
    register_run(train_run.info.run_id, "usreport_phantom", alias="champion", tracking_uri=store)
    registered_out = tmp_path / "registered"
    bundles_in_one_process(
        ["inferring", "--config_file", INFER, *NETWORK, "--input_dir", str(datalist), "--output_dir", str(registered_out),
         "--checkpoint", "models:/usreport_phantom@champion", "--tracking_uri", store],
    )
    assert (registered_out / "registry" / "usreport_phantom" / "champion" / "tokenizer.json").read_text(encoding="utf-8") == (
        models / "tokenizer.json").read_text(encoding="utf-8")
    again = json.loads((registered_out / "predictions" / f"{record['case']}.json").read_text())
    assert again["report"] == record["report"] and again["token_ids"] == record["token_ids"]

    # Chinese: the tokenizer holds single characters; reports are scored and written as characters
    tokens = json.loads((zh_out / "models" / "tokenizer.json").read_text(encoding="utf-8"))["tokens"]
    assert "肝" in tokens and all(len(t) == 1 for t in tokens[4:] if "\u4e00" <= t[0] <= "\u9fff")
    zh_summary = json.loads((zh_out / "eval" / "summary.json").read_text())
    assert 0.0 <= zh_summary["rouge_l"] <= 1.0 and "findings_f1" in zh_summary
    with (zh_out / "eval" / "per_case.csv").open(encoding="utf-8") as handle:
        assert all("。" in r["report"] for r in csv.DictReader(handle))


@pytest.mark.slow
def test_multi_process_training_gathers_the_report_metrics(tmp_path):
    """torchrun, 2 CPU processes on gloo: rank 0 alone reports and writes the tokenizer; the
    validation metrics of the DDP run (each process generated half of the reports) equal a
    single-process evaluation of the same checkpoint, so every process's reports were gathered."""
    import os
    import subprocess
    import sys

    import torch

    data = tmp_path / "data"
    datalist = generate_demo_data("usreport", data, n=16, seed=0, image_size=32)
    out = tmp_path / "out"
    common = [*SMALL, "--batch_size", "2", "--dataset_dir", str(data), "--datalist", str(datalist), "--output_dir", str(out)]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "monai.bundle", "run", "training",
        "--config_file", repr([TRAIN, str(CONFIGS / "multi_gpu_train.yaml")]), *common, "--max_epochs", "1",
        "--tracking", "mlflow", "--run_name", "usreport_ddp",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-5000:]
    assert (result.stdout + result.stderr).count("Epoch[1] Metrics") == 1  # only rank 0 reports
    content = json.loads(datalist.read_text())
    final = torch.load(out / "models" / "checkpoint_final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == len(content["training"]) // 4  # items / (2 processes x 2)
    assert (out / "models" / "tokenizer.json").is_file()

    client, runs = mlflow_runs(out / "mlruns.db")
    (run,) = [r for r in runs if r.info.run_name == "usreport_ddp"]
    # the same decoding as the run's validation (greedy: val_beam_size 1)
    bundles_in_one_process(["evaluating", "--config_file", repr([TRAIN, EVALUATE]), *common, "--beam_size", "1"])
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert len(content["validation"]) >= 3  # split over the two processes
    for name in ("bleu1", "meteor", "rouge_l", "findings_accuracy"):
        assert run.data.metrics[name] == pytest.approx(summary[name], abs=1e-6), name
