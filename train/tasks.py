"""Model configs, losses and the :class:`~train.trainer.Task` for each CLI (causal LM, masked LM, classification).

Model sizes are the models' own presets (``GPT2Config.preset`` / ``BertConfig.preset``: ``tiny`` 2 layers × 64 with
256 positions, seconds per hundred steps on a laptop CPU; ``small`` 4 × 256 with 512 positions; the full ``gpt2`` /
``bert-base`` and larger) with the vocabulary of our tokenizer and the run's attention, α, dtype and dropout.
"""

from __future__ import annotations

import dataclasses
import sys

import jax.numpy as jnp
import optax

from train.config import ConfigError, TrainConfig, init_distributed, validate, validate_positions
from train.data import BERT_SPECIALS, ClassifyBatches, LMBatches, MLMBatches, load_corpus
from train.trainer import Diverged, Task

def _common_overrides(cfg: TrainConfig) -> dict:
    m = cfg.model
    o = dict(attention=m.attention, alpha=m.target_alpha, dtype=jnp.dtype(m.dtype), param_dtype=jnp.float32)
    if m.dropout is not None:
        o["dropout"] = m.dropout
    return o


def _preset(cls, name: str, **overrides):
    """`cls.preset(name, **overrides)`; an unknown name is a ConfigError naming `preset`."""
    try:
        return cls.preset(name, **overrides)
    except ValueError as e:
        if "preset" in str(e):
            raise ConfigError("preset", str(e)) from None
        raise


def gpt2_config(cfg: TrainConfig, vocab_size: int):
    from models import GPT2Config

    overrides = dict(vocab_size=vocab_size, **_common_overrides(cfg))
    if cfg.model.positions is not None:
        overrides["n_positions"] = cfg.model.positions
    return _preset(GPT2Config, cfg.model.preset, **overrides)


def bert_config(cfg: TrainConfig, vocab_size: int, num_labels: int = 2):
    from models import BertConfig

    overrides = dict(vocab_size=vocab_size, num_labels=num_labels, **_common_overrides(cfg))
    if cfg.model.positions is not None:
        overrides["max_position_embeddings"] = cfg.model.positions
    return _preset(BertConfig, cfg.model.preset, **overrides)


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
        if mesh.size == 1 or cfg.model.attention == "softmax":
            return
        from adasplash_jax.sharding import shard_attention
        from models import make_attention_fn, set_attention_fn

        set_attention_fn(model, shard_attention(make_attention_fn(cfg.model.attention), mesh))

    return prepare


def _pretrained(cfg: TrainConfig, **extra):
    """models.from_pretrained, its errors (a truncated safetensors file, a broken config.json, ...) reported as an
    `init_from` error naming the folder."""
    from models import from_pretrained

    kw = dict(_common_overrides(cfg), **extra)
    attention, alpha, dtype = kw.pop("attention"), kw.pop("alpha"), kw.pop("dtype")
    path = cfg.model.init_from
    try:
        return from_pretrained(path, attention=attention, alpha=alpha, dtype=dtype, **kw)
    except Exception as e:  # noqa: BLE001 - whatever the loader raises, the user's fix is the same: the folder
        detail = str(e).splitlines()[0] if str(e) else ""
        raise ConfigError("init_from", f"{path}: cannot load the checkpoint ({type(e).__name__}: {detail})") from None


def _as_classifier(loaded, num_labels: int, cfg: TrainConfig):
    """A BertForSequenceClassification from any loaded BERT: the encoder's weights are copied, the pooler and
    classifier are freshly initialised unless the checkpoint already is a classifier with `num_labels` classes."""
    from flax import nnx

    from models import BertForSequenceClassification

    if isinstance(loaded, BertForSequenceClassification) and loaded.config.num_labels == num_labels:
        return loaded
    if not hasattr(loaded, "bert"):
        raise ConfigError("init_from", f"{cfg.model.init_from} holds a {type(loaded).__name__}, not a BERT model")
    config = dataclasses.replace(loaded.config, num_labels=num_labels)
    seed = cfg.run.seed
    model = BertForSequenceClassification(config, rngs=nnx.Rngs(params=seed, dropout=seed + 1))
    encoder = nnx.state(loaded.bert, nnx.Param)
    target = nnx.state(model.bert, nnx.Param)
    copied = {k: v for k, v in encoder.flat_state() if k in dict(target.flat_state())}
    nnx.update(model.bert, nnx.State.from_flat_path(copied))
    return model


