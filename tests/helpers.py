"""Shared test helpers: launching real ranks the way users do (`dsc run`, i.e. torchrun)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


def dsc_cmd() -> list[str]:
    """The `dsc` command of the installed package (falls back to `python -m dsc`)."""
    exe = Path(sys.executable).with_name("dsc")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "dsc"]


def dsc_run(nproc: int, script: str | Path, *args: str, timeout: float = 300,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Launch `script` on `nproc` gloo ranks with `dsc run` (`env`: more environment variables);
    fail the test with the output on error."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DSC_TIMEOUT="120", PYTHONWARNINGS="ignore", **(env or {}))
    proc = subprocess.run([*dsc_cmd(), "run", "--nproc", str(nproc), str(script), *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise AssertionError(f"dsc run --nproc {nproc} {script} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc
