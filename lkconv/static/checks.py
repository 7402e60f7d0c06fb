"""Static CI checks over compiler facts: zero spills, shared memory fits, and 16-bit tensor-core
kernels fed by LDSM or TMA (not generic loads) and issuing HMMA/HGMMA.  Used by tests/test_static.py."""
from __future__ import annotations

from typing import Dict, List

__all__ = ["SMEM_OPTIN", "spill_problems", "smem_problems", "tensor_core_problems"]

#: max dynamic shared memory per CTA (opt-in), bytes: A100 163 KiB, H100 227 KiB
SMEM_OPTIN = {80: 163 * 1024, 90: 227 * 1024}


def spill_problems(f: Dict) -> List[str]:
    out = []
    if (f.get("spill_stores") or 0) > 0 or (f.get("spill_loads") or 0) > 0:
        out.append(f"{f.get('name', f.get('symbol'))}: {f.get('spill_stores')} B spill stores, "
                   f"{f.get('spill_loads')} B spill loads")
    if f.get("spill_stores") is None:
        out.append(f"{f.get('name', f.get('symbol'))}: no ptxas -v record (cannot prove zero spills)")
    return out


def smem_problems(static_smem: int, dynamic_smem: int, arch: int, name: str) -> List[str]:
    total = (static_smem or 0) + (dynamic_smem or 0)
    if total > SMEM_OPTIN[arch]:
        return [f"{name}: {total} B shared memory > {SMEM_OPTIN[arch]} B (sm_{arch} opt-in limit)"]
    return []


def tensor_core_problems(f: Dict) -> List[str]:
    """The hot loop must issue HMMA/HGMMA and read its operands through LDSM, TMA, or wgmma's shared
    descriptors (HGMMA reads shared memory itself) -- not generic LD."""
    name = f.get("name", f.get("symbol"))
    mix = (f.get("hot") or {}).get("mix", {})
    loops = (f.get("sass") or {}).get("loops", [])
    if not any(lp["mix"].get("tensor") for lp in loops) and (f.get("sass") or {}).get("mix", {}).get("tensor"):
        # straight-line MMAs (the batch-as-rows kernel at one M tile per program): the whole function
        mix = f["sass"]["mix"]
    out = []
    if not (mix.get("hmma") or mix.get("hgmma")):
        out.append(f"{name}: hot loop has no HMMA/HGMMA")
    if not (mix.get("ldsm") or mix.get("tma") or mix.get("hgmma")):
        out.append(f"{name}: tensor-core operands not loaded by LDSM/TMA "
                   f"(generic LD: {mix.get('ld_generic', 0)}, LDS: {mix.get('lds', 0)})")
    if mix.get("ld_generic"):
        out.append(f"{name}: {mix['ld_generic']} generic LD in the hot loop")
    return out
