"""Outputs: console table, CSV, markdown (environment block + summary + full table), PNG plots."""
from __future__ import annotations

import csv
import json
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

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


def to_markdown(rows: Sequence[Dict], env: Dict, title: str = "lkconv benchmark",
                warnings: Optional[Sequence[str]] = None) -> str:
    cuda = bool(env.get("gpu"))
    parts = [f"# {title}", "",
             "Times are medians over repeats (CUDA events with L2 flush on GPU; wall clock on CPU). "
             "FLOPs = 2·N·C·Ho·Wo·KH·KW per pass (×3 for `all` = forward + grad_input + grad_weight). "
             "`vs torch` = torch NCHW time / provider time. Every provider was checked against the fp64 "
             "reference before timing (WRONG = failed, not timed).", "",
             "## Environment", "", format_env_markdown(env), ""]
    if warnings is not None:
        parts += ["## Timing conditions", ""]
        parts += [f"- **warning**: {w}" for w in warnings] if warnings else \
            ["No warning (checked: the spread of every measurement's repeats; on CPU also the load average and "
             "torch threads against the usable cores)."]
        parts += [""]
    un = unavailable_lines(rows)
    if un:
        parts += ["## Unavailable providers", ""] + [f"- {u}" for u in un] + [""]
    parts += ["## Summary (ms, speedup vs torch NCHW)", "", format_summary(rows, markdown=True), "",
              "## All measurements", "", format_table(rows, cuda=cuda, markdown=True), ""]
    if cuda and not env.get("gpu_peak"):
        parts += ["Note: unknown GPU -- no peak table entry, so no % of floor.", ""]
    return "\n".join(parts)


def _shape_key(r: Dict):
    return (int(r["n"]), int(r["c"]), int(r["h"]), int(r["w"]), int(r["kh"]), int(r["kw"]))


def plot_layout(rows: Sequence[Dict]):
    """How to plot these rows: ``("kernel", families)`` when every shape family (same group and
    N, C, H, W) has square kernels at two or more sizes -- x is K and each family gets its own line;
    else ``("shape", labels)`` -- x is the shape itself (categorical, in run order), nothing joined
    across shapes.  ``families`` maps family key -> label ``NxCxHxW``."""
    fam: "OrderedDict[tuple, set]" = OrderedDict()
    labels = OrderedDict()
    for r in rows:
        n, c, h, w, kh, kw = _shape_key(r)
        fam.setdefault((r["group"], n, c, h, w), set()).add((kh, kw))
        labels[r["shape"]] = None
    if fam and all(len(ks) >= 2 and all(kh == kw for kh, kw in ks) for ks in fam.values()):
        return "kernel", OrderedDict((k, f"{k[1]}x{k[2]}x{k[3]}x{k[4]}") for k in fam)
    return "shape", list(labels)


def _plot_title(dtype: str, env: Optional[Dict], what: str) -> str:
    env = env or {}
    dev = env.get("gpu") or f"CPU {env.get('cpu', '?')}, {env.get('torch_threads', '?')} threads"
    commit = env.get("lkconv_commit") or "n/a"
    return (f"lkconv {dtype}: {what}\n{dev}; torch {env.get('torch', '?')}; lkconv commit {commit}; "
            f"{env.get('date_utc', '')}")


