"""Native dsc plans: validation messages, resolution of the batch rule, and value sources."""

import json

import pydantic
import pytest

from dsc.schemas import Plan, PlanError, Problem, load_plan, validate_source


def errors_of(plan_dict, world_size=1):
    with pytest.raises(PlanError) as e:
        load_plan(plan_dict, world_size=world_size)
    return e.value


def test_round_trip_and_json(tmp_path):
    d = {"schema_version": 1, "zero": {"stage": 2, "overlap_comm": True},
         "optimizer": {"type": "AdamW", "lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1},
         "scheduler": {"type": "WarmupDecayLR", "total_num_steps": 1000, "warmup_num_steps": 10},
         "batch": {"micro_batch_size": 2, "gradient_accumulation_steps": 4},
         "gradient_clipping": 1.0}
    plan = load_plan(d, world_size=2)
    assert plan.optimizer.type == "adamw" and plan.optimizer.betas == (0.9, 0.95)
    assert plan.batch.train_batch_size == 16
    again = load_plan(json.loads(plan.model_dump_json()), world_size=2)
    assert again.model_dump() == plan.model_dump()  # equal values; sources differ ("plan" vs "derived")
    path = tmp_path / "plan.json"
    path.write_text("\n  " + json.dumps(d))
    assert load_plan(path, world_size=2) == plan and load_plan(str(path), world_size=2) == plan
    assert load_plan(json.dumps(d), world_size=2) == plan
    assert load_plan(plan, world_size=2) == plan


def test_defaults():
    plan = load_plan({})
    assert plan.zero.stage == 0 and plan.zero.reduce_bucket_size == 500_000_000
    assert plan.optimizer is None and plan.precision.dtype == "fp32"
    assert (plan.batch.train_batch_size, plan.batch.micro_batch_size,
            plan.batch.gradient_accumulation_steps) == (1, 1, 1)


def test_frozen():
    plan = load_plan({"zero": {"stage": 1}})
    with pytest.raises(pydantic.ValidationError):
        plan.zero.stage = 2
    with pytest.raises(pydantic.ValidationError):
        plan.gradient_clipping = 1.0


def test_integral_floats_accepted():
    plan = load_plan({"zero": {"reduce_bucket_size": 5e8, "allgather_bucket_size": 2e8}})
    assert plan.zero.reduce_bucket_size == 500_000_000 and isinstance(plan.zero.allgather_bucket_size, int)


@pytest.mark.parametrize("plan_dict,path,needles", [
    ({"zero": {"stage": 4}}, "zero.stage", ["4", "not allowed", "allowed: 0, 1, 2, 3"]),
    ({"zero": {"stage": 4}}, "zero.stage", ["4", "allowed: 0, 1, 2"]),
    ({"precision": {"dtype": "int8"}}, "precision.dtype", ["'int8'", "allowed: 'fp32', 'bf16', 'fp16'"]),
    ({"precision": {"grad_accum_dtype": "int8"}}, "precision.grad_accum_dtype", ["'int8'", "'fp32', 'bf16', 'fp16'"]),
    ({"optimizer": {"type": "lion"}}, "optimizer.type", ["'lion'", "'adamw'", "'adam'", "'sgd'"]),
    ({"scheduler": {"type": "OneCycle"}}, "scheduler.type", ["'OneCycle'", "'WarmupLR'"]),
    ({"scheduler": {"type": "WarmupLR", "warmup_type": "cubic"}}, "scheduler.warmup_type",
     ["'cubic'", "'log'", "'linear'"]),
    ({"scheduler": {"type": "WarmupCosineLR"}}, "scheduler.total_num_steps", ["required", "WarmupCosineLR"]),
    ({"gradient_clipping": -1}, "gradient_clipping", ["-1", "greater than or equal to 0"]),
    ({"zero": {"reduce_bucket_size": 1.5}}, "zero.reduce_bucket_size", ["1.5"]),
    ({"batch": {"micro_batch_size": 0}}, "batch.micro_batch_size", ["0", "greater than 0"]),
    ({"batch": {"micro_batch_size": True}}, "batch.micro_batch_size", ["True", "boolean"]),
    ({"schema_version": 2}, "schema_version", ["2", "allowed: 1"]),
    ({"zero": {"stag": 1}}, "zero.stag", ["did you mean 'stage'?"]),
    ({"optimiser": {"type": "sgd"}}, "optimiser", ["did you mean 'optimizer'?"]),
    ({"zero_optimisation": {"stage": 1}}, "zero_optimisation", ["did you mean 'zero'?", "zero_optimization"]),
    ({"batch": {"train_micro_batch_size_per_gpu": 2}}, "batch.train_micro_batch_size_per_gpu",
     ["did you mean 'micro_batch_size'?"]),
])
def test_error_messages(plan_dict, path, needles):
    err = errors_of(plan_dict)
    [problem] = err.problems
    assert problem.path == path and problem.severity == "error"
    line = str(problem)
    assert line.startswith(f"{path}: ")
    for needle in needles:
        assert needle in line, line
    assert "pydantic" not in str(err) and "For further information" not in str(err)


@pytest.mark.parametrize("section", ["pipeline", "moe", "quantization", "pruning", "checkpoint"])
def test_reserved_sections_rejected(section):
    [problem] = errors_of({section: {"enabled": True}}).problems
    assert problem.path == section and "not supported yet" in problem.message
    assert load_plan({section: None}).model_dump()[section] is None


def test_all_problems_reported_at_once():
    err = errors_of({"zero": {"stage": 5, "overlap_comm": "maybe"}, "precision": {"dtype": "fp8"},
                     "moe": {}, "optimizer": {"type": "adamw", "lr": -1}})
    assert sorted(p.path for p in err.problems) == [
        "moe", "optimizer.lr", "precision.dtype", "zero.overlap_comm", "zero.stage"]
    lines = str(err).splitlines()
    assert lines[0].startswith("invalid plan: 5 errors") and len(lines) == 6


def test_problem_str():
    assert str(Problem("zero.stage", 4, "4 — not allowed; allowed: 0, 1, 2")) == \
        "zero.stage: 4 — not allowed; allowed: 0, 1, 2"


def test_validate_source_never_raises():
    plan, problems = validate_source({"zero": {"stage": 4}})
    assert plan is None and [p.path for p in problems] == ["zero.stage"]
    plan, problems = validate_source("/nonexistent/plan.json")
    assert plan is None and problems[0].path == "<source>"
    plan, problems = validate_source("{not json")
    assert plan is None and "JSON" in problems[0].message


# ---- batch rule: train_batch_size = micro × gas × dp --------------------------------------

@pytest.mark.parametrize("tbs,micro,gas,ws,expected", [
    (None, None, None, 1, (1, 1, 1)),
    (None, None, None, 8, (8, 1, 1)),
    (32, None, None, 8, (32, 4, 1)),
    (32, 2, None, 8, (32, 2, 2)),
    (32, None, 2, 8, (32, 2, 2)),
    (None, 4, None, 8, (32, 4, 1)),
    (None, 4, 3, 2, (24, 4, 3)),
    (24, 4, 3, 2, (24, 4, 3)),
    (256, 8, None, 1, (256, 8, 32)),
    (256, 8, None, 8, (256, 8, 4)),
    (4.0, None, None, 4, (4, 1, 1)),
])
def test_batch_resolution(tbs, micro, gas, ws, expected):
    batch = {k: v for k, v in [("train_batch_size", tbs), ("micro_batch_size", micro),
                               ("gradient_accumulation_steps", gas)] if v is not None}
    plan = load_plan({"batch": batch}, world_size=ws)
    b = plan.batch
    assert (b.train_batch_size, b.micro_batch_size, b.gradient_accumulation_steps) == expected
    assert plan.parallel.data_parallel_size == ws == plan.parallel.world_size


@pytest.mark.parametrize("batch,ws,needles", [
    ({"train_batch_size": 4, "micro_batch_size": 1}, 8,
     ["train_batch_size 4 is not divisible by micro_batch_size 1 × data_parallel_size 8"]),
    ({"train_batch_size": 4}, 8, ["train_batch_size 4", "data_parallel_size 8"]),
    ({"train_batch_size": 32, "gradient_accumulation_steps": 3}, 2,
     ["train_batch_size 32", "gradient_accumulation_steps 3", "data_parallel_size 2"]),
    ({"train_batch_size": 10, "micro_batch_size": 2, "gradient_accumulation_steps": 2}, 2,
     ["train_batch_size 10 != micro_batch_size 2", "= 8"]),
    ({"gradient_accumulation_steps": 4}, 1, ["gradient_accumulation_steps", "micro_batch_size"]),
])
def test_batch_errors(batch, ws, needles):
    [problem] = errors_of({"batch": batch}, world_size=ws).problems
    assert problem.path.startswith("batch.")
    for needle in needles:
        assert needle in problem.message, problem.message


def test_data_parallel_size_must_match_world_size():
    [problem] = errors_of({"parallel": {"data_parallel_size": 4}}, world_size=8).problems
    assert problem.path == "parallel.data_parallel_size" and "4" in problem.message and "8" in problem.message
    assert load_plan({"parallel": {"data_parallel_size": 8}}, world_size=8).parallel.world_size == 8


def test_bad_world_size():
    with pytest.raises(PlanError, match="world_size"):
        load_plan({}, world_size=0)


# ---- sources --------------------------------------------------------------------------------

def test_sources():
    plan = load_plan({"zero": {"stage": 1, "reduce_bucket_size": "auto"},
                      "batch": {"train_batch_size": 16}}, world_size=4, model_info={"hidden_size": 64})
    s = plan.sources
    assert s["zero.stage"] == "plan" and s["zero.overlap_comm"] == "default"
    assert s["batch.train_batch_size"] == "plan"
    assert s["batch.micro_batch_size"].startswith("derived (") and "16" in s["batch.micro_batch_size"]
    assert s["parallel.data_parallel_size"].startswith("derived")
    assert s["zero.reduce_bucket_size"].startswith("auto: ") and plan.zero.reduce_bucket_size == 64 * 64
    assert s["optimizer"] == "default" and s["precision.dtype"] == "default"
    assert set(s) >= {"schema_version", "gradient_clipping", "parallel.world_size", "moe"}


def test_resolve_keeps_sources_and_is_idempotent():
    plan = load_plan({"batch": {"micro_batch_size": 2}}, world_size=2)
    again = plan.resolve(2)
    assert again == plan and again.sources == plan.sources


def test_resolve_on_constructed_plan():
    plan = Plan(zero={"stage": 2}).resolve(4)
    assert plan.batch.train_batch_size == 4 and plan.sources["zero.stage"] == "plan"


def test_json_schema_documents_every_field():
    schema = Plan.model_json_schema()
    assert schema["properties"]["zero"]
    for name, definition in [("Plan", schema), *schema["$defs"].items()]:
        for field, prop in definition.get("properties", {}).items():
            assert prop.get("description"), f"{name}.{field} has no description"
