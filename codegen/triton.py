"""The Triton backend: jinja2 template -> a Python module of @triton.jit kernels (cached on disk,
imported once per process). Runs on CUDA tensors, or on CPU tensors under `TRITON_INTERPRET=1`
(Triton's interpreter: slow, for correctness tests on machines without a GPU)."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys

from . import cache
from .cpu import render  # one jinja2 environment for both backends

_modules: dict[str, object] = {}


def available(device_type: str = "cpu") -> tuple[bool, str]:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed (pip install 'dsc[gpu]')"
    if device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return True, "triton"
    return False, "no GPU for Triton (set TRITON_INTERPRET=1 to run its kernels on CPU, slowly)"


def load(source: str):
    """(module with `launch`, source path) for a rendered Triton source, cached by content."""
    key = hashlib.sha256(source.encode()).hexdigest()[:20]
    path = cache.cache_dir() / f"t_{key}.py"
    if not path.exists():
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        tmp.write_text(source)
        os.replace(tmp, path)
        cache.stats["compiles"] += 1
    else:
        cache.stats["hits"] += 1
    mod = _modules.get(key)
    if mod is None:
        spec = importlib.util.spec_from_file_location(f"dsc_triton_{key}", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # triton.jit reads the source through the module
        spec.loader.exec_module(mod)
        _modules[key] = mod
    return mod, path


__all__ = ["available", "load", "render"]
