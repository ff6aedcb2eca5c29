"""GPT-2 / BERT NNX models: configs, shapes, masking, α handling, inspection, generation, errors.

Oracles here are properties that hold independently of the implementation (causality,
padding invariance, the uncached argmax loop, ...); numerical parity with Hugging Face's
torch models is in test_models_hf.py, the Pallas path in test_models_adasplash.py.
"""

import dataclasses
import os
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models import (
    ATTENTION_KINDS,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    ByteTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    attention_maps,
    attention_sparsity,
    check_alpha_config,
    make_attention_fn,
    plot_attention,
    set_attention_fn,
)
from models import gpt2 as gpt2_module

KINDS = ("softmax", "entmax")


# The suite's models: the "tiny" preset made smaller still (vocab 128, 64 positions, width 32), to stay fast.
def gpt2_config(**kw):
    return GPT2Config.preset("tiny", **{**dict(vocab_size=128, n_positions=64, n_embd=32), **kw})


def bert_config(**kw):
    small = dict(vocab_size=128, max_position_embeddings=64, hidden_size=32, intermediate_size=64)
    return BertConfig.preset("tiny", **{**small, **kw})


def gpt2(attention="softmax", **kw):
    return GPT2LMHeadModel(gpt2_config(attention=attention, **kw), rngs=nnx.Rngs(0))


def bert(cls=BertModel, attention="softmax", **kw):
    return cls(bert_config(attention=attention, **kw), rngs=nnx.Rngs(0))


def ids(shape, vocab=128, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, shape), jnp.int32)


# --------------------------------------------------------------------------- configs


def test_presets_match_published_sizes():
    sizes = {"gpt2": (768, 12, 12), "gpt2-medium": (1024, 24, 16), "gpt2-large": (1280, 36, 20), "gpt2-xl": (1600, 48, 25)}
    for name, (d, l, h) in sizes.items():
        c = GPT2Config.preset(name)
        assert (c.n_embd, c.n_layer, c.n_head, c.vocab_size, c.n_positions) == (d, l, h, 50257, 1024)
    b, large = BertConfig.preset("bert-base"), BertConfig.preset("bert-large")
    assert (b.hidden_size, b.num_hidden_layers, b.num_attention_heads, b.intermediate_size) == (768, 12, 12, 3072)
    assert (large.hidden_size, large.num_hidden_layers, large.num_attention_heads) == (1024, 24, 16)
    assert b.vocab_size == 30522 and b.max_position_embeddings == 512
    c = dataclasses.replace(gpt2_config(), attention="entmax", alpha=[1.2, 2.0])
    assert c.alpha == (1.2, 2.0) and c.attention == "entmax"
    with pytest.raises(ValueError, match="preset"):
        GPT2Config.preset("gpt3")


def test_byte_level_presets_are_the_training_sizes():
    t, s = GPT2Config.preset("tiny"), GPT2Config.preset("small")
    assert (t.vocab_size, t.n_positions, t.n_embd, t.n_layer, t.n_head) == (256, 256, 64, 2, 4)
    assert (s.vocab_size, s.n_positions, s.n_embd, s.n_layer, s.n_head) == (256, 512, 256, 4, 8)
    bt, bs = BertConfig.preset("tiny"), BertConfig.preset("small")
    fields = lambda c: (c.vocab_size, c.max_position_embeddings, c.hidden_size, c.num_hidden_layers,  # noqa: E731
                        c.num_attention_heads, c.intermediate_size)
    assert fields(bt) == (260, 256, 64, 2, 4, 256)
    assert fields(bs) == (260, 512, 256, 4, 8, 1024)
    # the vocabularies are the byte tokenizers' (bytes; bytes + BERT's four specials)
    assert t.vocab_size == s.vocab_size == ByteTokenizer().vocab_size
    assert bt.vocab_size == bs.vocab_size == ByteTokenizer.bert().vocab_size


