"""DeepSpeed config translation, checked on 24 real ds_config.json files (see SOURCES.md there).

For every file the expected outcome is recorded below, and every key of every file must be
accounted for: translated (a ``deepspeed:<key>`` source), reported as a problem, or noted.
"""

import json
from pathlib import Path

import pytest

from dsc.schemas import (Plan, PlanError, PlanWarning, is_deepspeed_config, load_plan,
                         translate_deepspeed, validate_source)

CONFIGS = Path(__file__).resolve().parents[2] / "shared" / "ds_configs"
needs_configs = pytest.mark.skipif(
    not CONFIGS.is_dir(), reason=f"real DeepSpeed configs not found at {CONFIGS} (shared/ beside the repo)")

HF_AUTO_WARNINGS = ["optimizer.params.betas", "optimizer.params.eps", "optimizer.params.lr",
                    "optimizer.params.weight_decay", "scheduler.params.warmup_max_lr",
                    "scheduler.params.warmup_min_lr", "scheduler.params.warmup_num_steps"]

# ZeRO-3 knobs dsc does not have yet (it frees a gathered bucket after its last use, not by reuse distance)
Z3_UNSUPPORTED = ["zero_optimization.stage3_max_reuse_distance"]

# file -> {world_size: ("valid", [warning key paths]) | ("error", [error key paths])}
EXPECTED = {
    "ds_autotuning_template_zero3.json": {
        1: ("valid", ["train_micro_batch_size_per_gpu", *Z3_UNSUPPORTED])},
    "ds_docs_autoep_custom_model.json": {
        1: ("valid", ["expert_parallel", "train_micro_batch_size_per_gpu"])},
    "ds_examples_sdma_zero3_bf16.json": {
        1: ("valid", [*Z3_UNSUPPORTED]), 8: ("valid", [*Z3_UNSUPPORTED])},
    "ds_tests_bingbert_fp16_eigenvalue_moq.json": {
        1: ("valid", ["eigenvalue", "optimizer.params.bias_correction",
                      "quantize_training", "tensorboard"]),
        8: ("valid", ["eigenvalue", "optimizer.params.bias_correction",
                      "quantize_training", "tensorboard"])},
    "ds_tests_deepcompile_zero3_no_persist.json": {
        1: ("valid", ["zero_optimization.stage3_model_persistence_threshold"])},
    "ds_tests_hybrid_engine_zero0_offload_param.json": {
        1: ("valid", ["zero_optimization.offload_param"])},
    "ds_tests_megatron_gpt2_bs4_zero1.json": {
        1: ("valid", []), 8: ("error", ["train_batch_size"])},
    "ds_tests_megatron_gpt2_bs8_zero0_gas3.json": {
        1: ("valid", ["activation_checkpointing"]),
        8: ("valid", ["activation_checkpointing"])},
    "ds_tests_megatron_gpt2_bs8_zero2_cpu_offload_legacy.json": {
        1: ("valid", ["activation_checkpointing",
                      "zero_optimization.cpu_offload", "zero_optimization.cpu_offload"])},
    "ds_tests_torch_compile_zero3_bf16.json": {1: ("valid", []), 8: ("valid", [])},
    "dse_autosp_deepcompile.json": {
        1: ("valid", ["compile.passes", "sequence_parallel_size"]),
        8: ("error", ["train_batch_size"])},
    "dse_autotp_hf_zero2_auto.json": {1: ("error", ["scheduler.params.total_num_steps"])},
    "dse_autotuning_hf_fp16_tune.json": {
        1: ("valid", ["autotuning"]), 8: ("valid", ["autotuning"])},
    "dse_bing_bert_onebitadam_fp16.json": {1: ("error", ["optimizer.type"])},
    "dse_compression_bert_xtc_w1a8.json": {
        1: ("valid", ["compression_training", "prescale_gradients"]),
        8: ("error", ["train_batch_size"])},
    "dse_compression_bert_zeroquant_w8a8.json": {
        1: ("valid", ["compression_training", "prescale_gradients"]),
        8: ("error", ["train_batch_size"])},
    "dse_compression_cifar_channel_prune.json": {
        1: ("valid", ["compression_training", "prescale_gradients"]),
        8: ("error", ["train_batch_size"])},
    "dse_pipeline_parallelism.json": {1: ("valid", []), 8: ("valid", [])},
    "dse_sglang_zero3_nvme_offload_auto.json": {
        1: ("valid", ["zero_optimization.offload_param"]),
        8: ("error", ["train_batch_size"])},
    "dse_zenflow_zero2_offload.json": {
        1: ("valid", ["zero_optimization.offload_optimizer",
                      "zero_optimization.zenflow"])},
    "hf_accelerate_zero3_offload_auto.json": {
        1: ("valid", ["optimizer.params.lr", "optimizer.params.weight_decay", "scheduler.params.warmup_max_lr",
                      "scheduler.params.warmup_min_lr", "scheduler.params.warmup_num_steps",
                      "zero_optimization.offload_optimizer", "zero_optimization.offload_param", *Z3_UNSUPPORTED])},
    "hf_transformers_zero2_auto.json": {
        1: ("valid", HF_AUTO_WARNINGS + ["zero_optimization.offload_optimizer"]),
        8: ("valid", HF_AUTO_WARNINGS + ["zero_optimization.offload_optimizer"])},
    "hf_transformers_zero3_bf16_auto.json": {
        1: ("valid", ["bfloat16", *HF_AUTO_WARNINGS, "zero_optimization.offload_optimizer",
                      "zero_optimization.offload_param", "zero_optimization.stage3_gather_fp16_weights_on_model_save",
                      *Z3_UNSUPPORTED])},
    "mds_universal_checkpointing_zero1_bf16.json": {
        1: ("valid", []), 8: ("error", ["train_batch_size"])},
}
CASES = [(name, ws, *outcome) for name, by_ws in EXPECTED.items() for ws, outcome in by_ws.items()]


