"""Mixed precision: DeepSpeed's loss-scaling rule, skipped overflow steps, autocast compute."""

from __future__ import annotations

import pytest
import torch

import dsc
from dsc.runtime.precision import DynamicLossScaler
from dsc.schemas import load_plan

from models import dataset, hf_llama, hf_batch


def deepspeed_rule(overflows, scale, window, min_scale, hysteresis):
    """DeepSpeed's DynamicLossScaler.update_scale, transcribed (consecutive_hysteresis off)."""
    cur_iter, last_overflow, cur_h, out = 0, -1, hysteresis, []
    for overflow in overflows:
        if overflow:
            if hysteresis == 1 or cur_h == 1:
                scale = max(scale / 2, min_scale)
            else:
                cur_h -= 1
            last_overflow = cur_iter
        else:
            stable = cur_iter - last_overflow - 1
            if stable > 0 and stable % window == 0:
                cur_h = hysteresis
                scale *= 2
        cur_iter += 1
        out.append(scale)
    return out


@pytest.mark.parametrize("hysteresis", [1, 2, 3])
def test_dynamic_scaler_follows_deepspeed(hysteresis):
    pattern = [True, False, False, True, True, False, False, False, False, False, True] + [False] * 9
    scaler = DynamicLossScaler(2.0 ** 10, scale_window=3, min_scale=1.0, hysteresis=hysteresis)
    got = []
    for overflow in pattern:
        scaler.update(overflow)
        got.append(scaler.cur_scale)
    assert got == deepspeed_rule(pattern, 2.0 ** 10, 3, 1.0, hysteresis)


def test_scaler_at_min_scale_raises_with_a_way_out():
    scaler = DynamicLossScaler(1.0, scale_window=10, min_scale=1.0, hysteresis=1)
    with pytest.raises(FloatingPointError, match="min_loss_scale"):
        scaler.update(True)


def _compiled(precision: dict):
    a, kw = hf_batch(dataset(1, 2))
    plan = {"precision": precision, "optimizer": {"type": "adamw", "lr": 1e-3}}
    return dsc.compile(hf_llama(), plan, example_inputs=(a, kw)), a, kw


def test_fp16_overflow_skips_the_step_and_lowers_the_scale():
    # 2**40 times the loss overflows fp16 activations' gradients: the first steps must be skipped
    compiled, a, kw = _compiled({"dtype": "fp16", "initial_scale_power": 40, "hysteresis": 2})
    before = compiled.full_state_dict()
    compiled.backward(compiled(*a, **kw).loss)
    assert compiled.step() is False and compiled.engine.skipped_steps == 1
    assert compiled.engine.scaler.cur_scale == 2.0 ** 40  # hysteresis absorbed the first overflow
    assert all(torch.equal(v, before[k]) for k, v in compiled.full_state_dict().items())
    steps = 0
    while compiled.engine.scaler.cur_scale > 2.0 ** 20 and steps < 40:
        compiled.backward(compiled(*a, **kw).loss)
        compiled.step()
        steps += 1
    assert compiled.engine.skipped_steps >= 2 and compiled.engine.scaler.cur_scale < 2.0 ** 40
    for _ in range(3):  # at a sane scale, steps happen
        compiled.backward(compiled(*a, **kw).loss)
        took = compiled.step()
    assert took and compiled.global_steps >= 1


def test_bf16_runs_matmuls_in_bf16_and_keeps_fp32_weights():
    compiled, a, kw = _compiled({"dtype": "bf16"})
    assert "relax_dtype_asserts" in [p["name"] for p in compiled.report()["passes"]]
    out = compiled(*a, **kw)
    logits = out.logits.detach()  # Llama returns logits.float(): the values must be bf16 numbers
    assert torch.equal(logits, logits.bfloat16().float()) and out.loss.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in compiled.parameters())


def test_deepspeed_fp16_section_translates_with_its_semantics():
    cfg = {"train_batch_size": 8, "fp16": {"enabled": True, "loss_scale": 0, "loss_scale_window": 500,
                                           "hysteresis": 3, "min_loss_scale": 2, "initial_scale_power": 12}}
    p = load_plan(cfg).precision
    assert (p.dtype, p.loss_scale, p.loss_scale_window, p.hysteresis, p.min_loss_scale, p.initial_scale_power) == \
        ("fp16", 0.0, 500, 3, 2.0, 12)
    assert load_plan({"train_batch_size": 8, "bf16": {"enabled": True}}).precision.dtype == "bf16"
    assert load_plan({"train_batch_size": 8, "bfloat16": {"enabled": True}}).precision.dtype == "bf16"


