"""Kernel-fusion benchmark: eager vs torch.compile (Inductor) vs dsc's generated kernels.

For each pattern at transformer sizes (8192x1024 and 4096x4096 by default) in fp32 and bf16, in one
process, on the same inputs: the median time of a forward call (no autograd) for eager PyTorch,
torch.compile's default mode (Inductor, C++ backend on CPU), and dsc (`dsc.compile` with
`fusion.enabled`, which runs the generated C/OpenMP kernel; "dsc" reuses its output buffer between
calls as it does without autograd, "dsc_fresh" allocates a new one per call as eager and Inductor
do -- on CPU a fresh buffer of 32 MiB or more costs page faults comparable to the kernel itself); achieved bandwidth = the bytes an
ideal fused kernel must read and write / time, also as a fraction of this machine's copy bandwidth
(measured here: `dst.copy_(src)` on the same number of bytes). The contenders take turns in rounds
of 4 calls each (`--run-length`), so load from other processes hits them alike; compare ratios within a
run. "dsc in cache" is the kernel alone on as many rows as fit in L2 (`in_cache_rate`): the
arithmetic's ceiling. A pattern whose ceiling is near the copy bandwidth is compute-bound here.

Then a whole transformer block (the example GPT's Block, or a transformers Llama decoder layer with
--block llama) forward + backward: eager vs torch.compile vs dsc with fusion.

    python benchmarks/bench_fusion.py                         # all patterns, both sizes, fp32 + bf16
    python benchmarks/bench_fusion.py --patterns layernorm,rmsnorm --dtypes fp32 --json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class LayerNorm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.ln = nn.LayerNorm(n)

    def forward(self, x):
        return self.ln(x)


class ResidualLayerNorm(nn.Module):  # the residual stream: h = x + r feeds the norm and the next block
    def __init__(self, n):
        super().__init__()
        self.ln = nn.LayerNorm(n)

    def forward(self, x, r):
        h = x + r
        return self.ln(h), h


class DequantGelu(nn.Module):  # int8 weights, one scale per column, dequantized and used
    def __init__(self, n):
        super().__init__()
        self.scale = nn.Parameter(torch.full((n,), 0.02))

    def forward(self, x, q):
        return F.gelu(q.to(x.dtype) * self.scale + x)


class RMSNorm(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class ResidualRMSNorm(RMSNorm):  # Llama's residual stream: h = x + r feeds the norm and the next layer
    def forward(self, x, r):
        h = x + r
        return super().forward(h), h


class MaskedSoftmax(nn.Module):
    def __init__(self, n):
        super().__init__()

    def forward(self, x, mask):
        return torch.softmax(x * 0.125 + mask, dim=-1)


class BiasGelu(nn.Module):
    def __init__(self, n, approximate="none"):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(n))
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(x + self.bias, approximate=self.approximate)


class GeluNew(nn.Module):
    def __init__(self, n):
        super().__init__()

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class SwiGLU(nn.Module):
    def __init__(self, n):
        super().__init__()

    def forward(self, a, b):
        return F.silu(a) * b


class ResidualScale(nn.Module):
    def __init__(self, n):
        super().__init__()

    def forward(self, x, r):
        return x * 0.5 + r


class BiasGeluDropoutResidual(nn.Module):  # GPT-2's MLP tail in training: dropout draws masks
    def __init__(self, n):
        super().__init__()
        self.bias = nn.Parameter(0.1 * torch.randn(n))

    def forward(self, x, r):
        return F.dropout(F.gelu(x + self.bias), 0.1, training=True) + r


# name -> (module, number of full-size inputs, extra per-row-vector inputs, outputs)
PATTERNS = {
    "layernorm": (LayerNorm, 1, 0, 1),
    "residual_layernorm": (ResidualLayerNorm, 2, 0, 2),  # one kernel writes h and LN(h)
    "rmsnorm": (RMSNorm, 1, 0, 1),
    "residual_rmsnorm": (ResidualRMSNorm, 2, 0, 2),
    "softmax_mask": (MaskedSoftmax, 1, 1, 1),
    "bias_gelu": (BiasGelu, 1, 0, 1),
    "bias_gelu_tanh": (lambda n: BiasGelu(n, "tanh"), 1, 0, 1),
    "gelu_new": (GeluNew, 1, 0, 1),
    "swiglu": (SwiGLU, 2, 0, 1),
    "residual_scale": (ResidualScale, 2, 0, 1),
    "bias_gelu_dropout": (BiasGeluDropoutResidual, 2, 0, 1),
    "dequant_gelu": (DequantGelu, 2, 0, 1),  # its second full input is int8 (INT8_LAST)
}
INT8_LAST = {"dequant_gelu"}  # patterns whose last full-size input is an int8 tensor
RANDOM = {"bias_gelu_dropout"}  # dsc draws other masks than eager: no error column


def make_inputs(name: str, rows: int, cols: int, dtype, n_full: int, n_vec: int) -> list:
    """A pattern's inputs: full-size tensors (the last one int8 for INT8_LAST), then masks."""
    xs = [torch.randn(rows, cols, device=DEVICE).to(dtype) for _ in range(n_full)]
    if name in INT8_LAST:
        xs[-1] = torch.randint(-128, 128, (rows, cols), dtype=torch.int8, device=DEVICE)
    return xs + [torch.where(torch.rand(cols, device=DEVICE) < 0.1, float("-inf"), 0.0).to(dtype) for _ in range(n_vec)]


