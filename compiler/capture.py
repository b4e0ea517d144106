"""Capture a model into a torch.fx GraphModule of aten ops.

Strategy (DESIGN.md, "The IR"): `torch.export` in non-strict mode, training IR, then the
unlifted module `ep.module()`. It trains under autograd, keeps parameter names (the parameters
are the model's own objects, not copies) and each node's `meta["nn_module_stack"]` names the
module it came from. `torch.fx.symbolic_trace` is kept as a fallback for simple models.

When both fail, `CaptureError` names the innermost module of the model that was executing, the
source line, every strategy tried with its error, and what to do about it.
"""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
import torch.nn as nn


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
        ep = torch.export.export(model, tuple(args), kwargs, strict=False)
        gm = ep.module()
        return Captured(gm, "torch.export (non-strict)", time.perf_counter() - t0, notes, model.training)
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
