"""Training configuration, command line, data and schedules: nothing here compiles a model."""

import dataclasses
import math
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import models  # noqa: F401 - imported before jax.jit is patched below (its decorators run at import)
from train.config import ConfigError, TrainConfig, make_config, parse_args, parse_mesh
from train.data import (BPETokenizer, ClassifyBatches, LMBatches, MLMBatches, is_val_document, label_of,
                        list_documents, load_corpus)
from train.tasks import make_task
from train.trainer import fsdp_spec

REPO = Path(__file__).resolve().parents[1]


def cfg_for(tmp_path, **kw):
    base = dict(task="lm", steps=10, batch_size=8, seq_len=32, out=str(tmp_path / "run"), progress=False)
    base.update(kw)
    return make_config(**base)


# --------------------------------------------------------------------------------------------- command line


def test_cli_overrides_dataclass_fields():
    d = make_config(task="lm", out="runs/x")
    cfg = parse_args(["--steps", "7", "--batch-size", "4", "--alpha", "1.25", "--alpha-start", "1.01",
                      "--mesh", "data=2,fsdp=4", "--no-progress", "--data", "none", "--attention", "adasplash",
                      "--optim.lr", "0.01", "--b2=0.95"],
                     prog="t", description="t", defaults=d)
    assert (cfg.run.steps, cfg.run.batch_size, cfg.model.alpha, cfg.model.alpha_start) == (7, 4, 1.25, 1.01)
    assert cfg.run.mesh == "data=2,fsdp=4" and cfg.run.progress is False and cfg.data.path is None
    assert cfg.model.attention == "adasplash" and cfg.run.out == "runs/x" and cfg.task == "lm"
    assert (cfg.optim.lr, cfg.optim.b2) == (0.01, 0.95)
    assert parse_args([], prog="t", description="t", defaults=d) == d


def test_config_is_nested_and_its_types_come_from_the_annotations():
    import typing

    from train.config import OPTIONS, DataConfig, ModelConfig, OptimConfig, RunConfig, flatten

    cfg = TrainConfig()
    assert (type(cfg.model), type(cfg.data), type(cfg.optim), type(cfg.run)) == (ModelConfig, DataConfig,
                                                                                   OptimConfig, RunConfig)
    # every field of every part is an option, under a name unique across the parts
    n_fields = 1 + sum(len(dataclasses.fields(c)) for c in (ModelConfig, DataConfig, OptimConfig, RunConfig))
    assert len(OPTIONS) == n_fields and set(flatten(cfg)) == set(OPTIONS)
    assert OPTIONS["data"].section == "data" and OPTIONS["data"].name == "path"
    assert OPTIONS["seed"].type is int and OPTIONS["alpha"].type is float and OPTIONS["alpha"].optional
    assert typing.get_type_hints(RunConfig)["stop_after"] == int | None
    text = open(REPO / "train" / "config.py").read()
    assert "eval(" not in text


def test_bert_task_defaults_come_from_one_parse(monkeypatch):
    import argparse

    from train import bert

    calls = []
    original = argparse.ArgumentParser.parse_args
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    kw = dict(prog="t", description="t", defaults=bert.DEFAULTS, task_defaults=bert.TASK_DEFAULTS)
    mlm = parse_args([], **kw)
    cls = parse_args(["--lr", "5e-4", "--task=classify"], **kw)  # --task after other options, `=` form
    assert (mlm.task, mlm.run.out, mlm.optim.lr, mlm.run.eval_batches) == ("mlm", "runs/bert", 2e-3, 4)
    assert (cls.task, cls.run.out, cls.optim.lr, cls.run.eval_batches) == ("classify", "runs/bert-classify", 5e-4, 16)
    assert len(calls) == 2  # one parse per command line
    assert not hasattr(bert, "_task_of")
    with pytest.raises(SystemExit) as e:
        parse_args(["--task", "lm"], **kw)
    assert e.value.code == 2


@pytest.mark.slow
def test_optimizer_is_built_from_its_own_config():
    from train.config import OptimConfig

    o = OptimConfig(lr=1e-2, grad_clip=0.0, weight_decay=0.0)
    tx = o.build(total_steps=10)
    params = {"w": jax.numpy.ones((2, 2)), "b": jax.numpy.ones(2)}
    state = tx.init(params)
    grads = jax.tree.map(jax.numpy.ones_like, params)
    updates, _ = tx.update(grads, state, params)
    assert float(updates["w"][0, 0]) == 0.0  # warm-up starts at lr 0
    assert float(o.schedule(10)(o.warmup_steps if o.warmup_steps < 9 else 9)) > 0


