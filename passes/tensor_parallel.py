"""Tensor parallelism by sharding propagation over the captured aten graph.

Requires: an aten graph from torch.export (parameters read by `get_attr` nodes, `meta["val"]` on
every node) and `ctx.coords["tp"]`, this rank's place in its tensor-parallel group.
Guarantees: every trainable parameter the plan shards is replaced, on this rank's GraphModule
only, by its local shard (same qualified name, so the ZeRO passes that follow bucket the local
shapes); every node whose value is sharded computes the local part, with shape arguments of
views/reshapes/expands rewritten for the shard; the values that leave the graph are whole.
`ctx.artifacts["tp_layout"]` maps each sharded parameter to (dim, segments) and records the
resolved per-module table.
Reads node.meta: `val`. Writes node.meta: `val` (local shapes), `dsc.tp` (placement, as text).

How it decides (the plan's `rules: "auto"`):
1. Sites are the ops that read a weight: `aten.linear`, `aten.addmm` (GPT-2's transposed Conv1D)
   and `aten.embedding`. A linear whose out_features equals an embedding's vocabulary, or whose
   weight an embedding also reads, is a vocabulary head; embeddings are vocabulary-parallel.
2. Walking back from each linear's input through the ops that keep features apart (views,
   transposes, pointwise ops, attention, ...), a linear that reaches earlier linears is
   row-parallel and those linears are column-parallel: q/k/v (or a fused qkv) -> output
   projection, up/gate -> down. The walk stops at norms and reductions and at row-parallel
   outputs (whole again after their all-reduce).
3. Placements (replicated, or sharded on a dimension) are propagated node by node. A column-
   parallel output is sharded on its last dimension; if it is split on that dimension (a fused
   qkv), each piece is sharded separately ("segments"). A reshape moves the shard to the
   dimension that starts the same block (hidden -> heads); attention keeps heads apart.
4. Where propagation meets an op it cannot keep sharded (a norm over the sharded dimension, say),
   the pass raises `ShardingError` naming the node; under "auto" the column/row group that led
   there is replicated instead and the report lists it as declined.
A `rules` table {module pattern: colwise|rowwise|vocab|replicate} overrides auto per module; a
table entry that cannot be honoured is an error, not a silent fallback.

Collectives (see `dsc.runtime.collectives`): the input of column-parallel layers passes through
`dsc::copy_to_tp` (gradient summed in backward), row-parallel and vocab-parallel embedding
outputs through `dsc::tp_all_reduce`, a vocabulary-sharded loss becomes
`dsc::vocab_parallel_cross_entropy`, and sharded graph outputs are gathered by
`dsc::all_gather_dim`.
"""

from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass, field

import torch
import torch.fx

from dsc.pass_manager import CompileContext, InvariantError, PassResult
from dsc.runtime import collectives  # noqa: F401  (registers torch.ops.dsc.*)

aten = torch.ops.aten
GROUP = "tp"  # resolved to this rank's tensor-parallel group by the runtime
STYLES = ("colwise", "rowwise", "vocab", "replicate")


class ShardingError(RuntimeError):
    """The graph cannot be sharded as planned: names the node, the modules involved and why."""

    def __init__(self, node: torch.fx.Node, reason: str, origins=frozenset()):
        self.node, self.reason, self.origins = node, reason, frozenset(origins)
        stack = (node.meta.get("stack_trace") or "").strip().splitlines()  # recorded under DSC_DEBUG=1
        modules = list((node.meta.get("nn_module_stack") or {}).values())
        where = f" ({stack[-2].strip()})" if len(stack) >= 2 else \
            f" (in module '{modules[-1][0]}')" if modules and modules[-1][0] else ""
        mods = f" [sharded by: {', '.join(sorted(self.origins))}]" if self.origins else ""
        super().__init__(f"tensor_parallel: node '{node.name}' ({_op_name(node)}){where}: {reason}{mods}")


def _would_work(n: int) -> str:
    sizes = [d for d in range(2, n + 1) if n % d == 0][:6]
    return (f"tensor_parallel.size {' or '.join(map(str, sizes))} would divide it, or replicate the module "
            "(tensor_parallel.rules {\"<module>\": \"replicate\"})") if sizes else \
        "replicate the module (tensor_parallel.rules {\"<module>\": \"replicate\"})"


