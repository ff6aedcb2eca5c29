"""Model presets, losses and the :class:`~train.trainer.Task` for each CLI (causal LM, masked LM, classification).

Training presets start from the models' own presets with the vocabulary of our tokenizer:
``tiny`` (2 layers, 64 wide, 256 positions: seconds per hundred steps on a laptop CPU), ``small`` (4 layers, 256
wide, 512 positions), and the full ``gpt2`` / ``bert-base`` (and larger) architectures.
"""

from __future__ import annotations

import dataclasses
import sys

import jax.numpy as jnp
import optax

from train.config import ConfigError, TrainConfig, init_distributed, validate, validate_positions
from train.data import BERT_SPECIALS, ClassifyBatches, LMBatches, MLMBatches, load_corpus
from train.trainer import Task

GPT2_PRESETS = ("tiny", "small", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
BERT_PRESETS = ("tiny", "small", "bert-base", "bert-large")

_GPT2_OVERRIDES = {
    "tiny": dict(n_positions=256, n_embd=64, n_layer=2, n_head=4),
    "small": dict(n_positions=512, n_embd=256, n_layer=4, n_head=8),
}
_BERT_OVERRIDES = {
    "tiny": dict(max_position_embeddings=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=256),
    "small": dict(max_position_embeddings=512, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                  intermediate_size=1024),
}


def _common_overrides(cfg: TrainConfig) -> dict:
    o = dict(attention=cfg.attention, alpha=cfg.alpha, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.float32)
    if cfg.dropout is not None:
        o["dropout"] = cfg.dropout
    return o


def gpt2_config(cfg: TrainConfig, vocab_size: int):
    from models import GPT2Config

    base = "tiny" if cfg.preset in _GPT2_OVERRIDES else cfg.preset
    overrides = dict(_GPT2_OVERRIDES.get(cfg.preset, {}))
    if cfg.positions is not None:
        overrides["n_positions"] = cfg.positions
    return GPT2Config.preset(base, vocab_size=vocab_size, **overrides, **_common_overrides(cfg))


def bert_config(cfg: TrainConfig, vocab_size: int, num_labels: int = 2):
    from models import BertConfig

    base = "tiny" if cfg.preset in _BERT_OVERRIDES else cfg.preset
    overrides = dict(_BERT_OVERRIDES.get(cfg.preset, {}))
    if cfg.positions is not None:
        overrides["max_position_embeddings"] = cfg.positions
    return BertConfig.preset(base, vocab_size=vocab_size, num_labels=num_labels, **overrides,
                             **_common_overrides(cfg))


# ------------------------------------------------------------------------------------------------------ losses


def _token_loss(logits, batch):
    logits = logits.astype(jnp.float32)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    w = batch["weights"]
    correct = ((jnp.argmax(logits, -1) == batch["targets"]) * w).sum()
    return (ce * w).sum(), correct


def token_loss(model, batch, alpha, deterministic):
    """Summed cross-entropy of per-token targets (causal LM and masked LM alike; weights pick the tokens)."""
    return _token_loss(model(batch["input_ids"], alpha=alpha, deterministic=deterministic), batch)


def classify_loss(model, batch, alpha, deterministic):
    return _token_loss(model(batch["input_ids"], batch["attention_mask"], alpha=alpha,
                             deterministic=deterministic), batch)


def sparsity(model, input_ids, attention_mask=None, alpha=None):
    from models import attention_sparsity

    return attention_sparsity(model, input_ids, attention_mask, alpha=alpha)


# ------------------------------------------------------------------------------------------------------- tasks


def _shard_attention_for(cfg: TrainConfig):
    """Model preparation: with more than one device, every attention layer runs under shard_map."""

    def prepare(model, mesh):
        if mesh.size == 1 or cfg.attention == "softmax":
            return
        from adasplash_jax.sharding import shard_attention
        from models import make_attention_fn, set_attention_fn

        set_attention_fn(model, shard_attention(make_attention_fn(cfg.attention), mesh))

    return prepare


def _pretrained(cfg: TrainConfig, **extra):
    from models import from_pretrained

    kw = dict(_common_overrides(cfg), **extra)
    attention, alpha, dtype = kw.pop("attention"), kw.pop("alpha"), kw.pop("dtype")
    try:
        return from_pretrained(cfg.init_from, attention=attention, alpha=alpha, dtype=dtype, **kw)
    except FileNotFoundError as e:
        raise ConfigError("init_from", f"cannot load {cfg.init_from!r}: {e}") from None


def _as_classifier(loaded, num_labels: int, cfg: TrainConfig):
    """A BertForSequenceClassification from any loaded BERT: the encoder's weights are copied, the pooler and
    classifier are freshly initialised unless the checkpoint already is a classifier with `num_labels` classes."""
    from flax import nnx

    from models import BertForSequenceClassification

    if isinstance(loaded, BertForSequenceClassification) and loaded.config.num_labels == num_labels:
        return loaded
    if not hasattr(loaded, "bert"):
        raise ConfigError("init_from", f"{cfg.init_from} holds a {type(loaded).__name__}, not a BERT model")
    config = dataclasses.replace(loaded.config, num_labels=num_labels)
    model = BertForSequenceClassification(config, rngs=nnx.Rngs(params=cfg.seed, dropout=cfg.seed + 1))
    encoder = nnx.state(loaded.bert, nnx.Param)
    target = nnx.state(model.bert, nnx.Param)
    copied = {k: v for k, v in encoder.flat_state() if k in dict(target.flat_state())}
    nnx.update(model.bert, nnx.State.from_flat_path(copied))
    return model


def make_task(cfg: TrainConfig, *, log=print) -> Task:
    """Validate `cfg` (before anything compiles), load the data and build the task."""
    import jax

    presets = GPT2_PRESETS if cfg.task == "lm" else BERT_PRESETS
    validate(cfg, presets=presets, num_devices=len(jax.devices()))
    specials = () if cfg.task == "lm" else BERT_SPECIALS
    corpus = load_corpus(cfg.data, tokenizer=cfg.tokenizer, specials=specials, val_fraction=cfg.val_fraction,
                         bpe_vocab_size=cfg.bpe_vocab_size, cache_dir=cfg.cache_dir, log=log)
    vocab = corpus.vocab_size
    pretrained = None

    if cfg.task == "lm":
        if cfg.init_from:
            pretrained = _pretrained(cfg)
            mcfg = pretrained.config
        else:
            mcfg = gpt2_config(cfg, vocab)
        positions, model_vocab = mcfg.n_positions, mcfg.vocab_size
        batches = LMBatches(corpus, cfg.seq_len, cfg.seed) if cfg.seq_len <= positions else None
        loss, classification = token_loss, False
        desc = f"GPT-2 causal LM ({cfg.init_from or cfg.preset}, {mcfg.n_layer} layers × {mcfg.n_embd})"
    else:
        num_labels = cfg.num_labels if cfg.task == "classify" else 2
        if cfg.init_from:
            pretrained = _pretrained(cfg)
            if cfg.task == "classify":
                pretrained = _as_classifier(pretrained, num_labels, cfg)
            elif type(pretrained).__name__ != "BertForMaskedLM":
                raise ConfigError("init_from", f"{cfg.init_from} holds a {type(pretrained).__name__}, "
                                               f"not a BertForMaskedLM")
            mcfg = pretrained.config
        else:
            mcfg = bert_config(cfg, vocab, num_labels)
        positions, model_vocab = mcfg.max_position_embeddings, mcfg.vocab_size
        if cfg.task == "mlm":
            batches = MLMBatches(corpus, cfg.seq_len, cfg.seed, cfg.mlm_prob) if cfg.seq_len <= positions else None
            loss, classification = token_loss, False
        else:
            try:
                batches = ClassifyBatches(corpus, cfg.seq_len, cfg.seed, cfg.num_labels)
            except ValueError as e:
                raise ConfigError("num_labels", str(e).partition(": ")[2]) from None
            loss, classification = classify_loss, True
        what = "masked LM" if cfg.task == "mlm" else f"classification over {getattr(batches, 'classes', '')}"
        desc = (f"BERT {what} ({cfg.init_from or cfg.preset}, {mcfg.num_hidden_layers} layers × "
                f"{mcfg.hidden_size})")
    validate_positions(cfg, positions)
    if model_vocab < vocab:
        raise ConfigError("init_from" if cfg.init_from else "tokenizer",
                          f"the model's vocabulary ({model_vocab}) is smaller than the tokenizer's ({vocab})")

    def build_model(cfg: TrainConfig, rngs):
        if pretrained is not None:
            return pretrained
        from models import BertForMaskedLM, BertForSequenceClassification, GPT2LMHeadModel

        cls = {"lm": GPT2LMHeadModel, "mlm": BertForMaskedLM, "classify": BertForSequenceClassification}[cfg.task]
        return cls(mcfg, rngs=rngs)

    def sparsity_inputs(b):
        out = {"input_ids": b["input_ids"]}
        if "attention_mask" in b:
            out["attention_mask"] = b["attention_mask"]
        return out

    return Task(build_model=build_model, loss=loss, batches=batches, tokens_per_example=cfg.seq_len,
                classification=classification, sparsity_inputs=sparsity_inputs, describe=desc,
                prepare=_shard_attention_for(cfg), export=_export)


def _export(model, folder: str) -> None:
    from models import save_pretrained

    save_pretrained(model, folder)


def main(argv, *, prog: str, description: str, defaults: TrainConfig) -> int:
    """Parse, validate, train; returns the exit status (2: bad configuration, 128 + signal: interrupted)."""
    from train.config import parse_args
    from train.trainer import run

    cfg = parse_args(argv, prog=prog, description=description, defaults=defaults)
    try:
        init_distributed(cfg)
        task = make_task(cfg)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        result = run(cfg, task, sparsity_fn=sparsity)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    if result.interrupted and result.signal is not None:
        return 128 + result.signal  # 130 after Ctrl-C, 143 after SIGTERM
    return 0


__all__ = ["make_task", "main", "gpt2_config", "bert_config", "GPT2_PRESETS", "BERT_PRESETS"]
