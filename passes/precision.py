"""Mixed precision: let the graph run under autocast.

Requires: a captured graph. Guarantees: no `aten._assert_tensor_metadata` node that pins a
floating-point dtype remains. torch.export records such assertions next to `.to(dtype)` calls,
with the dtypes seen at capture (fp32); under autocast a matmul yields bf16/fp16 and the assertion
would fail although the program is right. Under a bf16/fp16 plan the runtime runs the graph under
torch.autocast (`dsc.runtime.precision`), which chooses each op's compute dtype as eager autocast
does; under an fp32 plan the caller may do the same (`with torch.autocast(...): compiled(x)`, as
they would around the eager model), so the pass runs for every plan. The assertions only check
dtypes; nothing reads them, and dropping them changes no value.
Reads/writes node.meta: none.
"""

from __future__ import annotations

import torch
import torch.fx

from dsc.pass_manager import CompileContext, PassResult

ASSERT = torch.ops.aten._assert_tensor_metadata.default


def relax_dtype_asserts(gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Remove capture-time dtype assertions on floating-point tensors."""
    removed = 0
    for mod in gm.modules():  # with the subgraphs of higher-order ops (e.g. a no_grad region)
        if not isinstance(mod, torch.fx.GraphModule):
            continue
        before = removed
        for node in list(mod.graph.nodes):
            if node.op == "call_function" and node.target is ASSERT and not node.users:
                dtype = node.kwargs.get("dtype")
                if dtype is None or dtype.is_floating_point:
                    mod.graph.erase_node(node)
                    removed += 1
        if removed > before and mod is not gm:
            mod.recompile()
    why = f"{ctx.plan.precision.dtype} autocast" if ctx.plan.precision.dtype != "fp32" else \
        "a caller's torch.autocast may change dtypes"
    return PassResult(summary=f"removed {removed} capture-time dtype assertion(s) ({why})",
                      changed_graph=removed > 0, details={"removed": removed})
