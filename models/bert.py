"""BERT (bidirectional encoder with padding masks) as Flax NNX modules.

Post-LayerNorm layers: x = LN(x + attn(x)), then x = LN(x + mlp(x)). Heads: masked LM
(tied decoder + bias) and sequence classification (pooler tanh(W·h[CLS]) → linear).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax.numpy as jnp
from flax import nnx

from models.alpha import check_alpha_override, layer_alpha
from models.attention import SelfAttention
from models.common import ACTIVATIONS, check_common, check_input_ids, key_padding_mask, positive_int, preset
from models.tokenizer import BERT_SPECIALS, BYTE_VOCAB_SIZE

_PRESETS = {
    # Byte-level models trained by train/ (vocab: models.ByteTokenizer.bert(), bytes + 4 specials).
    "tiny": dict(
        vocab_size=BYTE_VOCAB_SIZE + len(BERT_SPECIALS), max_position_embeddings=256, hidden_size=64,
        num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
    ),
    "small": dict(
        vocab_size=BYTE_VOCAB_SIZE + len(BERT_SPECIALS), max_position_embeddings=512, hidden_size=256,
        num_hidden_layers=4, num_attention_heads=8, intermediate_size=1024,
    ),
    # Google's BERT sizes (vocab and positions are the class defaults).
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    initializer_range: float = 0.02
    num_labels: int = 2
    attention: str = "softmax"  # "softmax" | "entmax" | "adasplash"
    alpha: float | tuple = 1.5  # float, per layer (tuple), or per layer and head (tuple of tuples)
    learn_alpha: bool = False
    dropout: float = 0.0  # embeddings, residual branches, classifier input (not attention probabilities)
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        positive_int(
            self, "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "max_position_embeddings", "type_vocab_size", "num_labels",
        )
        check_common(self, layers="num_hidden_layers", heads="num_attention_heads", width="hidden_size",
                     eps="layer_norm_eps", activation="hidden_act")

    @classmethod
    def preset(cls, name: str, **overrides) -> "BertConfig":
        """"tiny" (2 layers × 64, 256 positions), "small" (4 × 256, 512 positions), both byte-level;
        "bert-base", "bert-large"."""
        return preset(cls, _PRESETS, name, **overrides)


def _layer_norm(config: BertConfig, rngs):
    return nnx.LayerNorm(
        config.hidden_size, epsilon=config.layer_norm_eps,
        dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs,
    )


def _linear(config: BertConfig, d_in: int, d_out: int, rngs):
    return nnx.Linear(
        d_in, d_out, dtype=config.dtype, param_dtype=config.param_dtype,
        kernel_init=nnx.initializers.normal(config.initializer_range), rngs=rngs,
    )


class BertEmbeddings(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        embed = functools.partial(
            nnx.Embed, features=config.hidden_size, dtype=config.dtype, param_dtype=config.param_dtype,
            embedding_init=nnx.initializers.normal(config.initializer_range), rngs=rngs,
        )
        self.word = embed(config.vocab_size)
        self.position = embed(config.max_position_embeddings)
        self.token_type = embed(config.type_vocab_size)
        self.norm = _layer_norm(config, rngs)
        self.drop = nnx.Dropout(config.dropout, rngs=rngs)

    def __call__(self, input_ids, token_type_ids, *, deterministic: bool):
        T = input_ids.shape[1]
        x = self.word(input_ids) + self.position(jnp.arange(T))[None] + self.token_type(token_type_ids)
        return self.drop(self.norm(x), deterministic=deterministic)


class BertLayer(nnx.Module):
    def __init__(self, config: BertConfig, layer: int, *, rngs: nnx.Rngs):
        d = config.hidden_size
        self.attention = SelfAttention(
            d,
            config.num_attention_heads,
            attention=config.attention,
            alpha=layer_alpha(config.alpha, layer),
            learn_alpha=config.learn_alpha,
            dtype=config.dtype,
            param_dtype=config.param_dtype,
            init_std=config.initializer_range,
            rngs=rngs,
        )
        self.attention_norm = _layer_norm(config, rngs)
        self.intermediate = _linear(config, d, config.intermediate_size, rngs)
        self.output = _linear(config, config.intermediate_size, d, rngs)
        self.output_norm = _layer_norm(config, rngs)
        self.act = ACTIVATIONS[config.hidden_act]
        self.drop = nnx.Dropout(config.dropout, rngs=rngs)

    def __call__(self, x, *, deterministic: bool, **attn_kwargs):
        a, _, probs = self.attention(x, **attn_kwargs)
        x = self.attention_norm(x + self.drop(a, deterministic=deterministic))
        h = self.output(self.act(self.intermediate(x)))
        x = self.output_norm(x + self.drop(h, deterministic=deterministic))
        return x, probs


class BertModel(nnx.Module):
    """The encoder; ``__call__`` returns the last hidden states [B, T, hidden]."""

    def __init__(self, config: BertConfig, *, add_pooling_layer: bool = True, rngs: nnx.Rngs):
        if not isinstance(config, BertConfig):
            raise ValueError(f"{type(self).__name__} needs a BertConfig, got {type(config).__name__}")
        self.config = config
        self.embeddings = BertEmbeddings(config, rngs=rngs)
        self.layers = nnx.List([BertLayer(config, i, rngs=rngs) for i in range(config.num_hidden_layers)])
        self.pooler = _linear(config, config.hidden_size, config.hidden_size, rngs) if add_pooling_layer else None

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        token_type_ids=None,
        *,
        alpha=None,
        deterministic: bool = True,
        output_attentions: bool = False,
    ):
        c = self.config
        input_ids = check_input_ids(input_ids, c.vocab_size, c.max_position_embeddings)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        else:
            token_type_ids = check_input_ids(
                token_type_ids, c.type_vocab_size, c.max_position_embeddings, "token_type_ids"
            )
            if token_type_ids.shape != input_ids.shape:
                raise ValueError(
                    f"`token_type_ids` must have the shape of input_ids {input_ids.shape}, got {token_type_ids.shape}"
                )
        mask = key_padding_mask(attention_mask, input_ids.shape[1])
        alpha = check_alpha_override(alpha)
        x = self.embeddings(input_ids, token_type_ids, deterministic=deterministic)
        probs = []
        for layer in self.layers:
            x, p = layer(
                x, deterministic=deterministic, mask=mask, alpha=alpha, output_attentions=output_attentions,
            )
            probs.append(p)
        return (x, tuple(probs)) if output_attentions else x

    def pool(self, hidden):
        """tanh(W · hidden[:, 0] + b): the [CLS] summary used by classification heads."""
        if self.pooler is None:
            raise ValueError("this BertModel was built with add_pooling_layer=False")
        return jnp.tanh(self.pooler(hidden[:, 0]))


class BertForMaskedLM(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.bert = BertModel(config, add_pooling_layer=False, rngs=rngs)
        self.transform = _linear(config, config.hidden_size, config.hidden_size, rngs)
        self.transform_norm = _layer_norm(config, rngs)
        self.act = ACTIVATIONS[config.hidden_act]
        self.decoder_bias = nnx.Param(jnp.zeros((config.vocab_size,), config.param_dtype))

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, alpha=None,
                 deterministic: bool = True, output_attentions: bool = False):
        """Logits [B, T, vocab] (decoder tied to the word embeddings)."""
        out = self.bert(input_ids, attention_mask, token_type_ids, alpha=alpha,
                        deterministic=deterministic, output_attentions=output_attentions)
        h, probs = out if output_attentions else (out, None)
        h = self.transform_norm(self.act(self.transform(h)))
        logits = self.bert.embeddings.word.attend(h) + self.decoder_bias[...].astype(h.dtype)
        return (logits, probs) if output_attentions else logits


class BertForSequenceClassification(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.bert = BertModel(config, rngs=rngs)
        self.drop = nnx.Dropout(config.dropout, rngs=rngs)
        self.classifier = _linear(config, config.hidden_size, config.num_labels, rngs)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, alpha=None,
                 deterministic: bool = True, output_attentions: bool = False):
        """Logits [B, num_labels] from the pooled [CLS] state."""
        out = self.bert(input_ids, attention_mask, token_type_ids, alpha=alpha,
                        deterministic=deterministic, output_attentions=output_attentions)
        h, probs = out if output_attentions else (out, None)
        logits = self.classifier(self.drop(self.bert.pool(h), deterministic=deterministic))
        return (logits, probs) if output_attentions else logits


# --------------------------------------------------------------------------- Hugging Face layout


def hf_weight_map(config: BertConfig, architecture: str):
    """(HF tensor name, our parameter paths, conversion) for every weight.

    HF BERT uses nn.Linear, stored (out, in): transposed into Flax kernels. The MLM
    decoder weight is tied to the word embeddings and not listed.
    """
    headed = architecture != "BertModel"
    hp, mp = ("bert.", ("bert",)) if headed else ("", ())

    def linear(hf, path):
        return [(hf + ".weight", [path + ("kernel",)], "transpose"), (hf + ".bias", [path + ("bias",)], "copy")]

    def norm(hf, path):
        return [(hf + ".weight", [path + ("scale",)], "copy"), (hf + ".bias", [path + ("bias",)], "copy")]

    e = hp + "embeddings."
    emb = mp + ("embeddings",)
    rows = [
        (e + "word_embeddings.weight", [emb + ("word", "embedding")], "copy"),
        (e + "position_embeddings.weight", [emb + ("position", "embedding")], "copy"),
        (e + "token_type_embeddings.weight", [emb + ("token_type", "embedding")], "copy"),
        *norm(e + "LayerNorm", emb + ("norm",)),
    ]
    for i in range(config.num_hidden_layers):
        h = f"{hp}encoder.layer.{i}."
        lay = mp + ("layers", i)
        for x, name in (("q", "query"), ("k", "key"), ("v", "value")):
            rows += linear(h + "attention.self." + name, lay + ("attention", x))
        rows += linear(h + "attention.output.dense", lay + ("attention", "o"))
        rows += norm(h + "attention.output.LayerNorm", lay + ("attention_norm",))
        rows += linear(h + "intermediate.dense", lay + ("intermediate",))
        rows += linear(h + "output.dense", lay + ("output",))
        rows += norm(h + "output.LayerNorm", lay + ("output_norm",))
    if architecture in ("BertModel", "BertForSequenceClassification"):
        rows += linear(hp + "pooler.dense", mp + ("pooler",))
    if architecture == "BertForMaskedLM":
        rows += linear("cls.predictions.transform.dense", ("transform",))
        rows += norm("cls.predictions.transform.LayerNorm", ("transform_norm",))
        rows.append(("cls.predictions.bias", [("decoder_bias",)], "copy"))
    if architecture == "BertForSequenceClassification":
        rows += linear("classifier", ("classifier",))
    return rows


def config_from_hf(hf: dict, **overrides) -> BertConfig:
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"config.json: position_embedding_type={hf['position_embedding_type']!r} is not supported (absolute only)"
        )
    if hf.get("is_decoder", False) or hf.get("add_cross_attention", False):
        raise ValueError("config.json: decoder BERT (is_decoder / add_cross_attention) is not supported")
    keys = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "hidden_act", "initializer_range")
    fields = {k: hf[k] for k in keys if k in hf}
    if "id2label" in hf:
        fields["num_labels"] = len(hf["id2label"])
    elif "num_labels" in hf:
        fields["num_labels"] = hf["num_labels"]
    return BertConfig(**{**fields, **overrides})


def config_to_hf(config: BertConfig, architecture: str) -> dict:
    c = config
    return {
        "model_type": "bert",
        "architectures": [architecture],
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings,
        "type_vocab_size": c.type_vocab_size,
        "layer_norm_eps": c.layer_norm_eps,
        "hidden_act": c.hidden_act,
        "initializer_range": c.initializer_range,
        "hidden_dropout_prob": c.dropout,
        "attention_probs_dropout_prob": 0.0,
        "position_embedding_type": "absolute",
        "id2label": {str(i): f"LABEL_{i}" for i in range(c.num_labels)},
        "label2id": {f"LABEL_{i}": i for i in range(c.num_labels)},
        "tie_word_embeddings": True,
    }
