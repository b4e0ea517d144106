"""ZeRO-3 runtime: owns the parameter shards and re-gathers whole parameters for backward.

The graph (see `dsc.passes.zero3`) gathers each bucket's shard with `dsc::all_gather` just before
use; autograd turns that gather's gradient into a reduce-scatter, so backward leaves each rank
with the summed gradient of its own shard. This engine adds what the graph cannot express:

- Memory: a rank holds only its shards — parameters, gradients and optimizer state of S = Ψ/N
  elements each (fp32 AdamW: 16Ψ/N bytes of model state).
- Backward keeps no whole parameter alive: while the graph runs forward, saved-tensor hooks
  replace any saved tensor that lives in a gathered (non-persistent) bucket by a token (bucket,
  size, stride, offset); backward re-gathers the bucket when it needs it. The last two
  re-gathered buckets are cached, so the parameters of one bucket cost one gather per backward.
- The bytes of whole (gathered) buckets alive at once are tracked from storage weak references;
  `gathered_peak_bytes` is the peak since the last step (tests compare it with the plan's bound).
- Prefetch (`zero.overlap_comm`): when forward gathers bucket k of the graph's gather order, the
  gather of bucket k+1 starts asynchronously and runs while bucket k computes; backward does the
  same along the reverse order of its re-gathers. The graph's gather op then waits for the
  prefetched result (`collectives.prefetch_all_gather`). Prefetches left unused are waited for
  and dropped when forward starts and when backward ends, before the shards can change.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from dsc.passes.zero import ZeroLayout
from dsc.passes.zero3 import GROUP, shard_attr
from dsc.runtime import collectives as C
from dsc.runtime.zero import ZeroEngine


class Zero3Engine(ZeroEngine):
    """ZeroEngine for stage 3: shards instead of a flat full buffer; no all-gather after step."""

    def __init__(self, gm: torch.nn.Module, params: dict[str, torch.nn.Parameter], layout: ZeroLayout,
                 build_optimizer, build_scheduler, group, accumulation_steps: int, clip: float,
                 grad_dtype: torch.dtype | None = None):
        self._init_common(layout, group, accumulation_steps, clip)
        first = next(iter(params.values()))
        dtype, device = first.dtype, first.device
        self._init_grad_dtype(dtype, grad_dtype)
        self.flat = torch.zeros(layout.shard_numel, dtype=dtype, device=device)  # this rank's shards
        self._share_flat()  # ranks on one host keep their shards in shared memory: a gather copies the peers'
        self.flat_grad = torch.zeros(layout.shard_numel, dtype=self.grad_dtype, device=device)
        self.grad_chunks = []
        self.shard_params = []
        offset = 0
        for b in layout.buckets:
            whole = torch.zeros(b.padded, dtype=dtype, device=device)
            for s in b.slots:
                whole[s.offset: s.offset + s.numel].copy_(params[s.name].detach().reshape(-1))
            chunk = self.flat[offset: offset + b.chunk]
            chunk.copy_(whole[self.rank * b.chunk: (self.rank + 1) * b.chunk])
            shard = torch.nn.Parameter(chunk)
            self.grad_chunks.append(self.flat_grad[offset: offset + b.chunk])
            if not self.split_grads:  # autograd accumulates straight into the flat gradient
                shard.grad = self.grad_chunks[-1]
            gm.register_parameter(shard_attr(b.index), shard)
            self.shard_params.append(shard)
            offset += b.chunk
        for s in (s for b in layout.buckets for s in b.slots):  # free the whole parameters
            p = params[s.name]
            # a zero-stride stand-in: 4 bytes, but the shape stays (an eval-mode capture needs it)
            p.data = torch.zeros((), dtype=dtype, device=device).expand(p.shape)
            p.requires_grad_(False)
        self.gather_dtype = dtype  # the runtime sets bf16/fp16 for mixed precision (the graph casts too)
        self._gathered: dict[int, tuple[StorageWeakRef, int, int]] = {}  # storage ptr -> (ref, bucket, bytes)
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.gathered_peak_bytes = 0
        self.prefetch = layout.prefetch
        self._order: list[int] = []  # bucket of every gather of the graph running, in graph order
        self._train_order: list[int] = []  # the training graph's
        self._phase, self._fwd_pos, self._bwd_pos = None, 0, -1
        C.add_gather_listener(self._on_gather)
        for i, sp in enumerate(self.shard_params):
            sp.register_post_accumulate_grad_hook(lambda shard, i=i: self._on_shard_grad(shard, i))
        self.optimizer = build_optimizer(self.shard_params) if build_optimizer else None
        self.scheduler = build_scheduler(self.optimizer) if (build_scheduler and self.optimizer) else None

    # -- gathered buckets -------------------------------------------------------------------------
    def set_gather_order(self, order: list[int]) -> None:
        """The graph's gathers, in order (what forward prefetches along)."""
        self._train_order = self._order = list(order)

    def _track(self, b: int, full: torch.Tensor) -> None:
        storage = full.untyped_storage()
        self._gathered[storage.data_ptr()] = (StorageWeakRef(storage), b, storage.nbytes())
        self.gathered_peak_bytes = max(self.gathered_peak_bytes, self.gathered_bytes())

    def _on_gather(self, b: int, full: torch.Tensor) -> None:
        if not 0 <= b < len(self.shard_params):
            return
        self._track(b, full)
        if self.prefetch and self._phase == "forward":
            # the graph gathers in _order: this is gather _fwd_pos; start the next one
            if self._fwd_pos < len(self._order) and self._order[self._fwd_pos] == b:
                self._fwd_pos += 1
                if self._fwd_pos < len(self._order):
                    self._start(self._order[self._fwd_pos])

    def _start(self, b: int) -> None:
        with torch.no_grad():
            full = C.prefetch_all_gather(self.shard_params[b].detach().to(self.gather_dtype), GROUP, self.world, b)
        if full is not None:
            self._track(b, full)

    def _backward_order(self) -> list[int]:
        """Backward unpacks saved tensors in reverse order of use: the non-persistent buckets of
        the forward gathers, reversed."""
        return [b for b in reversed(self._order) if not self.layout.buckets[b].persistent]

    def gathered_bytes(self) -> int:
        """Bytes of whole buckets alive right now (forward gathers, backward re-gathers)."""
        for key in [k for k, (ref, _, _) in self._gathered.items() if ref.expired()]:
            del self._gathered[key]
        return sum(n for _, _, n in self._gathered.values())

    def _pack(self, t: torch.Tensor):
        if t.device.type == "meta" or not t.is_floating_point():
            return t
        try:
            entry = self._gathered.get(t.untyped_storage().data_ptr())
        except RuntimeError:  # a tensor subclass without real storage cannot be a gathered buffer
            return t
        if entry is None or entry[0].expired() or self.layout.buckets[entry[1]].persistent:
            return t
        return ("dsc-regather", entry[1], t.size(), t.stride(), t.storage_offset())

    def _unpack(self, saved):
        if isinstance(saved, torch.Tensor):
            return saved
        _, b, size, stride, offset = saved
        full = self._cache.get(b)
        if full is None:
            while len(self._cache) >= self.layout.recent:  # release before gathering: at most that many whole
                self._cache.popitem(last=False)
            with torch.no_grad():
                shard = self.shard_params[b].detach().to(self.gather_dtype)
                full = torch.ops.dsc.all_gather(shard, GROUP, self.world, b)
            self._cache[b] = full
            if self.prefetch:  # start the re-gather backward will need next
                order = self._backward_order()
                pos = next((i for i in range(self._bwd_pos + 1, len(order)) if order[i] == b), None)
                if pos is not None:
                    self._bwd_pos = pos
                    nxt = next((x for x in order[pos + 1:] if x != b), None)
                    if nxt is not None and nxt not in self._cache:
                        self._start(nxt)
        return full.as_strided(size, stride, offset)

    @contextlib.contextmanager
    def forward_context(self, order: list[int] | None = None):
        """Run the graph's forward inside this: saved whole parameters become re-gather tokens,
        and gathers prefetch along the graph's order (`order`: another graph's, e.g. eval's)."""
        C.drop_prefetched()
        self._fence()  # every rank's shards are written (a step, a checkpoint load) before anyone gathers
        self._order = list(order) if order is not None else self._train_order
        self._phase, self._fwd_pos, self._bwd_pos = "forward", 0, -1
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._phase = None

    # -- backward and step --------------------------------------------------------------------------
    def _on_shard_grad(self, shard: torch.Tensor, i: int) -> None:
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        if self.split_grads:  # accumulate in grad_dtype and drop the shard-sized gradient
            self.grad_chunks[i].add_(shard.grad)
            shard.grad = None

    def _end_backward(self) -> None:
        """Once backward has finished: drop the re-gather cache."""
        self._callback_queued = False
        self._cache.clear()
        C.drop_prefetched()

    def _average(self) -> None:
        """Reduce-scatter in backward summed over ranks; average like the other stages. (Called
        first thing in step: no prefetched gather may outlive the shards it read.)"""
        C.drop_prefetched()
        if self.world > 1:
            self.flat_grad.div_(self.world)

    def _gather_params(self) -> None:
        """Nothing to gather after the step: the next forward gathers the updated shards."""

    def zero_grad(self) -> None:
        self.flat_grad.zero_()

    def full_parameters(self) -> dict[str, torch.Tensor]:
        """Every sharded parameter, whole, under its canonical name (a collective: all ranks call)."""
        out = {}
        self._fence()
        with torch.no_grad():
            for sp, b in zip(self.shard_params, self.layout.buckets):
                full = torch.ops.dsc.all_gather(sp.detach(), GROUP, self.world)
                for s in b.slots:
                    out[s.name] = full[s.offset: s.offset + s.numel].view(s.shape).clone()
        return out

    def live_bytes(self) -> dict[str, int]:
        out = super().live_bytes()
        out["gathered_peak_bytes"] = self.gathered_peak_bytes
        return out

    def close(self) -> None:
        C.remove_gather_listener(self._on_gather)

