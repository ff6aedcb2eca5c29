"""Training loop, in process, at toy size: loss falls, one compile, resume equality, signals, sharding."""

import json
import os
import signal

import jax
import numpy as np
import pytest

from train.config import make_config
from train.tasks import make_task, sparsity
from train.trainer import run

QUIET = dict(log=lambda *_: None)


pytestmark = pytest.mark.usefixtures("persistent_compilation_cache")


def cfg_for(tmp_path, name="run", **kw):
    base = dict(task="lm", steps=8, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=2, out=str(tmp_path / name),
                progress=False, log_every=1, eval_every=4, eval_batches=1, sparsity_every=4, save_every=4)
    base.update(kw)
    return make_config(**base)


def train(cfg, **kw):
    task = make_task(cfg, **QUIET)
    return run(cfg, task, sparsity_fn=sparsity, **QUIET, **kw)


def losses(records):
    return [(r["step"], r["loss"]) for r in records]


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.slow
def test_gpt2_loss_falls_one_compile_and_metrics(tmp_path):
    # α annealing, gradient accumulation and bf16 compute all in the one compiled step
    cfg = cfg_for(tmp_path, steps=12, alpha_start=1.05, alpha_anneal_steps=6, grad_accum=2, dtype="bfloat16",
                  log_every=5, eval_every=6)
    from train.trainer import Periodic

    seen = []
    extra = Periodic("mine", 8, lambda step, state: seen.append(step) or {"mine": len(jax.tree.leaves(state))})
    res = train(cfg, periodic=(extra,))
    assert res.step == 12 and not res.interrupted
    assert res.train_step._cache_size() == 1  # no recompiles although α changed every step
    every = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    # each periodic job at its own period (log 5, eval 6, sparsity 4, ours 8), all of them after the final step
    keys = ("loss", "val_loss", "sparsity", "mine")
    assert [(r["step"], sorted(k for k in r if k in keys)) for r in every] == [
        (4, ["sparsity"]), (5, ["loss"]), (6, ["val_loss"]), (8, ["mine", "sparsity"]), (10, ["loss"]),
        (12, ["loss", "mine", "sparsity", "val_loss"])]
    assert seen == [8, 12] and every[3]["mine"] > 10
    recs = [r for r in every if "loss" in r]
    assert all(np.isfinite(r["loss"]) for r in recs)
    assert recs[-1]["loss_avg"] < recs[0]["loss_avg"] - 0.5
    assert "val_ppl" in recs[-1] and "val_loss" not in recs[0]
    assert recs[-1]["alpha"] == pytest.approx(1.5) and recs[0]["alpha"] == pytest.approx(1.05 + 0.45 * 4 / 6)
    assert len(recs[-1]["sparsity"]) == 2 and len(recs[-1]["sparsity_heads"][0]) == 4  # layers, heads
    assert all(0.0 <= s <= 1.0 for s in recs[-1]["sparsity"])
    # parameters (and Adam moments) stay float32 with bf16 compute
    floats = [x for x in jax.tree.leaves(res.state) if jax.numpy.issubdtype(x.dtype, jax.numpy.floating)]
    assert floats and all(x.dtype == jax.numpy.float32 for x in floats)
    assert sorted(int(p) for p in os.listdir(tmp_path / "run" / "checkpoints")) == [4, 8, 12]  # keep=3


@pytest.mark.slow
def test_resume_is_bitwise_identical_and_skips_corrupt_checkpoints(tmp_path):
    full = train(cfg_for(tmp_path, "full", save_every=2))
    # interrupted at step 5 (checkpoints 2, 4 and 5), then the newest is damaged, then resumed
    part = train(cfg_for(tmp_path, "part", save_every=2, stop_after=5))
    assert part.interrupted and part.step == 5
    ck = tmp_path / "part" / "checkpoints"
    assert sorted(int(p) for p in os.listdir(ck) if p.isdigit()) == [2, 4, 5]
    for f in (ck / "5" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
            f.write_bytes(b"\0" * 7)
    (ck / "6.orbax-checkpoint-tmp-1234").mkdir()  # an interrupted save
    messages = []
    resumed = run(cfg_for(tmp_path, "part", save_every=2), make_task(cfg_for(tmp_path, "part"), **QUIET),
                  sparsity_fn=sparsity, log=messages.append)
    text = "\n".join(messages)
    assert "incomplete" in text and "step 5 is corrupt" in text and "resuming from the checkpoint at step 4" in text
    assert resumed.step == 8
    got = read_jsonl(tmp_path / "part" / "metrics.jsonl")
    want = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 9))
    assert losses(got) == losses(want)  # bitwise: floats compared exactly
    assert [r.get("val_loss") for r in got] == [r.get("val_loss") for r in want]
    assert full.step == 8


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_a_checkpoint(tmp_path, sig):
    def on_step(step):
        if step == 3:
            os.kill(os.getpid(), sig)

    # The handlers in place before (a shell's background job has SIGINT ignored, not the default).
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    messages = []
    res = run(cfg_for(tmp_path, save_every=100), make_task(cfg_for(tmp_path), **QUIET), sparsity_fn=sparsity,
              log=messages.append, on_step=on_step)
    assert res.interrupted and res.step == 3
    assert sig.name in "\n".join(messages)
    assert "3" in os.listdir(tmp_path / "run" / "checkpoints")
    assert {s: signal.getsignal(s) for s in before} == before  # handlers restored


