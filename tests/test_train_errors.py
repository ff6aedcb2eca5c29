"""Every data and config error exits 2 with one line naming the field and the path (issue 11, part 7)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import models  # noqa: F401 - imported before jax.jit is patched below (its decorators run at import)
from train import bert, gpt2

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--steps", "2", "--seq-len", "32", "--batch-size", "8", "--no-progress"]


def fails(capsys, tmp_path, *args, cli=gpt2, compiles=False, monkeypatch=None, own_cache=True):
    """Run the CLI in process; return its one line of error output (checking exit status 2 and one line)."""
    if not compiles:
        def no_compile(*a, **k):
            raise AssertionError("something was jit-compiled before the error was found")

        monkeypatch.setattr(jax, "jit", no_compile)
    capsys.readouterr()
    cache = ["--cache-dir", str(tmp_path / "cache")] if own_cache else []  # else the stdlib corpus's usual cache
    status = cli.main([*SMALL, "--out", str(tmp_path / "out"), *cache, *args])
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert not (tmp_path / "out" / "checkpoints").exists()  # no training started
    return lines[0]


@pytest.fixture
def corpus_dirs(tmp_path):
    d = {}
    d["empty"] = tmp_path / "empty"
    d["empty"].mkdir()
    d["hidden"] = tmp_path / "hidden"
    (d["hidden"] / ".git").mkdir(parents=True)
    (d["hidden"] / ".notes.txt").write_text("some text " * 100)
    (d["hidden"] / ".git" / "HEAD").write_text("ref: refs/heads/main\n" * 100)
    d["zero"] = tmp_path / "zero"
    d["zero"].mkdir()
    for i in range(3):
        (d["zero"] / f"{i}.txt").write_bytes(b"")
    d["short"] = tmp_path / "short.txt"
    d["short"].write_text("x" * 40)  # seq_len 32: the 5 % validation tail holds 2 bytes
    d["dangling"] = tmp_path / "dangling.txt"
    os.symlink(tmp_path / "gone.txt", d["dangling"])
    d["dangling_inside"] = tmp_path / "with_link"
    d["dangling_inside"].mkdir()
    (d["dangling_inside"] / "a.txt").write_text("text " * 1000)
    os.symlink(tmp_path / "gone.txt", d["dangling_inside"] / "b.txt")
    return d


@pytest.mark.parametrize("case, words", [
    ("empty", "no files to read"),
    ("hidden", "no files to read (hidden files and folders are skipped)"),
    ("zero", "all 3 files are empty"),
    ("short", "validation split has"),
    ("dangling", "dangling symbolic link"),
    ("dangling_inside", "dangling symbolic link"),
])
def test_bad_data_paths(capsys, monkeypatch, tmp_path, corpus_dirs, case, words):
    line = fails(capsys, tmp_path, "--data", str(corpus_dirs[case]), monkeypatch=monkeypatch,
                 compiles=case == "short")
    assert line.startswith("python -m train.gpt2: error: data: ")
    named = corpus_dirs[case] / "b.txt" if case == "dangling_inside" else corpus_dirs[case]
    assert str(named) in line and words in line


def test_dev_null_is_not_a_corpus(capsys, monkeypatch, tmp_path):
    line = fails(capsys, tmp_path, "--data", "/dev/null", monkeypatch=monkeypatch)
    assert "data: /dev/null: not a regular file or a folder" in line


def test_a_file_too_short_for_the_masked_lm_names_data(capsys, monkeypatch, tmp_path, corpus_dirs):
    line = fails(capsys, tmp_path, "--data", str(corpus_dirs["short"]), cli=bert, compiles=True,
                 monkeypatch=monkeypatch)
    assert "error: data: " in line and str(corpus_dirs["short"]) in line and "seq_len" in line


@pytest.mark.parametrize("args, field", [
    (["--seed", "-1"], "seed"),
    (["--lr", "inf"], "lr"),
    (["--lr", "nan"], "lr"),
    (["--b1", "1.5"], "b1"),
    (["--b2", "-0.5"], "b2"),
    (["--weight-decay", "-1"], "weight_decay"),
    (["--grad-clip", "nan"], "grad_clip"),
    (["--alpha", "1.7", "--attention", "softmax"], "alpha"),
    (["--alpha-start", "1.01", "--attention", "softmax"], "alpha_start"),
    (["--alpha", "1.00000001"], "alpha"),
    (["--alpha", "1"], "alpha"),
    (["--alpha", "2.5"], "alpha"),
    (["--alpha-start", "1.000000001"], "alpha_start"),
    (["--steps", "0"], "steps"),
    (["--mesh", "data=3,model=2"], "mesh"),
    (["--preset", "enormous"], "preset"),
    (["--attention", "linear"], "attention"),
])
def test_bad_options(capsys, monkeypatch, tmp_path, args, field):
    line = fails(capsys, tmp_path, *args, monkeypatch=monkeypatch)
    assert line.startswith(f"python -m train.gpt2: error: {field}: "), line


def test_alpha_is_checked_as_the_float32_the_kernels_use(capsys, monkeypatch, tmp_path):
    line = fails(capsys, tmp_path, "--alpha", "1.00000001", monkeypatch=monkeypatch)
    assert "1.00000001" in line and "1.0 in float32" in line


def test_unparsable_option_is_one_line(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        gpt2.main(["--seed", "one", "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seed" in err[0] and "'one'" in err[0]


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    from flax import nnx

    from models import GPT2Config, GPT2LMHeadModel, save_pretrained

    folder = tmp_path_factory.mktemp("hf") / "model"
    save_pretrained(GPT2LMHeadModel(GPT2Config.preset("tiny", vocab_size=256), rngs=nnx.Rngs(0)), str(folder))
    return folder


def test_init_from_a_truncated_safetensors_file(capsys, monkeypatch, tmp_path, saved_model):
    import shutil

    bad = tmp_path / "truncated"
    shutil.copytree(saved_model, bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    line = fails(capsys, tmp_path, "--init-from", str(bad), compiles=True, monkeypatch=monkeypatch,
                 own_cache=False)
    assert line.startswith("python -m train.gpt2: error: init_from: ") and str(bad) in line


def test_init_from_a_broken_config_json(capsys, monkeypatch, tmp_path, saved_model):
    import shutil

    bad = tmp_path / "broken"
    shutil.copytree(saved_model, bad)
    (bad / "config.json").write_text('{"model_type": "gpt2", "n_embd": ')
    line = fails(capsys, tmp_path, "--init-from", str(bad), compiles=True, monkeypatch=monkeypatch,
                 own_cache=False)
    assert line.startswith("python -m train.gpt2: error: init_from: ") and str(bad) in line
    assert "JSONDecodeError" in line


@pytest.mark.slow
def test_cli_data_error_exit_status_and_one_line(tmp_path):
    p = subprocess.run([sys.executable, "-m", "train.gpt2", "--data", "/dev/null", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 2
    errors = [line for line in p.stderr.splitlines() if "error" in line]
    assert errors == ["python -m train.gpt2: error: data: /dev/null: not a regular file or a folder"]
    assert not (tmp_path / "r").exists()
