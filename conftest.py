"""pytest set-up shared by the suite."""

import os

import pytest
import torch  # imports no triton: kernels/ imports it on first use

# Triton reads TRITON_INTERPRET when it is imported, and every @triton.jit kernel is then interpreted or
# compiled for the whole process. Without CUDA the interpreter is the only way to run the kernels (on CPU
# tensors), so it is set there. With CUDA it is left unset: the interpreter would copy CUDA tensors to the
# host and run the kernels in numpy, and the gpu tests would pass without a kernel ever compiled. A value
# set before pytest starts wins either way (TRITON_INTERPRET=1 runs the interpreter tests on a CUDA machine,
# and then skips the gpu ones).
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on", "yes")  # triton's
COMPILED_ON_CUDA = torch.cuda.is_available() and not INTERPRETED


def pytest_collection_modifyitems(config, items):
    """The markers `gpu` and `interpreter` (pyproject.toml) skip a test where it cannot run as meant."""
    no_gpu = pytest.mark.skip(reason="needs a CUDA device, with Triton compiling (TRITON_INTERPRET unset)")
    no_interpreter = pytest.mark.skip(reason="runs Triton on CPU tensors: needs TRITON_INTERPRET=1, which "
                                             "conftest.py sets only without CUDA")
    for item in items:
        if item.get_closest_marker("gpu") and not COMPILED_ON_CUDA:
            item.add_marker(no_gpu)
        if item.get_closest_marker("interpreter") and not INTERPRETED:
            item.add_marker(no_interpreter)
