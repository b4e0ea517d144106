"""Multi-process behaviour: collective ops on real ranks, and failure without hanging."""

from __future__ import annotations

import subprocess
import time

import pytest

from helpers import ROOT, TESTS, dsc_cmd, dsc_run


@pytest.mark.parametrize("world", [2, 4])
def test_collective_ops_values_shapes_and_gradients(world):
    out = dsc_run(world, TESTS / "collectives_worker.py")
    assert out.stdout.count("collectives ok") == world


def test_a_failing_rank_does_not_hang_the_others():
    t0 = time.monotonic()
    proc = subprocess.run([*dsc_cmd(), "run", "--nproc", "2", str(TESTS / "failing_worker.py")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in proc.stderr + proc.stdout
    assert elapsed < 60, f"the job took {elapsed:.0f} s to end after a rank failed"
