"""ZeRO stages 0-2: plan gradient buckets and shards from the captured graph.

Requires: a captured GraphModule whose trainable parameters are read by `get_attr` nodes.
Guarantees: `ctx.artifacts["zero_layout"]`, a `ZeroLayout` that places every trainable
parameter used by the graph in exactly one bucket; buckets are contiguous ranges of one flat
buffer, ordered as backward produces gradients (reverse order of first use in forward), so a
bucket fills up and can be reduced while backward is still running. Each bucket is padded to a
multiple of the data-parallel size and split into equal chunks; rank r owns chunk r of every
bucket (its shard). Stage 0 does not shard (one chunk per bucket).
Reads node.meta: none. Writes node.meta: `dsc.bucket` on each parameter's get_attr node.

The runtime (`dsc.runtime.zero`) executes this table: it never decides placement itself.
Per-rank bytes it implies (fp32, Ψ = padded elements, N = dp size, S = shard elements):

| stage | params | grads | optimizer state (Adam: 2 per element) |
|-------|--------|-------|---------------------------------------|
| 0     | 4Ψ     | 4Ψ    | 8Ψ                                    |
| 1     | 4Ψ     | 4Ψ    | 8S ≈ 8Ψ/N                             |
| 2     | 4Ψ     | 4S    | 8S                                    |
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx

from dsc.pass_manager import CompileContext, InvariantError, PassResult

# Optimizer state elements per parameter element, and 0-d tensors per optimizer param (step).
STATE_PER_ELEMENT = {"adamw": 2, "adam": 2, "sgd": 0, "sgd_momentum": 1, None: 0}
STEP_TENSORS = {"adamw": 1, "adam": 1, "sgd": 0, "sgd_momentum": 0, None: 0}


@dataclass(frozen=True)
class Slot:
    """One parameter's place inside its bucket."""

    name: str
    shape: tuple[int, ...]
    numel: int
    offset: int  # element offset inside the bucket


@dataclass(frozen=True)
class Bucket:
    """A contiguous range of the flat buffer, reduced as one collective."""

    index: int
    offset: int  # element offset in the flat buffer
    numel: int  # elements used by parameters
    padded: int  # numel rounded up to a multiple of `shards`
    chunk: int  # padded // shards: what one rank owns
    slots: tuple[Slot, ...]
    persistent: bool = False  # ZeRO-3: gathered once per forward and kept for backward


