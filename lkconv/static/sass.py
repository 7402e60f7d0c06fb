"""SASS facts: resource usage (cuobjdump / ptxas -v), loops and the instruction mix of the hot loop.

All numbers here are read from compiler output ("measured-static"); nothing is modelled.
"""
from __future__ import annotations

import re
import subprocess
from collections import Counter
from typing import Dict, List, Optional, Tuple

from .tools import find_tool

__all__ = ["parse_sass", "parse_resource_usage", "parse_ptxas_log", "analyse_function", "classify",
           "disassemble", "resource_usage", "loop_mix"]

_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)")
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRA_TARGET = re.compile(r"\b(?:BRA|BRX|JMP)\b[^;]*?\b0x([0-9a-f]+)")

#: bump when the parsing/classification below changes: cached cubins are then re-analysed
ANALYSIS_VERSION = 2

# opcode classes of the instruction mix (first token of the opcode, before any '.')
TENSOR = {"HMMA", "HGMMA", "IMMA", "BMMA", "DMMA", "UTCHMMA", "UTCQMMA"}
INT_ADDR = {"IMAD", "IADD3", "IADD", "LEA", "SHF", "SHL", "SHR", "LOP3", "LOP", "ISETP", "IABS", "SEL", "MOV",
            "PRMT", "IMNMX", "VIMNMX", "IMUL", "UIMAD", "UIADD3", "ULEA", "USHF", "ULOP3", "UISETP", "USEL",
            "UMOV", "UPRMT", "IDP", "P2R", "R2P", "PLOP3", "FLO", "POPC", "BREV", "I2F", "F2I", "IMNMX", "UIMNMX",
            "S2R", "S2UR", "CS2R", "R2UR", "ISCADD", "LEA.HI", "VIADD", "UVIADD", "MOVM", "SGXT", "BMSK"}
FP = {"FFMA", "FMUL", "FADD", "HFMA2", "HMUL2", "HADD2", "FSEL", "FSETP", "FMNMX", "F2F", "F2FP", "MUFU", "FCHK"}
BARRIER = {"BAR"}                                        # CTA barriers (__syncthreads, bar.sync)
SYNC = {"WARPGROUP", "DEPBAR", "SYNCS", "ARRIVES", "WARPSYNC", "BSYNC"}  # async/warp/convergence waits


def disassemble(cubin_path: str) -> str:
    tool = find_tool("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found (CUDA toolkit or triton's bundled copy)")
    return subprocess.run([tool, "-sass", cubin_path], capture_output=True, text=True, check=True,
                          timeout=300).stdout


def resource_usage(cubin_path: str) -> Dict[str, Dict[str, int]]:
    tool = find_tool("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found")
    out = subprocess.run([tool, "--dump-resource-usage", cubin_path], capture_output=True, text=True, check=True,
                         timeout=300).stdout
    return parse_resource_usage(out)


def parse_resource_usage(text: str) -> Dict[str, Dict[str, int]]:
    """``{mangled name: {REG, STACK, SHARED, LOCAL, ...}}`` from ``cuobjdump --dump-resource-usage``."""
    res: Dict[str, Dict[str, int]] = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r"\s*Function\s+(\S+):", line)
        if m:
            cur = m.group(1)
            res[cur] = {}
            continue
        if cur is not None:
            for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line):
                res[cur][k] = int(v)
    return res


def parse_ptxas_log(text: str) -> Dict[str, Dict[str, int]]:
    """``{mangled name: {regs, spill_stores, spill_loads, stack, barriers}}`` from ``ptxas -v``."""
    res: Dict[str, Dict[str, int]] = {}
    cur = None
    for line in text.splitlines():
        m = re.search(r"Function properties for (\S+)", line) or re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            cur = m.group(1)
            res.setdefault(cur, {})
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            res[cur].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            res[cur]["regs"] = int(m.group(1))
        m = re.search(r"used (\d+) barriers", line)
        if m:
            res[cur]["barriers"] = int(m.group(1))
    return res


def parse_sass(text: str) -> Dict[str, List[Tuple[int, str, str]]]:
    """``{mangled name: [(address, opcode, full instruction text)]}`` from ``cuobjdump -sass``."""
    funcs: Dict[str, List[Tuple[int, str, str]]] = {}
    cur = None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            cur = m.group(1)
            funcs[cur] = []
            continue
        if cur is None:
            continue
        m = _INSTR.match(line)
        if m:
            body = m.group(2)
            toks = body.split()
            if toks and toks[0].startswith("@"):
                toks = toks[1:]
            if not toks:
                continue
            funcs[cur].append((int(m.group(1), 16), toks[0], body))
    return funcs


