"""Kernel fusion: each fused pattern against eager (forward and backward, fp32 and bf16, irregular
shapes), the kernel cache, the fallback when no compiler exists, and whole-model training parity
with fusion on (real gloo ranks)."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dsc
from dsc.codegen import cache
from dsc.passes.fusion import KERNELS

from helpers import TESTS, dsc_run
from test_parity_dp import CLIP, GAS, LR, MICRO, STEPS, assert_params_close, eager_reference

ROWS, COLS = 1823, 781  # irregular: no multiple of a vector width or a thread count


class LayerNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(COLS)
        nn.init.normal_(self.ln.weight, 1.0, 0.1)
        nn.init.normal_(self.ln.bias, 0.0, 0.1)

    def forward(self, x):
        return self.ln(x)


class ResidualLayerNorm(LayerNorm):  # h = x + r feeds the norm and the next residual: one kernel
    def forward(self, x, r):
        h = x + r
        return self.ln(h) + h


class ResidualLayerNormOnly(LayerNorm):  # h = x + r feeds the norm alone: h gets no gradient of its own
    def forward(self, x, r):
        return self.ln(x + r)


class RMSNorm(nn.Module):  # Llama's formulation, decomposed into pow/mean/rsqrt/mul by capture
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(COLS))

    def forward(self, x):
        return self.norm(x)

    def norm(self, x):
        var = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + 1e-6))


class ResidualRMSNorm(RMSNorm):  # Llama's residual stream: h = x + r feeds the norm and the next add
    def forward(self, x, r):
        h = x + r
        return self.norm(h) + h


class ResidualRMSNormOnly(RMSNorm):
    def forward(self, x, r):
        return self.norm(x + r)


class MaskedSoftmax(nn.Module):
    def forward(self, x, mask):
        return torch.softmax(x * 0.125 + mask, dim=-1)


class BiasGelu(nn.Module):
    def __init__(self, approximate):
        super().__init__()
        self.bias = nn.Parameter(0.1 * torch.randn(COLS))
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(x + self.bias, approximate=self.approximate)


class GeluNew(nn.Module):  # GPT-2's gelu_new, written out: a pointwise chain of 8 ops
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class PositionGelu(nn.Module):  # a [1, T, C] operand repeated over the batch (position embeddings)
    def __init__(self):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, 263, COLS))

    def forward(self, x):
        return F.gelu(x + self.pos, approximate="tanh") * 0.5


class SwiGLU(nn.Module):
    def forward(self, a, b):
        return F.silu(a) * b


class ScaleResidualRelu(nn.Module):
    def forward(self, x, r):
        return torch.relu(x * 0.5 + r)


class DequantGelu(nn.Module):  # int8 weights, symmetric, one scale per column; then used
    def __init__(self):
        super().__init__()
        self.register_buffer("q", torch.randint(-128, 128, (ROWS, COLS), dtype=torch.int8))
        self.scale = nn.Parameter(0.01 + 0.05 * torch.rand(COLS))

    def forward(self, x):
        return F.gelu(self.q[:x.shape[0]].to(x.dtype) * self.scale + x)


class DequantAsymSilu(nn.Module):  # uint8, asymmetric: a zero point and a scale per row
    def __init__(self):
        super().__init__()
        self.register_buffer("q", torch.randint(0, 256, (ROWS, COLS), dtype=torch.uint8))
        self.register_buffer("zero", torch.randint(100, 156, (ROWS, 1), dtype=torch.uint8))
        self.scale = nn.Parameter(0.01 + 0.05 * torch.rand(ROWS, 1))

    def forward(self, x):
        n = x.shape[0]
        w = (self.q[:n].to(x.dtype) - self.zero[:n].to(x.dtype)) * self.scale[:n]
        return F.silu(w) * x


def inputs(name, dtype):
    g = torch.Generator().manual_seed(7)
    if name == "position_gelu":  # 7 x 263 x 781: a batch of sequences
        return ((torch.randn(7, 263, COLS, generator=g) * 3).to(dtype),)
    x = torch.randn(ROWS, COLS, generator=g) * 3
    if name == "softmax":
        mask = torch.where(torch.rand(COLS, generator=g) < 0.2, float("-inf"), 0.0)
        return x.to(dtype), mask.to(dtype)
    if name in ("swiglu", "residual_relu", "residual_layernorm", "residual_rmsnorm"):
        return x.to(dtype), torch.randn(ROWS, COLS, generator=g).to(dtype)
    return (x.to(dtype),)


PATTERNS = {  # name -> (module builder, the kernel pattern expected in the report)
    "layernorm": (LayerNorm, "layernorm"),
    "residual_layernorm": (ResidualLayerNorm, "layernorm"),
    "rmsnorm": (RMSNorm, "rmsnorm"),
    "residual_rmsnorm": (ResidualRMSNorm, "rmsnorm"),
    "softmax": (MaskedSoftmax, "softmax"),
    "bias_gelu_erf": (lambda: BiasGelu("none"), "pointwise"),
    "bias_gelu_tanh": (lambda: BiasGelu("tanh"), "pointwise"),
    "gelu_new": (GeluNew, "pointwise"),
    "swiglu": (SwiGLU, "pointwise"),
    "position_gelu": (PositionGelu, "pointwise"),
    "residual_relu": (ScaleResidualRelu, "pointwise"),
    "dequant_gelu": (DequantGelu, "pointwise"),  # dequantize prologues: integer tensors read by the kernel
    "dequant_asym_silu": (DequantAsymSilu, "pointwise"),
}


def run(module, xs, fused: bool):
    xs = [x.clone().requires_grad_(x.dtype.is_floating_point and not torch.isinf(x).any()) for x in xs]
    model = dsc.compile(module, {"fusion": {"enabled": True}}, example_inputs=tuple(x.detach() for x in xs)) \
        if fused else module
    y = model(*xs)
    g = torch.Generator().manual_seed(3)
    dy = torch.randn(y.shape, generator=g).to(device=y.device, dtype=y.dtype)  # CPU or GPU (test_gpu.py)
    y.backward(dy)
    grads = [x.grad for x in xs if x.requires_grad] + [p.grad for p in module.parameters()]
    return model, y.detach(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_fused_pattern_matches_eager_forward_and_backward(name, dtype):
    build, pattern = PATTERNS[name]
    torch.manual_seed(0)
    ref_module = build().to(dtype)
    torch.manual_seed(0)
    module = build().to(dtype)
    xs = inputs(name, dtype)
    compiled, y, grads = run(module, xs, fused=True)
    _, y_ref, grads_ref = run(ref_module, xs, fused=False)
    kernels = compiled.report()["kernels"]
    assert [k["pattern"] for k in kernels] == [pattern], kernels
    assert all(KERNELS[k["name"]].calls["kernel"] >= 1 for k in kernels)  # the generated kernel ran
    if name in ("residual_layernorm", "residual_rmsnorm"):  # the residual add is the kernel's first op
        assert kernels[0]["ops"][:2] in (["add.Tensor", "layer_norm"], ["add.Tensor", "pow.Tensor_Scalar"])
    if name == "position_gelu":
        assert kernels[0]["inputs"] == ["full", "inner:263"]
    if name.startswith("dequant"):  # the integer tensors are the kernel's inputs, cast as it loads them
        assert kernels[0]["name"].startswith("pointwise_dequant_") and "to.dtype" in kernels[0]["ops"]
        assert kernels[0]["inputs"] == (["full", "vec", "full"] if name == "dequant_gelu" else ["full", "row", "row", "full"])
        assert "const int8_t *restrict in0" in open(kernels[0]["source"]).read() if name == "dequant_gelu" else \
            "const uint8_t *restrict in1" in open(kernels[0]["source"]).read()
    if kernels[0].get("backward") == "generated":  # LayerNorm / RMSNorm: a generated backward kernel
        assert KERNELS[kernels[0]["name"]].calls["backward"] >= 1
        _assert_grads_as_accurate_as_eager(build, xs, grads, grads_ref, dtype)
        grads, grads_ref = [], []  # compared against float64 instead of eager (below: the forward)
    if dtype == torch.float32:
        if not torch.allclose(y, y_ref, rtol=1e-5, atol=2e-6):
            y, y_ref = _rerun_forward_after_mismatch(build, module, ref_module, xs, y, y_ref)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=2e-6)
        if not _all_close(grads, grads_ref):
            grads, grads_ref = _rerun_after_mismatch(module, ref_module, xs, grads, grads_ref)
        for g, r in zip(grads, grads_ref):  # backward recomputes the unfused ops: eager's gradient
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    else:  # one rounding to bf16 at the end vs eager's rounding after every op: a few bf16 steps apart
        torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
        for g, r in zip(grads, grads_ref):
            torch.testing.assert_close(g.float(), r.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("cols", [781, 780], ids=["odd_ST", "even_PK"])
@pytest.mark.parametrize("name", ["bias_gelu_erf", "swiglu", "rmsnorm", "residual_layernorm", "softmax"])
def test_bf16_kernels_keep_nan_and_infinity_where_eager_has_them(name, cols, monkeypatch):
    """bf16 stores round without a NaN test (common.h.j2, ST/PK): a NaN in a bf16 kernel has its low
    16 bits zero, so rounding cannot carry it into an infinity. NaN and +-inf inputs, and the
    finite values that overflow bf16, come out NaN and +-inf where eager's do, in rows of odd
    length (one element per lane, ST) and even length (two per 32-bit word, PK)."""
    monkeypatch.setitem(globals(), "COLS", cols)  # the pattern modules and inputs() read it
    build, _ = PATTERNS[name]
    torch.manual_seed(0)
    module = build().to(torch.bfloat16)
    xs = [x.clone() for x in inputs(name, torch.bfloat16)]
    x = xs[0]
    x[0, :7] = torch.tensor([float("nan"), float("inf"), float("-inf"), 3.3e38, -3.3e38, 1e38, 0.0])
    x[1, 3] = float("nan")  # one NaN in an otherwise finite row
    x[2, ::2] = float("inf")
    compiled = dsc.compile(module, {"fusion": {"enabled": True}}, example_inputs=tuple(xs))
    with torch.no_grad():
        got, want = compiled(*xs).float(), module(*xs).float()
    [k] = compiled.report()["kernels"]
    assert KERNELS[k["name"]].calls["kernel"] >= 1
    assert torch.equal(got.isnan(), want.isnan()), (got.isnan().sum(), want.isnan().sum())
    assert torch.equal(got.isposinf(), want.isposinf()) and torch.equal(got.isneginf(), want.isneginf())
    fin = want.isfinite()
    torch.testing.assert_close(got[fin], want[fin], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["residual_layernorm", "residual_rmsnorm", "softmax", "gelu_new", "position_gelu"])
def test_streaming_stores_write_what_plain_stores_write(name, dtype, monkeypatch):
    """Outputs of at least DSC_NT_BYTES are computed in L1 chunks and written with streaming stores
    (common.h.j2). The test shapes are below the default 8 MiB, so 0 forces that path here, on
    irregular rows (781 columns: no row starts 32-byte aligned) for every template, forward and the
    generated norm backward: the results must be bitwise those of the plain-store kernels."""
    build, _ = PATTERNS[name]
    xs = inputs(name, dtype)
    results = []
    for nt in ("1000000000000", "0"):
        monkeypatch.setenv("DSC_NT_BYTES", nt)
        torch.manual_seed(0)
        compiled, y, grads = run(build().to(dtype), xs, fused=True)
        (kernel,) = compiled.report()["kernels"]
        assert f"#define DSC_NT_BYTES ({nt}LL)" in open(kernel["source"]).read()
        results.append((y, grads))
    (y1, g1), (y0, g0) = results
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", [*[n for n in PATTERNS if not n.startswith("dequant")], "dropout"])
def test_bf16_pairs_match_one_element_per_lane(name, monkeypatch):
    """bf16 rows of even length run two elements per 32-bit word (LO/HI/PK in common.h.j2), with
    plain and with streaming stores; DSC_BF16_PAIRS=0 turns that off. Pointwise kernels compute
    each element as before, so the outputs (dropout's mask included) must be bitwise the same;
    norms and softmax sum a row in another order: within one bf16 step of each other, and both
    within the parity test's bound of eager. The test's other shapes have odd rows (781): there
    the one-element path runs."""
    monkeypatch.setattr(sys.modules[__name__], "COLS", 782)
    dtype = torch.bfloat16
    if name == "dropout":
        build, pattern, xs = lambda: BiasGeluDropoutResidual(0.1, cols=782), "pointwise", inputs("residual_relu", dtype)
    else:
        (build, pattern), xs = PATTERNS[name], inputs(name, dtype)
    results = {}
    for pairs, nt in (("1", "0"), ("1", "1000000000000"), ("0", "1000000000000")):
        monkeypatch.setenv("DSC_BF16_PAIRS", pairs)
        monkeypatch.setenv("DSC_NT_BYTES", nt)
        torch.manual_seed(0)
        module = build().to(dtype)
        torch.manual_seed(1)  # dropout's seed
        compiled, y, grads = run(module, xs, fused=True)
        (kernel,) = compiled.report()["kernels"]
        assert kernel["pattern"] == pattern and KERNELS[kernel["name"]].calls["kernel"] >= 1
        assert f"const int pairs = {pairs} && cols % 2 == 0;" in open(kernel["source"]).read()
        results[pairs, nt] = y, grads
    (y1, g1), (y1s, g1s), (y0, g0) = results.values()
    assert torch.equal(y1, y1s) and all(torch.equal(a, b) for a, b in zip(g1, g1s))  # stores: bitwise
    if pattern == "pointwise":
        assert torch.equal(y1, y0) and all(torch.equal(a, b) for a, b in zip(g1, g0))
    else:  # the generated backward kernels (norms, softmax) have a pairs path too
        torch.testing.assert_close(y1.float(), y0.float(), rtol=8e-3, atol=8e-3)
        for a, b in zip(g1, g0):
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    if name != "dropout":
        torch.manual_seed(0)
        _, y_ref, _ = run(build().to(dtype), xs, fused=False)
        torch.testing.assert_close(y1.float(), y_ref.float(), rtol=2e-2, atol=2e-2)


def _assert_grads_as_accurate_as_eager(build, xs, grads, grads_ref, dtype):
    """A generated backward sums the weight gradient over rows in its own order, so it is compared
    with a float64 run of the same module, as eager is: its error (relative, in norm) must be at
    most eager's, or within fp32's 1e-6 / bf16's 1e-2. (Measured at 1823 x 781: LayerNorm fp32
    weight grad 1.8e-7 vs eager's 5.1e-7; bf16 2.4e-3 vs 3.6e-2, eager accumulating in bf16.)"""
    torch.manual_seed(0)
    ref64 = build().double().to(xs[0].device)
    _, _, grads64 = run(ref64, [x.double() for x in xs], fused=False)
    floor = 1e-6 if dtype == torch.float32 else 1e-2
    for g, r, d in zip(grads, grads_ref, grads64):
        err = float((g.double() - d).norm() / d.norm())
        eager = float((r.double() - d).norm() / d.norm())
        assert err <= max(eager, floor), f"gradient {tuple(g.shape)}: relative error {err:.3g}, eager's {eager:.3g}"


def _all_close(gs, rs) -> bool:
    return all(torch.allclose(g, r, rtol=1e-5, atol=1e-5) for g, r in zip(gs, rs))


def _rerun_after_mismatch(module, ref_module, xs, grads, grads_ref):
    """A one-off seen in 3 of ~15 full-suite runs (never reproduced alone, in loops of this file,
    or under load): gelu_new's fp32 input gradient came out as if torch.tanh, inside the fused
    op's recomputing backward, had returned +-1 for |u| >= 5 on one OpenMP thread's half of the
    tensor (20.7% of elements off by <= 2.8e-3; the forward, our kernel, was right). Both sides
    run again: a mismatch that repeats is a dsc bug and fails; one that does not is reported as
    a warning with its numbers (see the issue-5 note) and the second run's results are compared."""
    import warnings

    for p in [*module.parameters(), *ref_module.parameters()]:
        p.grad = None
    _, _, grads2 = run(module, xs, fused=True)
    _, _, ref2 = run(ref_module, xs, fused=False)
    diffs = []
    for g, r, r2 in zip(grads, grads_ref, ref2):
        bad = ~torch.isclose(g, r, rtol=1e-5, atol=1e-5)
        if bad.any():
            rows = bad.nonzero()[:, 0] if bad.dim() else torch.zeros(1)
            diffs.append(f"{int(bad.sum())}/{bad.numel()} elements, max |diff| {float((g - r).abs().max()):.3g}, "
                         f"rows {int(rows.min())}-{int(rows.max())}, fused==0 at {float((g[bad] == 0).float().mean()):.0%}"
                         f" of them, eager repeatable: {torch.equal(r, r2)}")
    warnings.warn(f"fused backward differed from eager on the first run ({'; '.join(diffs)}); "
                  "comparing a second run")
    return grads2, ref2


def _rerun_forward_after_mismatch(build, module, ref_module, xs, y, y_ref):
    """The same one-off as `_rerun_after_mismatch`, seen once in the forward (stop 12, one of six
    full-suite runs): gelu_new fp32, 28.7% of elements off by up to 1.7e-4, the size of torch.tanh
    returning +-1 where |u| >= 5. Both sides are measured against float64 and run again: a
    mismatch that repeats fails; one that does not is reported as a warning naming the side that
    was off, and the second run's outputs are compared."""
    import warnings

    torch.manual_seed(0)
    ref64 = build().double()
    with torch.no_grad():
        y64 = ref64(*[x.double() for x in xs])
    _, y2, _ = run(module, xs, fused=True)
    _, y_ref2, _ = run(ref_module, xs, fused=False)
    err = lambda v: float((v.double() - y64).abs().max())  # noqa: E731
    warnings.warn(f"fused forward differed from eager on the first run: max |diff| {float((y - y_ref).abs().max()):.3g} "
                  f"in {int((~torch.isclose(y, y_ref, rtol=1e-5, atol=2e-6)).sum())}/{y.numel()} elements; "
                  f"max error against float64: fused {err(y)}, eager {err(y_ref)}; second run: fused repeatable "
                  f"{torch.equal(y, y2)}, eager repeatable {torch.equal(y_ref, y_ref2)}")
    return y2, y_ref2


def test_fused_call_appears_in_the_rank_graph_by_name():
    compiled = dsc.compile(GeluNew(), {"fusion": {"enabled": True}}, example_inputs=(torch.randn(8, 16),))
    [kernel] = compiled.report()["kernels"]
    assert kernel["ops"].count("mul.Tensor") >= 4 and "sigmoid" in kernel["ops"]  # 1 + tanh(u) = 2 sigmoid(2u)
    assert f"torch.ops.dsc_fused.{kernel['name']}" in compiled.module.code
    code = compiled.module.code.replace(kernel["name"], "")
    assert "tanh" not in code and "sigmoid" not in code and "aten.mul" not in code  # the chain is gone
    source = open(kernel["source"]).read()
    assert "v_sigmoid" in source and kernel["name"] in source


class GeluNewSquared(GeluNew):
    def forward(self, x):
        y = super().forward(x)
        return y * y  # mul saves y for backward: only autograd holds the kernel's output then


def test_training_never_reuses_an_output_that_autograd_saved():
    """Two forwards before one backward: the first output must survive the second call."""
    module = GeluNewSquared()
    x1, x2 = torch.randn(64, 96), torch.randn(64, 96)
    compiled = dsc.compile(module, {"fusion": {"enabled": True}}, example_inputs=(x1,))
    a, b = x1.clone().requires_grad_(), x2.clone().requires_grad_()
    out1 = compiled(a)
    compiled(b)  # with reuse this call would overwrite the buffer that out1's backward reads
    out1.sum().backward()
    ref = x1.clone().requires_grad_()
    module(ref).sum().backward()
    torch.testing.assert_close(a.grad, ref.grad, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # inference: the buffer is reused once nothing holds it
        [k] = compiled.report()["kernels"]
        compiled(x1)
        first = KERNELS[k["name"]]._pool[(0, torch.float32)].data_ptr()
        compiled(x2)
        assert KERNELS[k["name"]]._pool[(0, torch.float32)].data_ptr() == first


def test_whether_a_call_ran_the_kernel_is_kept_per_thread():
    """A backward picks the generated kernel when its forward ran the kernel, the recompute when
    the forward ran the unfused ops (`Kernel.ran`): a thread whose call fell back must not change
    what another thread's call recorded."""
    import threading

    x, module = torch.randn(37, 53), LayerNormSmall()
    compiled = dsc.compile(module, {"fusion": {"enabled": True}}, example_inputs=(x,))
    [k] = compiled.report()["kernels"]
    kernel = KERNELS[k["name"]]
    xs = [x, module.ln.weight.detach(), module.ln.bias.detach()]  # the LayerNorm kernel's inputs
    kernel(xs)
    assert kernel.ran and kernel.calls["kernel"] == 1
    seen = []

    def other():  # another shape than the one compiled: this call runs the unfused ops
        kernel([torch.randn(5, 53), *xs[1:]])
        seen.append(kernel.ran)

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen == [False] and kernel.calls["fallback"] == 1
    assert kernel.ran  # this thread's last call still ran the kernel


def test_second_compile_reuses_the_cached_kernel(tmp_path, monkeypatch):
    monkeypatch.setenv("DSC_CACHE_DIR", str(tmp_path))
    x = (torch.randn(37, 53),)
    dsc.compile(LayerNormSmall(), {"fusion": {"enabled": True}}, example_inputs=x)
    compiles, hits = cache.stats["compiles"], cache.stats["hits"]
    assert len(list(tmp_path.glob("k_*.so"))) == 2  # the LayerNorm kernel and its backward
    dsc.compile(LayerNormSmall(), {"fusion": {"enabled": True}}, example_inputs=x)
    # forward, backward and backward's reduce (the same library): found, nothing compiled
    assert cache.stats["compiles"] == compiles and cache.stats["hits"] == hits + 3


class LayerNormSmall(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(53)

    def forward(self, x):
        return self.ln(x)


def test_ranks_compiling_the_same_kernel_at_once_do_not_corrupt_the_cache(tmp_path):
    """Four processes build one new kernel concurrently: all load a complete library."""
    code = ("import sys, ctypes; from dsc.codegen import cpu; "
            "src = cpu.render('pointwise.c.j2', name='k_race', dtype='f32', replaced='test', inputs=['full'], "
            "body=['const float t0 = v_exp(v0) * 1.2345f;'], outputs=['t0'], seeded=False); "
            "fn, lib, _ = cpu.compile_kernel(src, 'k_race'); print(lib)")
    env = dict(os.environ, DSC_CACHE_DIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    assert len({o[0].strip() for o in outs}) == 1 and len(list(tmp_path.glob("k_*.so"))) == 1
    assert not list(tmp_path.glob("tmp*"))  # no half-written leftovers


def test_without_a_compiler_the_ops_run_unfused_and_the_report_says_why(monkeypatch):
    monkeypatch.setenv("DSC_NO_CC", "1")
    module = GeluNew()
    x = torch.randn(8, 16)
    compiled = dsc.compile(module, {"fusion": {"enabled": True}}, example_inputs=(x,))
    report = compiled.report()
    assert report["kernels"] == []
    assert any("DSC_NO_CC" in d["reason"] for d in report["declined_fusion"])
    torch.testing.assert_close(compiled(x), module(x))


def test_fusion_plan_section_validates():
    from dsc.schemas import PlanError, load_plan

    plan = load_plan({"fusion": {"enabled": True, "patterns": ["layernorm"]}})
    assert plan.fusion.backend == "auto" and plan.fusion.patterns == ["layernorm"]
    with pytest.raises(PlanError) as err:
        load_plan({"fusion": {"enabled": True, "patterns": ["layernrom"]}})
    assert "fusion.patterns" in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("model_name,stages", [("gpt", "0,3"), ("hf_gpt2", "2"), ("hf_llama", "2")])
def test_training_with_fusion_matches_eager(tmp_path, model_name, stages):
    """5 AdamW steps on 2 ranks with generated kernels in forward (GPT-2: gelu_new chains and
    LayerNorm; Llama: RMSNorm and SwiGLU; GPT and Llama: the residual add joined to the norm) and
    generated backward kernels for the norms and the pointwise groups, against single-process eager."""
    ref_losses, ref_state, _, noise = eager_reference(model_name, 2)
    out = tmp_path / "fused.pt"
    dsc_run(2, TESTS / "dist_worker.py", "--model", model_name, "--stages", stages, "--steps", str(STEPS),
            "--micro", str(MICRO), "--gas", str(GAS), "--lr", str(LR), "--clip", str(CLIP), "--fusion",
            "--out", str(out))
    for stage, res in torch.load(out, weights_only=False).items():
        assert res["kernel_calls"] and all(c["kernel"] > 0 for c in res["kernel_calls"].values())
        assert res["eval_gap"] <= 1e-5 * abs(res["losses"][-1])  # the eval graph, fused too, agrees
        generated = [k for k in res["report"]["kernels"] if k.get("backward") == "generated"]
        norms = [k for k in generated if k["pattern"] != "pointwise"]
        assert norms and all(res["kernel_calls"][k["name"]]["backward"] > 0 for k in norms)
        # pointwise groups too (GELU, SwiGLU); some see no gradient at all (Llama's rotary cos/sin)
        assert any(res["kernel_calls"][k["name"]]["backward"] > 0 for k in generated if k["pattern"] == "pointwise")
        if model_name in ("gpt", "hf_llama"):  # h = x + r joined the next norm (Llama: through the no-op cast)
            assert any(k["ops"][0] == "add.Tensor" and res["kernel_calls"][k["name"]]["backward"] > 0 for k in norms)
        if model_name == "hf_gpt2":  # gelu_new's 1 + tanh(u) ran as 2 sigmoid(2u), one per block
            [fusion] = [p for p in res["report"]["passes"] if p["name"] == "fuse_kernels"]
            assert len(fusion["details"]["rewrites"]["1 + tanh(u) -> 2 sigmoid(2u)"]) == 2
            assert any("sigmoid" in k["ops"] and res["kernel_calls"][k["name"]]["kernel"] > 0 for k in generated)
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)
        assert_params_close(res["state"], ref_state, noise, f"fusion ZeRO-{stage} {model_name}")


TRITON_PATTERNS = ["layernorm", "residual_layernorm", "rmsnorm", "residual_rmsnorm", "softmax", "bias_gelu_erf",
                   "bias_gelu_tanh", "gelu_new", "swiglu", "position_gelu", "dequant_asym_silu"]


@pytest.mark.parametrize("name", TRITON_PATTERNS)
def test_triton_kernels_under_the_interpreter_match_eager(name, monkeypatch):
    """The Triton backend on CPU tensors through TRITON_INTERPRET=1 (on a GPU the same kernels run
    natively); a small irregular shape keeps the interpreter quick."""
    pytest.importorskip("triton", reason="triton is not installed (it is in requirements-dev.txt)")
    if os.environ.get("TRITON_INTERPRET") != "1":  # CPU tensors: tests/test_gpu.py runs them on a GPU
        pytest.skip("TRITON_INTERPRET was not set before triton was imported (see conftest.py)")
    build, pattern = PATTERNS[name]
    torch.manual_seed(0)
    ref_module = build()
    torch.manual_seed(0)
    module = build()
    xs = [x[:67] if x.dim() == 2 else x[:2] if x.dim() == 3 else x for x in inputs(name, torch.float32)]
    xs = [x.clone().requires_grad_(not torch.isinf(x).any()) for x in xs]
    compiled = dsc.compile(module, {"fusion": {"enabled": True, "backend": "triton"}},
                           example_inputs=tuple(x.detach() for x in xs))
    [kernel] = compiled.report()["kernels"]
    assert kernel["backend"] == "triton" and kernel["pattern"] == pattern and kernel["source"].endswith(".py")
    y = compiled(*xs)
    assert KERNELS[kernel["name"]].calls["kernel"] >= 1
    xs_ref = [x.detach().requires_grad_(x.requires_grad) for x in xs]
    y_ref = ref_module(*xs_ref)
    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-5, atol=2e-6)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    y.backward(dy)  # the generated Triton backward kernel (norms, softmax, pointwise groups)
    y_ref.backward(dy)
    assert kernel["backward"] == "generated" and kernel["backward_source"].endswith(".py")
    assert KERNELS[kernel["name"]].calls["backward"] >= 1
    grads = [x.grad for x in xs if x.requires_grad] + [p.grad for p in module.parameters()]
    grads_ref = [x.grad for x in xs_ref if x.requires_grad] + [p.grad for p in ref_module.parameters()]
    assert grads and len(grads) == len(grads_ref)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_triton_bf16_gelu_uses_the_rational_erf_and_rounds_like_eager(monkeypatch):
    """bf16 Triton kernels compute erf as the C backend does (x P(x^2)/Q(x^2), triton_common.py.j2),
    fp32 ones with tl.erf. Under the interpreter, bias + GELU in bf16 on 67 rows: the output within
    one bf16 step of the float64 GELU of the same inputs (the interpreter converts fp32 to bf16 by
    truncation, where a GPU rounds to nearest even), forward and the generated backward within the
    bf16 pattern test's bound of eager."""
    pytest.importorskip("triton", reason="triton is not installed (it is in requirements-dev.txt)")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET was not set before triton was imported (see conftest.py)")
    build, _ = PATTERNS["bias_gelu_erf"]
    torch.manual_seed(0)
    module = build().to(torch.bfloat16)
    xs = [x[:67] for x in inputs("bias_gelu_erf", torch.bfloat16)]
    compiled = dsc.compile(module, {"fusion": {"enabled": True, "backend": "triton"}}, example_inputs=tuple(xs))
    [kernel] = compiled.report()["kernels"]
    source = open(kernel["source"]).read()
    assert kernel["backend"] == "triton" and "1.1283786772808513" in source and "tl.erf(" not in source
    xg = [x.clone().requires_grad_() for x in xs]
    y = compiled(*xg)
    assert KERNELS[kernel["name"]].calls["kernel"] >= 1
    with torch.no_grad():
        y64 = F.gelu(xs[0].double() + module.bias.double())
    # one truncation of the fp32 result: less than a bf16 step (2^-7 |y| at most), plus fp32's error
    assert bool(((y.double() - y64).abs() <= y64.abs() * 2.0 ** -7 * 1.01 + 1e-6).all())
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).bfloat16()
    y.backward(dy)
    ref = build().to(torch.bfloat16)
    ref.load_state_dict(module.state_dict())
    xr = [x.clone().requires_grad_() for x in xs]
    y_ref = ref(*xr)
    y_ref.backward(dy)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(xg[0].grad.float(), xr[0].grad.float(), rtol=2e-2, atol=2e-2)
    # the bias gradient sums 67 rows of truncated values: within a bf16 step of each term (and of
    # the sum) of the float64 gradient
    h = (xs[0].double() + module.bias.detach().double()).requires_grad_()
    F.gelu(h).backward(dy.double())
    terms = h.grad
    bound = (terms.abs().sum(0) + terms.sum(0).abs()) * 2.0 ** -7 * 1.01 + 1e-6
    assert bool(((module.bias.grad.double() - terms.sum(0)).abs() <= bound).all())


class BiasGeluDropoutResidual(nn.Module):  # GPT-2's MLP tail: bias, GELU, dropout, residual add
    def __init__(self, p=0.1, cols=COLS):
        super().__init__()
        self.bias = nn.Parameter(0.1 * torch.randn(cols))
        self.p = p

    def forward(self, x, r):
        return F.dropout(F.gelu(x + self.bias), self.p, training=self.training) + r


class TwoDropouts(nn.Module):  # two dropout sites in one kernel must draw independent masks
    def forward(self, x):
        return F.dropout(x, 0.5) * F.dropout(x, 0.5)


def _dropout_run(module, x, r, seed):
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    y = module(x, r)
    y.backward(torch.ones_like(y) * 0.5)
    return y.detach(), x.grad


def test_dropout_fuses_with_a_counter_based_rng_and_backward_redraws_the_same_mask():
    from dsc.passes.fusion import dropout_keep

    torch.manual_seed(0)
    module = BiasGeluDropoutResidual(p=0.1)
    x, r = inputs("residual_relu", torch.float32)
    compiled = dsc.compile(module, {"fusion": {"enabled": True}}, example_inputs=(x, r))
    [kernel] = compiled.report()["kernels"]
    assert kernel["ops"] == ["add.Tensor", "gelu", "dropout", "add.Tensor"] and kernel["dropout_p"] == [0.1]
    y, gx = _dropout_run(compiled, x, r, seed=5)
    assert KERNELS[kernel["name"]].calls["kernel"] >= 1
    # the mask the kernel drew is dropout_keep(seed): the seed is torch's next draw after manual_seed
    torch.manual_seed(5)
    keep = dropout_keep(x.shape, 0.1, int(torch.randint(0, 1 << 32, (), dtype=torch.int64)))
    n = keep.numel()
    assert abs(keep.float().mean().item() - 0.9) < 5 * math.sqrt(0.9 * 0.1 / n)  # ~0.9 ± 1.3e-3
    blocks = torch.stack([b.float().mean() for b in keep.flatten().tensor_split(16)])  # no region is biased
    assert (blocks - 0.9).abs().max().item() < 6 * math.sqrt(0.9 * 0.1 / (n / 16))
    # forward: eager's ops with that mask and torch's scale 1/(1-p) (fp32), within fused GELU's error
    scale = float(torch.tensor(1.0) / torch.tensor(0.9))
    xr = x.clone().requires_grad_()
    y_ref = torch.where(keep, F.gelu(xr + module.bias) * scale, torch.zeros(())) + r
    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-5, atol=2e-6)
    assert torch.equal(y[~keep], r[~keep])  # dropped elements are exactly 0 before the residual add
    # backward: the generated backward kernel redraws the forward's mask from the saved seed
    assert kernel["backward"] == "generated" and KERNELS[kernel["name"]].calls["backward"] >= 1
    y_ref.backward(torch.ones_like(y_ref) * 0.5)
    torch.testing.assert_close(gx, xr.grad, rtol=1e-5, atol=1e-6)
    assert (gx[~keep] == 0).all()
    # torch.manual_seed makes it repeatable; the next call draws a new mask
    y2, gx2 = _dropout_run(compiled, x, r, seed=5)
    assert torch.equal(y, y2) and torch.equal(gx, gx2)
    y3 = compiled(x, r)
    assert not torch.equal(y3, y)
    # eval mode: dropout is the identity (an eval graph without it)
    compiled.eval()
    module.eval()
    torch.testing.assert_close(compiled(x, r), module(x, r), rtol=1e-5, atol=2e-6)


