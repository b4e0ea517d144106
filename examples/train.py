"""Train the example GPT data-parallel with dsc. Run on 2 ranks:

    dsc run --nproc 2 examples/train.py --config examples/plan.json --steps 10

Each rank reads its own slice of every global batch (micro_batch_size x accumulation steps
rows per rank); the loss printed is the mean over all ranks. Works with a DeepSpeed
ds_config.json too (--config examples/ds_config.json), ZeRO-3 + bf16
(--config examples/plan_zero3_bf16.json), and sharded checkpoints:

    dsc run --nproc 2 examples/train.py --steps 10 --checkpoint ckpt
    dsc run --nproc 4 examples/train.py --steps 10 --resume ckpt   # resumes at step 10 on 4 ranks

Tensor parallelism (tp=2 inside each of 2 data-parallel replicas, ZeRO-1 over dp):

    dsc run --nproc 4 examples/train.py --config examples/plan_tp.json --steps 10
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dsc  # noqa: E402
from gpt import GPTConfig, build_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "plan.json"),
                    help="dsc plan or DeepSpeed ds_config.json")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps")
    ap.add_argument("--seq", type=int, default=32, help="sequence length")
    ap.add_argument("--save", help="write the trained full state_dict here (rank 0)")
    ap.add_argument("--checkpoint", help="save a sharded checkpoint here at the end (every rank)")
    ap.add_argument("--resume", help="load this sharded checkpoint before training (any world size)")
    args = ap.parse_args()

    model = build_model()
    plan_probe = dsc.schemas.load_plan(args.config, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    micro, gas = plan_probe.batch.micro_batch_size, plan_probe.batch.gradient_accumulation_steps
    g = torch.Generator().manual_seed(1234)  # every rank draws the same global batches
    def global_batch():
        """Learnable toy data: each row counts up from a random start by a random stride (1-3)."""
        rows = plan_probe.batch.train_batch_size
        start = torch.randint(0, GPTConfig.vocab_size, (rows, 1), generator=g)
        stride = torch.randint(1, 4, (rows, 1), generator=g)
        idx = (start + stride * torch.arange(args.seq + 1)) % GPTConfig.vocab_size
        return idx[:, :-1].contiguous(), idx[:, 1:].contiguous()

    x, y = global_batch()
    compiled = dsc.compile(model, args.config, example_inputs=(x[:micro], y[:micro]))
    rank, world = compiled.rank, compiled.world_size
    tp = compiled.plan.tensor_parallel.size  # tensor-parallel ranks (adjacent) share a batch
    dp, dp_rank = world // tp, rank // tp
    first = 0
    if args.resume:
        compiled.load_checkpoint(args.resume)
        first = compiled.global_steps
        for _ in range(first):  # skip the batches already trained on
            global_batch()
    if rank == 0:
        print(compiled.explain(), flush=True)
        print(f"\ntraining {args.steps} steps on {world} rank(s): micro {micro} x accumulation {gas} x dp {dp}"
              + (f" (x tp {tp})" if tp > 1 else ""), flush=True)
    for step in range(first, first + args.steps):
        t0 = time.perf_counter()
        x, y = global_batch()
        mine = slice(dp_rank * micro * gas, (dp_rank + 1) * micro * gas)
        total = torch.zeros(())
        for xm, ym in zip(x[mine].split(micro), y[mine].split(micro)):
            loss = compiled(xm, ym)
            compiled.backward(loss)
            compiled.step()
            total += loss.detach() / gas
        if dist.is_initialized():
            dist.all_reduce(total)
        if rank == 0:
            print(f"step {step + 1:>3}  loss {float(total) / world:.4f}  lr {compiled.get_lr()[0]:.2e}  "
                  f"grad-norm {compiled.engine.last_grad_norm:.3f}  {time.perf_counter() - t0:.2f} s", flush=True)
    if args.checkpoint:
        compiled.save_checkpoint(args.checkpoint)
        if rank == 0:
            print(f"checkpoint saved in {args.checkpoint} (step {compiled.global_steps})", flush=True)
    state = compiled.full_state_dict()  # every rank joins (ZeRO-3 gathers the shards)
    if args.save and rank == 0:
        torch.save(state, args.save)
    dsc.runtime.mesh.shutdown()


if __name__ == "__main__":
    main()
