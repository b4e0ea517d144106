"""One rank of a checkpoint test: optionally load, train some steps, optionally save; rank 0
writes the full parameters to --out. The global batch is 4 rows per step on any world size."""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import dsc  # noqa: E402
from models import MODELS, add_parallel_args, dataset, join_job, loss_of, rank_micro_batches  # noqa: E402

GLOBAL = 4


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="hf_llama")
    p.add_argument("--stage", type=int, required=True)
    p.add_argument("--start", type=int, default=0, help="first step index (data position)")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--load")
    p.add_argument("--save")
    p.add_argument("--save-after", type=int, help="save after this many of the steps, then train on (default: all)")
    add_parallel_args(p)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    _, _, rank, world = join_job(args)  # data-parallel coordinates: tp ranks share a batch
    build, batch = MODELS[args.model]
    data = dataset(args.start + args.steps + 1, GLOBAL)
    plan = {"zero": {"stage": args.stage, "reduce_bucket_size": 3000, "prefetch_bucket_size": 3000,
                     "param_persistence_threshold": 100},
            "optimizer": {"type": "adamw", "lr": 1e-2, "weight_decay": 0.1},
            "scheduler": {"type": "WarmupLR", "warmup_num_steps": 4, "warmup_max_lr": 1e-2, "warmup_type": "linear"},
            "batch": {"train_batch_size": GLOBAL}, "gradient_clipping": 0.5,
            "tensor_parallel": {"size": args.tp}}
    a, kw = batch(rank_micro_batches(data, 0, GLOBAL, rank, world, 1)[0])
    compiled = dsc.compile(build(), plan, example_inputs=(a, kw))
    if args.load:
        compiled.load_checkpoint(args.load)
        assert compiled.global_steps == args.start, (compiled.global_steps, args.start)
    saved = None

    def save():  # --save-after: one run gives both the checkpoint and the uninterrupted run
        nonlocal saved
        compiled.save_checkpoint(args.save)
        saved = compiled.full_state_dict()

    for i, step in enumerate(range(args.start, args.start + args.steps)):
        if args.save and i == args.save_after:
            save()
        for micro in rank_micro_batches(data, step, GLOBAL, rank, world, 1):
            a, kw = batch(micro)
            compiled.backward(loss_of(compiled(*a, **kw)))
            compiled.step()
    if args.save and saved is None:  # --save-after unset (or = --steps): save at the end
        save()
    state = compiled.full_state_dict()
    if dist.get_rank() == 0:
        torch.save({"state": state, "saved": saved, "lr": compiled.get_lr(), "steps": compiled.global_steps}, args.out)
    del compiled
    dsc.runtime.mesh.shutdown()


if __name__ == "__main__":
    main()
