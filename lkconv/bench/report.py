"""Outputs: console table, CSV, markdown (environment block + summary + full table), PNG plots."""
from __future__ import annotations

import csv
import json
import os
from collections import OrderedDict
from typing import Dict, List, Sequence

from .env import format_env_markdown
from .runner import ROW_FIELDS

__all__ = ["write_csv", "read_csv", "format_table", "format_summary", "to_markdown", "write_plots",
           "write_results", "unavailable_lines"]


def write_csv(rows: Sequence[Dict], path: str) -> str:
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=ROW_FIELDS)
        wr.writeheader()
        for r in rows:
            wr.writerow({k: r.get(k, "") for k in ROW_FIELDS})
    return path


def read_csv(path: str) -> List[Dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _num(v) -> str:
    """Readable fixed-point numbers (no exponent for anything a benchmark produces)."""
    v = float(v)
    a = abs(v)
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _rate(r: Dict, cuda: bool) -> str:
    if not r.get("gflops"):
        return ""
    g = float(r["gflops"])
    return _num(g / 1e3) if cuda else _num(g)


def unavailable_lines(rows: Sequence[Dict]) -> List[str]:
    seen = OrderedDict()
    for r in rows:
        if r["status"] == "unavailable" and r["provider"] not in seen:
            seen[r["provider"]] = r["note"]
    return [f"{p}: unavailable: {why}" for p, why in seen.items()]


def _table(header: List[str], body: List[List[str]], markdown: bool) -> str:
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
        return "\n".join(out)
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]
    fmt = lambda row: "  ".join(c.rjust(w) if i >= 4 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(r) for r in body])


def format_table(rows: Sequence[Dict], cuda: bool = False, markdown: bool = False) -> str:
    """One line per measured (or declined) case; unavailable providers are listed separately."""
    unit = "TFLOP/s" if cuda else "GFLOP/s"
    header = ["shape", "dtype", "pass", "provider", "ms", "min-max", unit, "GB/s"]
    if cuda:
        header += ["% floor"]
    header += ["vs torch", "status"]
    body = []
    for r in rows:
        if r["status"] == "unavailable":
            continue
        ok = r["status"] == "ok"
        line = [r["shape"], r["dtype"], r["pass"], r["provider"],
                _num(r["ms"]) if ok else "",
                f"{_num(r['ms_min'])}-{_num(r['ms_max'])}" if ok else "",
                _rate(r, cuda), _num(r["gbps"]) if r.get("gbps") else ""]
        if cuda:
            line += [r.get("pct_floor") or ""]
        status = r["status"] if ok else f"{r['status']}: {r['note']}"
        if not markdown and len(status) > 70:
            status = status[:67] + "..."
        line += [f"{_num(r['speedup'])}x" if r.get("speedup") else "", status]
        body.append(line)
    return _table(header, body, markdown)


def format_summary(rows: Sequence[Dict], markdown: bool = False) -> str:
    """Pivot: one line per (shape, dtype, pass), one column per provider: "ms (speedup x)"."""
    providers = list(OrderedDict.fromkeys(r["provider"] for r in rows if r["status"] != "unavailable"))
    keys = list(OrderedDict.fromkeys((r["shape"], r["dtype"], r["pass"]) for r in rows))
    cell = {}
    for r in rows:
        k = (r["shape"], r["dtype"], r["pass"], r["provider"])
        if r["status"] == "ok":
            s = f"{_num(r['ms'])} ms"
            if r.get("speedup") and r["provider"] != "torch":
                s += f" ({_num(r['speedup'])}x)"
            cell[k] = s
        elif r["status"] in ("WRONG", "error", "skipped"):
            cell[k] = r["status"]
        else:
            cell[k] = "n/a"
    header = ["shape", "dtype", "pass"] + providers
    body = [[s, d, p] + [cell.get((s, d, p, prov), "") for prov in providers] for s, d, p in keys]
    return _table(header, body, markdown)


def to_markdown(rows: Sequence[Dict], env: Dict, title: str = "lkconv benchmark") -> str:
    cuda = bool(env.get("gpu"))
    parts = [f"# {title}", "",
             "Times are medians over repeats (CUDA events with L2 flush on GPU; wall clock on CPU). "
             "FLOPs = 2·N·C·Ho·Wo·KH·KW per pass (×3 for `all` = forward + grad_input + grad_weight). "
             "`vs torch` = torch NCHW time / provider time. Every provider was checked against the fp64 "
             "reference before timing (WRONG = failed, not timed).", "",
             "## Environment", "", format_env_markdown(env), ""]
    un = unavailable_lines(rows)
    if un:
        parts += ["## Unavailable providers", ""] + [f"- {u}" for u in un] + [""]
    parts += ["## Summary (ms, speedup vs torch NCHW)", "", format_summary(rows, markdown=True), "",
              "## All measurements", "", format_table(rows, cuda=cuda, markdown=True), ""]
    if cuda and not env.get("gpu_peak"):
        parts += ["Note: unknown GPU -- no peak table entry, so no % of floor.", ""]
    return "\n".join(parts)


def write_plots(rows: Sequence[Dict], out_dir: str, log=print) -> List[str]:
    """speedup over torch NCHW vs kernel size, one PNG per dtype with a subplot per pass; a line per
    (provider, shape group).  Needs matplotlib (optional): returns [] with a message without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        log(f"plots skipped: matplotlib is not available ({type(e).__name__}: {e}); pip install matplotlib")
        return []
    ok = [r for r in rows if r["status"] == "ok" and r.get("speedup")]
    paths = []
    for dtype in OrderedDict.fromkeys(r["dtype"] for r in ok):
        rd = [r for r in ok if r["dtype"] == dtype]
        passes = list(OrderedDict.fromkeys(r["pass"] for r in rd))
        fig, axes = plt.subplots(1, len(passes), figsize=(5 * len(passes), 4), squeeze=False)
        for ax, pass_ in zip(axes[0], passes):
            series = OrderedDict()
            for r in rd:
                if r["pass"] == pass_:
                    series.setdefault((r["provider"], r["group"]), []).append((int(r["kh"]), float(r["speedup"])))
            for (prov, group), pts in series.items():
                pts.sort()
                label = prov if len({g for _, g in series}) == 1 else f"{prov} [{group}]"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
            ax.axhline(1.0, color="gray", lw=0.8, ls="--")
            ys = [p[1] for pts in series.values() for p in pts if p[1] > 0]
            if ys and max(ys) / min(ys) > 10:  # speedups spanning decades: log scale
                ax.set_yscale("log")
            ax.set_title(f"{dtype} {pass_}")
            ax.set_xlabel("kernel size K")
            ax.set_ylabel("speedup vs torch NCHW")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out_dir, f"speedup_{dtype}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_results(rows: Sequence[Dict], env: Dict, out_dir: str, plots: bool = True, log=print,
                  title: str = "lkconv benchmark") -> Dict[str, object]:
    """Write results.csv, results.md, env.json (and speedup_<dtype>.png) into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths: Dict[str, object] = {}
    paths["csv"] = write_csv(rows, os.path.join(out_dir, "results.csv"))
    md = os.path.join(out_dir, "results.md")
    with open(md, "w") as f:
        f.write(to_markdown(rows, env, title))
    paths["markdown"] = md
    ej = os.path.join(out_dir, "env.json")
    with open(ej, "w") as f:
        json.dump(env, f, indent=2, default=str)
    paths["env"] = ej
    paths["plots"] = write_plots(rows, out_dir, log=log) if plots else []
    return paths
