"""Shared memory between the ranks of a gloo group that run on one host.

Gloo moves every byte through TCP sockets, even between processes on one machine: the sender's
kernel copies the data in, the receiver's copies it out, and both sides pay system calls and
thread hand-offs. For ranks on one host, dsc instead maps the same pages into every rank
(files in /dev/shm, unlinked as soon as all ranks have mapped them, so nothing outlives the job):

- `SharedGroup.share(t)` moves a tensor into a region every rank of the group can read. ZeRO-3
  keeps its parameter shards there, and a gather becomes a memcpy from each peer's region
  (`gather`): no message at all. The owner of a region must fence (`fence()`, a barrier of the
  group) between writing it and peers reading it, in both directions: ZeRO-3 fences when a step
  begins (no peer still reads the old shards) and when a forward begins (every peer's new shards
  are written).
- Staging holds at most STAGING_BYTES (32 MiB) per buffer; larger tensors go a slice at a time,
  so staging costs each rank at most 64 MiB of /dev/shm, however large the buckets.
- `gather_staged` gathers a tensor that is not in a region (ZeRO-3's low-precision casts of its
  shards) the same way: stage, barrier, copy.
- `all_reduce` stages the whole tensor, sums this rank's piece of every rank's staging, and after a
  second barrier copies the other ranks' summed pieces.
- ZeRO-1/2 keep their flat parameter buffer in a region too: after a step each rank copies the
  chunks the others updated from their buffers (`gather_in_place`).
- `reduce_scatter` stages the chunks the other ranks sum in this rank's part of a double-buffered
  staging region, waits for the group at a barrier, and sums its own chunk from every rank's
  staging in rank order 0..w-1 (every rank sums in the same order: runs repeat exactly). Staged
  calls alternate between two buffers, so the barrier of one call also proves that every rank
  finished reading the buffer the call after next overwrites.

Measured on the 2-core CPU machine, 2 ranks, 8 MB: gather from a region 0.7-1.9 ms, staged
2.6 ms (gloo point-to-point 2.8-3.0 ms, gloo all_gather_into_tensor 4.7-6.7 ms); 4 MB of bf16
staged 0.9 ms (point-to-point 1.9 ms); reduce-scatter 4.1-4.3 ms (point-to-point 3.7-10 ms,
gloo's 9.5 ms). Both ranks copy at once: the machine's memory bandwidth is the limit.

It is used when every rank of the group has the same host name and boot id, the group is gloo,
/dev/shm has room, and `DSC_SHM` is not "0"; otherwise `for_group` returns None and the
collectives use gloo.

Memory: a rank's shared region replaces the private tensor it came from, so a rank holds what it
held before. Pages of the peers' regions that a rank reads count in that rank's RSS too (as
shared pages): RSS sums over ranks count them more than once.
"""

from __future__ import annotations

import errno
import os
import socket
import uuid
from pathlib import Path

import torch
import torch.distributed as dist

SHM_DIR = Path("/dev/shm")
STAGING_BYTES = 32 << 20  # the largest staging buffer; larger tensors are staged a slice at a time
_groups: dict[tuple, "SharedGroup | None"] = {}  # (group name, id) -> its shared memory (None: not possible)
stats = {"gather": 0, "gather_staged": 0, "reduce_scatter": 0, "all_reduce": 0, "fence": 0}  # in this process (tests read it)


def enabled() -> bool:
    """False when `DSC_SHM` says off (0, false, no, off; any case)."""
    return os.environ.get("DSC_SHM", "1").strip().lower() not in ("0", "false", "no", "off")


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def for_group(group) -> "SharedGroup | None":
    """This process group's shared memory, or None where ranks cannot share it. The first call
    for a group is a collective of that group: every rank of it must make it (dsc makes it when
    an engine starts, and from collectives every rank runs)."""
    name = (group.group_name, id(group))  # a group destroyed and created again under the same name is new
    if name in _groups:
        return _groups[name]
    shared = None
    if enabled() and dist.get_backend(group) == "gloo" and dist.get_world_size(group) > 1:
        me = (socket.gethostname(), _boot_id(), SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK), uuid.uuid4().hex[:16])
        every = [None] * dist.get_world_size(group)
        dist.all_gather_object(every, me, group=group)
        if all(e[:2] == me[:2] and e[2] for e in every):
            shared = SharedGroup(group, every[0][3])
    _groups[name] = shared
    return shared


def reset() -> None:
    """Forget every group's shared memory (the process group is being destroyed)."""
    _groups.clear()


def _all(group, ok: bool) -> bool:
    flag = torch.tensor([0 if ok else 1], dtype=torch.int32)
    dist.all_reduce(flag, group=group)
    return int(flag) == 0


