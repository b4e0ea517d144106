"""ZeRO-3 graph pass and single-rank runtime (multi-rank parity is in test_parity_dp.py)."""

from __future__ import annotations

import copy
import json
import subprocess

import pytest
import torch

import dsc
from dsc.capture import capture
from dsc.pipeline import compile_rank, graph_code
from dsc.schemas import load_plan

from helpers import ROOT, dsc_cmd
from models import dataset, gpt, gpt_batch
from test_parity_dp import assert_params_close

PLAN3 = {"zero": {"stage": 3, "prefetch_bucket_size": 20000, "param_persistence_threshold": 100},
         "optimizer": {"type": "adamw", "lr": 1e-3}}


def _program(world: int, rank: int = 0, plan=PLAN3):
    model = gpt()
    (x, y), _ = gpt_batch(dataset(1, 2))
    return compile_rank(capture(model, (x, y)), load_plan(plan, world_size=world), rank, world, (x, y)), model


def _gathers(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.ops.dsc.all_gather.default]


def test_graph_reads_only_shards_and_gathers_each_bucket_before_use():
    prog, model = _program(4)
    layout = prog.artifacts["zero_layout"]
    gm = prog.gm
    reads = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert not reads & {n for n, _ in model.named_parameters()}, "a whole parameter is still read"
    gathered = {n.meta["dsc.gather"] for n in _gathers(gm)}
    assert gathered == {b.index for b in layout.buckets}
    for node in _gathers(gm):
        b = layout.buckets[node.meta["dsc.gather"]]
        assert node.args[0].meta["val"].shape == (b.chunk,) and node.meta["val"].shape == (b.padded,)
        assert node.args[1:] == ("dp", 4, b.index)


def test_tied_weight_is_gathered_again_for_its_late_use():
    small = {**PLAN3, "zero": {**PLAN3["zero"], "prefetch_bucket_size": 2000}}
    prog, _ = _program(2, plan=small)
    layout = prog.artifacts["zero_layout"]
    wte = next(b.index for b in layout.buckets if any(s.name == "wte.weight" for s in b.slots))
    assert [n.meta["dsc.gather"] for n in _gathers(prog.gm)].count(wte) == 2  # embedding, then lm_head


def test_small_parameters_go_to_persistent_buckets():
    prog, _ = _program(2)
    layout = prog.artifacts["zero_layout"]
    for b in layout.buckets:
        assert all((s.numel <= 100) == b.persistent for s in b.slots)
    assert any(b.persistent for b in layout.buckets)


def test_report_bytes_are_16_psi_over_n():
    for world in (1, 2, 4):
        prog, model = _program(world)
        mem = prog.artifacts["estimate"]["memory"]
        shard = prog.artifacts["zero_layout"].shard_numel
        psi = sum(p.numel() for p in model.parameters())
        assert shard * world - psi < world * len(prog.artifacts["zero_layout"].buckets)
        assert mem["params_bytes"] == mem["grads_bytes"] == 4 * shard
        assert mem["optimizer_bytes"] == 8 * shard + 4 * len(prog.artifacts["zero_layout"].buckets)
        assert mem["gathered_bound_bytes"] > 0


def test_rank_graph_code_shows_gathers_and_reduce_scatters():
    prog, _ = _program(2, rank=1)
    code = graph_code(prog)
    assert "torch.ops.dsc.all_gather.default(_dsc_shard_0, 'dp', 2, 0)" in code
    assert "dsc::reduce_scatter" in code and "re-gather" in code


def test_max_live_parameters_below_a_bucket_keeps_one_bucket_whole():
    zero = {**PLAN3["zero"], "prefetch_bucket_size": 4000}
    small = {**PLAN3, "zero": {**zero, "max_live_parameters": 3000, "overlap_comm": True}}
    (prog, _), (base, _) = _program(2, plan=small), _program(2, plan={**PLAN3, "zero": zero})
    layout = prog.artifacts["zero_layout"]
    assert layout.live_buckets == 1 and layout.recent == 1 and not layout.prefetch
    bound = prog.artifacts["estimate"]["memory"]["gathered_bound_bytes"]
    assert bound < base.artifacts["estimate"]["memory"]["gathered_bound_bytes"]
    biggest = sorted((b.padded for b in layout.buckets if not b.persistent), reverse=True)
    assert bound == 4 * (sum(b.padded for b in layout.buckets if b.persistent) + sum(biggest[:2]))
    assert len(_gathers(prog.gm)) >= len(_gathers(base.gm))
    declined = [d for r in prog.passes for d in r["declined"] if "max_live_parameters" in d["what"]]
    assert declined and "one bucket is whole at a time" in declined[0]["reason"]


