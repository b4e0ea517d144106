"""Tensor parallelism: sharding decisions and graphs (one process, every rank compiled), and
training parity of real gloo ranks against single-process eager PyTorch.

Parity runs train 5 AdamW steps with accumulation 2, clipping and WarmupLR exactly as
test_parity_dp.py does, on a vocabulary of 96 (divisible by tp=2 and 4, so the token embedding
and LM head are vocabulary-parallel). Tolerances are those of the ZeRO parity tests (fp32, 1e-5
relative); a tensor-parallel rank sums partial products in a different order than eager.
"""

from __future__ import annotations

import pytest
import torch

import models
from helpers import TESTS, dsc_run
from models import MODELS, dataset
from test_parity_dp import GAS, LR, MICRO, STEPS, CLIP, RTOL, ATOL, assert_memory_is_analytic, \
    assert_params_close, eager_reference

from dsc.capture import capture
from dsc.passes.tensor_parallel import ShardingError
from dsc.pipeline import compile_rank
from dsc.schemas import PlanError, load_plan

VOCAB = 96


@pytest.fixture(autouse=True)
def vocab96():
    models.set_vocab(VOCAB)
    yield
    models.set_vocab(97)


def compile_all(model_name: str, tp: int, world: int | None = None, rules="auto", zero: int = 0):
    build, batch = MODELS[model_name]
    model = build()
    a, kw = batch(dataset(1, 2))
    cap = capture(model, a, kw)
    world = world or tp
    plan = load_plan({"tensor_parallel": {"size": tp, "rules": rules}, "zero": {"stage": zero},
                      "optimizer": {"type": "adamw"}}, world_size=world)
    return model, [compile_rank(cap, plan, r, world, a, kw) for r in range(world)]


def tp_record(program) -> dict:
    return next(p for p in program.passes if p["name"] == "shard_tensor_parallel")


EXPECTED = {  # model -> {module: style} for a few modules, and how many are sharded in all
    "gpt": ({"wte": "vocab", "lm_head": "vocab", "wpe": "replicate", "blocks.0.attn.c_attn": "colwise",
             "blocks.0.attn.c_proj": "rowwise", "blocks.1.mlp.c_fc": "colwise", "blocks.1.mlp.c_proj": "rowwise"}, 10),
    "hf_gpt2": ({"transformer.wte": "vocab", "transformer.h.0.attn.c_attn": "colwise",
                 "transformer.h.0.attn.c_proj": "rowwise", "transformer.h.1.mlp.c_fc": "colwise"}, 10),
    "hf_llama": ({"model.embed_tokens": "vocab", "lm_head": "vocab", "model.layers.0.self_attn.k_proj": "colwise",
                  "model.layers.0.self_attn.o_proj": "rowwise", "model.layers.1.mlp.gate_proj": "colwise",
                  "model.layers.1.mlp.up_proj": "colwise", "model.layers.1.mlp.down_proj": "rowwise"}, 16),
    "hf_bert": ({"bert.embeddings.word_embeddings": "vocab", "bert.embeddings.position_embeddings": "replicate",
                 "bert.encoder.layer.0.attention.self.value": "colwise",
                 "bert.encoder.layer.0.attention.output.dense": "rowwise",
                 "bert.encoder.layer.1.output.dense": "rowwise", "cls.predictions.transform.dense": "replicate",
                 "cls.predictions.decoder": "vocab"}, 14),
}


@pytest.mark.parametrize("model_name", list(EXPECTED))
def test_auto_rules_shard_unseen_transformers(model_name):
    _, programs = compile_all(model_name, 2)
    rec = tp_record(programs[0])
    styles = {m: v["style"] for m, v in rec["details"]["modules"].items()}
    expected, n_sharded = EXPECTED[model_name]
    for module, style in expected.items():
        assert styles[module] == style, (module, styles[module], rec["details"]["modules"][module]["why"])
    assert sum(s != "replicate" for s in styles.values()) == n_sharded
    assert rec["declined"] == []


@pytest.mark.parametrize("model_name,tp,vocab", [("gpt", 2, 96), ("hf_llama", 2, 96), ("hf_llama_kv4", 4, 96),
                                                 ("hf_bert", 4, 96), ("hf_gpt2", 4, 97)])