class SharedGroup:
    """Regions of shared memory over one group of same-host ranks (see the module docstring)."""

    def __init__(self, group, token: str):
        self.group, self.token = group, token
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self._serial = 0
        self._regions: list[tuple[int, int, list[torch.Tensor]]] = []  # (start ptr, nbytes, views of every rank)
        self._staging: list[list[torch.Tensor]] = []  # 2 x [every rank's staging buffer (bytes)]
        self._turn = 0
        self._no_staging = False

    # -- regions ------------------------------------------------------------------------------------
    def _map(self, nbytes: int) -> list[torch.Tensor] | None:
        """A new region of `nbytes` per rank: every rank's, mapped into this process (a collective).
        None (on every rank) when some rank could not reserve the bytes in /dev/shm."""
        self._serial += 1
        path = lambda r: SHM_DIR / f"dsc-{self.token}-{self._serial}-{r}"  # noqa: E731
        mine = path(self.rank)
        ok = True
        try:
            fd = os.open(mine, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
            try:
                os.posix_fallocate(fd, 0, max(nbytes, 1))  # reserve now: tmpfs would SIGBUS on a full disk later
            finally:
                os.close(fd)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.ENOMEM, errno.EACCES, errno.EEXIST, errno.EROFS):
                raise
            ok = False
        if not _all(self.group, ok):
            mine.unlink(missing_ok=True)
            return None
        try:
            views = [torch.from_file(str(path(r)), shared=True, size=max(nbytes, 1), dtype=torch.uint8)[:nbytes]
                     for r in range(self.world)]
        finally:
            dist.barrier(group=self.group)  # every rank has mapped every file: the names can go
            mine.unlink(missing_ok=True)
        return views

    def share(self, t: torch.Tensor) -> torch.Tensor | None:
        """A copy of the contiguous CPU tensor `t` in this rank's part of a new region, visible to
        every rank when this returns; None when /dev/shm has no room on some rank. A collective:
        every rank shares a tensor of the same size, in the same order."""
        nbytes = t.numel() * t.element_size()
        views = self._map(nbytes)
        if views is None:
            return None
        out = views[self.rank].view(t.dtype).view(t.shape)
        out.copy_(t)
        self._regions.append((views[self.rank].data_ptr(), nbytes, views))
        self.fence()  # every rank's copy is in place
        return out

    def locate(self, x: torch.Tensor) -> tuple[int, int] | None:
        """(region, byte offset) of the contiguous `x` inside this rank's part of a region."""
        if x.device.type != "cpu" or not x.is_contiguous():
            return None
        ptr, n = x.data_ptr(), x.numel() * x.element_size()
        for i, (start, nbytes, _) in enumerate(self._regions):
            if start <= ptr and ptr + n <= start + nbytes:
                return i, ptr - start
        return None

    def fence(self) -> None:
        """A barrier of the group: writes to shared regions before it are seen by reads after it."""
        stats["fence"] += 1
        dist.barrier(group=self.group)

    # -- collectives --------------------------------------------------------------------------------
    def gather(self, out: torch.Tensor, x: torch.Tensor) -> bool:
        """Concatenate every rank's part of `x` (which lies in a region, at the same offset on every
        rank) into `out`, in rank order, by copying. False (nothing done) when `x` is not shared.
        No messages: the caller's fences keep the regions stable."""
        where = self.locate(x)
        if where is None or out.numel() != x.numel() * self.world or out.dtype != x.dtype:
            return False
        region, offset = where
        nbytes = x.numel() * x.element_size()
        views = self._regions[region][2]
        parts = out.reshape(-1).chunk(self.world)
        for r in range(self.world):
            src = x.reshape(-1) if r == self.rank else views[r][offset: offset + nbytes].view(x.dtype)
            parts[r].copy_(src)
        stats["gather"] += 1
        return True

    def gather_in_place(self, x: torch.Tensor) -> None:
        """`x` is the same range of every rank's region, and rank j owns the j-th of `world` equal
        pieces of it (ZeRO-1/2's flat buffer after a step): copy every other rank's piece from its
        region into this rank's `x`. No messages: the caller fences before and after."""
        region, offset = self.locate(x)
        views = self._regions[region][2]
        n = x.numel() // self.world
        nbytes = n * x.element_size()
        flat = x.reshape(-1)
        for r in range(self.world):
            if r != self.rank:
                lo = offset + r * nbytes
                flat[r * n:(r + 1) * n].copy_(views[r][lo: lo + nbytes].view(x.dtype))
        stats["gather"] += 1

    def all_reduce(self, t: torch.Tensor) -> bool:
        """Sum the contiguous CPU tensor `t` over the group, in place, one slice of at most
        STAGING_BYTES at a time: every rank stages the slice, sums its own piece of every rank's
        staging in rank order (a reduce-scatter), and after a second barrier copies the others'
        summed pieces (an all-gather). Each rank reads about 2x `t`, whatever the world size.
        False (on every rank) where staging is impossible."""
        if t.device.type != "cpu" or not t.is_contiguous():
            return False
        flat = t.reshape(-1)
        for a, b in self._slices(flat.numel(), t.element_size()):
            staged = self._take_staging(b - a, t.dtype)
            if staged is None:
                return False  # only before the first slice: staging fails at its first growth
            part = flat[a:b]
            staged[self.rank].copy_(part)
            self.fence()
            pieces = [x.tensor_split(self.world) for x in staged]
            mine = part.tensor_split(self.world)[self.rank]
            own = [p[self.rank] for p in pieces]
            torch.add(own[0], own[1], out=mine)
            for p in own[2:]:
                mine.add_(p)
            pieces[self.rank][self.rank].copy_(mine)  # others read only their own pieces of this buffer so far
            self.fence()
            for r, piece in enumerate(part.tensor_split(self.world)):
                if r != self.rank:
                    piece.copy_(pieces[r][r])
        stats["all_reduce"] += 1
        return True

    def gather_staged(self, out: torch.Tensor, x: torch.Tensor) -> bool:
        """Gather a private tensor (not in a region: ZeRO-3's bf16/fp16 casts of its shards) by
        staging it, meeting the group at a barrier and copying every rank's staged part into
        `out`, a slice at a time. A collective; False (on every rank) where staging is impossible."""
        if x.device.type != "cpu" or out.dtype != x.dtype or out.numel() != x.numel() * self.world:
            return False
        flat = x.reshape(-1)
        parts = out.reshape(-1).chunk(self.world)
        for a, b in self._slices(flat.numel(), x.element_size()):
            staged = self._take_staging(b - a, x.dtype)
            if staged is None:
                return False
            staged[self.rank].copy_(flat[a:b])
            self.fence()
            for r in range(self.world):
                parts[r][a:b].copy_(flat[a:b] if r == self.rank else staged[r])
        stats["gather_staged"] += 1
        return True

    def reduce_scatter(self, out: torch.Tensor, t: torch.Tensor) -> bool:
        """Sum the flat `t` over the group; this rank keeps chunk `rank` in `out`. Each rank stages
        the pieces of the other ranks' chunks (a slice of every chunk at a time), meets the group
        at a barrier, and sums its own chunk's pieces in rank order. False when staging is
        impossible (no room in /dev/shm; the same answer on every rank)."""
        if t.device.type != "cpu" or out.dtype != t.dtype or t.numel() != out.numel() * self.world:
            return False
        chunks = t.reshape(-1).chunk(self.world)
        flat = out.reshape(-1)
        for a, b in self._slices(flat.numel(), t.element_size() * self.world):
            staged = self._take_staging((b - a) * self.world, t.dtype)
            if staged is None:
                return False
            mine = staged[self.rank].chunk(self.world)
            for r in range(self.world):  # the pieces the others sum (this rank's own is read from `t`)
                if r != self.rank:
                    mine[r].copy_(chunks[r][a:b])
            self.fence()
            parts = [chunks[r][a:b] if r == self.rank else staged[r].chunk(self.world)[self.rank]
                     for r in range(self.world)]
            torch.add(parts[0], parts[1], out=flat[a:b])
            for p in parts[2:]:
                flat[a:b].add_(p)
        stats["reduce_scatter"] += 1
        return True

    @staticmethod
    def _slices(numel: int, unit_bytes: int) -> list[tuple[int, int]]:
        """[a, b) ranges covering `numel` elements, each at most STAGING_BYTES when every element
        takes `unit_bytes` of staging."""
        step = max(1, STAGING_BYTES // unit_bytes)
        return [(a, min(a + step, numel)) for a in range(0, numel, step)] or [(0, 0)]

    def _take_staging(self, numel: int, dtype: torch.dtype) -> list[torch.Tensor] | None:
        """The next of the two staging buffers, as every rank's `numel` elements of `dtype`
        (growing them first if needed); None, on every rank, where staging is impossible."""
        if self._no_staging:
            return None
        nbytes = numel * dtype.itemsize
        if (not self._staging or self._staging[0][0].numel() < nbytes) and not self._grow(nbytes):
            return None
        stage = self._staging[self._turn]
        self._turn ^= 1
        return [stage[r][:nbytes].view(dtype) for r in range(self.world)]

    def _grow(self, nbytes: int) -> bool:
        """Staging for tensors of up to `nbytes` (rounded up to 1 MiB), replacing smaller staging.
        Every rank grows at the same call (the collectives run in the same order everywhere)."""
        nbytes = -(-nbytes // (1 << 20)) << 20
        if self._staging:
            self.fence()  # no rank still reads the old staging
        staging = []
        for _ in range(2):
            views = self._map(nbytes)
            if views is None:
                self._staging, self._no_staging = [], True  # do not try again
                return False
            staging.append(views)
        self._staging, self._turn = staging, 0
        return True
