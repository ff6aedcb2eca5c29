import os

# CPU tests get 8 virtual devices so that sharding can be exercised (no effect on GPUs).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The aot extra (in .[test] on Python 3.11) installs XLA's CUDA plugin; without a GPU it fails to
# initialise at the first backend call and logs a cuDNN traceback in every test process.
if "JAX_PLATFORMS" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["JAX_PLATFORMS"] = "cpu"

# pytest runs one worker process per core (pyproject's addopts): on a GPU machine they share the
# device, so none may take most of its memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU backend (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def persistent_compilation_cache(tmp_path_factory):
    """For modules whose tests compile the same programs again and again (a fresh jit per training
    run): share them through JAX's persistent compilation cache, in a temporary folder, for that
    module only. Use with ``pytestmark = pytest.mark.usefixtures("persistent_compilation_cache")``."""
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    yield
    for n, v in old.items():
        jax.config.update(n, v)


@pytest.fixture
def x64():
    """jax_enable_x64 on for one test."""
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", False)
