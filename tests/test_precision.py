"""lkconv.precision: the TF32 setting read and set through either PyTorch API, never raising."""
import pytest
import torch

from lkconv.precision import conv_tf32_enabled, tf32


@pytest.fixture(autouse=True)
def restore_flags():
    conv, mm = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    old = (conv.fp32_precision, mm.fp32_precision, torch.backends.cudnn.fp32_precision)
    yield
    conv.fp32_precision, mm.fp32_precision, torch.backends.cudnn.fp32_precision = old


def test_new_api_is_read_without_the_legacy_getter_raising():
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    with pytest.raises(RuntimeError, match="TF32"):
        torch.backends.cudnn.allow_tf32  # noqa: B018  -- what lkconv must not do
    assert conv_tf32_enabled() is False
    torch.backends.cudnn.conv.fp32_precision = "tf32"
    assert conv_tf32_enabled() is True


def test_inheritance_and_legacy_flag():
    torch.backends.cudnn.conv.fp32_precision = "none"
    torch.backends.cudnn.fp32_precision = "tf32"
    assert conv_tf32_enabled() is True  # conv inherits from cudnn
    torch.backends.cudnn.fp32_precision = "none"
    assert conv_tf32_enabled() is False  # nothing says tf32: IEEE
    torch.backends.cudnn.allow_tf32 = True
    assert conv_tf32_enabled() is True and torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    assert conv_tf32_enabled() is False


@pytest.mark.parametrize("start", ["tf32", "ieee", "none"])
def test_tf32_context_sets_and_restores(start):
    torch.backends.cudnn.conv.fp32_precision = start
    for enabled in (True, False):
        with tf32(enabled):
            assert conv_tf32_enabled() is enabled
        assert torch.backends.cudnn.conv.fp32_precision == start
    with pytest.raises(ZeroDivisionError):
        with tf32(True):
            1 / 0
    assert torch.backends.cudnn.conv.fp32_precision == start
