"""Model-level benchmark: RepLKNet images/s for a training step and for inference (before and after
re-parameterization), per lkconv backend, against the same model on PyTorch's ``nn.Conv2d``.

    # GPU (the target: RepLKNet-31B, 224x224, batch 64, bf16 autocast)
    python benchmarks/bench_models.py --device cuda
    # CPU (defaults: replknet_tiny at 64x64, batch 8, fp32)
    python benchmarks/bench_models.py --device cpu
    python benchmarks/bench_models.py --device cpu --model 31b --image-size 96 --batch-size 2 --iters 2

Variants: every lkconv backend that is available for the device (cuda: cuda, triton, torch;
cpu: cpu, torch) and ``nn.Conv2d`` (all lkconv modules swapped for plain ``nn.Conv2d`` sharing the
weights, i.e. cuDNN / oneDNN).  Modes: ``train`` (forward + cross-entropy + backward + SGD step, train
mode), ``infer`` (eval, no_grad, training structure), ``deploy`` (eval, no_grad, after
``lkconv.reparameterize``).  Prints a table and writes CSV + markdown (``--out``).
"""
from __future__ import annotations

import argparse
import copy
import csv
import datetime
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import lkconv  # noqa: E402
from lkconv.models import create_model, set_model_backend, to_nn_conv2d  # noqa: E402

BASELINE = "nn.Conv2d"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: auto (cuda when visible)")
    p.add_argument("--model", default=None, help="default: 31b on cuda, tiny on cpu")
    p.add_argument("--image-size", type=int, default=None, help="default: 224 on cuda, 64 on cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: 64 on cuda, 8 on cpu")
    p.add_argument("--num-classes", type=int, default=1000, help="default: 1000")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="autocast dtype (fp32: no autocast); default bf16 on cuda, fp32 on cpu")
    p.add_argument("--backends", default=None,
                   help=f"comma list of lkconv backends and/or {BASELINE!r}; default: all available + baseline")
    p.add_argument("--modes", default="train,infer,deploy", help="default: train,infer,deploy")
    p.add_argument("--warmup", type=int, default=None, help="default 3 (cuda) / 1 (cpu)")
    p.add_argument("--iters", type=int, default=None, help="default 10 (cuda) / 3 (cpu)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="default: on for cuda, off for cpu")
    p.add_argument("--use-checkpoint", action="store_true", help="activation checkpointing (less memory)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (cpu)")
    p.add_argument("--out", default=None,
                   help="results folder for results.csv and results.md; unset: "
                   "bench_results/models-<device>-<date>/ under the current directory")
    return p.parse_args(argv)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time(fn, dev, warmup, iters):
    for _ in range(warmup):
        fn()
    _sync(dev)
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(dev)
    return (time.perf_counter() - t) / iters


def build(args, variant, dev):
    torch.manual_seed(0)
    m = create_model(args.model, num_classes=args.num_classes, use_checkpoint=args.use_checkpoint)
    if variant == BASELINE:
        to_nn_conv2d(m)
    else:
        set_model_backend(m, variant)
    m.to(dev)
    if args.channels_last:
        m.to(memory_format=torch.channels_last)
    return m


def run_variant(args, variant, dev, amp):
    """{mode: seconds per iteration or an error string}"""
    B, S = args.batch_size, args.image_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 3, S, S, generator=g).to(dev)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.num_classes, (B,), generator=g).to(dev)
    ac = dict(device_type=dev.type, dtype=amp or torch.float32, enabled=amp is not None)
    out = {}
    model = build(args, variant, dev)
    modes = args.modes.split(",")
    if "train" in modes:
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step():
            with torch.autocast(**ac):
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        out["train"] = _guard(lambda: _time(step, dev, args.warmup, args.iters), dev)
        del opt
    model.eval()

    def infer(m):
        def f():
            with torch.no_grad(), torch.autocast(**ac):
                m(x)
        return f

    if "infer" in modes:
        out["infer"] = _guard(lambda: _time(infer(model), dev, args.warmup, args.iters), dev)
    if "deploy" in modes:
        dep = copy.deepcopy(model)
        lkconv.reparameterize(dep)
        if variant == BASELINE:
            to_nn_conv2d(dep)
        else:
            set_model_backend(dep, variant)
        with torch.no_grad():
            d = (dep(x[:2]).float() - model(x[:2]).float()).abs().max().item()
        out["deploy_maxdiff"] = d
        out["deploy"] = _guard(lambda: _time(infer(dep), dev, args.warmup, args.iters), dev)
        del dep
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _guard(fn, dev):
    try:
        return fn()
    except torch.cuda.OutOfMemoryError:
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return "out of memory"
    except Exception as e:  # a backend that fails is a result to report, not a crash
        traceback.print_exc(file=sys.stderr)
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


