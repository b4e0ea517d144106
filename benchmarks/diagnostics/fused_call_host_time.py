"""Host time inside dsc's fused calls during GPT-block bf16 steps (no profiler): forward
(autograd_impl), backward (_Fused.backward), and the Triton launches within, per step.

Measured on an H100 in stop 13 (benchmarks/results/h100-2026-11-26-stop13/). Run from the repository root on a CUDA machine: python benchmarks/diagnostics/fused_call_host_time.py"""
import sys, time, collections
sys.path.insert(0, "benchmarks")
import torch, bench_fusion
bench_fusion.DEVICE = "cuda"
import dsc
from dsc.passes import fusion
T = collections.Counter()
def timed(key, fn):
    def w(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            T[key] += time.perf_counter() - t0
    return w
block, x = bench_fusion.build_block("gpt", torch.bfloat16, 16, 512)
c = dsc.compile(block, {"fusion": {"enabled": True}}, example_inputs=(x,))
go = lambda: c(x.detach().requires_grad_()).backward()
go()
for k in c.report()["kernels"]:
    K = fusion.KERNELS[k["name"]]
    for dt in list(K.compiled):
        K.compiled[dt] = timed("launch fwd", K.compiled[dt])
    for dt, b in list(K._bwd.items()):
        if b and b[0]:
            K._bwd[dt] = (timed("launch bwd", b[0]), *b[1:])
    print(k["name"], k["backward"], K.input_shapes, dict(K.calls))
fusion.Kernel.__call__ = timed("Kernel.__call__", fusion.Kernel.__call__)
fusion._Fused.forward = staticmethod(timed("_Fused.forward", fusion._Fused.forward))
fusion._backward = timed("_backward", fusion._backward)
for _ in range(5): go()
torch.cuda.synchronize(); T.clear()
t0 = time.perf_counter()
for _ in range(20):
    t1 = time.perf_counter(); y = c(x.detach().requires_grad_()); T["whole forward"] += time.perf_counter() - t1
    t1 = time.perf_counter(); y.backward(); T["whole backward"] += time.perf_counter() - t1
torch.cuda.synchronize()
print(f"step {(time.perf_counter() - t0) / 20 * 1e3:.2f} ms; per step (us): " + ", ".join(f"{k} {v / 20 * 1e6:.0f}" for k, v in T.items()))
for k in c.report()["kernels"]:
    print(k["name"], dict(fusion.KERNELS[k["name"]].calls))
