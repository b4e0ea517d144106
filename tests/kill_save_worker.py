"""Saves a checkpoint, trains a step, then is SIGKILLed in the middle of saving a second one
(after its shards are written through torch.distributed.checkpoint, before the checkpoint is
committed)."""

from __future__ import annotations

import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import dsc  # noqa: E402
from dsc.runtime import checkpoint as ckpt  # noqa: E402
from models import dataset, gpt, gpt_batch  # noqa: E402

directory, out = sys.argv[1], sys.argv[2]
dsc.runtime.mesh.init_distributed()
(x, y), _ = gpt_batch(dataset(1, 2))
compiled = dsc.compile(gpt(), {"zero": {"stage": 2}, "optimizer": {"type": "adamw", "lr": 1e-2}},
                       example_inputs=(x, y))
compiled.backward(compiled(x, y))
compiled.step()
compiled.save_checkpoint(directory, tag="good")
if compiled.rank == 0:
    torch.save(compiled.full_state_dict(), out)
compiled.backward(compiled(x, y))
compiled.step()
real_write = ckpt._write_shards


def write_then_die(state, folder):
    real_write(state, folder)
    os.kill(os.getpid(), signal.SIGKILL)  # a real kill, mid-checkpoint: shards written, nothing committed


ckpt._write_shards = write_then_die
compiled.save_checkpoint(directory, tag="bad")