def test_parse_mesh():
    assert parse_mesh(None) == {"data": 1, "fsdp": 1}
    assert parse_mesh("data=2,fsdp=4") == {"data": 2, "fsdp": 4}
    assert parse_mesh("fsdp=8") == {"data": 1, "fsdp": 8}
    for bad in ("data=2,model=2", "data=x", "data=0"):
        with pytest.raises(ConfigError) as e:
            parse_mesh(bad)
        assert e.value.field == "mesh"


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(lr=0.0), "lr"),
        (dict(lr=-1e-3), "lr"),
        (dict(alpha=1.0), "alpha"),
        (dict(alpha=0.5), "alpha"),
        (dict(alpha=1.0, attention="softmax"), "alpha"),
        (dict(alpha=1.5, attention="softmax"), "alpha"),
        (dict(alpha=1.00000001), "alpha"),
        (dict(alpha=2.5), "alpha"),
        (dict(alpha_start=1 + 1e-9), "alpha_start"),
        (dict(seed=-1), "seed"),
        (dict(lr=float("inf")), "lr"),
        (dict(lr=float("nan")), "lr"),
        (dict(b1=1.5), "b1"),
        (dict(b2=-0.5), "b2"),
        (dict(weight_decay=-1.0), "weight_decay"),
        (dict(grad_clip=float("nan")), "grad_clip"),
        (dict(min_lr_ratio=float("nan")), "min_lr_ratio"),
        (dict(dropout=float("nan")), "dropout"),
        (dict(init_from="/nonexistent/checkpoint"), "init_from"),
        (dict(alpha_start=1.0), "alpha_start"),
        (dict(batch_size=12, mesh="data=8"), "batch_size"),
        (dict(batch_size=8, grad_accum=2, mesh="data=2,fsdp=4"), "batch_size"),
        (dict(data="/nonexistent/corpus.txt"), "data"),
        (dict(seq_len=100_000), "seq_len"),
        (dict(preset="enormous"), "preset"),
        (dict(task="mlm", preset="gpt2"), "preset"),
        (dict(mesh="data=16"), "mesh"),
        (dict(attention="linear"), "attention"),
    ],
)
def test_bad_config_fails_before_compiling(tmp_path, monkeypatch, overrides, field):
    def no_compile(*a, **k):
        raise AssertionError("something was jit-compiled before validation")

    monkeypatch.setattr(jax, "jit", no_compile)
    with pytest.raises(ConfigError) as e:
        make_task(cfg_for(tmp_path, **overrides), log=lambda *_: None)
    assert e.value.field == field
    assert str(e.value).startswith(field + ":")


@pytest.mark.slow
def test_cli_bad_config_exit_status_and_message(tmp_path):
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "train.gpt2", "--lr", "-1", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2
    assert "lr:" in p.stderr and "learning rate" in p.stderr
    assert not (tmp_path / "r").exists()  # nothing was started
    assert time.time() - t0 < 60


# ------------------------------------------------------------------------------------------------------ data


@pytest.mark.slow
def test_stdlib_corpus_split_is_deterministic_and_disjoint(tmp_path):
    c1 = load_corpus(cache_dir=tmp_path, log=lambda *_: None)
    assert c1.cache_path is not None and c1.cache_path.exists()
    c2 = load_corpus(cache_dir=tmp_path, log=lambda *_: None)  # from the cache
    np.testing.assert_array_equal(c1.train, c2.train)
    np.testing.assert_array_equal(c1.val, c2.val)
    assert c1.vocab_size == 256 and len(c1.val) > 10_000 and len(c1.train) > 20 * len(c1.val)
    # documents are whole files, each on one side of the split
    root, files = list_documents(None)
    assert all(f.suffix == ".py" and "site-packages" not in f.parts and "test" not in f.parts for f in files)
    files = [f for f in files if f.stat().st_size]
    val_files = [f for f in files if is_val_document(str(f.relative_to(root)), 0.05)]
    assert len(c1.val_docs) == len(val_files) and len(c1.train_docs) == len(files) - len(val_files)
    assert 0.01 < len(val_files) / len(files) < 0.15
    for (s, e), f in zip(c1.val_docs[:5], val_files[:5]):
        assert bytes(c1.val[s:e].astype(np.uint8)) == f.read_bytes()
    assert set(c1.train_labels) & set(c1.val_labels)  # packages appear on both sides


