"""Finding the compile tools of the ``aot`` extra, with a message that names the extra when one is missing."""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import os
import re
import shutil
import subprocess
from pathlib import Path

EXTRA_HINT = 'pip install -e ".[aot]"  (or: pip install "adasplash-jax[aot]")'
PLUGIN = "jax-cuda13-plugin"
PJRT = "jax-cuda13-pjrt"
MIN_CUDA = 13


class AotToolsMissing(RuntimeError):
    """The ``aot`` extra (XLA's CUDA plugin at the jaxlib version, ptxas ≥ 13, nvdisasm) is not installed."""


@dataclasses.dataclass(frozen=True)
class Tools:
    ptxas: str
    nvdisasm: str | None
    cuobjdump: str | None
    ptxas_version: str
    plugin_version: str
    jaxlib_version: str


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _candidate_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("ADASPLASH_CUDA_BIN"):
        dirs.append(Path(os.environ["ADASPLASH_CUDA_BIN"]))
    try:  # the nvidia-cuda-nvcc / -nvdisasm / -cuobjdump wheels put their binaries in nvidia/cu13/bin
        import nvidia  # namespace package

        for root in nvidia.__path__:
            dirs.append(Path(root) / f"cu{MIN_CUDA}" / "bin")
    except ImportError:
        pass
    return dirs


def _find(name: str) -> str | None:
    for d in _candidate_dirs():
        if (d / name).is_file() and os.access(d / name, os.X_OK):
            return str(d / name)
    return shutil.which(name)


def _release(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


@functools.lru_cache(maxsize=None)
def find_tools(sass: bool = True) -> Tools:
    """The tools the ``aot`` extra installs, checked; raises :class:`AotToolsMissing` naming what is missing."""
    import jaxlib

    problems = []
    jaxlib_version = jaxlib.__version__
    plugin, pjrt = _version(PLUGIN), _version(PJRT)
    for name, have in ((PLUGIN, plugin), (PJRT, pjrt)):
        if have is None:
            problems.append(f"{name}=={jaxlib_version} is not installed")
        elif have != jaxlib_version:
            problems.append(f"{name} {have} does not match jaxlib {jaxlib_version}")
    ptxas = _find("ptxas")
    ptxas_version = "none"
    if ptxas is None:
        problems.append(f"ptxas (nvidia-cuda-nvcc>={MIN_CUDA}) not found")
    else:
        ptxas_version = _release(ptxas)
        major = ptxas_version.split(".")[0]
        if not major.isdigit() or int(major) < MIN_CUDA:
            problems.append(f"ptxas {ptxas} is release {ptxas_version}; XLA's Triton emits PTX that needs ≥ {MIN_CUDA}")
    nvdisasm, cuobjdump = _find("nvdisasm"), _find("cuobjdump")
    if sass and nvdisasm is None:
        problems.append(f"nvdisasm (nvidia-cuda-nvdisasm>={MIN_CUDA}) not found")
    if problems:
        raise AotToolsMissing(
            "ahead-of-time GPU compilation needs the `aot` extra: " + EXTRA_HINT + "\n  - " + "\n  - ".join(problems)
        )
    return Tools(ptxas, nvdisasm, cuobjdump, ptxas_version, plugin, jaxlib_version)


def tools_available(sass: bool = True) -> tuple[bool, str]:
    try:
        find_tools(sass)
    except AotToolsMissing as e:
        return False, str(e)
    return True, ""