def load_json(name):
    return json.loads((CONFIGS / name).read_text())


@needs_configs
def test_table_covers_every_file():
    assert sorted(p.name for p in CONFIGS.glob("*.json")) == sorted(EXPECTED)


@needs_configs
@pytest.mark.parametrize("name,world_size,outcome,paths", CASES, ids=[f"{c[0]}-ws{c[1]}" for c in CASES])
def test_real_config(name, world_size, outcome, paths):
    plan, problems = validate_source(CONFIGS / name, world_size=world_size)
    errors = [p.path for p in problems if p.severity == "error"]
    if outcome == "valid":
        assert errors == [], problems
        assert sorted(p.path for p in problems if p.severity == "warning") == sorted(paths)
        assert plan is not None and plan.parallel.world_size == world_size
        origins = ("plan", "default", "derived (", "deepspeed:", "auto: ")
        assert all(s.startswith(origins) for s in plan.sources.values()), plan.sources
    else:
        assert plan is None and sorted(errors) == sorted(paths), problems


def leaf_paths(d, prefix=""):
    """Dotted paths of every non-dict value in a nested dict."""
    for key, value in d.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaf_paths(value, path + ".")
        else:
            yield path


def covered(path, reported):
    """True when `path` or one of its parent sections is among the reported paths."""
    parts = path.split(".")
    return any(".".join(parts[:n]) in reported for n in range(1, len(parts) + 1))


@needs_configs
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_nothing_silently_dropped(name):
    cfg = load_json(name)
    t = translate_deepspeed(cfg, model_info={"hidden_size": 1024})
    reported = {s.removeprefix("deepspeed:").split(" ")[0] for s in t.sources.values()}
    reported |= {p.path for p in t.problems} | {n.split(": ", 1)[0] for n in t.notes}
    missing = [p for p in leaf_paths(cfg) if not covered(p, reported)]
    assert missing == [], f"keys neither translated nor reported: {missing}"