def test_two_dropout_sites_in_one_kernel_draw_independent_masks():
    x = torch.randn(ROWS, COLS).abs() + 0.5  # nonzero, so y == 0 exactly where a mask dropped
    compiled = dsc.compile(TwoDropouts(), {"fusion": {"enabled": True}}, example_inputs=(x,))
    [kernel] = compiled.report()["kernels"]
    assert kernel["dropout_p"] == [0.5, 0.5]
    kept = (compiled(x) != 0).float().mean().item()
    assert abs(kept - 0.25) < 0.005, kept  # one shared mask would keep 0.5


def test_triton_dropout_draws_the_c_kernels_mask():
    """The Triton template's hash is the C template's: the same seed gives the same mask, in the
    forward and in each backend's generated backward kernel, which redraws it."""
    pytest.importorskip("triton", reason="triton is not installed (it is in requirements-dev.txt)")
    if os.environ.get("TRITON_INTERPRET") != "1":  # CPU tensors: tests/test_gpu.py runs them on a GPU
        pytest.skip("TRITON_INTERPRET was not set before triton was imported (see conftest.py)")
    torch.manual_seed(0)
    module = BiasGeluDropoutResidual(p=0.3, cols=129)
    x, r = torch.randn(67, 129), torch.randn(67, 129)
    outs = {}
    for backend in ("cpu", "triton"):
        compiled = dsc.compile(module, {"fusion": {"enabled": True, "backend": backend}}, example_inputs=(x, r))
        [kernel] = compiled.report()["kernels"]
        assert kernel["backend"] == backend
        outs[backend] = _dropout_run(compiled, x, r, seed=11)
        assert KERNELS[kernel["name"]].calls["kernel"] >= 1
        assert kernel["backward"] == "generated" and KERNELS[kernel["name"]].calls["backward"] >= 1  # mask redrawn
    torch.testing.assert_close(outs["cpu"][0], outs["triton"][0], rtol=1e-5, atol=2e-6)
    torch.testing.assert_close(outs["cpu"][1], outs["triton"][1], rtol=1e-5, atol=1e-6)


