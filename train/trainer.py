"""The training loop shared by the GPT-2 and BERT CLIs.

A :class:`Task` supplies the model, the batches and a loss; :func:`run` does the rest: mesh and sharding, one
jit-compiled train step (AdamW, warmup + cosine, global-norm clipping, gradient accumulation by ``lax.scan``, α as a
traced argument), evaluation, attention sparsity, metrics, progress bar, checkpoints and resumption.

Everything that varies from step to step — the batch, α, the dropout key (held by the model's ``Rngs``) — is either
an argument of the jitted step or part of the state it threads through, so the step compiles once per run, and a
run resumed from a checkpoint replays exactly the same computation as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from train.checkpoint import Checkpointer
from train.config import TrainConfig, parse_mesh

BATCH_AXES = ("data", "fsdp")


@dataclass
class Task:
    """What a CLI trains. `loss(model, batch, alpha, deterministic)` returns (sum of per-item losses, number of
    correct predictions) for a batch of examples; `batch["weights"]` says which items count."""

    build_model: Callable[[TrainConfig, nnx.Rngs], nnx.Module]
    loss: Callable
    batches: object  # train_batch(step, batch_size) / val_batch(index, batch_size, num_batches)
    tokens_per_example: int
    classification: bool = False
    sparsity_inputs: Callable[[dict], dict] = lambda b: {"input_ids": b["input_ids"]}
    describe: str = ""
    prepare: Callable | None = None  # prepare(model, mesh): e.g. wrap attention in shard_map
    export: Callable | None = None  # export(model, folder): the final model in Hugging Face layout


@dataclass
class RunResult:
    step: int  # optimiser steps completed
    interrupted: bool
    records: list[dict]
    out: Path
    train_step: Callable | None = None  # the jitted step, for inspection (compile count)
    signal: int | None = None  # the signal that stopped the run, if any
    state: object = None  # the final (model, optimizer) state


# ------------------------------------------------------------------------------------------------- optimiser


def make_optimizer(cfg: TrainConfig) -> tuple[optax.GradientTransformation, Callable]:
    warmup = min(cfg.warmup_steps, max(cfg.steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup, decay_steps=max(cfg.steps, warmup + 1),
        end_value=cfg.lr * cfg.min_lr_ratio)

    def decay_mask(params):  # no weight decay on biases, norms' scales and per-head α
        return jax.tree.map(lambda p: p.ndim >= 2, params)

    parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule


# --------------------------------------------------------------------------------------------------- sharding


def make_mesh(spec: str | None) -> Mesh:
    axes = parse_mesh(spec)
    n = axes["data"] * axes["fsdp"]
    devices = np.asarray(jax.devices()[:n]).reshape(axes["data"], axes["fsdp"])
    return Mesh(devices, ("data", "fsdp"))


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """Shard the largest dimension divisible by the FSDP size; small or indivisible arrays stay replicated."""
    if fsdp <= 1 or not shape:
        return P()
    candidates = [(d, i) for i, d in enumerate(shape) if d % fsdp == 0 and d >= fsdp]
    if not candidates:
        return P()
    _, axis = max(candidates)
    return P(*[("fsdp" if i == axis else None) for i in range(len(shape))])


def place(tree, shardings):
    """device_put that also works with several processes: each process holds the same host values (same seed)
    and contributes the shards that live on its devices. PRNG keys travel as their key data."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def one(x, sharding):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = np.asarray(jax.random.key_data(x))
            arr = jax.make_array_from_callback(data.shape, sharding, lambda idx: data[idx])
            return jax.random.wrap_key_data(arr, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])

    return jax.tree.map(one, tree, shardings)


def state_shardings(state, mesh: Mesh):
    fsdp = mesh.shape["fsdp"]

    def one(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, fsdp_spec(x.shape, fsdp))

    return jax.tree.map(one, state)


# ---------------------------------------------------------------------------------------------------- steps


