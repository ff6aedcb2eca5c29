"""Every python block of README.md runs as written (a newcomer's first ten minutes).

Each block runs in a fresh namespace, in a temporary working directory, and must print
something: the blocks show what they compute.
"""

import contextlib
import io
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ["README.md", "models/README.md"]


def python_blocks(doc: str):
    text = (ROOT / doc).read_text()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


# models/README.md's blocks each build and compile a model (10–30 s each on 2 busy cores).
CASES = [pytest.param(doc, i, block, marks=[pytest.mark.slow] if doc.startswith("models/") else [],
                      id=f"{doc}-{i}")
         for doc in DOCS for i, block in enumerate(python_blocks(doc))]


def test_the_docs_have_python_blocks():
    assert len(python_blocks("README.md")) >= 2
    assert len(python_blocks("models/README.md")) >= 3


@pytest.mark.slow
@pytest.mark.parametrize("doc,index,block", CASES)
def test_python_block_runs_and_prints(doc, index, block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if "plot_attention" in block:
        pytest.importorskip("matplotlib")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(block, f"{doc}[block {index}]", "exec"), {"__name__": "__readme__"})
    assert printed.getvalue().strip(), f"{doc} block {index} prints nothing"
