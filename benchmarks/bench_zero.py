"""Sharded data-parallel benchmark: DDP vs FSDP2 vs dsc ZeRO-1/2/3 (vs DeepSpeed ZeRO-3 when installed).

Every contender trains the same small GPT (examples/gpt.py, ~7.5M parameters by default) from the
same seed on the same token batches, on N ranks (gloo, 1 torch thread per rank), with fp32 AdamW
(torch's fused AdamW wherever a torch optimizer is used, as in bench_dp.py):

    ddp         torch DistributedDataParallel (the baseline)
    fsdp2       torch FSDP2: fully_shard(block, reshard_after_forward=True) for every transformer
                block, then fully_shard(root), on init_device_mesh("cpu", (N,))
    dsc-z1/z2   dsc.compile(model, {"zero": {"stage": 1|2, ...}})   (same code path as bench_dp.py)
    dsc-z3      dsc.compile(model, {"zero": {"stage": 3, "prefetch_bucket_size": B,
                                             "param_persistence_threshold": T}})
    dsc-z3-overlap  the same with "overlap_comm": true: each gather is prefetched one bucket ahead
                (forward along the graph's order, backward along its reverse)
    ds-z3       deepspeed.initialize(..., zero_optimization stage 3) -- only if deepspeed imports
                (in this interpreter, or in the one given by --ds-python)

The bucket size B (--bucket, elements) is the same for every contender that has such a knob:
DDP bucket_cap_mb = 4B/MiB; dsc reduce/allgather/prefetch bucket = B; DeepSpeed
reduce_bucket_size = stage3_prefetch_bucket_size = B. FSDP2 has none (one gather per
fully_shard unit). The ZeRO-3 persistence threshold T (--persistence, default 0: every parameter
is re-gathered) is the same for dsc and DeepSpeed.

Measured per contender, each in its own torchrun job (see bench_dp.py, whose helpers this reuses):
median step time and its ratio to DDP and to FSDP2; per-rank params/grads/optimizer-state bytes
from the live tensors (FSDP2: the local shards of the DTensor parameters, their gradients and the
optimizer state) read between backward and the optimizer step of the last warm-up step, their
sum ("model-state") and that sum as a multiple of Psi/N bytes (Psi = parameter count, N = ranks;
fp32 AdamW: DDP 16N, ZeRO-1 4N+12, ZeRO-2 2N+14, ZeRO-3 16); dsc ZeRO-3's gathered_peak_bytes
(the most whole-bucket bytes alive at once); peak RSS; the final loss.

Run (either form; the second re-launches each contender under torchrun with --nproc ranks):
    dsc run --nproc 2 benchmarks/bench_zero.py --steps 20
    python benchmarks/bench_zero.py [--only ddp,fsdp2,dsc-z3] [--persistence 100000] [--json]
"""

from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_dp  # noqa: E402  (also puts examples/ on sys.path)
from bench_dp import MiB, nbytes, opt_state  # noqa: E402

CONTENDERS = ["ddp", "fsdp2", "dsc-z1", "dsc-z2", "dsc-z3", "dsc-z3-overlap", "ds-z3"]


def parse_args(argv=None):
    p = bench_dp.build_parser(__doc__, CONTENDERS)
    p.add_argument("--persistence", type=int, default=0,
                   help="ZeRO-3 param_persistence_threshold for dsc and DeepSpeed (elements)")
    return p.parse_args(argv)


