"""Orbax checkpoints of the training state, sealed with a SHA-256 digest of every file.

Layout: ``OUT/checkpoints/<step>/`` holds two orbax items, ``state`` — the pytree
``{"model": nnx.state(model), "optimizer": nnx.state(optimizer), "step": step}`` written by orbax's standard
handler (PRNG keys included) — and ``meta`` (JSON: the flat config and what the metrics need to continue: the
losses since the last log line), plus our ``integrity.json``: the SHA-256 digest of every other file, written
atomically once orbax has finished the save (orbax saves in the background; the seal follows at the next save, at
``wait()`` or at ``close()``).

Restoring takes the newest checkpoint and checks it before orbax reads a byte:

- an orbax temporary folder (``*.orbax-checkpoint-tmp*``: killed mid-save) is reported and removed;
- no seal (killed between orbax's commit and the seal), a missing, extra or changed file (one flipped bit is
  enough) → reported in one line, moved to ``OUT/checkpoints-corrupt/<step>`` and the previous checkpoint tried;
- a config that differs in a field that must not change → :class:`ConfigError` (the user's error: no fallback);
- sound files holding non-finite values → :class:`Diverged`: the run diverged, which an older checkpoint would
  only replay, so nothing is restarted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from train.config import ConfigError, TrainConfig, flatten

FORMAT = 2  # 1: the flat, hand-keyed state dict of earlier versions (no seal)
SEAL = "integrity.json"

# configuration fields (flat option names) that may change between a run and its resumption
RESUMABLE_FIELDS = {"steps", "out", "log_every", "eval_every", "eval_batches", "sparsity_every", "save_every",
                    "keep", "stop_after", "progress", "cache_dir", "mesh", "coordinator", "num_processes",
                    "process_id"}


class Diverged(RuntimeError):
    """The training state holds non-finite values (a NaN/inf loss, gradient or parameter)."""


# ---------------------------------------------------------------------------------------------------- the seal


def file_digests(folder: Path) -> dict[str, str]:
    """{relative path: SHA-256 hex digest} of every file under `folder` except the seal itself."""
    out = {}
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.name != SEAL:
            h = hashlib.sha256()
            with f.open("rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            out[str(f.relative_to(folder))] = h.hexdigest()
    return out


def write_seal(folder: Path) -> None:
    tmp = folder / f".{SEAL}.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"format": FORMAT, "sha256": file_digests(folder)}, indent=1))
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, folder / SEAL)  # atomic: the seal is there whole or not at all


def check_seal(folder: Path) -> str | None:
    """None when every file matches its recorded digest, else what is wrong (one line)."""
    try:
        want = json.loads((folder / SEAL).read_text())["sha256"]
    except FileNotFoundError:
        return "no integrity record (the run stopped before the save was sealed)"
    except (ValueError, KeyError, TypeError) as e:
        return f"unreadable integrity record ({type(e).__name__})"
    got = file_digests(folder)
    for name in sorted(set(want) | set(got)):
        if name not in got:
            return f"{name} is missing"
        if name not in want:
            return f"{name} was not part of the save"
        if got[name] != want[name]:
            return f"{name} does not match its SHA-256 digest"
    return None


# ---------------------------------------------------------------------------------------------- the manager


def _abstract(state, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


class Checkpointer:
    def __init__(self, directory: Path, *, keep: int, log=print):
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log = log
        self.lead = jax.process_index() == 0
        for tmp in sorted(self.directory.glob("*orbax-checkpoint-tmp*")):
            log(f"checkpoint {tmp.name} is incomplete (the run stopped while writing it); ignoring and removing it")
            if self.lead:
                shutil.rmtree(tmp, ignore_errors=True)
        self.mngr = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
        self._unsealed: list[int] = []
        self._closed = False

    # ---- saving

    def save(self, step: int, state: dict, cfg: TrainConfig, metrics_state: dict) -> None:
        """Start saving `state` ({"model", "optimizer"}) at `step` in the background; `metrics_state` is JSON."""
        if step in self.mngr.all_steps():
            return
        self._seal()  # the previous save is finished and sealed before a new one starts
        meta = {"format": FORMAT, "step": step, "config": flatten(cfg), "metrics": metrics_state}
        tree = {"model": state["model"], "optimizer": state["optimizer"], "step": step}
        self.mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
                       force=True)
        self._unsealed.append(step)

    def _seal(self) -> None:
        self.mngr.wait_until_finished()
        for step in self._unsealed:
            folder = self.directory / str(step)
            if self.lead and folder.is_dir():
                write_seal(folder)
        if self._unsealed and jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"sealed checkpoints {self._unsealed}")
        self._unsealed = []

    def wait(self) -> None:
        self._seal()

    def close(self) -> None:
        """Finish and seal the last save; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._seal()
        self.mngr.close()

    # ---- restoring

    def _check_config(self, saved: dict, cfg: TrainConfig, step: int) -> None:
        now = flatten(cfg)
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

    def restore_latest(self, template: dict, shardings: dict, cfg: TrainConfig):
        """(step, state, metrics_state) from the newest sound checkpoint, or None when there is none."""
        for step in sorted(self.mngr.all_steps(), reverse=True):
            folder = self.directory / str(step)
            if (folder / "state").is_dir() and not (folder / SEAL).exists() and (folder / "meta").is_dir():
                self._refuse_old_format(folder, step)
            problem = check_seal(folder)
            if problem is not None:
                self._discard(step, problem)
                continue
            try:
                meta = self.mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                saved_config = meta["config"]
            except Exception as e:  # noqa: BLE001 - sealed yet unreadable: unusable all the same
                self._discard(step, _one_line(e))
                continue
            self._check_config(saved_config, cfg, step)
            abstract = {"model": _abstract(template["model"], shardings["model"]),
                        "optimizer": _abstract(template["optimizer"], shardings["optimizer"]), "step": 0}
            try:
                tree = self.mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
                tree = tree["state"]
                state = {"model": tree["model"], "optimizer": tree["optimizer"]}
                if jax.tree.structure(state) != jax.tree.structure(template) or int(tree["step"]) != step:
                    raise ValueError("the stored state does not have this run's structure")
            except Exception as e:  # noqa: BLE001
                self._discard(step, _one_line(e))
                continue
            replicated = jax.sharding.NamedSharding(jax.tree.leaves(shardings)[0].mesh, jax.sharding.PartitionSpec())
            bad = _first_non_finite(state, replicated)
            if bad is not None:
                raise Diverged(
                    f"the checkpoint at step {step} in {self.directory} holds non-finite values ({bad}): the run "
                    f"diverged before step {step}. Not resuming from it: lower --lr (or raise --grad-clip, "
                    f"--warmup-steps) and use a new --out, or move {folder} aside to resume from an earlier step")
            return step, state, meta.get("metrics", {})
        return None

    def _refuse_old_format(self, folder: Path, step: int) -> None:
        try:
            fmt = json.loads(next((folder / "meta").glob("metadata")).read_text()).get("format")
        except (StopIteration, OSError, ValueError):
            return
        if fmt is None:  # written before checkpoints were sealed: not corrupt, just old
            raise ConfigError("out", f"{folder} was written by an older version of train/ (unsealed, flat state); "
                                     "resume it with that version or use a new --out")

    def _discard(self, step: int, problem: str) -> None:
        bad = self.directory.parent / (self.directory.name + "-corrupt")
        target = bad / f"{step}"
        self.log(f"checkpoint at step {step} is corrupt or incomplete: {problem}; moved to {target}; "
                 "trying the previous one")
        if self.lead:  # one process moves the shared folder; the others wait for it
            bad.mkdir(exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(self.directory / str(step)), str(target))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"discard checkpoint {step}")
        self.mngr.reload()


def _one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200]}" if text else type(error).__name__


def _first_non_finite(state, replicated) -> str | None:
    """The path of the first floating leaf with a NaN or inf, reduced on device with a replicated result (works
    for arrays sharded over hosts: only one flag per leaf comes back)."""
    leaves = [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(state)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    if not leaves:
        return None
    flags = jax.jit(lambda xs: jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs]),
                    out_shardings=replicated)([x for _, x in leaves])
    for (name, _), ok in zip(leaves, np.asarray(flags).tolist()):
        if not ok:
            return name
    return None


__all__ = ["Checkpointer", "Diverged", "RESUMABLE_FIELDS", "check_seal", "file_digests", "write_seal"]