def build_steps(graphdef, task: Task, cfg: TrainConfig):
    """(train_step, eval_step) as pure functions of the split (model, optimizer) state."""

    def train_step(state, batch, alpha):
        model, optimizer = nnx.merge(graphdef, state)
        mgraph, params, rest = nnx.split(model, nnx.Param, ...)
        total = jnp.maximum(batch["weights"].sum(), 1.0)

        def micro(carry, mb):
            grads, rest = carry

            def loss_fn(p):
                m = nnx.merge(mgraph, p, rest)
                loss_sum, correct = task.loss(m, mb, alpha, deterministic=False)
                return loss_sum / total, (loss_sum, correct, nnx.split(m, nnx.Param, ...)[2])

            (_, (loss_sum, correct, rest)), g = jax.value_and_grad(loss_fn, has_aux=True)(params)
            return (jax.tree.map(jnp.add, grads, g), rest), (loss_sum, correct)

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, rest), (sums, corrects) = jax.lax.scan(micro, (zeros, rest), batch)
        nnx.update(model, rest)
        grad_norm = optax.tree.norm(grads)
        optimizer.update(model, grads)
        metrics = {"loss": sums.sum() / total, "grad_norm": grad_norm, "accuracy": corrects.sum() / total}
        return nnx.state((model, optimizer)), metrics

    def eval_step(state, batch, alpha):
        model, _ = nnx.merge(graphdef, state)
        loss_sum, correct = task.loss(model, batch, alpha, deterministic=True)
        return loss_sum, batch["weights"].sum(), correct

    return train_step, eval_step


# ------------------------------------------------------------------------------------------------ signals


class StopSignal:
    """SIGTERM / first Ctrl-C ask the loop to save and stop after the current step; a second Ctrl-C aborts."""

    def __init__(self):
        self.signum: int | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        return False


# ------------------------------------------------------------------------------------------------- progress


class Progress:
    def __init__(self, total: int, start: int, enabled: bool):
        self.enabled = enabled
        self.bar = None
        if enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self.bar = RichProgress(
                TextColumn("step"), MofNCompleteColumn(), BarColumn(bar_width=24),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                TextColumn("ETA"), TimeRemainingColumn(), TextColumn("elapsed"), TimeElapsedColumn(),
                refresh_per_second=4)
            self.bar.start()
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", tps="-")

    def update(self, step: int, loss: float | None = None, tps: float | None = None):
        if self.bar is None:
            return
        fields = {}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        if tps is not None:
            fields["tps"] = f"{tps:,.0f}"
        self.bar.update(self.task, completed=step, **fields)

    def print(self, msg: str):
        if self.bar is not None:
            self.bar.console.print(msg, markup=False, highlight=False)
        else:
            print(msg, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.stop()


# ------------------------------------------------------------------------------------------------------ run


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray | jax.Array):
        return _jsonable(np.asarray(x).tolist())
    if isinstance(x, np.floating | float):
        return float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x


@dataclass
class Setup:
    """Everything a run needs, built and placed but not yet compiled (jax.jit is lazy)."""

    mesh: Mesh
    graphdef: object
    state: object
    shardings: object
    schedule: Callable
    n_params: int
    train_step: Callable  # jitted (state, batch, alpha) → (state, metrics)
    eval_step: Callable  # jitted (state, batch, alpha) → (loss sum, weight, correct)
    sparsity_step: Callable | None  # jitted (state, inputs, alpha) → [layers, heads]
    train_batch: Callable  # step → device batch [grad_accum, micro_batch, ...]
    device_batch: Callable  # (numpy batch, sharding) → device batch
    eval_batch_sharding: NamedSharding
    alpha_arg: Callable  # step → traced α (float32 scalar) or None (the model's own α)


