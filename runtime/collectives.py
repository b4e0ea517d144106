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
| dsc::copy_to_tp       | same as input (copy)  | all_reduce of the gradient    |
| dsc::tp_all_reduce    | same as input (sum)   | identity                      |
| dsc::all_gather_dim   | concatenated on `dim` | this rank's slice             |
| dsc::vocab_parallel_cross_entropy | per-row loss | softmax - one-hot, local   |

`world == 1` short-circuits to a copy, so a single-process run needs no process group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _resolve_process_group

from dsc.runtime import shm

# torch 2.13 renamed the single-tensor collectives; keep working on older releases.
_native_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_native_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# Point-to-point collectives run in this process (tests read it).
p2p_stats = {"reduce_scatter": 0, "all_gather": 0}

# Up to this many ranks, gloo collectives are exchanged directly between every pair of ranks; beyond
# it, a ring (reduce-scatter) or gloo's own (all-gather) keeps the number of open messages bounded.
DIRECT_MAX_WORLD = 8
_TAG_GATHER, _TAG_REDUCE = 0x75C1, 0x75C2  # separate message streams: a prefetched gather may be in flight


class _Exchange:
    """The work handle of a point-to-point collective: wait() waits for every send and receive,
    then runs `then` (the reduce-scatter's sums) once."""

    def __init__(self, works, then=None):
        self._works, self._then = works, then

    def wait(self, timeout=None) -> bool:
        for w in self._works:
            w.wait()
        self._works = []
        if self._then is not None:
            then, self._then = self._then, None
            then()
        return True


def _p2p(group) -> bool:
    return dist.get_backend(group) == "gloo" and dist.get_world_size(group) <= DIRECT_MAX_WORLD


def _direct_all_gather(out: torch.Tensor, t: torch.Tensor, group) -> _Exchange:
    """Gather by sending this rank's `t` to every other rank and receiving theirs straight into
    `out`: every transfer is in flight at once and nothing is copied but this rank's own part.
    Gloo's all_gather_into_tensor gathers into a staging list and copies (on 2 CPU ranks, 8 MB:
    2.8 ms this way against 4.7 ms; 4 ranks 5.5 against 8.7 ms)."""
    w, r = dist.get_world_size(group), dist.get_rank(group)
    parts = out.reshape(-1).chunk(w)
    works = []
    for s in range(1, w):  # rank r sends to r+s while it receives from r-s: no pair waits on another
        works.append(dist.irecv(parts[(r - s) % w], dist.get_global_rank(group, (r - s) % w), group=group,
                                tag=_TAG_GATHER))
        works.append(dist.isend(t, dist.get_global_rank(group, (r + s) % w), group=group, tag=_TAG_GATHER))
    parts[r].copy_(t.reshape(-1))
    p2p_stats["all_gather"] += 1
    return _Exchange(works)


def _direct_reduce_scatter(out: torch.Tensor, t: torch.Tensor, group) -> _Exchange:
    """Reduce-scatter by sending chunk j of `t` to rank j and summing what the others send, in rank
    order 0..w-1 on every rank (a fixed order: runs repeat exactly). Gloo's reduce_scatter is an
    all-reduce followed by a copy, twice the bytes: on 2 CPU ranks, 8 MB takes 3.7-4.1 ms this way
    against 9.5 ms (4 ranks: 6.4 against 17 ms). Holds w-1 received chunks at once."""
    w, r = dist.get_world_size(group), dist.get_rank(group)
    chunks = t.reshape(-1).chunk(w)
    bufs = {j: torch.empty_like(out) for j in range(w) if j != r}
    works = []
    for s in range(1, w):
        j = (r - s) % w
        works.append(dist.irecv(bufs[j], dist.get_global_rank(group, j), group=group, tag=_TAG_REDUCE))
        works.append(dist.isend(chunks[(r + s) % w], dist.get_global_rank(group, (r + s) % w), group=group,
                                tag=_TAG_REDUCE))

    def add():  # runs in wait(): `t` and the buffers stay referenced until then
        parts = [chunks[r] if j == r else bufs[j] for j in range(w)]
        torch.add(parts[0], parts[1], out=out)
        for part in parts[2:]:
            out.add_(part)

    p2p_stats["reduce_scatter"] += 1
    return _Exchange(works, add)


