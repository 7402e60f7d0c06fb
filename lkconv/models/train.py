"""Train a RepLKNet on a synthetic dataset, anywhere: AMP, DDP, checkpoint/resume, deploy check.

    python -m lkconv.models.train --steps 20                          # one process, CPU or GPU
    torchrun --nproc_per_node 2 -m lkconv.models.train --steps 20     # DDP (gloo on CPU, nccl on GPU)
    python -m lkconv.models.train --steps 10 --checkpoint ck.pt       # save ...
    python -m lkconv.models.train --steps 20 --checkpoint ck.pt --resume ck.pt   # ... and resume

The dataset is deterministic and learnable: class ``c`` is a coloured sinusoidal grating with a
class-specific orientation and frequency, plus per-image random phase, contrast and noise; image
``i`` has label ``i % num_classes`` and is generated from a seed derived from ``(seed, i)`` on any
rank.  After training, rank 0 re-parameterizes a copy of the model (``lkconv.reparameterize``) and
checks that it gives the same logits and predictions as the trained model in eval mode.

``main(argv)`` returns a process exit code (0: trained and the deploy check passed);
:func:`train` takes the parsed arguments and returns the summary dict.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["main", "train", "build_parser", "SyntheticPatterns"]


class SyntheticPatterns(torch.utils.data.Dataset):
    """Deterministic synthetic images: ``dataset[i] -> (image (C, S, S) float32, label int)``."""

    def __init__(self, num_samples: int, num_classes: int, image_size: int, in_chans: int = 3,
                 seed: int = 0, offset: int = 0):
        if num_samples < 1 or num_classes < 2 or image_size < 4 or in_chans < 1:
            raise ValueError(f"SyntheticPatterns: need num_samples >= 1, num_classes >= 2, image_size >= 4, "
                             f"in_chans >= 1; got {num_samples}, {num_classes}, {image_size}, {in_chans}")
        self.n, self.k, self.s, self.c = num_samples, num_classes, image_size, in_chans
        self.seed, self.offset = seed, offset
        g = torch.Generator().manual_seed(10_007 * seed + 17)
        self.angle = torch.arange(num_classes, dtype=torch.float64) * (math.pi / num_classes)
        self.freq = 2.0 + 3.0 * torch.rand(num_classes, generator=g, dtype=torch.float64)
        self.color = torch.rand(num_classes, in_chans, generator=g, dtype=torch.float64) * 2 - 1
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, image_size, dtype=torch.float64),
                                torch.linspace(-1, 1, image_size, dtype=torch.float64), indexing="ij")
        self.grid = (ys, xs)

    def __len__(self):
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        idx = i + self.offset
        label = idx % self.k
        g = torch.Generator().manual_seed(1_000_003 * (self.seed + 1) + idx)
        phase, contrast = float(torch.rand((), generator=g, dtype=torch.float64)) * 2 * math.pi, \
            0.6 + 0.8 * float(torch.rand((), generator=g, dtype=torch.float64))
        ys, xs = self.grid
        a, f = float(self.angle[label]), float(self.freq[label])
        wave = torch.sin(math.pi * f * (xs * math.cos(a) + ys * math.sin(a)) + phase)
        img = contrast * self.color[label].view(-1, 1, 1) * wave
        img = img + 0.3 * torch.randn(self.c, self.s, self.s, generator=g, dtype=torch.float64)
        return img.float(), label

    def batch(self, indices: Sequence[int]):
        items = [self[i] for i in indices]
        return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" only where there is a default to show (not for unset options)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is argparse.SUPPRESS or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lkconv train", description=__doc__.split("\n\n")[0],
                                formatter_class=_DefaultsFormatter)
    p.add_argument("--model", default="tiny", help="replknet_tiny/tiny, 31b, 31l or xl")
    p.add_argument("--num-classes", type=int, default=4)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--steps", type=int, default=60, help="total optimizer steps (including resumed ones)")
    p.add_argument("--num-samples", type=int, default=1024, help="training set size")
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--drop-path", type=float, default=0.0)
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="auto",
                   help="autocast dtype (auto: bf16 where supported)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto: cuda when visible, else cpu")
    p.add_argument("--backend", default=None,
                   help="lkconv backend of the large kernels; unset: lkconv's default backend (auto)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per process; unset: torch's default (on a busy machine try 1)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--use-checkpoint", action="store_true", help="activation checkpointing per block")
    p.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm (multi-GPU DDP)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", default=None, help="save a checkpoint here at the end (and every --save-every)")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", default=None, help="resume from this checkpoint ('auto': --checkpoint if it exists)")
    p.add_argument("--deploy-out", default=None, help="save the re-parameterized state_dict here")
    p.add_argument("--deploy-tol", type=float, default=1e-4,
                   help="max |train - deploy| logits relative to max |logits| (fp32, eval mode)")
    p.add_argument("--summary-json", default=None, help="write the final summary (rank 0) as JSON")
    p.add_argument("--dump-params", default=None,
                   help="directory: every rank writes its final parameters (rank{r}.pt) -- DDP sync checks")
    p.add_argument("--no-progress", action="store_true")
    return p


def _dist_env():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return world, rank, local


def _amp_dtype(mode: str, device: torch.device) -> Optional[torch.dtype]:
    if mode == "none":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


def _validate(args):
    for name in ("num_classes", "image_size", "batch_size", "steps", "num_samples", "eval_samples"):
        v = getattr(args, name)
        if v < 1:
            raise ValueError(f"lkconv train: --{name.replace('_', '-')} must be >= 1, got {v}")
    if args.num_classes < 2:
        raise ValueError(f"lkconv train: --num-classes must be >= 2, got {args.num_classes}")
    if args.image_size < 16:
        raise ValueError(f"lkconv train: --image-size must be >= 16 (the stem and transitions downsample "
                         f"by 32), got {args.image_size}")
    if args.save_every < 0:
        raise ValueError(f"lkconv train: --save-every must be >= 0, got {args.save_every}")
    if args.save_every and not args.checkpoint:
        raise ValueError("lkconv train: --save-every needs --checkpoint PATH")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"lkconv train: --threads must be >= 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"lkconv train: --device cuda requested but no CUDA device is visible "
                         f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})")
    if args.backend is not None:
        _validate_backend(args.backend, args.device)


def _validate_backend(name: str, device: str) -> None:
    """--backend must name a registered backend that is available and runs the training device's
    large-kernel layers (checked on a zero-storage stand-in: fp32, 13x13 depthwise)."""
    import lkconv
    from lkconv.backends import BackendError, resolve_backend
    from lkconv.params import normalize_params

    if name == "auto":
        return
    status = lkconv.backend_status()
    if name not in status:
        raise ValueError(f"lkconv train: unknown backend {name!r} (argument: --backend); choose auto or one of "
                         f"{', '.join(status)}")
    if status[name]:
        raise ValueError(f"lkconv train: backend {name!r} (argument: --backend) is not available here: {status[name]}")
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")
    x = torch.empty(1, device=dev).expand(2, 8, 16, 16)
    w = torch.empty(1, device=dev).expand(8, 1, 13, 13)
    try:
        resolve_backend(name, x, w, normalize_params(1, 6, 1, (13, 13)))
    except (BackendError, ValueError, TypeError) as e:
        raise ValueError(f"lkconv train: backend {name!r} (argument: --backend) cannot train on {dev.type}: "
                         f"{str(e).replace('lkconv: ', '')}") from None


def train(args: argparse.Namespace) -> Dict:
    """Run the training described by ``args`` (from :func:`build_parser`); returns the summary
    (on every rank; rank 0's has the deploy check)."""
    import torch.distributed as dist

    from .replknet import create_model, set_model_backend

    _validate(args)
    world, rank, local = _dist_env()
    if args.device == "auto":
        dev_type = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        dev_type = args.device
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda", local % max(torch.cuda.device_count(), 1)) if dev_type == "cuda" \
        else torch.device("cpu")
    if dev_type == "cuda":
        torch.cuda.set_device(device)
    distributed = world > 1
    own_pg = False
    if distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev_type == "cuda" else "gloo")
        own_pg = True
    is_main = rank == 0

    try:
        torch.manual_seed(args.seed)
        model = create_model(args.model, num_classes=args.num_classes, drop_path_rate=args.drop_path,
                             use_checkpoint=args.use_checkpoint)
        if args.backend is not None:
            set_model_backend(model, args.backend)
        if args.sync_bn and distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(device)
        mem_fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        if args.channels_last:
            model.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        amp_dtype = _amp_dtype(args.amp, device)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

        start_step = 0
        resume = args.resume
        if resume == "auto":
            resume = args.checkpoint if args.checkpoint and os.path.isfile(args.checkpoint) else None
        if resume:
            if not os.path.isfile(resume):
                raise FileNotFoundError(f"lkconv train: --resume checkpoint not found: {resume!r}")
            ck = torch.load(resume, map_location=device, weights_only=False)
            for key in ("model", "optimizer", "step"):
                if key not in ck:
                    raise ValueError(f"lkconv train: {resume!r} is not a training checkpoint (no {key!r} entry)")
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            if "scaler" in ck and scaler.is_enabled():
                scaler.load_state_dict(ck["scaler"])
            start_step = int(ck["step"])

        ddp_model = model
        if distributed:
            ddp_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if dev_type == "cuda" else None)

        data = SyntheticPatterns(args.num_samples, args.num_classes, args.image_size, seed=args.seed)
        sampler = torch.utils.data.DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=args.seed, drop_last=True)
        per_epoch = max(len(sampler) // args.batch_size, 1)

        def batch_for(step: int):
            sampler.set_epoch(step // per_epoch)
            idx = list(sampler)
            pos = (step % per_epoch) * args.batch_size
            sel = [idx[(pos + j) % len(idx)] for j in range(args.batch_size)]
            return data.batch(sel)

        def save(step: int):
            if is_main:
                tmp = args.checkpoint + ".tmp"
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                            "scaler": scaler.state_dict(), "step": step, "args": vars(args)}, tmp)
                os.replace(tmp, args.checkpoint)
            if distributed:
                dist.barrier()

        progress = None
        if is_main and not args.no_progress and start_step < args.steps:
            from tqdm.auto import tqdm

            progress = tqdm(total=args.steps, initial=start_step, desc=f"train {args.model}",
                            unit="step", dynamic_ncols=True, file=sys.stderr)
        ddp_model.train()
        losses: List[float] = []
        correct = seen = 0
        t_first = t_start = None
        timed_images = 0
        step_s: List[float] = []  # wall time of each timed step (hygiene: spread)
        t_prev = None
        from lkconv.bench.timing import load_snapshot, timing_warnings

        load_before = load_snapshot()
        if dev_type == "cpu":  # DDP on CPU: every local process runs its own torch threads
            load_before["threads"] *= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        for step in range(start_step, args.steps):
            x, y = batch_for(step)
            x = x.to(device, non_blocking=True).contiguous(memory_format=mem_fmt)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                logits = ddp_model(x)
                loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            # metrics, averaged over ranks
            stats = torch.tensor([loss.detach().float().item() * len(y),
                                  (logits.argmax(1) == y).sum().item(), len(y)], dtype=torch.float64)
            if distributed:
                stats = stats.to(device)
                dist.all_reduce(stats)
                stats = stats.cpu()
            losses.append(float(stats[0] / stats[2]))
            correct += int(stats[1])
            seen += int(stats[2])
            if dev_type == "cuda":
                torch.cuda.synchronize(device)
            now = time.perf_counter()
            if t_first is None:
                t_first = now  # the first step (warm-up, kernel selection) is not timed
            else:
                timed_images += int(stats[2])
                step_s.append(now - t_prev)
            t_prev = now
            t_start = t_start or now
            if progress is not None:
                progress.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{correct / max(seen, 1):.2f}")
                progress.update(1)
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
                save(step + 1)
        if progress is not None:
            progress.close()
        elapsed = (time.perf_counter() - t_first) if t_first is not None else 0.0
        if distributed:
            # DDP keeps parameters in sync (gradient all-reduce) but BN running statistics only get
            # rank 0's values at the start of each forward: make every rank end with rank 0's.
            for b in model.buffers():
                dist.broadcast(b, 0)
        if args.checkpoint:
            save(args.steps)

        summary: Dict = {
            "model": args.model, "world_size": world, "device": str(device),
            "amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "none",
            "start_step": start_step, "steps": args.steps, "batch_size_global": args.batch_size * world,
            "final_loss": losses[-1] if losses else None,
            "first_loss": losses[0] if losses else None,
            "train_accuracy": correct / seen if seen else None,
            "images_per_s": timed_images / elapsed if elapsed > 0 and timed_images else None,
            "torch_threads": torch.get_num_threads(),
        }
        summary["timing_warnings"] = _timing_warnings(step_s, load_before, load_snapshot(), device, timing_warnings)

        # parameters identical on every rank?
        flat = torch.cat([p.detach().float().reshape(-1) for p in model.parameters()]).cpu()
        if distributed:
            ref = flat.clone().to(device)
            dist.broadcast(ref, 0)
            diff = (flat - ref.cpu()).abs().max()
            diff = diff.to(device)
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)
            summary["params_max_rank_diff"] = float(diff)
        if args.dump_params:
            os.makedirs(args.dump_params, exist_ok=True)
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                       os.path.join(args.dump_params, f"rank{rank}.pt"))

        if is_main:
            summary.update(_deploy_check(model, args, device, mem_fmt))
            _print_summary(summary)
            if args.summary_json:
                with open(args.summary_json, "w") as f:
                    json.dump(summary, f, indent=2)
        if distributed:
            dist.barrier()
        return summary
    finally:
        if own_pg and dist.is_initialized():
            dist.destroy_process_group()