def setup(cfg: TrainConfig, task: Task, sparsity_fn: Callable | None = None) -> Setup:
    mesh = make_mesh(cfg.mesh)
    rngs = nnx.Rngs(params=cfg.seed, dropout=cfg.seed + 1)
    model = task.build_model(cfg, rngs)
    if task.prepare is not None:
        task.prepare(model, mesh)
    tx, schedule = make_optimizer(cfg)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    shardings = state_shardings(state, mesh)
    state = place(state, shardings)
    del model, optimizer
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(nnx.merge(graphdef, state)[0], nnx.Param)))

    anneal = cfg.attention != "softmax" and cfg.alpha_start is not None
    train_step, eval_step = build_steps(graphdef, task, cfg)
    repl = NamedSharding(mesh, P())
    train_batch_sh = NamedSharding(mesh, P(None, BATCH_AXES))  # [grad_accum, micro_batch, ...]
    eval_batch_sh = NamedSharding(mesh, P(BATCH_AXES))
    jit_train = jax.jit(train_step, in_shardings=(shardings, train_batch_sh, repl),
                        out_shardings=(shardings, repl), donate_argnums=0)
    jit_eval = jax.jit(eval_step, in_shardings=(shardings, eval_batch_sh, repl), out_shardings=repl)
    jit_sparsity = None
    if sparsity_fn is not None:
        def sparsity_step(state, inputs, alpha):
            model, _ = nnx.merge(graphdef, state)
            return sparsity_fn(model, **inputs, alpha=alpha)

        jit_sparsity = jax.jit(sparsity_step, in_shardings=(shardings, eval_batch_sh, repl), out_shardings=repl)

    def alpha_arg(step):
        return np.float32(cfg.alpha_at(step)) if anneal else None

    def device_batch(b, sharding):
        # every process builds the same global batch (a function of seed and step) and hands over the shards
        # that live on its own devices: the same code runs on one host or many
        def place(x):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

        return {k: place(v) for k, v in b.items()}

    def train_batch(step):
        b = task.batches.train_batch(step, cfg.batch_size)
        return device_batch({k: v.reshape(cfg.grad_accum, cfg.micro_batch_size, *v.shape[1:]) for k, v in b.items()},
                            train_batch_sh)

    return Setup(mesh, graphdef, state, shardings, schedule, n_params, jit_train, jit_eval, jit_sparsity,
                 train_batch, device_batch, eval_batch_sh, alpha_arg)


