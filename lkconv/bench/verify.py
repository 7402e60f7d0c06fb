"""``python -m lkconv verify``: every available backend against the fp64 reference on a small
curated case list (lkconv.testing.compare_all_passes); exit code 1 on any failure."""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence

import torch

__all__ = ["VERIFY_CASES", "run_verify"]

#: id -> (shape N,C,H,W, kernel (KH,KW), kwargs of depthwise_conv2d, layout)
VERIFY_CASES = {
    "k3": ((2, 3, 9, 8), (3, 3), dict(padding=1), "nchw"),
    "k7-bias": ((2, 5, 11, 10), (7, 7), dict(padding=3, bias=True), "nchw"),
    "k13-same": ((1, 3, 14, 15), (13, 13), dict(padding="same"), "nchw"),
    "k31-gt-H": ((1, 2, 9, 11), (31, 31), dict(padding=15), "nchw"),
    "even-k4-same": ((2, 3, 9, 10), (4, 4), dict(padding="same"), "nchw"),
    "rect-3x11": ((1, 3, 10, 16), (3, 11), dict(padding=(1, 5)), "nchw"),
    "stride2": ((2, 3, 13, 12), (5, 5), dict(stride=2, padding=2), "nchw"),
    "dil2": ((1, 3, 15, 14), (3, 3), dict(dilation=2, padding=2), "nchw"),
    "channels_last": ((2, 5, 9, 9), (7, 7), dict(padding=3), "channels_last"),
    "noncontig-slice": ((2, 4, 10, 10), (5, 5), dict(padding=2), "slice"),
}


def _make(shape, k, layout, dtype, device, bias: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    N, C, H, W = shape
    if layout == "slice":
        big = torch.randn(N, C + 2, H + 3, W + 5, generator=gen)
        x = big[:, 1:C + 1, 2:H + 2, 3:W + 3]
    else:
        x = torch.randn(N, C, H, W, generator=gen)
    w = torch.randn(C, 1, *k, generator=gen) / (k[0] * k[1]) ** 0.5
    b = torch.randn(C, generator=gen) if bias else None
    x = x.to(device=device, dtype=dtype)
    if layout == "slice":  # convert the big buffer, then slice: x stays a strided view
        big = big.to(device=device, dtype=dtype)
        x = big[:, 1:C + 1, 2:H + 2, 3:W + 3]
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    w = w.to(device=device, dtype=dtype)
    b = None if b is None else b.to(device=device, dtype=dtype)
    return x, w, b


def run_verify(backends: Optional[Sequence[str]] = None, devices: Optional[Sequence[str]] = None,
               dtypes: Optional[Dict[str, Sequence[str]]] = None, cases: Optional[Sequence[str]] = None,
               log=print) -> List[Dict]:
    """Rows {backend, device, dtype, case, status (pass/FAIL/skip/unavailable), detail}."""
    import lkconv
    from lkconv.backends import BackendError, resolve_backend
    from lkconv.params import normalize_params
    from lkconv.testing import compare_all_passes

    status = lkconv.backend_status()
    backends = list(backends) if backends else [b for b in status if b != "reference"]
    if devices is None:
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    dmap = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}
    if dtypes is None:
        dtypes = {"cpu": ["fp32", "fp64"], "cuda": ["fp32", "fp16", "bf16"]}
    case_ids = list(cases) if cases else list(VERIFY_CASES)
    rows = []
    for be in backends:
        if be not in status:
            rows.append(dict(backend=be, device="-", dtype="-", case="-", status="FAIL",
                             detail=f"unknown backend (registered: {sorted(status)})"))
            continue
        if status[be]:
            rows.append(dict(backend=be, device="-", dtype="-", case="-", status="unavailable", detail=status[be]))
            continue
        for dev in devices:
            for dn in dtypes.get(dev, ["fp32"]):
                for cid in case_ids:
                    shape, k, kw, layout = VERIFY_CASES[cid]
                    kw = dict(kw)
                    bias = kw.pop("bias", False)
                    row = dict(backend=be, device=dev, dtype=dn, case=cid, status="", detail="")
                    x, w, b = _make(shape, k, layout, dmap[dn], dev, bias, seed=len(rows))
                    p = normalize_params(kw.get("stride", 1), kw.get("padding", 0), kw.get("dilation", 1), k)
                    try:
                        resolve_backend(be, x, w, p)
                    except (BackendError, ValueError, TypeError) as e:
                        row.update(status="skip", detail=str(e).replace("lkconv: ", "")[:200])
                        rows.append(row)
                        continue
                    t0 = time.perf_counter()
                    try:
                        res = compare_all_passes(be, x, w, b, **kw)
                        ok = all(r.ok for r in res)
                        row.update(status="pass" if ok else "FAIL", detail="; ".join(str(r) for r in res))
                    except Exception as e:  # a crash is a failure, reported
                        row.update(status="FAIL", detail=f"{type(e).__name__}: {e}"[:300])
                    row["seconds"] = time.perf_counter() - t0
                    rows.append(row)
    return rows


def format_verify(rows: List[Dict]) -> str:
    header = ["backend", "device", "dtype", "case", "status", "detail"]
    body = [[r["backend"], r["device"], r["dtype"], r["case"], r["status"],
             (r["detail"] if r["status"] != "pass" else "")] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    fmt = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(b) for b in body])
