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

from dsc.passes.fusion import fuse_kernels
from dsc.passes.precision import relax_dtype_asserts
from dsc.passes.tensor_parallel import check_tensor_parallel, shard_tensor_parallel
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
    gas = ctx.plan.batch.gradient_accumulation_steps
    collectives = layout.collectives(gas, 2 if low else None) + tp_collectives(gm, ctx.plan.tensor_parallel.size, gas)
    comm = sum(c["sent_bytes"] * c["times"] for c in collectives)
    ctx.artifacts["estimate"] = {"memory": mem, "comm_bytes_per_step": comm, "collectives": collectives}
    return PassResult(
        summary=f"model states {(mem['params_bytes'] + mem['grads_bytes'] + mem['optimizer_bytes']):,} B; "
        f"activations <= {mem['activations_bytes']:,} B; sends {comm:,} B per optimizer step",
        details=ctx.artifacts["estimate"],
    )


def tp_collectives(gm: torch.fx.GraphModule, tp: int, gas: int) -> list[dict]:
    """The tensor-parallel collectives in the graph, each run once per micro-step (bytes from the
    node's fake value: payload = what this rank contributes)."""
    if tp == 1:
        return []
    ops = torch.ops.dsc
    out = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or getattr(node.target, "namespace", None) != "dsc":
            continue
        v = node.args[0].meta["val"]
        size = v.numel() * v.element_size()
        ring = 2 * size * (tp - 1) // tp
        if node.target is ops.tp_all_reduce.default:
            out.append({"op": "tp_all_reduce", "node": node.name, "when": "forward", "payload_bytes": size,
                        "sent_bytes": ring, "times": gas})
        elif node.target is ops.copy_to_tp.default:
            out.append({"op": "copy_to_tp.backward", "node": node.name, "when": "backward (gradient all-reduce)",
                        "payload_bytes": size, "sent_bytes": ring, "times": gas})
        elif node.target is ops.all_gather_dim.default:
            out.append({"op": "all_gather_dim", "node": node.name, "when": "forward (sharded output)",
                        "payload_bytes": size, "sent_bytes": size * (tp - 1), "times": gas})
        elif node.target is ops.vocab_parallel_cross_entropy.default:
            rows = v.shape[0]
            for when, n in (("forward (max, sum-exp, target logit)", 3), ("backward (max, sum-exp)", 2)):
                op = "vocab_parallel_cross_entropy" + (".backward" if when.startswith("backward") else "")
                out.append({"op": op, "node": node.name, "when": when, "payload_bytes": 4 * rows * n,
                            "sent_bytes": 2 * 4 * rows * n * (tp - 1) // tp, "times": gas})
    return out


# The order of these passes follows from provides/requires; the edges, and why:
#   annotate_shapes -> plan_zero_buckets: bucket sizes are element counts read from node values.
#   plan_zero_buckets -> shard_parameters: ZeRO-3 gathers whole buckets, so it needs their layout.
#   plan_zero_buckets -> estimate_costs: memory and traffic depend on the shard layout.
#   relax_dtype_asserts has no edge: it only removes assertion nodes nothing else reads.
#   shard_tensor_parallel is listed first (ties follow list order): every later pass must see the
#   local shapes it leaves (annotate_shapes' activation bytes, the ZeRO buckets of local shards).
PASSES = [
    Pass("shard_tensor_parallel", shard_tensor_parallel, provides=frozenset({"tp_sharded"}),
         enabled=lambda plan: plan.tensor_parallel.size > 1, check=check_tensor_parallel),
    Pass("annotate_shapes", annotate_shapes, provides=frozenset({"shapes"})),
    Pass("relax_dtype_asserts", relax_dtype_asserts, provides=frozenset({"autocast_ready"})),
    Pass("plan_zero_buckets", plan_zero_buckets, provides=frozenset({"grad_buckets"}),
         requires=frozenset({"shapes"}), check=check_zero_layout),
    Pass("shard_parameters", shard_parameters, provides=frozenset({"sharded_params"}),
         requires=frozenset({"grad_buckets"}), enabled=lambda plan: plan.zero.stage == 3, check=check_sharded),
    Pass("fuse_kernels", fuse_kernels, provides=frozenset({"fused"}), requires=frozenset({"shapes"}),
         enabled=lambda plan: plan.fusion.enabled and plan.fusion.backend != "none"),
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
    coords: dict[str, int] = field(default_factory=dict)

    def rank_report(self) -> dict[str, Any]:
        est = self.artifacts["estimate"]
        return {"rank": self.rank, "coords": dict(self.coords), "memory": est["memory"],
                "comm_bytes_per_step": est["comm_bytes_per_step"], "collectives": est["collectives"]}


def compile_rank(captured: Captured, plan, rank: int, world_size: int, args: tuple = (),
                 kwargs: dict | None = None) -> RankProgram:
    """Run the pass pipeline for one rank on its own copy of the graph (parameters are shared)."""
    with warnings.catch_warnings():  # deepcopy of a pytree codegen spec warns in torch 2.13
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(captured.gm.graph)
    gm = torch.fx.GraphModule(captured.gm, graph)
    gm.meta.update(getattr(captured.gm, "meta", {}))
    coords = rank_coords(plan, rank)
    ctx = CompileContext(plan=plan, rank=rank, world_size=world_size, coords=coords,
                         example_args=tuple(args), example_kwargs=dict(kwargs or {}),
                         optimizer_type=optimizer_kind(plan.optimizer))
    gm, records = run_passes(gm, ctx, PASSES)
    return RankProgram(rank, world_size, gm, ctx.artifacts, records, coords)


def rank_coords(plan, rank: int) -> dict[str, int]:
    """A rank's place on the ("dp", "tp") mesh: tensor-parallel ranks are adjacent."""
    tp = plan.tensor_parallel.size
    return {"dp": rank // tp, "tp": rank % tp}


def graph_code(program: RankProgram) -> str:
    """A rank's graph as readable Python, followed by the collectives its runtime issues."""
    coords = ", ".join(f"{k}={v}" for k, v in program.coords.items())
    lines = [f"# dsc rank {program.rank} of {program.world_size} ({coords})", program.gm.code.strip(), "",
             "# collectives per optimizer step (gradient buckets reduced during backward):"]
    for c in program.artifacts["estimate"]["collectives"]:
        what = f"bucket {c['bucket']}" if "bucket" in c else c["node"]
        lines.append(f"#   dsc::{c['op']}({what}) x{c['times']}  {c['payload_bytes']:,} B  [{c['when']}]")
    if not program.artifacts["estimate"]["collectives"]:
        lines.append("#   none (single rank)")
    return "\n".join(lines) + "\n"