def run(cfg: TrainConfig, task: Task, *, sparsity_fn: Callable | None = None, on_step: Callable | None = None,
        log: Callable[[str], None] | None = None) -> RunResult:
    """Train (or resume) according to `cfg`. `sparsity_fn(model, **inputs, alpha=)` → [layers, heads] fractions of
    exact zeros (None: not logged). `on_step(step)` is called after every step (tests use it)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    lead = jax.process_index() == 0  # with several processes only the first one writes metrics and prints
    progress = Progress(cfg.steps, 0, cfg.progress and lead)
    say = (log or progress.print) if lead else (lambda *_: None)
    try:
        return _run(cfg, task, sparsity_fn, on_step, progress, say, out, lead)
    finally:
        progress.close()  # also when set-up or restoring fails: give the terminal back


def _run(cfg, task, sparsity_fn, on_step, progress, say, out, lead) -> RunResult:
    S = setup(cfg, task, sparsity_fn)
    mesh, graphdef, state, shardings, schedule = S.mesh, S.graphdef, S.state, S.shardings, S.schedule
    n_params, jit_train, jit_eval, jit_sparsity = S.n_params, S.train_step, S.eval_step, S.sparsity_step
    train_batch, device_batch, alpha_arg = S.train_batch, S.device_batch, S.alpha_arg
    eval_batch_sh = S.eval_batch_sharding
    del S

    val_batches = [device_batch(task.batches.val_batch(i, cfg.micro_batch_size, cfg.eval_batches), eval_batch_sh)
                   for i in range(cfg.eval_batches)]

    def evaluate(state, step):
        a = alpha_arg(step)
        tot = w = c = 0.0
        for vb in val_batches:
            s, n, k = jax.device_get(jit_eval(state, vb, a))
            tot, w, c = tot + float(s), w + float(n), c + float(k)
        res = {"val_loss": tot / max(w, 1.0)}
        if task.classification:
            res["val_accuracy"] = c / max(w, 1.0)
        else:
            res["val_ppl"] = math.exp(min(res["val_loss"], 50.0))
        return res

    def sparsity(state, step):
        inputs = task.sparsity_inputs({k: v for k, v in val_batches[0].items()})
        s = np.asarray(jax.device_get(jit_sparsity(state, inputs, alpha_arg(step))))
        return {"sparsity": s.mean(axis=-1).tolist(), "sparsity_heads": s.tolist()}

    # ---- checkpoints: resume if possible
    ckpt = Checkpointer(out / "checkpoints", keep=cfg.keep, log=say)
    start = 0
    restored = ckpt.restore_latest(state, shardings, cfg)
    metrics_path = out / "metrics.jsonl"
    records: list[dict] = []
    if restored is not None:
        start, state = restored
        say(f"resuming from the checkpoint at step {start} in {ckpt.directory}")
        if metrics_path.exists():
            for line in metrics_path.read_text().splitlines():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if r.get("step", 0) <= start:
                    records.append(r)
    if lead:
        metrics_path.write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
    if start == 0:
        say(f"{task.describe}; {n_params:,} parameters; mesh {dict(mesh.shape)}; "
            f"{cfg.steps} steps × {cfg.batch_size} × {task.tokens_per_example} tokens")

    def write(record):
        records.append(record)
        if not lead:
            return
        with metrics_path.open("a") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")

    # ---- loop
    interrupted = False
    step = start
    progress.update(start)
    window_losses = []
    t_mark, tokens_since = None, 0
    prev = None
    t_start = time.time()
    with StopSignal() as stop:
        try:
            while step < cfg.steps:
                a = alpha_arg(step)
                batch = train_batch(step)
                state, metrics = jit_train(state, batch, a)
                if prev is not None:
                    jax.block_until_ready(prev)  # keep at most one step in flight
                prev = metrics
                step += 1
                window_losses.append(metrics["loss"])
                if t_mark is None:  # first step includes compilation: time from its end
                    jax.block_until_ready(metrics)
                    t_mark = time.time()
                else:
                    tokens_since += cfg.batch_size * task.tokens_per_example
                if on_step is not None:
                    on_step(step)
                last = step == cfg.steps
                stopping = stop.signum is not None or (cfg.stop_after is not None and step == cfg.stop_after)
                if step % cfg.log_every == 0 or last or stopping:
                    m = jax.device_get(metrics)
                    losses = [float(x) for x in jax.device_get(window_losses)]
                    window_losses = []
                    now = time.time()
                    tps = tokens_since / (now - t_mark) if tokens_since and now > t_mark else None
                    record = {"step": step, "loss": float(m["loss"]), "loss_avg": float(np.mean(losses)),
                              "grad_norm": float(m["grad_norm"]), "lr": float(schedule(step - 1)),
                              "alpha": cfg.alpha_at(step - 1) if cfg.attention != "softmax" else None,
                              "tokens_per_s": tps, "elapsed_s": now - t_start}
                    if task.classification:
                        record["accuracy"] = float(m["accuracy"])
                    if step % cfg.eval_every == 0 or last:
                        record.update(evaluate(state, step - 1))
                    if jit_sparsity is not None and (step % cfg.sparsity_every == 0 or last):
                        record.update(sparsity(state, step - 1))
                    write(record)
                    progress.update(step, record["loss_avg"], tps)
                    if "val_loss" in record:
                        extra = (f"val_acc {record['val_accuracy']:.3f}" if task.classification
                                 else f"val_ppl {record['val_ppl']:.2f}")
                        say(f"step {step}: loss {record['loss_avg']:.4f}  val_loss {record['val_loss']:.4f}  {extra}")
                    if tps:
                        t_mark, tokens_since = time.time(), 0
                else:
                    progress.update(step)
                if step % cfg.save_every == 0 or last or stopping:
                    ckpt.save(step, state, cfg)
                if stopping and not last:
                    interrupted = True
                    why = (signal.Signals(stop.signum).name if stop.signum is not None
                           else f"stop_after={cfg.stop_after}")
                    ckpt.wait()
                    say(f"stopping at step {step} ({why}); checkpoint saved in {ckpt.directory}; "
                        f"rerun the same command to resume")
                    break
        except KeyboardInterrupt:  # a second Ctrl-C: leave without waiting for another save
            interrupted = True
            say(f"aborted at step {step}; the last completed checkpoint is kept")
        finally:
            ckpt.close()
            progress.close()
    if not interrupted:
        exported = ""
        if task.export is not None and jax.process_count() == 1:
            task.export(nnx.merge(graphdef, state)[0], str(out / "model"))
            exported = f"; model in {out / 'model'} (use with --init-from)"
        say(f"done: {step} steps in {time.time() - t_start:.1f}s; metrics in {metrics_path}{exported}")
    return RunResult(step, interrupted, records, out, jit_train, stop.signum, state)
