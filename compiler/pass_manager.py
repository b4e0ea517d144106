"""Runs passes in an order derived from what they provide and require, and records what each did.

A pass is a plain function `fn(gm, ctx) -> PassResult` plus a declaration (`Pass`): the facts it
provides, the facts it requires, the passes it conflicts with, and when the plan enables it. The
order is a topological sort of "B requires what A provides" (networkx), ties broken by the order
passes are listed in. After each pass the graph is linted and the pass's own invariant check runs,
so a broken invariant fails at the pass that broke it, naming it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import networkx as nx
import torch.fx

from .capture import debug_enabled, print_debug


class PassOrderError(RuntimeError):
    """The enabled passes cannot be ordered: a missing provider, a cycle or a conflict."""


class InvariantError(RuntimeError):
    """A pass left the graph in a state that breaks one of dsc's invariants."""


@dataclass
class CompileContext:
    """What a pass may read: the resolved plan and this rank's coordinates.

    Passes write their results into `artifacts` (keyed by what they provide), never into
    module-level state, so compiling rank 0 and rank 1 in one process cannot interfere.
    """

    plan: Any
    rank: int
    world_size: int
    coords: dict[str, int]
    example_args: tuple = ()
    example_kwargs: dict = field(default_factory=dict)
    optimizer_type: str | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassResult:
    """What a pass reports: a one-line summary, structured details, and what it declined."""

    summary: str
    changed_graph: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    declined: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Pass:
    """A pass declaration. `check(gm, ctx)` raises InvariantError if the pass broke something."""

    name: str
    fn: Callable[[torch.fx.GraphModule, CompileContext], PassResult]
    provides: frozenset[str] = frozenset()
    requires: frozenset[str] = frozenset()
    conflicts: frozenset[str] = frozenset()
    enabled: Callable[[Any], bool] = lambda plan: True
    check: Callable[[torch.fx.GraphModule, CompileContext], None] | None = None


def order_passes(passes: list[Pass], plan: Any) -> list[Pass]:
    """The enabled passes in dependency order. Raises PassOrderError naming the offending pass."""
    active = [p for p in passes if p.enabled(plan)]
    names = {p.name for p in active}
    for p in active:
        clash = p.conflicts & names
        if clash:
            raise PassOrderError(f"pass '{p.name}' conflicts with enabled pass(es) {sorted(clash)}")
    providers: dict[str, str] = {}
    for p in active:
        for fact in p.provides:
            providers[fact] = p.name
    g = nx.DiGraph()
    for i, p in enumerate(active):
        g.add_node(p.name, index=i)
    for p in active:
        for fact in p.requires:
            if fact not in providers:
                raise PassOrderError(
                    f"pass '{p.name}' requires '{fact}', which no enabled pass provides "
                    f"(enabled: {sorted(names)})"
                )
            g.add_edge(providers[fact], p.name)
    try:
        order = list(nx.lexicographical_topological_sort(g, key=lambda n: g.nodes[n]["index"]))
    except nx.NetworkXUnfeasible as exc:
        cycle = nx.find_cycle(g)
        raise PassOrderError(f"passes depend on each other in a cycle: {cycle}") from exc
    by_name = {p.name: p for p in active}
    return [by_name[n] for n in order]


def run_passes(
    gm: torch.fx.GraphModule, ctx: CompileContext, passes: list[Pass]
) -> tuple[torch.fx.GraphModule, list[dict[str, Any]]]:
    """Run the enabled passes in order; return the graph and one record per pass."""
    records = []
    for p in order_passes(passes, ctx.plan):
        if debug_enabled():
            print_debug(f"rank {ctx.rank}: graph before {p.name}:\n{gm.code}")
        t0 = time.perf_counter()
        result = p.fn(gm, ctx)
        seconds = time.perf_counter() - t0
        gm.graph.lint()
        if p.check is not None:
            try:
                p.check(gm, ctx)
            except InvariantError as exc:
                raise InvariantError(f"after pass '{p.name}' (rank {ctx.rank}): {exc}") from exc
        if result.changed_graph:
            gm.recompile()
        if debug_enabled():
            after = f":\n{gm.code}" if result.changed_graph else " (graph unchanged)"
            print_debug(f"rank {ctx.rank}: after {p.name}: {result.summary}{after}")
        records.append(
            {
                "name": p.name,
                "summary": result.summary,
                "changed_graph": result.changed_graph,
                "seconds": round(seconds, 4),
                "details": result.details,
                "declined": result.declined,
            }
        )
    return gm, records