def _ring_reduce_scatter(out: torch.Tensor, t: torch.Tensor, group) -> None:
    """Sum the flat `t` over `group`; this rank keeps chunk `rank` in `out`. A ring of send/recv
    for worlds too large to exchange directly: at step s rank r passes its running sum of chunk
    r-s-1 to rank r+1 and adds its own part of chunk r-s-2 to what rank r-1 passed, so every rank
    sends (w-1)/w of the tensor once and holds two chunks. The sums run in ring order from rank
    r+1 round to rank r: fixed, so runs repeat exactly."""
    w, r = dist.get_world_size(group), dist.get_rank(group)
    chunks = t.reshape(-1).chunk(w)
    nxt, prv = dist.get_global_rank(group, (r + 1) % w), dist.get_global_rank(group, (r - 1) % w)
    acc, buf = chunks[(r - 1) % w].clone(), torch.empty_like(out)
    for s in range(w - 1):
        req = dist.isend(acc, nxt, group=group, tag=_TAG_REDUCE)
        dist.recv(buf, prv, group=group, tag=_TAG_REDUCE)
        req.wait()
        torch.add(buf, chunks[(r - s - 2) % w], out=out if s == w - 2 else acc)
    p2p_stats["reduce_scatter"] += 1


def _handle(work: _Exchange, async_op: bool) -> _Exchange | None:
    """The handle for a caller that waits later; otherwise wait now and return None."""
    if async_op:
        return work
    work.wait()
    return None


def shared_memory(group=None):
    """The group's shared memory (`dsc.runtime.shm`) when its gloo ranks share a host, else None.
    The first call for a group is a collective of that group."""
    group = group if group is not None else dist.group.WORLD
    if dist.get_backend(group) != "gloo" or dist.get_world_size(group) == 1:
        return None
    return shm.for_group(group)


def _reduce_scatter(out: torch.Tensor, t: torch.Tensor, group=None, async_op: bool = False):
    """reduce_scatter_tensor. On gloo: through shared memory when the ranks share a host
    (`dsc.runtime.shm`; done when it returns, even if `async_op`), else by point-to-point messages
    (`_direct_reduce_scatter`, or `_ring_reduce_scatter` for large worlds when the caller waits).
    NCCL's own is already a ring."""
    group = group if group is not None else dist.group.WORLD
    w = dist.get_world_size(group)
    if dist.get_backend(group) != "gloo" or t.numel() != out.numel() * w:
        return _native_reduce_scatter(out, t, group=group, async_op=async_op)
    shared = shared_memory(group)
    if shared is not None and shared.reduce_scatter(out, t):
        return None
    if w > DIRECT_MAX_WORLD:  # the ring, when the caller waits; gloo's own otherwise
        if async_op:
            return _native_reduce_scatter(out, t, group=group, async_op=True)
        _ring_reduce_scatter(out, t, group)
        return None
    return _handle(_direct_reduce_scatter(out, t, group), async_op)


def _all_gather(out: torch.Tensor, t: torch.Tensor, group=None, async_op: bool = False):
    """all_gather_into_tensor. On gloo ranks that share a host (`dsc.runtime.shm`): a copy from the
    peers' shared memory when `t` lies in a shared region (ZeRO-3's shards), or, when the caller
    waits, through shared staging; both are done when this returns. Otherwise direct
    point-to-point messages (`_direct_all_gather`), asynchronous or not."""
    group = group if group is not None else dist.group.WORLD
    if not _p2p(group) or out.numel() != t.numel() * dist.get_world_size(group):
        return _native_all_gather(out, t, group=group, async_op=async_op)
    shared = shared_memory(group)
    if shared is not None and (shared.gather(out, t) or not async_op and shared.gather_staged(out, t)):
        return None
    return _handle(_direct_all_gather(out, t, group), async_op)


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
        shared = shared_memory(_group(group)) if op == "sum" else None
        if shared is None or not shared.all_reduce(out):
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


# Gathers started ahead of use (ZeRO-3 prefetch): (group, tag) -> (work, output, input kept alive).
_prefetched: dict[tuple[str, int], tuple] = {}
prefetch_stats = {"started": 0, "used": 0, "dropped": 0}  # in this process (tests read it)