def test_triton_without_gpu_or_interpreter_is_declined(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    compiled = dsc.compile(GeluNew(), {"fusion": {"enabled": True, "backend": "triton"}},
                           example_inputs=(torch.randn(4, 8),))
    report = compiled.report()
    assert report["kernels"] == [] and "backend=triton" in report["declined_fusion"][0]["what"]


@pytest.mark.slow
def test_bf16_autocast_training_with_fusion_matches_eager_autocast(tmp_path):
    """precision bf16 (the graph runs under autocast): fused groups run in the dtype autocast would
    give their outputs (LayerNorm/RMSNorm in fp32, bf16 pointwise chains in bf16); pointwise
    groups' generated backward casts the saved inputs the same way, the norms recompute under the
    same autocast state; within the bf16 bound of the ZeRO tests."""
    from test_parity_dp import LOW_TOL, assert_low_precision_close

    ref_losses, ref_state, _, noise = eager_reference("hf_llama", 2, "bf16")
    out = tmp_path / "bf16_fused.pt"
    dsc_run(2, TESTS / "dist_worker.py", "--model", "hf_llama", "--stages", "2", "--steps", str(STEPS),
            "--micro", str(MICRO), "--gas", str(GAS), "--lr", str(LR), "--clip", str(CLIP), "--fusion",
            "--precision", "bf16", "--out", str(out))
    res = torch.load(out, weights_only=False)[2]
    assert res["kernel_calls"] and all(c["kernel"] > 0 for c in res["kernel_calls"].values())
    pointwise = [k["name"] for k in res["report"]["kernels"] if k["pattern"] == "pointwise"]
    assert any(res["kernel_calls"][k]["backward"] > 0 for k in pointwise)  # SwiGLU's, under autocast
    tol = LOW_TOL["bf16"]
    torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(ref_losses), rtol=tol, atol=0)
    assert_low_precision_close(res["state"], ref_state, noise, tol, "bf16 + fusion")


