"""Is the dsc+fusion step host-bound or does it synchronize? Host enqueue time vs wall per step,
and one step under torch.cuda.set_sync_debug_mode('warn').

Measured on an H100 in stop 13 (benchmarks/results/h100-2026-11-26-stop13/). Run from the repository root on a CUDA machine: python benchmarks/diagnostics/host_bound_or_sync.py"""
import sys, time, warnings
sys.path.insert(0, "benchmarks")
import torch, bench_fusion
bench_fusion.DEVICE = "cuda"
import dsc
for kind in ("gpt",):
    block, x = bench_fusion.build_block(kind, torch.bfloat16, 16, 512)
    cs = {"eager": block, "dsc": dsc.compile(block, {}, example_inputs=(x,)),
          "dsc+fusion": dsc.compile(block, {"fusion": {"enabled": True}}, example_inputs=(x,))}
    for name, m in cs.items():
        go = lambda: m(x.detach().requires_grad_()).backward()
        for _ in range(5): go()
        torch.cuda.synchronize()
        fw = []
        for r in range(3):
            t0 = time.perf_counter()
            for _ in range(20): go()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            fw.append(((t1 - t0) / 20 * 1e3, (t2 - t0) / 20 * 1e3))
        # forward alone, host time
        torch.cuda.synchronize(); t0 = time.perf_counter()
        for _ in range(20): y = m(x.detach().requires_grad_())
        tf = (time.perf_counter() - t0) / 20 * 1e3; del y
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            go()
            torch.cuda.set_sync_debug_mode(0)
        syncs = sorted({str(i.message)[:150] for i in w if "synchroniz" in str(i.message)})
        print(f"{kind} {name}: enqueue/wall ms per step " + ", ".join(f"{a:.2f}/{b:.2f}" for a, b in fw)
              + f"; forward enqueue {tf:.2f} ms; syncing calls: {len(syncs)} {syncs}", flush=True)
