"""On-disk cache of compiled kernels.

A kernel is stored under the SHA-256 of everything that determines the binary: the rendered source,
the compiler command and flags, and the compiler's version string. Building writes to a file unique
to the process and renames it into place (`os.replace` is atomic on POSIX), so two ranks compiling
the same kernel at once both end with a complete library and never read a half-written one.

The cache lives in `$DSC_CACHE_DIR` (default `~/.cache/dsc/kernels`). `stats` counts hits and
compiler runs in this process (tests use it to prove a second compile calls no compiler).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

stats = {"hits": 0, "compiles": 0}


def cache_dir() -> Path:
    d = Path(os.environ.get("DSC_CACHE_DIR") or Path.home() / ".cache" / "dsc" / "kernels")
    d.mkdir(parents=True, exist_ok=True)
    return d


@lru_cache(maxsize=None)
def compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def find_compiler() -> str | None:
    """The C compiler to use: $CC, else cc/gcc/clang on PATH; None when there is none."""
    for cc in filter(None, (os.environ.get("CC"), "cc", "gcc", "clang")):
        if shutil.which(cc) and compiler_version(cc):
            return cc
    return None


class CompileError(RuntimeError):
    """The C compiler rejected a generated kernel (the message holds its output)."""


def build(source: str, cc: str, flags: list[str], suffix: str = ".so") -> tuple[Path, Path, str]:
    """(library path, source path, key) for `source`, compiled once per distinct key."""
    key = hashlib.sha256("\0".join([source, cc, *flags, compiler_version(cc)]).encode()).hexdigest()[:20]
    root = cache_dir()
    lib, src = root / f"k_{key}{suffix}", root / f"k_{key}.c"
    if lib.exists():
        stats["hits"] += 1
        return lib, src, key
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        tsrc = Path(tmp) / "kernel.c"
        tsrc.write_text(source)
        tlib = Path(tmp) / f"kernel{suffix}"
        proc = subprocess.run([cc, *flags, str(tsrc), "-o", str(tlib)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise CompileError(f"{cc} failed on kernel {key}:\n{proc.stderr[-4000:]}")
        stats["compiles"] += 1
        os.replace(tsrc, src)  # the source first: a library in place always has its source beside it
        os.replace(tlib, lib)
    return lib, src, key