def test_gpt2_with_dropout_trains_with_fused_dropout_repeatably():
    """transformers' GPT-2 with its dropouts on: the embedding and residual dropouts fuse into
    kernels with their neighbours, training under a seed repeats exactly, and the loss drops."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from models import dataset, hf_batch

    def train(steps: int):
        torch.manual_seed(0)
        cfg = GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=97, n_positions=17, resid_pdrop=0.1,
                         embd_pdrop=0.1, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)
        data = dataset(1, 4)
        (args, kwargs) = hf_batch(data)
        compiled = dsc.compile(GPT2LMHeadModel(cfg), {"fusion": {"enabled": True},
                                                      "optimizer": {"type": "adamw", "lr": 3e-3}},
                               example_inputs=(args, kwargs))
        torch.manual_seed(1)
        losses = []
        for _ in range(steps):
            loss = compiled(*args, **kwargs).loss
            compiled.backward(loss)
            compiled.step()
            losses.append(loss.item())
        return compiled, losses

    compiled, losses = train(8)
    drops = [k for k in compiled.report()["kernels"] if k.get("dropout_p")]
    assert drops and all(k["dropout_p"] == [0.1] for k in drops), compiled.report()["kernels"]
    assert sum(k["uses"] for k in drops) == 1 + 2 * 2  # embeddings (+ position add) and two residuals per layer
    assert all(KERNELS[k["name"]].calls["kernel"] >= 8 for k in drops)
    _, again = train(8)
    assert losses == again
    assert losses[-1] < losses[0] - 0.2, losses


def test_eval_mode_graph_is_fused_too():
    """compiled.eval() captures an eval graph (dropout off); it gets the same kernels, and under
    no_grad they reuse their output buffers."""
    torch.manual_seed(0)
    module = BiasGeluDropoutResidual(p=0.1, cols=96)
    x, r = torch.randn(64, 96), torch.randn(64, 96)
    compiled = dsc.compile(module, {"fusion": {"enabled": True}}, example_inputs=(x, r))
    compiled.eval()
    module.eval()
    with torch.no_grad():
        y = compiled(x, r)
        ref = module(x, r)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=2e-6)
    kernels = compiled._eval_fusion.details["kernels"]
    assert [k["ops"] for k in kernels] == [["add.Tensor", "gelu", "add.Tensor"]]  # eval: dropout is removed
    assert "dropout_p" not in kernels[0]
    assert KERNELS[kernels[0]["name"]].calls["kernel"] >= 1
    assert any("dsc_fused" in str(n.target) for n in compiled._eval_gm.graph.nodes)


def test_a_backward_kernel_the_compiler_refuses_falls_back_to_recompute(monkeypatch):
    from dsc.passes import fusion

    def refuse(self, dtype):
        raise cache.CompileError("cc: error: (simulated)")

    monkeypatch.setattr(fusion.Kernel, "build_backward", refuse)
    torch.manual_seed(0)
    module, ref = LayerNormSmall(), LayerNormSmall()
    ref.load_state_dict(module.state_dict())
    x = torch.randn(37, 53)
    compiled = dsc.compile(module, {"fusion": {"enabled": True}}, example_inputs=(x,))
    [k] = compiled.report()["kernels"]
    assert k["backward"] == "recompute" and "simulated" in k["backward_declined"]
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    before = dict(KERNELS[k["name"]].calls)
    compiled(a).sum().backward()
    ref(b).sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    calls = KERNELS[k["name"]].calls
    assert calls["kernel"] == before["kernel"] + 1 and calls["backward"] == before["backward"]


def test_a_kernel_that_fails_at_run_time_falls_back_to_the_unfused_ops(monkeypatch):
    """Kernels can still fail after the compile: Triton compiles at the first launch, and a dtype
    the compile did not build (bf16 inputs to an fp32-compiled model, autocast) is built at the
    first call. Either failure now runs the group's original ops, with one warning and the reason
    in the report's entry (`runtime_fallback`), instead of failing the model's call."""
    from dsc.codegen import cpu as cpu_backend
    from dsc.passes import fusion

    a, b = torch.randn(61, COLS), torch.randn(61, COLS)  # a shape no other test uses: kernels are shared by name
    backends = ["cpu"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    for backend in backends:
        compiled = dsc.compile(SwiGLU(), {"fusion": {"enabled": True, "backend": backend}}, example_inputs=(a, b))
        [entry] = compiled.report()["kernels"]
        kernel = KERNELS[entry["name"]]
        if backend == "triton":  # the first launch is Triton's compile: a refusal is an exception there
            def refuse(*args, **kwargs):
                raise RuntimeError("PassManager::run failed (simulated)")
            kernel.compiled[torch.float32] = refuse
            xs, dtype = (a, b), torch.float32
        else:  # bf16 inputs: the bf16 kernel is built at this call, and the compiler refuses it
            def refuse_cc(*args, **kwargs):
                raise cache.CompileError("cc: error: (simulated)")
            monkeypatch.setattr(cpu_backend, "compile_kernel", refuse_cc)
            xs, dtype = (a.bfloat16(), b.bfloat16()), torch.bfloat16
        before = dict(kernel.calls)
        with pytest.warns(UserWarning, match="simulated"):
            got = compiled(*xs)
        torch.testing.assert_close(got, SwiGLU()(*xs), rtol=0, atol=0)
        assert compiled(*xs).dtype == dtype  # a second call: unfused again, without a new warning
        assert (kernel.calls["fallback"] - before["fallback"], kernel.calls["kernel"] - before["kernel"]) == (2, 0)
        fallback = compiled.report()["kernels"][0]["runtime_fallback"]
        assert "simulated" in fallback[str(dtype).replace("torch.", "")], fallback
        monkeypatch.undo()


def _advised_huge(t: torch.Tensor) -> bool:
    """Whether a mapping that overlaps t's bytes carries MADV_HUGEPAGE ("hg" in its VmFlags in
    /proc/self/smaps; advice splits a mapping, the advised part being a mapping of its own). The
    flag, not AnonHugePages: whether the kernel finds free huge pages depends on the machine's
    memory at that moment."""
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    inside, found = False, False
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(v, 16) for v in head.split("-"))
            inside = lo < end and start < hi
        elif inside and head == "VmFlags:":
            found |= "hg" in line.split()[1:]
    return found


def test_large_kernel_outputs_are_advised_huge_pages(monkeypatch):
    """cpu.empty advises MADV_HUGEPAGE on outputs of 4 MiB or more (a fresh buffer then faults in
    2 MiB at a time instead of 4 KiB; measured in benchmarks/bench_fusion.py's dsc_fresh column);
    DSC_THP=0 and small outputs are left alone. Needs THP in `madvise` mode, the default of most
    distributions."""
    from dsc.codegen import cpu

    try:
        mode = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        pytest.skip("no transparent huge pages on this system")
    if "[madvise]" not in mode:
        pytest.skip(f"THP mode is {mode.strip()!r}, not madvise")
    t = cpu.empty((16384, 1024), torch.float32)
    assert _advised_huge(t)  # the kernel took the advice
    calls = []  # which buffers are advised (a recording stand-in: heap memory reused later may
    monkeypatch.setattr(cpu, "_madvise", lambda *a: calls.append(a) or 0)  # carry older advice)
    cpu.empty((256, 1024), torch.float32)  # 1 MiB: not advised
    assert not calls
    u = cpu.empty((2048, 1024), torch.bfloat16)  # exactly 4 MiB: the 2 MiB-aligned part
    lo, n, advice = calls.pop()
    assert advice == 14 and lo % cpu.HUGE_PAGE == 0 and n % cpu.HUGE_PAGE == 0
    assert u.data_ptr() <= lo and lo + n <= u.data_ptr() + (4 << 20)
    monkeypatch.setenv("DSC_THP", "0")
    cpu.empty((16384, 1024), torch.float32)
    assert not calls


def test_pointwise_backward_kernel_writes_each_distinct_gradient_once():
    """x + bias -> GELU -> dropout -> + r: the backward kernel writes one tensor, x's gradient; the
    bias gradient is that tensor summed over rows, and r's is the incoming gradient itself (a
    residual add passes it through, as in eager: no copy)."""
    torch.manual_seed(0)
    module = BiasGeluDropoutResidual(p=0.1)
    x, r = inputs("residual_relu", torch.float32)
    compiled = dsc.compile(module, {"fusion": {"enabled": True}}, example_inputs=(x, r))
    (entry,) = compiled.report()["kernels"]
    kernel = KERNELS[entry["name"]]
    spec = kernel.params["grad"]
    assert entry["backward"] == "generated" and len(spec["outputs"]) == 1
    assert spec["grads"] == [("out", 0), ("out", 0), ("dy", 0)]  # inputs: x, bias, r
    src = open(entry["backward_source"]).read()
    assert "v_gelu_erf_grad(" in src and src.count("v_dropout(") >= 2  # the mask, redrawn for the gradient
    xr, rr = x.clone().requires_grad_(), r.clone().requires_grad_()
    dy = torch.randn(x.shape)
    compiled(xr, rr).backward(dy)
    assert torch.equal(rr.grad, dy)
    torch.testing.assert_close(module.bias.grad, xr.grad.sum(0), rtol=1e-5, atol=1e-4)


RESIDUAL_NORMS = {"layernorm_h_used_again": ResidualLayerNorm, "layernorm_h_norm_only": ResidualLayerNormOnly,
                  "rmsnorm_h_used_again": ResidualRMSNorm, "rmsnorm_h_norm_only": ResidualRMSNormOnly}


@pytest.mark.parametrize("backend,dtype", [("cpu", torch.float32), ("cpu", torch.bfloat16), ("triton", torch.float32)],
                         ids=["cpu_fp32", "cpu_bf16", "triton_fp32"])
@pytest.mark.parametrize("case", list(RESIDUAL_NORMS))
def test_residual_norm_backward_kernel_gives_x_and_r_one_gradient(case, backend, dtype, monkeypatch):
    """h = x + r -> LayerNorm(h) or RMSNorm(h), one kernel: its generated backward recomputes h from
    x and r and adds h's own gradient (when the graph uses h again, as a transformer's residual
    stream does) to the norm's; when nothing else uses h, its gradient is None (not a tensor of
    zeros to read). x and r get that one gradient, as eager's add gives them; every gradient at
    least as accurate as eager's against float64. Triton under the interpreter, on 67 rows."""
    from dsc.passes.fusion import Kernel

    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET was not set before triton was imported (see conftest.py)")
    build = RESIDUAL_NORMS[case]
    seen = []
    real = Kernel.residual_norm_backward
    monkeypatch.setattr(Kernel, "residual_norm_backward",
                        lambda self, xs, dh, dy: seen.append(dh is None) or real(self, xs, dh, dy))
    xs = [x[:67] if backend == "triton" else x for x in inputs("residual_layernorm", dtype)]
    torch.manual_seed(0)
    module = build().to(dtype)
    xg = [x.clone().requires_grad_() for x in xs]
    compiled = dsc.compile(module, {"fusion": {"enabled": True, "backend": backend}}, example_inputs=tuple(xs))
    y = compiled(*xg)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype))
    grads = [x.grad for x in xg] + [p.grad for p in module.parameters()]
    (kernel,) = compiled.report()["kernels"]
    assert kernel["ops"][0] == "add.Tensor" and kernel["backward"] == "generated" and kernel["backend"] == backend
    assert ("if HAS_DH:" if backend == "triton" else "+ hs * LD(dhr[c])") in open(kernel["backward_source"]).read()
    assert KERNELS[kernel["name"]].calls["backward"] >= 1
    assert seen == [case.endswith("norm_only")]  # h's gradient: None when only the norm reads h
    assert torch.equal(grads[0], grads[1])  # x's and r's
    torch.manual_seed(0)
    _, _, grads_ref = run(build().to(dtype), xs, fused=False)
    _assert_grads_as_accurate_as_eager(build, xs, grads, grads_ref, dtype)


