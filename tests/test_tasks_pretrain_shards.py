"""The echocare_pretrain bundle from WebDataset shards (``--shards``), as a user runs it: one
process killed in the middle of an epoch and resumed, and two gloo processes under torchrun on
shards that do not divide evenly between them."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bundle_helpers import REPO, bundle, checkpoint_readable, mlflow_runs
from echocare.datasets.shards import write_index, write_shard
from echocare.phantoms import generate_demo_data

CONFIGS = REPO / "bundles" / "echocare_pretrain" / "configs"
TRAIN = str(CONFIGS / "train.yaml")
MULTI_GPU = str(CONFIGS / "multi_gpu_train.yaml")
SMALL = [
    "--network_size", "tiny", "--image_size", "64", "--mask_unit", "16", "--warmup_steps", "2",
    "--total_steps", "100", "--progress_bar", "False",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """40 phantoms as curation's shards of 6: training 6, 6, 6, 6, 6, 2; validation 6, 2."""
    phantoms = tmp_path_factory.mktemp("phantoms")
    generate_demo_data("pretrain", phantoms, n=40, seed=0, image_size=64)
    datalist = json.loads((phantoms / "datalist.json").read_text())
    out = tmp_path_factory.mktemp("corpus")
    (out / "shards").mkdir()
    records, anatomy, number = [], {}, 0
    for split in ("training", "validation"):
        items = datalist[split]
        for start in range(0, len(items), 6):
            samples = [(f"{number:06d}{i:018x}", (phantoms / item["image"]).read_bytes(),
                        {"anatomy": item.get("anatomy"), "source": "phantom"}) for i, item in enumerate(items[start:start + 6])]
            write_shard(out / "shards" / f"shard-{number:06d}.tar", samples)
            records.append({"name": f"shard-{number:06d}.tar", "split": split, "keys": [s[0] for s in samples]})
            anatomy.update({s[0]: s[2]["anatomy"] for s in samples})
            number += 1
    return write_index(out, records, anatomy, {"shard_size": 6})


@pytest.mark.slow
@pytest.mark.e2e
def test_training_from_shards_resumes_in_the_middle_of_an_epoch(shards, tmp_path):
    out = tmp_path / "run"
    # 2 workers: shards 0, 2, 4 (18 samples, 3 batches of 8 at most) and 1, 3, 5 (14, 2) -> 5 steps per epoch
    args = ["training", "--config_file", TRAIN, *SMALL, "--batch_size", "8", "--num_workers", "2", "--shards", str(shards),
            "--output_dir", str(out), "--train#trainer#max_epochs", "2", "--checkpoint_interval", "3",
            "--tracking", "mlflow", "--run_name", "from_shards"]
    process = subprocess.Popen([sys.executable, "-m", "monai.bundle", "run", *args], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "models" / "checkpoint_iteration=3.pt"
    deadline = time.time() + 300
    while time.time() < deadline and not checkpoint_readable(first):
        assert process.poll() is None, "training ended before its first checkpoint"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = torch.load(first, weights_only=True)
    assert saved["sampler"]["layout"] == {"world_size": 1, "num_workers": 2, "batch_size": 8, "shards": 6,
                                          "samples": 32, "buffer_size": 1000}
    assert not (out / "models" / "checkpoint_final.pt").exists()
    result = bundle(*args, "--resume", "true")
    log = result.stdout + result.stderr
    # Ignite logs "resuming from iteration 0" before the CheckpointLoader restores the iteration
    restored = [int(m) for m in re.findall(r"Restored all variables from \S*checkpoint_iteration=(\d+)\.pt", log)]
    assert restored and restored[0] % 5 != 0, log[-3000:]  # in the middle of an epoch of 5 steps
    final = torch.load(out / "models" / "checkpoint_final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 10 and final["trainer"]["epoch_length"] == 5
    assert final["sampler"]["epoch"] == 2
    client, runs = mlflow_runs(out / "mlruns.db")
    assert len(runs) == 1
    params = runs[0].data.params
    assert params["num_training_images"] == "32" and params["num_validation_images"] == "8"
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "train_loss")][-1] == 10


@pytest.mark.slow
def test_two_processes_on_uneven_shards_take_equal_steps(shards, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # rank 0 streams shards 0, 2, 4 (18 samples: 5 batches of 4 at most), rank 1 shards 1, 3, 5 (14): both take 5
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "monai.bundle", "run", "training",
        "--config_file", f"['{TRAIN}','{MULTI_GPU}']", *SMALL, "--batch_size", "4", "--num_workers", "1",
        "--shards", str(shards), "--output_dir", str(out), "--train#trainer#max_epochs", "2",
        "--tracking", "mlflow", "--run_name", "ddp_shards",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert result.returncode == 0, result.stderr[-5000:]
    log = result.stdout + result.stderr
    assert log.count("Epoch[2] Metrics") == 1  # only rank 0 reports; validation of unequal shares gathered
    final = torch.load(out / "models" / "checkpoint_final.pt", weights_only=True)
    assert final["trainer"]["iteration"] == 10
    assert final["sampler"]["layout"]["world_size"] == 2
    client, runs = mlflow_runs(out / "mlruns.db")
    assert len(client.get_metric_history(runs[0].info.run_id, "train_loss")) == 10
