"""Data-parallel runtime for ZeRO stages 0, 1 and 2: executes a `ZeroLayout`.

Memory (per rank, fp32):
- Parameters are moved into one flat buffer laid out bucket by bucket; each model parameter
  becomes a view of it (no copy is kept).
- The optimizer never sees model parameters. It updates one "shard parameter" per bucket, a view
  of this rank's chunk of that bucket in the flat buffer (stage 0: the whole bucket), so fp32
  training keeps no master copy. After the step, stage >= 1 all-gathers each bucket.
- Stage 0/1: gradients accumulate in a flat gradient buffer (each `param.grad` is a view of it).
  At the last micro-step of an accumulation window each bucket is reduced as soon as backward has
  produced all its gradients: stage 0 all-reduces it, stage 1 reduce-scatters it and keeps its
  chunk. Stage 2: no full gradient buffer exists; every micro-step, each parameter's gradient is
  copied into a transient bucket buffer and dropped, full buckets are reduce-scattered, and this
  rank's chunk is added to a gradient shard of S elements.
- `precision.grad_accum_dtype` other than the parameters' dtype (bf16 gradients of fp32 weights):
  the gradient buffers take that dtype, so no `.grad` can be a view of them; each parameter's
  gradient is added into its slot and dropped as backward produces it, reductions run in that
  dtype, and `step` converts one bucket's gradient at a time for the optimizer.
- With `overlap_comm`, bucket collectives are asynchronous and are waited for once, at the end
  of backward; otherwise each runs to completion inside backward.

Gradients are averaged over data-parallel ranks (sum, then divide by N), and the loss is divided
by the accumulation steps in `backward`, so the result equals the mean-loss gradient of the global
batch, as in DeepSpeed.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
import torch.distributed as dist

from dsc.passes.zero import Bucket, ZeroLayout
from dsc.runtime import collectives as C
from dsc.runtime.precision import StaticLossScaler


class ZeroEngine:
    """Owns the flat buffers, gradient hooks, optimizer and scheduler of one data-parallel rank."""

    def __init__(
        self,
        params: dict[str, torch.nn.Parameter],
        layout: ZeroLayout,
        build_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer] | None,
        build_scheduler: Callable[[torch.optim.Optimizer], object] | None,
        group: dist.ProcessGroup | None,
        accumulation_steps: int,
        clip: float,
        grad_dtype: torch.dtype | None = None,
    ):
        self._init_common(layout, group, accumulation_steps, clip)

        first = next(iter(params.values()))
        dtype, device = first.dtype, first.device
        self._init_grad_dtype(dtype, grad_dtype)
        gdt = self.grad_dtype
        self.flat = torch.zeros(layout.padded, dtype=dtype, device=device)
        if layout.stage >= 1:  # ranks on one host: the after-step gather copies from the peers' flat buffers
            self._share_flat()
        self.params = params
        for b in layout.buckets:
            for s in b.slots:
                p = params[s.name]
                view = self._slot(self.flat, b, s.offset, s.numel).view(s.shape)
                view.copy_(p.data)
                p.data = view

        stage = layout.stage
        self.shard_params = [torch.nn.Parameter(self._chunk(self.flat, b)) for b in layout.buckets]
        if stage <= 1:
            self.flat_grad = torch.zeros(layout.padded, dtype=gdt, device=device)
            if not self.split_grads:  # each .grad is a view of the flat gradient: autograd accumulates there
                for b in layout.buckets:
                    for s in b.slots:
                        params[s.name].grad = self._slot(self.flat_grad, b, s.offset, s.numel).view(s.shape)
            self.grad_chunks = [self._chunk(self.flat_grad, b) for b in layout.buckets]
        else:
            self.flat_grad = None
            self.grad_shard = torch.zeros(layout.shard_numel, dtype=gdt, device=device)
            offset = 0
            self.grad_chunks = []
            for b in layout.buckets:
                self.grad_chunks.append(self.grad_shard[offset: offset + b.chunk])
                offset += b.chunk
            self._bucket_buf: dict[int, torch.Tensor] = {}
        if not self.split_grads:
            for sp, g in zip(self.shard_params, self.grad_chunks):
                sp.grad = g

        self._slot_of = {s.name: (b, s) for b in layout.buckets for s in b.slots}
        self._hooks = [
            params[name].register_post_accumulate_grad_hook(self._make_hook(name)) for name in self._slot_of
        ]
        self.optimizer = build_optimizer(self.shard_params) if build_optimizer else None
        self.scheduler = build_scheduler(self.optimizer) if (build_scheduler and self.optimizer) else None

    def _init_grad_dtype(self, dtype: torch.dtype, grad_dtype: torch.dtype | None) -> None:
        """Gradients accumulate in `grad_dtype` (precision.grad_accum_dtype). When it is not the
        parameters' dtype, no `.grad` can be a view of the accumulation buffer (autograd requires
        a parameter's dtype): each gradient is added into the buffer and dropped as backward
        produces it, and `step` hands the optimizer one bucket's gradient at a time, converted."""
        self.grad_dtype = grad_dtype or dtype
        self.split_grads = self.grad_dtype != dtype

    def _init_common(self, layout: ZeroLayout, group, accumulation_steps: int, clip: float) -> None:
        self.layout = layout
        self.group = group
        self.world = layout.dp
        self.rank = layout.rank
        self.accumulation_steps = accumulation_steps
        self.clip = clip
        self.micro_step = 0
        self.global_step = 0
        self.last_grad_norm: float | None = None
        self._boundary = True
        self._pending: list[tuple[object, Callable[[], None]]] = []
        self._ready: dict[int, int] = {}
        self._reduced: set[int] = set()
        self._callback_queued = False
        self.scaler = StaticLossScaler(1.0)  # replaced by the runtime for fp16
        self.skipped_steps = 0
        self.tp, self.tp_group, self._tp_ranges, self.tp_layout, self.tp_rank = 1, None, {}, {}, 0
        self.shared = None  # shared memory holding the parameters (see _share_flat)

    def forward_context(self):
        """Context the compiled graph's forward runs in (stage 3 installs saved-tensor hooks)."""
        return contextlib.nullcontext()

    def _average(self) -> None:
        """Stages 0-2 average as each bucket's reduction finishes; stage 3 overrides this."""

    # -- shared memory (dsc.runtime.shm) ----------------------------------------------------------
    def _share_flat(self) -> None:
        """Move the flat parameter buffer into shared memory when the group's ranks share a host
        (gloo on CPU): rank r then reads the parts other ranks own straight from their buffers."""
        if self.flat.device.type != "cpu" or self.world == 1:
            return
        shared = C.shared_memory(self.group)
        flat = shared.share(self.flat) if shared is not None else None
        if flat is not None:
            self.shared, self.flat = shared, flat

    def _fence(self) -> None:
        """With a shared flat buffer, wait for every rank of the group: what ranks wrote to their
        own parts before it is what the others read after it."""
        if self.shared is not None:
            self.shared.fence()

    # -- layout helpers ---------------------------------------------------------------------------
    def _slot(self, flat: torch.Tensor, b: Bucket, offset: int, numel: int) -> torch.Tensor:
        return flat[b.offset + offset: b.offset + offset + numel]

    def _chunk(self, flat: torch.Tensor, b: Bucket) -> torch.Tensor:
        start = b.offset + (self.rank * b.chunk if self.layout.stage >= 1 else 0)
        return flat[start: start + b.chunk]

    def own_chunk(self, full_bucket: torch.Tensor, b: Bucket) -> torch.Tensor:
        """This rank's part of a whole bucket (all of it at stage 0)."""
        if self.layout.stage == 0:
            return full_bucket
        return full_bucket[self.rank * b.chunk: (self.rank + 1) * b.chunk]

    # -- backward ---------------------------------------------------------------------------------
    def begin_backward(self) -> None:
        """Called before each micro-step's backward: decides whether this one is a boundary."""
        self.micro_step += 1
        self._boundary = self.micro_step % self.accumulation_steps == 0
        self._ready.clear()
        self._reduced.clear()

    @property
    def is_boundary(self) -> bool:
        return self._boundary

    def _make_hook(self, name: str):
        def hook(p: torch.Tensor) -> None:
            self._on_grad(name, p)

        return hook

    def _on_grad(self, name: str, p: torch.Tensor) -> None:
        if not self._callback_queued:
            self._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_backward)
        b, s = self._slot_of[name]
        if self.layout.stage >= 2:
            buf = self._bucket_buf.get(b.index)
            if buf is None:
                buf = self._bucket_buf[b.index] = torch.zeros(b.padded, dtype=self.grad_dtype, device=p.device)
            buf[s.offset: s.offset + s.numel].add_(p.grad.reshape(-1))
            p.grad = None
        else:
            view = self._slot(self.flat_grad, b, s.offset, s.numel).view(s.shape)
            if self.split_grads:  # accumulate in grad_dtype; autograd starts a new .grad next time
                view.add_(p.grad)
                p.grad = None
            elif p.grad is not view and p.grad.data_ptr() != view.data_ptr():
                view.copy_(p.grad)  # someone replaced .grad (e.g. zero_grad(set_to_none=True))
                p.grad = view
            if not self._boundary:
                return
        self._ready[b.index] = self._ready.get(b.index, 0) + 1
        if self._ready[b.index] == len(b.slots):
            self._reduce(b)

    def _reduce(self, b: Bucket) -> None:
        """Launch the collective for a bucket whose gradients are all present."""
        self._reduced.add(b.index)
        overlap = self.layout.overlap_comm
        n = self.world
        if self.layout.stage == 0:
            t = self.flat_grad[b.offset: b.offset + b.padded]
            work = C.all_reduce_(t, self.group, n, async_op=overlap)
            self._pending.append((work, lambda: t.div_(n)))
            return
        if self.layout.stage == 1:
            src = self.flat_grad[b.offset: b.offset + b.padded]
            dst = self.grad_chunks[b.index]
        else:
            src = self._bucket_buf.pop(b.index)
            dst = self.grad_chunks[b.index]
        if self.layout.reduce_scatter:
            out = torch.empty(b.chunk, dtype=src.dtype, device=src.device)
            work = C.reduce_scatter_(out, src, self.group, n, async_op=overlap)
        else:  # all-reduce the whole bucket (twice the traffic), then keep this rank's chunk
            work = C.all_reduce_(src, self.group, n, async_op=overlap)
            out = src[self.rank * b.chunk: (self.rank + 1) * b.chunk]

        def finish(out=out, dst=dst, src=src):  # src stays alive until the collective is done
            if self.layout.stage == 1:
                dst.copy_(out.div_(n))
            else:
                dst.add_(out.div_(n))

        self._pending.append((work, finish))

    def _end_backward(self) -> None:
        """After backward: reduce buckets some of whose parameters got no gradient, then wait."""
        self._callback_queued = False
        if self.layout.stage >= 2 or self._boundary:
            for b in self.layout.buckets:
                if b.index in self._reduced:
                    continue
                if self.layout.stage >= 2 and b.index not in self._bucket_buf:
                    self._bucket_buf[b.index] = torch.zeros(b.padded, dtype=self.grad_dtype, device=self.flat.device)
                self._reduce(b)
        for work, finish in self._pending:
            if work is not None:
                work.wait()
            finish()
        self._pending.clear()

    # -- step -------------------------------------------------------------------------------------
    def set_tensor_parallel(self, layout: dict[str, dict], group, tp: int) -> None:
        """Parameters in `layout` ({name: {"dim", "segments", "size"}}) are split over the
        tensor-parallel `group`: the gradient norm sums their squares over that group too (the
        replicated ones count once), and checkpoints record how to join the slices."""
        self.tp, self.tp_group, self.tp_layout = tp, group, dict(layout)
        self.tp_rank = dist.get_rank(group) if group is not None else 0
        sharded = set(layout)
        self._tp_ranges = {True: [], False: []}  # split over tp? -> (shard index, start, end)
        for i, b in enumerate(self.layout.buckets):
            lo = self.rank * b.chunk if self.layout.stage >= 1 else 0
            hi = lo + b.chunk
            for s in b.slots:
                a, z = max(lo, s.offset), min(hi, s.offset + s.numel)
                if a < z:
                    self._tp_ranges[s.name in sharded].append((i, a - lo, z - lo))

    def grad_norm(self) -> float:
        """Global L2 norm of the averaged gradient, across data- and tensor-parallel shards."""
        norm = lambda g: float(torch.linalg.vector_norm(g, dtype=torch.float32)) ** 2  # noqa: E731
        if self.tp == 1:
            parts = [sum(norm(g) for g in self.grad_chunks), 0.0]
        else:  # replicated and tensor-parallel elements summed apart: ranks must agree bit for bit
            parts = [sum(norm(self.grad_chunks[i][a:z]) for i, a, z in self._tp_ranges[split])
                     for split in (False, True)]
        t = torch.tensor(parts, dtype=torch.float64, device=self.flat.device)  # NCCL reduces GPU tensors
        if self.layout.stage >= 1 and self.world > 1:
            C.all_reduce_(t, self.group, self.world)
        if self.tp > 1:
            split = t[1:].clone()  # the tensor-parallel pieces of the same parameters
            C.all_reduce_(split, self.tp_group, self.tp)
            t[1] = split[0]
        return math.sqrt(float(t.sum()))

    def step(self) -> bool:
        """Optimizer + scheduler step at an accumulation boundary. Returns whether it stepped."""
        if not self._boundary or self.micro_step == 0:
            return False
        if self.optimizer is None:
            raise RuntimeError("this model was compiled without an optimizer (plan has no 'optimizer')")
        self._fence()  # no rank still reads the parameters this step is about to change
        self._average()
        scale = self.scaler.cur_scale
        if scale != 1.0 and not self.split_grads:
            for g in self.grad_chunks:
                g.div_(scale)
        self.last_grad_norm = self.grad_norm() / (scale if self.split_grads else 1.0)  # the same on every rank
        if not math.isfinite(self.last_grad_norm):
            if not self.scaler.dynamic:
                raise FloatingPointError(f"gradient norm is {self.last_grad_norm} at step {self.global_step}")
            self.scaler.update(True)  # fp16 overflow: skip this step, as DeepSpeed does
            self.skipped_steps += 1
            self.zero_grad()
            return False
        self.scaler.update(False)
        coef = 1.0
        if self.clip > 0:
            coef = min(1.0, self.clip / (self.last_grad_norm + 1e-6))
        if self.split_grads:  # one bucket's gradient in the parameters' dtype at a time
            for sp in self.shard_params:
                sp.grad = None
            for sp, g in zip(self.shard_params, self.grad_chunks):
                sp.grad = g.to(sp.dtype)
                if scale != 1.0:
                    sp.grad.div_(scale)  # the loss scale comes off in the parameters' dtype
                if coef < 1.0:
                    sp.grad.mul_(coef)
                self.optimizer.step()  # updates only the parameter that has a gradient
                sp.grad = None
        else:
            if coef < 1.0:
                for g in self.grad_chunks:
                    g.mul_(coef)
            self.optimizer.step()
        if self.layout.stage >= 1:
            self._gather_params()
        if self.scheduler is not None:
            self.scheduler.step()
        self.zero_grad()
        self.global_step += 1
        return True

    def _gather_params(self) -> None:
        """All-gather every bucket's updated chunks, at most allgather_bucket_size elements in flight.
        With a shared flat buffer: once every rank has stepped, copy each peer's chunks from its buffer."""
        if self.shared is not None:
            self._fence()
            for b in self.layout.buckets:
                self.shared.gather_in_place(self.flat[b.offset: b.offset + b.padded])
            return
        in_flight: list = []
        elements = 0
        for sp, b in zip(self.shard_params, self.layout.buckets):
            if in_flight and elements + b.padded > self.layout.allgather_bucket_size:
                for w, _ in in_flight:
                    w.wait()
                in_flight, elements = [], 0
            full = self.flat[b.offset: b.offset + b.padded]
            chunk = sp.detach().clone()  # the input must not alias the output being written
            work = C.all_gather_(full, chunk, self.group, self.world, async_op=self.world > 1)
            if work is not None:
                in_flight.append((work, chunk))  # keep the input alive until the gather is done
                elements += b.padded
        for w, _ in in_flight:
            w.wait()

    def zero_grad(self) -> None:
        if self.flat_grad is not None:
            self.flat_grad.zero_()
        else:
            self.grad_shard.zero_()

    # -- accounting -------------------------------------------------------------------------------
    def live_bytes(self) -> dict[str, int]:
        """Bytes actually held right now, counted from the live tensors (for tests and reports)."""
        opt = 0
        if self.optimizer is not None:
            for state in self.optimizer.state.values():
                for v in state.values():
                    if torch.is_tensor(v):
                        opt += v.numel() * v.element_size()
        grads = (self.flat_grad if self.flat_grad is not None else self.grad_shard)
        return {
            "params_bytes": self.flat.numel() * self.flat.element_size(),
            "grads_bytes": grads.numel() * grads.element_size(),
            "optimizer_bytes": opt,
        }