@pytest.mark.parametrize("plan", [PLAN3, {**PLAN3, "zero": {**PLAN3["zero"], "prefetch_bucket_size": 4000,
                                                          "max_live_parameters": 3000}}],
                         ids=["default", "one_live_bucket"])
def test_single_rank_training_matches_eager_and_frees_whole_parameters(plan):
    model, ref = gpt(), gpt()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.0)  # the plan's default
    (x, y), _ = gpt_batch(dataset(1, 4))
    compiled = dsc.compile(model, plan, example_inputs=(x, y))
    # whole parameters are freed: each keeps its shape on a 4-byte zero-stride stand-in
    assert all(p.untyped_storage().nbytes() == 4 and not any(p.stride()) for p in model.parameters())
    grad_max = {k: torch.zeros_like(p) for k, p in ref.named_parameters()}
    for _ in range(3):
        loss = compiled(x, y)
        compiled.backward(loss)
        compiled.step()
        ref_loss = ref(x, y)
        ref_loss.backward()
        for k, p in ref.named_parameters():
            grad_max[k] = torch.maximum(grad_max[k], p.grad.abs())
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    full = compiled.full_state_dict()
    assert full.keys() == ref.state_dict().keys()
    noise = {k: g <= 1e-6 * g.max() for k, g in grad_max.items()}  # see test_parity_dp's docstring
    assert_params_close(full, ref.state_dict(), noise, "ZeRO-3 ws=1")
    live = compiled.memory_bytes()
    assert 0 < live["gathered_peak_bytes"] <= compiled.report()["ranks"][0]["memory"]["gathered_bound_bytes"]


def test_eval_mode_under_zero3_gathers_in_an_eval_graph_and_matches_eager_eval():
    from gpt import build_model

    model = build_model(seed=0, vocab_size=97, block_size=16, n_layer=2, n_head=4, n_embd=32, dropout=0.2)
    ref = copy.deepcopy(model).eval()
    (x, y), _ = gpt_batch(dataset(1, 2))
    compiled = dsc.compile(model, {**PLAN3, "zero": {**PLAN3["zero"], "overlap_comm": True}}, example_inputs=(x, y))
    compiled.eval()
    with torch.no_grad():
        loss = compiled(x, y)
    torch.testing.assert_close(loss, ref(x, y), rtol=1e-5, atol=1e-6)  # dropout off, same weights
    eval_gm = compiled._eval_gm
    gathers = [n for n in eval_gm.graph.nodes if n.target is torch.ops.dsc.all_gather.default]
    assert gathers and not any(n.op == "get_attr" and not n.target.startswith("_dsc_shard_")
                               and n.target in dict(model.named_parameters()) for n in eval_gm.graph.nodes)
    # the eval graph reads the runtime's shards: after a training step it sees the new weights
    compiled.train()
    compiled.backward(compiled(x, y))
    compiled.step()
    ref.load_state_dict(compiled.full_state_dict())
    compiled.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, y), ref(x, y), rtol=1e-5, atol=1e-6)


def test_cli_compile_zero3_for_four_ranks(tmp_path):
    plan = tmp_path / "z3.json"
    plan.write_text(json.dumps(PLAN3))
    out = subprocess.run([*dsc_cmd(), "compile", str(ROOT / "examples" / "gpt.py"), "--config", str(plan),
                          "-n", "4", "--format", "json"], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert "shard_parameters" in [p["name"] for p in report["passes"]]
    mems = [r["memory"] for r in report["ranks"]]
    assert len({m["params_bytes"] for m in mems}) == 1 and mems[0]["params_bytes"] * 4 >= 4 * 120640


def test_bf16_zero3_gathers_in_bf16_and_reports_half_the_traffic():
    fp32, _ = _program(2)
    bf16, _ = _program(2, plan={**PLAN3, "precision": {"dtype": "bf16"}})
    assert all(n.meta["val"].dtype == torch.bfloat16 for n in _gathers(bf16.gm))
    sent = [p.artifacts["estimate"]["comm_bytes_per_step"] for p in (fp32, bf16)]
    assert sent[1] * 2 == sent[0]
