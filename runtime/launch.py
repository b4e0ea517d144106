"""`dsc run`: launch a script on N local ranks through torchrun's own launcher (torch.distributed.run).

torchrun's command line parses the script's arguments too, and argparse's prefix matching makes a
script flag such as `--start` fail as an ambiguous abbreviation of torchrun's `--start-method`. So
dsc builds torchrun's arguments for the launcher options only and hands the script's arguments
over untouched.
"""

from __future__ import annotations

import os
import socket
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, script_args: list[str], nproc: int, nnodes: int = 1, master_addr: str = "127.0.0.1",
           master_port: int = 0) -> int:
    """Run `script` on `nproc` processes; returns the job's exit code (non-zero if any rank failed)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
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
