"""Pure transforms: the original structure (plain F.conv2d / F.batch_norm / pooling ops, fp64) equals the
single conv built from the transformed (kernel, bias)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lkconv.reparam import transforms as T
from lkconv.reparam import randomize_bn

DT = torch.float64
TOL = 1e-11


def _close(a, b, tol=TOL):
    err = (a - b).abs().max().item()
    scale = max(1.0, b.abs().max().item())
    assert err <= tol * scale, f"max err {err:.3e} (scale {scale:.2f})"
    return err


def _bn(c, affine=True):
    bn = nn.BatchNorm2d(c, affine=affine).to(DT)
    randomize_bn(bn)
    return bn.eval()


# ---------------------------------------------------------------------------- I: conv + BN
@pytest.mark.parametrize("cin,cout,g,k,with_bias,affine", [
    (4, 6, 1, 3, False, True),
    (6, 6, 3, 5, True, True),
    (5, 5, 5, 7, True, False),
    (3, 7, 1, 1, False, False),
])
def test_fuse_conv_bn(cin, cout, g, k, with_bias, affine):
    w = torch.randn(cout, cin // g, k, k, dtype=DT)
    b = torch.randn(cout, dtype=DT) if with_bias else None
    bn = _bn(cout, affine)
    x = torch.randn(2, cin, 9, 8, dtype=DT)
    ref = bn(F.conv2d(x, w, b, 1, k // 2, 1, g))
    kf, bf = T.fuse_conv_bn(w, b, bn)
    _close(F.conv2d(x, kf, bf, 1, k // 2, 1, g), ref)
    # (scale, shift) form and inputs untouched
    kf2, bf2 = T.fuse_conv_bn(w, b, T.bn_scale_shift(bn))
    assert torch.equal(kf, kf2) and torch.equal(bf, bf2)


def test_fuse_conv_bn_rejects_batch_stats_bn_and_wrong_channels():
    with pytest.raises(ValueError, match="running statistics"):
        T.fuse_conv_bn(torch.randn(4, 1, 3, 3), None, nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match="channels"):
        T.fuse_conv_bn(torch.randn(4, 1, 3, 3), None, nn.BatchNorm2d(5))
    with pytest.raises(ValueError, match="4 dims"):
        T.fuse_conv_bn(torch.randn(4, 3, 3), None, nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="bias"):
        T.fuse_conv_bn(torch.randn(4, 1, 3, 3), torch.randn(3), nn.BatchNorm2d(4))


# ---------------------------------------------------------------------------- II: add
def test_add_branches():
    x = torch.randn(2, 6, 7, 7, dtype=DT)
    ks = [torch.randn(4, 3, 3, 3, dtype=DT) for _ in range(3)]
    bs = [torch.randn(4, dtype=DT), None, torch.randn(4, dtype=DT)]
    ref = sum(F.conv2d(x, k, b, 1, 1, 1, 2) for k, b in zip(ks, bs))
    k, b = T.add_branches(ks, bs)
    _close(F.conv2d(x, k, b, 1, 1, 1, 2), ref)
    with pytest.raises(ValueError, match="pad_kernel"):
        T.add_branches([ks[0], torch.randn(4, 3, 1, 1, dtype=DT)])
    with pytest.raises(ValueError, match="biases"):
        T.add_branches(ks, bs[:2])


# ---------------------------------------------------------------------------- III: 1x1 -> KxK
def _bn_and_pad_ref(y, bn, p):
    """BN then pad with BN(0) (the BNAndPad layer), written out directly."""
    out = bn(y)
    scale, shift = T.bn_scale_shift(bn)
    full = shift.view(1, -1, 1, 1).expand(out.shape[0], -1, out.shape[2] + 2 * p, out.shape[3] + 2 * p).clone()
    full[:, :, p:p + out.shape[2], p:p + out.shape[3]] = out
    return full


@pytest.mark.parametrize("c,d,e,g,k,s", [
    (4, 6, 5, 1, 3, 1),   # dense, odd channels out
    (6, 6, 6, 3, 5, 1),   # grouped
    (6, 12, 6, 6, 3, 2),  # depthwise-style groups, wider middle, stride 2
    (5, 4, 7, 1, 7, 1),
])
def test_merge_1x1_kxk_bn_and_pad_exact(c, d, e, g, k, s):
    p = k // 2
    k1 = torch.randn(d, c // g, 1, 1, dtype=DT)
    bn1 = _bn(d)
    k2 = torch.randn(e, d // g, k, k, dtype=DT)
    bn2 = _bn(e)
    x = torch.randn(2, c, 8, 9, dtype=DT)
    mid = _bn_and_pad_ref(F.conv2d(x, k1, None, 1, 0, 1, g), bn1, p)
    ref = bn2(F.conv2d(mid, k2, None, s, 0, 1, g))
    k1f, b1f = T.fuse_conv_bn(k1, None, bn1)
    k2f, b2f = T.fuse_conv_bn(k2, None, bn2)
    km, bm = T.merge_1x1_kxk(k1f, b1f, k2f, b2f, groups=g)
    merged = F.conv2d(x, km, bm, s, p, 1, g)
    _close(merged, ref)
    if s == 1:
        # interior pixels (whose KxK window lies inside the image) agree with naive zero padding too
        naive = bn2(F.conv2d(F.pad(bn1(F.conv2d(x, k1, None, 1, 0, 1, g)), [p] * 4), k2, None, 1, 0, 1, g))
        _close(naive[:, :, p:-p, p:-p], merged[:, :, p:-p, p:-p])


def test_merge_1x1_kxk_without_pad_trick_differs_at_borders():
    """The naive structure (zero-pad the BN output) is NOT what the merged conv computes: the
    equivalence check catches it, and only at the border pixels."""
    c, d, e, k = 4, 5, 3, 5
    p = k // 2
    k1 = torch.randn(d, c, 1, 1, dtype=DT)
    bn1 = _bn(d)
    k2 = torch.randn(e, d, k, k, dtype=DT)
    x = torch.randn(1, c, 9, 9, dtype=DT)
    k1f, b1f = T.fuse_conv_bn(k1, None, bn1)
    km, bm = T.merge_1x1_kxk(k1f, b1f, k2, None)
    merged = F.conv2d(x, km, bm, 1, p)
    naive = F.conv2d(F.pad(bn1(F.conv2d(x, k1)), [p] * 4), k2)
    diff = (merged - naive).abs()
    assert diff[:, :, :p, :].min() > 1e-6 and diff[:, :, :, -p:].min() > 1e-6  # every border pixel is off
    assert diff[:, :, p:-p, p:-p].max() < 1e-12  # the interior agrees
    with pytest.raises(AssertionError):
        _close(merged, naive)


def test_merge_1x1_kxk_bad_shapes():
    with pytest.raises(ValueError, match="1x1"):
        T.merge_1x1_kxk(torch.randn(4, 4, 3, 3), None, torch.randn(4, 4, 3, 3), None)
    with pytest.raises(ValueError, match="input channels"):
        T.merge_1x1_kxk(torch.randn(4, 4, 1, 1), None, torch.randn(4, 5, 3, 3), None)
    with pytest.raises(ValueError, match="groups"):
        T.merge_1x1_kxk(torch.randn(4, 4, 1, 1), None, torch.randn(4, 4, 3, 3), None, groups=3)


# ---------------------------------------------------------------------------- IV: concat
def test_concat_branches():
    x = torch.randn(2, 4, 7, 6, dtype=DT)
    k1, k2 = torch.randn(3, 4, 3, 3, dtype=DT), torch.randn(5, 4, 3, 3, dtype=DT)
    b1 = torch.randn(3, dtype=DT)
    ref = torch.cat([F.conv2d(x, k1, b1, 1, 1), F.conv2d(x, k2, None, 1, 1)], 1)
    k, b = T.concat_branches([k1, k2], [b1, None])
    _close(F.conv2d(x, k, b, 1, 1), ref)
    with pytest.raises(ValueError, match="share"):
        T.concat_branches([k1, torch.randn(3, 4, 5, 5, dtype=DT)])


# ---------------------------------------------------------------------------- V: avg pool
@pytest.mark.parametrize("c,g,k,s,p", [(4, 1, 3, 1, 1), (6, 3, 3, 2, 1), (5, 5, (3, 5), 1, 0), (3, 1, 2, 2, 0)])
def test_avgpool_kernel(c, g, k, s, p):
    x = torch.randn(2, c, 9, 10, dtype=DT)
    ref = F.avg_pool2d(x, k, s, p, count_include_pad=True)
    kern = T.avgpool_kernel(c, k, g, dtype=DT)
    assert kern.shape[1] == c // g
    _close(F.conv2d(x, kern, None, s, p, 1, g), ref)


# ---------------------------------------------------------------------------- VI: pad small into large
@pytest.mark.parametrize("small,big", [((3, 3), (7, 7)), ((1, 5), (5, 5)), ((5, 1), (7, 9)), ((2, 4), (6, 8)),
                                       ((3, 3), (3, 3))])
def test_pad_kernel(small, big):
    x = torch.randn(1, 3, 11, 12, dtype=DT)
    ks = torch.randn(2, 3, *small, dtype=DT)
    kb = T.pad_kernel(ks, big)
    assert kb.shape[2:] == big
    # the small kernel with padding p - (K - k)/2 equals the padded kernel with padding p
    ph, pw = big[0] // 2, big[1] // 2
    ref = F.conv2d(x, ks, None, 1, (ph - (big[0] - small[0]) // 2, pw - (big[1] - small[1]) // 2))
    _close(F.conv2d(x, kb, None, 1, (ph, pw)), ref)


@pytest.mark.parametrize("small,big", [((3, 3), (6, 6)), ((2, 2), (5, 5)), ((5, 5), (3, 3)), ((3, 3), (7, 6))])
def test_pad_kernel_refuses_uncentrable(small, big):
    with pytest.raises(ValueError, match="centred|larger"):
        T.pad_kernel(torch.randn(1, 1, *small), big)


# ---------------------------------------------------------------------------- identity
@pytest.mark.parametrize("c,g,k", [(4, 1, 1), (6, 2, 3), (5, 5, 5), (7, 1, (3, 5))])
def test_identity_kernel(c, g, k):
    x = torch.randn(2, c, 6, 7, dtype=DT)
    kk = (k, k) if isinstance(k, int) else k
    ik = T.identity_kernel(c, k, g, dtype=DT)
    assert ik.shape == (c, c // g, *kk)
    assert torch.equal(F.conv2d(x, ik, None, 1, (kk[0] // 2, kk[1] // 2), 1, g), x)


def test_identity_kernel_refuses_even():
    with pytest.raises(ValueError, match="odd"):
        T.identity_kernel(4, 2)
    with pytest.raises(ValueError, match="divide"):
        T.identity_kernel(4, 3, groups=3)


# ---------------------------------------------------------------------------- dilated -> dense
@pytest.mark.parametrize("k,r", [(3, 2), (3, 5), (5, (2, 3)), (1, 4), (4, 2)])
def test_dilated_to_dense(k, r):
    x = torch.randn(1, 4, 15, 16, dtype=DT)
    w = torch.randn(4, 1, k, k, dtype=DT)
    rr = (r, r) if isinstance(r, int) else r
    p = (((k - 1) * rr[0]) // 2, ((k - 1) * rr[1]) // 2)
    ref = F.conv2d(x, w, None, 1, p, rr, 4)
    wd = T.dilated_to_dense(w, r)
    assert wd.shape[2:] == ((k - 1) * rr[0] + 1, (k - 1) * rr[1] + 1)
    _close(F.conv2d(x, wd, None, 1, p, 1, 4), ref)


# ---------------------------------------------------------------------------- groups -> dense
def test_expand_groups():
    x = torch.randn(2, 6, 5, 5, dtype=DT)
    w = torch.randn(9, 2, 3, 3, dtype=DT)
    _close(F.conv2d(x, T.expand_groups(w, 3), None, 1, 1), F.conv2d(x, w, None, 1, 1, 1, 3))


# ---------------------------------------------------------------------------- compactor
@pytest.mark.parametrize("g,with_bn", [(1, True), (2, True), (1, False)])
def test_fuse_compactor(g, with_bn):
    cin, cout, cp = 4, 6, 5
    w = torch.randn(cout, cin // g, 3, 3, dtype=DT)
    q = torch.randn(cp, cout, 1, 1, dtype=DT)
    x = torch.randn(2, cin, 7, 7, dtype=DT)
    y = F.conv2d(x, w, None, 1, 1, 1, g)
    if with_bn:
        bn = _bn(cout)
        y = bn(y)
        k, b = T.fuse_conv_bn(w, None, bn)
    else:
        k, b = w, None
    ref = F.conv2d(y, q)
    kf, bf = T.fuse_compactor(k, b, q, groups=g)
    assert kf.shape == (cp, cin, 3, 3)
    _close(F.conv2d(x, kf, bf, 1, 1), ref)
    assert T.compactor_row_norms(q).shape == (cp,)
    with pytest.raises(ValueError, match="compactor"):
        T.fuse_compactor(k, b, torch.randn(cp, cout + 1, 1, 1, dtype=DT))


# ---------------------------------------------------------------------------- RMNet
@pytest.mark.parametrize("cin,cout,stride", [(4, 4, 1), (3, 3, 1), (4, 6, 2), (5, 6, 1)])
def test_resblock_to_plain(cin, cout, stride):
    k1 = torch.randn(cout, cin, 3, 3, dtype=DT)
    b1 = torch.randn(cout, dtype=DT)
    k2 = torch.randn(cout, cout, 3, 3, dtype=DT)
    b2 = torch.randn(cout, dtype=DT)
    x = torch.randn(2, cin, 9, 8, dtype=DT).relu()  # the output of a previous ReLU
    h = F.relu(F.conv2d(x, k1, b1, stride, 1))
    if stride == 1 and cin == cout:
        short, sc = x, None
    else:
        kp, bp = torch.randn(cout, cin, 1, 1, dtype=DT), torch.randn(cout, dtype=DT)
        short, sc = F.conv2d(x, kp, bp, stride), (kp, bp)
    ref = F.relu(F.conv2d(h, k2, b2, 1, 1) + short)
    (k1p, b1p), (k2p, b2p) = T.resblock_to_plain(k1, b1, k2, b2, sc)
    assert k1p.shape == (cout + cin, cin, 3, 3) and k2p.shape == (cout, cout + cin, 3, 3)
    out = F.relu(F.conv2d(F.relu(F.conv2d(x, k1p, b1p, stride, 1)), k2p, b2p, 1, 1))
    _close(out, ref)
    if sc is None:
        # only exact for non-negative inputs: a negative input breaks it
        xn = -x - 0.1
        refn = F.relu(F.conv2d(F.relu(F.conv2d(xn, k1, b1, 1, 1)), k2, b2, 1, 1) + xn)
        outn = F.relu(F.conv2d(F.relu(F.conv2d(xn, k1p, b1p, 1, 1)), k2p, b2p, 1, 1))
        assert (outn - refn).abs().max() > 1e-3
    if cin != cout:
        with pytest.raises(ValueError, match="identity shortcut"):
            T.resblock_to_plain(k1, b1, k2, b2, None)