@pytest.mark.slow
def test_sharded_run_matches_single_device(tmp_path):
    assert len(jax.devices()) >= 8, "conftest provides 8 CPU devices"
    single = train(cfg_for(tmp_path, "one", steps=4, sparsity_every=100, eval_every=100))
    sharded_cfg = cfg_for(tmp_path, "dp_fsdp", steps=4, mesh="data=2,fsdp=4", sparsity_every=100,
                          eval_every=100)
    task = make_task(sharded_cfg, **QUIET)
    seen = {}
    original = task.prepare

    def prepare(model, mesh):
        original(model, mesh)
        from models.attention import attention_layers

        seen["wrapped"] = all(hasattr(layer.attention_fn, "__wrapped__") for layer in attention_layers(model))

    task.prepare = prepare
    sharded = run(sharded_cfg, task, sparsity_fn=sparsity, **QUIET)
    assert seen["wrapped"]  # attention runs under shard_map
    a = np.array([r["loss"] for r in single.records])
    b = np.array([r["loss"] for r in sharded.records])
    np.testing.assert_allclose(b, a, rtol=1e-3)
    va = single.records[-1]["val_loss"]
    assert sharded.records[-1]["val_loss"] == pytest.approx(va, rel=1e-3)


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    kw = dict(steps=3, eval_every=100, sparsity_every=100, eval_batches=1)
    one = run(cfg_for(tmp_path, "one", **kw), make_task(cfg_for(tmp_path, "one", **kw), **QUIET), **QUIET)
    acc_cfg = cfg_for(tmp_path, "acc", grad_accum=4, **kw)
    acc = run(acc_cfg, make_task(acc_cfg, **QUIET), **QUIET)
    a = np.array([r["loss"] for r in one.records])
    b = np.array([r["loss"] for r in acc.records])
    assert len(a) == 3 and a[0] == pytest.approx(b[0], rel=1e-6)  # same parameters, same 8 sequences
    np.testing.assert_allclose(b, a, rtol=1e-4)  # and the same updates after it


def test_fsdp_shards_parameters_and_optimizer_state(tmp_path):
    from flax import nnx

    from train.trainer import make_mesh, state_shardings

    cfg = cfg_for(tmp_path, mesh="fsdp=4")
    task = make_task(cfg, **QUIET)
    model = task.build_model(cfg, nnx.Rngs(0))
    opt = nnx.Optimizer(model, cfg.optim.build(cfg.run.steps), wrt=nnx.Param)
    state = {"model": nnx.state(model), "optimizer": nnx.state(opt)}
    sh = state_shardings(state, make_mesh(cfg.run.mesh))
    placed = jax.device_put(state, sh)
    big = [x for x in jax.tree.leaves(placed) if getattr(x, "size", 0) >= 4096]
    assert big and all("fsdp" in str(x.sharding.spec) for x in big)
    # each device holds a quarter of a sharded array
    x = big[0]
    assert x.addressable_shards[0].data.size * 4 == x.size


@pytest.mark.slow
def test_adasplash_attention_trains_two_steps(tmp_path):
    res = train(cfg_for(tmp_path, attention="adasplash", steps=2, batch_size=2, seq_len=16, eval_every=2,
                        sparsity_every=2))
    assert res.step == 2 and all(np.isfinite(r["loss"]) for r in res.records)


def test_plot_writes_pngs(tmp_path):
    from train.plot import main as plot_main

    run_dir = tmp_path / "p"
    run_dir.mkdir()
    with open(run_dir / "metrics.jsonl", "w") as f:
        for s in range(1, 6):
            f.write(json.dumps({"step": s, "loss": 5.0 - s, "sparsity": [0.1 * s, 0.05 * s]}
                               | ({"val_loss": 4.5 - s} if s % 2 == 0 else {})) + "\n")
    assert plot_main([str(run_dir)]) == 0
    for name in ("loss.png", "sparsity.png"):
        data = (run_dir / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert plot_main([str(run_dir), str(run_dir), "-o", str(tmp_path / "cmp.png")]) == 0
    assert (tmp_path / "cmp.png").read_bytes()[:4] == b"\x89PNG"
