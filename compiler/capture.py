"""Capture a model into a torch.fx GraphModule of aten ops.

Strategy (DESIGN.md, "The IR"): `torch.export` in non-strict mode, training IR, then the
unlifted module `ep.module()`. It trains under autograd, keeps parameter names (the parameters
are the model's own objects, not copies) and each node's `meta["nn_module_stack"]` names the
module it came from. `torch.fx.symbolic_trace` is kept as a fallback for simple models.

When both fail, `CaptureError` names the innermost module of the model that was executing, the
source line, every strategy tried with its error, and what to do about it.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn as nn
import torch.utils._pytree as pytree


class CaptureError(RuntimeError):
    """The model could not be captured into a graph by any strategy."""


@dataclass
class Captured:
    """A captured graph plus how it was obtained."""

    gm: torch.fx.GraphModule
    strategy: str
    seconds: float
    notes: list[str] = field(default_factory=list)
    training: bool = True
    check: "InputCheck | None" = None  # what the graph was specialised to (torch.export only)


class InputCheck:
    """Checks a call's inputs against what the captured graph was specialised to: every tensor's
    shape and every non-tensor argument's value, as torch.export's guards do. Export bakes sizes
    into view and expand arguments and constants into ops, so a call that differs would fail deep
    in the graph or, worse, run with the example's values.

    It replaces the guard function `ExportedProgram.module()` puts into the graph: that one costs
    ~12 us a call (it enters a dynamo config patch each time), more than a small fused kernel, and
    its error ("Guard failed: x.size()[0] == 64") names neither the argument nor what to do. Calls
    with positional arguments only take a fast path (a shape comparison each: ~0.5-1 us per argument)."""

    def __init__(self, fn, args: tuple, kwargs: dict):
        self.names = _arg_names(fn, len(args))
        self.args = [_expect(a) for a in args]
        self.flat = all(not isinstance(a, (list, tuple, dict)) for a in args) and not kwargs
        leaves, self.spec = pytree.tree_flatten_with_path((tuple(args), dict(sorted(kwargs.items()))))
        self.leaves = [(path, _expect(v)) for path, v in leaves]

    def __call__(self, args: tuple, kwargs: dict) -> None:
        if self.flat and not kwargs and len(args) == len(self.args):
            for i, (a, e) in enumerate(zip(args, self.args)):
                if not _matches(a, e):
                    self._fail(self.names[i], e, a)
            return
        leaves, spec = pytree.tree_flatten_with_path((tuple(args), dict(sorted(kwargs.items()))))
        if spec != self.spec:
            raise ValueError(
                f"this model was compiled for calls shaped like its example inputs ({_describe(self.spec)}); "
                f"this call passes {_describe(spec)}. Call it the same way, or compile again with example "
                "inputs that look like this call.")
        for (path, a), (_, e) in zip(leaves, self.leaves):
            if not _matches(a, e):
                self._fail(_path_name(path, self.names), e, a)

    @staticmethod
    def _fail(name: str, expected, got) -> None:
        def show(v):
            if isinstance(v, torch.Tensor):
                return f"a tensor of shape {tuple(v.shape)}"
            if isinstance(v, torch.Size):
                return f"a tensor of shape {tuple(v)}"
            return repr(v)
        raise ValueError(
            f"input {name} is {show(got)}, but this model was compiled for {show(expected)}. The compiled "
            "graph is specialised to the example inputs' shapes and values (sizes are baked into its ops); "
            "compile again with example inputs shaped like this call (a second ds.compile of the same model "
            "works), or pad the input to the compiled shape.")


def _expect(v):
    return torch.Size(v.shape) if isinstance(v, torch.Tensor) else v


def _matches(a, e) -> bool:
    """Input `a` is what the graph was specialised to: `e`, a shape (tensors) or a value."""
    if isinstance(e, torch.Size):
        return isinstance(a, torch.Tensor) and a.shape == e
    return not isinstance(a, torch.Tensor) and _same(a, e)


def _same(a, e) -> bool:
    """The same value: 2 and 2.0 are (export's guard compares with ==), True and 1 are not."""
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, e))
    try:
        return (numbers or type(a) is type(e)) and bool(a == e)
    except Exception:  # noqa: BLE001 - an object without a usable ==: compare identity
        return a is e