def prefetch_all_gather(x: torch.Tensor, group: str, world: int, tag: int) -> torch.Tensor | None:
    """Start, asynchronously, the gather that `all_gather(x, group, world, tag)` will ask for; that
    call then waits for it instead of gathering. Returns the output buffer (None if nothing was
    started: one rank, or already in flight). Every rank must start the same gathers in the same
    order, like any collective; `drop_prefetched` ends the ones never used."""
    key = (group, tag)
    if world == 1 or key in _prefetched:
        return None
    flat = x.reshape(-1).contiguous()
    shared = shared_memory(_group(group))
    if shared is not None and shared.locate(flat) is not None:
        return None  # a copy from shared memory when the gather runs: nothing to start early
    out = flat.new_empty(flat.numel() * world)
    _prefetched[key] = (_all_gather(out, flat, group=_group(group), async_op=True), out, flat)
    prefetch_stats["started"] += 1
    return out


def drop_prefetched() -> int:
    """Wait for and forget gathers started but not used (the data may be stale: call before the
    parameters change). Returns how many there were."""
    n = len(_prefetched)
    for work, _, _ in _prefetched.values():
        work.wait()
    _prefetched.clear()
    prefetch_stats["dropped"] += n
    return n


@torch.library.custom_op("dsc::all_gather", mutates_args=())
def all_gather(x: torch.Tensor, group: str, world: int, tag: int = -1) -> torch.Tensor:
    """Concatenate the flat `x` of every rank, in rank order. `tag` labels the gather for
    listeners (ZeRO-3 passes the bucket index); a gather prefetched under the same tag is
    waited for instead of issued again."""
    flat = x.reshape(-1)
    pending = _prefetched.pop((group, tag), None) if tag >= 0 else None
    if pending is not None:
        pending[0].wait()
        out = pending[1]
        prefetch_stats["used"] += 1
    elif world == 1:
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
    """Sum `t` in place over the group. Returns a work handle when `async_op`; None when done (always
    through shared memory, `dsc.runtime.shm`, on gloo ranks that share a host)."""
    if world == 1:
        return None
    shared = shared_memory(group)
    if shared is not None and shared.all_reduce(t):
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


# -- tensor parallelism -----------------------------------------------------------------------------
# Megatron's pair of conjugate operators, plus the gather of a sharded output and the parallel
# cross-entropy. Column-parallel linears read their input through `copy_to_tp` (identity forward,
# all-reduce of the gradient backward); row-parallel linears end in `dsc::all_reduce` (sum forward,
# identity backward). Together they make every rank's gradient of a replicated tensor complete.

# Payload bytes each tensor-parallel op moved in this process, by op (tests compare with the report).
traffic: dict[str, int] = {}


def _count(op: str, t: torch.Tensor, world: int) -> None:
    if world > 1:
        traffic[op] = traffic.get(op, 0) + t.numel() * t.element_size()


@torch.library.custom_op("dsc::copy_to_tp", mutates_args=())
def copy_to_tp(x: torch.Tensor, group: str, world: int) -> torch.Tensor:
    """Identity forward; the gradient is summed over the group (input of column-parallel layers)."""
    return x.clone()


@copy_to_tp.register_fake
def _(x, group, world):
    return torch.empty_like(x)


def _copy_to_tp_backward(ctx, grad):
    _count("copy_to_tp.backward", grad, ctx.world)
    return all_reduce(grad, ctx.group, ctx.world), None, None


def _copy_to_tp_setup(ctx, inputs, output):
    _, ctx.group, ctx.world = inputs


copy_to_tp.register_autograd(_copy_to_tp_backward, setup_context=_copy_to_tp_setup)


@torch.library.custom_op("dsc::tp_all_reduce", mutates_args=())
def tp_all_reduce(x: torch.Tensor, group: str, world: int) -> torch.Tensor:
    """Sum forward, identity backward: the partial outputs of a row-parallel layer (or a
    vocab-parallel embedding) become the replicated result."""
    _count("tp_all_reduce", x, world)
    return all_reduce(x, group, world)


@tp_all_reduce.register_fake
def _(x, group, world):
    return torch.empty_like(x)