def test_bf16_eval_mode_runs_under_autocast():
    compiled, a, kw = _compiled({"dtype": "bf16"})
    compiled.eval()
    with torch.no_grad():
        logits = compiled(*a, **kw).logits
    assert torch.equal(logits, logits.bfloat16().float())


class NoGradCast(torch.nn.Module):
    """A cast inside a no_grad region: export puts it in a higher-order op's subgraph (as
    transformers' rotary embedding, whose assertion broke bf16 Llama on a GPU)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x):
        with torch.no_grad():
            s = self.lin(x).to(torch.float32) * 2
        return (self.lin(x) * s).float().mean()


def test_bf16_relaxes_dtype_assertions_inside_subgraphs():
    torch.manual_seed(0)
    ref = NoGradCast()
    model = NoGradCast()
    model.load_state_dict(ref.state_dict())
    x = torch.randn(4, 8)
    compiled = dsc.compile(model, {"precision": {"dtype": "bf16"}, "optimizer": {"type": "adamw"}}, example_inputs=(x,))
    loss = compiled(x)
    compiled.backward(loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = ref(x)
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_fp16_gradient_accumulation_with_loss_scaling_matches_fp32_accumulation(stage):
    """precision.grad_accum_dtype fp16 under fp16 loss scaling (2**12), one process: the gradient
    buffers are fp16, the optimizer sees them unscaled in fp32 one bucket at a time, and 3 steps
    land within fp16's resolution of the same run accumulating in fp32."""
    runs = {}
    for accum in ("fp32", "fp16"):
        a, kw = hf_batch(dataset(1, 2))
        plan = {"precision": {"dtype": "fp16", "grad_accum_dtype": accum, "initial_scale_power": 12},
                "optimizer": {"type": "adamw", "lr": 1e-3}, "zero": {"stage": stage, "reduce_bucket_size": 3000},
                "gradient_clipping": 0.5}
        compiled = dsc.compile(hf_llama(), plan, example_inputs=(a, kw))
        grads = compiled.engine.flat_grad if compiled.engine.flat_grad is not None else compiled.engine.grad_shard
        assert grads.dtype == {"fp32": torch.float32, "fp16": torch.float16}[accum]
        for _ in range(3):
            compiled.backward(compiled(*a, **kw).loss)
            assert compiled.step()
        runs[accum] = (compiled.full_state_dict(), compiled.engine.last_grad_norm)
    (ref, ref_norm), (got, norm) = runs["fp32"], runs["fp16"]
    assert abs(norm - ref_norm) <= 2e-3 * ref_norm
    for k, v in ref.items():
        assert float((got[k] - v).norm()) <= 2e-3 * float(v.norm()) + 1e-6, k


@pytest.mark.parametrize("fusion", [False, True], ids=["unfused", "fused"])
def test_a_callers_autocast_around_an_fp32_plan_matches_eager_autocast(fusion):
    """Users wrap a model in torch.autocast themselves; the compiled one must take it as the eager
    one does. Its graph was captured in fp32 (example inputs at compile), with capture-time dtype
    assertions that autocast's bf16 matmuls break (Llama's rotary embedding casts inside a no_grad
    region: "Tensor dtype mismatch"): relax_dtype_asserts runs under every plan. Loss and gradients
    equal eager autocast's within the bf16 bound of the parity tests (LOW_TOL): the captured graph
    builds the causal mask that eager's attention leaves to `is_causal` (its bf16 attention takes
    another path: 2e-3 apart in the embedding's gradient), and fused kernels compute in fp32 and
    round once where eager rounds after each op."""
    ref, model = hf_llama(), hf_llama()  # the same seed: the same weights
    a, kw = hf_batch(dataset(1, 4))
    compiled = dsc.compile(model, {"optimizer": {"type": "adamw"}, "fusion": {"enabled": fusion}},
                           example_inputs=(a, kw))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = compiled(*a, **kw).loss
        expected = ref(*a, **kw).loss
    compiled.backward(loss)
    expected.backward()
    assert loss.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(loss, expected, rtol=1e-2, atol=0)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        err, scale = float((p.grad - q.grad).norm()), float(q.grad.norm())
        assert err <= 1e-2 * scale, f"{name}: |diff| {err:.3g} vs |ref| {scale:.3g}"
    if fusion:
        assert compiled.report()["kernels"]
