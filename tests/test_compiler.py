"""In-process tests of capture, the pass manager, the ZeRO layout pass and the single-rank runtime."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import dsc
from dsc.capture import CaptureError, capture
from dsc.pass_manager import CompileContext, InvariantError, Pass, PassOrderError, PassResult, order_passes, run_passes
from dsc.pipeline import compile_rank
from dsc.schemas import load_plan

from models import gpt, gpt_batch, hf_gpt2, hf_batch, dataset

PLAN = {"zero": {"stage": 1, "reduce_bucket_size": 5000}, "optimizer": {"type": "adamw", "lr": 1e-3}}


def _noop(name, **kw):
    return Pass(name, lambda gm, ctx: PassResult(name), **kw)


# -- pass manager -------------------------------------------------------------------------------------
def test_passes_are_ordered_by_contracts_not_by_listing():
    a = _noop("a", requires=frozenset({"y"}), provides=frozenset({"z"}))
    b = _noop("b", provides=frozenset({"y"}))
    c = _noop("c")
    assert [p.name for p in order_passes([a, c, b], plan=None)] == ["c", "b", "a"]


def test_missing_provider_names_the_pass():
    with pytest.raises(PassOrderError, match="pass 'a' requires 'y'"):
        order_passes([_noop("a", requires=frozenset({"y"}))], plan=None)


def test_conflicting_passes_are_refused():
    with pytest.raises(PassOrderError, match="'a' conflicts"):
        order_passes([_noop("a", conflicts=frozenset({"b"})), _noop("b")], plan=None)


def test_cycle_is_reported():
    a = _noop("a", requires=frozenset({"y"}), provides=frozenset({"x"}))
    b = _noop("b", requires=frozenset({"x"}), provides=frozenset({"y"}))
    with pytest.raises(PassOrderError, match="cycle"):
        order_passes([a, b], plan=None)


def test_disabled_pass_is_skipped():
    assert order_passes([_noop("a", enabled=lambda plan: False)], plan=None) == []


def test_invariant_failure_names_the_pass():
    def bad_check(gm, ctx):
        raise InvariantError("gather without release")

    gm = torch.fx.symbolic_trace(nn.Linear(2, 2))
    ctx = CompileContext(plan=None, rank=3, world_size=4, coords={})
    with pytest.raises(InvariantError, match=r"after pass 'broken' \(rank 3\): gather without release"):
        run_passes(gm, ctx, [Pass("broken", lambda gm, ctx: PassResult("x"), check=bad_check)])


# -- capture --------------------------------------------------------------------------------------------
class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Branchy()

    def forward(self, x):
        return self.inner(x)


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            return x * 2
        return x


def test_capture_error_names_module_line_strategies_and_way_out():
    with pytest.raises(CaptureError) as err:
        capture(DataDependent(), (torch.randn(3),))
    msg = str(err.value)
    assert "module: inner (Branchy)" in msg
    assert "test_compiler.py" in msg  # the source line of the offending code
    assert "torch.export (non-strict)" in msg and "torch.fx.symbolic_trace" in msg
    assert "way out" in msg


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x, factor: int = 2, extra=None):
        y = self.lin(x) * factor
        return y if extra is None else y + extra["bias"]


def test_inputs_unlike_the_compiled_example_name_the_argument_and_the_way_out():
    """The graph is specialised to the example inputs (sizes baked into its ops, constants into its
    arithmetic): a call that differs is refused with the argument's name, not run with the
    example's values."""
    model = Scaled()
    compiled = dsc.compile(model, {}, example_inputs=((torch.randn(4, 8), 3), {}))
    x = torch.randn(4, 8)
    torch.testing.assert_close(compiled(x, 3), model(x, 3))  # the example's shapes and values run
    with pytest.raises(ValueError, match=r"input 'x' is a tensor of shape \(5, 8\), but this model was "
                                         r"compiled for a tensor of shape \(4, 8\).*compile again"):
        compiled(torch.randn(5, 8), 3)
    with pytest.raises(ValueError, match=r"input 'factor' is 4, but this model was compiled for 3"):
        compiled(x, 4)  # export baked factor=3 into the graph: 4 would silently multiply by 3
    torch.testing.assert_close(compiled(x, 3.0), model(x, 3))  # the same value as a float
    with pytest.raises(ValueError, match=r"input 'factor' is True"):
        compiled(x, True)
    with pytest.raises(ValueError, match=r"compiled for calls shaped like its example inputs \(2 positional "
                                         r"arguments\); this call passes 2 positional arguments and keywords"):
        compiled(x, 3, extra={"bias": torch.zeros(8)})

    nested = dsc.compile(Scaled(), {}, example_inputs=((torch.randn(4, 8), 3), {"extra": {"bias": torch.zeros(8)}}))
    nested(x, 3, extra={"bias": torch.ones(8)})
    with pytest.raises(ValueError, match=r"input 'extra'\['bias'\] is a tensor of shape \(7,\)"):
        nested(x, 3, extra={"bias": torch.ones(7)})