def _op_name(node: torch.fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", str(t)) if node.op == "call_function" else node.op


@dataclass(frozen=True)
class Shard:
    """A tensor split over the tp ranks along `dim`. The dimension is a concatenation of
    `segments` (global sizes); each segment is split evenly, and a rank holds its part of every
    segment, in order (a fused q|k|v projection has three segments)."""

    dim: int
    segments: tuple[int, ...]
    size: int | None = None  # the real size when the one segment is padded to a multiple of tp

    def local(self, tp: int) -> int:
        return sum(s // tp for s in self.segments)

    def at(self, dim: int) -> "Shard":
        return Shard(dim, self.segments, self.size)

    def text(self) -> str:
        segs = "" if len(self.segments) == 1 else f" in {len(self.segments)} segments"
        pad = f", {self.size} padded to {self.segments[0]}" if self.size is not None else ""
        return f"Shard({self.dim}{segs}{pad})"


@dataclass
class Site:
    """An op that reads a weight: where a sharding style applies."""

    node: torch.fx.Node
    kind: str  # "linear" | "addmm" | "embedding"
    module: str
    weight: str  # canonical parameter name
    bias: str | None
    in_features: int
    out_features: int  # embedding: vocabulary size
    style: str = "replicate"
    why: str = "auto: not part of a column/row pair"


@dataclass
class Decision:
    """Per-module styles and the groups that stand or fall together under auto."""

    sites: list[Site]
    groups: list[set[str]] = field(default_factory=list)
    explicit: set[str] = field(default_factory=set)


def _param_name(gm, node, canonical) -> str | None:
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    try:
        p = gm.get_parameter(node.target)
    except AttributeError:
        return None
    return canonical.get(id(p))


def find_sites(gm: torch.fx.GraphModule, prefix: str = "") -> list[Site]:
    canonical = {id(p): n for n, p in gm.named_parameters(remove_duplicate=True)}
    sites = []

    def module_of(attr: torch.fx.Node, user: torch.fx.Node) -> str:
        stack = list((user.meta.get("nn_module_stack") or {}).values())
        name = stack[-1][0] if stack and stack[-1][0] else attr.target.rsplit(".", 1)[0]
        return name[len(prefix):] if prefix and name.startswith(prefix) else name

    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is aten.linear.default:
            w = _param_name(gm, node.args[1], canonical)
            b = _param_name(gm, node.args[2], canonical) if len(node.args) > 2 else None
            if w is not None and node.args[1].meta["val"].dim() == 2:
                out_f, in_f = node.args[1].meta["val"].shape
                sites.append(Site(node, "linear", module_of(node.args[1], node), w, b, int(in_f), int(out_f)))
        elif node.target is aten.addmm.default and not node.kwargs:
            w = _param_name(gm, node.args[2], canonical)
            b = _param_name(gm, node.args[0], canonical)
            if w is not None and b is not None:
                in_f, out_f = node.args[2].meta["val"].shape
                sites.append(Site(node, "addmm", module_of(node.args[2], node), w, b, int(in_f), int(out_f)))
        elif node.target is aten.embedding.default:
            w = _param_name(gm, node.args[0], canonical)
            if w is not None:
                vocab, dim = node.args[0].meta["val"].shape
                sites.append(Site(node, "embedding", module_of(node.args[0], node), w, None, int(dim), int(vocab)))
    return sites


# ops through which the auto walk does not pass: they mix the feature dimension
_BARRIERS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.mean.dim, aten.sum.dim_IntList,
             aten.var.correction, aten.var_mean.correction, aten.amax.default, aten.group_norm.default,
             aten.cross_entropy_loss.default}


def decide(sites: list[Site], rules) -> Decision:
    """Assign a style to every site: auto pairing, then the plan's table on top."""
    by_node = {s.node: s for s in sites}
    vocab = max((s.out_features for s in sites if s.kind == "embedding"), default=None)
    emb_weights = {s.weight for s in sites if s.kind == "embedding" and s.out_features == vocab}
    dec = Decision(sites)
    for s in sites:  # the token embedding (largest vocabulary) and the heads that share it
        if s.kind == "embedding":
            if s.out_features == vocab:
                s.style, s.why = "vocab", "auto: token embedding (vocabulary-parallel)"
            else:
                s.why = f"auto: small embedding ({s.out_features} rows), replicated"
        elif s.weight in emb_weights:
            s.style, s.why = "vocab", "auto: vocabulary head (weight tied to the token embedding)"
        elif s.out_features == vocab and _feeds_loss_or_output(s.node):
            s.style, s.why = "vocab", "auto: vocabulary head (out_features = vocabulary size, feeds the loss/output)"
    for s in sites:
        if s.kind == "embedding" or s.style == "vocab":
            continue
        sources = _walk_back(s.node, by_node)
        if sources:
            s.style, s.why = "rowwise", f"auto: second of a pair (input from {', '.join(x.module for x in sources)})"
            group = {s.module}
            for src in sources:
                src.style, src.why = "colwise", f"auto: first of a pair (feeds {s.module})"
                group.add(src.module)
            merged = [g for g in dec.groups if g & group]
            for g in merged:
                dec.groups.remove(g)
                group |= g
            dec.groups.append(group)
    vocab_group = {s.module for s in sites if s.style == "vocab"}
    if vocab_group:
        dec.groups.append(vocab_group)
    table = rules if isinstance(rules, dict) else {}
    for pattern, style in table.items():
        hits = [s for s in sites if fnmatch.fnmatchcase(s.module, pattern)]
        if not hits:
            known = ", ".join(sorted({s.module for s in sites})[:8])
            raise ShardingRuleError(f"tensor_parallel.rules: pattern {pattern!r} matches no module that reads a "
                                    f"weight (linear, Conv1D or embedding); modules include: {known}")
        for s in hits:
            if style in ("colwise", "rowwise") and s.kind == "embedding":
                raise ShardingRuleError(f"tensor_parallel.rules[{pattern!r}] = {style!r}: {s.module} is an "
                                        "embedding; allowed for embeddings: 'vocab', 'replicate'")
            s.style, s.why = style, f"plan: rules[{pattern!r}]"
            dec.explicit.add(s.module)
    return dec


def _feeds_loss_or_output(node: torch.fx.Node) -> bool:
    """Whether `node`'s value reaches a cross-entropy or the graph output through views and casts."""
    frontier, seen = [node], set()
    while frontier:
        n = frontier.pop()
        for u in n.users:
            if u in seen:
                continue
            seen.add(u)
            if u.op == "output" or u.target in (aten.cross_entropy_loss.default, *_SOFTMAX):
                return True
            if u.target in _VIEWS | _SAME | {aten.slice.Tensor}:
                frontier.append(u)
    return False


class ShardingRuleError(ValueError):
    """A `tensor_parallel.rules` entry that names no module or a style the module cannot take."""


def _walk_back(node: torch.fx.Node, by_node: dict) -> list[Site]:
    """Linears (not yet row-parallel) whose outputs reach `node`'s activation input."""
    start = node.args[1] if node.target is aten.addmm.default else node.args[0]
    found, seen, stack = [], set(), [start]
    while stack:
        n = stack.pop()
        if not isinstance(n, torch.fx.Node) or n in seen:
            continue
        seen.add(n)
        site = by_node.get(n)
        if site is not None:
            if site.kind != "embedding" and site.style not in ("rowwise", "vocab"):
                found.append(site)
            continue
        if n.op != "call_function" or n.target in _BARRIERS:
            continue
        stack.extend(n.all_input_nodes)
    return found


# -- propagation ----------------------------------------------------------------------------------

_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SAME = {aten.dropout.default, aten.alias.default, aten.contiguous.default, aten.clone.default,
         aten.detach.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
         aten.lift_fresh_copy.default, aten.type_as.default, aten.gelu.default, aten.silu.default,
         aten.relu.default, aten.tanh.default, aten.sigmoid.default}
_REDUCE = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default}


