"""The training CLIs as a user runs them (subprocesses), at toy size."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # each test runs the training command line in a subprocess

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--seq-len", "32", "--batch-size", "8", "--warmup-steps", "2", "--eval-batches", "1"]


def cli(module, *args, timeout=300):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", COLUMNS="120")
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout, env=env)


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_gpt2_cli_trains_then_resumes(tmp_path):
    out = tmp_path / "gpt2"
    args = ["--steps", "16", "--lr", "3e-3", "--log-every", "4", "--eval-every", "16", "--sparsity-every", "8",
            "--out", str(out), *SMALL]
    p = cli("train.gpt2", *args)  # progress bar on (the default)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = records(out)
    assert [r["step"] for r in recs] == [4, 8, 12, 16]
    assert recs[-1]["loss_avg"] < recs[0]["loss_avg"] - 0.5
    assert "val_loss" in recs[-1] and "sparsity" in recs[1]
    assert (out / "config.json").exists() and (out / "checkpoints" / "16").exists()
    # the same command again: finds the finished run and says so
    p = cli("train.gpt2", *args)
    assert p.returncode == 0
    assert "resuming from the checkpoint at step 16" in p.stdout + p.stderr


def test_gpt2_cli_sigterm_saves_a_checkpoint(tmp_path):
    out = tmp_path / "term"
    args = ["--steps", "400", "--log-every", "1", "--save-every", "1000", "--no-progress", "--out", str(out),
            *SMALL]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    proc = subprocess.Popen([sys.executable, "-m", "train.gpt2", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until training is under way
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, text[-2000:]
    assert "SIGTERM" in text
    saved = [int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and saved[0] >= 3
    assert (out / "checkpoints" / str(saved[0]) / "integrity.json").exists()  # sealed before exiting
    assert records(out)[-1]["step"] == saved[0]  # log_every=1: the interrupted step is a logged step anyway


def test_bert_cli_pretrain_then_finetune(tmp_path):
    mlm = tmp_path / "mlm"
    p = cli("train.bert", "--steps", "12", "--lr", "3e-3", "--log-every", "6", "--eval-every", "12",
            "--no-progress", "--out", str(mlm), *SMALL)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = records(mlm)
    assert [r["step"] for r in recs] == [6, 12]
    assert recs[-1]["loss_avg"] < recs[0]["loss_avg"] and "val_ppl" in recs[-1]
    assert (mlm / "model" / "config.json").exists()  # exported in Hugging Face layout
    # fine-tune the pre-trained encoder on a folder corpus whose classes (its sub-folders) are easy to tell apart
    rng = np.random.default_rng(0)
    words = {"code": "def return import class yield lambda".split(),
             "latin": "lorem ipsum dolor sit amet consectetur".split()}
    for label, vocab in words.items():
        (tmp_path / "corpus" / label).mkdir(parents=True)
        for i in range(20):
            (tmp_path / "corpus" / label / f"{i}.txt").write_text(" ".join(rng.choice(vocab, 300)))
    cls = tmp_path / "cls"
    p = cli("train.bert", "--task", "classify", "--init-from", str(mlm / "model"), "--data", str(tmp_path / "corpus"),
            "--num-labels", "2", "--val-fraction", "0.3", "--steps", "60", "--lr", "3e-3", "--log-every", "20",
            "--eval-every", "60",
            "--eval-batches", "2", "--no-progress", "--out", str(cls), *SMALL[:-2])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "classification over ['code', 'latin']" in p.stdout
    every = records(cls)
    assert [r["step"] for r in every] == [20, 40, 50, 60]  # sparsity at its own period (50, the default)
    assert "loss" not in every[2] and "sparsity" in every[2]
    recs = [r for r in every if "loss" in r]
    assert recs[-1]["loss_avg"] < 0.5 * recs[0]["loss_avg"]
    assert recs[-1]["val_accuracy"] >= 0.75  # 16 balanced validation snippets; chance is 0.5
    assert len(recs[-1]["sparsity"]) == 2  # tiny preset: 2 layers


def test_two_processes_match_one(tmp_path):
    """Multi-host on one machine: two processes × 4 CPU devices joined by jax.distributed (--coordinator), mesh
    data=2,fsdp=4 over all 8, give the single-device losses."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    common = ["--steps", "3", "--log-every", "1", "--eval-every", "3", "--sparsity-every", "100", "--no-progress",
              *SMALL]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    procs = [subprocess.Popen([sys.executable, "-m", "train.gpt2", *common, "--out", str(tmp_path / "multi"),
                               "--mesh", "data=2,fsdp=4", "--coordinator", f"localhost:{port}",
                               "--num-processes", "2", "--process-id", str(i)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    p = cli("train.gpt2", *common, "--out", str(tmp_path / "single"))
    assert p.returncode == 0, p.stderr[-2000:]
    multi, single = records(tmp_path / "multi"), records(tmp_path / "single")
    assert [r["step"] for r in multi] == [1, 2, 3]
    for a, b in zip(multi, single):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3)
    assert multi[-1]["val_loss"] == pytest.approx(single[-1]["val_loss"], rel=1e-3)