tp_all_reduce.register_autograd(lambda ctx, grad: (grad, None, None),
                                setup_context=lambda ctx, inputs, output: None)


@torch.library.custom_op("dsc::all_gather_dim", mutates_args=())
def all_gather_dim(x: torch.Tensor, dim: int, group: str, world: int) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` (rank order). Backward keeps this rank's slice of
    the gradient: the consumer of the whole tensor is replicated, so every rank has all of it."""
    if world == 1:
        return x.clone()
    _count("all_gather_dim", x, world)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=_group(group))
    return torch.cat(parts, dim)


@all_gather_dim.register_fake
def _(x, dim, group, world):
    shape = list(x.shape)
    shape[dim] *= world
    return x.new_empty(shape)


def _all_gather_dim_backward(ctx, grad):
    rank = dist.get_rank(_group(ctx.group)) if ctx.world > 1 else 0
    return grad.chunk(ctx.world, ctx.dim)[rank].contiguous(), None, None, None


def _all_gather_dim_setup(ctx, inputs, output):
    _, ctx.dim, ctx.group, ctx.world = inputs


all_gather_dim.register_autograd(_all_gather_dim_backward, setup_context=_all_gather_dim_setup)


@torch.library.custom_op("dsc::vocab_parallel_cross_entropy", mutates_args=())
def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int, vocab_size: int,
                                 ignore_index: int, group: str, world: int) -> torch.Tensor:
    """Per-row cross-entropy of logits whose class dimension (dim 1 of [N, V/world]) is sharded:
    this rank holds classes [vocab_start, vocab_start + V/world); classes >= `vocab_size` are
    padding and take no part. Three all-reduces of N numbers (max, sum of exponentials, target
    logit) replace gathering N x V logits. Ignored rows get 0."""
    x = _mask_padding(logits.float(), vocab_start, vocab_size)
    local_v = x.shape[1]
    with torch.no_grad():
        top = x.max(dim=1).values
        if world > 1:
            _count("vocab_parallel_cross_entropy", top, world)
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=_group(group))
    shifted = x - top[:, None]
    exp = shifted.exp()
    sums = exp.sum(dim=1)
    local = target - vocab_start
    mine = (local >= 0) & (local < local_v)
    picked = shifted.gather(1, local.clamp(0, local_v - 1)[:, None])[:, 0] * mine
    if world > 1:
        both = torch.stack([sums, picked])
        _count("vocab_parallel_cross_entropy", both, world)
        dist.all_reduce(both, group=_group(group))
        sums, picked = both[0], both[1]
    return (sums.log() - picked) * (target != ignore_index)


def _mask_padding(x: torch.Tensor, vocab_start: int, vocab_size: int) -> torch.Tensor:
    real = vocab_size - vocab_start
    if real < x.shape[1]:
        x = x.clone()
        x[:, max(real, 0):] = float("-inf")
    return x


@vocab_parallel_cross_entropy.register_fake
def _(logits, target, vocab_start, vocab_size, ignore_index, group, world):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


def _vocab_ce_setup(ctx, inputs, output):
    ctx.inputs = inputs
    ctx.dtype = inputs[0].dtype


def _vocab_ce_backward(ctx, grad):
    logits, target, start, vocab_size, ignore, group, world = ctx.inputs
    with torch.no_grad():  # recompute softmax (cheaper in memory than saving N x V/world floats)
        x = _mask_padding(logits.float(), start, vocab_size)
        top = x.max(dim=1).values
        if world > 1:
            _count("vocab_parallel_cross_entropy.backward", top, world)
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=_group(group))
        exp = (x - top[:, None]).exp()
        sums = exp.sum(dim=1)
        if world > 1:
            _count("vocab_parallel_cross_entropy.backward", sums, world)
            dist.all_reduce(sums, group=_group(group))
        local = target - start
        mine = (local >= 0) & (local < x.shape[1])
        g = exp / sums[:, None]
        rows = torch.nonzero(mine)[:, 0]
        g[rows, local[rows]] -= 1.0
        g *= ((target != ignore) * grad)[:, None]
    return g.to(ctx.dtype), None, None, None, None, None, None


vocab_parallel_cross_entropy.register_autograd(_vocab_ce_backward, setup_context=_vocab_ce_setup)