def test_report_parameter_bytes_equal_analytic_shards(model_name, tp, vocab):
    models.set_vocab(vocab)
    """Each rank's parameter bytes: replicated parameters whole, sharded ones / tp (fp32)."""
    model, programs = compile_all(model_name, tp)
    layout = programs[0].artifacts["tp_layout"]
    whole = dict(model.named_parameters())  # tied weights once
    sharded = 0
    for name, info in layout.items():  # a vocabulary that does not divide is padded to a multiple of tp
        shape = list(whole[name].shape)
        shape[info["dim"]] = -(-shape[info["dim"]] // tp) * tp
        sharded += torch.Size(shape).numel()
    replicated = sum(p.numel() for n, p in whole.items() if n not in layout)
    for prog in programs:
        mem = prog.rank_report()["memory"]
        assert mem["params_bytes"] == 4 * (replicated + sharded // tp)
        for name, info in layout.items():
            local = prog.gm.get_parameter(name)
            assert local.shape[info["dim"]] * tp == -(-whole[name].shape[info["dim"]] // tp) * tp


def test_vocabulary_that_does_not_divide_is_padded():
    """97 tokens on tp=2: each rank holds 49 rows (the last one a zero row on rank 1)."""
    models.set_vocab(97)
    model, programs = compile_all("gpt", 2)
    wte = model.wte.weight.detach()
    for r, prog in enumerate(programs):
        local = prog.gm.get_parameter("wte.weight")
        assert local.shape == (49, 32)
        real = wte[r * 49:(r + 1) * 49]
        assert torch.equal(local[:len(real)], real) and not local[len(real):].any()
    styles = {m: v["style"] for m, v in tp_record(programs[0])["details"]["modules"].items()}
    assert styles["wte"] == styles["lm_head"] == "vocab"


def test_local_shards_are_the_ranks_slices_of_a_fused_qkv():
    """GPT's fused c_attn is sharded per segment: rank r holds its heads of q, of k and of v."""
    model, programs = compile_all("gpt", 2)
    w = model.blocks[0].attn.c_attn.weight.detach()
    q, k, v = w.split(32)
    for r, prog in enumerate(programs):
        local = prog.gm.get_parameter("blocks.0.attn.c_attn.weight")
        expect = torch.cat([t[r * 16:(r + 1) * 16] for t in (q, k, v)])
        assert torch.equal(local, expect)


def test_graph_shows_tensor_parallel_collectives_and_local_shapes():
    _, programs = compile_all("hf_gpt2", 2)
    code = programs[1].gm.code
    assert code.count("torch.ops.dsc.copy_to_tp") == 5  # 2 x (attention, MLP) + LM head input
    assert code.count("torch.ops.dsc.tp_all_reduce") == 5  # 4 row-parallel + the embedding
    assert "torch.ops.dsc.vocab_parallel_cross_entropy" in code
    assert "torch.ops.dsc.all_gather_dim" in code  # the logits output is whole again
    assert "[2, 12, -1, 8]" in code  # GPT-2 reshapes to heads with -1: nothing to rewrite
    gpt_code = compile_all("gpt", 2)[1][1].gm.code
    assert "view.default(getitem, [2, 12, 2, 8])" in gpt_code  # 4 heads -> 2 local heads
    assert "view.default(transpose_3, [2, 12, 16])" in gpt_code  # hidden 32 -> 16 before c_proj
    collectives = programs[1].rank_report()["collectives"]
    assert {c["op"] for c in collectives} >= {"tp_all_reduce", "copy_to_tp.backward", "all_gather_dim",
                                              "vocab_parallel_cross_entropy"}


def test_heads_that_do_not_divide_are_an_error_naming_module_node_and_reason():
    with pytest.raises(ShardingError) as err:
        compile_all("hf_llama", 4, rules={"model.layers.*.self_attn.*_proj": "colwise",
                                          "model.layers.*.self_attn.o_proj": "rowwise"})
    msg = str(err.value)
    assert "k_proj" in msg and "tensor_parallel.size 4" in msg and "does not divide" in msg
    assert "(in module 'model.layers.0.self_attn')" in msg  # the node's module (its source line: DSC_DEBUG=1)


def test_auto_declines_what_it_cannot_shard_and_says_why():
    """Llama's 2 kv heads do not divide by 4: auto replicates the attention and says so."""
    _, programs = compile_all("hf_llama", 4)
    rec = tp_record(programs[0])
    styles = {m: v["style"] for m, v in rec["details"]["modules"].items()}
    assert styles["model.layers.0.self_attn.k_proj"] == "replicate"
    assert styles["model.layers.0.mlp.down_proj"] == "rowwise"
    assert any("self_attn" in d["what"] and "does not divide" in d["reason"] for d in rec["declined"])


def test_rules_table_overrides_auto():
    _, programs = compile_all("gpt", 2, rules={"blocks.*.mlp.*": "replicate", "wte": "replicate",
                                               "lm_head": "replicate"})
    styles = {m: v["style"] for m, v in tp_record(programs[0])["details"]["modules"].items()}
    assert styles["blocks.0.mlp.c_fc"] == styles["wte"] == "replicate"
    assert styles["blocks.0.attn.c_attn"] == "colwise"


def test_rules_errors_name_the_key():
    with pytest.raises(PlanError) as err:
        load_plan({"tensor_parallel": {"size": 2, "rules": {"*.c_fc": "colwize"}}}, world_size=2)
    assert "tensor_parallel.rules" in str(err.value) and "colwise" in str(err.value)
    with pytest.raises(PlanError) as err:
        load_plan({"tensor_parallel": {"size": 3}}, world_size=4)
    assert "tensor_parallel.size" in str(err.value) and "does not divide world_size 4" in str(err.value)
    with pytest.raises(Exception) as err:
        compile_all("gpt", 2, rules={"no.such.module": "colwise"})
    assert "matches no module" in str(err.value)


def test_plan_resolves_dp_from_tp():
    plan = load_plan({"tensor_parallel": {"size": 2}}, world_size=4)
    assert plan.parallel.data_parallel_size == 2
    assert "tensor_parallel.size 2" in plan.sources["parallel.data_parallel_size"]


def test_deepspeed_autotp_size_translates():
    plan = load_plan({"train_batch_size": 8, "tensor_parallel": {"autotp_size": 2}}, world_size=4)
    assert plan.tensor_parallel.size == 2 and plan.parallel.data_parallel_size == 2
    assert plan.sources["tensor_parallel.size"].startswith("deepspeed:tensor_parallel.autotp_size")


# -- training parity on real ranks ------------------------------------------------------------------


def run_tp(tmp_path, model_name: str, world: int, tp: int, stages: str, vocab: int = VOCAB,
           eval_stages: str = "all"):
    out = tmp_path / f"{model_name}_{world}_{tp}.pt"
    dsc_run(world, TESTS / "dist_worker.py", "--model", model_name, "--stages", stages, "--steps", str(STEPS),
            "--micro", str(MICRO), "--gas", str(GAS), "--lr", str(LR), "--clip", str(CLIP), "--tp", str(tp),
            "--vocab", str(vocab), "--eval-stages", eval_stages, "--out", str(out))
    return torch.load(out, weights_only=False)


def assert_traffic_matches_report(res: dict) -> None:
    """Bytes the tensor-parallel ops moved at run time = what the report derives from the graph."""
    expected: dict[str, int] = {}
    for c in res["collectives"]:
        if "node" in c:
            expected[c["op"]] = expected.get(c["op"], 0) + c["payload_bytes"] * c["times"] * STEPS
    assert expected and res["traffic"] == expected


PARITY = [("gpt", 2, 96), ("gpt", 4, 96), ("hf_gpt2", 2, 96), ("hf_gpt2", 4, 97), ("hf_llama", 2, 96),
          ("hf_llama_kv4", 4, 96), ("hf_bert", 2, 97), ("hf_bert", 4, 96)]


_RUNS: dict[tuple, dict] = {}  # launch arguments -> {model: results}


def run_shared(tmp_path_factory, names: list[str], world: int, tp: int, stages: str, vocab: int = VOCAB,
               eval_stages: str = "all") -> dict:
    """Every model in `names` trained in one `dsc run` launch (a launch costs ~8-15 s of start-up
    on 2 cores), cached for the module's tests that ask for the same launch."""
    key = (tuple(names), world, tp, stages, vocab)
    if key not in _RUNS:
        got = run_tp(tmp_path_factory.mktemp(f"ws{world}tp{tp}v{vocab}"), ",".join(names), world, tp, stages, vocab,
                     eval_stages)
        _RUNS[key] = got if len(names) > 1 else {names[0]: got}
    return _RUNS[key]


def run_parity(tmp_path_factory, tp: int, vocab: int) -> dict:
    """Every PARITY model of this (tp, vocabulary), trained on tp ranks in one launch."""
    return run_shared(tmp_path_factory, [m for m, t, v in PARITY if (t, v) == (tp, vocab)], tp, tp, "0", vocab)


@pytest.mark.slow
@pytest.mark.parametrize("model_name,tp,vocab", PARITY, ids=[f"{m}-tp{t}-v{v}" for m, t, v in PARITY])
def test_tensor_parallel_training_matches_eager(tmp_path_factory, model_name, tp, vocab):
    """Vocabulary 96 divides; 97 is padded to a multiple of tp (padding masked out of the loss)."""
    res = run_parity(tmp_path_factory, tp, vocab)[model_name][0]
    models.set_vocab(vocab)
    ref_losses, ref_state, ref_norms, noise = eager_reference(model_name, 1)
    assert max(ref_norms) > CLIP
    torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)
    assert_params_close(res["state"], ref_state, noise, f"tp={tp} {model_name}")
    assert_traffic_matches_report(res)
    assert_memory_is_analytic(res, 0, 1)
    assert res["eval_gap"] <= 1e-6 * abs(res["losses"][-1])  # eval graph: same sharding, same weights


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["gpt", "hf_llama"])
def test_2d_tensor_and_data_parallel_with_zero_matches_eager(tmp_path_factory, model_name):
    """tp=2 x dp=2 on 4 ranks, ZeRO-1/2/3 over the data-parallel dimension."""
    ref_losses, ref_state, _, noise = eager_reference(model_name, 2)
    # both models in one launch; eval graphs of ZeRO-1 (tp only, as ZeRO-2's) and ZeRO-3 (tp + gathers)
    results = run_shared(tmp_path_factory, ["gpt", "hf_llama"], 4, 2, "1,2,3", eval_stages="1,3")[model_name]
    assert [s for s, r in results.items() if r["eval_gap"] is not None] == [1, 3]
    for stage, res in results.items():
        torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL,
                                   msg=lambda m: f"ZeRO-{stage} x tp=2 losses: {m}")
        assert_params_close(res["state"], ref_state, noise, f"ZeRO-{stage} x tp=2 {model_name}")
        assert_memory_is_analytic(res, stage, 2)
        if res["eval_gap"] is not None:  # eval graph: TP (+ ZeRO-3 gathers) as in training
            assert res["eval_gap"] <= 1e-6 * abs(res["losses"][-1])


@pytest.mark.slow
def test_tensor_parallel_bf16_matches_eager_autocast(tmp_path):
    """bf16 compute under tp=2: within the bf16 bound of the ZeRO mixed-precision tests."""
    from test_parity_dp import LOW_TOL, assert_low_precision_close

    ref_losses, ref_state, _, noise = eager_reference("hf_llama", 1, "bf16")
    out = tmp_path / "bf16.pt"
    dsc_run(2, TESTS / "dist_worker.py", "--model", "hf_llama", "--stages", "0", "--steps", str(STEPS),
            "--micro", str(MICRO), "--gas", str(GAS), "--lr", str(LR), "--clip", str(CLIP), "--tp", "2",
            "--vocab", str(VOCAB), "--eval-stages", "none", "--precision", "bf16", "--out", str(out))
    res = torch.load(out, weights_only=False)[0]
    tol = LOW_TOL["bf16"]
    torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(ref_losses), rtol=tol, atol=0)
    assert_low_precision_close(res["state"], ref_state, noise, tol, "bf16 tp=2")


@pytest.mark.slow
def test_tensor_parallel_with_fusion_matches_eager(tmp_path):
    """tp=2 with generated kernels: fusion runs on each rank's local (sharded) ops."""
    ref_losses, ref_state, _, noise = eager_reference("hf_llama", 1)
    out = tmp_path / "tp_fused.pt"
    dsc_run(2, TESTS / "dist_worker.py", "--model", "hf_llama", "--stages", "0", "--steps", str(STEPS),
            "--micro", str(MICRO), "--gas", str(GAS), "--lr", str(LR), "--clip", str(CLIP), "--tp", "2",
            "--vocab", str(VOCAB), "--eval-stages", "none", "--fusion", "--out", str(out))
    res = torch.load(out, weights_only=False)[0]
    assert res["kernel_calls"] and all(c["kernel"] > 0 for c in res["kernel_calls"].values())
    torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(ref_losses), rtol=RTOL, atol=ATOL)
    assert_params_close(res["state"], ref_state, noise, "tp=2 + fusion hf_llama")


def test_cli_reports_an_impossible_sharding_as_an_error_not_a_traceback(tmp_path):
    import json
    import subprocess

    from helpers import ROOT, dsc_cmd

    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"tensor_parallel": {"size": 2, "rules": {"blocks.*.attn.c_attn": "rowwise"}}}))
    proc = subprocess.run([*dsc_cmd(), "compile", "examples/gpt.py", "--config", str(plan), "--world-size", "2"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "tensor_parallel" in proc.stderr and "blocks.0.attn.c_attn" in proc.stderr