@dataclass(frozen=True)
class ZeroLayout:
    """Where every trainable parameter, gradient and optimizer-state element lives on a rank."""

    stage: int
    rank: int
    dp: int
    shards: int  # dp for stage >= 1, 1 for stage 0
    element_size: int
    buckets: tuple[Bucket, ...]
    overlap_comm: bool
    reduce_scatter: bool = True  # stage >= 1: reduce-scatter (True) or all-reduce then keep the chunk
    allgather_bucket_size: int = 500_000_000  # elements of updated parameters in flight at once
    excluded: tuple[tuple[str, str], ...] = field(default=())  # (parameter, reason)
    live_buckets: int = 3  # ZeRO-3: non-persistent buckets max_live_parameters lets be whole at once (1-3)
    grad_element_size: int = 0  # bytes per accumulated gradient element (precision.grad_accum_dtype); 0: as params

    @property
    def recent(self) -> int:
        """ZeRO-3: gathered buckets forward keeps usable and backward caches (1 or 2)."""
        return min(2, self.live_buckets)

    @property
    def prefetch(self) -> bool:
        """ZeRO-3: gathers run one bucket ahead (overlap_comm, with room for a third bucket)."""
        return self.overlap_comm and self.live_buckets >= 3

    @property
    def numel(self) -> int:
        return sum(b.numel for b in self.buckets)

    @property
    def padded(self) -> int:
        return sum(b.padded for b in self.buckets)

    @property
    def shard_numel(self) -> int:
        return sum(b.chunk for b in self.buckets)

    def memory(self, optimizer: str | None) -> dict[str, int]:
        """Analytic bytes this rank holds for trainable params, grads and optimizer state."""
        e = self.element_size
        opt_elems = self.padded if self.stage == 0 else self.shard_numel
        return {
            "params_bytes": e * (self.shard_numel if self.stage >= 3 else self.padded),
            "grads_bytes": (self.grad_element_size or e) * (self.shard_numel if self.stage >= 2 else self.padded),
            "optimizer_bytes": e * STATE_PER_ELEMENT[optimizer] * opt_elems
            + 4 * STEP_TENSORS[optimizer] * len(self.buckets),
        }

    def gathered_bound_bytes(self) -> int:
        """ZeRO-3: most bytes of whole buckets alive at once: every persistent bucket, plus the three
        largest others. Forward keeps the current and the previous bucket; backward caches the two
        last re-gathered buckets, and an autograd node still running may hold a third it unpacked
        before the cache evicted it. Prefetching adds the bucket in flight; a max_live_parameters
        that allows one bucket keeps one (plus the one a node holds)."""
        persistent = sum(b.padded for b in self.buckets if b.persistent)
        n = self.recent + 1 + self.prefetch
        others = sorted((b.padded for b in self.buckets if not b.persistent), reverse=True)[:n]
        return self.element_size * (persistent + sum(others))

    def collectives(self, accumulation_steps: int, comm_element_size: int | None = None) -> list[dict]:
        """Every collective one optimizer step issues on this rank, with bytes sent (ring).
        `comm_element_size`: bytes per element on the wire when it differs from storage (ZeRO-3
        gathers and reduce-scatters in bf16/fp16 under mixed precision)."""
        e, n = comm_element_size or self.element_size, self.dp
        out = []
        if n == 1:
            return out
        for b in self.buckets:
            # stages 0-2 reduce the accumulated gradients (their dtype); stage 3 the gather's gradient
            payload = (e if self.stage == 3 else self.grad_element_size or e) * b.padded
            if self.stage == 0:
                out.append({"op": "all_reduce", "bucket": b.index, "when": "backward (last micro-step)",
                            "payload_bytes": payload, "sent_bytes": 2 * payload * (n - 1) // n, "times": 1})
            else:
                times = accumulation_steps if self.stage >= 2 else 1
                when = "backward (every micro-step)" if self.stage >= 2 else "backward (last micro-step)"
                op, factor = ("reduce_scatter", 1) if self.reduce_scatter else ("all_reduce", 2)
                out.append({"op": op, "bucket": b.index, "when": when, "payload_bytes": payload,
                            "sent_bytes": factor * payload * (n - 1) // n, "times": times})
        if self.stage in (1, 2):
            for b in self.buckets:
                payload = self.element_size * b.padded
                out.append({"op": "all_gather", "bucket": b.index, "when": "step (updated params)",
                            "payload_bytes": payload, "sent_bytes": payload * (n - 1) // n, "times": 1})
        if self.stage == 3:
            for b in self.buckets:
                payload = e * b.padded
                g = {"op": "all_gather", "bucket": b.index, "payload_bytes": payload,
                     "sent_bytes": payload * (n - 1) // n, "times": accumulation_steps}
                out.append({**g, "when": "forward (before first use)"})
                if not b.persistent:
                    out.append({**g, "when": "backward (re-gather for saved tensors)"})
        return out


def _param_uses(gm: torch.fx.GraphModule) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable parameters read by the graph, ordered as backward produces their gradients
    (reverse order of first use in forward)."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    canonical = {id(p): n for n, p in gm.named_parameters(remove_duplicate=True)}  # tied: one name
    first_use: dict[int, int] = {}
    names: dict[int, str] = {}
    params: dict[int, torch.nn.Parameter] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        try:
            p = gm.get_parameter(node.target)
        except AttributeError:
            continue  # a buffer or constant
        if not p.requires_grad:
            continue
        use = min((order[u] for u in node.users), default=None)
        if use is None:
            continue
        key = id(p)
        names[key] = canonical[key]
        params[key] = p
        first_use[key] = min(first_use.get(key, use), use)
    ordered = sorted(first_use, key=lambda k: -first_use[k])  # backward order
    return [(names[k], params[k]) for k in ordered]


def plan_zero_buckets(gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Group trainable parameters into gradient buckets and shard them over data parallel."""
    zero = ctx.plan.zero
    dp = ctx.plan.parallel.data_parallel_size
    shards = dp if zero.stage >= 1 else 1
    used = _param_uses(gm)
    canonical = {id(p): n for n, p in gm.named_parameters(remove_duplicate=True)}
    used_ids = {id(p) for _, p in used}
    declined = []
    seen = set()
    for name, p in gm.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        if not p.requires_grad:
            declined.append({"what": name, "reason": "frozen (requires_grad=False): replicated, never reduced"})
        elif id(p) not in used_ids:
            declined.append({"what": name, "reason": "not used by the graph: gets no gradient, kept replicated"})

    if not zero.contiguous_gradients:
        declined.append({"what": "zero.contiguous_gradients=false",
                         "reason": "gradient buckets are always contiguous flat buffers in dsc"})

    example = {p.dtype: name for name, p in used}  # one parameter of each dtype, to name in the error
    if len(example) > 1:
        found = ", ".join(f"{d} (e.g. {n})" for d, n in example.items())
        raise InvariantError(f"plan_zero_buckets: trainable parameters have several dtypes: {found}. ZeRO "
                             "buckets hold one dtype; convert the model with model.float() and ask for bf16/fp16 "
                             "compute with the plan's precision.dtype instead")
    element_size = next(iter(used))[1].element_size() if used else 4

    buckets: list[Bucket] = []
    if zero.stage == 3:  # gather order: forward; small parameters apart, in persistent buckets
        used = used[::-1]
        limit = int(zero.prefetch_bucket_size)
        small = int(zero.param_persistence_threshold)
        groups = [([x for x in used if x[1].numel() > small], False), ([x for x in used if x[1].numel() <= small], True)]
    else:
        limit = int(zero.reduce_bucket_size)
        groups = [(used, False)]
    offset = 0
    for members, persistent in groups:
        pending: list[Slot] = []
        size = 0
        for i, (name, p) in enumerate(members):
            pending.append(Slot(name, tuple(p.shape), p.numel(), size))
            size += p.numel()
            nxt = members[i + 1][1].numel() if i + 1 < len(members) else None
            if nxt is None or size + nxt > limit:
                padded = -(-size // shards) * shards
                buckets.append(Bucket(len(buckets), offset, size, padded, padded // shards, tuple(pending),
                                      persistent))
                offset += padded
                pending, size = [], 0

    for node in gm.graph.nodes:
        if node.op == "get_attr":
            try:
                name = canonical.get(id(gm.get_parameter(node.target)))
            except AttributeError:
                continue
            for b in buckets:
                if any(s.name == name for s in b.slots):
                    node.meta["dsc.bucket"] = b.index

    live = 3
    if zero.stage == 3:
        biggest = max((b.padded for b in buckets if not b.persistent), default=0)
        live = max(1, min(3, int(zero.max_live_parameters) // biggest)) if biggest else 3
        if live == 1 or (live == 2 and zero.overlap_comm):
            declined.append({"what": f"zero.max_live_parameters={int(zero.max_live_parameters):,}",
                             "reason": f"room for {live} whole bucket(s) of up to {biggest:,} elements: "
                             + ("gathers are not prefetched" if live == 2 else "one bucket is whole at a "
                                "time, and a bucket larger than the limit is still gathered whole "
                                "(lower prefetch_bucket_size for smaller buckets)")})
    layout = ZeroLayout(zero.stage, ctx.coords["dp"], dp, shards, element_size, tuple(buckets), zero.overlap_comm,
                        zero.reduce_scatter, int(zero.allgather_bucket_size),
                        tuple((d["what"], d["reason"]) for d in declined), live,
                        {"fp32": 4, "bf16": 2, "fp16": 2}[ctx.plan.precision.grad_accum_dtype])
    ctx.artifacts["zero_layout"] = layout
    order = "forward" if zero.stage == 3 else "backward"
    return PassResult(
        summary=(f"ZeRO-{zero.stage} over dp={dp}: {sum(len(b.slots) for b in buckets)} parameters "
                 f"({layout.numel:,} elements, {layout.padded - layout.numel} padding) in {len(buckets)} "
                 f"bucket(s) of <= {limit:,} elements in {order} order; this rank owns "
                 f"{layout.shard_numel:,} elements"),
        details={
            "stage": zero.stage,
            "buckets": [{"index": b.index, "elements": b.numel, "padded": b.padded, "chunk": b.chunk,
                         "persistent": b.persistent, "params": [s.name for s in b.slots]} for b in buckets],
            "overlap_comm": zero.overlap_comm,
        },
        declined=declined,
    )


def check_zero_layout(gm: torch.fx.GraphModule, ctx: CompileContext) -> None:
    """Every used trainable parameter is in exactly one bucket; buckets tile the flat buffer."""
    layout: ZeroLayout = ctx.artifacts["zero_layout"]
    used = _param_uses(gm)
    placed = [s.name for b in layout.buckets for s in b.slots]
    if len(placed) != len(set(placed)):
        raise InvariantError("a parameter is placed in two buckets")
    missing = {n for n, _ in used} - set(placed)
    if missing:
        raise InvariantError(f"parameters without a bucket: {sorted(missing)}")
    offset = 0
    for b in layout.buckets:
        if b.offset != offset or b.padded % layout.shards or b.padded < b.numel:
            raise InvariantError(f"bucket {b.index} does not tile the flat buffer")
        offset += b.padded
