"""ZeRO-3: parameters live as flat shards; the graph gathers them just before use.

Requires: `ctx.artifacts["zero_layout"]` from `plan_zero_buckets` with stage 3 (buckets in forward
order; rank r owns chunk r of every bucket).
Guarantees: no get_attr of an original trainable parameter remains. For each bucket the graph
reads this rank's shard (`get_attr _dsc_shard_<b>`, a 1-D parameter of `chunk` elements the
runtime creates), gathers it with `dsc::all_gather` (whose gradient is the reduce-scatter, so
autograd reduces gradients into the shards), and takes each parameter as a view of the gathered
buffer (one split_with_sizes per gather). A gather serves the uses of its bucket while the bucket
is among the `layout.recent` (2, or 1 under a tight max_live_parameters) most recently used; a
later use (a tied weight, say) gets a fresh gather, so at most that many non-persistent buckets
are whole at any point of forward. Persistent buckets (parameters under the persistence threshold)
are gathered once per forward and kept for backward; the others are re-gathered in backward by the
runtime's saved-tensor hooks (`dsc.runtime.zero3`), so no whole parameter outlives its use.
Reads node.meta: `val`. Writes node.meta: `val` on new nodes, `dsc.gather` = bucket index.
Writes `ctx.artifacts["zero3_gather_order"]`: the bucket of every gather in graph order (the
runtime prefetches along it).
"""

from __future__ import annotations

import operator

import torch
import torch.fx

from dsc.pass_manager import CompileContext, InvariantError, PassResult
from dsc.runtime import collectives  # noqa: F401  (registers torch.ops.dsc.*)

aten = torch.ops.aten
GROUP = "dp"  # resolved to this rank's data-parallel group by the runtime


def shard_attr(index: int) -> str:
    return f"_dsc_shard_{index}"


def shard_parameters(gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Replace trainable parameters by gathers of their shards, placed just before use."""
    layout = ctx.artifacts["zero_layout"]
    graph = gm.graph
    canonical = {id(p): n for n, p in gm.named_parameters(remove_duplicate=True)}
    where = {s.name: (b, s) for b in layout.buckets for s in b.slots}
    order = {n: i for i, n in enumerate(graph.nodes)}

    # every use of a sharded parameter, in graph order: (user node, old get_attr node, bucket)
    uses = []
    for node in list(graph.nodes):
        if node.op != "get_attr":
            continue
        try:
            name = canonical.get(id(gm.get_parameter(node.target)))
        except AttributeError:
            continue
        if name not in where:
            continue
        for user in node.users:
            uses.append((order[user], user, node, where[name]))
    uses.sort(key=lambda u: u[0])

    dtype = next(iter(gm.parameters())).dtype
    low = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(ctx.plan.precision.dtype)
    for b in layout.buckets:  # placeholders (no memory) until the runtime registers the real shards
        gm.register_parameter(shard_attr(b.index), torch.nn.Parameter(torch.empty(b.chunk, dtype=dtype,
                                                                                  device="meta")))
    gathers, order = 0, []  # order: the bucket of every gather, in graph order (for prefetching)
    current: dict[int, tuple[torch.fx.Node, dict]] = {}  # bucket -> (gather node, {slot: view})
    recent: list[int] = []  # the last non-persistent buckets used (layout.recent): their gathers stay usable
    for _, user, old, (b, s) in uses:
        live = current.get(b.index)
        stale = live is not None and not b.persistent and b.index not in recent
        if live is None or stale:
            with graph.inserting_before(user):
                shard = graph.get_attr(shard_attr(b.index))
                shard.meta["val"] = torch.empty(b.chunk, dtype=dtype, device="meta")
                src = shard
                if low is not None:  # mixed precision: gather (and reduce-scatter) in the low dtype
                    src = graph.call_function(aten._to_copy.default, (shard,), {"dtype": low})
                    src.meta["val"] = torch.empty(b.chunk, dtype=low, device="meta")
                full = graph.call_function(torch.ops.dsc.all_gather.default, (src, GROUP, layout.dp, b.index))
                full.meta["val"] = torch.empty(b.padded, dtype=low or dtype, device="meta")
                full.meta["dsc.gather"] = b.index
                # one split per gather: its backward is a single concatenation into the bucket's
                # gradient (a slice per parameter would zero-fill a whole bucket per parameter)
                sizes = [x.numel for x in b.slots] + ([b.padded - b.numel] if b.padded > b.numel else [])
                split = graph.call_function(aten.split_with_sizes.default, (full, sizes))
                split.meta["val"] = [torch.empty(n, dtype=low or dtype, device="meta") for n in sizes]
            live = current[b.index] = (split, {})
            gathers += 1
            order.append(b.index)
        split, views = live
        if s.name not in views:
            index = next(i for i, x in enumerate(b.slots) if x.name == s.name)
            with graph.inserting_after(split):
                piece = graph.call_function(operator.getitem, (split, index))
            with graph.inserting_after(piece):
                view = graph.call_function(aten.view.default, (piece, list(s.shape)))
            piece.meta["val"] = torch.empty(s.numel, dtype=low or dtype, device="meta")
            view.meta["val"] = torch.empty(s.shape, dtype=low or dtype, device="meta")
            views[s.name] = view
        user.replace_input_with(old, views[s.name])
        if not b.persistent and (not recent or recent[-1] != b.index):
            recent = [*recent, b.index][-layout.recent:]

    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            graph.erase_node(node)
    _check_topological(graph)
    ctx.artifacts["zero3_gather_order"] = order
    declined = []
    if not ctx.plan.zero.reduce_scatter:
        declined.append({"what": "zero.reduce_scatter=false", "reason": "ZeRO-3 gradients are always "
                         "reduce-scattered (the gather's gradient)"})
    return PassResult(
        declined=declined,
        summary=(f"ZeRO-3: {sum(len(b.slots) for b in layout.buckets)} parameters sharded in "
                 f"{len(layout.buckets)} bucket(s) ({sum(b.persistent for b in layout.buckets)} persistent); "
                 f"{gathers} gather(s) in forward{', each prefetched one ahead' if layout.prefetch else ''}; "
                 f"this rank holds {layout.shard_numel:,} of "
                 f"{layout.padded:,} elements"),
        changed_graph=True,
        details={"gathers": gathers, "gather_order": order, "prefetch": layout.prefetch,
                 "live_buckets": layout.live_buckets},
    )


def _check_topological(graph: torch.fx.Graph) -> None:
    """Views were inserted right after their gather: check that every input precedes its user."""
    seen = set()
    for node in graph.nodes:
        for inp in node.all_input_nodes:
            if inp not in seen:
                raise InvariantError(f"node {node.name} uses {inp.name} before it is computed")
        seen.add(node)


def check_sharded(gm: torch.fx.GraphModule, ctx: CompileContext) -> None:
    """No whole trainable parameter is read; every gather reads a shard of the right size."""
    layout = ctx.artifacts["zero_layout"]
    sharded = {s.name for b in layout.buckets for s in b.slots}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in sharded:
            raise InvariantError(f"node {node.name} still reads whole parameter {node.target}")
        if node.op == "call_function" and node.target is torch.ops.dsc.all_gather.default:
            b = layout.buckets[node.meta["dsc.gather"]]
            if node.args[0].meta["val"].numel() != b.chunk or node.args[3] != b.index:
                raise InvariantError(f"gather {node.name} reads a shard of the wrong size")