def write_plots(rows: Sequence[Dict], out_dir: str, log=print, env: Optional[Dict] = None) -> List[str]:
    """One PNG per dtype, a column per pass: speedup over torch NCHW (top) and median time in ms
    (bottom).  x is the kernel size when the run sweeps K over fixed shape families (one line per
    provider and family), else the shapes themselves (points, never joined across shapes).  The
    title names the shapes, the device, torch and the lkconv commit.  Needs matplotlib (optional):
    returns [] with a message without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        log(f"plots skipped: matplotlib is not available ({type(e).__name__}: {e}); "
            "pip install matplotlib (or lkconv[bench])")
        return []
    ok = [r for r in rows if r["status"] == "ok" and r.get("ms")]
    paths = []
    for dtype in OrderedDict.fromkeys(r["dtype"] for r in ok):
        rd = [r for r in ok if r["dtype"] == dtype]
        passes = list(OrderedDict.fromkeys(r["pass"] for r in rd))
        providers = list(OrderedDict.fromkeys(r["provider"] for r in rd))
        colors = {p: f"C{i % 10}" for i, p in enumerate(providers)}
        mode, layout = plot_layout(rd)
        fig, axes = plt.subplots(2, len(passes), figsize=(5.5 * len(passes), 7.5), squeeze=False)
        for j, pass_ in enumerate(passes):
            rp = [r for r in rd if r["pass"] == pass_]
            for i, (metric, ylabel) in enumerate((("speedup", "speedup vs torch NCHW (x)"),
                                                  ("ms", "median time per call (ms)"))):
                ax = axes[i][j]
                ys_all = []
                if mode == "kernel":
                    styles = ["-", "--", ":", "-."]
                    for fi, (fkey, flabel) in enumerate(layout.items()):
                        for prov in providers:
                            pts = sorted((int(r["kh"]), float(r[metric])) for r in rp
                                         if r["provider"] == prov and r.get(metric)
                                         and (r["group"],) + _shape_key(r)[:4] == fkey)
                            if not pts:
                                continue
                            ys_all += [p[1] for p in pts]
                            label = prov if len(layout) == 1 else f"{prov} [{flabel}]"
                            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=colors[prov],
                                    ls=styles[fi % len(styles)], label=label)
                    ks = sorted({int(r["kh"]) for r in rp})
                    ax.set_xticks(ks)
                    ax.set_xlabel("kernel size K (KH = KW)")
                else:
                    xs = {lab: k for k, lab in enumerate(layout)}
                    width = 0.8 / max(len(providers), 1)
                    for pi, prov in enumerate(providers):
                        pts = [(xs[r["shape"]], float(r[metric])) for r in rp if r["provider"] == prov and r.get(metric)]
                        if not pts:
                            continue
                        ys_all += [p[1] for p in pts]
                        off = (pi - (len(providers) - 1) / 2) * width
                        ax.plot([p[0] + off for p in pts], [p[1] for p in pts], marker="o", ls="none",
                                color=colors[prov], label=prov)
                    ax.set_xticks(range(len(layout)))
                    ax.set_xticklabels(layout, rotation=30, ha="right", fontsize=7)
                    ax.set_xlabel("shape (N x C x H x W, kernel K or KHxKW)")
                if metric == "speedup":
                    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
                pos = [y for y in ys_all if y > 0]
                if metric == "ms" or (pos and max(pos) / min(pos) > 10):  # spanning decades: log scale
                    ax.set_yscale("log")
                ax.set_title(f"{pass_}", fontsize=9)
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
                if ys_all:
                    ax.legend(fontsize=7)
        what = ("vs kernel size, shapes " + ", ".join(layout.values())) if mode == "kernel" else \
            f"{len(layout)} shape(s)"
        fig.suptitle(_plot_title(dtype, env, what), fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"speedup_{dtype}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_results(rows: Sequence[Dict], env: Dict, out_dir: str, plots: bool = True, log=print,
                  title: str = "lkconv benchmark", warnings: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Write results.csv, results.md, env.json (and speedup_<dtype>.png) into ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths: Dict[str, object] = {}
    paths["csv"] = write_csv(rows, os.path.join(out_dir, "results.csv"))
    md = os.path.join(out_dir, "results.md")
    with open(md, "w") as f:
        f.write(to_markdown(rows, env, title, warnings=warnings))
    paths["markdown"] = md
    ej = os.path.join(out_dir, "env.json")
    with open(ej, "w") as f:
        json.dump(env, f, indent=2, default=str)
    paths["env"] = ej
    paths["plots"] = write_plots(rows, out_dir, log=log, env=env) if plots else []
    return paths