def _arg_names(fn, n: int) -> list[str]:
    try:
        params = [p.name for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return [f"'{params[i]}'" if i < len(params) else f"#{i}" for i in range(n)]


def _path_name(path, names: list[str]) -> str:
    """A leaf's place in (args, kwargs), named the way the user wrote the call."""
    first, *rest = path[1:]
    head = names[first.idx] if path[0].idx == 0 and first.idx < len(names) else \
        (f"'{first.key}'" if hasattr(first, "key") else f"#{getattr(first, 'idx', '?')}")
    return head + pytree.keystr(tuple(rest))


def _describe(spec) -> str:
    args, kwargs = (spec.child(0), spec.child(1)) if hasattr(spec, "child") else spec.children_specs
    n_args, kw = args.num_children, kwargs.context
    return f"{n_args} positional argument{'s' if n_args != 1 else ''}" + (f" and keywords {list(kw)}" if kw else "")


def capture(model: nn.Module, args: tuple = (), kwargs: dict | None = None) -> Captured:
    """Capture `model` called as `model(*args, **kwargs)` into a GraphModule.

    Captures in the model's current train/eval mode (dropout and batch-norm behaviour are baked
    into the graph). Hugging Face models with `config.use_cache=True` return a KV cache object
    that is not a tensor; capture turns the cache off (training does not use it) and says so.
    """
    kwargs = dict(kwargs or {})
    notes: list[str] = []
    cfg = getattr(model, "config", None)
    if cfg is not None and getattr(cfg, "use_cache", False):
        cfg.use_cache = False
        notes.append("set model.config.use_cache=False: the KV cache is not a tensor and training does not use it")

    errors: list[tuple[str, BaseException]] = []
    t0 = time.perf_counter()
    try:
        with _stack_traces(debug_enabled()):
            ep = torch.export.export(model, tuple(args), kwargs, strict=False)
        try:
            gm = ep.module(check_guards=False)  # InputCheck does the guards' work, cheaper
        except TypeError:  # torch before 2.9: no guard function to leave out
            gm = ep.module()
        return Captured(gm, "torch.export (non-strict)", time.perf_counter() - t0, notes, model.training,
                        InputCheck(model.forward, tuple(args), kwargs))
    except Exception as exc:  # noqa: BLE001 - every failure is reported below
        errors.append(("torch.export (non-strict)", exc))

    t0 = time.perf_counter()
    try:
        gm = torch.fx.symbolic_trace(model)
        gm(*args, **kwargs)  # a symbolic trace can succeed yet produce a graph that does not run
        notes.append("torch.export failed; fell back to torch.fx.symbolic_trace (module-level graph)")
        return Captured(gm, "torch.fx.symbolic_trace", time.perf_counter() - t0, notes, model.training)
    except Exception as exc:  # noqa: BLE001
        errors.append(("torch.fx.symbolic_trace", exc))

    raise CaptureError(_explain(model, errors)) from errors[0][1]


@contextlib.contextmanager
def _stack_traces(record: bool):
    """Whether export records each node's Python stack (`node.meta["stack_trace"]`) while it traces.
    Recording extracts and symbolizes a traceback per traced op: 10-20% of a 2-layer model's capture
    and ~27% at 8 layers (benchmarks/bench_capture.py: transformers' Llama, 664 nodes, 1.67 -> 1.22 s
    a capture, medians of alternating runs). Nothing in dsc needs them: errors name the node and its
    module (`nn_module_stack`, which export keeps), and `DSC_DEBUG=1` records them again for the
    source line of each node."""
    config = torch.fx.config
    before = getattr(config, "do_not_emit_stack_traces", None)
    if before is None:  # a torch without the switch records them
        yield
        return
    config.do_not_emit_stack_traces = not record
    try:
        yield
    finally:
        config.do_not_emit_stack_traces = before


def _explain(model: nn.Module, errors: list[tuple[str, BaseException]]) -> str:
    """Say which module and source line broke capture, what was tried, and the way out."""
    names = {id(m): n or "<root>" for n, m in model.named_modules()}
    where = "an unknown place"
    module_name = None
    for frame, lineno in traceback.walk_tb(errors[0][1].__traceback__):
        obj = frame.f_locals.get("self")
        if obj is not None and id(obj) in names:
            module_name = f"{names[id(obj)]} ({type(obj).__name__})"
            where = f"{frame.f_code.co_filename}:{lineno} in {frame.f_code.co_name}"
    lines = [f"dsc could not capture {type(model).__name__} into a graph."]
    if module_name:
        lines.append(f"  module: {module_name}")
    lines.append(f"  source: {where}")
    lines.append("  strategies tried:")
    for name, exc in errors:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        lines.append(f"    - {name}: {type(exc).__name__}: {first[:300]}")
    lines.append(
        "  way out: data-dependent Python control flow (if/for on tensor values, .item(), "
        "torch.where-indexing) cannot be captured; rewrite it with tensor ops (torch.where, "
        "masking), move it out of forward, or pass example inputs that match real ones. "
        "Set DSC_DEBUG=1 for the full traceback."
    )
    return "\n".join(lines)


def call_args(example_inputs: Any) -> tuple[tuple, dict]:
    """Normalise example inputs: a tuple of positional args, a dict of kwargs, or one tensor."""
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, list):
        example_inputs = tuple(example_inputs)
    if (
        isinstance(example_inputs, tuple)
        and len(example_inputs) == 2
        and isinstance(example_inputs[0], tuple)
        and isinstance(example_inputs[1], dict)
    ):
        return example_inputs[0], example_inputs[1]
    return tuple(example_inputs), {}


def debug_enabled() -> bool:
    """`DSC_DEBUG=1` turns on graph dumps around each pass and full tracebacks."""
    import os

    return os.environ.get("DSC_DEBUG", "") not in ("", "0")


def print_debug(msg: str) -> None:
    if debug_enabled():
        print(f"[dsc] {msg}", file=sys.stderr)