@needs_configs
def test_file_starting_with_space_loads():
    assert (CONFIGS / "dse_pipeline_parallelism.json").read_text()[0] == " "
    plan = load_plan(str(CONFIGS / "dse_pipeline_parallelism.json"), world_size=8)
    assert (plan.batch.train_batch_size, plan.batch.micro_batch_size,
            plan.batch.gradient_accumulation_steps) == (256, 8, 4)
    assert plan.optimizer.type == "adamw"  # DeepSpeed "Adam" defaults to adam_w_mode=True
    assert plan.sources["batch.micro_batch_size"] == "deepspeed:train_micro_batch_size_per_gpu"
    assert plan.sources["batch.gradient_accumulation_steps"].startswith("derived")


@needs_configs
def test_every_real_config_is_detected_as_deepspeed():
    for name in EXPECTED:
        assert is_deepspeed_config(load_json(name)), name


@needs_configs
def test_hf_auto_values_resolved():
    plan, problems = validate_source(CONFIGS / "hf_transformers_zero2_auto.json", world_size=4)
    assert plan.optimizer.lr == 5e-5 and plan.optimizer.betas == (0.9, 0.999)
    assert plan.scheduler.warmup_max_lr == 5e-5 and plan.gradient_clipping == 1.0
    assert plan.zero.reduce_bucket_size == 200_000_000  # 2e8 float -> int
    assert (plan.batch.micro_batch_size, plan.batch.gradient_accumulation_steps,
            plan.batch.train_batch_size) == (1, 1, 4)
    lr = next(p for p in problems if p.path == "optimizer.params.lr")
    assert "5e-05" in lr.message and "HF Trainer" in lr.message
    assert plan.sources["optimizer.lr"].startswith("deepspeed:optimizer.params.lr (auto")


@needs_configs
def test_strict_turns_warnings_into_errors():
    name = "ds_tests_megatron_gpt2_bs8_zero0_gas3.json"
    with pytest.raises(PlanError) as e:
        load_plan(CONFIGS / name, strict=True)
    assert [p.path for p in e.value.problems] == ["activation_checkpointing"]
    with pytest.warns(PlanWarning, match="activation_checkpointing"):
        plan = load_plan(CONFIGS / name)
    assert plan.precision.dtype == "fp16" and plan.precision.hysteresis == 2


@needs_configs
def test_deprecated_aliases_warn_with_new_name():
    t = translate_deepspeed(CONFIGS / "hf_transformers_zero3_bf16_auto.json")
    msgs = {p.path: p.message for p in t.problems}
    assert "'bf16'" in msgs["bfloat16"]
    assert "stage3_gather_16bit_weights_on_model_save" in msgs[
        "zero_optimization.stage3_gather_fp16_weights_on_model_save"]
    legacy = translate_deepspeed(CONFIGS / "ds_tests_megatron_gpt2_bs8_zero2_cpu_offload_legacy.json")
    offload = [p.message for p in legacy.problems if p.path == "zero_optimization.cpu_offload"]
    assert any("offload_optimizer" in m for m in offload) and any("not supported" in m for m in offload)


# ---- synthetic DeepSpeed configs -----------------------------------------------------------