def _timing_warnings(step_s: List[float], before: Dict, after: Dict, device, timing_warnings) -> List[str]:
    """The benchmark's hygiene checks applied to the training steps: spread of the per-step wall
    times (the fastest and slowest tenth dropped: a checkpoint save is not noise), load average and
    thread oversubscription on CPU."""
    from lkconv.bench.timing import SPREAD_LIMIT, spread

    out = []
    if len(step_s) >= 3:
        ts = sorted(step_s)
        cut = len(ts) // 10
        ts = ts[cut:len(ts) - cut] if len(ts) - 2 * cut >= 3 else ts
        s = spread(ts[len(ts) // 2], ts[0], ts[-1])
        if s > SPREAD_LIMIT:
            out.append(f"step times spread widely (max - min = {s:.0%} of the median step, {ts[len(ts) // 2] * 1e3:.0f} ms): "
                       f"images_per_s is not reliable; rerun on an idle machine")
    return out + timing_warnings([], before, after, device=device.type)


@torch.no_grad()
def _deploy_check(model: nn.Module, args, device, mem_fmt) -> Dict:
    """Eval accuracy of the trained model and equality of the re-parameterized copy (fp32, eval,
    TF32 off so that the comparison is IEEE fp32 on GPUs too)."""
    from lkconv.testing import no_tf32

    with no_tf32():
        return _deploy_check_fp32(model, args, device, mem_fmt)


@torch.no_grad()
def _deploy_check_fp32(model: nn.Module, args, device, mem_fmt) -> Dict:
    import lkconv

    ev = SyntheticPatterns(args.eval_samples, args.num_classes, args.image_size, seed=args.seed,
                           offset=args.num_samples)
    x, y = ev.batch(range(len(ev)))
    x = x.to(device).contiguous(memory_format=mem_fmt)
    y = y.to(device)
    model.eval()
    trained = model(x).float()
    deployed = copy.deepcopy(model)
    try:
        reparameterize = lkconv.reparameterize
    except (AttributeError, ImportError):
        reparameterize = None
    if reparameterize is not None:
        reparameterize(deployed)
    else:  # lkconv.reparam without the generic walker: the model's own method
        deployed.reparameterize()
    remaining = [n for n, m in deployed.named_modules() if getattr(m, "deployed", True) is False]
    deployed.eval()
    out = deployed(x).float()
    diff = (out - trained).abs().max().item()
    scale = max(trained.abs().max().item(), 1e-12)
    agree = (out.argmax(1) == trained.argmax(1)).float().mean().item()
    res = {
        "eval_accuracy": (trained.argmax(1) == y).float().mean().item(),
        "deploy_max_abs_diff": diff,
        "deploy_max_rel_diff": diff / scale,
        "deploy_prediction_agreement": agree,
        "params_train_form": sum(p.numel() for p in model.parameters()),
        "params_deploy_form": sum(p.numel() for p in deployed.parameters()),
        "deploy_ok": bool(diff / scale <= args.deploy_tol and not remaining),
    }
    if remaining:
        res["deploy_not_reparameterized"] = remaining[:10]
    if args.deploy_out:
        torch.save(deployed.state_dict(), args.deploy_out)
    model.train()
    return res


def _print_summary(s: Dict) -> None:
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    warnings = s.get("timing_warnings") or []
    items = {k: v for k, v in s.items() if k != "timing_warnings"}
    width = max(len(k) for k in items)
    lines = ["", "lkconv train: summary"] + [f"  {k.ljust(width)}  {fmt(v)}" for k, v in items.items()]
    lines += [f"warning: {w}" for w in warnings]
    print("\n".join(lines), flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry (``python -m lkconv train ...``); returns the exit code."""
    args = build_parser().parse_args(None if argv is None else list(argv))
    try:
        summary = train(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if "deploy_ok" in summary and not summary["deploy_ok"]:
        print("error: the re-parameterized model does not match the trained one", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