def test_one_kind_list_and_one_alpha_check_from_the_package():
    from adasplash_jax.entmax import check_alpha

    assert ATTENTION_KINDS == ("softmax", "entmax", "adasplash")
    assert all(callable(make_attention_fn(kind)) for kind in ATTENTION_KINDS)
    a = check_alpha_config(np.float32(1.5), 2, 4)
    assert a == 1.5 and type(a) is float
    assert check_alpha_config([1.2, [1.1, 1.5, 1.8, 2]], 2, 4) == (1.2, (1.1, 1.5, 1.8, 2.0))
    assert check_alpha_config(1.25) == 1.25  # a CLI value, before the model's sizes are known
    with pytest.raises(ValueError, match="n_layer"):
        check_alpha_config((1.5, 1.5), 3, 4)
    # each value is accepted or refused exactly as the library's check_alpha decides
    for value in (1.0, 1 + 1e-8, 1 + 1e-5, 1.0005, 1.01, 1.5, 2.0, 2 + 1e-7, 2.5, -1.0, float("nan"), float("inf")):
        try:
            check_alpha(value)
        except ValueError:
            for config in (value, (1.5, (1.5, value))):
                with pytest.raises(ValueError, match="alpha"):
                    check_alpha_config(config, 2, 2)
        else:
            assert check_alpha_config((1.5, (1.5, value)), 2, 2) == (1.5, (1.5, check_alpha(value)))  # the value used


def test_no_module_is_named_like_a_standard_library_module():
    names = {p.stem for p in pathlib.Path(models.__file__).parent.glob("*.py")}
    assert not names & set(sys.stdlib_module_names)


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: GPT2Config(n_head=5), "n_head"),
        (lambda: GPT2Config(attention="linear"), "attention"),
        (lambda: GPT2Config(alpha=2.5), "alpha"),
        (lambda: GPT2Config(alpha=1.0), "alpha"),
        (lambda: GPT2Config(alpha="1.5"), "alpha"),
        (lambda: GPT2Config(alpha=None), "alpha"),
        (lambda: GPT2Config.preset("tiny", alpha=(1.5,)), "alpha"),
        (lambda: GPT2Config.preset("tiny", alpha=(1.5, (1.5, 1.5))), r"alpha\[1\]"),
        (lambda: GPT2Config.preset("tiny", alpha=(1.5, (1.5, 1.5, 2.5, 1.5))), r"alpha\[1\]\[2\]"),
        (lambda: GPT2Config(dropout=1.0), "dropout"),
        (lambda: GPT2Config(activation_function="swish2"), "activation_function"),
        (lambda: GPT2Config(n_layer=0), "n_layer"),
        (lambda: GPT2Config(dtype=jnp.int32), "dtype"),
        (lambda: BertConfig(hidden_act="nope"), "hidden_act"),
        (lambda: BertConfig(num_labels=0), "num_labels"),
        (lambda: BertConfig(learn_alpha="yes"), "learn_alpha"),
    ],
)
def test_config_validation_names_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


# --------------------------------------------------------------------------- shapes and masking


@pytest.mark.slow
@pytest.mark.parametrize("attention", KINDS)
def test_shapes(attention):
    x = ids((2, 8))
    assert gpt2(attention)(x).shape == (2, 8, 128)
    assert bert(BertModel, attention)(x).shape == (2, 8, 32)
    assert bert(BertForMaskedLM, attention)(x).shape == (2, 8, 128)
    assert bert(BertForSequenceClassification, attention, num_labels=3)(x).shape == (2, 3)


