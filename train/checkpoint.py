"""Orbax checkpoints of the whole training state (parameters, optimiser state, step, dropout RNG).

Layout: ``OUT/checkpoints/<step>/{state,meta}``; orbax writes each step into a temporary folder and renames it when
complete, so a run killed mid-save leaves a ``*.orbax-checkpoint-tmp*`` folder, which is reported and removed. A
complete-looking checkpoint that fails to restore (missing or damaged files) is reported, moved to
``OUT/checkpoints-corrupt/`` and the previous one is tried.

The state is stored as a flat dict keyed by the pytree path; PRNG keys are stored as their raw key data.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from train.config import ConfigError, TrainConfig

# configuration fields that may change between a run and its resumption
RESUMABLE_FIELDS = {"steps", "out", "log_every", "eval_every", "eval_batches", "sparsity_every", "save_every",
                    "keep", "stop_after", "progress", "cache_dir", "mesh", "coordinator", "num_processes",
                    "process_id"}


def _name(path) -> str:
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def _is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def flatten_state(state) -> tuple[dict, list, object]:
    """({name: array}, leaves, treedef) with PRNG keys replaced by their key data."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(state)
    flat = {}
    for path, leaf in with_path:
        flat[_name(path)] = jax.random.key_data(leaf) if _is_key(leaf) else leaf
    if len(flat) != len(with_path):
        raise ValueError("checkpoint: two state leaves map to the same name")
    return flat, [leaf for _, leaf in with_path], treedef


class Checkpointer:
    def __init__(self, directory: Path, *, keep: int, log=print):
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log = log
        for tmp in sorted(self.directory.glob("*orbax-checkpoint-tmp*")):
            log(f"checkpoint {tmp.name} is incomplete (the run stopped while writing it); ignoring and removing it")
            shutil.rmtree(tmp, ignore_errors=True)
        self.mngr = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def save(self, step: int, state, cfg: TrainConfig, force: bool = False) -> None:
        if step in self.mngr.all_steps():
            return
        flat, _, _ = flatten_state(state)
        meta = {"step": step, "config": dataclasses.asdict(cfg)}
        self.mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(flat),
                                                       meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        self.mngr.wait_until_finished()

    def close(self) -> None:
        self.mngr.wait_until_finished()
        self.mngr.close()

    def _check_config(self, saved: dict, cfg: TrainConfig, step: int) -> None:
        now = dataclasses.asdict(cfg)
        if "steps" in saved and saved["steps"] != now["steps"]:
            self.log(f"note: --steps changed from {saved['steps']} to {now['steps']} since step {step}: the cosine "
                     "decay (and a default-length α anneal) now follow the new total, so the run no longer "
                     "replays the original schedule")
        for k, v in saved.items():
            if k in RESUMABLE_FIELDS or k not in now:
                continue
            if now[k] != v:
                raise ConfigError(
                    "out", f"{self.directory.parent} holds a checkpoint (step {step}) written with {k}={v!r}, but this "
                    f"run has {k}={now[k]!r}; use the same options to resume or a new --out")

    def restore_latest(self, template, shardings, cfg: TrainConfig):
        """(step, state) from the newest checkpoint that restores cleanly, or None when there is none."""
        flat_t, leaves_t, treedef = flatten_state(template)
        shard_leaves = jax.tree.leaves(shardings)
        repl = jax.sharding.NamedSharding(shard_leaves[0].mesh, jax.sharding.PartitionSpec())
        abstract = {name: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl if _is_key(leaf) else sh)
                    for (name, x), leaf, sh in zip(flat_t.items(), leaves_t, shard_leaves)}
        for step in sorted(self.mngr.all_steps(), reverse=True):
            try:
                meta = self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                saved_config = meta["config"]
            except Exception as e:  # noqa: BLE001 - any failure to read means this checkpoint is unusable
                self._discard(step, e)
                continue
            self._check_config(saved_config, cfg, step)  # a mismatch is the user's error: no fallback
            try:
                restored = self.mngr.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
                for name, x in flat_t.items():
                    got = restored[name]
                    if got.shape != x.shape or got.dtype != x.dtype:
                        raise ValueError(f"{name}: stored {got.shape} {got.dtype}, expected {x.shape} {x.dtype}")
                floating = {n: a for n, a in restored.items() if jax.numpy.issubdtype(a.dtype, jax.numpy.floating)}
                finite = _finite_leaves(floating, repl)  # on device: works for arrays sharded over hosts
                if not all(finite.values()):
                    raise ValueError(f"{[n for n, ok in finite.items() if not ok][0]}: non-finite values")
            except Exception as e:  # noqa: BLE001
                self._discard(step, e)
                continue
            leaves = [jax.random.wrap_key_data(restored[name], impl=jax.random.key_impl(leaf)) if _is_key(leaf)
                      else restored[name] for name, leaf in zip(flat_t, leaves_t)]
            state = jax.tree_util.tree_unflatten(treedef, leaves)
            return step, state
        return None

    def _discard(self, step: int, error: Exception) -> None:
        bad = self.directory.parent / (self.directory.name + "-corrupt")
        target = bad / f"{step}"
        msg = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        self.log(f"checkpoint at step {step} is corrupt or incomplete ({type(error).__name__}: {msg}); moved to "
                 f"{target}; trying the previous one")
        if jax.process_index() == 0:  # one process moves the shared folder; the others wait for it
            bad.mkdir(exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(self.directory / str(step)), str(target))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"discard checkpoint {step}")
        self.mngr.reload()


def _finite_leaves(arrays: dict, replicated) -> dict:
    """{name: all values finite}, reduced on device with a replicated result (no host copy of the state)."""
    if not arrays:
        return {}
    names = list(arrays)
    flags = jax.jit(lambda xs: jax.numpy.stack([jax.numpy.all(jax.numpy.isfinite(x)) for x in xs]),
                    out_shardings=replicated)([arrays[n] for n in names])
    return dict(zip(names, np.asarray(flags).tolist()))


__all__ = ["Checkpointer", "flatten_state", "RESUMABLE_FIELDS"]
