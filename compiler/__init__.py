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
    else:  # a submodule (dsc.runtime, dsc.passes, ...), loaded with the compiler, as an eager
        importlib.import_module(".api", __name__)  # import would: dsc.runtime.mesh then exists too
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_FROM))
