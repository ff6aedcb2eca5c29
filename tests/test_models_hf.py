"""Hugging Face parity: transformers' torch models (CPU, random init, tiny configs) are the oracles.

Each test saves a transformers model with ``save_pretrained``, loads it with
``models.from_pretrained`` and compares outputs (fp32, max abs diff ≤ 1e-4); the way back
(``models.save_pretrained`` → transformers) must reproduce every weight exactly.
"""

import json
import os


import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from entmax import entmax15  # noqa: E402  (PyTorch entmax package: an independent oracle)

from models import BertForSequenceClassification, attention_maps, attention_sparsity, from_pretrained, save_pretrained  # noqa: E402

ATOL = 1e-4
VOCAB = 97


def _gpt2_config(**kw):
    return transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=0, eos_token_id=None, pad_token_id=0, **kw,
    )


def _bert_config(**kw):
    return transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, max_position_embeddings=32, num_labels=3, **kw,
    )


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(_gpt2_config()).eval()
    path = str(tmp_path_factory.mktemp("gpt2"))
    model.save_pretrained(path)
    return model, path


def _ids(shape, seed=0):
    return np.random.RandomState(seed).randint(0, VOCAB, shape)


def _state_dicts_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.slow
def test_gpt2_logits_match_transformers(gpt2_dir):
    ref, path = gpt2_dir
    model = from_pretrained(path)
    x = _ids((2, 12))
    with torch.no_grad():
        expected = ref(torch.tensor(x)).logits.numpy()
    np.testing.assert_allclose(model(jnp.asarray(x)), expected, atol=ATOL, rtol=0)
    # right-padded batch: the valid positions match
    mask = np.ones((2, 12), np.int64)
    mask[1, 7:] = 0
    with torch.no_grad():
        expected = ref(torch.tensor(x), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(model(jnp.asarray(x), jnp.asarray(mask)))
    np.testing.assert_allclose(got[0], expected[0], atol=ATOL, rtol=0)
    np.testing.assert_allclose(got[1, :7], expected[1, :7], atol=ATOL, rtol=0)


@pytest.mark.slow
def test_gpt2_greedy_generation_matches_transformers(gpt2_dir):
    ref, path = gpt2_dir
    model = from_pretrained(path)
    x = _ids((2, 5), seed=1)
    with torch.no_grad():
        expected = ref.generate(torch.tensor(x), attention_mask=torch.ones(2, 5, dtype=torch.long),
                                max_new_tokens=6, do_sample=False).numpy()
    np.testing.assert_array_equal(model.generate(jnp.asarray(x), 6), expected)


@pytest.mark.slow
def test_gpt2_round_trip_reproduces_weights(gpt2_dir, tmp_path):
    ref, path = gpt2_dir
    model = from_pretrained(path, attention="entmax", alpha=1.7)
    save_pretrained(model, str(tmp_path))
    back, info = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _state_dicts_equal(ref, back)
    again = from_pretrained(str(tmp_path))  # attention kind and α come back from config.json
    assert again.config.attention == "entmax" and again.config.alpha == 1.7
    x = jnp.asarray(_ids((1, 8)))
    np.testing.assert_allclose(again(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["BertModel", "BertForMaskedLM", "BertForSequenceClassification"])
def test_bert_outputs_match_transformers_with_padding(arch, tmp_path):
    torch.manual_seed(1)
    ref = getattr(transformers, arch)(_bert_config()).eval()
    ref.save_pretrained(str(tmp_path / "hf"))
    model = from_pretrained(str(tmp_path / "hf"))
    assert type(model).__name__ == arch
    x = _ids((3, 10), seed=2)
    mask = np.ones((3, 10), np.int64)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    types = np.zeros((3, 10), np.int64)
    types[:, 4:] = 1
    with torch.no_grad():
        out = ref(torch.tensor(x), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))
    expected = (out.last_hidden_state if arch == "BertModel" else out.logits).numpy()
    got = np.asarray(model(jnp.asarray(x), jnp.asarray(mask), jnp.asarray(types)))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)

    save_pretrained(model, str(tmp_path / "ours"))
    back, info = getattr(transformers, arch).from_pretrained(str(tmp_path / "ours"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    _state_dicts_equal(ref, back)


@pytest.mark.slow
def test_pytorch_bin_checkpoint_loads(tmp_path):
    torch.manual_seed(2)
    ref = transformers.BertForSequenceClassification(_bert_config()).eval()
    # the legacy layout (transformers 5 writes only safetensors): config.json + pytorch_model.bin
    ref.config.architectures = ["BertForSequenceClassification"]
    ref.config.save_pretrained(str(tmp_path))
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    model = from_pretrained(str(tmp_path))
    x = _ids((2, 6), seed=3)
    with torch.no_grad():
        expected = ref(torch.tensor(x)).logits.numpy()
    np.testing.assert_allclose(model(jnp.asarray(x)), expected, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_entmax_attention_maps_match_torch_entmax(gpt2_dir):
    """Layer 0's maps and sparsity against scores recomputed in torch + the `entmax` package."""
    ref, path = gpt2_dir
    model = from_pretrained(path, attention="entmax", alpha=1.5)
    x = _ids((1, 9), seed=4)
    with torch.no_grad():
        t = ref.transformer
        h = t.h[0].ln_1(t.wte(torch.tensor(x)) + t.wpe(torch.arange(9)))
        q, k, _ = t.h[0].attn.c_attn(h).split(32, dim=-1)
        q, k = (z.view(1, 9, 4, 8).transpose(1, 2) for z in (q, k))
        scores = q @ k.transpose(-1, -2) / np.sqrt(8)
        scores = scores.masked_fill(torch.triu(torch.ones(9, 9, dtype=torch.bool), 1), float("-inf"))
        expected = entmax15(scores, dim=-1).numpy()[0]
    maps = np.asarray(attention_maps(model, jnp.asarray(x)))[0, 0]
    np.testing.assert_allclose(maps, expected, atol=1e-5)
    allowed = np.tril(np.ones((9, 9), bool))
    expected_sparsity = ((expected == 0) & allowed).sum((1, 2)) / allowed.sum()
    np.testing.assert_allclose(np.asarray(attention_sparsity(model, jnp.asarray(x)))[0], expected_sparsity, atol=0.03)


# --------------------------------------------------------------------------- bad input


def _write_config(path, **cfg):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)


@pytest.mark.slow
def test_bad_checkpoints_are_named(gpt2_dir, tmp_path):
    _, good = gpt2_dir
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(str(tmp_path / "empty"))
    _write_config(tmp_path / "llama", model_type="llama")
    with pytest.raises(ValueError, match="model_type 'llama'"):
        from_pretrained(str(tmp_path / "llama"))
    _write_config(tmp_path / "arch", model_type="bert", architectures=["BertForPreTraining"])
    with pytest.raises(ValueError, match="BertForPreTraining"):
        from_pretrained(str(tmp_path / "arch"))
    with open(os.path.join(good, "config.json")) as f:
        cfg = json.load(f)
    _write_config(tmp_path / "noweights", **cfg)
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        from_pretrained(str(tmp_path / "noweights"))
    # a config.json that disagrees with the tensors
    os.makedirs(tmp_path / "mismatch")
    os.link(os.path.join(good, "model.safetensors"), tmp_path / "mismatch" / "model.safetensors")
    _write_config(tmp_path / "mismatch", **{**cfg, "n_embd": 64})
    with pytest.raises(ValueError, match="shape"):
        from_pretrained(str(tmp_path / "mismatch"))
    # heads missing from the checkpoint
    torch.manual_seed(3)
    transformers.BertModel(_bert_config()).save_pretrained(str(tmp_path / "base"))
    with pytest.raises(ValueError, match="missing tensors.*classifier"):
        from_pretrained(str(tmp_path / "base"), architecture="BertForSequenceClassification")
    with pytest.raises(ValueError, match="attention"):
        from_pretrained(good, attention="flash")


def test_learned_alpha_survives_save_and_load(tmp_path):
    torch.manual_seed(4)
    transformers.BertForSequenceClassification(_bert_config()).save_pretrained(str(tmp_path / "hf"))
    model = from_pretrained(str(tmp_path / "hf"), attention="entmax", alpha=1.5, learn_alpha=True)
    assert isinstance(model, BertForSequenceClassification)
    layer = model.bert.layers[1].attention
    layer.alpha_logit[...] = jnp.array([-1.0, 0.0, 0.5, 2.0])
    save_pretrained(model, str(tmp_path / "ours"))
    again = from_pretrained(str(tmp_path / "ours"))  # kind, α and learn_alpha from config.json
    assert again.config.learn_alpha and again.config.attention == "entmax"
    np.testing.assert_allclose(again.bert.layers[1].attention.current_alpha(), layer.current_alpha(), atol=1e-5)
    x = jnp.asarray(_ids((2, 6)))
    np.testing.assert_allclose(again(x), model(x), atol=1e-5)



@pytest.mark.slow
def test_gpt2_base_model_checkpoint_loads_as_tied_lm(tmp_path):
    """A GPT2Model checkpoint (names without "transformer.") gives the LM with the tied head."""
    torch.manual_seed(5)
    ref = transformers.GPT2Model(_gpt2_config()).eval()
    ref.save_pretrained(str(tmp_path))
    model = from_pretrained(str(tmp_path))
    x = _ids((1, 7), seed=5)
    with torch.no_grad():
        expected = (ref(torch.tensor(x)).last_hidden_state @ ref.wte.weight.T).numpy()
    np.testing.assert_allclose(model(jnp.asarray(x)), expected, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_bfloat16_safetensors_checkpoint_loads(tmp_path):
    torch.manual_seed(6)
    ref = transformers.BertForMaskedLM(_bert_config()).eval().to(torch.bfloat16)
    ref.save_pretrained(str(tmp_path))
    model = from_pretrained(str(tmp_path))  # parameters float32: the bf16 values, widened exactly
    ref = ref.float()
    x = _ids((1, 6), seed=6)
    with torch.no_grad():
        expected = ref(torch.tensor(x)).logits.numpy()
    np.testing.assert_allclose(model(jnp.asarray(x)), expected, atol=ATOL, rtol=0)
