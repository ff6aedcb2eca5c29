"""The training loop shared by the GPT-2 and BERT CLIs.

A :class:`Task` supplies the model, the batches and a loss; :func:`run` does the rest: mesh and sharding, one
jit-compiled train step (AdamW, warmup + cosine, global-norm clipping, gradient accumulation by ``lax.scan``, α as a
traced argument), evaluation, attention sparsity, metrics, progress bar, checkpoints and resumption.

Everything that varies from step to step — the batch, α, the dropout key (held by the model's ``Rngs``) — is either
an argument of the jitted step or part of the state it threads through, so the step compiles once per run, and a
run resumed from a checkpoint replays exactly the same computation as an uninterrupted one.
"""

from __future__ import annotations

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

from train.checkpoint import Checkpointer, Diverged
from train.config import TrainConfig, parse_mesh, to_dict

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
    state: object = None  # the final {"model": ..., "optimizer": ...} state


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


@dataclass(frozen=True)
class Graphs:
    """The static halves of the split model and optimiser; the state is {"model": ..., "optimizer": ...}."""

    model: object
    optimizer: object


def build_steps(graphs: Graphs, task: Task):
    """(train_step, eval_step) as pure functions of the state {"model": nnx.State, "optimizer": nnx.State}."""

    def train_step(state, batch, alpha):
        model = nnx.merge(graphs.model, state["model"])
        optimizer = nnx.merge(graphs.optimizer, state["optimizer"])
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
        return {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}, metrics

    def eval_step(state, batch, alpha):
        model = nnx.merge(graphs.model, state["model"])
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
    graphs: Graphs
    state: dict  # {"model": nnx.State, "optimizer": nnx.State}, placed on the mesh
    shardings: dict
    schedule: Callable  # optimiser step → learning rate
    n_params: int
    train_step: Callable  # jitted (state, batch, alpha) → (state, metrics)
    eval_step: Callable  # jitted (state, batch, alpha) → (loss sum, weight, correct)
    sparsity_step: Callable | None  # jitted (state, inputs, alpha) → [layers, heads]
    train_batch: Callable  # step → device batch [grad_accum, micro_batch, ...]
    device_batch: Callable  # (numpy batch, sharding) → device batch
    eval_batch_sharding: NamedSharding
    alpha_arg: Callable  # step → traced α (float32 scalar) or None (the model's own α)


def setup(cfg: TrainConfig, task: Task, sparsity_fn: Callable | None = None) -> Setup:
    r = cfg.run
    mesh = make_mesh(r.mesh)
    rngs = nnx.Rngs(params=r.seed, dropout=r.seed + 1)
    model = task.build_model(cfg, rngs)
    if task.prepare is not None:
        task.prepare(model, mesh)
    optimizer = nnx.Optimizer(model, cfg.optim.build(r.steps), wrt=nnx.Param)
    mgraph, mstate = nnx.split(model)
    ograph, ostate = nnx.split(optimizer)
    graphs, state = Graphs(mgraph, ograph), {"model": mstate, "optimizer": ostate}
    shardings = state_shardings(state, mesh)
    state = place(state, shardings)
    del model, optimizer
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(nnx.merge(mgraph, state["model"]), nnx.Param)))

    anneal = cfg.model.attention != "softmax" and cfg.model.alpha_start is not None
    train_step, eval_step = build_steps(graphs, task)
    repl = NamedSharding(mesh, P())
    train_batch_sh = NamedSharding(mesh, P(None, BATCH_AXES))  # [grad_accum, micro_batch, ...]
    eval_batch_sh = NamedSharding(mesh, P(BATCH_AXES))
    jit_train = jax.jit(train_step, in_shardings=(shardings, train_batch_sh, repl),
                        out_shardings=(shardings, repl), donate_argnums=0)
    jit_eval = jax.jit(eval_step, in_shardings=(shardings, eval_batch_sh, repl), out_shardings=repl)
    jit_sparsity = None
    if sparsity_fn is not None:
        def sparsity_step(state, inputs, alpha):
            return sparsity_fn(nnx.merge(mgraph, state["model"]), **inputs, alpha=alpha)

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
        b = task.batches.train_batch(step, r.batch_size)
        return device_batch({k: v.reshape(r.grad_accum, r.micro_batch_size, *v.shape[1:]) for k, v in b.items()},
                            train_batch_sh)

    return Setup(mesh, graphs, state, shardings, cfg.optim.schedule(r.steps), n_params, jit_train, jit_eval,
                 jit_sparsity, train_batch, device_batch, eval_batch_sh, alpha_arg)


@dataclass
class Periodic:
    """Work registered with its period: run after every `every`-th step and after the final one, and with
    `on_stop` also after the step at which the run is stopped early. `fn(step, state)` returns the fields it
    adds to that step's metrics record (or None)."""

    name: str
    every: int
    fn: Callable[[int, dict], dict | None]
    on_stop: bool = False
    saves: bool = False  # writes the state (skipped once the run has diverged)

    def due(self, step: int, *, last: bool, stopping: bool) -> bool:
        return step % self.every == 0 or last or (stopping and self.on_stop)