def _first(out):
    """A pattern's (first) output: the residual norms return the norm and the sum h."""
    return out[0] if isinstance(out, tuple) else out


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


BLOCK = 4  # CPU: calls of one contender in a row, per round


def interleaved(fns: dict, reps: int, block: int | None = None) -> dict:
    """Median seconds per call for each contender. Rounds go round-robin over the contenders, so load
    from other processes hits them alike; within a round each contender makes `block` calls in a
    row. On this CPU the first call after another contender's is up to 1.5 ms slower (the same
    happens to `dst.copy_(src)` after an unrelated torch op that allocates its output), so with
    block 1 every contender would be timed in that state; the median of blocks of 4 is the steady
    state, as `copy_bandwidth` measures the copy."""
    block = BLOCK if block is None else block
    times = {k: [] for k in fns}
    for _ in range(max(1, reps // block)):
        for k, fn in fns.items():
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


DEVICE = "cpu"  # --device; on "cuda" the generated kernels are Triton's


def cuda_interleaved(fns: dict, reps: int, inner: int = 10) -> dict:
    """GPU: median seconds per call, measured with CUDA events around `inner` back-to-back calls
    (rounds interleaved over the contenders). Includes each contender's CPU-side launch cost when
    that exceeds its GPU time; `cuda_graph_times` gives the GPU time alone."""
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            for _ in range(inner):
                fn()
            b.record()
            b.synchronize()
            times[k].append(a.elapsed_time(b) / 1e3 / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def cuda_graph_times(fns: dict, reps: int, inner: int = 20) -> dict:
    """GPU time per call: each contender's `inner` calls captured in one CUDA graph, replayed `reps`
    times (launch overhead gone: what the kernels themselves take). NaN when a contender cannot be
    captured (dropout draws its seed on the host: a synchronisation)."""
    out = {}
    for k, fn in fns.items():
        try:
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(s)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(inner):
                    fn()
            g.replay()
            torch.cuda.synchronize()
            ts = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                g.replay()
                b.record()
                b.synchronize()
                ts.append(a.elapsed_time(b) / 1e3 / inner)
            out[k] = statistics.median(ts)
        except Exception as e:  # noqa: BLE001 -- report, do not stop the benchmark
            print(f"  ({k}: no CUDA graph: {type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
            torch.cuda.synchronize()
            out[k] = float("nan")
    return out


def timed(fns: dict, reps: int) -> dict:
    return cuda_interleaved(fns, reps) if DEVICE == "cuda" else interleaved(fns, reps)


def copy_bandwidth(nbytes: int, reps: int) -> float:
    """Read + write bytes per second of dst.copy_(src): the best of 5 medians (other processes on a
    shared machine only ever lower it). On a GPU: the copy's time in a CUDA graph."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    if DEVICE == "cuda":
        return 2 * nbytes / cuda_graph_times({"copy": lambda: dst.copy_(src)}, reps)["copy"]
    return max(2 * nbytes / median_time(lambda: dst.copy_(src), reps) for _ in range(5))


def _inductor(module):
    """torch.compile(module), with dynamo's caches cleared first: the patterns share forward
    functions (two GELU modules, say), and across shapes, dtypes and grad modes one function would
    otherwise pass dynamo's recompile limit (8) and silently run eager as "inductor"."""
    torch._dynamo.reset()
    return torch.compile(module)


def bench_pattern(name, rows, cols, dtype, reps):
    import dsc
    from dsc.passes import fusion

    build, n_full, n_vec, n_out = PATTERNS[name]
    torch.manual_seed(0)
    module = build(cols).to(device=DEVICE, dtype=dtype)
    xs = make_inputs(name, rows, cols, dtype, n_full, n_vec)
    params = sum(p.numel() for p in module.parameters())
    elt = xs[0].element_size()
    ideal = sum(x.numel() * x.element_size() for x in xs) + elt * (rows * cols * n_out + params)
    compiled = _inductor(module)
    fused = dsc.compile(module, {"fusion": {"enabled": True}}, example_inputs=tuple(xs))
    kernels = [k["name"] for k in fused.report()["kernels"]]
    with torch.no_grad():
        for fn in (module, compiled, fused):  # warm up (Inductor compiles here)
            for _ in range(3):
                fn(*xs)
        ref = _first(module(*xs)).float()
        err = float((_first(fused(*xs)).float() - ref).abs().max()) if name not in RANDOM else float("nan")
        def fresh():  # dsc with a new output buffer per call, as eager and Inductor allocate
            fusion.REUSE_OUTPUTS = False
            try:
                return fused(*xs)
            finally:
                fusion.REUSE_OUTPUTS = True

        fns = {"eager": lambda: module(*xs), "inductor": lambda: compiled(*xs), "dsc": lambda: fused(*xs)}
        if DEVICE == "cuda":  # per call with launch costs, and GPU time in CUDA graphs (bandwidth)
            calls = cuda_interleaved(fns, reps)
            t = cuda_graph_times(fns, reps)
            if all(math.isnan(v) for v in t.values()):
                t = calls
            extra = {f"{k}_call_s": v for k, v in calls.items()}
        else:  # a copy of one output's bytes takes its turns in the same rounds: "% of copy" in like conditions
            src, dst = torch.randn(rows, cols).to(dtype), torch.empty(rows, cols, dtype=dtype)
            t = interleaved({**fns, "dsc_fresh": fresh, "copy": lambda: dst.copy_(src)}, reps)
            copy_rate = 2 * src.numel() * src.element_size() / t.pop("copy")
            extra = {"copy_GBps": copy_rate / 1e9, "in_cache_GBps": in_cache_rate(module, xs, n_full + n_out) / 1e9}
    return {"pattern": name, "shape": f"{rows}x{cols}", "dtype": str(dtype).replace("torch.", ""),
            "bytes": ideal, "kernels": kernels, "max_abs_err_vs_eager": err, **extra,
            **{f"{k}_s": v for k, v in t.items()}, **{f"{k}_GBps": ideal / v / 1e9 for k, v in t.items()}}


def in_cache_rate(module, xs, n_big: int, reps: int = 200) -> float:
    """The dsc kernel's rate with its data in cache: a copy of the module compiled for as many rows
    as keep its full-size operands within ~1 MiB (half of it per core, in L2), timed around the C
    call alone (no Python around it), as bytes an ideal kernel moves per second. Memory cannot limit
    this rate, only arithmetic can: where it is not well above the copy bandwidth, the pattern is
    compute-bound on this machine and no kernel layout reaches the copy rate."""
    import dsc
    from dsc.passes.fusion import KERNELS

    x0 = xs[0]
    cols, elt = x0.shape[-1], x0.element_size()
    rows = max(2, (1 << 20) // (n_big * cols * elt))
    small = [x[:rows] if x.dim() == 2 and x.shape[0] == x0.shape[0] else x for x in xs]
    fused = dsc.compile(module, {"fusion": {"enabled": True}}, example_inputs=tuple(small))
    [k] = fused.report()["kernels"]
    kernel = KERNELS[k["name"]]
    with torch.no_grad():
        fused(*small)  # builds the kernel and declares its argument types
        fn, times = kernel.compiled[x0.dtype], []

        def clocked(*args):
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
        clocked.argtypes = fn.argtypes
        kernel.compiled[x0.dtype] = clocked
        try:
            for _ in range(reps):
                fused(*small)
        finally:
            kernel.compiled[x0.dtype] = fn
    n_out = n_big - sum(1 for x in small if x.dim() == 2 and x.shape[0] == rows)  # n_big: inputs + outputs
    ideal = sum(x.numel() * x.element_size() for x in small) + elt * (rows * cols * n_out
                                                                       + sum(p.numel() for p in module.parameters()))
    return ideal / statistics.median(times)


def build_block(kind: str, dtype, batch: int, seq: int):
    """(block module returning a scalar, its input): our GPT's block, transformers' Llama layer
    (with rotary embeddings) or transformers' GPT-2 block in training mode with its default
    dropouts (0.1), width 1024, on DEVICE in `dtype`, seeded."""
    torch.manual_seed(0)
    if kind == "gpt2":
        from transformers import GPT2Config
        from transformers.models.gpt2.modeling_gpt2 import GPT2Block

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.block = GPT2Block(GPT2Config(n_embd=1024, n_head=16), 0)

            def forward(self, x):
                return self.block(x)[0].float().mean()

        block, width = Block().train(), 1024
    elif kind == "llama":
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=8)

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.layer, self.rope = LlamaDecoderLayer(cfg, 0), LlamaRotaryEmbedding(cfg)

            def forward(self, x):
                pos = torch.arange(x.shape[1], device=x.device)[None]
                return self.layer(x, position_embeddings=self.rope(x, pos))[0].float().mean()

        block, width = Block(), 1024
    else:
        from gpt import Block as GPTBlock, GPTConfig

        class Block(nn.Module):
            def __init__(self):
                super().__init__()
                self.block = GPTBlock(GPTConfig(n_embd=1024, n_head=16))

            def forward(self, x):
                return self.block(x).mean()

        block, width = Block(), 1024
    block = block.to(device=DEVICE, dtype=dtype)
    return block, torch.randn(batch, seq, width, device=DEVICE).to(dtype)


def bench_block(kind: str, dtype, reps: int, batch: int, seq: int):
    import dsc

    block, x = build_block(kind, dtype, batch, seq)
    fused = dsc.compile(block, {"fusion": {"enabled": True}}, example_inputs=(x,))
    plain = dsc.compile(block, {}, example_inputs=(x,))  # the captured graph alone: dsc's own overhead
    compiled = _inductor(block)

    def step(fn):
        def go():
            xi = x.detach().requires_grad_()
            fn(xi).backward()
        return go

    for fn in (block, compiled, fused, plain):
        for _ in range(2):
            step(fn)()
    t = timed({"eager": step(block), "inductor": step(compiled), "dsc": step(fused), "dsc_nofusion": step(plain)}, reps)
    return {"block": kind, "shape": f"{batch}x{seq}x{x.shape[-1]}", "dtype": str(dtype).replace("torch.", ""),
            "kernels": len(fused.report()["kernels"]), **{f"{k}_s": v for k, v in t.items()}}


def bench_backward(name: str, rows: int, cols: int, dtype, reps: int) -> dict:
    """Forward + backward of one pattern: eager, Inductor, dsc with its generated backward kernel
    and dsc recomputing the unfused ops instead (what GPU pointwise groups do)."""
    import dsc
    from dsc.passes import fusion

    build, n_full, n_vec, _ = PATTERNS[name]
    torch.manual_seed(0)
    module = build(cols).to(device=DEVICE, dtype=dtype)
    xs = make_inputs(name, rows, cols, dtype, n_full, n_vec)
    fused = dsc.compile(module, {"fusion": {"enabled": True}}, example_inputs=tuple(xs))
    compiled = _inductor(module)
    generated = fusion.Kernel.__dict__["has_backward"]

    def step(fn):
        def go():
            ins = [x.detach().requires_grad_(i < n_full and x.is_floating_point()) for i, x in enumerate(xs)]
            out = fn(*ins)
            sum(o.float().sum() for o in (out if isinstance(out, tuple) else (out,))).backward()
        return go

    def recompute():
        fusion.Kernel.has_backward = property(lambda self: False)
        try:
            step(fused)()
        finally:
            fusion.Kernel.has_backward = generated

    fns = {"eager": step(module), "inductor": step(compiled), "dsc": step(fused), "dsc_recompute": recompute}
    for fn in fns.values():
        fn(), fn()
    t = timed(fns, reps)
    return {"pattern": name, "shape": f"{rows}x{cols}", "dtype": str(dtype).replace("torch.", ""),
            **{f"{k}_s": v for k, v in t.items()}}


def main() -> int:
    global DEVICE, BLOCK
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--patterns", default=",".join(PATTERNS), help="comma-separated; 'none': only the block")
    p.add_argument("--shapes", default="8192x1024,4096x4096")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--block", default="gpt", choices=["gpt", "llama", "gpt2", "none"])
    p.add_argument("--block-batch", type=int, default=4)
    p.add_argument("--block-seq", type=int, default=256)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: Triton kernels on the GPU, timed in CUDA graphs (GPU time) and per call")
    p.add_argument("--run-length", type=int, default=BLOCK,
                   help="CPU: calls of one contender in a row within each round (1: strictly interleaved)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc keeps freed memory for reuse (dsc.runtime.launch.keep_freed_memory, what `dsc run` "
                   "sets for its ranks): fresh outputs, as autograd needs, are then not page-faulted in again")
    args = p.parse_args()
    if args.keep_freed_memory:
        from dsc.runtime.launch import keep_freed_memory

        print(f"keep freed memory: {'on' if keep_freed_memory() else 'refused by the C library'}")
    patterns = [n for n in args.patterns.split(",") if n and n != "none"]
    if set(patterns) - set(PATTERNS):
        p.error(f"unknown pattern(s) {sorted(set(patterns) - set(PATTERNS))}; known: {', '.join(PATTERNS)}")
    DEVICE, BLOCK = args.device, args.run_length
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s]
    copy = copy_bandwidth(max(r * c for r, c in shapes) * 4, args.reps)
    rows = []
    for dt in args.dtypes.split(","):
        for name in patterns:
            for r, c in shapes:
                res = bench_pattern(name, r, c, DTYPES[dt], args.reps)
                rows.append(res)
                print(json.dumps(res) if args.json else
                      f"{name:<15} {res['shape']:>9} {res['dtype']:<8} "
                      + "  ".join(f"{k} {res[k + '_GBps']:5.1f} GB/s ({res[k + '_GBps'] / res.get('copy_GBps', copy / 1e9):4.0%})"
                                  for k in ("eager", "inductor", "dsc", "dsc_fresh") if k + "_GBps" in res)
                      + ("  per call (us) " + "/".join(f"{res[k + '_call_s'] * 1e6:.0f}"
                                                        for k in ("eager", "inductor", "dsc"))
                         if "dsc_call_s" in res else "")
                      + (f"  copy {res['copy_GBps']:5.1f} GB/s" if "copy_GBps" in res else "")
                      + (f"  dsc in cache {res['in_cache_GBps']:5.1f} GB/s" if "in_cache_GBps" in res else "")
                      + f"  dsc/eager {res['eager_s'] / res['dsc_s']:.2f}x  dsc/inductor "
                        f"{res['inductor_s'] / res['dsc_s']:.2f}x  err {res['max_abs_err_vs_eager']:.1e}", flush=True)
    print(f"copy bandwidth (read + write), alone: {copy / 1e9:.1f} GB/s"
          + (" (the % columns use the copy timed in each pattern's rounds)" if DEVICE == "cpu" else "") + ", "
          + (torch.cuda.get_device_name() if DEVICE == "cuda" else f"{args.threads} threads"))
    for dt in args.dtypes.split(","):  # forward + backward (every pattern has a generated backward kernel)
        for name in patterns:
            r, c = shapes[0]
            res = bench_backward(name, r, c, DTYPES[dt], args.reps)
            print(json.dumps(res) if args.json else
                  f"{name} fwd+bwd {res['shape']} {res['dtype']}: eager {res['eager_s'] * 1e3:.1f} ms, inductor "
                  f"{res['inductor_s'] * 1e3:.1f} ms, dsc {res['dsc_s'] * 1e3:.1f} ms (backward kernel), "
                  f"{res['dsc_recompute_s'] * 1e3:.1f} ms (no backward kernel: recompute; softmax: torch's formula): dsc/eager {res['eager_s'] / res['dsc_s']:.2f}x, "
                  f"dsc/inductor {res['inductor_s'] / res['dsc_s']:.2f}x", flush=True)
    if args.block != "none":
        for dt in args.dtypes.split(","):
            res = bench_block(args.block, DTYPES[dt], max(5, args.reps // 2), args.block_batch, args.block_seq)
            print(json.dumps(res) if args.json else
                  f"{args.block} block fwd+bwd {res['shape']} {res['dtype']}: eager {res['eager_s'] * 1e3:.1f} ms, "
                  f"inductor {res['inductor_s'] * 1e3:.1f} ms, dsc {res['dsc_s'] * 1e3:.1f} ms "
                  f"({res['kernels']} kernels; without fusion {res['dsc_nofusion_s'] * 1e3:.1f} ms): dsc/eager {res['eager_s'] / res['dsc_s']:.2f}x, "
                  f"dsc/inductor {res['inductor_s'] / res['dsc_s']:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
