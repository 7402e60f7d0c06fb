"""Review checks of small_plane_gw_rows_kernel (csrc/dwconv_small_plane_gw_rows.cu) that the value emulation in
tests/test_small_plane_gw_rows.py does not make by itself.

CPU (CI):
* the kernel's own per-lane expressions (ldmatrix row addresses a_lane / b_lane, cp.async shared-memory offsets)
  are read from the .cu source and evaluated here, so the emulation provably uses the kernel's lane -> row
  mapping (not an idealised one);
* every ldmatrix.x4.trans row address is 16-byte aligned, inside its plane, and the 8 rows of each matrix
  (one shared-memory phase) fall on distinct 16-byte bank groups, for every admitted H, Ho, buffer, k step, oh
  and dh offset;
* the cp.async vectors of every VE and width stage each plane element exactly once, only columns < w, with
  destinations aligned to the vector;
* the GPU test matrix runs every <T, VE> instantiation, with cp.async (VE > 1) through the double buffer;
* measured-static (nvcc + cuobjdump, skipped without them): in the sm_90 SASS of every instantiation the
  cp.async waits (DEPBAR.LE SB0 1 after the in-loop commit, 0 on the last chunk) precede the barrier that opens
  a round, no copy is issued between that barrier and the round's closing barrier, the epilogue's Rs stores
  follow the closing barrier, and the copy width is the VE's.  The check reads the linear SASS order: another
  nvcc that lays the blocks out differently fails it, and then the order is to be re-read, not the test relaxed.

GPU (``-m gpu``): the case that takes VE = 4 (W = 16, Wo = 12) with a two-chunk double buffer, which
tests/test_small_plane_gw_rows.py's GPU cases do not reach.
"""
import os
import re

import pytest
import torch

from lkconv.params import normalize_params
from lkconv.testing import reference_all_passes, tolerance

from cases import load_emulation, requires_cuda_backend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMU = load_emulation()
SRC = open(os.path.join(ROOT, "csrc", "dwconv_small_plane_gw_rows.cu")).read()


def _c_expr(name):
    """the right-hand side of `const uint32_t <name> = (uint32_t)(...);` in the kernel, as a Python expression"""
    m = re.search(r"\b%s = \(uint32_t\)(\(.*?\));" % name, SRC)
    assert m, name
    return m.group(1).replace("p.ypi", "ypi").replace("p.xpi", "xpi")


def test_lane_addresses_are_the_kernels():
    a_src, b_src = _c_expr("a_lane"), _c_expr("b_lane")
    for H in (1, 9, 14, 16):
        for Ho in (1, 7, 14, 16):
            p = EMU.gr_plan(64, 8, H, Ho, 2 * H - 1, H - 1)
            a_emu, b_emu = EMU.gr_lane_offsets(p)
            env = dict(xpi=p["xpi"], ypi=p["ypi"])
            for lane in range(32):
                env["lane"] = lane
                assert eval(a_src, {}, env) == 2 * a_emu[lane]  # bytes in the kernel, elements in the emulation
                assert eval(b_src, {}, env) == 2 * b_emu[lane]


def test_cp_async_offsets_are_the_kernels():
    m = re.search(r"soff\[k\] = u < nv \? (.*?) : -1;", SRC)
    assert m
    expr = m.group(1)
    # global side: image byte offset lane * 2 VE + k * 64 VE = 2 VE (lane + 32 k) = 2 VE u
    assert "lane * (2 * VE)" in SRC and "sp + k * 64 * VE" in SRC
    for ve in (2, 4, 8):
        for w in range(ve, 17, ve):
            for rows in (1, 5, 16):
                emu = EMU._gr_offsets(ve, w, rows)
                nvw = w // ve
                for lane in range(32):
                    for k in range(4):
                        u = lane + 32 * k
                        r = u // nvw
                        want = eval(expr, {}, dict(u=u, r=r, nvw=nvw, VE=ve)) if u < nvw * rows else -1
                        assert want == (2 * emu[lane][k] if emu[lane][k] >= 0 else -1)


def test_cp_async_vectors_cover_each_plane_element_once_aligned():
    for ve in (2, 4, 8):
        for w in range(ve, 17, ve):
            for rows in range(1, 17):
                offs = EMU._gr_offsets(ve, w, rows)
                seen = []
                for lane in range(32):
                    for k in range(4):
                        so = offs[lane][k]
                        if so < 0:
                            continue
                        u = lane + 32 * k
                        assert (2 * so) % (2 * ve) == 0  # destination aligned to the cp.async size
                        r, q0 = divmod(u * ve, w)  # the global element u * VE of the flat plane
                        assert so == r * 16 + q0  # lands on (row r, column q0) of the 16-wide smem row
                        seen.extend(so + e for e in range(ve))
                assert sorted(seen) == [r * 16 + q for r in range(rows) for q in range(w)]
    # the bases the offsets are added to are 16-byte aligned (image pitch, Ys start, stage)
    for H in range(1, 17):
        for Ho in range(1, 17):
            p = EMU.gr_plan(64, 8, H, Ho, 2 * H - 1, H - 1)
            assert (2 * p["xpi"]) % 16 == 0 and (2 * p["ypi"]) % 16 == 0 and p["stage_bytes"] % 16 == 0
            assert (2 * EMU.GR_MB * p["xpi"]) % 16 == 0