def test_data_folder_and_text_file(tmp_path):
    d = tmp_path / "corpus"
    (d / "a").mkdir(parents=True)
    (d / "b").mkdir()
    for i in range(12):
        (d / "a" / f"{i}.txt").write_text(f"alpha {i} " * 200)
        (d / "b" / f"{i}.txt").write_text(f"beta {i} " * 200)
    c = load_corpus(str(d), cache_dir=tmp_path / "cache", log=lambda *_: None)
    assert len(c.train_docs) + len(c.val_docs) == 24 and len(c.val_docs) >= 1
    one = tmp_path / "one.txt"
    one.write_text("hello world\n" * 500)
    c1 = load_corpus(str(one), cache_dir=tmp_path / "cache", val_fraction=0.1, log=lambda *_: None)
    assert len(c1.val) == 600 and len(c1.train) == 5400
    assert bytes(c1.train[:12].astype(np.uint8)) == b"hello world\n"


def test_batches_depend_only_on_seed_and_step(tmp_path):
    c = load_corpus(cache_dir=tmp_path, log=lambda *_: None)
    lm = LMBatches(c, 16, seed=3)
    a, b = lm.train_batch(5, 4), LMBatches(c, 16, seed=3).train_batch(5, 4)
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    np.testing.assert_array_equal(a["input_ids"][:, 1:], a["targets"][:, :-1])
    assert not np.array_equal(a["input_ids"], lm.train_batch(6, 4)["input_ids"])


def test_mlm_masking(tmp_path):
    from train.data import BERT_SPECIALS

    c = load_corpus(specials=BERT_SPECIALS, cache_dir=tmp_path, log=lambda *_: None)
    m = MLMBatches(c, 128, seed=0, mlm_prob=0.15)
    b = m.train_batch(0, 64)
    tok = c.tokenizer
    assert (b["input_ids"][:, 0] == tok.token_id("[CLS]")).all()
    w = b["weights"].astype(bool)
    assert 0.10 < w.mean() < 0.20
    assert (b["input_ids"][~w][b["input_ids"][~w] < 256] == b["targets"][~w][b["input_ids"][~w] < 256]).all()
    masked = (b["input_ids"] == tok.token_id("[MASK]"))
    assert not masked[~w].any() and 0.7 < masked[w].mean() < 0.9


def test_classification_labels_are_real(tmp_path):
    from train.data import BERT_SPECIALS

    c = load_corpus(specials=BERT_SPECIALS, cache_dir=tmp_path, log=lambda *_: None)
    cb = ClassifyBatches(c, 64, seed=0, num_labels=8)
    root, files = list_documents(None)
    by_pkg = {}
    for f in files:
        by_pkg.setdefault(label_of(str(f.relative_to(root))), []).append(f.read_bytes())
    b = cb.train_batch(0, 16)
    for ids, mask, y in zip(b["input_ids"], b["attention_mask"], b["targets"]):
        snippet = bytes(ids[1:mask.sum()].astype(np.uint8))
        pkg = cb.classes[y]
        assert any(snippet in text for text in by_pkg[pkg]), pkg
    v = cb.val_batch(0, 16, 1)
    assert sorted(set(v["targets"].tolist())) == list(range(8))


def test_bpe_tokenizer(tmp_path):
    pytest.importorskip("tokenizers")  # the `bpe` extra (transformers brings it in the `test` extra)
    d = tmp_path / "txt"
    d.mkdir()
    (d / "a.txt").write_text("def function(argument):\n    return argument + 1\n" * 300)
    c = load_corpus(str(d), tokenizer="bpe", bpe_vocab_size=300, cache_dir=tmp_path / "cache",
                    log=lambda *_: None)
    assert isinstance(c.tokenizer, BPETokenizer) and c.vocab_size <= 300
    assert len(c.train) < 0.5 * (len((d / "a.txt").read_bytes()) * 0.95)  # merges compress
    assert c.tokenizer.decode(c.train[:20]).startswith("def function(argument)")
    c2 = load_corpus(str(d), tokenizer="bpe", bpe_vocab_size=300, cache_dir=tmp_path / "cache",
                     log=lambda *_: None)
    np.testing.assert_array_equal(c.train, c2.train)


# ------------------------------------------------------------------------------------------------ schedules


def test_alpha_annealing_schedule():
    cfg = make_config(steps=100, alpha=1.5, alpha_start=1.01, alpha_anneal_steps=50)
    assert cfg.alpha_at(0) == pytest.approx(1.01)
    assert cfg.alpha_at(25) == pytest.approx(1.01 + 0.49 * 0.5)
    assert cfg.alpha_at(50) == cfg.alpha_at(99) == pytest.approx(1.5)
    assert make_config(alpha=1.7).alpha_at(3) == 1.7
    assert make_config().alpha_at(3) == 1.5  # the default α
    assert make_config(attention="softmax").alpha_at(3) is None


