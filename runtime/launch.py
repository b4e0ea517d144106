"""`dsc run`: launch a script on N local ranks through torchrun's own launcher (torch.distributed.run).

torchrun's command line parses the script's arguments too, and argparse's prefix matching makes a
script flag such as `--start` fail as an ambiguous abbreviation of torchrun's `--start-method`. So
dsc builds torchrun's arguments for the launcher options only and hands the script's arguments
over untouched.
"""

from __future__ import annotations

import ctypes
import os
import socket
import sys

# glibc's malloc serves blocks of 32 MiB or more (after its dynamic threshold has grown to them)
# with fresh mmap()s and gives freed ones back to the kernel, and trims the heap's free top above
# twice that. A training step frees its activations and gradients and allocates the same sizes
# again: every new buffer is then faulted in page by page. Measured forward + backward of one
# 8192x1024 fp32 norm on a 2-core VM: LayerNorm eager 58-66 ms -> 13-15, dsc 34-36 -> 11-14;
# RMSNorm eager 214-229 -> 46-48, dsc 33-36 -> 11-12 (benchmarks/README.md). These settings keep
# freed memory in the process for reuse (the process's resident size stays at its peak, as a
# caching allocator's does): `dsc run` sets them for its ranks unless the environment already has
# them or `--keep-freed-memory off` is given; `keep_freed_memory()` does it within a process.
MALLOC_KEEP = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)


def keep_freed_memory() -> bool:
    """Within this process, from now on: glibc serves allocations of up to 1 GiB from its heap and
    does not give freed memory back to the kernel, so that a training loop reuses pages already
    mapped instead of faulting in new ones (what MALLOC_KEEP does for `dsc run`'s ranks). Returns
    whether glibc accepted both settings (False on other C libraries: nothing changes)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    kept = bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30))
    return bool(mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)) and kept  # both set, whatever the first returned


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, script_args: list[str], nproc: int, nnodes: int = 1, master_addr: str = "127.0.0.1",
           master_port: int = 0, keep_memory: bool = True) -> int:
    """Run `script` on `nproc` processes; returns the job's exit code (non-zero if any rank failed).
    `keep_memory`: the ranks' glibc keeps freed memory for reuse (MALLOC_KEEP), unless the
    environment sets those variables itself."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if keep_memory:
        for key, value in MALLOC_KEEP.items():
            os.environ.setdefault(key, value)
    args = get_args_parser().parse_args([f"--nproc-per-node={nproc}", f"--nnodes={nnodes}",
                                         f"--master-addr={master_addr}",
                                         f"--master-port={master_port or free_port()}", script])
    args.training_script_args = list(script_args)
    try:
        run(args)
    except ChildFailedError as err:
        codes = [f.exitcode for f in err.failures.values()]
        print(f"dsc run: {len(codes)} rank(s) failed (exit codes {codes}); the others were stopped",
              file=sys.stderr)
        return next((c for c in codes if c > 0), 1)
    return 0