@pytest.mark.slow
@pytest.mark.parametrize("attention", KINDS)
def test_gpt2_future_tokens_never_change_earlier_logits(attention):
    model = gpt2(attention)
    a = ids((2, 12), seed=1)
    b = a.at[:, 7:].set(ids((2, 5), seed=2))
    la, lb = model(a), model(b)
    np.testing.assert_allclose(la[:, :7], lb[:, :7], rtol=1e-5, atol=1e-5)
    assert not np.allclose(la[:, 7:], lb[:, 7:], atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("attention", KINDS)
def test_gpt2_right_padding_does_not_change_valid_logits(attention):
    model = gpt2(attention)
    x = ids((1, 6), seed=3)
    padded = jnp.concatenate([x, ids((1, 4), seed=4)], axis=1)
    mask = jnp.array([[1] * 6 + [0] * 4])
    np.testing.assert_allclose(model(padded, mask)[:, :6], model(x), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "cls, attention",
    [(BertModel, "softmax"), (BertModel, "entmax"), (BertForMaskedLM, "entmax"), (BertForSequenceClassification, "entmax")],
)
def test_bert_padding_invariance(cls, attention):
    model = bert(cls, attention)
    short = ids((1, 5), seed=5)
    padded = jnp.concatenate([short, ids((1, 3), seed=6)], axis=1)  # junk tokens under the mask
    mask = jnp.array([[1] * 5 + [0] * 3])
    tt_short, tt_padded = jnp.zeros_like(short).at[:, 3:].set(1), jnp.zeros_like(padded).at[:, 3:].set(1)
    out_short = model(short, None, tt_short)
    out_padded = model(padded, mask, tt_padded)
    if cls is not BertForSequenceClassification:
        out_padded = out_padded[:, :5]
    np.testing.assert_allclose(out_padded, out_short, atol=1e-5)
    # the same sequence in a batch next to a longer one gives the same result too
    batch = jnp.concatenate([padded, ids((1, 8), seed=7)], axis=0)
    out_batch = model(batch, jnp.concatenate([mask, jnp.ones((1, 8), jnp.int32)]), tt_padded.repeat(2, 0))
    np.testing.assert_allclose(out_batch[:1, :5] if out_batch.ndim == 3 else out_batch[:1], out_short, atol=1e-5)


# --------------------------------------------------------------------------- α


@pytest.mark.slow
def test_alpha_override_is_traced_without_retracing():
    model = gpt2("entmax", alpha=1.5)
    x = ids((1, 8))
    traces = []

    @nnx.jit
    def forward(model, x, alpha):
        traces.append(1)
        return model(x, alpha=alpha)

    a13 = forward(model, x, jnp.float32(1.3))
    a19 = forward(model, x, jnp.float32(1.9))
    assert len(traces) == 1
    assert not np.allclose(a13, a19, atol=1e-4)
    # the override equals building the model with that α (same weights)
    same_weights = GPT2LMHeadModel(dataclasses.replace(model.config, alpha=1.9), rngs=nnx.Rngs(0))
    np.testing.assert_allclose(a19, same_weights(x), atol=1e-5)
    # softmax ignores α
    sm = gpt2("softmax")
    np.testing.assert_allclose(sm(x, alpha=jnp.float32(1.9)), sm(x), atol=0)


@pytest.mark.slow
def test_alpha_per_layer_and_per_head():
    heads = (1.1, 1.5, 1.8, 2.0)
    model = gpt2("entmax", alpha=(2.0, heads))
    assert model.h[0].attn.current_alpha() == 2.0
    np.testing.assert_allclose(model.h[1].attn.current_alpha(), heads)
    x = ids((1, 16))
    s = np.asarray(attention_sparsity(model, x))
    assert s.shape == (2, 4)
    # sparsemax (α = 2) is at least as sparse as α = 1.1 on these near-uniform random scores
    assert s[1, 3] >= s[1, 0]


@pytest.mark.slow
def test_learnable_alpha_gets_gradients_and_stays_in_range():
    model = gpt2("entmax", alpha=1.5, learn_alpha=True)
    a = model.h[0].attn.current_alpha()
    np.testing.assert_allclose(a, 1.5, atol=1e-6)
    x = ids((2, 8))

    def loss(model):
        logits = model(x[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), x[:, 1:, None], -1))

    grads = nnx.grad(loss)(model)
    for i in range(2):
        g = np.asarray(grads["h"][i]["attn"]["alpha_logit"][...])
        assert g.shape == (4,) and np.all(np.isfinite(g)) and np.any(g != 0)
    model.h[0].attn.alpha_logit[...] = jnp.array([-100.0, -3.0, 3.0, 100.0])
    a = np.asarray(model.h[0].attn.current_alpha())
    assert np.all(a > 1.0) and np.all(a <= 2.0)


# --------------------------------------------------------------------------- attention functions