def classify(opcode: str, text: str = "") -> List[str]:
    """Mix categories one instruction counts in (several may apply: LDG.E.U16 is ldg and ldg_16)."""
    base = opcode.split(".")[0]
    parts = opcode.split(".")
    cats = []
    if base in TENSOR:
        cats.append("tensor")
        cats.append(base.lower())
    elif base == "LDSM":
        cats.append("ldsm")
    elif base == "LDGSTS":
        cats.append("cp_async")
    elif base in ("UTMALDG", "UBLKCP", "UTMASTG", "UTMAPF"):
        cats.append("tma")
    elif base == "LDG":
        cats.append("ldg")
        width = 4
        for p in parts[1:]:
            if p in ("U8", "S8"):
                width = 1
            elif p in ("U16", "S16"):
                width = 2
            elif p == "64":
                width = 8
            elif p == "128":
                width = 16
        cats.append(f"ldg_{8 * width}")
    elif base == "LD":
        cats.append("ld_generic")
    elif base == "STG":
        cats.append("stg")
    elif base == "STS":
        cats.append("sts")
    elif base == "LDS":
        cats.append("lds")
    elif base in ("STL", "LDL"):
        cats.append("local")
    elif base == "FFMA":
        cats.append("ffma")
        cats.append("fp")
    elif base in FP:
        cats.append("fp")
    elif base in BARRIER:
        cats.append("barrier")
    elif base in SYNC:
        cats.append("sync")
    elif base in INT_ADDR or base.startswith("U") and base[1:] in INT_ADDR:
        cats.append("int_addr")
    elif base in ("BRA", "EXIT", "BSSY", "RET", "CALL", "BRX", "JMP", "NOP", "YIELD"):
        cats.append("control")
    else:
        cats.append("other")
    return cats


def loop_mix(instrs: List[Tuple[int, str, str]], lo: int, hi: int, exclude=()) -> Counter:
    """Instruction mix of the instructions with address in [lo, hi] (minus nested ranges ``exclude``)."""
    mix: Counter = Counter()
    for addr, op, text in instrs:
        if addr < lo or addr > hi or any(a <= addr <= b for a, b in exclude):
            continue
        if op == "NOP":
            continue
        mix["total"] += 1
        for c in classify(op, text):
            mix[c] += 1
    return mix


def analyse_function(instrs: List[Tuple[int, str, str]]) -> Dict:
    """Loops (backward branches) with their own instruction mix (nested loops excluded), and the
    whole function's mix."""
    loops = []
    seen = set()
    for addr, op, text in instrs:
        if op.split(".")[0] not in ("BRA", "BRX", "JMP"):
            continue
        m = _BRA_TARGET.search(text)
        if not m:
            continue
        target = int(m.group(1), 16)
        if target <= addr and (target, addr) not in seen:
            seen.add((target, addr))
            loops.append([target, addr])
    # merge loops that share a head (several back edges: one loop)
    by_head: Dict[int, int] = {}
    for lo, hi in loops:
        by_head[lo] = max(hi, by_head.get(lo, hi))
    spans = sorted(by_head.items())
    out = []
    for lo, hi in spans:
        children = [(a, b) for a, b in spans if lo <= a and b <= hi and (a, b) != (lo, hi)]
        # direct children only (exclude each child's whole range, nested ones inside it included)
        direct = [(a, b) for a, b in children
                  if not any(c_lo <= a and b <= c_hi and (c_lo, c_hi) != (a, b) for c_lo, c_hi in children)]
        parents = [(a, b) for a, b in spans if a <= lo and hi <= b and (a, b) != (lo, hi)]
        mix = loop_mix(instrs, lo, hi, exclude=direct)
        out.append(dict(lo=lo, hi=hi, depth=len(parents), innermost=not children, children=direct,
                        mix=dict(mix)))
    whole = loop_mix(instrs, 0, 1 << 62)
    return dict(loops=out, mix=dict(whole), n_instr=whole.get("total", 0))


def hot_loop(analysis: Dict) -> Optional[Dict]:
    """The loop whose body issues the kernel's math: most tensor ops, else most FFMA, else the biggest
    innermost loop."""
    loops = analysis["loops"]
    if not loops:
        return None
    for key in ("tensor", "ffma"):
        cands = [lp for lp in loops if lp["mix"].get(key, 0) > 0]
        if cands:
            return max(cands, key=lambda lp: (lp["mix"][key], -lp["mix"]["total"]))
    inner = [lp for lp in loops if lp["innermost"]] or loops
    return max(inner, key=lambda lp: lp["mix"].get("total", 0))
