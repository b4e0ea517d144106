"""Analyses: annotate nodes with shapes on fake tensors, and estimate per-rank bytes.

`annotate_shapes` only writes `node.meta`; it never changes the graph. A graph from torch.export
already carries `meta["val"]` (a FakeTensor) on every node; a symbolic_trace graph does not, so
it is propagated with FakeTensorProp (no real memory is allocated either way).

Writes node.meta: `val` (when missing) and `dsc.bytes` (bytes of the node's tensor outputs).
"""

from __future__ import annotations

import torch
import torch.fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.utils._pytree import tree_leaves

from .pass_manager import CompileContext, PassResult


def _bytes(val) -> int:
    return sum(t.numel() * t.element_size() for t in tree_leaves(val) if isinstance(t, torch.Tensor))


def annotate_shapes(gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Make sure every node has a fake `val`, and record its output bytes."""
    missing = [n for n in gm.graph.nodes if n.op in ("placeholder", "call_function") and "val" not in n.meta]
    propagated = False
    if missing and ctx.example_args and not ctx.example_kwargs:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
        FakeTensorProp(gm, mode).propagate(*[mode.from_tensor(a) if torch.is_tensor(a) else a
                                             for a in ctx.example_args])
        propagated = True
    activations = 0
    for node in gm.graph.nodes:
        val = node.meta.get("val")
        if val is None:
            continue
        node.meta["dsc.bytes"] = _bytes(val)
        if node.op == "call_function":
            activations += node.meta["dsc.bytes"]
    ctx.artifacts["activations_bytes"] = activations
    nodes = sum(1 for n in gm.graph.nodes if n.op == "call_function")
    how = "propagated with FakeTensorProp" if propagated else "taken from capture's fake tensors"
    return PassResult(
        summary=f"{nodes} ops; shapes {how}; forward intermediates {activations:,} bytes",
        details={"ops": nodes, "activations_bytes": activations},
    )


def parameter_bytes(gm: torch.fx.GraphModule) -> tuple[int, int, int]:
    """(trainable elements, frozen bytes, buffer bytes) of the captured module, tied weights once."""
    seen, trainable, frozen = set(), 0, 0
    for p in gm.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel() * p.element_size()
    buffers = sum(b.numel() * b.element_size() for b in gm.buffers())
    return trainable, frozen, buffers
