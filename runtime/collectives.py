"""Collectives as torch.library custom ops.

Every byte dsc moves between ranks goes through one of these ops, so a graph (or a trace of the
runtime) shows it, FakeTensor can estimate it, and autograd can differentiate it. Each op is
functional (returns a new tensor) and names its process group by the name torch.distributed
gives it (`ProcessGroup.group_name`), because custom ops take strings, not groups.

| op                    | result shape          | gradient                      |
|-----------------------|-----------------------|-------------------------------|
| dsc::all_reduce       | same as input         | identity (the caller decides) |
| dsc::reduce_scatter   | input.numel() / world | all_gather of the gradient    |
| dsc::all_gather       | input.numel() * world | reduce_scatter (sum)          |

`world == 1` short-circuits to a copy, so a single-process run needs no process group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

# torch 2.13 renamed the single-tensor collectives; keep working on older releases.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

_OPS = {"sum": dist.ReduceOp.SUM, "avg": dist.ReduceOp.AVG, "max": dist.ReduceOp.MAX}


# Mesh dimension names graph passes write instead of process-group names (which only exist at run
# time); the runtime binds them to this rank's groups.
_mesh_groups: dict[str, str] = {}


def bind_mesh_dim(dim: str, group) -> None:
    """Make graph ops that name mesh dimension `dim` (e.g. "dp") use `group`."""
    _mesh_groups[dim] = group.group_name if group is not None else ""


def _group(name: str):
    return _resolve_process_group(_mesh_groups.get(name, name))


@torch.library.custom_op("dsc::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor, group: str, world: int, op: str = "sum") -> torch.Tensor:
    """Reduce `x` over the group; every rank gets the result."""
    out = x.clone()
    if world > 1:
        dist.all_reduce(out, op=_OPS[op], group=_group(group))
    return out


@all_reduce.register_fake
def _(x, group, world, op="sum"):
    return torch.empty_like(x)


@torch.library.custom_op("dsc::reduce_scatter", mutates_args=())
def reduce_scatter(x: torch.Tensor, group: str, world: int) -> torch.Tensor:
    """Sum the flat `x` over the group; rank r keeps the r-th of `world` equal chunks."""
    flat = x.reshape(-1)
    if world == 1:
        return flat.clone()
    out = flat.new_empty(flat.numel() // world)
    _reduce_scatter(out, flat, group=_group(group))
    return out


@reduce_scatter.register_fake
def _(x, group, world):
    return x.new_empty(x.numel() // world)


# Observers of every dsc::all_gather (the ZeRO-3 runtime tracks gathered parameter buffers).
_gather_listeners: list = []


def add_gather_listener(fn) -> None:
    """Call `fn(tag, output)` after every dsc::all_gather in this process."""
    _gather_listeners.append(fn)


def remove_gather_listener(fn) -> None:
    if fn in _gather_listeners:
        _gather_listeners.remove(fn)


@torch.library.custom_op("dsc::all_gather", mutates_args=())
def all_gather(x: torch.Tensor, group: str, world: int, tag: int = -1) -> torch.Tensor:
    """Concatenate the flat `x` of every rank, in rank order. `tag` labels the gather for
    listeners (ZeRO-3 passes the bucket index)."""
    flat = x.reshape(-1)
    if world == 1:
        out = flat.clone()
    else:
        out = flat.new_empty(flat.numel() * world)
        _all_gather(out, flat.contiguous(), group=_group(group))
    for fn in _gather_listeners:
        fn(tag, out)
    return out


@all_gather.register_fake
def _(x, group, world, tag=-1):
    return x.new_empty(x.numel() * world)


def _all_gather_backward(ctx, grad):
    return reduce_scatter(grad, ctx.group, ctx.world), None, None, None


def _all_gather_setup(ctx, inputs, output):
    _, ctx.group, ctx.world, _tag = inputs


def _reduce_scatter_backward(ctx, grad):
    return all_gather(grad, ctx.group, ctx.world).view(ctx.shape), None, None


def _reduce_scatter_setup(ctx, inputs, output):
    x, ctx.group, ctx.world = inputs
    ctx.shape = x.shape


def _all_reduce_backward(ctx, grad):
    return grad, None, None, None


all_gather.register_autograd(_all_gather_backward, setup_context=_all_gather_setup)
reduce_scatter.register_autograd(_reduce_scatter_backward, setup_context=_reduce_scatter_setup)
all_reduce.register_autograd(_all_reduce_backward, setup_context=lambda ctx, inputs, output: None)


# In-place, asynchronous forms for the runtime's gradient buckets. They are not graph ops (they
# mutate and return handles); they exist so the runtime issues collectives in one place.


def all_reduce_(t: torch.Tensor, group, world: int, async_op: bool = False):
    """Sum `t` in place over the group. Returns a work handle when `async_op`."""
    if world == 1:
        return None
    return dist.all_reduce(t, group=group, async_op=async_op)


def reduce_scatter_(out: torch.Tensor, t: torch.Tensor, group, world: int, async_op: bool = False):
    """Sum flat `t` over the group into `out` (this rank's chunk)."""
    if world == 1:
        out.copy_(t)
        return None
    return _reduce_scatter(out, t, group=group, async_op=async_op)


def all_gather_(out: torch.Tensor, t: torch.Tensor, group, world: int, async_op: bool = False):
    """Gather every rank's flat `t` into `out`, in rank order."""
    if world == 1:
        out.copy_(t)
        return None
    return _all_gather(out, t, group=group, async_op=async_op)
