import os

import pytest
import torch

# Without a GPU the Triton kernels run under Triton's CPU interpreter, which must be chosen before
# anything imports triton (triton reads TRITON_INTERPRET when the kernels are decorated).  Setting it
# here, before any test module is imported, makes the outcome independent of the order the test
# files run in (tests/test_backend_triton.py used to set it itself, too late when another file had
# loaded the kernels first).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    # small, reproducible CPU runs; the CI box has 2 cores
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
