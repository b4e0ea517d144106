"""The GPU path (skipped without CUDA): the generated Triton kernels compiled for the GPU (no
interpreter), each fused pattern against eager CUDA forward and backward in fp32 and bf16; the
dropout mask drawn on the GPU is the CPU's for the same seed; whole models trained with fusion on
the GPU against eager on the GPU, fp32 and bf16 autocast.

CI has no GPU, so these run where one exists (`benchmarks/gpu_check.sh` runs them with the fusion
benchmark on a lent GPU machine); the issue-5 note records the last run."""

from __future__ import annotations

import pytest
import torch

import dsc
from dsc.passes.fusion import KERNELS

from models import MODELS, dataset, loss_of
from test_fusion import PATTERNS, BiasGeluDropoutResidual, _assert_grads_as_accurate_as_eager, inputs, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(PATTERNS))
def test_triton_pattern_on_the_gpu_matches_eager(name, dtype):
    build, pattern = PATTERNS[name]
    torch.manual_seed(0)
    ref_module = build().to(device="cuda", dtype=dtype)
    torch.manual_seed(0)
    module = build().to(device="cuda", dtype=dtype)
    xs = [x.cuda() for x in inputs(name, dtype)]
    compiled, y, grads = run(module, xs, fused=True)
    _, y_ref, grads_ref = run(ref_module, xs, fused=False)
    kernels = compiled.report()["kernels"]
    assert [(k["pattern"], k["backend"]) for k in kernels] == [(pattern, "triton")], kernels  # auto -> triton
    assert KERNELS[kernels[0]["name"]].calls["kernel"] >= 1 and KERNELS[kernels[0]["name"]].calls["fallback"] == 0
    # fp32: eager CUDA reduces in another order (LayerNorm's Welford vs our two passes): ~1e-6 apart
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y.float(), y_ref.float(), **tol)
    if kernels[0]["backward"] == "generated":  # the generated Triton backward, against float64
        assert KERNELS[kernels[0]["name"]].calls["backward"] >= 1
        _assert_grads_as_accurate_as_eager(build, xs, grads, grads_ref, dtype)
        return
    for g, r in zip(grads, grads_ref):  # backward recomputes the unfused ops with eager CUDA kernels
        torch.testing.assert_close(g.float(), r.float(), **tol)


def test_gpu_dropout_draws_the_cpu_mask_for_the_same_seed():
    from dsc.passes.fusion import dropout_keep

    torch.manual_seed(0)
    module = BiasGeluDropoutResidual(p=0.3, cols=781).cuda()
    x, r = torch.randn(1823, 781, device="cuda"), torch.randn(1823, 781, device="cuda")
    compiled = dsc.compile(module, {"fusion": {"enabled": True}}, example_inputs=(x, r))
    [kernel] = compiled.report()["kernels"]
    assert kernel["backend"] == "triton" and kernel["dropout_p"] == [0.3]
    xg = x.clone().requires_grad_()
    torch.manual_seed(5)
    y = compiled(xg, r)
    y.backward(torch.full_like(y, 0.5))
    assert KERNELS[kernel["name"]].calls["kernel"] >= 1
    torch.manual_seed(5)  # the kernel's seed: the next draw of the CUDA generator
    seed = int(torch.randint(0, 1 << 32, (), dtype=torch.int64, device="cuda"))
    keep = dropout_keep(x.shape, 0.3, seed).cuda()  # computed on the CPU
    assert abs(keep.float().mean().item() - 0.7) < 0.005
    assert torch.equal(y[~keep].detach(), r[~keep])
    xr = x.clone().requires_grad_()
    scale = float(torch.tensor(1.0) / torch.tensor(0.7))
    y_ref = torch.where(keep, torch.nn.functional.gelu(xr + module.bias) * scale, torch.zeros((), device="cuda")) + r
    torch.testing.assert_close(y.detach(), y_ref.detach(), rtol=1e-5, atol=1e-5)
    y_ref.backward(torch.full_like(y_ref, 0.5))
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("model_name", ["gpt", "hf_gpt2", "hf_llama"])
def test_training_on_the_gpu_with_fusion_matches_eager(model_name, precision):
    """5 AdamW steps in one process on the GPU with generated Triton kernels, against eager on the
    GPU (bf16: both under CUDA autocast with fp32 weights)."""
    build, batch = MODELS[model_name]
    steps, gb = 5, 4
    data = dataset(steps, gb).cuda()
    amp = torch.bfloat16 if precision == "bf16" else None
    ref = build().cuda()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    ref_losses = []
    for s in range(steps):
        a, kw = batch(data[s * gb:(s + 1) * gb])
        with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
            loss = loss_of(ref(*a, **kw))
        loss.backward()
        opt.step()
        opt.zero_grad()
        ref_losses.append(loss.item())
    model = build().cuda()
    plan = {"optimizer": {"type": "adamw", "lr": 1e-3, "weight_decay": 0.1, "betas": [0.9, 0.95]},
            "precision": {"dtype": precision}, "fusion": {"enabled": True}}
    a, kw = batch(data[:gb])
    compiled = dsc.compile(model, plan, example_inputs=(a, kw))
    losses = []
    for s in range(steps):
        a, kw = batch(data[s * gb:(s + 1) * gb])
        loss = loss_of(compiled(*a, **kw))
        compiled.backward(loss)
        compiled.step()
        losses.append(loss.item())
    kernels = compiled.report()["kernels"]
    assert kernels and all(k["backend"] == "triton" for k in kernels)
    assert all(KERNELS[k["name"]].calls["kernel"] > 0 for k in kernels)
    tol = 1e-5 if amp is None else 1e-2
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=tol, atol=tol)
    got = compiled.full_state_dict()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(got[k].float().cuda(), v.float(), rtol=tol, atol=tol, msg=lambda m: f"{k}: {m}")