class HFResidualRMSNorm(RMSNorm):  # transformers' Llama: the norm starts with x.to(float32)
    def forward(self, x, r):
        h = x + r
        residual = h
        h = h.to(torch.float32)  # in fp32 this returns h itself: the graph's next add reads the cast
        y = self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        return y + residual


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_residual_add_joins_the_norm_through_transformers_no_op_cast(backend):
    """In an fp32 transformers Llama the residual add reaches RMSNorm through `x.to(torch.float32)`,
    a no-op whose node the next residual add reads: the add and the cast join the norm's kernel,
    whose h output stands for the cast. Forward and backward against eager."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET was not set before triton was imported (see conftest.py)")
    xs = [x[:67] for x in inputs("residual_layernorm", torch.float32)]
    torch.manual_seed(0)
    module = HFResidualRMSNorm()
    xg = [x.clone().requires_grad_() for x in xs]
    compiled = dsc.compile(module, {"fusion": {"enabled": True, "backend": backend}}, example_inputs=tuple(xs))
    y = compiled(*xg)
    y.backward(torch.cos(y.detach()))
    (kernel,) = compiled.report()["kernels"]
    assert kernel["ops"][:3] == ["add.Tensor", "to.dtype", "pow.Tensor_Scalar"] and kernel["backward"] == "generated"
    assert KERNELS[kernel["name"]].calls["backward"] >= 1
    torch.manual_seed(0)
    ref = HFResidualRMSNorm()
    xr = [x.clone().requires_grad_() for x in xs]
    y_ref = ref(*xr)
    y_ref.backward(torch.cos(y_ref.detach()))
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=2e-6)
    for g, r in zip([*[x.grad for x in xg], module.weight.grad], [*[x.grad for x in xr], ref.weight.grad]):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


class SoftmaxOnly(nn.Module):  # the masked softmax's output, returned as it is
    def forward(self, x, mask):
        return torch.softmax(x * 0.125 + mask, dim=-1)


@pytest.mark.parametrize("name", ["residual_layernorm", "residual_rmsnorm", "softmax"])
def test_a_norm_or_softmax_keeps_for_backward_what_eager_keeps(name):
    """For backward, a residual norm keeps h = x + r (eager's norm keeps h too), not x and r: r, a
    projection's output in a transformer, would otherwise stay alive until backward, one more
    activation per norm than eager keeps. Softmax keeps its output y, as eager does (attention's
    next matmul keeps the same tensor), not x and the mask: x is one more activation of B x heads
    x T x T."""
    build, _ = PATTERNS[name]
    if name == "softmax":
        build = SoftmaxOnly
    x, r = [t.clone().requires_grad_(not torch.isinf(t).any()) for t in inputs(name, torch.float32)]
    torch.manual_seed(0)
    compiled = dsc.compile(build(), {"fusion": {"enabled": True}}, example_inputs=(x.detach(), r.detach()))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = compiled(x, r)
    storages = {t.untyped_storage().data_ptr() for t in saved}
    assert r.untyped_storage().data_ptr() not in storages and x.untyped_storage().data_ptr() not in storages
    assert sum(t.numel() == x.numel() for t in saved) == 1  # h (y), and apart from it only the weights
    if name == "softmax":
        assert y.untyped_storage().data_ptr() in storages  # the very tensor the caller got
    y.backward(torch.ones_like(y))
    if name != "softmax":
        assert torch.equal(x.grad, r.grad)


class TanhResidual(nn.Module):  # x's gradient reads x (through tanh), r's is the output's: r is not kept
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(0.5))

    def forward(self, x, r):
        return torch.tanh(x) * self.s + r * 0.25


@pytest.mark.parametrize("path", ["kernel", "recompute", "create_graph"])
def test_a_pointwise_group_keeps_only_the_inputs_its_backward_reads(path, monkeypatch):
    """The backward's straight-line code is pruned to what its gradients need; autograd keeps only
    the inputs that code reads (GPT-2's `dropout(x) + r` needs neither x nor r, only the seed). A
    recompute (a backward the compiler refused, or create_graph) reads zeros where an input was not
    kept: its value enters no gradient. Gradients (and second-order ones) against eager."""
    from dsc.passes import fusion

    if path == "recompute":
        monkeypatch.setattr(fusion.Kernel, "build_backward",
                            lambda self, dtype: (_ for _ in ()).throw(cache.CompileError("(simulated)")))
    x, r = inputs("residual_relu", torch.float32)
    res = []
    for fused in (True, False):
        torch.manual_seed(0)
        module = TanhResidual()
        model = dsc.compile(module, {"fusion": {"enabled": True}}, example_inputs=(x, r)) if fused else module
        xi, ri = x.clone().requires_grad_(), r.clone().requires_grad_()
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = model(xi, ri)
        if fused:
            (kernel,) = model.report()["kernels"]
            storages = {t.untyped_storage().data_ptr() for t in saved}
            assert ri.untyped_storage().data_ptr() not in storages and xi.untyped_storage().data_ptr() in storages
            assert kernel["backward"] == ("recompute" if path == "recompute" else "generated")
            calls = KERNELS[kernel["name"]].calls["backward"]
        if path == "create_graph":
            gx, gr, gs = torch.autograd.grad((y * torch.cos(y.detach())).sum(), [xi, ri, module.s], create_graph=True)
            ((gx ** 2).sum() + (gr ** 2).sum() + gs ** 2).backward()
        else:
            y.backward(torch.cos(y.detach()))
        if fused:
            assert KERNELS[kernel["name"]].calls["backward"] == calls + (path == "kernel")
        res.append([xi.grad, ri.grad, module.s.grad])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class UpcastSoftmax(nn.Module):  # the logits' upcast: a no-op cast when traced in fp32
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x):
        return torch.softmax(self.lin(x).float(), -1) * 2.0


class CastTanh(nn.Module):  # a cast inside a pointwise group
    def forward(self, x):
        return torch.tanh(x.to(torch.float32)) * 3.0


def _under_a_bf16_plan(build) -> tuple:
    """(the fused model's output under a bf16 plan, eager's under autocast), on the same weights."""
    torch.manual_seed(0)
    module, x = build(), torch.randn(8, 64)
    compiled = dsc.compile(copy.deepcopy(module), {"fusion": {"enabled": True}, "precision": {"dtype": "bf16"}},
                           example_inputs=(x,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = module(x)
    return compiled(x), ref


def test_a_cast_that_is_a_no_op_when_traced_still_casts_at_run_time():
    """`x.float()` traced on fp32 is a real cast under a bf16 plan (autocast) or for bf16 inputs to an
    fp32 compile: its result stays fp32 and eager's (found by review: removing such casts, or a
    kernel computing them in bf16, returned bf16)."""
    y, ref = _under_a_bf16_plan(UpcastSoftmax)
    assert y.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    x = torch.randn(8, 64)
    compiled = dsc.compile(CastTanh(), {"fusion": {"enabled": True}}, example_inputs=(x,))
    (kernel,) = compiled.report()["kernels"]
    assert kernel["ops"][0] == "to.dtype"
    xb = x.bfloat16()
    y, ref = compiled(xb), CastTanh()(xb)
    assert y.dtype == ref.dtype == torch.float32 and torch.equal(y, ref)


class TwoLinearsUpcast(nn.Module):  # bf16 ops before a cast under a bf16 plan: eager rounds them in bf16
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(64, 64), nn.Linear(64, 64)

    def forward(self, x):
        return (self.a(x) * 3.0 + self.b(x)).float() * 0.5 + 1.0


class TanhUpcast(nn.Module):
    def forward(self, x, r):
        return torch.tanh(x * 3.0 + r).float() * 1.7


class CastOrAddResidual(nn.Module):  # two residual norms: h is the cast in one, the add in the other
    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(1 + 0.1 * torch.randn(64)), nn.Parameter(1 + 0.1 * torch.randn(64))

    @staticmethod
    def rms(w, h):
        return w * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))

    def forward(self, x1, r1, x2, r2):
        h1 = x1 + r1
        res = h1
        h1 = h1.to(torch.float32)  # traced: res reads the cast, which stands for h
        h2 = x2 + r2
        z = h2 * 2  # reads the add (before the cast, which would otherwise stand for h2 from then on)
        return self.rms(self.w1, h1), res, self.rms(self.w2, h2.to(torch.float32)), z


def test_groups_holding_a_traced_no_op_cast_round_as_eager_does():
    """Found by a second review: (1) under a bf16 plan, ops before a cast that casts ran in fp32 in
    the kernel where eager rounds them in bf16 (one bf16 ulp off); (2) two residual norms whose h is
    the cast in one and the add in the other shared one kernel and one reference (z came back fp32);
    (3) a backward after a forward that ran the unfused ops took the backward kernel (one rounding
    instead of eager's). All three now match eager exactly."""
    assert torch.equal(*_under_a_bf16_plan(TwoLinearsUpcast))
    xs = [torch.randn(8, 64) for _ in range(4)]
    module = CastOrAddResidual()
    compiled = dsc.compile(copy.deepcopy(module), {"fusion": {"enabled": True}}, example_inputs=tuple(xs))
    assert len({k["name"] for k in compiled.report()["kernels"] if k["pattern"] == "rmsnorm"}) == 2
    got = compiled(*[t.bfloat16() for t in xs])
    assert got[3].dtype == torch.bfloat16
    x, r = torch.randn(64, 256), torch.randn(64, 256)
    compiled = dsc.compile(TanhUpcast(), {"fusion": {"enabled": True}}, example_inputs=(x, r))
    res = []
    for model in (compiled, TanhUpcast()):
        a, b = x.bfloat16().requires_grad_(), r.bfloat16().requires_grad_()
        model(a, b).backward(torch.cos(x))
        res.append((a.grad, b.grad))
    assert all(torch.equal(u, v) for u, v in zip(*res))


class DropGelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.drop = nn.Linear(64, 64), nn.Dropout(0.1)

    def forward(self, x):
        return self.drop(F.gelu(self.lin(x))) * 2 + 1


def test_dropout_in_training_under_a_bf16_plan_runs():
    """Under autocast a group's kernel dtype comes from its reference run on fake tensors, where
    the dropout reference read its seed's value and failed (found by a third review; older than
    this stop): every bf16 training run with dropout crashed at its first call. The dropout kernel
    now runs in bf16, as eager's would, forward and backward."""
    torch.manual_seed(0)
    x = torch.randn(256, 64)  # 16384 draws: the dropped fraction is 0.1 within 2.5%
    compiled = dsc.compile(DropGelu().train(), {"fusion": {"enabled": True}, "precision": {"dtype": "bf16"}},
                           example_inputs=(x,))
    xi = x.clone().requires_grad_()
    y = compiled(xi)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert y.dtype == DropGelu().train()(x).dtype == torch.bfloat16
    y.float().sum().backward()
    (kernel,) = [k for k in compiled.report()["kernels"] if k.get("dropout_p")]
    assert KERNELS[kernel["name"]].calls["kernel"] >= 1 and xi.grad is not None and torch.isfinite(xi.grad).all()
    assert 0.8 < float((y == 1).float().mean()) / 0.1 < 1.2  # dropped elements are 0 * 2 + 1 = 1


class DoubledLayerNorm(nn.Module):  # h = x + x: one tensor in both slots of the add
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(64)

    def forward(self, x):
        h = x + x
        return self.ln(h) * 3 + h


class LayerNormNoAffine(nn.Module):
    def forward(self, x):
        return F.layer_norm(x, (64,)) * 2.0


@pytest.mark.parametrize("build", [DoubledLayerNorm, LayerNormNoAffine], ids=["x_plus_x", "no_affine"])
def test_recomputed_norms_under_autocast_match_eager(build):
    """Under autocast the norms recompute their ops in backward. Found by review: `x + x` joined
    the norm as a residual, whose recompute then read zeros for the second operand (no gradient at
    all); a LayerNorm without weight and bias failed to recompute (its reference took no None)."""
    x, res = torch.randn(8, 64), []
    for fused in (True, False):
        torch.manual_seed(0)
        module = build()
        model = dsc.compile(module, {"fusion": {"enabled": True}}, example_inputs=(x,)) if fused else module
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(xi)
        (y.float() * torch.cos(y.detach().float())).sum().backward()
        res.append([y.detach().float(), xi.grad, *[p.grad for p in module.parameters()]])
        if fused and build is DoubledLayerNorm:
            assert ["layer_norm"] in [k["ops"] for k in model.report()["kernels"]]  # the add stays out of it
    for a, b in zip(*res):  # bf16 autocast: the fused pointwise tail rounds once, eager at each op
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


class ResidualRMSNormMutated(RMSNorm):  # h is scaled in place after the norm
    def forward(self, x, r):
        h = x + r
        y = self.norm(h)
        h.mul_(0.5)
        return y + h


def test_a_residual_norm_whose_h_is_modified_in_place_stays_eager():
    """Autograd keeps the residual norm's h for backward; an in-place change to h later in the graph
    would fail that backward where eager's RMSNorm trains (found by review). Such a group is declined."""
    x, r = inputs("residual_layernorm", torch.float32)
    torch.manual_seed(0)
    compiled = dsc.compile(ResidualRMSNormMutated(), {"fusion": {"enabled": True}}, example_inputs=(x, r))
    assert not any(k["ops"][0] == "add.Tensor" for k in compiled.report()["kernels"])
    assert any("autograd keeps for the backward" in d["reason"] for d in compiled.report()["declined_fusion"])
    compiled(x, r).sum().backward()


class OneSumTwoNorms(nn.Module):  # h = x + r normalized by two RMSNorms
    def __init__(self):
        super().__init__()
        self.a, self.b = RMSNorm(), RMSNorm()

    def forward(self, x, r):
        h = x + r
        return self.a.norm(h) + self.b.norm(h) * 2 + h


def test_one_sum_normalized_twice_joins_one_norm_and_both_fuse():
    """Both norms' matchers see the same add; the first joins it, the second is fused without it
    (found by review: the second norm group was dropped whole). Forward and backward against eager."""
    xs = inputs("residual_layernorm", torch.float32)
    torch.manual_seed(0)
    compiled, y, grads = run(OneSumTwoNorms(), xs, fused=True)
    norms = [k["ops"][0] for k in compiled.report()["kernels"] if k["pattern"] == "rmsnorm"]
    assert sorted(norms) == ["add.Tensor", "pow.Tensor_Scalar"]
    torch.manual_seed(0)
    _, y_ref, grads_ref = run(OneSumTwoNorms(), xs, fused=False)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4)


class StridedWeightLayerNorm(nn.Module):  # the norm's weight and bias: columns of larger parameters
    def __init__(self, residual: bool):
        super().__init__()
        self.w = nn.Parameter(1.0 + 0.1 * torch.randn(COLS, 2))
        self.b = nn.Parameter(0.1 * torch.randn(COLS, 2))
        self.residual = residual

    def forward(self, x, r):
        h = x + r if self.residual else x
        y = F.layer_norm(h, (COLS,), self.w[:, 0], self.b[:, 0])
        return y + h if self.residual else y * r


@pytest.mark.parametrize("residual", [True, False], ids=["residual", "plain"])
def test_layernorm_backward_kernel_reads_a_strided_weight(residual):
    """A LayerNorm weight that is a strided view (a column of a larger parameter) reaches the
    backward kernel contiguous: it reads w[c] at stride 1 (found by review: dx was off by up to 9.7)."""
    xs = inputs("residual_layernorm", torch.float32)
    build = lambda: StridedWeightLayerNorm(residual)  # noqa: E731
    torch.manual_seed(0)
    compiled, _, grads = run(build(), xs, fused=True)
    (kernel,) = compiled.report()["kernels"]
    assert kernel["pattern"] == "layernorm" and kernel["backward"] == "generated"
    assert KERNELS[kernel["name"]].calls["backward"] >= 1
    torch.manual_seed(0)
    _, _, grads_ref = run(build(), xs, fused=False)
    _assert_grads_as_accurate_as_eager(build, xs, grads, grads_ref, torch.float32)


class DequantWide(nn.Module):  # int16 / int32 values that bf16 cannot hold exactly (above 256)
    def __init__(self, qtype):
        super().__init__()
        self.register_buffer("q", torch.randint(1000, 1100, (ROWS, COLS)).to(qtype))
        self.register_buffer("zero", torch.full((COLS,), 1050).to(qtype))
        self.scale = nn.Parameter(torch.full((COLS,), 0.01))

    def forward(self, x):
        n = x.shape[0]
        return (self.q[:n].to(x.dtype) - self.zero.to(x.dtype)) * self.scale + x


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("qtype", [torch.int16, torch.int32], ids=["int16", "int32"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dequantize_of_wide_integers_rounds_as_eagers_cast(dtype, qtype, backend):
    """Eager's `q.to(bf16)` rounds an integer above 256 to bf16 before anything else; the kernel
    does the same (int -> float -> bf16 -> float on load), so (q - zero) * scale is eager's within
    one rounding of the result, not off by a rounding of q (up to 0.04 here)."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET was not set before triton was imported (see conftest.py)")
    torch.manual_seed(0)
    module = DequantWide(qtype).to(dtype)
    rows = 67 if backend == "triton" else ROWS  # the interpreter is slow
    x = (0.1 * torch.randn(rows, COLS)).to(dtype)
    compiled = dsc.compile(module, {"fusion": {"enabled": True, "backend": backend}}, example_inputs=(x,))
    (kernel,) = compiled.report()["kernels"]
    assert kernel["name"].startswith("pointwise_dequant_") and kernel["backend"] == backend
    with torch.no_grad():
        got, ref = compiled(x), module(x)
    assert KERNELS[kernel["name"]].calls["kernel"] >= 1
    tol = 1e-6 if dtype == torch.float32 else 4e-3  # bf16: one rounding at |y| <= 0.6
    torch.testing.assert_close(got.float(), ref.float(), rtol=0, atol=tol)


def test_a_dequantize_group_called_in_another_dtype_runs_the_unfused_ops():
    """The dequantizing cast's target dtype was fixed when the graph was captured (fp32 here):
    called with the model's floats in bf16, the kernel would compute in the wrong dtype, so the
    group runs its unfused ops instead, exactly as the captured graph says."""
    torch.manual_seed(0)
    module = DequantGelu()
    x = inputs("dequant_gelu", torch.float32)[0]
    compiled = dsc.compile(module, {"fusion": {"enabled": True}}, example_inputs=(x,))
    plain = dsc.compile(module, {}, example_inputs=(x,))
    (kernel,) = compiled.report()["kernels"]
    module.to(torch.bfloat16)
    calls = dict(KERNELS[kernel["name"]].calls)
    with torch.no_grad():
        got, ref = compiled(x.bfloat16()), plain(x.bfloat16())
    after = KERNELS[kernel["name"]].calls
    assert (after["fallback"] - calls["fallback"], after["kernel"] - calls["kernel"]) == (1, 0)
    assert got.dtype == ref.dtype and torch.equal(got, ref)


IDENTITY = "dropout with p=0 or in eval -> its input"


class ResidualOffset(nn.Module):  # x + r + 1: every input's gradient is the output's
    def forward(self, x, r):
        return (r + x + 1.0).sum(-1)


def test_a_group_whose_gradients_pass_through_needs_no_backward_kernel():
    """Every input's gradient is an output's incoming gradient (sums): the group's backward is no
    kernel at all (the report says "pass-through"), and the gradients are eager's bit for bit. (It
    used to render a kernel with no outputs, which the C compiler refused: the group then
    recomputed its ops.)"""
    xs = inputs("residual_relu", torch.float32)
    compiled, _, grads = run(ResidualOffset(), xs, fused=True)
    (kernel,) = compiled.report()["kernels"]
    assert kernel["backward"] == "pass-through" and "backward_source" not in kernel
    assert "backward_declined" not in kernel, kernel
    assert "backward passes gradients through" in compiled.explain()
    _, _, grads_ref = run(ResidualOffset(), xs, fused=False)
    for g, r in zip(grads, grads_ref):
        assert torch.equal(g, r)


class DropoutOffResidual(nn.Module):  # GPT's `x + drop(attn(x))` with dropout 0: eager adds x itself
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.0)

    def forward(self, x, r):
        return torch.relu(r + self.drop(x.to(torch.float32)))


def test_dropout_of_zero_is_removed_not_fused():
    """Eager's dropout(p=0) returns x itself. Fused, it was a copy: a pass over memory and, for
    autograd, one more saved activation (GPT's `x + dropout(attn)` kept x and attn alive). The pass
    now removes it before grouping and lists it in the report; what is left fuses as usual (the
    cast too: a no-op when traced, it stays in the graph, since it may cast at run time). Results
    are eager's bit for bit."""
    xs = inputs("residual_relu", torch.float32)
    compiled, y, grads = run(DropoutOffResidual(), xs, fused=True)
    (kernel,) = compiled.report()["kernels"]
    assert kernel["ops"] == ["to.dtype", "add.Tensor", "relu"]
    [fusion] = [p for p in compiled.report()["passes"] if p["name"] == "fuse_kernels"]
    assert [r.split(" ")[1] for r in fusion["details"]["rewrites"][IDENTITY]] == ["(dropout)"]
    _, y_ref, grads_ref = run(DropoutOffResidual(), xs, fused=False)
    assert torch.equal(y, y_ref) and all(torch.equal(g, r) for g, r in zip(grads, grads_ref))


class DequantOnly(nn.Module):  # no float input at all: the kernel's dtype is its output's
    def forward(self, q):
        w = q.to(torch.bfloat16)
        return w * 0.02 - 1.0, w * 0.5


def test_a_dequantize_only_group_runs_in_its_outputs_dtype():
    """A group whose only inputs are integers (an int8 tensor dequantized to bf16, two outputs):
    the kernel runs in the dtype its outputs have; no gradient is involved. The bf16 pairs path is
    off for integer inputs (two int8 do not make a 32-bit word)."""
    q = torch.randint(-128, 128, (ROWS, COLS), dtype=torch.int8)
    compiled = dsc.compile(DequantOnly(), {"fusion": {"enabled": True}}, example_inputs=(q,))
    (kernel,) = compiled.report()["kernels"]
    assert kernel["name"].startswith("pointwise_dequant_") and kernel["dtype"] == "bfloat16"
    src = open(kernel["source"]).read()
    assert "const int8_t *restrict in0" in src and "const int pairs = 0 && cols % 2 == 0;" in src
    got, ref = compiled(q), DequantOnly()(q)
    assert KERNELS[kernel["name"]].calls["kernel"] >= 1 and got[0].dtype == torch.bfloat16
    for g, r in zip(got, ref):  # eager rounds after each op, the kernel once: one bf16 step apart at most
        torch.testing.assert_close(g.float(), r.float(), rtol=8e-3, atol=8e-3)
    assert torch.equal(got[1], ref[1])  # q * 0.5: exact either way


class ManyOps(nn.Module):  # every derivative rule of _grad_terms in one pointwise group
    def forward(self, x, r):
        q = r * r + 1.0
        a = torch.sigmoid(x) - torch.exp(-0.5 * x * x) + torch.pow(q, -0.5) + torch.pow(q, 0.5) / 3.0
        b = torch.rsqrt(q) / (2.0 - torch.tanh(x)) + torch.sqrt(q) * torch.pow(r, 3) + torch.pow(q, -1.0)
        return a * b + torch.pow(x, 2) - torch.relu(-x) + F.silu(r).to(r.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_pointwise_derivative_rule_matches_float64(dtype):
    """sigmoid, exp, neg, sub, mul, div, rsub, rsqrt, sqrt, tanh, relu, silu, casts and powers
    2, 3, 0.5, -0.5, -1 in one group: its generated backward kernel must be at least as accurate
    as eager against a float64 run (or within fp32's 1e-6 / bf16's 1e-2)."""
    xs = (torch.randn(ROWS, COLS).to(dtype), torch.randn(ROWS, COLS).to(dtype))
    compiled, y, grads = run(ManyOps(), xs, fused=True)
    (kernel,) = compiled.report()["kernels"]
    assert kernel["pattern"] == "pointwise" and kernel["backward"] == "generated"
    assert kernel["name"].isidentifier()  # several transcendental ops in the name (a C symbol)
    assert {"sigmoid", "exp", "neg", "sub.Tensor", "div.Tensor", "rsub.Scalar", "rsqrt", "sqrt", "tanh", "relu",
            "silu", "pow.Tensor_Scalar"} <= set(kernel["ops"])
    assert KERNELS[kernel["name"]].calls["backward"] >= 1
    _, _, grads_ref = run(ManyOps(), xs, fused=False)
    _assert_grads_as_accurate_as_eager(ManyOps, xs, grads, grads_ref, dtype)


def test_softmax_backward_kernel_and_a_mask_that_needs_a_gradient():
    """Softmax's generated backward reads the probabilities y the forward wrote; a mask that needs
    a gradient itself (a learned bias) gets eager's formula in torch ops from the same y instead,
    which gives it one."""
    build, _ = PATTERNS["softmax"]
    x, mask = inputs("softmax", torch.float32)
    mask = torch.randn(COLS).requires_grad_()  # finite: a learned additive bias
    torch.manual_seed(0)
    module = build()
    compiled = dsc.compile(module, {"fusion": {"enabled": True}}, example_inputs=(x, mask.detach()))
    (entry,) = compiled.report()["kernels"]
    kernel = KERNELS[entry["name"]]
    assert entry["backward"] == "generated" and "dz = y * (dy - sum(dy * y))" in open(entry["backward_source"]).read()
    xr = x.clone().requires_grad_()
    dy = torch.randn(x.shape)
    calls = kernel.calls["backward"]
    compiled(xr, mask.detach()).backward(dy)  # the mask needs no gradient: the kernel
    assert kernel.calls["backward"] == calls + 1
    xe = x.clone().requires_grad_()
    module(xe, mask.detach()).backward(dy)
    torch.testing.assert_close(xr.grad, xe.grad, rtol=1e-5, atol=1e-6)
    xr.grad = None
    compiled(xr, mask).backward(dy)  # now it does: torch's formula, both gradients eager's
    assert kernel.calls["backward"] == calls + 1
    m2 = mask.detach().clone().requires_grad_()
    xe.grad = None
    module(xe, m2).backward(dy)
    torch.testing.assert_close(xr.grad, xe.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mask.grad, m2.grad, rtol=1e-5, atol=1e-5)


class ScalarRowTanh(nn.Module):  # a scalar parameter and a per-row operand: "one" and "row" inputs
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(0.7))

    def forward(self, x, row):
        return torch.tanh(x * self.s + row)


def test_pointwise_backward_sums_scalar_and_per_row_gradients():
    g = torch.Generator().manual_seed(11)
    x, row = torch.randn(ROWS, COLS, generator=g), torch.randn(ROWS, 1, generator=g)
    compiled, y, grads = run(ScalarRowTanh(), (x, row), fused=True)
    (kernel,) = compiled.report()["kernels"]
    assert kernel["backward"] == "generated" and sorted(kernel["inputs"]) == ["full", "one", "row"]
    assert KERNELS[kernel["name"]].calls["backward"] >= 1
    _, y_ref, grads_ref = run(ScalarRowTanh(), (x, row), fused=False)
    assert [tuple(g.shape) for g in grads] == [(ROWS, COLS), (ROWS, 1), ()]
    # the scalar's gradient sums 1.4M terms of both signs: with tanh's derivative as 1 - y*y, the
    # cancellation near |y| = 1 left a bias that did not average out (5.0e-6 relative vs eager's
    # 1.45e-7 for these inputs); (1 - y)(1 + y) matched eager while y was accurate to 1.3e-7, not
    # with the rational tanh (3.4e-6 vs eager's 1.8e-6): the derivative now comes from x
    _assert_grads_as_accurate_as_eager(ScalarRowTanh, (x, row), grads, grads_ref, torch.float32)


def test_triton_tanh_backward_from_its_input_matches_eager():
    """The Triton backward's tanh derivative (v_tanh_grad in triton_common.py.j2, from tanh's input
    as the C one), under the interpreter on 67 rows: every gradient within fp32 tolerance of eager."""
    pytest.importorskip("triton", reason="triton is not installed (it is in requirements-dev.txt)")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET was not set before triton was imported (see conftest.py)")
    g = torch.Generator().manual_seed(11)
    x, row = 2 * torch.randn(67, COLS, generator=g), torch.randn(67, 1, generator=g)
    module, ref = ScalarRowTanh(), ScalarRowTanh()
    compiled = dsc.compile(module, {"fusion": {"enabled": True, "backend": "triton"}}, example_inputs=(x, row))
    [kernel] = compiled.report()["kernels"]
    assert "v_tanh_grad(" in open(kernel["backward_source"]).read()
    ins, ins_ref = [[t.clone().requires_grad_() for t in (x, row)] for _ in range(2)]
    dy = torch.randn(x.shape, generator=g)
    compiled(*ins).backward(dy)
    ref(*ins_ref).backward(dy)
    assert KERNELS[kernel["name"]].calls["backward"] >= 1
    for got, want in zip([*(t.grad for t in ins), module.s.grad], [*(t.grad for t in ins_ref), ref.s.grad]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# helper -> (torch's function, its float64 reference where another formula avoids a cancellation,
# bound on the max relative error, bound on the max absolute error); the bounds are the errors
# common.h.j2 states for 1e7 points in [-20, 20], rounded up a little
_GELU_TANH_U = lambda x: math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)  # noqa: E731
_HELPERS = {
    "v_exp": (torch.exp, None, 9e-8, None),
    "v_erf": (torch.special.erf, None, 7e-7, 4e-7),
    "v_tanh": (torch.tanh, None, 3.3e-7, 3.3e-7),
    "v_sigmoid": (torch.sigmoid, None, 1.6e-7, 9e-8),
    "v_silu": (F.silu, None, 1.8e-7, None),
    "v_gelu_erf": (F.gelu, lambda x: 0.5 * x * torch.special.erfc(-x / math.sqrt(2.0)), None, 1.2e-6),
    "v_gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), lambda x: x * torch.sigmoid(2 * _GELU_TANH_U(x)),
                    None, 1.0e-6),
}


@pytest.mark.parametrize("helper", list(_HELPERS))
def test_vectorized_math_helpers_stay_within_their_stated_error(helper):
    """The polynomial exp/erf/tanh/... of common.h.j2, run the way kernels run them (inlined into
    a vectorized loop), over 4M points in [-20, 20] and the special values, against float64."""
    import ctypes

    from dsc.codegen import cpu

    eager, ref, rel_bound, abs_bound = _HELPERS[helper]
    ref = ref or eager
    src = cpu.render("pointwise.c.j2", name=f"probe_{helper}", dtype="f32", replaced="test", inputs=["full"],
                     body=[f"const float t0 = {helper}(v0);"], outputs=["t0"], seeded=False)
    fn, _, _ = cpu.compile_kernel(src, f"probe_{helper}")
    specials = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-45, 30.0, -30.0, 87.0, -87.0, 88.5, 88.72, 88.73, 89.0, -100.0,
                             1e30, -1e30, float("inf"), float("-inf"), float("nan")])
    x = torch.cat([torch.linspace(-20, 20, 1 << 22), specials])
    y = torch.empty_like(x)
    fn(cpu.ptr(x), cpu.ptr(y), ctypes.c_int64(1), ctypes.c_int64(x.numel()))
    want = ref(x.double())
    finite = torch.isfinite(x) & (x.abs() <= 20)
    err = (y.double() - want).abs()[finite]
    if abs_bound is not None:
        assert float(err.max()) <= abs_bound, f"{helper}: max abs error {float(err.max()):.3g}"
    if rel_bound is not None:
        big = want[finite].abs() >= 1e-30
        rel = float((err[big] / want[finite][big].abs()).max())
        assert rel <= rel_bound, f"{helper}: max relative error {rel:.3g}"
    # the special values against torch's fp32 functions, within 1e-8 absolute (exp up to its
    # overflow at ln(FLT_MAX) = 88.7228, and inf above it, as torch): the documented
    # differences are exp flushing to 0 below -86,
    # sigmoid and SiLU giving a tiny number (or 6e-9 * sign at x = -1e30) where torch gives 0, and
    # the limit at an infinite input where torch computes inf * 0 = NaN (GELU(inf), SiLU(-inf))
    for xv, got, want_ in zip(specials.tolist(), y[-len(specials):].tolist(), eager(specials).tolist()):
        if math.isnan(xv):
            assert math.isnan(got), helper
        elif math.isnan(want_):  # torch's inf * 0: NaN as well, or the limit (x or 0)
            assert math.isinf(xv) and (math.isnan(got) or got in (xv, 0.0)), (helper, xv, got)
        else:
            assert got == want_ or abs(got - want_) <= 1e-8 + 1e-6 * abs(want_), (helper, xv, got, want_)


