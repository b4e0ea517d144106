"""The pass list (in one place) and the rank-parametric compile of one captured graph.

`compile_rank(captured, plan, rank, world_size)` is a pure function of the graph, the plan and the
rank's coordinates: it creates no process group and moves no tensor, so `dsc compile` can build
every rank's program in one process. The runtime (`dsc.api.CompiledModel`) executes the result.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch.fx

from dsc.passes.precision import relax_dtype_asserts
from dsc.passes.zero import check_zero_layout, plan_zero_buckets
from dsc.passes.zero3 import check_sharded, shard_parameters
from dsc.runtime.optim import optimizer_kind

from .analyze import annotate_shapes, parameter_bytes
from .capture import Captured
from .pass_manager import CompileContext, Pass, PassResult, run_passes


def estimate_costs(gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Per-rank bytes (params, grads, optimizer state, activations) and communication per step.

    Requires: `zero_layout` and `activations_bytes` in ctx.artifacts. Guarantees:
    `ctx.artifacts["estimate"]` (memory dict, bytes sent per optimizer step, every collective).
    Analysis only: the graph is unchanged.
    """
    layout = ctx.artifacts["zero_layout"]
    _, frozen, buffers = parameter_bytes(gm)
    mem = layout.memory(ctx.optimizer_type)
    mem["params_bytes"] += frozen
    mem["activations_bytes"] = ctx.artifacts["activations_bytes"]
    mem["buffers_bytes"] = buffers
    mem["total_bytes"] = sum(mem.values())
    if layout.stage == 3:
        mem["gathered_bound_bytes"] = layout.gathered_bound_bytes()
    low = ctx.plan.precision.dtype != "fp32" and layout.stage == 3  # shards are cast before the gather
    collectives = layout.collectives(ctx.plan.batch.gradient_accumulation_steps, 2 if low else None)
    comm = sum(c["sent_bytes"] * c["times"] for c in collectives)
    ctx.artifacts["estimate"] = {"memory": mem, "comm_bytes_per_step": comm, "collectives": collectives}
    return PassResult(
        summary=f"model states {(mem['params_bytes'] + mem['grads_bytes'] + mem['optimizer_bytes']):,} B; "
        f"activations <= {mem['activations_bytes']:,} B; sends {comm:,} B per optimizer step",
        details=ctx.artifacts["estimate"],
    )


# The order of these passes follows from provides/requires; the edges, and why:
#   annotate_shapes -> plan_zero_buckets: bucket sizes are element counts read from node values.
#   plan_zero_buckets -> shard_parameters: ZeRO-3 gathers whole buckets, so it needs their layout.
#   plan_zero_buckets -> estimate_costs: memory and traffic depend on the shard layout.
#   relax_dtype_asserts has no edge: it only removes assertion nodes nothing else reads.
PASSES = [
    Pass("annotate_shapes", annotate_shapes, provides=frozenset({"shapes"})),
    Pass("relax_dtype_asserts", relax_dtype_asserts, provides=frozenset({"autocast_ready"}),
         enabled=lambda plan: plan.precision.dtype != "fp32"),
    Pass("plan_zero_buckets", plan_zero_buckets, provides=frozenset({"grad_buckets"}),
         requires=frozenset({"shapes"}), check=check_zero_layout),
    Pass("shard_parameters", shard_parameters, provides=frozenset({"sharded_params"}),
         requires=frozenset({"grad_buckets"}), enabled=lambda plan: plan.zero.stage == 3, check=check_sharded),
    Pass("estimate_costs", estimate_costs, provides=frozenset({"estimates"}),
         requires=frozenset({"shapes", "grad_buckets"})),
]


@dataclass
class RankProgram:
    """One rank's compiled program: its graph, what the passes decided, and the pass log."""

    rank: int
    world_size: int
    gm: torch.fx.GraphModule
    artifacts: dict[str, Any]
    passes: list[dict[str, Any]] = field(default_factory=list)

    def rank_report(self) -> dict[str, Any]:
        est = self.artifacts["estimate"]
        return {"rank": self.rank, "coords": {"dp": self.rank}, "memory": est["memory"],
                "comm_bytes_per_step": est["comm_bytes_per_step"], "collectives": est["collectives"]}


def compile_rank(captured: Captured, plan, rank: int, world_size: int, args: tuple = (),
                 kwargs: dict | None = None) -> RankProgram:
    """Run the pass pipeline for one rank on its own copy of the graph (parameters are shared)."""
    with warnings.catch_warnings():  # deepcopy of a pytree codegen spec warns in torch 2.13
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(captured.gm.graph)
    gm = torch.fx.GraphModule(captured.gm, graph)
    gm.meta.update(getattr(captured.gm, "meta", {}))
    ctx = CompileContext(plan=plan, rank=rank, world_size=world_size, coords={"dp": rank},
                         example_args=tuple(args), example_kwargs=dict(kwargs or {}),
                         optimizer_type=optimizer_kind(plan.optimizer))
    gm, records = run_passes(gm, ctx, PASSES)
    return RankProgram(rank, world_size, gm, ctx.artifacts, records)


def graph_code(program: RankProgram) -> str:
    """A rank's graph as readable Python, followed by the collectives its runtime issues."""
    lines = [f"# dsc rank {program.rank} of {program.world_size}", program.gm.code.strip(), "",
             "# collectives per optimizer step (gradient buckets reduced during backward):"]
    for c in program.artifacts["estimate"]["collectives"]:
        lines.append(f"#   dsc::{c['op']}(bucket {c['bucket']}) x{c['times']}  {c['payload_bytes']:,} B  "
                     f"[{c['when']}]")
    if not program.artifacts["estimate"]["collectives"]:
        lines.append("#   none (single rank)")
    return "\n".join(lines) + "\n"