@pytest.mark.slow
def test_make_attention_fn_and_set_attention_fn():
    q = jax.random.normal(jax.random.key(0), (1, 5, 2, 8))
    sm = make_attention_fn("softmax")
    np.testing.assert_allclose(
        sm(q, q, q, alpha=1.5, mask=None, is_causal=True, key_value_seq_lengths=None),
        jax.nn.dot_product_attention(q, q, q, is_causal=True), rtol=1e-5, atol=1e-5,
    )
    with pytest.raises(ValueError, match="attention"):
        make_attention_fn("linear")

    model = gpt2("entmax")
    x = ids((1, 8))
    expected = model(x)
    calls = []
    inner = make_attention_fn("entmax")

    def recording(query, key, value, *, alpha, mask, is_causal, key_value_seq_lengths):
        calls.append((alpha, is_causal))
        return inner(query, key, value, alpha=alpha, mask=mask, is_causal=is_causal,
                     key_value_seq_lengths=key_value_seq_lengths)

    set_attention_fn(model, recording)
    np.testing.assert_allclose(model(x), expected, atol=0)
    assert calls == [(1.5, True)] * 2
    with pytest.raises(ValueError, match="callable"):
        set_attention_fn(model, None)


# --------------------------------------------------------------------------- dropout


@pytest.mark.slow
def test_dropout_uses_the_models_dropout_stream():
    model = GPT2LMHeadModel(gpt2_config(dropout=0.2), rngs=nnx.Rngs(params=0, dropout=1))
    x = ids((1, 8))
    det = model(x)
    np.testing.assert_allclose(model(x, deterministic=True), det, atol=0)
    d1, d2 = model(x, deterministic=False), model(x, deterministic=False)
    assert not np.allclose(d1, det) and not np.allclose(d1, d2)


# --------------------------------------------------------------------------- inspection


@pytest.mark.slow
def test_attention_sparsity_counts_exact_zeros_among_allowed_entries():
    # initializer_range 0.2: scores large enough for sparsemax to leave many exact zeros
    x = ids((2, 10), seed=8)
    padded = jnp.concatenate([x, ids((2, 6), seed=9)], axis=1)
    mask = jnp.array([[1] * 10 + [0] * 6, [1] * 10 + [0] * 6])
    causal, full = np.tril(np.ones((10, 10), bool)), np.ones((10, 10), bool)
    results = []
    for model, allowed in ((gpt2("entmax", alpha=2.0, initializer_range=0.2), causal),
                           (bert(BertModel, "entmax", alpha=2.0, initializer_range=0.2), full)):
        s = attention_sparsity(model, x)
        results.append(s)
        assert s.shape == (2, 4) and s.dtype == jnp.float32
        # an independent count on the maps: zeros among the allowed pairs, over batch and positions
        maps = np.asarray(attention_maps(model, x))
        expected = ((maps == 0) & allowed).sum(axis=(1, 3, 4)) / (2 * allowed.sum())
        assert expected.min() > 0.2  # not a vacuous comparison
        np.testing.assert_allclose(s, expected, atol=1e-6)
        np.testing.assert_allclose(nnx.jit(attention_sparsity)(model, x), s, atol=1e-6)
        # padded keys and padded query rows are not counted
        maps = np.asarray(attention_maps(model, padded, mask))[..., :10, :10]
        expected = ((maps == 0) & allowed).sum(axis=(1, 3, 4)) / (2 * allowed.sum())
        np.testing.assert_allclose(attention_sparsity(model, padded, mask), expected, atol=1e-6)
        np.testing.assert_allclose(attention_sparsity(model, padded, mask), s, atol=0.03)
        # the model's own attention function is back in place
        own = make_attention_fn("entmax")
        assert all(layer.attention_fn is own for layer in models.attention.attention_layers(model))
    # "adasplash" models are counted on the dense path (same probabilities); softmax is dense by definition
    pallas = gpt2("adasplash", alpha=2.0, initializer_range=0.2)
    np.testing.assert_array_equal(attention_sparsity(pallas, x), results[0])
    np.testing.assert_array_equal(attention_sparsity(gpt2("softmax"), x), np.zeros((2, 4)))


@pytest.mark.slow
def test_attention_maps_are_distributions_over_allowed_keys():
    model = bert(BertModel, "entmax", alpha=1.5)
    x = ids((2, 7))
    mask = jnp.array([[1] * 7, [1] * 4 + [0] * 3])
    maps = np.asarray(attention_maps(model, x, mask))
    assert maps.shape == (2, 2, 4, 7, 7)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
    assert np.all(maps[:, 1, :, :, 4:] == 0)
    causal = np.asarray(attention_maps(gpt2("entmax"), x))
    assert np.all(np.triu(np.ones((7, 7)), 1)[None, None, None] * causal == 0)