def _val(x):
    return x.meta.get("val") if isinstance(x, torch.fx.Node) else None


def _shape(x) -> tuple[int, ...]:
    return tuple(int(d) for d in _val(x).shape)


def _groups(a: tuple[int, ...], b: tuple[int, ...]):
    """Pair runs of input and output dimensions of a reshape whose products match."""
    i = j = 0
    out = []
    while i < len(a) or j < len(b):
        ga, gb, pa, pb = [], [], 1, 1
        if i < len(a):
            ga.append(i); pa *= a[i]; i += 1  # noqa: E702
        if j < len(b):
            gb.append(j); pb *= b[j]; j += 1  # noqa: E702
        while pa != pb:
            if pa < pb and i < len(a):
                ga.append(i); pa *= a[i]; i += 1  # noqa: E702
            elif pb < pa and j < len(b):
                gb.append(j); pb *= b[j]; j += 1  # noqa: E702
            else:
                return None
        out.append((ga, gb))
    return out


class _Propagation:
    """Placements of every node for one set of styles; collects the rewrites to apply."""

    def __init__(self, gm: torch.fx.GraphModule, dec: Decision, tp: int):
        self.gm, self.dec, self.tp = gm, dec, tp
        self.place: dict[torch.fx.Node, object] = {}
        self.origin: dict[torch.fx.Node, frozenset] = {}
        self.params: dict[str, Shard] = {}  # canonical name -> placement
        self.param_origin: dict[str, str] = {}
        self.patches: list[tuple[torch.fx.Node, int | str, object]] = []
        self.actions: list[tuple] = []
        self.canonical = {id(p): n for n, p in gm.named_parameters(remove_duplicate=True)}
        self.site_of = {s.node: s for s in dec.sites}

    # -- helpers
    def fail(self, node, reason, *inputs):
        origins = frozenset().union(*(self.origin.get(x, frozenset()) for x in inputs)) if inputs else frozenset()
        raise ShardingError(node, reason, origins)

    def P(self, x):
        return self.place.get(x) if isinstance(x, torch.fx.Node) else None

    def set(self, node, placement, *inputs):
        self.place[node] = placement
        self.origin[node] = frozenset().union(*(self.origin.get(x, frozenset()) for x in inputs))

    def shard_param(self, name: str, shard: Shard, site: Site, node):
        old = self.params.get(name)
        if old is not None and old != shard:
            raise ShardingError(node, f"parameter {name} would be sharded as {old.text()} by "
                                f"{self.param_origin[name]} and as {shard.text()} by {site.module}",
                                {self.param_origin[name], site.module})
        for seg in shard.segments:
            if seg % self.tp and shard.size is None:
                raise ShardingError(node, f"{site.module}: dimension {shard.dim} of {name} has size {seg}, "
                                    f"which does not divide by tensor_parallel.size {self.tp}; {_would_work(seg)}",
                                    {site.module})
        self.params[name] = shard
        self.param_origin[name] = site.module

    def vocab_shard(self, dim: int, vocab: int) -> Shard:
        """A vocabulary dimension: padded (Megatron-style) to a multiple of tp when it does not divide;
        padded rows are zero, never looked up, and masked out of the loss and the gathered logits."""
        padded = -(-vocab // self.tp) * self.tp
        return Shard(dim, (padded,), vocab if padded != vocab else None)

    def segments_after(self, node: torch.fx.Node, size: int) -> tuple[int, ...]:
        """Segments of a column-parallel output: the sizes of a split on its last dimension."""
        frontier = [node]
        while frontier:
            n = frontier.pop()
            for u in n.users:
                if u.op != "call_function":
                    continue
                v = _val(u)
                if u.target in (aten.split.Tensor, aten.split_with_sizes.default):
                    dim = u.args[2] if len(u.args) > 2 else u.kwargs.get("dim", 0)
                    if dim % _val(n).dim() == _val(n).dim() - 1:
                        return tuple(int(t.shape[dim]) for t in v)
                if u.target in _VIEWS | _SAME and isinstance(v, torch.Tensor) and v.shape[-1] == size:
                    frontier.append(u)
        return (size,)

    # -- the walk
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.set(node, None)
            elif node.op == "get_attr":
                self.set(node, None)  # parameter placements are applied at their sites
            elif node.op == "call_function":
                site = self.site_of.get(node)
                if site is not None and site.style != "replicate":
                    self.site(node, site)
                else:
                    self.op(node)
            elif node.op == "output":
                for i, x in enumerate(torch.utils._pytree.tree_leaves(node.args[0])):
                    s = self.P(x)
                    if isinstance(s, Shard):
                        if len(s.segments) > 1:
                            self.fail(node, f"graph output {x.name} is sharded in segments", x)
                        self.actions.append(("gather_output", x, s))
            else:
                if any(isinstance(self.P(x), Shard) for x in node.all_input_nodes):
                    self.fail(node, "a sharded value reaches a submodule call", *node.all_input_nodes)
                self.set(node, None)
        # every sharded parameter must only be read at its sites
        for node in self.gm.graph.nodes:
            name = _param_name(self.gm, node, self.canonical)
            if name in self.params:
                for u in node.users:
                    site = self.site_of.get(u)
                    if site is None or site.style == "replicate" or site.weight != name and site.bias != name:
                        self.fail(u, f"parameter {name} is sharded but also read here", )

    def site(self, node: torch.fx.Node, s: Site) -> None:
        if s.kind == "embedding":
            if s.style != "vocab":
                self.fail(node, f"{s.module}: an embedding can only be 'vocab' or 'replicate'")
            ids = node.args[1]
            if isinstance(self.P(ids), Shard):
                self.fail(node, "embedding indices are sharded", ids)
            self.shard_param(s.weight, self.vocab_shard(0, s.out_features), s, node)
            self.set(node, None)
            self.actions.append(("vocab_embedding", s))
            return
        x = node.args[1] if s.kind == "addmm" else node.args[0]
        xp = self.P(x)
        wdim_out, wdim_in = (1, 0) if s.kind == "addmm" else (0, 1)
        out_nd = _val(node).dim()
        if s.style in ("colwise", "vocab"):
            if isinstance(xp, Shard):
                self.fail(node, f"{s.module} is {s.style} but its input is already sharded ({xp.text()}); "
                          "its input must be replicated", x)
            if s.style == "colwise":
                shard = Shard(out_nd - 1, self.segments_after(node, s.out_features))
            else:
                shard = self.vocab_shard(out_nd - 1, s.out_features)
            self.shard_param(s.weight, shard.at(wdim_out), s, node)
            if s.bias:
                self.shard_param(s.bias, shard.at(0), s, node)
            self.place[node] = shard
            self.origin[node] = frozenset({s.module})
            self.actions.append(("colwise", s))
        elif s.style == "rowwise":
            nd = _val(x).dim()
            if not isinstance(xp, Shard) or xp.dim != nd - 1:
                what = "replicated" if xp is None else xp.text()
                self.fail(node, f"{s.module} is rowwise, so its input must be sharded on the last (feature) "
                          f"dimension, but it is {what}; make the layer(s) feeding it colwise", x)
            if xp.size is not None:
                self.fail(node, f"{s.module} reads a padded vocabulary dimension", x)
            self.shard_param(s.weight, xp.at(wdim_in), s, node)
            self.set(node, None, x)
            self.actions.append(("rowwise", s))
        else:
            raise InvariantError(f"unknown style {s.style!r}")

    def op(self, node: torch.fx.Node) -> None:  # noqa: C901  (one table of rules, read top to bottom)
        t, args = node.target, node.args
        ins = [x for x in node.all_input_nodes]
        sharded = [x for x in ins if isinstance(self.P(x), (Shard, list))]
        if not sharded:
            v = _val(node)
            self.set(node, [None] * len(v) if isinstance(v, (list, tuple)) else None)
            return
        x = args[0] if args else None
        s = self.P(x)
        if t is operator.getitem:
            if isinstance(s, list):
                self.set(node, s[args[1]], x)
                return
            self.fail(node, "indexing a sharded value", x)
        out = _val(node)
        if t in _VIEWS:
            self.set(node, self.reshape(node, x, s, list(args[1])), x)
            return
        if t is aten.expand.default:
            k = s.dim + (len(args[1]) - _val(x).dim())
            if args[1][k] != -1:
                self.patch_list(node, 1, k, s.local(self.tp))  # (padded shards: the local size too)
            self.set(node, s.at(k), x)
            return
        if t is aten.transpose.int:
            nd = _val(x).dim()
            d0, d1 = args[1] % nd, args[2] % nd
            dim = d1 if s.dim == d0 else d0 if s.dim == d1 else s.dim
            self.set(node, s.at(dim), x)
            return
        if t is aten.permute.default:
            dims = [d % _val(x).dim() for d in args[1]]
            self.set(node, s.at(dims.index(s.dim)), x)
            return
        if t is aten.t.default:
            self.set(node, s.at(1 - s.dim), x)
            return
        if t is aten.unsqueeze.default:
            d = args[1] % out.dim()
            self.set(node, s.at(s.dim + 1 if d <= s.dim else s.dim), x)
            return
        if t in (aten.squeeze.dim, aten.select.int):
            d = args[1] % _val(x).dim()
            if d == s.dim:
                self.fail(node, "selects along the sharded dimension", x)
            self.set(node, s.at(s.dim - 1 if d < s.dim else s.dim), x)
            return
        if t is aten.slice.Tensor:
            d = (args[1] if len(args) > 1 else 0) % _val(x).dim()
            if d == s.dim:
                self.fail(node, "slices along the sharded dimension", x)
            self.set(node, s, x)
            return
        if t in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
            nd = _val(x).dim()
            d = (args[2] if len(args) > 2 else node.kwargs.get("dim", 0)) % nd
            if d != s.dim:
                self.set(node, [s] * len(out), x)
                return
            if t is aten.chunk.default or s.size is not None:
                self.fail(node, "chunks the sharded dimension (use split), or splits a padded one", x)
            pieces, segs, i = [], list(s.segments), 0
            for v in out:
                need, got = int(v.shape[d]), []
                while need > 0 and i < len(segs):
                    got.append(segs[i]); need -= segs[i]; i += 1  # noqa: E702
                if need != 0:
                    self.fail(node, f"splits the sharded dimension into {[int(v.shape[d]) for v in out]}, "
                              f"across the segments {list(s.segments)} of the shard", x)
                pieces.append(Shard(d, tuple(got)))
            if t is aten.split.Tensor:
                self.patches.append((node, 1, int(args[1]) // self.tp))
            else:
                self.patches.append((node, 1, [p.local(self.tp) for p in pieces]))
            self.set(node, pieces, x)
            return
        if t is aten._assert_tensor_metadata.default:  # a dtype/device assertion: drop its shape parts
            for key in ("size", "stride"):
                if node.kwargs.get(key) is not None:
                    self.patches.append((node, key, None))
            self.set(node, None)
            return
        if t is aten.cat.default:
            d = (args[1] if len(args) > 1 else 0) % out.dim()
            ps = [self.P(y) for y in args[0]]
            s = ps[0]
            if not isinstance(s, Shard) or any(p != s for p in ps) or d == s.dim:
                self.fail(node, "concatenates differently placed values or along the sharded dimension",
                          *args[0])
            self.set(node, s, *args[0])
            return
        if t is aten.scaled_dot_product_attention.default:
            q, k, v = args[:3]
            ps = [self.P(y) for y in (q, k, v)]
            nd = _val(q).dim()
            if any(not isinstance(p, Shard) or p.dim != nd - 3 or len(p.segments) != 1 for p in ps):
                self.fail(node, "attention needs q, k and v all sharded on the heads dimension",
                          q, k, v)
            mask = args[3] if len(args) > 3 else node.kwargs.get("attn_mask")
            if isinstance(mask, torch.fx.Node):
                self.broadcast_input(node, mask, 3 if len(args) > 3 else "attn_mask", nd - 3, ps[0], nd)
            self.set(node, ps[0], q, k, v)
            return
        if t in _SOFTMAX:
            if args[1] % out.dim() == s.dim:
                self.fail(node, "softmax over the sharded dimension", x)
            self.set(node, s, x)
            return
        if t in _REDUCE:
            nd = _val(x).dim()
            dims = [d % nd for d in (args[1] if len(args) > 1 and args[1] is not None else range(nd))]
            keep = args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)
            if s.dim in dims:
                self.fail(node, "reduces over the sharded dimension", x)
            self.set(node, s.at(s.dim if keep else s.dim - sum(d < s.dim for d in dims)), x)
            return
        if t is aten.layer_norm.default:
            k = len(args[1])
            if s.dim >= _val(x).dim() - k:
                self.fail(node, "normalizes over the sharded dimension", x)
            if any(isinstance(self.P(y), Shard) for y in args[2:4]):
                self.fail(node, "norm weight is sharded", x)
            self.set(node, s, x)
            return
        if t in (aten.matmul.default, aten.bmm.default):
            a, b = args[0], args[1]
            pa, pb = self.P(a), self.P(b)
            na, nb = _val(a).dim(), _val(b).dim()
            if isinstance(pa, Shard) and isinstance(pb, Shard) and pa.dim < na - 2 and \
                    na - pa.dim == nb - pb.dim and pa.segments == pb.segments:
                self.set(node, pa.at(pa.dim + out.dim() - na), a, b)
                return
            if isinstance(pa, Shard) and pb is None and pa.dim < na - 1 and nb == 2:
                self.set(node, pa.at(pa.dim), a)  # x[..., k] @ W[k, n], W replicated
                return
            self.fail(node, "matrix product of sharded values that dsc cannot keep local", a, b)
        if t is aten.linear.default:  # replicated weight applied to a tensor sharded on a batch dim
            if isinstance(s, Shard) and s.dim < _val(x).dim() - 1 and not any(
                    isinstance(self.P(y), Shard) for y in args[1:]):
                self.set(node, s, x)
                return
            self.fail(node, "a replicated linear reads a tensor sharded on its feature dimension", x)
        if t is aten.cross_entropy_loss.default:
            self.cross_entropy(node)
            return
        if t in _SAME or (isinstance(t, torch._ops.OpOverload) and torch.Tag.pointwise in t.tags):
            self.pointwise(node)
            return
        self.fail(node, "no sharding rule for this op with a sharded input; replicate the module(s) "
                  "that shard it (tensor_parallel.rules)", *sharded)

    def reshape(self, node, x, s: Shard, sizes: list):
        a, b = _shape(x), _shape(node)
        groups = _groups(a, b)
        if groups is None:
            self.fail(node, f"cannot relate reshape {list(a)} -> {list(b)}", x)
        ga, gb = next(g for g in groups if s.dim in g[0])
        prefix = 1
        for d in ga:
            if d == s.dim:
                break
            prefix *= a[d]
        p = 1
        for k in gb:
            if p == prefix and b[k] > 1:
                if (len(s.segments) > 1 or s.size is not None) and b[k] != a[s.dim]:
                    self.fail(node, f"reshapes a dimension made of {len(s.segments)} segment(s) or padded "
                              f"({list(a)} -> {list(b)})", x)
                out = s.at(k) if b[k] == a[s.dim] else Shard(k, (b[k],))
                if out.size is None and any(g % self.tp for g in out.segments):
                    self.fail(node, f"reshape {list(a)} -> {list(b)}: dimension {k} of size {b[k]} (e.g. a head "
                              f"count) does not divide by tensor_parallel.size {self.tp}; {_would_work(b[k])}", x)
                if sizes[k] != -1:
                    self.patch_list(node, 1, k, out.local(self.tp))
                return out
            p *= b[k]
        self.fail(node, f"reshape {list(a)} -> {list(b)} splits the sharded dimension {s.dim} "
                  "in a way that is not a whole block per rank", x)

    def patch_list(self, node, index, k, value):
        self.patches.append((node, (index, k), value))

    def pointwise(self, node):
        out = _val(node)
        nd = out.dim() if isinstance(out, torch.Tensor) else 0
        tensors = [(i, y) for i, y in enumerate(node.args) if isinstance(y, torch.fx.Node)]
        tensors += [(k, y) for k, y in node.kwargs.items() if isinstance(y, torch.fx.Node)]
        ref = None
        for _, y in tensors:
            p = self.P(y)
            if isinstance(p, Shard):
                aligned = p.dim + nd - _val(y).dim()
                if ref is not None and (aligned != ref[0] or p.segments != ref[1].segments):
                    self.fail(node, "combines values sharded differently", *[y for _, y in tensors])
                ref = (aligned, p)
        dim, shard = ref
        for where, y in tensors:
            if self.P(y) is None and isinstance(_val(y), torch.Tensor):
                self.broadcast_input(node, y, where, dim, shard, nd)
        self.set(node, shard.at(dim), *[y for _, y in tensors])

    def broadcast_input(self, node, y, where, dim, shard: Shard, nd: int):
        """A replicated operand of a sharded op: fine where it broadcasts along the sharded
        dimension; otherwise this rank takes its slice of it."""
        v = _val(y)
        k = dim - (nd - v.dim())
        if k < 0 or v.shape[k] == 1:
            return
        if len(shard.segments) > 1 or shard.size is not None:
            self.fail(node, f"a replicated operand ({y.name}) would need a slice of a segmented or padded shard", y)
        self.actions.append(("slice_input", node, where, y, k, shard))

    def cross_entropy(self, node):
        logits, target = node.args[:2]
        s = self.P(logits)
        if not isinstance(s, Shard):
            self.fail(node, "cross-entropy targets are sharded", target)
        opts = dict(zip(("weight", "reduction", "ignore_index", "label_smoothing"), node.args[2:]))
        opts.update(node.kwargs)
        if isinstance(self.P(target), Shard):
            self.fail(node, "cross-entropy targets are sharded", target)
        if _val(logits).dim() != 2 or s.dim != 1 or len(s.segments) != 1:
            self.fail(node, "cross-entropy over logits sharded other than on the class dimension of [N, C]", logits)
        if opts.get("weight") is not None or opts.get("label_smoothing", 0.0) != 0.0:
            self.fail(node, "vocabulary-parallel cross-entropy supports no class weights or label smoothing", logits)
        self.actions.append(("cross_entropy", node, s, opts.get("reduction", 1), opts.get("ignore_index", -100)))
        self.set(node, None, logits)


def propagate(gm, dec: Decision, tp: int) -> _Propagation:
    """Placements for every node under `dec` (rank-independent); raises ShardingError."""
    prop = _Propagation(gm, dec, tp)
    prop.run()
    return prop


# -- apply ------------------------------------------------------------------------------------------


def _meta(t: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    return torch.empty(shape if shape is not None else t.shape, dtype=dtype or t.dtype, device="meta")


def _local_shape(v: torch.Tensor, s: Shard, tp: int) -> list[int]:
    shape = list(v.shape)
    shape[s.dim] = s.local(tp)
    return shape


def local_slice(t: torch.Tensor, s: Shard, tp: int, rank: int) -> torch.Tensor:
    """This rank's part of a whole tensor `t` placed as `s` (its part of every segment)."""
    if s.size is not None:  # padded: zero rows after the real ones
        pad = [0, 0] * (t.dim() - s.dim - 1) + [0, s.segments[0] - s.size]
        t = torch.nn.functional.pad(t, pad)
    parts, start = [], 0
    for seg in s.segments:
        n = seg // tp
        parts.append(t.narrow(s.dim, start + rank * n, n))
        start += seg
    return torch.cat(parts, s.dim) if len(parts) > 1 else parts[0]


def _apply(gm: torch.fx.GraphModule, prop: _Propagation, tp: int, rank: int, given: dict | None = None) -> dict:
    """Rewrite `gm` for this rank. `given` ({name: local parameter}) supplies the local parameters
    instead of slicing the whole ones (an eval graph shares the training graph's)."""
    graph = gm.graph
    canonical = prop.canonical
    # 1. parameters: register this rank's shard under every name that reads it
    for node in list(graph.nodes):
        name = _param_name(gm, node, canonical)
        if name in prop.params:
            s = prop.params[name]
            p = gm.get_parameter(node.target)
            if getattr(p, "_dsc_tp_local", False):
                new = p
            elif given and node.target in given:
                new = given[node.target]
                new._dsc_tp_local = True
            else:
                new = torch.nn.Parameter(local_slice(p.detach(), s, tp, rank).clone(), requires_grad=p.requires_grad)
                new._dsc_tp_local = True
            for n2 in graph.nodes:  # tied: same object under several names
                if n2.op == "get_attr" and _param_name(gm, n2, canonical) == name:
                    mod, _, attr = n2.target.rpartition(".")
                    owner = gm.get_submodule(mod) if mod else gm
                    if not getattr(getattr(owner, attr), "_dsc_tp_local", False):
                        setattr(owner, attr, new)
                    n2.meta["val"] = _meta(n2.meta["val"], new.shape)
    # 2. shape arguments
    for node, where, value in prop.patches:
        if isinstance(where, tuple):
            i, k = where
            seq = list(node.args[i])
            seq[k] = value
            node.update_arg(i, seq)
        elif isinstance(where, str):
            node.update_kwarg(where, value)
        else:
            node.update_arg(where, value)
    # 3. local shapes on every sharded node
    for node, s in prop.place.items():
        v = node.meta.get("val")
        if isinstance(s, Shard) and isinstance(v, torch.Tensor):
            node.meta["val"] = _meta(v, _local_shape(v, s, tp))
            node.meta["dsc.tp"] = s.text()
        elif isinstance(s, list) and isinstance(v, (list, tuple)):
            node.meta["val"] = [_meta(t, _local_shape(t, p, tp)) if isinstance(p, Shard) else t
                                for t, p in zip(v, s)]
    # 4. collectives and rewritten sites
    copies: dict[torch.fx.Node, torch.fx.Node] = {}
    counts = {"copy_to_tp": 0, "tp_all_reduce": 0, "vocab_parallel_cross_entropy": 0, "all_gather_dim": 0}
    dsc = torch.ops.dsc
    for action in prop.actions:
        kind = action[0]
        if kind == "colwise":
            s = action[1]
            node = s.node
            xi = 1 if s.kind == "addmm" else 0
            x = node.args[xi]
            if x not in copies:
                with graph.inserting_after(x):
                    c = graph.call_function(dsc.copy_to_tp.default, (x, GROUP, tp))
                c.meta["val"] = _meta(x.meta["val"])
                copies[x] = c
                counts["copy_to_tp"] += 1
            node.update_arg(xi, copies[x])
        elif kind == "rowwise":
            s = action[1]
            node = s.node
            v = node.meta["val"]
            with graph.inserting_before(node):
                if s.kind == "addmm":
                    y = graph.call_function(aten.mm.default, (node.args[1], node.args[2]))
                    bias = node.args[0]
                else:
                    y = graph.call_function(aten.linear.default, (node.args[0], node.args[1]))
                    bias = node.args[2] if len(node.args) > 2 else None
                y.meta["val"] = _meta(v)
                r = graph.call_function(dsc.tp_all_reduce.default, (y, GROUP, tp))
                r.meta["val"] = _meta(v)
                counts["tp_all_reduce"] += 1
                out = r
                if bias is not None:
                    out = graph.call_function(aten.add.Tensor, (r, bias))
                    out.meta["val"] = _meta(v)
            node.replace_all_uses_with(out)
            graph.erase_node(node)
        elif kind == "vocab_embedding":
            s = action[1]
            node = s.node
            w, ids = node.args[:2]
            pad = node.args[2] if len(node.args) > 2 else -1
            n = -(-s.out_features // tp)  # padded vocabularies: every rank holds the same row count
            lo, hi = rank * n, (rank + 1) * n
            v = node.meta["val"]
            iv = ids.meta["val"]
            with graph.inserting_before(node):
                below = graph.call_function(aten.lt.Scalar, (ids, lo))
                above = graph.call_function(aten.ge.Scalar, (ids, hi))
                outside = graph.call_function(aten.bitwise_or.Tensor, (below, above))
                shifted = graph.call_function(aten.sub.Tensor, (ids, lo))
                local = graph.call_function(aten.masked_fill.Scalar, (shifted, outside, 0))
                local_pad = pad - lo if pad is not None and lo <= pad < hi else -1
                emb = graph.call_function(aten.embedding.default, (w, local, local_pad, *node.args[3:]))
                mask = graph.call_function(aten.unsqueeze.default, (outside, -1))
                zeroed = graph.call_function(aten.masked_fill.Scalar, (emb, mask, 0.0))
                r = graph.call_function(dsc.tp_all_reduce.default, (zeroed, GROUP, tp))
            for m, val in ((below, _meta(iv, dtype=torch.bool)), (above, _meta(iv, dtype=torch.bool)),
                           (outside, _meta(iv, dtype=torch.bool)), (shifted, _meta(iv)), (local, _meta(iv)),
                           (emb, _meta(v)), (mask, _meta(iv, list(iv.shape) + [1], torch.bool)),
                           (zeroed, _meta(v)), (r, _meta(v))):
                m.meta["val"] = val
            counts["tp_all_reduce"] += 1
            node.replace_all_uses_with(r)
            graph.erase_node(node)
        elif kind == "cross_entropy":
            _, node, s, reduction, ignore = action
            logits, target = node.args[:2]
            n = s.segments[0] // tp
            with graph.inserting_before(node):
                vocab = s.size if s.size is not None else s.segments[0]
                per = graph.call_function(dsc.vocab_parallel_cross_entropy.default,
                                          (logits, target, rank * n, vocab, ignore, GROUP, tp))
                per.meta["val"] = _meta(target.meta["val"], dtype=torch.float32)
                if reduction == 0:
                    out = per
                else:
                    out = graph.call_function(aten.sum.default, (per,))
                    out.meta["val"] = _meta(node.meta["val"], dtype=torch.float32)
                    if reduction == 1:
                        keep = graph.call_function(aten.ne.Scalar, (target, ignore))
                        keep.meta["val"] = _meta(target.meta["val"], dtype=torch.bool)
                        count = graph.call_function(aten.sum.default, (keep,))
                        count.meta["val"] = _meta(node.meta["val"], dtype=torch.int64)
                        out2 = graph.call_function(aten.div.Tensor, (out, count))
                        out2.meta["val"] = _meta(node.meta["val"], dtype=torch.float32)
                        out = out2
                if node.meta["val"].dtype != torch.float32:
                    cast = graph.call_function(aten._to_copy.default, (out,), {"dtype": node.meta["val"].dtype})
                    cast.meta["val"] = _meta(node.meta["val"])
                    out = cast
            counts["vocab_parallel_cross_entropy"] += 1
            node.replace_all_uses_with(out)
            graph.erase_node(node)
        elif kind == "slice_input":
            _, node, where, y, k, shard = action
            n = shard.segments[0] // tp
            with graph.inserting_before(node):
                sl = graph.call_function(aten.narrow.default, (y, k, rank * n, n))
            shape = list(y.meta["val"].shape)
            shape[k] = n
            sl.meta["val"] = _meta(y.meta["val"], shape)
            if isinstance(where, int):
                node.update_arg(where, sl)
            else:
                node.update_kwarg(where, sl)
        elif kind == "gather_output":
            _, x, s = action
            out_node = next(n for n in graph.nodes if n.op == "output")
            shape = list(x.meta["val"].shape)
            shape[s.dim] *= tp
            with graph.inserting_before(out_node):
                g = graph.call_function(dsc.all_gather_dim.default, (x, s.dim, GROUP, tp))
                g.meta["val"] = _meta(x.meta["val"], shape)
                if s.size is not None:  # drop the padding columns
                    g = graph.call_function(aten.narrow.default, (g, s.dim, 0, s.size))
                    shape[s.dim] = s.size
                    g.meta["val"] = _meta(x.meta["val"], shape)
            out_node.args = torch.utils._pytree.tree_map(lambda a: g if a is x else a, out_node.args)
            counts["all_gather_dim"] += 1
    graph.lint()
    gm.recompile()
    return counts


def shard_tensor_parallel(gm: torch.fx.GraphModule, ctx: CompileContext) -> PassResult:
    """Decide a style per weight-reading module, propagate placements, and rewrite for this rank."""
    cfg = ctx.plan.tensor_parallel
    tp, rank = cfg.size, ctx.coords["tp"]
    modules = [n for n in gm.graph.nodes if n.op == "call_module" and not str(n.target).startswith("_guards")]
    if modules:
        raise ShardingError(modules[0],
                            "tensor parallelism needs an aten graph from torch.export; this model was "
                            "captured with symbolic_trace (see the capture notes for why export failed)")
    sites = find_sites(gm, gm.meta.get("dsc.module_prefix", ""))
    dec = decide(sites, cfg.rules)
    declined = []
    while True:
        try:
            prop = propagate(gm, dec, tp)
            break
        except ShardingError as err:
            culprits = set(err.origins) or {s.module for s in sites if s.node is err.node}
            if culprits & dec.explicit or not culprits:
                raise
            groups = [g for g in dec.groups if g & culprits]
            if not groups:
                raise
            for g in groups:
                dec.groups.remove(g)
                for s in sites:
                    if s.module in g and s.module not in dec.explicit:
                        s.style, s.why = "replicate", f"auto: declined ({err.reason} at node {err.node.name})"
                declined.append({"what": ", ".join(sorted(g)), "reason": f"replicated: {err}"})
    layout = {name: {"dim": s.dim, "segments": list(s.segments), "size": s.size} for name, s in prop.params.items()}
    table = {}
    for s in sites:
        table.setdefault(s.module, {"style": s.style, "kind": s.kind, "why": s.why,
                                    "params": [n for n in (s.weight, s.bias) if n]})
    counts = _apply(gm, prop, tp, rank, ctx.artifacts.get("tp_local_params"))
    ctx.artifacts["tp_layout"] = layout
    ctx.artifacts["tp_table"] = table
    n_sh = sum(1 for v in table.values() if v["style"] != "replicate")
    return PassResult(
        summary=(f"tp={tp}: {n_sh} of {len(table)} weight-reading modules sharded "
                 f"({sum(v['style'] == 'colwise' for v in table.values())} colwise, "
                 f"{sum(v['style'] == 'rowwise' for v in table.values())} rowwise, "
                 f"{sum(v['style'] == 'vocab' for v in table.values())} vocab); {len(layout)} parameters "
                 f"sharded; graph collectives: " + ", ".join(f"{k} x{v}" for k, v in counts.items() if v)),
        changed_graph=True,
        declined=declined,
        details={"modules": table, "sharded_params": layout, "collective_nodes": counts},
    )


def check_tensor_parallel(gm: torch.fx.GraphModule, ctx: CompileContext) -> None:
    """Every sharded parameter now has its local shape; every view's size matches its value."""
    tp = ctx.plan.tensor_parallel.size
    for name, info in ctx.artifacts["tp_layout"].items():
        p = gm.get_parameter(name) if _has(gm, name) else None
        if p is not None and p.shape[info["dim"]] != sum(s // tp for s in info["segments"]):
            raise InvariantError(f"parameter {name} has shape {tuple(p.shape)}, not its tp shard")


def _has(gm, name) -> bool:
    try:
        gm.get_parameter(name)
        return True
    except AttributeError:
        return False
