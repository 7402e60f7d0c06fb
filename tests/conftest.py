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


@pytest.fixture
def restore_precision_flags():
    """Put every fp32 precision flag back; if the legacy getters worked before the test, make them
    work again (the new API's setters make them raise until the legacy setters are used)."""
    from cases import PRECISION_FLAGS, legacy_tf32_flags

    old = [getattr(o, a) for o, a in PRECISION_FLAGS]
    legacy = legacy_tf32_flags()
    yield
    for (o, a), v in zip(PRECISION_FLAGS, old):
        setattr(o, a, v)
    if legacy is not None:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = legacy
        assert legacy_tf32_flags() == legacy