def make_task(cfg: TrainConfig, *, log=print) -> Task:
    """Validate `cfg` (before anything compiles), load the data and build the task."""
    import jax

    validate(cfg, num_devices=len(jax.devices()))
    m, d = cfg.model, cfg.data
    if m.init_from is None:  # an unknown preset fails before the corpus is read
        (gpt2_config if cfg.task == "lm" else bert_config)(cfg, 256)
    specials = () if cfg.task == "lm" else BERT_SPECIALS
    corpus = load_corpus(d.path, tokenizer=d.tokenizer, specials=specials, val_fraction=d.val_fraction,
                         bpe_vocab_size=d.bpe_vocab_size, cache_dir=d.cache_dir, log=log)
    vocab = corpus.vocab_size
    seed, seq_len = cfg.run.seed, d.seq_len
    pretrained = None

    if cfg.task == "lm":
        if m.init_from:
            pretrained = _pretrained(cfg)
            mcfg = pretrained.config
        else:
            mcfg = gpt2_config(cfg, vocab)
        positions, model_vocab = mcfg.n_positions, mcfg.vocab_size
        batches = LMBatches(corpus, seq_len, seed) if seq_len <= positions else None
        loss, classification = token_loss, False
        desc = f"GPT-2 causal LM ({m.init_from or m.preset}, {mcfg.n_layer} layers × {mcfg.n_embd})"
    else:
        num_labels = m.num_labels if cfg.task == "classify" else 2
        if m.init_from:
            pretrained = _pretrained(cfg)
            if cfg.task == "classify":
                pretrained = _as_classifier(pretrained, num_labels, cfg)
            elif type(pretrained).__name__ != "BertForMaskedLM":
                raise ConfigError("init_from", f"{m.init_from} holds a {type(pretrained).__name__}, "
                                               f"not a BertForMaskedLM")
            mcfg = pretrained.config
        else:
            mcfg = bert_config(cfg, vocab, num_labels)
        positions, model_vocab = mcfg.max_position_embeddings, mcfg.vocab_size
        if cfg.task == "mlm":
            batches = MLMBatches(corpus, seq_len, seed, d.mlm_prob) if seq_len <= positions else None
            loss, classification = token_loss, False
        else:
            try:
                batches = ClassifyBatches(corpus, seq_len, seed, m.num_labels)
            except ValueError as e:
                if isinstance(e, ConfigError):
                    raise
                raise ConfigError("num_labels", str(e).partition(": ")[2]) from None
            loss, classification = classify_loss, True
        what = "masked LM" if cfg.task == "mlm" else f"classification over {getattr(batches, 'classes', '')}"
        desc = (f"BERT {what} ({m.init_from or m.preset}, {mcfg.num_hidden_layers} layers × "
                f"{mcfg.hidden_size})")
    validate_positions(cfg, positions)
    if model_vocab < vocab:
        raise ConfigError("init_from" if m.init_from else "tokenizer",
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

    return Task(build_model=build_model, loss=loss, batches=batches, tokens_per_example=seq_len,
                classification=classification, sparsity_inputs=sparsity_inputs, describe=desc,
                prepare=_shard_attention_for(cfg), export=_export)


def _export(model, folder: str) -> None:
    from models import save_pretrained

    save_pretrained(model, folder)


def main(argv, *, prog: str, description: str, defaults: TrainConfig, task_defaults: dict[str, dict]) -> int:
    """Parse (once), validate, train. Exit status: 0 done, 1 diverged, 2 bad configuration or input file,
    128 + signal when interrupted."""
    from train.config import parse_args
    from train.trainer import run

    cfg = parse_args(argv, prog=prog, description=description, defaults=defaults, task_defaults=task_defaults)
    try:
        init_distributed(cfg)
        task = make_task(cfg)
        result = run(cfg, task, sparsity_fn=sparsity)
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except Diverged as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    if result.interrupted and result.signal is not None:
        return 128 + result.signal  # 130 after Ctrl-C, 143 after SIGTERM
    return 0


__all__ = ["make_task", "main", "gpt2_config", "bert_config", "token_loss", "classify_loss", "sparsity"]