def main(argv=None):
    args = parse(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_models: --device cuda but CUDA is not available")
    gpu = args.device == "cuda"
    args.model = args.model or ("31b" if gpu else "tiny")
    args.image_size = args.image_size or (224 if gpu else 64)
    args.batch_size = args.batch_size or (64 if gpu else 8)
    args.dtype = args.dtype or ("bf16" if gpu else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.iters = args.iters or (10 if gpu else 3)
    if args.channels_last is None:
        args.channels_last = gpu
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.dtype]

    status = lkconv.backend_status()
    if args.backends:
        variants = [v.strip() for v in args.backends.split(",") if v.strip()]
    else:
        chain = ["cuda", "triton", "torch"] if gpu else ["cpu", "torch"]
        variants = [b for b in chain if b in status] + [BASELINE]
    dev_name = torch.cuda.get_device_name(dev) if gpu else (platform.processor() or platform.machine())
    meta = (f"{args.model}, {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.dtype}, "
            f"{'channels_last' if args.channels_last else 'NCHW'}"
            f"{', checkpointing' if args.use_checkpoint else ''}; {dev_name}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; warmup {args.warmup}, iters {args.iters}; "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"bench_models: {meta}", flush=True)
    from lkconv.bench.timing import format_warnings, load_snapshot, timing_warnings

    before = load_snapshot()

    rows = []
    for v in variants:
        if v != BASELINE and status.get(v, "unknown backend") is not None:
            why = status.get(v, "unknown backend")
            rows.append(dict(variant=v, note=f"unavailable: {why}"))
            print(f"  {v}: unavailable ({why})", flush=True)
            continue
        t0 = time.perf_counter()
        res = run_variant(args, v, dev, amp)
        row = dict(variant=v, note="")
        for mode in ("train", "infer", "deploy"):
            r = res.get(mode)
            if isinstance(r, float):
                row[f"{mode}_img_s"] = args.batch_size / r
                row[f"{mode}_ms"] = 1e3 * r
            elif r is not None:
                row["note"] += f"{mode}: {r}; "
        if "deploy_maxdiff" in res:
            row["deploy_maxdiff"] = res["deploy_maxdiff"]
        rows.append(row)
        print(f"  {v}: done in {time.perf_counter() - t0:.1f}s "
              + " ".join(f"{k}={row[k]:.1f}" for k in row if k.endswith("img_s")), flush=True)

    base = next((r for r in rows if r["variant"] == BASELINE), None)
    for r in rows:
        for mode in ("train", "infer", "deploy"):
            k = f"{mode}_img_s"
            if base and k in r and k in base:
                r[f"{mode}_speedup"] = r[k] / base[k]

    cols = ["variant", "train_img_s", "train_speedup", "infer_img_s", "infer_speedup", "deploy_img_s",
            "deploy_speedup", "train_ms", "infer_ms", "deploy_ms", "deploy_maxdiff", "note"]

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 0.01 else f"{v:.2f}"
        return "" if v is None else str(v)

    head = ["variant", "train img/s", "x vs nn.Conv2d", "infer img/s", "x vs nn.Conv2d", "deploy img/s",
            "x vs nn.Conv2d", "deploy max|diff|", "note"]
    keys = ["variant", "train_img_s", "train_speedup", "infer_img_s", "infer_speedup", "deploy_img_s",
            "deploy_speedup", "deploy_maxdiff", "note"]
    table = [head] + [[fmt(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    print()
    for i, row in enumerate(table):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))

    warnings = timing_warnings([], before, load_snapshot(), device=dev.type)
    for line in format_warnings(warnings):
        print(line)
    out_dir = args.out or os.path.join(
        "bench_results", f"models-{args.device}-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, "results")
    with open(out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols + ["config"])
        w.writeheader()
        for r in rows:
            w.writerow({**{k: r.get(k, "") for k in cols}, "config": meta})
    with open(out + ".md", "w") as f:
        f.write(f"# RepLKNet model benchmark\n\n{meta}\n\n")
        f.write("".join(f"- **warning**: {w}\n" for w in warnings) + ("\n" if warnings else ""))
        f.write("| " + " | ".join(head) + " |\n|" + "|".join("---" for _ in head) + "|\n")
        for row in table[1:]:
            f.write("| " + " | ".join(c.replace("|", "/") for c in row) + " |\n")
    print(f"\nwrote {out}.csv and {out}.md")
    return rows


if __name__ == "__main__":
    main()
