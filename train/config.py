"""Training configuration: a config of four parts, a command line generated from their fields, up-front validation.

:class:`TrainConfig` holds the task and one sub-config per concern: :class:`ModelConfig` (architecture, attention,
α), :class:`DataConfig` (corpus, tokenizer, sequence length), :class:`OptimConfig` (AdamW and its schedule; it builds
the optimiser itself: ``cfg.optim.build(total_steps)``) and :class:`RunConfig` (length, batch, seed, bookkeeping,
devices). Field names are unique across the parts, so every field is an option under its own name
(``run.batch_size`` → ``--batch-size``, also spelled ``--run.batch-size``); ``DataConfig.path`` is ``--data``.

A CLI passes its base defaults and per-task defaults; :func:`parse_args` reads the command line once, picks the
task's defaults and applies the options given on top of them. :func:`validate` runs before any model is built or
any function compiled, and raises :class:`ConfigError` naming the offending field.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields

import jax
import numpy as np
import optax

from adasplash_jax.entmax import check_alpha

from models import ATTENTION_KINDS


class ConfigError(ValueError):
    """A bad configuration value or input file; the message starts with the field name."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


DEFAULT_ALPHA = 1.5  # α of entmax / adasplash attention when --alpha is not given


@dataclass
class ModelConfig:
    preset: str = "tiny"  # tiny | small | gpt2 (| gpt2-medium ...) | bert-base (| bert-large): models' presets
    init_from: str | None = None  # a Hugging Face checkpoint folder, loaded with models.from_pretrained
    attention: str = "entmax"  # softmax | entmax | adasplash
    alpha: float | None = None  # α of entmax attention (default 1.5); refused with softmax attention
    alpha_start: float | None = None  # anneal α linearly from this value (near 1) to `alpha`
    alpha_anneal_steps: int | None = None  # length of the annealing; default: half of `steps`
    dropout: float | None = None  # None keeps the preset's value
    positions: int | None = None  # size of the position table; None keeps the preset's (e.g. 8192 for long context)
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
    num_labels: int = 8  # classify: number of classes (top-level packages of the corpus)

    @property
    def target_alpha(self) -> float:
        return float(self.alpha) if self.alpha is not None else DEFAULT_ALPHA

    def alpha_at(self, step: int, total_steps: int) -> float | None:
        """α used by optimiser step `step` (0-based): linear from alpha_start to alpha, then constant; None for
        softmax attention."""
        if self.attention == "softmax":
            return None
        if self.alpha_start is None:
            return self.target_alpha
        n = self.alpha_anneal_steps if self.alpha_anneal_steps is not None else max(1, total_steps // 2)
        frac = min(1.0, step / max(1, n))
        return float(self.alpha_start + (self.target_alpha - self.alpha_start) * frac)


@dataclass
class DataConfig:
    path: str | None = field(default=None, metadata={
        "flag": "data", "help": "a text file or folder of text files; default: the Python standard library's sources"})
    tokenizer: str = "byte"  # byte | bpe (trained locally with `tokenizers`)
    bpe_vocab_size: int = 2048
    val_fraction: float = 0.05
    cache_dir: str | None = None  # default: $ADASPLASH_CACHE or ~/.cache/adasplash_jax
    seq_len: int = 128
    mlm_prob: float = 0.15  # mlm: fraction of positions masked


@dataclass
class OptimConfig:
    lr: float = 2e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.99
    grad_clip: float = 1.0  # global-norm clipping; 0 disables

    def schedule(self, total_steps: int) -> optax.Schedule:
        """Linear warm-up from 0 to `lr`, then cosine decay to `lr * min_lr_ratio` at `total_steps`."""
        warmup = min(self.warmup_steps, max(total_steps - 1, 0))
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=self.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
            end_value=self.lr * self.min_lr_ratio)

    def build(self, total_steps: int) -> optax.GradientTransformation:
        """Global-norm clipping, then AdamW on `schedule(total_steps)`; no weight decay on vectors (biases, norms'
        scales, per-head α)."""

        def decay_mask(params):
            return jax.tree.map(lambda p: p.ndim >= 2, params)

        parts = [optax.clip_by_global_norm(self.grad_clip)] if self.grad_clip > 0 else []
        parts.append(optax.adamw(self.schedule(total_steps), b1=self.b1, b2=self.b2,
                                 weight_decay=self.weight_decay, mask=decay_mask))
        return optax.chain(*parts)


