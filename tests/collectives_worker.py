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

z = torch.full((3,), float(rank))
assert torch.equal(C.all_reduce(z, g, world), torch.full((3,), float(sum(range(world)))))

with FakeTensorMode() as mode:
    f = torch.empty(8 * world)
    assert C.all_gather(f, g, world).shape == (8 * world * world,)
    assert C.reduce_scatter(f, g, world).shape == (8,)
print(f"rank {rank}: collectives ok", flush=True)
dsc.runtime.mesh.shutdown()
