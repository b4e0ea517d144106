"""One rank of a parity run, launched by torchrun (`dsc run`). Trains each requested ZeRO stage
from the same seed and writes losses and final parameters (rank 0) to --out.

    dsc run --nproc 2 tests/dist_worker.py --model gpt --stages 0,1,2 --out result.pt
    dsc run --nproc 2 tests/dist_worker.py --model gpt,hf_llama --out results.pt   # {model: ...}
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import dsc  # noqa: E402
from models import MODELS, add_parallel_args, dataset, join_job, loss_of, rank_micro_batches  # noqa: E402


def plan_for(stage: int, args) -> dict:
    return {
        "zero": {"stage": stage, "reduce_bucket_size": args.bucket, "overlap_comm": args.overlap,
                 "reduce_scatter": not args.all_reduce, "allgather_bucket_size": args.allgather_bucket,
                 "prefetch_bucket_size": args.bucket, "param_persistence_threshold": 100,
                 "max_live_parameters": args.max_live},
        "optimizer": {"type": "adamw", "lr": args.lr, "weight_decay": 0.1, "betas": [0.9, 0.95]},
        "scheduler": {"type": "WarmupLR", "warmup_min_lr": 0.0, "warmup_max_lr": args.lr,
                      "warmup_num_steps": 3, "warmup_type": "linear"},
        "batch": {"micro_batch_size": args.micro, "gradient_accumulation_steps": args.gas},
        "gradient_clipping": args.clip,
        "precision": {"dtype": args.precision, "grad_accum_dtype": args.grad_accum},
        "tensor_parallel": {"size": args.tp},
        "fusion": {"enabled": args.fusion},
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gpt")
    p.add_argument("--stages", default="0,1,2,3")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--micro", type=int, default=2)
    p.add_argument("--gas", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--clip", type=float, default=0.5)
    p.add_argument("--bucket", type=int, default=3000)
    p.add_argument("--overlap", action="store_true")
    p.add_argument("--max-live", type=int, default=1_000_000_000, help="zero.max_live_parameters")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--grad-accum", default="fp32", choices=["fp32", "bf16", "fp16"], help="precision.grad_accum_dtype")
    p.add_argument("--all-reduce", action="store_true", help="zero.reduce_scatter = false")
    p.add_argument("--allgather-bucket", type=int, default=500_000_000)
    p.add_argument("--fusion", action="store_true", help="fusion.enabled (generated kernels)")
    p.add_argument("--eval-stages", default="all",
                   help="stages whose eval graph is checked against train mode ('all', 'none' or a list): "
                        "each costs one more capture per rank")
    add_parallel_args(p)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rank, world, dp_rank, dp = join_job(args)
    models = args.model.split(",")  # several: one launch trains each in turn ({model: results})
    out = {m: train(args, m, rank, world, dp_rank, dp) for m in models}
    if rank == 0:
        torch.save(out if len(models) > 1 else out[models[0]], args.out)
    dsc.runtime.mesh.shutdown()


def train(args, model_name: str, rank: int, world: int, dp_rank: int, dp: int) -> dict:
    build, batch = MODELS[model_name]
    gb = args.micro * args.gas * dp
    data = dataset(args.steps, gb)
    results = {}
    for stage in [int(s) for s in args.stages.split(",")]:
        model = build()
        first = rank_micro_batches(data, 0, gb, dp_rank, dp, args.gas)[0]
        a, kw = batch(first)
        compiled = dsc.compile(model, plan_for(stage, args), example_inputs=(a, kw))
        losses = []
        dsc.runtime.collectives.traffic.clear()
        prefetch0 = dict(dsc.runtime.collectives.prefetch_stats)
        shm0 = dict(dsc.runtime.shm.stats)
        for step in range(args.steps):
            total = torch.zeros(())
            for micro in rank_micro_batches(data, step, gb, dp_rank, dp, args.gas):
                a, kw = batch(micro)
                loss = loss_of(compiled(*a, **kw))
                compiled.backward(loss)
                compiled.step()
                total += loss.detach() / args.gas
            dist.all_reduce(total)
            losses.append(float(total) / world)
        traffic = dict(dsc.runtime.collectives.traffic)
        eval_gap = None
        if args.eval_stages == "all" or str(stage) in args.eval_stages.split(","):
            with torch.no_grad():  # eval mode runs a separately captured (sharded, gathered) graph on the same weights
                compiled.eval()
                got = loss_of(compiled(*a, **kw))
                compiled.train()
                want = loss_of(compiled(*a, **kw))
            eval_gap = abs(float(got) - float(want))
        state = compiled.full_state_dict()
        report = compiled.report()
        layout = report["ranks"][0]
        buckets = next(p for p in report["passes"] if p["name"] == "plan_zero_buckets")["details"]["buckets"]
        results[stage] = {"losses": losses, "state": state, "memory": compiled.memory_bytes(),
                          "analytic": layout["memory"], "lr": compiled.get_lr(), "skipped": compiled.engine.skipped_steps,
                          "scale": compiled.engine.scaler.cur_scale,
                          "numel": sum(p.numel() for p in model.parameters() if p.numel()) if stage < 3 and args.tp == 1
                          else sum(b["elements"] for b in buckets),
                          "padded": sum(b["padded"] for b in buckets), "buckets": len(buckets),
                          "traffic": traffic, "eval_gap": eval_gap,
                          "prefetch": {k: v - prefetch0[k] for k, v in dsc.runtime.collectives.prefetch_stats.items()},
                          "shm": {k: v - shm0[k] for k, v in dsc.runtime.shm.stats.items()},
                          "kernel_calls": {k: dict(v.calls) for k, v in dsc.passes.fusion.KERNELS.items()}, "collectives": layout["collectives"], "report": report}
        # every rank must hold the same full parameters after the all-gather
        flat = torch.cat([v.reshape(-1).float() for v in state.values()])
        ref = flat.clone()
        dist.broadcast(ref, 0)
        if not torch.equal(flat, ref):
            sizes = [v.numel() for v in state.values()]
            bad = [k for k, a, b in zip(state, flat.split(sizes), ref.split(sizes)) if not torch.equal(a, b)]
            raise AssertionError(f"rank {rank}: parameters differ from rank 0 after stage {stage}: {bad}")
        all_mem = [None] * world
        dist.all_gather_object(all_mem, results[stage]["memory"])
        results[stage]["memory_all_ranks"] = all_mem
        del compiled
    return results


if __name__ == "__main__":
    main()
