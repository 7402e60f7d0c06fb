"""lkconv.precision: the TF32 setting read and set through either PyTorch API, never raising."""
import pytest
import torch

from lkconv.precision import conv_tf32_enabled, tf32

from cases import legacy_tf32_flags


@pytest.fixture(autouse=True)
def _restore(restore_precision_flags):  # every test here sets flags
    yield


def test_tf32_context_keeps_the_legacy_getters_working():
    """A user on the legacy API (the default) can still read allow_tf32 after lkconv's tf32() block."""
    assert legacy_tf32_flags() is not None
    for enabled in (True, False):
        with tf32(enabled):
            assert conv_tf32_enabled() is enabled
            assert torch.backends.cudnn.allow_tf32 is enabled
        assert legacy_tf32_flags() is not None


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
