"""Checks dsc's collective custom ops on real ranks: values, fake shapes and gradients."""

import os

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

import dsc
from dsc.runtime import collectives as C
from dsc.runtime import shm

dsc.runtime.mesh.init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()
g = dist.group.WORLD.group_name

x = (torch.arange(6.0) + 10 * rank).requires_grad_()  # rank r holds [10r, 10r+1, ...]
gathered = C.all_gather(x, g, world)
expected = torch.cat([torch.arange(6.0) + 10 * r for r in range(world)])
assert torch.equal(gathered, expected), gathered
# d/dx of sum(w * all_gather(x)) is the reduce-scatter (sum over ranks) of w's chunk for this rank
w = torch.arange(6.0 * world)
(gathered * w).sum().backward()
assert torch.equal(x.grad, world * w[rank * 6:(rank + 1) * 6]), x.grad

y = torch.full((4 * world,), float(rank + 1), requires_grad=True)
rs = C.reduce_scatter(y, g, world)
assert torch.equal(rs, torch.full((4,), float(sum(range(1, world + 1))))), rs
rs.sum().backward()
assert torch.equal(y.grad, torch.ones(4 * world)), y.grad  # all_gather of ones


def reduce_scatter_and_gather(stats: dict) -> None:
    """Each chunk is exactly the sum of the ranks' parts (integers: exact in any order), on the world
    and on a subgroup of the even ranks; `stats` counts the reduce-scatters of the transport tested."""
    before = stats["reduce_scatter"]
    v = torch.arange(5.0 * world) * (rank + 1)
    out = torch.empty(5)
    C.reduce_scatter_(out, v, dist.group.WORLD, world)
    assert torch.equal(out, torch.arange(5.0 * world)[rank * 5:(rank + 1) * 5] * sum(range(1, world + 1))), out
    assert stats["reduce_scatter"] == before + (world > 1)
    if rank % 2 == 0 and world > 2:
        k = world // 2
        sub = torch.empty(3)
        C.reduce_scatter_(sub, torch.arange(3.0 * k) + rank, evens, k)
        j = rank // 2
        assert torch.equal(sub, (torch.arange(3.0 * k)[j * 3:(j + 1) * 3]) * k + sum(range(0, world, 2))), sub
    big = torch.randn(1000 * world, generator=torch.Generator().manual_seed(rank))
    ring = torch.empty(1000)
    C.reduce_scatter_(ring, big, dist.group.WORLD, world)
    ref = big.clone()
    dist.all_reduce(ref)
    torch.testing.assert_close(ring, ref[rank * 1000:(rank + 1) * 1000], rtol=1e-6, atol=1e-6)

    # gathers of private tensors: staged in shared memory when the caller waits, else point-to-point
    # messages (asynchronous: ZeRO-3 prefetch, ZeRO-1/2 after the step)
    before_gather, staged = C.p2p_stats["all_gather"], shm.stats["gather_staged"]
    full = torch.empty(7 * world)
    C.all_gather_(full, torch.arange(7.0) + 100 * rank, dist.group.WORLD, world)
    assert torch.equal(full, torch.cat([torch.arange(7.0) + 100 * r for r in range(world)])), full
    work = C.all_gather_(full2 := torch.empty(7 * world), torch.full((7,), float(rank)), dist.group.WORLD, world,
                         async_op=True)
    if work is not None:
        work.wait()
    assert torch.equal(full2, torch.arange(float(world)).repeat_interleave(7)), full2
    via_shm = stats is shm.stats and world > 1
    assert C.p2p_stats["all_gather"] == before_gather + (world > 1) * (1 if via_shm else 2)
    assert shm.stats["gather_staged"] == staged + via_shm
    if rank % 2 == 0 and world > 2:
        k = world // 2
        sub = torch.empty(2 * k)
        C.all_gather_(sub, torch.full((2,), float(rank)), evens, k)
        assert torch.equal(sub, torch.arange(0.0, world, 2).repeat_interleave(2)), sub
    # asynchronous reduce-scatter (ZeRO-1/2 overlap_comm): the sums happen in wait()
    out = torch.empty(5)
    work = C.reduce_scatter_(out, torch.arange(5.0 * world) * (rank + 1), dist.group.WORLD, world, async_op=True)
    if work is not None:
        work.wait()
    assert torch.equal(out, torch.arange(5.0 * world)[rank * 5:(rank + 1) * 5] * sum(range(1, world + 1))), out
    # all-reduce, in place: integers (exact in any order), sizes that do not split evenly (fewer
    # elements than ranks too), and the custom op; every rank gets the same result
    reduced = stats.get("all_reduce", 0)
    for n in (1, 3, 1001):
        v = torch.arange(float(n)) * (rank + 1)
        C.all_reduce_(v, dist.group.WORLD, world)
        assert torch.equal(v, torch.arange(float(n)) * sum(range(1, world + 1))), (n, v)
    assert torch.equal(C.all_reduce(torch.full((5,), rank + 1.0), g, world), torch.full((5,), float(sum(range(1, world + 1)))))
    if "all_reduce" in stats:
        assert stats["all_reduce"] == reduced + 4 * (world > 1)
    # beyond DIRECT_MAX_WORLD ranks, the reduce-scatter is a ring: same sums
    saved, C.DIRECT_MAX_WORLD = C.DIRECT_MAX_WORLD, 1
    C.reduce_scatter_(out, torch.arange(5.0 * world) * (rank + 1), dist.group.WORLD, world)
    C.DIRECT_MAX_WORLD = saved
    assert torch.equal(out, torch.arange(5.0 * world)[rank * 5:(rank + 1) * 5] * sum(range(1, world + 1))), out


