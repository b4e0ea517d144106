"""GELU (erf) in Triton: tl.erf vs dsc's rational erf (common.h.j2), IEEE and approximate division.

Measured on an H100 in stop 13 (benchmarks/results/h100-2026-11-26-stop13/). Run on a CUDA machine: python benchmarks/diagnostics/triton_erf.py"""
import torch, triton, triton.language as tl
from triton.testing import do_bench

@triton.jit
def erf_rat(x, FAST: tl.constexpr):
    s = x * x
    p = 1.921718909938084e-08
    p = p * s - 1.990313032767738e-06
    p = p * s + 1.555353297146074e-04
    p = p * s + 4.292997510946532e-03
    p = p * s + 5.243330096825046e-02
    p = p * s + 2.1394344796896245e-01
    p = p * s + 1.1283786772808513e+00
    q = 1.0980240862657979e-03
    q = q * s + 1.5550981649900372e-02
    q = q * s + 1.207991026238534e-01
    q = q * s + 5.229301008610889e-01
    q = q * s + 1.0
    if FAST:
        e = tl.fdiv(x * p, q, ieee_rounding=False)
    else:
        e = x * p / q
    return tl.where(tl.abs(x) >= 3.92, tl.where(x < 0, -1.0, 1.0), e)

@triton.jit
def gelu_k(x_ptr, b_ptr, y_ptr, n, cols, MODE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m).to(tl.float32) + tl.load(b_ptr + offs % cols, mask=m).to(tl.float32)
    u = x * 0.7071067811865476
    if MODE == 0:
        e = tl.erf(u)
    elif MODE == 1:
        e = erf_rat(u, False)
    else:
        e = erf_rat(u, True)
    tl.store(y_ptr + offs, (0.5 * x * (1.0 + e)).to(y_ptr.dtype.element_ty), mask=m)

def run(x, b, mode, block=1024):
    y = torch.empty_like(x)
    n = x.numel()
    gelu_k[(triton.cdiv(n, block),)](x, b, y, n, x.shape[-1], MODE=mode, BLOCK=block, num_warps=4)
    return y

copy_src = torch.empty(16384 * 4096, device="cuda"); copy_dst = torch.empty_like(copy_src)
copy = 2 * copy_src.numel() * 4 / (do_bench(lambda: copy_dst.copy_(copy_src), warmup=50, rep=300) * 1e-3)
print(f"copy {copy/1e9:.0f} GB/s")
for dt in (torch.bfloat16, torch.float32):
    for rows, cols in ((8192, 1024), (4096, 4096), (16384, 4096)):
        x = (torch.randn(rows, cols, device="cuda") * 3).to(dt)
        b = (0.1 * torch.randn(cols, device="cuda")).to(dt)
        ref = torch.nn.functional.gelu(x.double() + b.double())
        eager = torch.nn.functional.gelu(x + b).double()
        line = f"{str(dt):15} {rows}x{cols}"
        for mode, name in ((0, "tl.erf"), (1, "rational/"), (2, "rational fdiv")):
            y = run(x, b, mode)
            err = (y.double() - ref).abs().max().item()
            for blk in (1024, 2048):
                t = do_bench(lambda: run(x, b, mode, blk), warmup=50, rep=300) * 1e-3
                gbps = 2 * x.numel() * x.element_size() / t
                line += f" | {name} B{blk} {gbps/1e9:5.0f} GB/s ({gbps/copy:4.0%})"
            line += f" err {err:.1e}"
        line += f" | eager err {(eager - ref).abs().max().item():.1e}"
        print(line, flush=True)
