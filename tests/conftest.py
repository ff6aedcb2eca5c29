import os

# CPU tests get 8 virtual devices so that sharding can be exercised (no effect on GPUs).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# The aot extra (in .[test] on Python 3.11) installs XLA's CUDA plugin; without a GPU it fails to
# initialise at the first backend call and logs a cuDNN traceback in every test process.
if "JAX_PLATFORMS" not in os.environ and not os.path.exists("/dev/nvidiactl"):
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a GPU backend (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