def run(cfg: TrainConfig, task: Task, *, sparsity_fn: Callable | None = None, on_step: Callable | None = None,
        log: Callable[[str], None] | None = None, periodic: tuple[Periodic, ...] = ()) -> RunResult:
    """Train (or resume) according to `cfg`. `sparsity_fn(model, **inputs, alpha=)` → [layers, heads] fractions of
    exact zeros (None: not logged). `on_step(step)` is called after every step (tests use it). `periodic`: more
    work, run after the built-in metrics and before the checkpoint. Raises :class:`Diverged` when the loss or
    gradient norm turns non-finite (nothing is saved from then on)."""
    out = Path(cfg.run.out)
    out.mkdir(parents=True, exist_ok=True)
    lead = jax.process_index() == 0  # with several processes only the first one writes metrics and prints
    progress = Progress(cfg.run.steps, 0, cfg.run.progress and lead)
    say = (log or progress.print) if lead else (lambda *_: None)
    try:
        return _Loop(cfg, task, sparsity_fn, on_step, progress, say, out, lead, periodic).run()
    finally:
        progress.close()  # also when set-up or restoring fails: give the terminal back


class _Loop:
    """One run: set-up, resumption, the step loop, and the periodic work registered in `periodic`."""

    def __init__(self, cfg, task, sparsity_fn, on_step, progress, say, out, lead, extra=()):
        self.cfg, self.task, self.on_step, self.progress, self.say, self.out, self.lead = (
            cfg, task, on_step, progress, say, out, lead)
        self.S = setup(cfg, task, sparsity_fn)
        r = cfg.run
        self.val_batches = [self.S.device_batch(task.batches.val_batch(i, r.micro_batch_size, r.eval_batches),
                                                self.S.eval_batch_sharding) for i in range(r.eval_batches)]
        self.metrics_path = out / "metrics.jsonl"
        self.records: list[dict] = []
        self.window: list = []  # losses since the last training record (device scalars, or floats once restored)
        self.metrics = None  # the last step's metrics (on device)
        self.host_metrics = None  # the same, fetched at steps with periodic work
        self.last_avg = (None, None)  # (step, loss_avg) of the last training record
        self.t_mark, self.tokens_since, self.t_start = None, 0, time.time()
        self.ckpt = Checkpointer(out / "checkpoints", keep=r.keep, log=say)
        self.periodic = [
            Periodic("train metrics", r.log_every, self.train_metrics),
            Periodic("evaluation", r.eval_every, self.evaluate),
        ]
        if self.S.sparsity_step is not None:
            self.periodic.append(Periodic("sparsity", r.sparsity_every, self.sparsity))
        self.periodic.extend(extra)
        self.periodic.append(Periodic("checkpoint", r.save_every, self.save, on_stop=True, saves=True))

    # ---- periodic work

    def train_metrics(self, step, state):
        m = self.host_metrics
        losses = [float(x) for x in jax.device_get(self.window)]
        self.window = []
        now = time.time()
        tps = self.tokens_since / (now - self.t_mark) if self.tokens_since and now > self.t_mark else None
        if tps:
            self.t_mark, self.tokens_since = now, 0
        rec = {"loss": float(m["loss"]), "loss_avg": float(np.mean(losses)), "grad_norm": float(m["grad_norm"]),
               "lr": float(self.S.schedule(step - 1)), "alpha": self.cfg.alpha_at(step - 1),
               "tokens_per_s": tps, "elapsed_s": now - self.t_start}
        if self.task.classification:
            rec["accuracy"] = float(m["accuracy"])
        self.progress.update(step, rec["loss_avg"], tps)
        self.last_avg = (step, rec["loss_avg"])
        return rec

    def evaluate(self, step, state):
        a = self.S.alpha_arg(step - 1)
        tot = w = c = 0.0
        for vb in self.val_batches:
            s, n, k = jax.device_get(self.S.eval_step(state, vb, a))
            tot, w, c = tot + float(s), w + float(n), c + float(k)
        res = {"val_loss": tot / max(w, 1.0)}
        if self.task.classification:
            res["val_accuracy"] = c / max(w, 1.0)
            extra = f"val_acc {res['val_accuracy']:.3f}"
        else:
            res["val_ppl"] = math.exp(min(res["val_loss"], 50.0))
            extra = f"val_ppl {res['val_ppl']:.2f}"
        avg_step, avg = self.last_avg
        loss = avg if avg_step == step else float(self.host_metrics["loss"])
        self.say(f"step {step}: loss {loss:.4f}  val_loss {res['val_loss']:.4f}  {extra}")
        return res

    def sparsity(self, step, state):
        inputs = self.task.sparsity_inputs(dict(self.val_batches[0]))
        s = np.asarray(jax.device_get(self.S.sparsity_step(state, inputs, self.S.alpha_arg(step - 1))))
        return {"sparsity": s.mean(axis=-1).tolist(), "sparsity_heads": s.tolist()}

    def save(self, step, state):
        window = [float(x) for x in jax.device_get(self.window)]
        self.ckpt.save(step, state, self.cfg, {"window_losses": window})

    def diverged_message(self, step) -> str:
        m = self.host_metrics
        saved = [s for s in self.ckpt.mngr.all_steps() if s < step]
        kept = f"the checkpoint at step {max(saved)} is kept" if saved else "no checkpoint was saved"
        return (f"diverged at step {step}: loss {float(m['loss'])}, grad_norm {float(m['grad_norm'])}; nothing is "
                f"saved from this state ({kept}); lower --lr or raise --warmup-steps, and use a new --out")

    # ---- records

    def write(self, record):
        self.records.append(record)
        if self.lead:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps(_jsonable(record)) + "\n")

    def resume(self, state):
        """(start step, state): the newest sound checkpoint's, with the metrics records up to it and the losses
        since its last record, so that every later record equals an uninterrupted run's."""
        restored = self.ckpt.restore_latest(state, self.S.shardings, self.cfg)
        start = 0
        if restored is not None:
            start, state, metrics_state = restored
            self.window = list(metrics_state.get("window_losses", []))
            self.say(f"resuming from the checkpoint at step {start} in {self.ckpt.directory}")
            if self.metrics_path.exists():
                for line in self.metrics_path.read_text().splitlines():
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if rec.get("step", 0) <= start:
                        self.records.append(rec)
        if self.lead:
            self.metrics_path.write_text("".join(json.dumps(rec) + "\n" for rec in self.records))
            (self.out / "config.json").write_text(json.dumps(to_dict(self.cfg), indent=2) + "\n")
        return start, state

    # ---- the loop

    def periodic_work(self, step, state, *, last, stopping) -> None:
        """Run the work due after `step`; its fields make one metrics record. A non-finite loss or gradient norm
        is logged, then raised as Diverged before anything saves the state."""
        due = [w for w in self.periodic if w.due(step, last=last, stopping=stopping)]
        if not due:
            self.progress.update(step)
            return
        self.host_metrics = m = jax.device_get(self.metrics)
        diverged = not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]))
        record = {}
        for work in due:
            if not (diverged and work.saves):
                record.update(work.fn(step, state) or {})
        if record:
            self.write({"step": step, **record})
        if diverged:
            raise Diverged(self.diverged_message(step))

    def run(self) -> RunResult:
        try:
            return self._train()
        finally:
            self.ckpt.close()  # finishes and seals the last save, also after an error
            self.progress.close()

    def _train(self) -> RunResult:
        r, S, say = self.cfg.run, self.S, self.say
        start, state = self.resume(S.state)
        if start == 0:
            say(f"{self.task.describe}; {S.n_params:,} parameters; mesh {dict(S.mesh.shape)}; "
                f"{r.steps} steps × {r.batch_size} × {self.task.tokens_per_example} tokens")
        interrupted, step, prev = False, start, None
        self.progress.update(start)
        with StopSignal() as stop:
            try:
                while step < r.steps:
                    state, self.metrics = S.train_step(state, S.train_batch(step), S.alpha_arg(step))
                    if prev is not None:
                        jax.block_until_ready(prev)  # keep at most one step in flight
                    prev = self.metrics
                    step += 1
                    self.window.append(self.metrics["loss"])
                    if self.t_mark is None:  # the first step includes compilation: time from its end
                        jax.block_until_ready(self.metrics)
                        self.t_mark = time.time()
                    else:
                        self.tokens_since += r.batch_size * self.task.tokens_per_example
                    if self.on_step is not None:
                        self.on_step(step)
                    last = step == r.steps
                    stopping = stop.signum is not None or (r.stop_after is not None and step == r.stop_after)
                    self.periodic_work(step, state, last=last, stopping=stopping)
                    if stopping and not last:
                        interrupted = True
                        why = signal.Signals(stop.signum).name if stop.signum is not None else f"stop_after={r.stop_after}"
                        self.ckpt.wait()
                        say(f"stopping at step {step} ({why}); checkpoint saved in {self.ckpt.directory}; "
                            f"rerun the same command to resume")
                        break
            except KeyboardInterrupt:  # a second Ctrl-C: leave without waiting for another save
                interrupted = True
                say(f"aborted at step {step}; the last completed checkpoint is kept")
        self.ckpt.close()
        self.progress.close()
        if not interrupted:
            exported = ""
            if self.task.export is not None and jax.process_count() == 1:
                self.task.export(nnx.merge(S.graphs.model, state["model"]), str(self.out / "model"))
                exported = f"; model in {self.out / 'model'} (use with --init-from)"
            say(f"done: {step} steps in {time.time() - self.t_start:.1f}s; metrics in {self.metrics_path}{exported}")
        return RunResult(step, interrupted, self.records, self.out, S.train_step, stop.signum, state)
