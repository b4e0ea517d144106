"""Rank 1 fails after joining; rank 0 waits in a collective. The job must end, not hang."""

import sys
import time

import torch
import torch.distributed as dist

import dsc

dsc.runtime.mesh.init_distributed(timeout_s=60)
if dist.get_rank() == 1:
    time.sleep(1)
    raise RuntimeError("rank 1 fails on purpose")
dist.all_reduce(torch.ones(1))  # never completes: rank 1 is gone
sys.exit(0)