evens = dist.new_group([r for r in range(world) if r % 2 == 0])
# gloo ranks on one host reduce-scatter through shared memory (dsc.runtime.shm) ...
reduce_scatter_and_gather(shm.stats)
staging, shm.STAGING_BYTES = shm.STAGING_BYTES, 64  # ... in many slices when tensors outgrow the staging
reduce_scatter_and_gather(shm.stats)
shm.STAGING_BYTES = staging
if world > 1:  # ... and gather by copying when the source lies in a shared region (ZeRO-3's shards)
    shared = C.shared_memory()
    src = shared.share(torch.arange(6.0) + 10 * rank)
    n = shm.stats["gather"]
    got = torch.empty(3 * world)
    C.all_gather_(got, src[2:5], dist.group.WORLD, world)  # a piece of the region, at the same offset everywhere
    assert torch.equal(got, torch.cat([torch.arange(2.0, 5.0) + 10 * r for r in range(world)])), got
    assert shm.stats["gather"] == n + 1
    assert C.prefetch_all_gather(src[2:5], g, world, tag=7) is None  # a copy later: nothing to start early
    # ZeRO-1/2's flat buffer: rank j owns piece j of the same range of every rank's region
    flat = shared.share(torch.full((4 * world,), float(rank)))
    flat[rank * 4:(rank + 1) * 4] += 10  # "the step" updates this rank's piece
    shared.fence()
    shared.gather_in_place(flat)
    shared.fence()
    assert torch.equal(flat, (torch.arange(float(world)) + 10).repeat_interleave(4)), flat
# ... and by point-to-point messages where shared memory is off (DSC_SHM=0) or impossible
os.environ["DSC_SHM"] = "0"
shm.reset()
reduce_scatter_and_gather(C.p2p_stats)
del os.environ["DSC_SHM"]

z = torch.full((3,), float(rank))
assert torch.equal(C.all_reduce(z, g, world), torch.full((3,), float(sum(range(world)))))

with FakeTensorMode() as mode:
    f = torch.empty(8 * world)
    assert C.all_gather(f, g, world).shape == (8 * world * world,)
    assert C.reduce_scatter(f, g, world).shape == (8,)
print(f"rank {rank}: collectives ok", flush=True)
dsc.runtime.mesh.shutdown()
