"""The C/OpenMP backend: jinja2 template -> C source -> shared library (cached) -> ctypes call.

Kernels take raw pointers and sizes (a plain C ABI: no torch headers, so a kernel compiles in a
fraction of a second). Arithmetic is fp32; storage is fp32 or bf16 (`dtype` picks the template's
load/store helpers). Vectorized exp/erf/tanh with measured error bounds live in
templates/common.h.j2.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import jinja2
import torch

from . import cache

TEMPLATES = Path(__file__).with_name("templates")
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC",
         "-std=gnu11"]
DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16"}

_env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                          trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
_libs: dict[str, ctypes.CDLL] = {}


def available() -> tuple[bool, str]:
    """(usable, why not): the CPU backend needs a C compiler with OpenMP."""
    if os.environ.get("DSC_NO_CC"):
        return False, "DSC_NO_CC is set"
    cc = cache.find_compiler()
    return (True, cc) if cc else (False, "no C compiler (cc/gcc/clang) on PATH")


def nt_bytes() -> int:
    """Outputs of at least this many bytes are written with streaming stores (common.h.j2);
    `DSC_NT_BYTES` overrides the default of 8 MiB (tests set 0 to take that path at small sizes)."""
    return int(os.environ.get("DSC_NT_BYTES", 8 << 20))


def pairs() -> bool:
    """bf16 rows of even length are processed two elements per 32-bit word (common.h.j2);
    `DSC_BF16_PAIRS=0` turns that off (tests compare the two paths)."""
    return os.environ.get("DSC_BF16_PAIRS", "1").lower() not in ("0", "false", "no", "off")


def render(template: str, **params) -> str:
    return _env.get_template(template).render(nt_bytes=nt_bytes(), pairs=pairs(), **params)


def template_sources() -> str:
    """Every template's text (part of the cache key: editing a template rebuilds its kernels)."""
    return "".join(p.read_text() for p in sorted(TEMPLATES.glob("*.j2")))


def compile_kernel(source: str, symbol: str):
    """(ctypes function, library path, source path) for `symbol` in `source`, cached on disk."""
    cc = cache.find_compiler()
    if cc is None:
        raise cache.CompileError("no C compiler found")
    lib_path, src_path, _ = cache.build(source, cc, FLAGS)
    lib = _libs.get(str(lib_path))
    if lib is None:
        lib = _libs[str(lib_path)] = ctypes.CDLL(str(lib_path))
    fn = getattr(lib, symbol)
    fn.restype = None
    return fn, lib_path, src_path


HUGE_PAGE = 2 << 20
_madvise = None


def huge_pages() -> bool:
    """Whether `empty` asks for transparent huge pages; `DSC_THP=0` turns that off."""
    return os.environ.get("DSC_THP", "1").lower() not in ("0", "false", "no", "off")


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """A new CPU tensor for a kernel's output. Outputs of two huge pages or more are advised
    MADV_HUGEPAGE (the 2 MiB-aligned part of them) before anything touches them: a fresh buffer is
    otherwise faulted in 4 KiB at a time, and with autograd on every call gets a fresh one.
    Measured on the 2-core CI machine (THP in `madvise` mode, as on most distributions), a new
    8192x1024 fp32 buffer plus a copy into it: 9.7 ms in 4 KiB pages, 4.6 ms advised (the copy into
    a warm buffer: 1.7 ms). torch does the same for all its allocations with THP_MEM_ALLOC_ENABLE=1.
    The advice acts on pages not yet touched: a fresh mapping (glibc maps large allocations anew)
    gets huge pages, reused heap memory keeps its small ones. Where the advice is refused (THP
    off, not Linux) the buffer is simply used as it is."""
    global _madvise
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if nbytes < 2 * HUGE_PAGE or not huge_pages():
        return t
    if _madvise is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).madvise
            fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
            _madvise = fn
        except (OSError, AttributeError):
            _madvise = False
    if _madvise:
        lo = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE
        hi = (t.data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE
        if hi > lo:
            _madvise(lo, hi - lo, 14)  # MADV_HUGEPAGE; a refusal (-1) changes nothing
    return t


def ptr(t: torch.Tensor | None) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)
