"""Speed and memory of one PNBA training step (forward + backward of the full training loss).

    python bench.py --preset paper --batch 2 --neurons 7440 --frames 16
    python bench.py --preset paper --batch 2 --neurons 7440 --frames 16 --model.checkpointing true
    python bench.py --preset paper --batch 2 --neurons 7440 --frames 16 --model.neural_projector set --json
    python bench.py --preset demo --batch 16 --neurons 150 --frames 16 --device cpu --iters 5 --warmup 2
    python bench.py --kernels            # the fused Gaussian kernels (kernels/) vs eager and compiled torch
    python bench.py --gpu-suite --json gpu.json   # CUDA: kernel timings and capacity (< 8 min)

Any `--section.field value` config override applies. Seconds per iteration are the median over --iters
timed steps after --warmup untimed ones. Peak memory is the process's peak resident set size on CPU
(so run one configuration per process) and torch's peak allocated memory on CUDA. CPU runs use
--threads threads (default 2, the setting of the published baseline: 21.2 s and 7.4 GB at batch 2).
`--json` prints one JSON object instead of the table; `--json PATH` prints the table and writes the JSON.

--gpu-suite (GPU readiness) times the Triton kernels against eager torch and torch.compile (with the fraction
of peak HBM bandwidth they reach) and finds the largest paper-preset batch that fits, with and without
activation checkpointing. It exits 1 if a part of it failed, 2 without CUDA (and writes nothing). It checks
nothing: the kernels' and the model's correctness on CUDA are the gpu tests (`python -m pytest -q -m gpu`,
test_pnba.py::TestGPU), which README "GPU readiness: one command" runs first.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import resource
import statistics
import sys
import time
from functools import partial

import torch

import config
from kernels import fuse_sample_kl, match_loss, reference
from pnba import PNBA


def parse_args(argv):
    # config overrides are split off (and checked) first; they apply once the preset is known
    _, rest = config.parse_overrides(config.Config(), argv)
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Any config field is an override, e.g. --model.checkpointing true (python train.py "
               "--help-config lists\nthem). The inputs are random, of the sizes given: no data is read.\n"
               "example: python bench.py --preset paper --batch 2 --neurons 7440 --frames 16",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="paper", choices=list(config.PRESETS),
                        help=f"{' | '.join(config.PRESETS)} (default: paper)")
    parser.add_argument("--batch", type=int, default=2, help="trials per step (default 2)")
    parser.add_argument("--neurons", type=int, default=7440, help="neurons of the one animal (default 7440)")
    parser.add_argument("--frames", type=int, default=16, help="frames per trial window (default 16)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:<i>")
    parser.add_argument("--iters", type=int, default=3, help="timed steps, median reported (default 3)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads on --device cpu (default 2)")
    parser.add_argument("--json", nargs="?", const="-", metavar="PATH",
                        help="print one JSON object instead of a table; with PATH, write it there")
    parser.add_argument("--kernels", action="store_true", help="benchmark kernels/ instead of the model")
    parser.add_argument("--gpu-suite", action="store_true",
                        help="CUDA: kernel timings and capacity (the checks: pytest -m gpu)")
    args = parser.parse_args(rest)
    cfg, _ = config.parse_overrides(config.preset(args.preset), argv)
    config.validate(cfg)
    args.device = str(config.pick_device(args.device))
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


OPS = {  # name: (reference, dispatching function, fp32 floats per (B, D) element moved forward, backward)
    "fuse_sample_kl": (reference.fuse_sample_kl, fuse_sample_kl, 12, 16),
    "match_loss": (reference.match_loss, match_loss, 4, 8),
}


def seconds(fn, *args, min_run_time=0.3):
    """Median seconds of fn(*args) (torch's Timer synchronises CUDA)."""
    from torch.utils.benchmark import Timer

    for _ in range(3):  # compilation and caches stay out of the timing
        fn(*args)
    timer = Timer("fn(*args)", globals={"fn": fn, "args": args})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def fwd_bwd(fn, inputs, grads):
    torch.autograd.backward(fn(*inputs), grads)


def timing_inputs(op, B, D, device):
    """Random fp32 inputs of `op`, (B, D) each (a, b scalars), and the upstream gradients of its outputs
    (None for match_loss's scalar)."""
    mus = [torch.randn(B, D, device=device, requires_grad=True) for _ in range(4)]
    if op == "match_loss":
        return (*mus, *(torch.tensor(v, device=device, requires_grad=True) for v in (1e-3, 0.0))), None
    inputs = (*mus, *(torch.randn(B, D, device=device) for _ in range(3)))
    return inputs, [torch.ones_like(t) for t in reference.fuse_sample_kl(*inputs)]


def bench_kernels(args) -> list[dict]:
    """--kernels: the fused Gaussian kernels vs eager torch and torch.compile of their reference, forward and
    forward + backward, fp32, B in {32, 256} x D in {512, 8192}. GB/s is effective bandwidth: the bytes a pass
    must move (inputs read once, outputs written once; fuse_sample_kl 12 B*D floats forward and 16 more
    backward, match_loss 4 and 8) over the median time. Triton and torch.compile are timed on CUDA only."""
    device = torch.device(args.device)
    backends = ("torch", "compile", "triton") if device.type == "cuda" else ("torch",)
    compiled = {op: torch.compile(ref, dynamic=False) for op, (ref, *_) in OPS.items()}
    rows = []
    for B in (32, 256):
        for D in (512, 8192):
            for op, (_, fused, fwd_floats, bwd_floats) in OPS.items():
                inputs, grads = timing_inputs(op, B, D, device)
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


# ----------------------------------------------------------------------------------------------- --gpu-suite

SUITE_BUDGET_S = 420  # the capacity search starts no new try after this; the suite stays under 8 minutes
TIMING_SIZES = ((32, 512), (256, 512), (1024, 512))
CAPACITY_BATCHES = (1, 2, 4, 8, 16, 32, 48, 64)
PEAK_HBM_BYTES_PER_S = (  # (pattern of torch.cuda.get_device_name, peak HBM bytes/s); the first match counts
    (r"\bH200\b", 4.8e12),                    # \b: a GH200 is another part
    (r"\bH100\b.*\bPCIe\b", 2.0e12),
    (r"\bH100\b.*(SXM|HBM3)", 3.35e12),       # the SXM part names itself "NVIDIA H100 80GB HBM3"
    (r"\bA100\b.*\b80GB\b", 2.0e12),
    (r"\bA100\b.*\b40GB\b", 1.55e12),
)
PUBLISHED_NOTE = ("not implemented: bench.py has no mode that runs the published way (materialised "
                  "attention, two decoder passes; README, Speed and memory)")


def peak_bandwidth(device_name: str) -> float | None:
    """Peak HBM bandwidth in bytes/s of a device named like torch.cuda.get_device_name(); None if unknown."""
    return next((peak for pattern, peak in PEAK_HBM_BYTES_PER_S if re.search(pattern, device_name, re.I)),
                None)


def timing_row(op, B, D, eager_s, compiled_s, triton_s, peak) -> dict:
    """Forward + backward seconds of op at (B, D) -> a timings row; bandwidth from the bytes it must move."""
    moved = sum(OPS[op][2:]) * B * D * 4
    return {"kernel": op, "B": B, "D": D, "eager_ms": eager_s * 1e3,
            "compiled_ms": None if compiled_s is None else compiled_s * 1e3, "triton_ms": triton_s * 1e3,
            "speedup_vs_eager": eager_s / triton_s, "gb_per_s": moved / triton_s / 1e9,
            "bandwidth_fraction": None if peak is None else moved / triton_s / peak}


def time_kernels(device, peak, sizes=TIMING_SIZES) -> list[dict]:
    """Forward + backward, fp32: eager torch (backend "torch"), torch.compile of the reference, Triton."""
    rows = []
    for op, (ref, fused, *_) in OPS.items():
        compiled = torch.compile(ref, dynamic=False)
        for B, D in sizes:
            inputs, grads = timing_inputs(op, B, D, device)
            eager, triton_s = (seconds(fwd_bwd, partial(fused, backend=b), inputs, grads)
                               for b in ("torch", "triton"))
            try:  # a baseline only: a compiler that fails here must not lose the rest of the report
                compiled_s, error = seconds(fwd_bwd, compiled, inputs, grads), None
            except Exception as e:
                compiled_s, error = None, f"{type(e).__name__}: {e}"
            rows.append(timing_row(op, B, D, eager, compiled_s, triton_s, peak))
            if error:
                rows[-1]["compile_error"] = error
    return rows


def largest_batch(step, batches, deadline):
    """step(batch) for growing batches until one raises torch.cuda.OutOfMemoryError or time.monotonic() has
    passed deadline before a try. -> (largest batch that ran, what its step returned, whether time ran out)"""
    best, result = None, None
    for batch in batches:
        if time.monotonic() > deadline:
            return best, result, True
        try:
            result, best = step(batch), batch
        except torch.cuda.OutOfMemoryError:
            break
    return best, result, False


def measure_capacity(device, checkpointing, deadline, neurons=7440, frames=16) -> dict:
    """Largest paper-preset batch for which a training step (bf16 autocast forward, backward, AdamW step, as
    train.py runs it) fits on device, and its windows/s (median of two steps after a warm-up one)."""
    cfg = config.preset("paper")
    cfg.model.checkpointing = checkpointing
    torch.manual_seed(cfg.run.seed)
    model = PNBA(cfg.model, {"bench": neurons}).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)

    def step(batch):
        responses = torch.rand(batch, frames, neurons, device=device) * 2
        video = torch.rand(batch, 1, frames, cfg.data.height, cfg.data.width, device=device)
        torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(3):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                total = model(responses, video, "bench").losses.total
            total.backward()
            optimizer.step()
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return {"s": statistics.median(times[1:]), "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9}

    batch, result, out_of_time = largest_batch(step, CAPACITY_BATCHES, deadline)
    return {"mode": "checkpointing" if checkpointing else "default", "max_batch": batch,
            "windows_per_s": None if batch is None else batch / result["s"],
            "peak_gb": None if batch is None else result["peak_gb"], "out_of_time": out_of_time,
            "neurons": neurons, "frames": frames}


def failed_part(name, error) -> dict:
    return {"part": name, "error": f"{type(error).__name__}: {error}"}


def guarded(name, fn, errors) -> list:
    """fn() as a list; if it raises, a row naming the part and the exception goes into errors and this
    returns []: a crash in one part of the suite leaves the other parts' results in the report (and fails
    it)."""
    try:
        out = fn()
    except Exception as e:
        errors.append(failed_part(name, e))
        return []
    return out if isinstance(out, list) else [out]


REPORT_SCHEMA = {  # section: {key: allowed types}; float accepts int, None is JSON null
    "report": {"device": str, "torch": str, "triton": str, "timings": list, "capacity": list, "errors": list,
               "elapsed_s": float, "ok": bool},
    "timings": {"kernel": str, "B": int, "D": int, "eager_ms": float, "compiled_ms": (float, None),
                "triton_ms": float, "speedup_vs_eager": float, "bandwidth_fraction": (float, None)},
    "capacity": {"mode": str, "max_batch": (int, None), "windows_per_s": (float, None)},
    "errors": {"part": str, "error": str},
}


def _type_ok(value, allowed) -> bool:
    for t in allowed if isinstance(allowed, tuple) else (allowed,):
        if t is None and value is None:
            return True
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if t is float and number and math.isfinite(value) or t is int and number and isinstance(value, int):
            return True
        if t in (str, bool, list) and isinstance(value, t):
            return True
    return False


def validate_report(report) -> list[str]:
    """Problems of a --gpu-suite report against REPORT_SCHEMA (extra keys allowed); [] when well-formed."""
    def fields(where, row, schema):
        if not isinstance(row, dict):
            return [f"{where} is not an object"]
        return [f"{where}.{key} is missing" if key not in row else f"{where}.{key} is {row[key]!r}"
                for key, allowed in schema.items() if key not in row or not _type_ok(row[key], allowed)]

    problems = fields("report", report, REPORT_SCHEMA["report"])
    if problems:
        return problems
    for section in ("timings", "capacity", "errors"):
        for i, row in enumerate(report[section]):
            problems += fields(f"{section}[{i}]", row, REPORT_SCHEMA[section])
    if not problems and report["ok"] != (not report["errors"]):
        problems.append("report.ok disagrees with the errors")
    return problems


def build_report(device_name, timings, capacity, errors, elapsed_s) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        triton_version = version("triton")
    except PackageNotFoundError:
        triton_version = "not installed"
    return {"device": device_name, "torch": torch.__version__, "triton": triton_version, "timings": timings,
            "capacity": capacity, "errors": errors, "elapsed_s": elapsed_s, "ok": not errors}


def format_report(report) -> str:
    """The readable table of a --gpu-suite report: timings, capacity, the parts that failed, the verdict."""
    def num(v, spec):  # None as "-" in the column's width
        return "-".rjust(int(re.match("[0-9]*", spec).group() or 0)) if v is None else format(v, spec)

    lines = [f"{report['device']}   torch {report['torch']}   triton {report['triton']}", "",
             "forward + backward, fp32, ms  (of peak: the Triton kernels' share of peak HBM bandwidth)",
             f"{'kernel':<15}{'B':>6}{'D':>6}{'eager':>9}{'compiled':>10}{'triton':>9}{'speedup':>9}"
              f"{'of peak':>9}"]
    for t in report["timings"]:
        lines.append(f"{t['kernel']:<15}{t['B']:>6}{t['D']:>6}{t['eager_ms']:>9.3f}"
                     f"{num(t['compiled_ms'], '10.3f')}{t['triton_ms']:>9.3f}{t['speedup_vs_eager']:>8.1f}x"
                     f"{num(t['bandwidth_fraction'], '9.1%')}")
    lines += ["", f"{'capacity (paper preset)':<24}{'max batch':>10}{'windows/s':>11}"]
    for c in report["capacity"]:
        note = c.get("note") or ("stopped by the time budget" if c.get("out_of_time") else "")
        lines.append(f"{c['mode']:<24}{num(c['max_batch'], '10d')}{num(c['windows_per_s'], '11.1f')}  {note}")
    lines += [""] if report["errors"] else []
    for e in report["errors"]:  # one line each: an exception's message can run over many
        first_line = e["error"].split("\n")[0]
        lines.append(f"{e['part']} failed: {first_line}")
    verdict = f"FAILED: {len(report['errors'])} part(s)" if report["errors"] else "ok"
    return "\n".join(line.rstrip() for line in lines + ["", f"{verdict}, {report['elapsed_s']:.0f} s"])


def run_gpu_suite(args) -> int:
    """--gpu-suite: print the report (and write it to --json) -> exit status 0, 1 if a part failed, 2 without
    CUDA. The kernels' and the model's correctness on CUDA are tests: python -m pytest -q -m gpu."""
    if not torch.cuda.is_available():
        print("error: --gpu-suite needs a CUDA device (torch.cuda.is_available() is False); nothing written",
              file=sys.stderr)
        return 2
    start = time.monotonic()
    device = torch.device("cuda")

    def say(message):  # progress on stderr: the suite runs for minutes
        print(f"[{time.monotonic() - start:5.0f} s] {message}", file=sys.stderr, flush=True)

    errors = []
    say("timing the kernels")
    name = torch.cuda.get_device_name()
    timings = guarded("kernel timings", partial(time_kernels, device, peak_bandwidth(name)), errors)
    capacity = []
    for i, checkpointing in enumerate((False, True)):  # each mode gets an equal share of the time left
        deadline = time.monotonic() + (start + SUITE_BUDGET_S - time.monotonic()) / (2 - i)
        say(f"capacity search, checkpointing {checkpointing}")
        capacity += guarded(f"capacity, checkpointing {checkpointing}",
                            partial(measure_capacity, device, checkpointing, deadline), errors)
        torch.cuda.empty_cache()  # the next mode needs the memory this one's model and batches held
    capacity.append({"mode": "published", "max_batch": None, "windows_per_s": None, "note": PUBLISHED_NOTE})
    report = build_report(name, timings, capacity, errors, time.monotonic() - start)
    problems = validate_report(report)
    assert not problems, problems  # a bug in this file, not a finding about the device
    emit(report, args.json, lambda: print(format_report(report)))
    return 0 if report["ok"] else 1


def emit(obj, json_dest, print_table):
    """--json: the JSON object on stdout instead of the table; --json PATH: the table, and the JSON there."""
    text = json.dumps(obj, allow_nan=False)
    if json_dest == "-":
        print(text)
        return
    if json_dest:
        with open(json_dest, "w") as f:
            f.write(text + "\n")
    print_table()


def main(argv=None) -> int | None:
    try:
        args, cfg = parse_args(sys.argv[1:] if argv is None else argv)
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.gpu_suite:
        return run_gpu_suite(args)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.kernels:
        rows = bench_kernels(args)
        emit(rows, args.json, lambda: print_kernel_table(rows, torch.device(args.device).type))
        return None
    result = bench_model(args, cfg)
    emit(result, args.json, lambda: print_table(result))
    return None


if __name__ == "__main__":
    sys.exit(main())