def test_adam_w_mode_semantics():
    def typ(cfg):
        return load_plan({"train_batch_size": 1, "optimizer": cfg}).optimizer.type
    assert typ({"type": "Adam", "params": {}}) == "adamw"
    assert typ({"type": "Adam", "params": {"adam_w_mode": False}}) == "adam"
    assert typ({"type": "AdamW", "params": {"adam_w_mode": False}}) == "adamw"
    assert typ({"type": "adamw", "params": {}}) == "adamw"
    assert typ({"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}) == "sgd"


def test_unknown_optimizer_and_max_grad_norm_are_errors():
    _, problems = validate_source({"train_batch_size": 1, "optimizer": {
        "type": "Lamb", "params": {"lr": 1e-3}}})
    err = next(p for p in problems if p.path == "optimizer.type")
    assert err.severity == "error" and "Lamb" in err.message and "AdamW" in err.message
    _, problems = validate_source({"train_batch_size": 1, "optimizer": {
        "type": "AdamW", "params": {"max_grad_norm": 1.0}}})
    assert [p.path for p in problems if p.severity == "error"] == ["optimizer.params.max_grad_norm"]


def test_unknown_keys_get_did_you_mean():
    t = translate_deepspeed({"train_batch_sizee": 8, "zero_optimisation": {"stage": 1},
                             "zero_optimization": {"stag": 1}, "steps_per_print": 1})
    msgs = {p.path: p.message for p in t.problems}
    assert "did you mean 'train_batch_size'" in msgs["train_batch_sizee"]
    assert "did you mean 'zero_optimization'" in msgs["zero_optimisation"]
    assert "did you mean 'stage'" in msgs["zero_optimization.stag"]


def test_bad_value_reported_at_deepspeed_path():
    _, problems = validate_source({"train_batch_size": 8, "zero_optimization": {"stage": 7}})
    assert [(p.path, p.severity) for p in problems] == [("zero_optimization.stage", "error")]
    assert "allowed: 0, 1, 2, 3" in problems[0].message and "zero.stage" in problems[0].message


def test_reduce_bucket_size_auto_uses_hidden_size():
    cfg = {"train_batch_size": 8, "zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}}
    plan = load_plan(cfg, model_info={"hidden_size": 1024})
    assert plan.zero.reduce_bucket_size == 1024 * 1024
    assert "hidden_size" in plan.sources["zero.reduce_bucket_size"]
    assert load_plan(cfg).zero.reduce_bucket_size == 500_000_000


def test_fp16_off_or_auto_is_fine():
    for enabled in (False, "auto"):
        plan, problems = validate_source({"train_batch_size": 2, "fp16": {"enabled": enabled}})
        assert plan.precision.dtype == "fp32" and problems == []


def test_scheduler_translation():
    plan = load_plan({"train_batch_size": 4, "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}},
                      "scheduler": {"type": "WarmupCosineLR", "params": {
                          "total_num_steps": 1e4, "warmup_num_steps": 100, "cos_min_ratio": 0.1}}})
    s = plan.scheduler
    assert (s.type, s.total_num_steps, s.warmup_num_steps, s.cos_min_ratio) == (
        "WarmupCosineLR", 10000, 100, 0.1)
    _, problems = validate_source({"train_batch_size": 4, "scheduler": {
        "type": "WarmupCosineLR", "params": {"total_num_steps": 10, "warmup_max_lr": 0.1}}})
    assert [p.path for p in problems] == ["scheduler.params.warmup_max_lr"]
    _, problems = validate_source({"train_batch_size": 4, "scheduler": {"type": "OneCycle", "params": {}}})
    assert [p.path for p in problems] == ["scheduler.type"]


def test_detection():
    assert is_deepspeed_config({"train_batch_size": 8})
    assert is_deepspeed_config({"optimizer": {"type": "Adam", "params": {"lr": 1}}})
    assert is_deepspeed_config({"tensor_parallel": {"autotp_size": 2}})
    assert not is_deepspeed_config({"optimizer": {"type": "adamw", "lr": 1e-3}})
    assert not is_deepspeed_config({"zero": {"stage": 1}, "train_batch_size": 8})
    assert not is_deepspeed_config({})


def test_from_deepspeed_classmethod():
    plan = Plan.from_deepspeed({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2},
                               world_size=2)
    assert plan.batch.train_batch_size == 8
    assert plan.sources["batch.train_batch_size"].startswith("derived")
    assert plan.sources["batch.gradient_accumulation_steps"] == "deepspeed:gradient_accumulation_steps"