def test_exp_for_non_positive_arguments_is_v_exp_bit_for_bit():
    """v_exp_neg (softmax's exp(z - max), the derivatives' exp(-...)) drops v_exp's overflow handling:
    on x <= 0, -inf and NaN it must give v_exp's bits exactly."""
    import ctypes

    from dsc.codegen import cpu

    x = torch.cat([-torch.linspace(0, 100, 1 << 20), torch.tensor([-0.0, -1e-30, -86.0, -86.001, -1e30,
                                                                   float("-inf"), float("nan")])])
    got = {}
    for helper in ("v_exp", "v_exp_neg"):
        src = cpu.render("pointwise.c.j2", name=f"probe_{helper}", dtype="f32", replaced="test", inputs=["full"],
                         body=[f"const float t0 = {helper}(v0);"], outputs=["t0"], seeded=False)
        fn, _, _ = cpu.compile_kernel(src, f"probe_{helper}")
        got[helper] = torch.empty_like(x)
        fn(cpu.ptr(x), cpu.ptr(got[helper]), ctypes.c_int64(1), ctypes.c_int64(x.numel()))
    assert torch.equal(got["v_exp_neg"].view(torch.int32)[:-1], got["v_exp"].view(torch.int32)[:-1])
    assert got["v_exp_neg"][-1].isnan() and got["v_exp"][-1].isnan()
    torch.testing.assert_close(got["v_exp"][:-1], torch.exp(x[:-1]), rtol=2e-7, atol=5e-38)  # both ~1e-7 off e^x


