"""Checkpoints that detect any corruption, divergence reported as such, and a resumed run whose metrics file equals
the uninterrupted run's (issue 11, parts 5 and 6)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from train.checkpoint import Checkpointer, Diverged, check_seal
from train.config import make_config
from train.tasks import make_task, sparsity
from train.trainer import make_mesh, run, state_shardings

pytestmark = [pytest.mark.slow,  # interrupted and resumed training runs
              pytest.mark.usefixtures("persistent_compilation_cache")]

QUIET = dict(log=lambda *_: None)
TIMING = ("tokens_per_s", "elapsed_s")


def cfg_for(tmp_path, name, **kw):
    # log every 3 steps, save every 2: a stop at step 5 falls between two records, with two losses pending
    base = dict(task="lm", steps=8, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=2, out=str(tmp_path / name),
                progress=False, log_every=3, eval_every=4, eval_batches=1, sparsity_every=4, save_every=2)
    base.update(kw)
    return make_config(**base)


def train(cfg, log=lambda *_: None, task=None):
    return run(cfg, task or make_task(cfg, **QUIET), sparsity_fn=sparsity, log=log)


def metrics_file(out):
    """The records, timing fields aside."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def flip_one_bit(folder):
    """Flip one bit in the middle of the largest file under `folder` (the tensor data)."""
    data_file = max((f for f in folder.rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    raw = bytearray(data_file.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data_file.write_bytes(bytes(raw))
    return data_file


def test_resumed_metrics_equal_uninterrupted_and_a_flipped_bit_is_detected(tmp_path, capfd):
    train(cfg_for(tmp_path, "full"))
    want = metrics_file(tmp_path / "full")
    assert [r["step"] for r in want] == [3, 4, 6, 8]

    # stopped at step 5 (between records 3 and 6, saving 2, 4 and 5), then resumed: the same file, bitwise
    stopped = train(cfg_for(tmp_path, "stop", stop_after=5))
    assert stopped.interrupted and stopped.step == 5
    assert [r["step"] for r in metrics_file(tmp_path / "stop")] == [3, 4]  # no extra record at the stop step
    messages = []
    train(cfg_for(tmp_path, "stop"), log=messages.append)
    assert "resuming from the checkpoint at step 5" in "\n".join(messages)
    assert metrics_file(tmp_path / "stop") == want

    # stopped at 5 again; one bit of the step-5 checkpoint's data flipped: detected, set aside, step 4 used
    train(cfg_for(tmp_path, "flip", stop_after=5))
    ck = tmp_path / "flip" / "checkpoints"
    assert check_seal(ck / "5") is None
    damaged = flip_one_bit(ck / "5" / "state")
    assert "does not match" in check_seal(ck / "5")
    capfd.readouterr()
    messages = []
    train(cfg_for(tmp_path, "flip"), log=messages.append)
    corrupt = [m for m in messages if "corrupt" in m]
    assert len(corrupt) == 1 and "step 5" in corrupt[0] and damaged.name in corrupt[0]
    assert "\n" not in corrupt[0]
    assert "resuming from the checkpoint at step 4" in "\n".join(messages)
    assert (tmp_path / "flip" / "checkpoints-corrupt" / "5").is_dir()
    assert metrics_file(tmp_path / "flip") == want
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out
    assert "Event loop is closed" not in captured.err + captured.out


def test_unsealed_checkpoint_is_incomplete_and_the_previous_one_is_used(tmp_path):
    train(cfg_for(tmp_path, "run", stop_after=4))
    ck = tmp_path / "run" / "checkpoints"
    (ck / "4" / "integrity.json").unlink()  # killed after orbax's commit, before the seal
    messages = []
    res = train(cfg_for(tmp_path, "run"), log=messages.append)
    text = "\n".join(messages)
    assert "step 4 is corrupt or incomplete: no integrity record" in text
    assert "resuming from the checkpoint at step 2" in text and res.step == 8


def _nan_after(task, alpha_threshold):
    """The task's loss, NaN once the (annealed, traced) α passes `alpha_threshold`: a run that diverges at a
    known step, without recompiling."""
    loss = task.loss

    def diverging(model, batch, alpha, deterministic):
        s, c = loss(model, batch, alpha, deterministic)
        return jnp.where(alpha > alpha_threshold, jnp.nan, s), c

    task.loss = diverging
    return task


def test_a_diverged_run_is_reported_never_saved_and_not_restarted(tmp_path):
    # α goes 1.1, 1.2, 1.3, ... ; the loss of step 6 (α 1.6 > 1.55) is NaN
    cfg = cfg_for(tmp_path, "nan", alpha_start=1.1, alpha=2.0, alpha_anneal_steps=9, log_every=1, save_every=1)
    messages = []
    with pytest.raises(Diverged, match="diverged at step 6: loss nan") as e:
        train(cfg, log=messages.append, task=_nan_after(make_task(cfg, **QUIET), 1.55))
    assert "checkpoint at step 5 is kept" in str(e.value)
    ck = tmp_path / "nan" / "checkpoints"
    assert sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) == [3, 4, 5]  # keep=3, none at 6
    assert all(check_seal(ck / str(s)) is None for s in (3, 4, 5))
    recs = metrics_file(tmp_path / "nan")
    assert recs[-1]["step"] == 6 and np.isnan(recs[-1]["loss"])  # the diverged step is logged
    # the same command again resumes from step 5 (not from 0) and reports the divergence again
    messages = []
    with pytest.raises(Diverged, match="diverged at step 6"):
        train(cfg, log=messages.append, task=_nan_after(make_task(cfg, **QUIET), 1.55))
    assert "resuming from the checkpoint at step 5" in "\n".join(messages)


def _small_state(value):
    model = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    model.kernel[...] = jnp.full((4, 8), value)
    return {"model": nnx.state(model), "optimizer": nnx.state(opt)}


def test_a_checkpoint_with_non_finite_values_is_diverged_not_corrupt(tmp_path):
    cfg = cfg_for(tmp_path, "x")
    mesh = make_mesh(None)
    state = _small_state(1.0)
    ckpt = Checkpointer(tmp_path / "ck", keep=3, log=lambda *_: None)
    ckpt.save(1, state, cfg, {})
    ckpt.save(2, _small_state(float("nan")), cfg, {})
    ckpt.close()
    assert check_seal(tmp_path / "ck" / "2") is None  # the files are sound
    messages = []
    ckpt = Checkpointer(tmp_path / "ck", keep=3, log=messages.append)
    with pytest.raises(Diverged, match=r"step 2 .* non-finite values .*kernel"):
        ckpt.restore_latest(state, state_shardings(state, mesh), cfg)
    ckpt.close()
    assert not any("corrupt" in m for m in messages)
    assert (tmp_path / "ck" / "2").is_dir()  # nothing moved, nothing restarted
    # moved aside by hand, the step-1 checkpoint restores with the saved values
    shutil.move(str(tmp_path / "ck" / "2"), str(tmp_path / "aside"))
    ckpt = Checkpointer(tmp_path / "ck", keep=3, log=lambda *_: None)
    step, restored, _ = ckpt.restore_latest(state, state_shardings(state, mesh), cfg)
    ckpt.close()
    assert step == 1
    np.testing.assert_array_equal(np.asarray(restored["model"]["kernel"][...]), np.ones((4, 8), np.float32))
    assert jax.tree.structure(restored) == jax.tree.structure(state)


def test_a_checkpoint_of_the_earlier_flat_format_is_refused_not_discarded(tmp_path):
    import orbax.checkpoint as ocp

    from train.config import ConfigError

    mngr = ocp.CheckpointManager(tmp_path / "ck", options=ocp.CheckpointManagerOptions(create=True))
    mngr.save(3, args=ocp.args.Composite(state=ocp.args.StandardSave({"0.kernel": jnp.ones((4, 8))}),
                                         meta=ocp.args.JsonSave({"step": 3, "config": {}})))
    mngr.wait_until_finished()
    mngr.close()
    state = _small_state(1.0)
    ckpt = Checkpointer(tmp_path / "ck", keep=3, log=lambda *_: None)
    with pytest.raises(ConfigError, match="older version"):
        ckpt.restore_latest(state, state_shardings(state, make_mesh(None)), cfg_for(tmp_path, "x"))
    ckpt.close()
    assert (tmp_path / "ck" / "3").is_dir()