@dataclass
class RunConfig:
    steps: int = 300  # optimiser steps
    batch_size: int = 16  # sequences per optimiser step (all micro-batches, all devices)
    grad_accum: int = 1  # micro-batches per step
    seed: int = 0  # parameters, dropout and batches
    out: str = "runs/train"
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    sparsity_every: int = 50
    save_every: int = 100
    keep: int = 3  # checkpoints kept
    stop_after: int | None = None  # stop (saving a checkpoint) after this step, as if interrupted; for tests
    progress: bool = True  # rich progress bar
    mesh: str | None = None  # e.g. "data=4,fsdp=2" over all processes' devices; default: one device
    coordinator: str | None = None  # multi-host: "host:port" of process 0; calls jax.distributed.initialize
    num_processes: int | None = None  # multi-host: number of processes (with `coordinator`)
    process_id: int | None = None  # multi-host: this process's index (with `coordinator`)

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum


@dataclass
class TrainConfig:
    task: str = "lm"  # lm (GPT-2) | mlm | classify (BERT)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def alpha_at(self, step: int) -> float | None:
        return self.model.alpha_at(step, self.run.steps)


SECTIONS = ("model", "data", "optim", "run")
TASKS = ("lm", "mlm", "classify")
DTYPES = ("float32", "bfloat16")
TOKENIZERS = ("byte", "bpe")


# ------------------------------------------------------------------------------------- flat names of the fields


@dataclass(frozen=True)
class Option:
    section: str | None  # None: a field of TrainConfig itself (task)
    name: str  # the field's name
    flag: str  # the option's name without dashes, with underscores
    type: type  # the scalar type
    optional: bool  # `| None`
    help: str


