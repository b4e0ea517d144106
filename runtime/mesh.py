"""Process groups: initialise torch.distributed the way torchrun expects, and build the mesh.

dsc adds no transport: ranks talk through torch.distributed (gloo on CPU, NCCL on GPU), arranged
on a `DeviceMesh` whose dimensions are named after the parallelism that uses them ("dp", "tp";
"pp", "ep" later). A timeout bounds every collective, so a rank that dies cannot leave the
others waiting forever (torchrun also tears the whole job down when one worker exits non-zero).
"""

from __future__ import annotations

import datetime
import gc
import os

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 300


def device_type() -> str:
    """'cuda' when this process has a GPU and torch was built with NCCL, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() and dist.is_nccl_available() else "cpu"


def init_distributed(timeout_s: float | None = None) -> bool:
    """Join the job torchrun started (RANK/WORLD_SIZE/MASTER_ADDR in the environment).

    Returns True when a process group exists afterwards. Does nothing outside torchrun or when a
    group already exists. `DSC_TIMEOUT` (seconds) overrides the default collective timeout.
    """
    if dist.is_initialized():
        return True
    if not all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return False  # not launched by torchrun: a single process
    timeout = float(timeout_s or os.environ.get("DSC_TIMEOUT", DEFAULT_TIMEOUT_S))
    backend = "nccl" if device_type() == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
    return True


def build_mesh(dp: int, tp: int = 1) -> dict[str, object]:
    """This rank's process groups on the ("dp", "tp") mesh: {"dp": group, "tp": group}.

    Tensor-parallel ranks are adjacent (rank = dp_index * tp + tp_index), as in Megatron and
    torchtitan, so a tensor-parallel group stays on one host when hosts hold consecutive ranks.
    Groups are None in a single process.
    """
    if not dist.is_initialized():
        if dp * tp != 1:
            raise RuntimeError(f"the plan asks for {dp * tp} ranks (data_parallel_size={dp} x "
                               f"tensor_parallel.size={tp}) but no process group exists; launch with "
                               f"`dsc run --nproc {dp * tp} script.py` (torchrun)")
        return {"dp": None, "tp": None}
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type(), (dp, tp), mesh_dim_names=("dp", "tp"))
    return {"dp": mesh.get_group("dp"), "tp": mesh.get_group("tp")}


def data_parallel_group(dp: int):
    """The process group of this rank's data-parallel replicas (None in a single process)."""
    return build_mesh(dp)["dp"]


def shutdown() -> None:
    """Leave the job cleanly: wait for every rank, then destroy the process groups.

    Destroying while a peer still has gloo work in flight, or exiting without destroying, can
    abort the process at interpreter teardown ("terminate called without an active exception").
    """
    if dist.is_initialized():
        gc.collect()  # release tensors and work objects that reference gloo while the group lives
        dist.barrier()
        from dsc.runtime import shm

        shm.reset()
        dist.destroy_process_group()