ADAMW = dict(lr=None, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def _local(t):
    """The local tensor of a DTensor (FSDP2 shard), else t itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def setup(name, args, model, x, y):
    """(fwd_bwd, step, memory() -> {params,grads,optimizer}_bytes [+ gathered_peak_bytes], finish)."""
    import torch
    import torch.distributed as dist

    adamw = {**ADAMW, "lr": args.lr}
    if name in ("ddp", "dsc-z1", "dsc-z2", "dsc-z3", "dsc-z3-overlap"):  # bench_dp.py's setup covers every dsc stage
        return bench_dp.setup(name, args, model, x, y)
    finish = lambda: (dist.barrier(), dist.destroy_process_group())  # noqa: E731
    if name == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, reshard_after_forward=True)
        return bench_dp.torch_contender(model, model, torch.optim.AdamW(model.parameters(), **adamw, fused=True),
                                        local=_local)
    if name == "ds-z3":

        zero = {"stage": 3, "reduce_bucket_size": args.bucket, "stage3_prefetch_bucket_size": args.bucket,
                "stage3_param_persistence_threshold": args.persistence}
        engine, dopt, fwd_bwd = bench_dp.deepspeed_engine(args, model, zero)

        def mem():
            # ZeRO-3 keeps: each param's partition (p.ds_tensor, views of fp16_partitioned_groups_flat),
            # an fp32 partition copy the optimizer updates, gradient partitions (+ its ipg bucket).
            params = list(model.parameters())
            inner = getattr(dopt, "optimizer", dopt)
            ps = [p.data for p in params] + [getattr(p, "ds_tensor", None) for p in params]
            for attr in ("fp16_partitioned_groups_flat", "fp32_partitioned_groups_flat"):
                ps += list(getattr(dopt, attr, None) or [])
            lp = getattr(dopt, "lp_param_buffer", None)
            ps += [lp] if torch.is_tensor(lp) else []
            gs = [p.grad for p in params] + [p.grad for p in getattr(dopt, "fp32_partitioned_groups_flat", [])]
            gs.append(getattr(dopt, "grad_partitions_flat_buffer", None))
            gs.append(getattr(dopt, "_DeepSpeedZeroOptimizer_Stage3__ipg_bucket_flat_buffer", None))
            for g in (getattr(dopt, "averaged_gradients", None) or {}).values():
                gs += list(g or [])
            return dict(params_bytes=nbytes(ps), grads_bytes=nbytes(gs), optimizer_bytes=nbytes(opt_state(inner)))

        return fwd_bwd, engine.step, mem, finish
    raise SystemExit(f"unknown contender {name!r}; choose from {','.join(CONTENDERS)}")


def worker(args) -> None:
    bench_dp.worker(args, setup)


# -- parent: one torchrun job per contender, then the table -----------------------------------------
def launch(name, python, nproc, argv) -> dict | None:
    return bench_dp.launch(name, python, nproc, argv, script=__file__)


def table(results) -> str:
    base = {n: next((r["median_step_s"] for r in results if r["name"] == n), None) for n in ("ddp", "fsdp2")}
    head = ["name", "median step s", "vs DDP", "vs FSDP2", "params MiB", "grads MiB", "optim MiB",
            "model-state MiB", "x Psi/N", "gathered peak MiB", "peak RSS MiB", "final loss"]
    rows = [head]
    for r in results:
        t = r["median_step_s"]
        rows.append([r["name"], f"{t:.3f}",
                     *(f"{t / base[n]:.2f}x" if base[n] else "-" for n in ("ddp", "fsdp2")),
                     *(f"{r[k] / MiB:.1f}" for k in ("params_bytes", "grads_bytes", "optimizer_bytes",
                                                      "model_state_bytes")),
                     f"{r['psi_over_n']:.1f}",
                     f"{r['gathered_peak_bytes'] / MiB:.1f}" if r.get("gathered_peak_bytes") is not None else "-",
                     f"{r['peak_rss_bytes'] / MiB:.0f}", f"{r['final_loss']:.4f}"])
    return bench_dp.format_table(rows)


def parent(args, argv) -> int:
    results, names, nproc = bench_dp.run_contenders(args, argv, CONTENDERS, launch, ds_fallback="/tmp/dsvenv/bin/python")
    r0 = results[0] if results else {}
    bench_dp.print_results(args, results, f"GPT {r0.get('num_params', 0) / 1e6:.2f}M params (Psi), {nproc} ranks x "
                           f"micro-batch {args.micro} x seq {args.seq}, fp32 AdamW, {args.warmup} warm-up + "
                           f"{args.steps} timed steps, bucket {args.bucket:,} elements, ZeRO-3 persistence threshold "
                           f"{args.persistence:,}; MiB are per rank (rank 0); x Psi/N = model-state bytes * N / Psi",
                           table)
    return 0 if len(results) == len(names) else 1


def main() -> int:
    return bench_dp.main(parse_args, worker, parent)


if __name__ == "__main__":
    sys.exit(main())