def test_capture_keeps_parameter_names_and_module_stack():
    model = gpt()
    (x, y), _ = gpt_batch(dataset(1, 2))
    cap = capture(model, (x, y))
    assert dict(cap.gm.named_parameters()).keys() == dict(model.named_parameters()).keys()
    stacks = [n.meta.get("nn_module_stack") for n in cap.gm.graph.nodes if n.op == "call_function"]
    assert any(s and any("blocks.0.attn" in v[0] for v in s.values()) for s in stacks)


def test_capture_records_source_lines_only_under_dsc_debug(monkeypatch):
    """Stack traces cost 10-27% of a capture (capture.py, _stack_traces): off by default, on with
    DSC_DEBUG=1, and torch's own switch is left as it was either way."""
    (x, y), _ = gpt_batch(dataset(1, 2))
    before = torch.fx.config.do_not_emit_stack_traces
    monkeypatch.delenv("DSC_DEBUG", raising=False)
    quiet = capture(gpt(), (x, y))
    assert not any(n.meta.get("stack_trace") for n in quiet.gm.graph.nodes)
    assert torch.fx.config.do_not_emit_stack_traces == before
    monkeypatch.setenv("DSC_DEBUG", "1")
    loud = capture(gpt(), (x, y))
    traces = [n.meta["stack_trace"] for n in loud.gm.graph.nodes if n.meta.get("stack_trace")]
    assert any("gpt.py" in t and "in forward" in t for t in traces)  # the example GPT's source lines
    assert torch.fx.config.do_not_emit_stack_traces == before


# -- ZeRO layout pass -------------------------------------------------------------------------------------
def _program(world, rank, plan=PLAN, model_fn=gpt):
    model = model_fn()
    (x, y), _ = gpt_batch(dataset(1, 2))
    cap = capture(model, (x, y))
    return compile_rank(cap, load_plan(plan, world_size=world), rank, world, (x, y)), model


def test_buckets_follow_backward_order_and_tie_weights_once():
    prog, model = _program(2, 0)
    layout = prog.artifacts["zero_layout"]
    names = [s.name for b in layout.buckets for s in b.slots]
    assert len(names) == len(set(names)) == len(list(model.parameters()))  # lm_head tied to wte: once
    # backward produces the head/final norm gradients first, the embeddings last
    assert names.index("ln_f.weight") < names.index("blocks.0.ln_1.weight") < names.index("wpe.weight")
    assert all(b.numel <= 5000 or len(b.slots) == 1 for b in layout.buckets)