def test_plot_attention_writes_a_png(tmp_path):
    model = gpt2("entmax")
    path = os.path.join(tmp_path, "attn.png")
    fig = plot_attention(model, ids((1, 6)), path=path, tokens=list("abcdef"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == 2 * 4


# --------------------------------------------------------------------------- generation


def _argmax_loop(model, prompt, n):
    x = prompt
    for _ in range(n):
        nxt = jnp.argmax(model(x)[:, -1], axis=-1).astype(x.dtype)
        x = jnp.concatenate([x, nxt[:, None]], axis=1)
    return x


@pytest.mark.slow
@pytest.mark.parametrize("attention", KINDS)
def test_greedy_cached_generation_equals_uncached_argmax_loop(attention):
    model = gpt2(attention)
    prompt = ids((2, 5), seed=10)
    out = model.generate(prompt, 4)
    assert out.shape == (2, 9)
    np.testing.assert_array_equal(out, _argmax_loop(model, prompt, 4))


@pytest.mark.slow
def test_decode_step_is_compiled_once_and_reused():
    model = gpt2("entmax")
    prompt = ids((1, 7), seed=11)  # a shape no other test uses: the first call traces
    before = dict(gpt2_module.TRACE_COUNTS)
    model.generate(prompt, 9)
    assert gpt2_module.TRACE_COUNTS["decode"] - before.get("decode", 0) == 1
    assert gpt2_module.TRACE_COUNTS["prefill"] - before.get("prefill", 0) == 1
    model.generate(prompt, 9)  # same shapes: nothing is traced again
    assert gpt2_module.TRACE_COUNTS["decode"] - before.get("decode", 0) == 1


@pytest.mark.slow
def test_sampling_options():
    model = gpt2("entmax")
    prompt = ids((1, 4), seed=12)
    greedy = model.generate(prompt, 5)
    key = jax.random.key(3)
    np.testing.assert_array_equal(model.generate(prompt, 5, temperature=1.0, top_k=1, rng=key), greedy)
    np.testing.assert_array_equal(model.generate(prompt, 5, temperature=1.0, top_p=1e-6, rng=key), greedy)
    a = model.generate(prompt, 5, temperature=5.0, rng=key)
    np.testing.assert_array_equal(model.generate(prompt, 5, temperature=5.0, rng=key), a)
    assert not np.array_equal(model.generate(prompt, 5, temperature=5.0, rng=jax.random.key(4)), a)
    # top_k restricts the first sampled token to the k most likely after the prompt
    top3 = np.argsort(np.asarray(model(prompt)[0, -1]))[-3:]
    for seed in range(3):
        out = model.generate(prompt, 5, temperature=5.0, top_k=3, rng=jax.random.key(seed))
        assert int(out[0, 4]) in top3
    with pytest.raises(ValueError, match="rng"):
        model.generate(prompt, 2, temperature=1.0)


@pytest.mark.slow
def test_generate_arguments_are_checked_and_named():
    model = gpt2("entmax")
    prompt = ids((2, 4), seed=13)
    key = jax.random.key(0)
    greedy = model.generate(prompt, 3)
    # numpy scalars are numbers like any other
    out = model.generate(prompt, np.int64(3), temperature=np.float32(0.5), top_k=np.int64(5), top_p=np.float64(0.9),
                         rng=key)
    np.testing.assert_array_equal(out, model.generate(prompt, 3, temperature=0.5, top_k=5, top_p=0.9, rng=key))
    # temperatures so small that logits / temperature would overflow (or that are 0 in float32) are greedy
    for t in (1e-45, np.float32(1e-38), 1e-30):
        np.testing.assert_array_equal(model.generate(prompt, 3, temperature=t, rng=key), greedy)
    # batch 0: an empty result
    empty = model.generate(prompt[:0], 3)
    assert empty.shape == (0, 7) and empty.dtype == prompt.dtype
    bad = [
        dict(top_p="0.9"), dict(top_p=0.0), dict(top_p=1.5), dict(top_p=float("nan")),
        dict(top_k=0), dict(top_k=2.0), dict(top_k="3"), dict(top_k=129), dict(top_k=True),
        dict(temperature=-1.0), dict(temperature=float("nan")), dict(temperature=float("inf")), dict(temperature="1"),
        dict(alpha=1.0), dict(alpha=2.5), dict(alpha="1.5"), dict(alpha=jnp.float32(0.5)),
        dict(rng=5), dict(rng=jax.random.split(key)),
    ]
    for kw in bad:
        with pytest.raises(ValueError, match=next(iter(kw))):
            model.generate(prompt, 3, **{"rng": key, "temperature": 1.0, **kw})
    for n in (-1, 2.0, "3", True):
        with pytest.raises(ValueError, match="max_new_tokens"):
            model.generate(prompt, n)
    # a concrete α override of a plain call is checked too (inside jit only its dtype can be)
    with pytest.raises(ValueError, match="alpha"):
        model(prompt, alpha=1.0)


# --------------------------------------------------------------------------- tokenizer


def test_byte_tokenizer_round_trips_text_with_the_training_ids():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo wörld — 日本語 🙂'"
    encoded = tok.encode(text)
    assert encoded.dtype == np.int32 and encoded.tolist() == list(text.encode("utf-8"))
    assert tok.decode(encoded) == text and tok.decode(jnp.asarray(encoded)) == text and tok.decode([]) == ""
    assert tok.decode([104, 0xFF, 105]) == "h\ufffdi"  # invalid UTF-8 is replaced
    with pytest.raises(ValueError, match="vocabulary"):
        tok.decode([256])
    bt = ByteTokenizer.bert()
    assert bt.vocab_size == 260
    assert [bt.token_id(s) for s in ("[PAD]", "[MASK]", "[CLS]", "[SEP]")] == [256, 257, 258, 259]
    ids_ = np.concatenate([[bt.token_id("[CLS]")], bt.encode("né"), [bt.token_id("[MASK]")]])
    assert bt.decode(ids_) == "né" and bt.decode(ids_, skip_specials=False) == "[CLS]né[MASK]"
    # the same ids as the training data pipeline's tokenizer
    data = pytest.importorskip("train.data")
    if hasattr(data, "ByteTokenizer"):
        train_tok = data.ByteTokenizer(data.BERT_SPECIALS)
        assert train_tok.vocab_size == bt.vocab_size
        assert [train_tok.token_id(s) for s in data.BERT_SPECIALS] == [bt.token_id(s) for s in data.BERT_SPECIALS]
        np.testing.assert_array_equal(train_tok.encode(text.encode("utf-8")), bt.encode(text))
        assert train_tok.decode(encoded) == tok.decode(encoded)


# --------------------------------------------------------------------------- bad input


def test_bad_inputs_are_named():
    model = gpt2()
    with pytest.raises(ValueError, match="vocabulary"):
        model(jnp.array([[1, 2, 128]]))
    with pytest.raises(ValueError, match="vocabulary"):
        model(jnp.array([[1, -1]]))
    with pytest.raises(ValueError, match="position table"):
        model(jnp.zeros((1, 65), jnp.int32))
    with pytest.raises(ValueError, match="position table"):
        model.generate(jnp.zeros((1, 60), jnp.int32), 5)
    with pytest.raises(ValueError, match="attention_mask"):
        model(jnp.zeros((1, 6), jnp.int32), jnp.ones((1, 5)))
    with pytest.raises(ValueError, match="input_ids"):
        model(jnp.zeros((6,), jnp.int32))
    with pytest.raises(ValueError, match="input_ids"):
        model(jnp.zeros((1, 6), jnp.float32))
    b = bert(BertModel)
    with pytest.raises(ValueError, match="token_type_ids"):
        b(jnp.zeros((1, 4), jnp.int32), None, jnp.full((1, 4), 2))
    with pytest.raises(ValueError, match="position table"):
        b(jnp.zeros((1, 65), jnp.int32))


@pytest.mark.slow
def test_adasplash_takes_left_padding_like_entmax():
    """The Pallas path folds a key-padding mask into segment ids: left padding works, traced too."""
    model = gpt2("adasplash")
    ids = jnp.array([[5, 9, 3, 7, 1], [2, 4, 6, 8, 10]])
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    got = nnx.jit(lambda m, i, a: m(i, a))(model, ids, mask)
    set_attention_fn(model, make_attention_fn("entmax"))
    want = model(ids, mask)
    valid = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], rtol=1e-4, atol=1e-4)
