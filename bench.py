"""Speed and memory of one PNBA training step (forward + backward of the full training loss).

    python bench.py --preset paper --batch 2 --neurons 7440 --frames 16
    python bench.py --preset paper --batch 2 --neurons 7440 --frames 16 --model.checkpointing true
    python bench.py --preset paper --batch 2 --neurons 7440 --frames 16 --model.neural_projector set --json
    python bench.py --preset demo --batch 16 --neurons 150 --frames 16 --device cpu --iters 5 --warmup 2
    python bench.py --kernels            # the fused Gaussian kernels (kernels/) vs eager and compiled torch

Any `--section.field value` config override applies. Seconds per iteration are the median over --iters
timed steps after --warmup untimed ones. Peak memory is the process's peak resident set size on CPU
(so run one configuration per process) and torch's peak allocated memory on CUDA. CPU runs use
--threads threads (default 2, the setting of the published baseline: 21.2 s and 7.4 GB at batch 2).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

import torch

import config
from kernels import fuse_sample_kl, match_loss, reference
from pnba import PNBA


def parse_args(argv):
    # config overrides are split off (and checked) first; they apply once the preset is known
    _, rest = config.parse_overrides(config.Config(), argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="paper", choices=list(config.PRESETS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--neurons", type=int, default=7440)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--kernels", action="store_true", help="benchmark kernels/ instead of the model")
    args = parser.parse_args(rest)
    cfg, _ = config.parse_overrides(config.preset(args.preset), argv)
    return args, cfg


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10   # Linux reports KiB


def bench_model(args, cfg) -> dict:
    """Time forward + backward of the training loss of a one-animal model on random data."""
    device = torch.device(args.device)
    torch.manual_seed(cfg.run.seed)
    model = PNBA(cfg.model, {"bench": args.neurons}).to(device).train()
    height, width = cfg.data.height, cfg.data.width
    responses = torch.rand(args.batch, args.frames, args.neurons, device=device) * 2
    video = torch.rand(args.batch, 1, args.frames, height, width, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.warmup + args.iters):
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        model(responses, video, "bench").losses.total.backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return {
        "s_per_iter": statistics.median(times),
        "peak_mem_mb": peak_memory_mb(device),
        "params": sum(p.numel() for p in model.parameters()),
        "preset": args.preset, "batch": args.batch, "neurons": args.neurons, "frames": args.frames,
        "device": str(device), "threads": torch.get_num_threads(), "iters": args.iters,
        "warmup": args.warmup, "neural_projector": cfg.model.neural_projector,
        "neural_readout": cfg.model.neural_readout, "checkpointing": cfg.model.checkpointing,
        "torch": torch.__version__,
    }


def print_table(result: dict):
    width = max(map(len, result))
    for key, value in result.items():
        shown = f"{value:.3f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) \
            and not isinstance(value, bool) else str(value)
        print(f"{key:<{width}}  {shown}")


def bench_kernels(args) -> list[dict]:
    """--kernels: the fused Gaussian kernels vs eager torch and torch.compile of their reference, forward and
    forward + backward, fp32, B in {32, 256} x D in {512, 8192}. GB/s is effective bandwidth: the bytes a pass
    must move (inputs read once, outputs written once; fuse_sample_kl 12 B*D floats forward and 16 more
    backward, match_loss 4 and 8) over the median time. Triton and torch.compile are timed on CUDA only."""
    from functools import partial

    from torch.utils.benchmark import Timer

    def seconds(fn, *args):
        for _ in range(3):  # compilation and caches stay out of the timing
            fn(*args)
        return Timer("fn(*args)", globals={"fn": fn, "args": args}).blocked_autorange(min_run_time=0.3).median

    def fwd_bwd(fn, inputs, grads):
        torch.autograd.backward(fn(*inputs), grads)

    device = torch.device(args.device)
    backends = ("torch", "compile", "triton") if device.type == "cuda" else ("torch",)
    ops = {  # name: (reference, dispatching function, floats moved forward, backward)
        "fuse_sample_kl": (reference.fuse_sample_kl, fuse_sample_kl, 12, 16),
        "match_loss": (reference.match_loss, match_loss, 4, 8),
    }
    compiled = {op: torch.compile(ref, dynamic=False) for op, (ref, *_) in ops.items()}
    rows = []
    for B in (32, 256):
        for D in (512, 8192):
            mus = [torch.randn(B, D, device=device, requires_grad=True) for _ in range(4)]
            eps = [torch.randn(B, D, device=device) for _ in range(3)]
            ab = [torch.tensor(v, device=device, requires_grad=True) for v in (1e-3, 0.0)]
            for op, (ref, fused, fwd_floats, bwd_floats) in ops.items():
                inputs = (*mus, *eps) if op == "fuse_sample_kl" else (*mus, *ab)
                grads = [torch.ones_like(t) for t in ref(*inputs)] if op == "fuse_sample_kl" else None
                for backend in backends:
                    fn = compiled[op] if backend == "compile" else partial(fused, backend=backend)
                    timed = (("fwd", seconds(fn, *inputs), fwd_floats),
                             ("fwd+bwd", seconds(fwd_bwd, fn, inputs, grads), fwd_floats + bwd_floats))
                    rows += [{"op": op, "B": B, "D": D, "pass": name, "backend": backend, "ms": t * 1e3,
                              "GB/s": floats * B * D * 4 / t / 1e9} for name, t, floats in timed]
    return rows


def print_kernel_table(rows, device):
    print(f"{'op':<15}{'B':>5}{'D':>6}  {'pass':<9}{'backend':<9}{'ms':>10}{'GB/s':>9}")
    for r in rows:
        print(f"{r['op']:<15}{r['B']:>5}{r['D']:>6}  {r['pass']:<9}{r['backend']:<9}{r['ms']:>10.3f}"
              f"{r['GB/s']:>9.1f}")
    if device != "cuda":
        print("triton and torch.compile: unmeasured (timed on CUDA only)")


def main(argv=None):
    try:
        args, cfg = parse_args(sys.argv[1:] if argv is None else argv)
    except config.ConfigError as e:
        sys.exit(f"error: {e}")
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.kernels:
        rows = bench_kernels(args)
        if args.json:
            print(json.dumps(rows))
        else:
            print_kernel_table(rows, torch.device(args.device).type)
        return
    result = bench_model(args, cfg)
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result)


if __name__ == "__main__":
    main()
