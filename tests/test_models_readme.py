"""Every python block of models/README.md runs as written, each on its own, and prints something."""

import contextlib
import io
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "models" / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 3


@pytest.mark.slow  # each block builds and compiles a model (~10-30 s on 2 busy cores)
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs_and_prints(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "plot_attention" in BLOCKS[index]:
        pytest.importorskip("matplotlib")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(BLOCKS[index], f"models/README.md block {index}", "exec"), {"__name__": "__readme__"})
    assert out.getvalue().strip(), "the block printed nothing"
