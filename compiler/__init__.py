"""dsc: compile a PyTorch model and a declarative plan into per-rank programs.

    import dsc as ds
    compiled = ds.compile(model, "plan.json", example_inputs=(x, y))

Attributes load on first use (PEP 562): `dsc run` and the other light CLI commands start without
importing the compiler (about 0.7 s of imports on every launch).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

__all__ = ["compile", "CompiledModel", "CaptureError", "__version__"]
_FROM = {"compile": "api", "CompiledModel": "api", "CaptureError": "capture"}


def __getattr__(name: str):
    if name in _FROM:
        value = getattr(importlib.import_module(f".{_FROM[name]}", __name__), name)
    else:  # a submodule (dsc.runtime, dsc.passes, ...)
        from ._lazy import submodules

        value = submodules(__name__)(name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_FROM))