# derivative helper -> (the function it differentiates, bound on the max absolute error): what
# common.h.j2 states for 1e7 points in [-20, 20], rounded up a little (torch's fp32 autograd:
# 8.9e-8 for tanh, 1.0e-6 for tanh-GELU, 2.9e-7 for GELU, 9.8e-7 for SiLU)
_GRAD_HELPERS = {
    "v_tanh_grad": (torch.tanh, 2e-7),
    "v_gelu_tanh_grad": (lambda x: F.gelu(x, approximate="tanh"), 2e-7),
    "v_gelu_erf_grad": (F.gelu, 2.5e-7),
    "v_silu_grad": (F.silu, 1e-6),
}


@pytest.mark.parametrize("helper", list(_GRAD_HELPERS))
def test_derivative_helpers_stay_within_their_stated_error(helper):
    """The generated backward kernels' derivatives (common.h.j2), vectorized as kernels run them,
    over 4M points in [-20, 20] against float64 autograd of the function; NaN stays NaN."""
    import ctypes

    from dsc.codegen import cpu

    fn_, bound = _GRAD_HELPERS[helper]
    src = cpu.render("pointwise.c.j2", name=f"probe_{helper}", dtype="f32", replaced="test", inputs=["full"],
                     body=[f"const float t0 = {helper}(v0);"], outputs=["t0"], seeded=False)
    fn, _, _ = cpu.compile_kernel(src, f"probe_{helper}")
    x = torch.cat([torch.linspace(-20, 20, 1 << 22), torch.tensor([float("nan")])])
    y = torch.empty_like(x)
    fn(cpu.ptr(x), cpu.ptr(y), ctypes.c_int64(1), ctypes.c_int64(x.numel()))
    x64 = x[:-1].double().requires_grad_()
    fn_(x64).sum().backward()
    err = float((y[:-1].double() - x64.grad).abs().max())
    assert err <= bound, f"{helper}: max abs error {err:.3g}"
    assert math.isnan(float(y[-1]))


