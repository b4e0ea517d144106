"""Where a training step's host time goes: one transformer block's forward + backward, eager and
dsc (with and without fusion), under torch.profiler. For each: wall time per step, operator
calls and device kernels per step, and the operators with the most host (self CPU) time.

    python benchmarks/profile_step.py --device cuda --block gpt --dtype bf16
    python benchmarks/profile_step.py                      # CPU, small block: host overhead alone

On a GPU at transformer sizes a bf16 step can be bound by host time (launching ~100 operators
one at a time from Python); this shows which contender spends it where."""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import bench_fusion
from bench_fusion import DTYPES, build_block


def per_step(fn, steps: int) -> float:
    sync = torch.cuda.synchronize if bench_fusion.DEVICE == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - t0) / steps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--block", default="gpt", choices=["gpt", "llama"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--batch", type=int, default=None, help="default: 16 on cuda, 1 on cpu")
    p.add_argument("--seq", type=int, default=None, help="default: 512 on cuda, 8 on cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=12)
    args = p.parse_args()
    import dsc

    bench_fusion.DEVICE = args.device
    cuda = args.device == "cuda"
    batch, seq = args.batch or (16 if cuda else 1), args.seq or (512 if cuda else 8)
    block, x = build_block(args.block, DTYPES[args.dtype], batch, seq)
    contenders = {"eager": block,
                  "dsc": dsc.compile(block, {}, example_inputs=(x,)),
                  "dsc+fusion": dsc.compile(block, {"fusion": {"enabled": True}}, example_inputs=(x,))}

    def step(fn):
        def go():
            fn(x.detach().requires_grad_()).backward()
        return go

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    print(f"{args.block} block {batch}x{seq}x{x.shape[-1]} {args.dtype} on {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if cuda else ""))
    for name, fn in contenders.items():
        go = step(fn)
        for _ in range(3):
            go()
        wall = per_step(go, args.steps)
        with profile(activities=activities) as prof:
            for _ in range(args.steps):
                go()
            if cuda:
                torch.cuda.synchronize()
        events = prof.key_averages()
        ops = sum(e.count for e in events if e.key.startswith("aten::")) / args.steps
        kernels = sum(e.count for e in events if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA) \
            / args.steps if cuda else 0
        print(f"\n== {name}: {wall * 1e3:.2f} ms per step, {ops:.0f} aten calls (nested ones too)"
              + (f", {kernels:.0f} device kernels" if cuda else "") + " per step")
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