def test_shards_are_equal_and_cover_every_element():
    for world in (2, 4):
        layouts = [_program(world, r)[0].artifacts["zero_layout"] for r in range(world)]
        for b in layouts[0].buckets:
            assert b.padded % world == 0 and b.padded - b.numel < world
        assert {lay.shard_numel for lay in layouts} == {layouts[0].padded // world}


def test_rank_programs_are_independent():
    prog0, _ = _program(2, 0)
    prog1, _ = _program(2, 1)
    assert prog0.gm.graph is not prog1.gm.graph
    assert prog0.artifacts["zero_layout"].rank == 0 and prog1.artifacts["zero_layout"].rank == 1


# -- single-process runtime ------------------------------------------------------------------------------------
def test_inference_plan_compiles_without_optimizer_and_keeps_names():
    model = gpt()
    (x, _), _ = gpt_batch(dataset(1, 2))
    compiled = dsc.compile(model, {}, example_inputs=(x,))
    assert torch.equal(compiled(x), model(x))
    names = [n for n, _ in compiled.named_parameters()]
    assert all(any(n.endswith(m) for n in names) for m, _ in model.named_parameters())
    with pytest.raises(RuntimeError, match="optimizer"):
        compiled.step()


def test_lazy_capture_and_eval_graph():
    model = gpt()
    (x, y), _ = gpt_batch(dataset(1, 2))
    compiled = dsc.compile(model, PLAN)
    assert not compiled.compiled
    loss = compiled(x, y)
    assert compiled.compiled and torch.allclose(loss, model(x, y))
    compiled.eval()
    with torch.no_grad():
        assert torch.allclose(compiled(x, y), model.eval()(x, y))


def test_loss_fn_goes_into_the_graph():
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x, t = torch.randn(4, 5), torch.randint(0, 3, (4,))
    compiled = dsc.compile(model, PLAN, example_inputs=(x, t), loss_fn=nn.functional.cross_entropy)
    ops = [str(n.target) for n in compiled.module.graph.nodes if n.op == "call_function"]
    assert any("cross_entropy" in o or "nll_loss" in o for o in ops)
    assert torch.allclose(compiled(x, t), nn.functional.cross_entropy(model(x), t))


def test_full_state_dict_has_the_model_keys_including_tied_head():
    model = hf_gpt2()
    a, kw = hf_batch(dataset(1, 2))
    compiled = dsc.compile(model, PLAN, example_inputs=(a, kw))
    sd = compiled.full_state_dict()
    assert sd.keys() == model.state_dict().keys()
    assert torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])


def test_step_only_at_accumulation_boundary():
    model = gpt()
    plan = {**PLAN, "batch": {"micro_batch_size": 1, "gradient_accumulation_steps": 3}}
    data = dataset(1, 3)
    compiled = dsc.compile(model, plan, example_inputs=gpt_batch(data[:1])[0])
    before = compiled.full_state_dict()["wte.weight"].clone()
    stepped = []
    for i in range(3):
        (x, y), _ = gpt_batch(data[i:i + 1])
        compiled.backward(compiled(x, y))
        stepped.append(compiled.step())
    assert stepped == [False, False, True]
    assert not torch.equal(before, compiled.full_state_dict()["wte.weight"])
    assert compiled.global_steps == 1


def test_unused_parameter_is_declined_and_does_not_block_reduction():
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x).pow(2).mean()

    model = WithUnused()
    compiled = dsc.compile(model, PLAN, example_inputs=(torch.randn(2, 4),))
    declined = {d["what"] for p in compiled.report()["passes"] for d in p["declined"]}
    assert {"unused.weight", "unused.bias"} <= declined
    compiled.backward(compiled(torch.randn(2, 4)))
    assert compiled.step()


def test_capture_turns_off_hf_kv_cache_and_says_so():
    model = hf_gpt2()
    model.config.use_cache = True
    a, kw = hf_batch(dataset(1, 2))
    compiled = dsc.compile(model, PLAN, example_inputs=(a, kw))
    assert any("use_cache" in n for n in compiled.report()["capture"]["notes"])


def test_explain_mentions_plan_sources_passes_and_memory():
    model = gpt()
    compiled = dsc.compile(model, PLAN, example_inputs=gpt_batch(dataset(1, 2))[0])
    text = compiled.explain()
    for needle in ("zero.stage", "<- plan", "plan_zero_buckets", "per-rank memory"):
        assert needle in text


def test_mixed_parameter_dtypes_name_a_parameter_and_the_way_out():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].to(torch.bfloat16)

    class Cast(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner[1](self.inner[0](x).bfloat16()).float().sum()

    with pytest.raises(InvariantError, match=r"inner\.1\.(weight|bias).*precision\.dtype"):
        dsc.compile(Cast(model), PLAN, example_inputs=(torch.randn(2, 4),))
