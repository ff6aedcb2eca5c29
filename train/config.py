"""Training configuration: one dataclass, a command line generated from its fields, and up-front validation.

Every field of :class:`TrainConfig` becomes an option (``batch_size`` → ``--batch-size``); a CLI module passes its
own defaults (task, output folder) and the command line overrides them. :func:`validate` runs before any model is
built or any function compiled, and raises :class:`ConfigError` naming the offending field.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, fields

import jax


class ConfigError(ValueError):
    """A bad configuration value; the message starts with the field name."""

    def __init__(self, field_name: str, message: str):
        self.field = field_name
        super().__init__(f"{field_name}: {message}")


@dataclass
class TrainConfig:
    # what to train
    task: str = "lm"  # lm (GPT-2) | mlm | classify (BERT)
    preset: str = "tiny"  # tiny | small | gpt2 (| gpt2-medium ...) | bert-base (| bert-large)
    init_from: str | None = None  # a Hugging Face checkpoint folder or name, loaded with models.from_pretrained
    attention: str = "entmax"  # softmax | entmax | adasplash
    alpha: float = 1.5  # target α of α-entmax attention
    alpha_start: float | None = None  # anneal α linearly from this value (near 1) to `alpha`
    alpha_anneal_steps: int | None = None  # length of the annealing; default: half of `steps`
    dropout: float | None = None  # None keeps the preset's value
    positions: int | None = None  # size of the position table; None keeps the preset's (e.g. 8192 for long context)
    dtype: str = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)
    num_labels: int = 8  # classify: number of classes (top-level packages of the corpus)
    mlm_prob: float = 0.15  # mlm: fraction of positions masked
    # optimisation
    steps: int = 300
    batch_size: int = 16  # sequences per optimiser step (all micro-batches, all devices)
    grad_accum: int = 1  # micro-batches per step
    seq_len: int = 128
    lr: float = 2e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.99
    grad_clip: float = 1.0  # global-norm clipping; 0 disables
    seed: int = 0
    # data
    data: str | None = None  # a text file or folder of text files; default: the Python standard library's sources
    tokenizer: str = "byte"  # byte | bpe (trained locally with `tokenizers`)
    bpe_vocab_size: int = 2048
    val_fraction: float = 0.05
    cache_dir: str | None = None  # default: $ADASPLASH_CACHE or ~/.cache/adasplash_jax
    # bookkeeping
    out: str = "runs/train"
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    sparsity_every: int = 50
    save_every: int = 100
    keep: int = 3  # checkpoints kept
    stop_after: int | None = None  # stop (saving a checkpoint) after this step, as if interrupted; for tests
    progress: bool = True  # rich progress bar
    # scale-out
    mesh: str | None = None  # e.g. "data=4,fsdp=2" over all processes' devices; default: one device
    coordinator: str | None = None  # multi-host: "host:port" of process 0; calls jax.distributed.initialize
    num_processes: int | None = None  # multi-host: number of processes (with `coordinator`)
    process_id: int | None = None  # multi-host: this process's index (with `coordinator`)

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum

    def alpha_at(self, step: int) -> float:
        """α used by optimiser step `step` (0-based): linear from alpha_start to alpha, then constant."""
        if self.alpha_start is None:
            return float(self.alpha)
        n = self.alpha_anneal_steps if self.alpha_anneal_steps is not None else max(1, self.steps // 2)
        frac = min(1.0, step / max(1, n))
        return float(self.alpha_start + (self.alpha - self.alpha_start) * frac)


TASKS = ("lm", "mlm", "classify")
ATTENTIONS = ("softmax", "entmax", "adasplash")
DTYPES = ("float32", "bfloat16")
TOKENIZERS = ("byte", "bpe")


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


def validate(cfg: TrainConfig, *, presets: typing.Iterable[str], num_devices: int) -> None:
    """Checks that need no model: raises ConfigError naming the field. Cheap; call before anything compiles."""
    presets = tuple(presets)
    if cfg.task not in TASKS:
        raise ConfigError("task", f"unknown task {cfg.task!r}; choose from {TASKS}")
    if cfg.positions is not None and (cfg.positions < 1 or cfg.init_from is not None):
        raise ConfigError("positions", f"must be ≥ 1 and is for presets only (a checkpoint's position table is fixed), "
                          f"got {cfg.positions} with init_from={cfg.init_from!r}")
    if cfg.init_from is None and cfg.preset not in presets:
        raise ConfigError("preset", f"unknown preset {cfg.preset!r}; choose from {presets}")
    if cfg.attention not in ATTENTIONS:
        raise ConfigError("attention", f"unknown attention {cfg.attention!r}; choose from {ATTENTIONS}")
    if cfg.dtype not in DTYPES:
        raise ConfigError("dtype", f"unknown dtype {cfg.dtype!r}; choose from {DTYPES}")
    if cfg.tokenizer not in TOKENIZERS:
        raise ConfigError("tokenizer", f"unknown tokenizer {cfg.tokenizer!r}; choose from {TOKENIZERS}")
    if not cfg.lr > 0:
        raise ConfigError("lr", f"learning rate must be > 0, got {cfg.lr}")
    if not cfg.alpha > 1:
        raise ConfigError("alpha", f"α-entmax needs α > 1 (α → 1 is softmax), got {cfg.alpha}")
    if cfg.alpha > 2:
        raise ConfigError("alpha", f"supported α range is 1 < α ≤ 2, got {cfg.alpha}")
    if cfg.alpha_start is not None and not 1 < cfg.alpha_start <= 2:
        raise ConfigError("alpha_start", f"must lie in (1, 2], got {cfg.alpha_start}")
    if cfg.alpha_anneal_steps is not None and cfg.alpha_anneal_steps < 1:
        raise ConfigError("alpha_anneal_steps", f"must be ≥ 1, got {cfg.alpha_anneal_steps}")
    for name in ("steps", "batch_size", "grad_accum", "seq_len", "log_every", "eval_every", "eval_batches",
                 "sparsity_every", "save_every", "keep"):
        if getattr(cfg, name) < 1:
            raise ConfigError(name, f"must be ≥ 1, got {getattr(cfg, name)}")
    if cfg.warmup_steps < 0:
        raise ConfigError("warmup_steps", f"must be ≥ 0, got {cfg.warmup_steps}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ConfigError("min_lr_ratio", f"must lie in [0, 1], got {cfg.min_lr_ratio}")
    if cfg.grad_clip < 0:
        raise ConfigError("grad_clip", f"must be ≥ 0, got {cfg.grad_clip}")
    if cfg.dropout is not None and not 0 <= cfg.dropout < 1:
        raise ConfigError("dropout", f"must lie in [0, 1), got {cfg.dropout}")
    if not 0 < cfg.val_fraction < 1:
        raise ConfigError("val_fraction", f"must lie in (0, 1), got {cfg.val_fraction}")
    if cfg.task == "mlm" and not 0 < cfg.mlm_prob < 1:
        raise ConfigError("mlm_prob", f"must lie in (0, 1), got {cfg.mlm_prob}")
    if cfg.task == "classify" and cfg.num_labels < 2:
        raise ConfigError("num_labels", f"need at least 2 classes, got {cfg.num_labels}")
    if cfg.batch_size % cfg.grad_accum:
        raise ConfigError("batch_size", f"batch size {cfg.batch_size} is not divisible by grad_accum={cfg.grad_accum}")
    axes = parse_mesh(cfg.mesh)
    n_mesh = axes["data"] * axes["fsdp"]
    if n_mesh > num_devices:
        raise ConfigError("mesh", f"{cfg.mesh!r} needs {n_mesh} devices but only {num_devices} are visible")
    if jax.process_count() > 1 and n_mesh != num_devices:
        raise ConfigError("mesh", f"{cfg.mesh!r} covers {n_mesh} of the {num_devices} devices of this "
                          f"{jax.process_count()}-process run; the mesh must span every process's devices")
    if cfg.micro_batch_size % n_mesh:
        raise ConfigError(
            "batch_size",
            f"micro-batch size {cfg.micro_batch_size} (batch_size={cfg.batch_size} / grad_accum={cfg.grad_accum}) "
            f"is not divisible by the data-parallel size {n_mesh} (data={axes['data']} × fsdp={axes['fsdp']})",
        )
    if cfg.data is not None and not os.path.exists(cfg.data):
        raise ConfigError("data", f"path {cfg.data!r} does not exist")
    if cfg.stop_after is not None and cfg.stop_after < 1:
        raise ConfigError("stop_after", f"must be ≥ 1, got {cfg.stop_after}")


def init_distributed(cfg: TrainConfig) -> None:
    """Multi-host: join the cluster before any other JAX call. With `coordinator` set, the three values are
    passed to jax.distributed.initialize; environments it can auto-detect (SLURM, Open MPI, Cloud TPU) only need
    JAX_DISTRIBUTED=1 in the environment."""
    import jax

    if cfg.coordinator is not None:
        if cfg.num_processes is None or cfg.process_id is None:
            raise ConfigError("coordinator", "multi-host runs need --num-processes and --process-id too")
        if not 0 <= cfg.process_id < cfg.num_processes:
            raise ConfigError("process_id", f"must lie in [0, {cfg.num_processes}), got {cfg.process_id}")
        jax.distributed.initialize(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes,
                                   process_id=cfg.process_id)
    elif os.environ.get("JAX_DISTRIBUTED", "") not in ("", "0"):
        jax.distributed.initialize()


def validate_positions(cfg: TrainConfig, max_positions: int) -> None:
    if cfg.seq_len > max_positions:
        raise ConfigError("seq_len", f"sequence length {cfg.seq_len} exceeds the model's {max_positions} positions")


# ----------------------------------------------------------------------------------------------- command line


def _base_type(annotation) -> tuple[type, bool]:
    """(scalar type, optional?) for an annotation such as 'int | None' (string, because of `annotations`)."""
    hint = eval(annotation, {}) if isinstance(annotation, str) else annotation  # noqa: S307 - our own literals
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0]
    return hint, optional


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _optional(kind):
    def parse(text: str):
        if text.lower() in ("none", "null", ""):
            return None
        return kind(text)

    parse.__name__ = kind.__name__
    return parse


def build_parser(prog: str, description: str, defaults: TrainConfig, choices: dict[str, typing.Sequence[str]]):
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(TrainConfig):
        kind, optional = _base_type(f.type)
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if kind is bool:
            parser.add_argument(flag, type=_bool, default=default, metavar="BOOL")
            if f.name == "progress":
                parser.add_argument("--no-progress", dest="progress", action="store_false",
                                    help="disable the progress bar")
            continue
        conv = _optional(kind) if optional else kind
        parser.add_argument(flag, type=conv, default=default, choices=None,
                            metavar=f.name.upper() if f.name not in choices else "{" + ",".join(choices[f.name]) + "}")
    return parser


def parse_args(argv, *, prog: str, description: str, defaults: TrainConfig,
               choices: dict[str, typing.Sequence[str]] | None = None) -> TrainConfig:
    parser = build_parser(prog, description, defaults, choices or {})
    ns = parser.parse_args(argv)
    return dataclasses.replace(defaults, **{f.name: getattr(ns, f.name) for f in fields(TrainConfig)})


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


__all__ = [
    "ConfigError",
    "TrainConfig",
    "parse_args",
    "parse_mesh",
    "validate",
    "validate_positions",
    "to_dict",
    "init_distributed",
]
