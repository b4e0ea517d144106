"""Checks dsc's collective custom ops on real ranks: values, fake shapes and gradients."""

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode

import dsc
from dsc.runtime import collectives as C

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

# gloo reduce-scatters run as a send/recv ring: each chunk is exactly the sum of the ranks' parts
# (integers: exact in any order), on the world and on a subgroup of the even ranks
before = C.ring_stats["reduce_scatter"]
v = torch.arange(5.0 * world) * (rank + 1)
out = torch.empty(5)
C.reduce_scatter_(out, v, dist.group.WORLD, world)
assert torch.equal(out, torch.arange(5.0 * world)[rank * 5:(rank + 1) * 5] * sum(range(1, world + 1))), out
assert C.ring_stats["reduce_scatter"] == before + (world > 1)
evens = dist.new_group([r for r in range(world) if r % 2 == 0])
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

z = torch.full((3,), float(rank))
assert torch.equal(C.all_reduce(z, g, world), torch.full((3,), float(sum(range(world)))))

with FakeTensorMode() as mode:
    f = torch.empty(8 * world)
    assert C.all_gather(f, g, world).shape == (8 * world * world,)
    assert C.reduce_scatter(f, g, world).shape == (8,)
print(f"rank {rank}: collectives ok", flush=True)
dsc.runtime.mesh.shutdown()