def test_learning_rate_warmup_then_cosine():
    cfg = make_config(steps=110, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    sched = cfg.optim.schedule(cfg.run.steps)
    assert float(sched(0)) == 0.0
    assert float(sched(5)) == pytest.approx(0.5e-3)
    assert float(sched(10)) == pytest.approx(1e-3)
    mid = 10 + 50  # half-way through the 100 decay steps: cos term is 0
    assert float(sched(mid)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-5)
    assert float(sched(110)) == pytest.approx(1e-4, rel=1e-5)
    assert math.isclose(float(sched(10 + 25)), 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + math.cos(math.pi / 4)),
                        rel_tol=1e-5)


def test_fsdp_spec_rule():
    from jax.sharding import PartitionSpec as P

    assert fsdp_spec((64, 256), 4) == P(None, "fsdp")
    assert fsdp_spec((256, 64), 4) == P("fsdp", None)
    assert fsdp_spec((3, 5), 4) == P()
    assert fsdp_spec((), 4) == P()
    assert fsdp_spec((64, 256), 1) == P()


def test_config_is_a_dataclass():
    from train.config import override

    assert dataclasses.is_dataclass(TrainConfig)
    assert override(TrainConfig(), steps=3).run.steps == 3
    with pytest.raises(TypeError, match="unknown"):
        override(TrainConfig(), stepz=3)


@pytest.mark.slow
def test_init_from_a_hugging_face_folder(tmp_path):
    from flax import nnx

    from train.config import override

    from models import GPT2Config, GPT2LMHeadModel, save_pretrained

    src = GPT2LMHeadModel(GPT2Config.preset("tiny", vocab_size=256, n_positions=64), rngs=nnx.Rngs(7))
    save_pretrained(src, str(tmp_path / "hf"))
    cfg = cfg_for(tmp_path, init_from=str(tmp_path / "hf"), preset="not-used-with-init-from")
    model = make_task(cfg, log=lambda *_: None).build_model(cfg, nnx.Rngs(0))
    assert isinstance(model, GPT2LMHeadModel) and model.config.attention == "entmax"
    np.testing.assert_array_equal(np.asarray(model.wte.embedding[...]),
                                  np.asarray(src.wte.embedding[...]))
    with pytest.raises(ConfigError) as e:
        make_task(override(cfg, seq_len=128), log=lambda *_: None)
    assert e.value.field == "seq_len"
    small = GPT2LMHeadModel(GPT2Config.preset("tiny", vocab_size=128), rngs=nnx.Rngs(0))
    save_pretrained(small, str(tmp_path / "small_vocab"))
    with pytest.raises(ConfigError) as e:
        make_task(override(cfg, init_from=str(tmp_path / "small_vocab")), log=lambda *_: None)
    assert e.value.field == "init_from"


def test_positions_override_and_its_validation():
    from train.config import validate
    from train.tasks import gpt2_config

    cfg = make_config(preset="tiny", positions=512, seq_len=400)
    assert gpt2_config(cfg, 256).n_positions == 512
    with pytest.raises(ValueError, match="positions"):
        validate(make_config(positions=0), num_devices=1)
    with pytest.raises(ValueError, match="positions"):
        validate(make_config(positions=512, init_from=str(REPO)), num_devices=1)


def test_presets_are_the_models_presets():
    from models import BertConfig, GPT2Config
    from train.tasks import bert_config, gpt2_config

    g = gpt2_config(make_config(preset="tiny"), 256)
    assert (g.n_positions, g.n_embd, g.n_layer, g.n_head, g.vocab_size) == (256, 64, 2, 4, 256)
    b = bert_config(make_config(task="mlm", preset="small"), 260)
    assert (b.max_position_embeddings, b.hidden_size, b.num_hidden_layers, b.intermediate_size) == (512, 256, 4, 1024)
    big = gpt2_config(make_config(preset="gpt2"), 256)
    assert big == GPT2Config.preset("gpt2", vocab_size=256, attention="entmax", alpha=1.5)
    assert bert_config(make_config(task="mlm", preset="bert-base"), 260) == BertConfig.preset(
        "bert-base", vocab_size=260, attention="entmax", alpha=1.5)
    text = open(REPO / "train" / "config.py").read() + open(REPO / "train" / "tasks.py").read()
    assert "ATTENTIONS =" not in text and "GPT2_PRESETS" not in text