def test_one_plus_tanh_runs_as_a_sigmoid_and_is_at_least_as_accurate_as_eager():
    """GPT-2's gelu_new, 0.5 x (1 + tanh(u)) op by op: the fusion pass computes 1 + tanh(u) as
    2 sigmoid(2u) (an identity; one exp instead of tanh's two branches). Where tanh(u) nears -1,
    eager's 1 + tanh(u) cancels: the rewritten kernel is compared with float64, as eager is."""
    module = GeluNew()
    x = torch.linspace(-9, 4, 1 << 16).reshape(64, 1024)
    compiled = dsc.compile(module, {"fusion": {"enabled": True}}, example_inputs=(x,))
    [fused] = [p for p in compiled.report()["passes"] if p["name"] == "fuse_kernels"]
    assert fused["details"]["rewrites"] == {"1 + tanh(u) -> 2 sigmoid(2u)": ["tanh + 1"]}
    [kernel] = compiled.report()["kernels"]
    assert "sigmoid" in kernel["ops"] and "tanh" not in kernel["ops"]
    with torch.no_grad():
        y, y_eager, x64 = compiled(x), module(x), x.double()
    # the reference in float64, without the cancellation (float64's 1 + tanh(u) is 0 below u = -19)
    y64 = _HELPERS["v_gelu_tanh"][1](x64)
    err, err_eager = (y.double() - y64).abs(), (y_eager.double() - y64).abs()
    assert float(err.max()) < 4.8e-7 and float(err_eager.max()) < 4.8e-7  # both within an ulp of |y| = 4
    tail = x < -4  # 1 + tanh(u) < 1e-6 there: eager keeps few correct digits, the sigmoid keeps them all
    rel, rel_eager = (err / y64.abs())[tail], (err_eager / y64.abs())[tail]
    assert float(rel.max()) < 1e-5 < float(rel_eager.max())


@pytest.mark.parametrize("name", ["layernorm", "residual_layernorm", "rmsnorm", "residual_rmsnorm", "softmax"])
def test_rows_longer_than_the_row_buffer_match_eager(name, monkeypatch):
    """Rows of more than 8192 elements do not fit the kernels' fp32 row buffers (DSC_ROW): the
    forward kernels and the norms' backward kernel then re-read the row instead of keeping it
    (softmax's backward reads the saved y twice, at any length). 3 x 8200, fp32, against eager."""
    monkeypatch.setattr(sys.modules[__name__], "COLS", 8200)
    monkeypatch.setattr(sys.modules[__name__], "ROWS", 3)
    build, pattern = PATTERNS[name]
    torch.manual_seed(0)
    ref_module = build()
    torch.manual_seed(0)
    module = build()
    xs = inputs(name, torch.float32)
    compiled, y, grads = run(module, xs, fused=True)
    _, y_ref, grads_ref = run(ref_module, xs, fused=False)
    [kernel] = compiled.report()["kernels"]
    assert kernel["pattern"] == pattern and KERNELS[kernel["name"]].calls["kernel"] >= 1
    assert kernel["backward"] == "generated"
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=2e-6)
    assert KERNELS[kernel["name"]].calls["backward"] >= 1  # softmax's from y: rows of any length
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)


# -- found by a bug hunt (stop 13): each of these gave wrong results or crashed before ---------------


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("kw", [{"bias": False}, {"elementwise_affine": False}], ids=["no_bias", "no_affine"])
def test_layernorm_without_bias_or_weight_fuses_and_matches_eager(kw, backend):
    """nn.LayerNorm(C, bias=False) and elementwise_affine=False: the kernel's missing inputs are
    None (compiling used to fail on their shape), forward and backward against eager."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET was not set before triton was imported (see conftest.py)")
    x = torch.randn(67, COLS)
    outs = []
    for fused in (True, False):
        torch.manual_seed(0)
        module = nn.LayerNorm(COLS, **kw)
        xi = x.clone().requires_grad_()
        model = dsc.compile(module, {"fusion": {"enabled": True, "backend": backend}}, example_inputs=(x,)) \
            if fused else module
        y = model(xi)
        y.backward(torch.cos(y.detach()))
        outs.append([y.detach(), xi.grad] + [p.grad for p in module.parameters()])
        if fused:
            (kernel,) = model.report()["kernels"]
            assert kernel["pattern"] == "layernorm" and KERNELS[kernel["name"]].calls["backward"] >= 1
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)


class AddAlphaSoftmax(nn.Module):  # softmax(x + 2 m): the mask add has an alpha
    def forward(self, x, m):
        return torch.softmax(torch.add(x, m, alpha=2.0), -1)


class RsubAlpha(nn.Module):  # 2 - 3 x, through rsub's alpha (export passes it positionally)
    def forward(self, x):
        return torch.tanh(torch.rsub(x, 2.0, alpha=3.0))


class SoftmaxToFloat(nn.Module):  # the HF attention pattern: a bf16 softmax computed in fp32
    def forward(self, x):
        return torch.softmax(x, -1, dtype=torch.float32)


class PowFour(nn.Module):  # an exponent with no code in the kernels
    def forward(self, x):
        return torch.pow(x + 1.0, 4.0) * 0.5


@pytest.mark.parametrize("build,dtype", [(AddAlphaSoftmax, torch.float32), (RsubAlpha, torch.float32),
                                         (SoftmaxToFloat, torch.bfloat16), (PowFour, torch.float32)],
                         ids=["softmax_add_alpha", "rsub_alpha", "softmax_dtype", "pow4"])
def test_ops_a_kernel_would_compute_differently_stay_eager(build, dtype):
    """The add's alpha in front of a softmax, rsub's alpha, softmax's dtype argument and a power
    without code were ignored or mis-rendered (wrong results, or Triton failing at its first call):
    now those ops stay unfused, and the model gives eager's results."""
    x = torch.randn(67, COLS).to(dtype)
    xs = (x, torch.where(torch.rand(COLS) < 0.2, -1e4, 0.0)) if build is AddAlphaSoftmax else (x,)
    for backend in ("cpu", "triton"):
        if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
            continue
        compiled = dsc.compile(build(), {"fusion": {"enabled": True, "backend": backend}}, example_inputs=xs)
        got, want = compiled(*xs), build()(*xs)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class MutatedInput(nn.Module):  # export keeps h.mul_: eager's `h * 2` read h before it
    def __init__(self, later_read: bool):
        super().__init__()
        self.lin = nn.Linear(COLS, COLS)
        self.later_read = later_read

    def forward(self, x):
        h = self.lin(x)
        if self.later_read:
            a = h * 2.0
            h.mul_(3.0)
            return F.gelu(a) + h
        y = torch.relu(h * 2.0 + 1.0)  # saves nothing the later add_ touches, in eager
        h.add_(1.0)
        return y + h


@pytest.mark.parametrize("later_read", [True, False], ids=["read_after_mutation", "saved_then_mutated"])
def test_a_group_whose_input_is_modified_in_place_stays_eager(later_read):
    """A fused call goes after the group's last op and saves its inputs: with an input modified
    in place in the graph, it read the modified value (forward off by 5.3) or failed autograd's
    version check in backward. Such a group is declined, with the reason in the report."""
    x = torch.randn(67, COLS)
    res = []
    for fused in (True, False):
        torch.manual_seed(0)
        module = MutatedInput(later_read)
        model = dsc.compile(module, {"fusion": {"enabled": True}}, example_inputs=(x,)) if fused else module
        y = model(x)
        y.sum().backward()
        res.append([y.detach(), *[p.grad for p in module.parameters()]])
        if fused:
            assert any("modified in place" in d["reason"] for d in model.report()["declined_fusion"])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class ChannelsLastSilu(nn.Module):  # eager's silu keeps channels-last; the view below relies on it
    def forward(self, x):
        return F.silu(x).permute(0, 2, 3, 1).view(-1, x.shape[1])


def test_a_group_whose_output_eager_keeps_non_row_major_stays_eager():
    """Kernels write row-major outputs; eager keeps a channels-last input's layout, and a later
    view relied on it ("view size is not compatible" after fusion). Such a group is declined."""
    x = torch.randn(2, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    compiled = dsc.compile(ChannelsLastSilu(), {"fusion": {"enabled": True}}, example_inputs=(x,))
    torch.testing.assert_close(compiled(x), ChannelsLastSilu()(x))
    assert any("row-major" in d["reason"] for d in compiled.report()["declined_fusion"])


def test_softmax_groups_with_different_mask_shapes_get_different_kernels():
    """Two softmax groups on the same x shape with [1,1,T,T] and [1,1,1,T] masks shared one kernel
    name: the second's backward read the first's mask rows (dx off by 0.34, reading past the
    mask). Input shapes are part of a kernel's identity now."""
    B, H, T = 2, 2, 6
    causal = torch.triu(torch.full((T, T), -1e4), 1)[None, None]
    pad = torch.zeros(1, 1, 1, T)
    pad[..., -2:] = -1e4
    x = torch.randn(B, H, T, T)
    names = []
    for mask in (causal, pad):
        compiled = dsc.compile(MaskedSoftmax(), {"fusion": {"enabled": True}}, example_inputs=(x, mask))
        names.append(compiled.report()["kernels"][0]["name"])
        dy = torch.randn(B, H, T, T, generator=torch.Generator().manual_seed(1))
        xf, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        (compiled(xf, mask) * dy).sum().backward()
        (MaskedSoftmax()(xr, mask) * dy).sum().backward()
        torch.testing.assert_close(xf.grad, xr.grad, rtol=1e-5, atol=1e-6)
    assert names[0] != names[1]


@pytest.mark.parametrize("name", ["bias_gelu_erf", "residual_layernorm", "residual_rmsnorm", "softmax"])
def test_double_backward_through_a_fused_group_matches_eager(name):
    """create_graph=True (a gradient penalty): the fused op's backward was not differentiable, so
    the second-order terms vanished silently. It now recomputes the unfused ops differentiably; a
    residual norm does so from the h it saved in place of x and r, softmax runs eager's formula on
    the y it saved."""
    build, _ = PATTERNS[name]
    xs = [x[:67] if x.dim() == 2 else x for x in inputs(name, torch.float32)]
    c = torch.cos(torch.arange(COLS, dtype=torch.float32))  # weights the output: no symmetric shortcut
    res = []
    for fused in (True, False):
        torch.manual_seed(0)
        module = build()
        model = dsc.compile(module, {"fusion": {"enabled": True}}, example_inputs=tuple(xs)) if fused else module
        xi = [x.clone().requires_grad_(not torch.isinf(x).any()) for x in xs]  # (not softmax's -inf mask)
        y = model(*xi)
        gs = torch.autograd.grad((y * c).sum(), [x for x in xi if x.requires_grad], create_graph=True)
        assert all(g.requires_grad for g in gs)
        ((y * c).sum() + sum((g ** 2).sum() for g in gs)).backward()
        res.append([x.grad for x in xi if x.requires_grad] + [p.grad.clone() for p in module.parameters()])
    for a, b in zip(*res):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