def test_ldmatrix_rows_aligned_in_plane_conflict_free():
    for H in range(1, 17):
        for Ho in range(1, 17):
            p = EMU.gr_plan(64, 8, H, Ho, 2 * H - 1, H - 1)
            a_l, b_l = EMU.gr_lane_offsets(p)
            st, ys = p["stage_bytes"], 2 * EMU.GR_MB * p["xpi"]
            a_k, b_k = 32 * p["ypi"], 32 * p["xpi"]
            for buf in (0, 1):
                for ks in (0, 1):
                    for oh in range(Ho):  # the kernel's ao: Ys row oh of images 16 ks .. 16 ks + 15
                        addrs = [buf * st + ys + 2 * a + oh * 32 + ks * a_k for a in a_l]
                        _check_phases(addrs, buf * st + ys, 2 * EMU.GR_MB * p["ypi"])
                    for ih in range(H):  # oh + d0 + j = ih: the kernel's bo + j * 32
                        addrs = [buf * st + 2 * b + ih * 32 + ks * b_k for b in b_l]
                        _check_phases(addrs, buf * st, ys)


def _check_phases(addrs, lo, size):
    for a in addrs:
        assert a % 16 == 0 and lo <= a and a + 16 <= lo + size
    for mi in range(4):  # lanes 8 mi .. 8 mi + 7 address matrix mi: one phase, 8 rows of 16 bytes
        assert len({(a // 16) % 8 for a in addrs[8 * mi:8 * mi + 8]}) == 8


# ------------------------------------------------------------------------------------------------
# machine code (measured-static): the cp.async wait / barrier order of the double buffer, which the sequential
# emulation cannot see
# ------------------------------------------------------------------------------------------------
def _sass_events(tmp_path, arch=90):
    import subprocess

    from lkconv.static import compile as SC
    from lkconv.static.tools import find_tool

    why = SC.cuda_unavailable_reason()
    if why:
        pytest.skip(why)
    be = SC.load_build_env()
    cub = str(tmp_path / "gr.cubin")
    cmd = [find_tool("nvcc"), "-cubin", f"-arch=sm_{arch}", *be.nvcc_flags(), "-std=c++17", "-I",
           os.path.join(ROOT, "csrc"), *sum((["-I", i] for i in SC._cuda_includes()), []),
           os.path.join(ROOT, "csrc", "dwconv_small_plane_gw_rows.cu"), "-o", cub]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    sass = subprocess.run([find_tool("cuobjdump"), "-sass", cub], capture_output=True, text=True,
                          timeout=300).stdout
    funcs, cur = {}, None
    for line in sass.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            cur = m.group(1) if "small_plane_gw_rows_kernel" in m.group(1) else None
            if cur:
                funcs[cur] = []
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", line)
        if cur and m:
            funcs[cur].append((m.group(2), m.group(3).strip()))
    return funcs


def test_sass_double_buffer_waits_before_barriers(tmp_path):
    funcs = _sass_events(tmp_path)
    assert len(funcs) == 8, sorted(funcs)  # <__half | __nv_bfloat16, 1 | 2 | 4 | 8>
    width = {8: "LDGSTS.E.128", 4: "LDGSTS.E.64", 2: "LDGSTS.E"}
    for name, ev in funcs.items():
        ve = int(re.search(r"Li(\d+)E", name).group(1))
        ops = [o for o, _ in ev]
        assert not {"LDL", "STL"} & set(ops), name
        bars = [i for i, o in enumerate(ops) if o.startswith("BAR.SYNC")]
        ldsm = [i for i, o in enumerate(ops) if o.startswith("LDSM")]
        sts = [i for i, o in enumerate(ops) if o.startswith("STS")]
        assert len(bars) == 3 and ldsm and sts, name
        # round: [staging, wait] -> barrier -> ldmatrix / mma -> barrier; epilogue Rs stores -> barrier -> tap sums
        assert bars[0] < ldsm[0] and ldsm[-1] < bars[1] < min(s for s in sts if s > bars[1]) < bars[2], name
        assert not any(o.startswith("LDGSTS") for o in ops[bars[0]:]), name  # no copy in flight into a read round
        if ve == 1:
            assert not any(o.startswith(("LDGSTS", "DEPBAR", "LDGDEPBAR")) for o in ops), name
            continue
        copies = {o for o in ops if o.startswith("LDGSTS")}
        assert copies == {width[ve]}, (name, copies)
        waits = [(i, a) for i, (o, a) in enumerate(ev) if o.startswith("DEPBAR")]
        # cp.async.wait_group 1 after the next chunk's commit, wait_group 0 on the last chunk; both before the
        # barrier that opens the round
        assert sorted(a.replace(" ", "") for _, a in waits) == ["SB0,0x0", "SB0,0x1"], (name, waits)
        assert all(i < bars[0] for i, _ in waits), name
        commits = [i for i, o in enumerate(ops) if o == "LDGDEPBAR"]
        w1 = next(i for i, a in waits if a.replace(" ", "") == "SB0,0x1")
        assert len(commits) == 2 and commits[0] < commits[1] < w1, name  # prologue commit; in-loop commit, wait 1
        assert not any(o.startswith("LDGSTS") for o in ops[commits[1]:]), name  # every copy before its commit


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
# (N, C, H, W, KH, KW, padding (t, b, l, r)): W = 16 (x: VE 8), Wo = 12 (dY: VE 4) -> the <T, 4> instantiation;
# C = 512 -> one batch group, N = 36 -> two chunks (32 + 4 images): cp.async through the double buffer
REVIEW_GPU_CASES = {
    "k9_12x16_wo12_vec4": (36, 512, 12, 16, 9, 9, (4, 4, 2, 2)),
}


def _ve(W, Wo):
    return min(EMU.gr_vec(W, True, 8), EMU.gr_vec(Wo, True, 8))


def test_gpu_cases_run_every_instantiation():
    import test_small_plane_gw_rows as base  # its GPU case table (data only)

    seen = {}
    for name, (N, C, H, W, KH, KW, (t, b, l, r)) in list(base.GPU_CASES.items()) + list(REVIEW_GPU_CASES.items()):
        Ho, Wo = H + t + b - KH + 1, W + l + r - KW + 1
        assert EMU.gr_rule(True, 8, N, C, H, W, Ho, Wo, KH, KW, 1, 1, 1, 1, t, l, 163 * 1024), name
        p = EMU.gr_plan(N, C, H, Ho, KH, t)
        seen.setdefault(_ve(W, Wo), []).append(p["cpg"])  # NCHW contiguous, aligned: the launcher's VE
    assert set(seen) == {1, 2, 4, 8}
    assert max(seen[4]) >= 2 and max(seen[8]) >= 2  # cp.async chunks through the double buffer


def test_review_gpu_case_emulated():
    """the GPU case's own instantiation (VE = 4: x 8-wide, dY 4-wide) through the double buffer (one batch
    group, as C = 512 gives on the GPU), one channel, against the fp64 reference"""
    import torch.nn.functional as F

    N, C, H, W, KH, KW, (t, b, l, r) = REVIEW_GPU_CASES["k9_12x16_wo12_vec4"]
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(N, 1, H, W, generator=gen, dtype=torch.float64)
    w = torch.randn(1, 1, KH, KW, generator=gen, dtype=torch.float64, requires_grad=True)
    y = F.conv2d(F.pad(x, (l, r, t, b)), w)
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    (gw_ref,) = torch.autograd.grad(y, (w,), g)
    Ho, Wo = y.shape[2:]
    vx, vg = EMU.gr_vec(W, True, 8), EMU.gr_vec(Wo, True, 8)
    assert (vx, vg) == (8, 4)
    assert EMU.gr_plan(N, 1, H, Ho, KH, t, target_ctas=1)["cpg"] == EMU.gr_plan(N, C, H, Ho, KH, t)["cpg"] == 2
    gw = EMU.emulate_gw_rows(x, g, (H, W, Ho, Wo, KH, KW, 1, 1, 1, 1, t, l), vx, vg, target_ctas=1)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-10, atol=1e-10)


@requires_cuda_backend
@pytest.mark.gpu
@pytest.mark.parametrize("layout", ("nchw", "channels_last"))
@pytest.mark.parametrize("dtype", ("fp16", "bf16"))
@pytest.mark.parametrize("case", list(REVIEW_GPU_CASES))
def test_gw_rows_vec4_double_buffer_vs_reference(case, dtype, layout, monkeypatch):
    monkeypatch.setenv("LKCONV_POISON_OUTPUTS", "1")
    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    N, C, H, W, KH, KW, pad = REVIEW_GPU_CASES[case]
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(N, C, H, W, generator=gen).to(dt).cuda()
    w = torch.randn(C, 1, KH, KW, generator=gen).to(dt).cuda()
    pr = normalize_params(1, pad, 1, (KH, KW))
    st, pd, dl = pr.as_lists()
    t, b, l, r = pad
    Ho, Wo = H + t + b - KH + 1, W + l + r - KW + 1
    g = torch.randn(N, C, Ho, Wo, generator=gen).to(dt).cuda()
    if layout == "channels_last":  # the element path (VE = 1) on the same shape
        x = x.contiguous(memory_format=torch.channels_last)
        g = g.contiguous(memory_format=torch.channels_last)
    ops = torch.ops.lkconv_cuda
    gw = ops.grad_weight(g, x, [C, 1, KH, KW], st, pd, dl, 0)
    gw1 = ops.grad_weight(g, x, [C, 1, KH, KW], st, pd, dl, 1)
    ref = reference_all_passes(x, w, None, pr, g)[2]
    assert torch.isfinite(gw).all()
    tol = tolerance(ref, gw1, dt)
    torch.testing.assert_close(gw.double().cpu(), ref, atol=tol, rtol=0)
    assert torch.equal(gw, ops.grad_weight(g, x, [C, 1, KH, KW], st, pd, dl, 0))