def _scalar_type(hint) -> tuple[type, bool]:
    """(scalar type, optional?) for a resolved annotation such as `int | None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(hint))
    return hint, False


def _comments(cls) -> dict[str, str]:
    """Field name → its trailing comment in the class body (the option's help text)."""
    import inspect

    out = {}
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return out
    for line in lines:
        name, colon, rest = line.strip().partition(":")
        if colon and name.isidentifier() and "#" in rest:
            out[name] = rest.split("#", 1)[1].strip()
    return out


def _options() -> list[Option]:
    opts = []
    classes = [(None, TrainConfig)] + [(s, typing.get_type_hints(TrainConfig)[s]) for s in SECTIONS]
    for section, cls in classes:
        hints, helps = typing.get_type_hints(cls), _comments(cls)
        for f in fields(cls):
            if f.name in SECTIONS:
                continue
            kind, optional = _scalar_type(hints[f.name])
            help_text = f.metadata.get("help", helps.get(f.name, ""))
            opts.append(Option(section, f.name, f.metadata.get("flag", f.name), kind, optional, help_text))
    flags = [o.flag for o in opts]
    assert len(set(flags)) == len(flags), "option names must be unique across the config's parts"
    return opts


OPTIONS = {o.flag: o for o in _options()}


def override(cfg: TrainConfig, **options) -> TrainConfig:
    """A copy of `cfg` with options given by their flat names: ``override(cfg, lr=1e-3, steps=10, data=None)``."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TypeError(f"unknown training option(s) {unknown}")
    top = {}
    parts = {s: {} for s in SECTIONS}
    for flag, value in options.items():
        o = OPTIONS[flag]
        (top if o.section is None else parts[o.section])[o.name] = value
    new = {s: dataclasses.replace(getattr(cfg, s), **kw) for s, kw in parts.items() if kw}
    return dataclasses.replace(cfg, **top, **new)


def make_config(**options) -> TrainConfig:
    """A TrainConfig from flat option names: ``make_config(task="lm", steps=8, lr=3e-3)``."""
    return override(TrainConfig(), **options)


def flatten(cfg: TrainConfig) -> dict:
    """{flat option name: value}."""
    return {flag: getattr(cfg if o.section is None else getattr(cfg, o.section), o.name) for flag, o in OPTIONS.items()}


def to_dict(cfg: TrainConfig) -> dict:
    """The nested config as plain data (config.json)."""
    return dataclasses.asdict(cfg)


# --------------------------------------------------------------------------------------------------- validation


def parse_mesh(spec: str | None) -> dict[str, int]:
    """'data=4,fsdp=2' → {'data': 4, 'fsdp': 2}; None → {'data': 1, 'fsdp': 1}."""
    axes = {"data": 1, "fsdp": 1}
    if spec is None or spec.strip() == "":
        return axes
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in axes:
            raise ConfigError("mesh", f"expected 'data=N,fsdp=M', got {spec!r} (unknown part {part!r})")
        try:
            axes[name] = int(value)
        except ValueError:
            raise ConfigError("mesh", f"axis size {value!r} for {name!r} is not an integer") from None
        if axes[name] < 1:
            raise ConfigError("mesh", f"axis {name!r} must have size ≥ 1, got {axes[name]}")
    return axes


def _alpha(value, name: str) -> float:
    """α as the kernels compute with it: a float32. The library's own check decides the range, so α = 1 + 1e-8
    (which is 1.0 in float32) is refused like α = 1."""
    try:
        return check_alpha(float(np.float32(value)), name)
    except ValueError as e:
        raise ConfigError(name, f"{e} (given {value!r}, {float(np.float32(value))!r} in float32)") from None


def _check_model(m: ModelConfig) -> None:
    if m.attention not in ATTENTION_KINDS:
        raise ConfigError("attention", f"unknown attention {m.attention!r}; choose from {ATTENTION_KINDS}")
    if m.attention == "softmax":
        for name in ("alpha", "alpha_start", "alpha_anneal_steps"):
            if getattr(m, name) is not None:
                raise ConfigError(name, f"has no effect with --attention softmax (got {getattr(m, name)!r}); "
                                        "drop it or choose entmax/adasplash attention")
    else:
        _alpha(m.target_alpha, "alpha")
        if m.alpha_start is not None:
            _alpha(m.alpha_start, "alpha_start")
    if m.alpha_anneal_steps is not None and m.alpha_anneal_steps < 1:
        raise ConfigError("alpha_anneal_steps", f"must be ≥ 1, got {m.alpha_anneal_steps}")
    if m.positions is not None and (m.positions < 1 or m.init_from is not None):
        raise ConfigError("positions", f"must be ≥ 1 and is for presets only (a checkpoint's position table is fixed), "
                          f"got {m.positions} with init_from={m.init_from!r}")
    if m.dtype not in DTYPES:
        raise ConfigError("dtype", f"unknown dtype {m.dtype!r}; choose from {DTYPES}")
    if m.dropout is not None and not 0 <= m.dropout < 1:
        raise ConfigError("dropout", f"must lie in [0, 1), got {m.dropout}")
    if m.init_from is not None and not os.path.exists(m.init_from):
        raise ConfigError("init_from", f"{m.init_from}: no such checkpoint folder")


def _check_optim(o: OptimConfig) -> None:
    if not (math.isfinite(o.lr) and o.lr > 0):
        raise ConfigError("lr", f"learning rate must be finite and > 0, got {o.lr}")
    if not 0 <= o.min_lr_ratio <= 1:
        raise ConfigError("min_lr_ratio", f"must lie in [0, 1], got {o.min_lr_ratio}")
    if o.warmup_steps < 0:
        raise ConfigError("warmup_steps", f"must be ≥ 0, got {o.warmup_steps}")
    if not (math.isfinite(o.weight_decay) and o.weight_decay >= 0):
        raise ConfigError("weight_decay", f"must be finite and ≥ 0, got {o.weight_decay}")
    for name in ("b1", "b2"):
        if not 0 <= getattr(o, name) < 1:
            raise ConfigError(name, f"Adam's decay rate must lie in [0, 1), got {getattr(o, name)}")
    if not (math.isfinite(o.grad_clip) and o.grad_clip >= 0):
        raise ConfigError("grad_clip", f"must be finite and ≥ 0 (0 disables clipping), got {o.grad_clip}")


def _check_data(d: DataConfig, task: str) -> None:
    if d.tokenizer not in TOKENIZERS:
        raise ConfigError("tokenizer", f"unknown tokenizer {d.tokenizer!r}; choose from {TOKENIZERS}")
    if d.bpe_vocab_size < 1:
        raise ConfigError("bpe_vocab_size", f"must be ≥ 1, got {d.bpe_vocab_size}")
    if d.seq_len < 1 or (task != "lm" and d.seq_len < 2):
        raise ConfigError("seq_len", f"must be ≥ {1 if task == 'lm' else 2}, got {d.seq_len}")
    if not 0 < d.val_fraction < 1:
        raise ConfigError("val_fraction", f"must lie in (0, 1), got {d.val_fraction}")
    if task == "mlm" and not 0 < d.mlm_prob < 1:
        raise ConfigError("mlm_prob", f"must lie in (0, 1), got {d.mlm_prob}")
    if d.path is not None:
        from train.data import check_data_path

        check_data_path(d.path)


def _check_run(r: RunConfig, num_devices: int) -> None:
    for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_every", "eval_batches", "sparsity_every",
                 "save_every", "keep"):
        if getattr(r, name) < 1:
            raise ConfigError(name, f"must be ≥ 1, got {getattr(r, name)}")
    if not 0 <= r.seed < 2**31 - 1:  # seed + 1 seeds dropout; both must fit an int32
        raise ConfigError("seed", f"must lie in [0, 2**31 - 1), got {r.seed}")
    if r.batch_size % r.grad_accum:
        raise ConfigError("batch_size", f"batch size {r.batch_size} is not divisible by grad_accum={r.grad_accum}")
    axes = parse_mesh(r.mesh)
    n_mesh = axes["data"] * axes["fsdp"]
    if n_mesh > num_devices:
        raise ConfigError("mesh", f"{r.mesh!r} needs {n_mesh} devices but only {num_devices} are visible")
    if jax.process_count() > 1 and n_mesh != num_devices:
        raise ConfigError("mesh", f"{r.mesh!r} covers {n_mesh} of the {num_devices} devices of this "
                          f"{jax.process_count()}-process run; the mesh must span every process's devices")
    if r.micro_batch_size % n_mesh:
        raise ConfigError(
            "batch_size",
            f"micro-batch size {r.micro_batch_size} (batch_size={r.batch_size} / grad_accum={r.grad_accum}) "
            f"is not divisible by the data-parallel size {n_mesh} (data={axes['data']} × fsdp={axes['fsdp']})",
        )
    if r.stop_after is not None and r.stop_after < 1:
        raise ConfigError("stop_after", f"must be ≥ 1, got {r.stop_after}")


def validate(cfg: TrainConfig, *, num_devices: int) -> None:
    """Checks that need no model: raises ConfigError naming the field. Cheap; call before anything compiles."""
    if cfg.task not in TASKS:
        raise ConfigError("task", f"unknown task {cfg.task!r}; choose from {TASKS}")
    if cfg.task == "classify" and cfg.model.num_labels < 2:
        raise ConfigError("num_labels", f"need at least 2 classes, got {cfg.model.num_labels}")
    _check_model(cfg.model)
    _check_optim(cfg.optim)
    _check_run(cfg.run, num_devices)
    _check_data(cfg.data, cfg.task)


def validate_positions(cfg: TrainConfig, max_positions: int) -> None:
    if cfg.data.seq_len > max_positions:
        raise ConfigError("seq_len", f"sequence length {cfg.data.seq_len} exceeds the model's {max_positions} "
                                     "positions")


def init_distributed(cfg: TrainConfig) -> None:
    """Multi-host: join the cluster before any other JAX call. With `coordinator` set, the three values are
    passed to jax.distributed.initialize; environments it can auto-detect (SLURM, Open MPI, Cloud TPU) only need
    JAX_DISTRIBUTED=1 in the environment."""
    r = cfg.run
    if r.coordinator is not None:
        if r.num_processes is None or r.process_id is None:
            raise ConfigError("coordinator", "multi-host runs need --num-processes and --process-id too")
        if not 0 <= r.process_id < r.num_processes:
            raise ConfigError("process_id", f"must lie in [0, {r.num_processes}), got {r.process_id}")
        jax.distributed.initialize(coordinator_address=r.coordinator, num_processes=r.num_processes,
                                   process_id=r.process_id)
    elif os.environ.get("JAX_DISTRIBUTED", "") not in ("", "0"):
        jax.distributed.initialize()


# ----------------------------------------------------------------------------------------------- command line


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _converter(kind: type, optional: bool):
    def parse(text: str):
        if optional and text.lower() in ("none", "null", ""):
            return None
        return _bool(text) if kind is bool else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, naming the option; `--help` shows the usage
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(prog: str, description: str, defaults: TrainConfig,
                 task_defaults: dict[str, dict] | None = None) -> argparse.ArgumentParser:
    """Every option's default is SUPPRESS, so the namespace holds only what the command line gave."""
    parser = _Parser(prog=prog, description=description)
    flat = flatten(defaults)
    for flag, o in OPTIONS.items():
        names = ["--" + flag.replace("_", "-")]
        if o.section is not None:
            names.append(f"--{o.section}.{o.name.replace('_', '-')}")
        per_task = [f"{t}: {kw[flag]}" for t, kw in (task_defaults or {}).items() if flag in kw]
        default = f"default: {flat[flag]}" + (f" ({', '.join(per_task)})" if per_task else "")
        text = f"{o.help} ({default})" if o.help else f"({default})"
        metavar = "BOOL" if o.type is bool else flag.upper()
        if flag == "task" and task_defaults:
            metavar = "{" + ",".join(task_defaults) + "}"
        parser.add_argument(*names, dest=flag, type=_converter(o.type, o.optional), default=argparse.SUPPRESS,
                            metavar=metavar, help=text.replace("%", "%%"))
        if flag == "progress":
            parser.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                                help="disable the progress bar")
    return parser


def parse_args(argv, *, prog: str, description: str, defaults: TrainConfig,
               task_defaults: dict[str, dict] | None = None) -> TrainConfig:
    """One parse: the task (given or default) picks its defaults (`task_defaults[task]`, flat option names), and
    the options given override them. A task outside `task_defaults` (when given) exits 2."""
    parser = build_parser(prog, description, defaults, task_defaults)
    given = vars(parser.parse_args(argv))
    task = given.get("task", defaults.task)
    if task_defaults is not None and task not in task_defaults:
        parser.error(f"task: {prog} trains {' | '.join(task_defaults)}, got {task!r}")
    return override(defaults, **{**(task_defaults or {}).get(task, {}), **given})


__all__ = [
    "ConfigError",
    "TrainConfig",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "RunConfig",
    "make_config",
    "override",
    "flatten",
    "to_dict",
    "parse_args",
    "parse_mesh",
    "validate",
    "validate_positions",
    "init_distributed",
]
