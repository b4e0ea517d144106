"""Tensor-parallel benchmark: torch DTensor `parallelize_module` vs dsc tensor parallelism.

Every contender trains the same transformers Llama (built from a config with random weights:
grouped-query attention, SwiGLU MLP, RMSNorm, rotary embeddings) from the same seed on the same
token batches, on N ranks that all see the same batch (one tensor-parallel group of N), with fp32
AdamW and the loss computed inside the model (labels given):

    replicated   every rank runs the plain eager model (no communication): the no-TP baseline
    dtensor      torch's parallelize_module with torchtitan's hand-written Llama plan: q/k/v and
                 gate/up ColwiseParallel, o/down RowwiseParallel, per decoder layer; embedding and
                 LM head replicated
    dsc          dsc.compile with tensor_parallel.rules set to the same plan (embedding and LM
                 head replicated), decided per module by pattern
    dsc-auto     dsc.compile with rules "auto": the same layers found from the graph, plus a
                 vocabulary-parallel embedding, LM head and cross-entropy

Measured per contender, each in its own torchrun job: median step time (forward + backward +
optimizer step, barriers around each step) and its ratio to dtensor; per-rank params/grads/
optimizer-state bytes from the live tensors (DTensor: the local shards) after backward of the last
warm-up step; peak RSS; the final loss (the same model and data, so every row should agree).

Run (either form):
    dsc run --nproc 2 benchmarks/bench_tp.py --steps 10
    python benchmarks/bench_tp.py [--only dtensor,dsc] [--json] [--hidden 512 --layers 4 ...]
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_dp  # noqa: E402
from bench_dp import MARK, MiB, nbytes, opt_state  # noqa: E402

CONTENDERS = ["replicated", "dtensor", "dsc", "dsc-auto"]
LAYER_PLAN = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
              "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
              "mlp.down_proj": "rowwise"}


def parse_args(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--nproc", type=int, default=2, help="ranks = tensor-parallel size")
    p.add_argument("--micro", type=int, default=4, help="batch size (the same on every rank)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--only", default="", help="comma-separated subset of " + ",".join(CONTENDERS))
    p.add_argument("--json", action="store_true", help="print results as JSON lines")
    p.add_argument("--ds-python", default="", help=argparse.SUPPRESS)  # bench_dp.run_contenders reads it
    p.add_argument("--contender", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate,
                      vocab_size=args.vocab, max_position_embeddings=args.seq, use_cache=False,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def batches(args, n):
    import torch

    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(n):
        idx = torch.randint(0, args.vocab, (args.micro, args.seq + 1), generator=g)
        out.append({"input_ids": idx[:, :-1].contiguous(), "labels": idx[:, 1:].contiguous()})
    return out


def setup(name, args, model, batch):
    """(fwd_bwd(batch) -> loss, step(), memory() -> bytes dict)."""
    import torch
    import torch.distributed as dist

    adamw = dict(lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    if name in ("replicated", "dtensor"):
        local = lambda t: t  # noqa: E731
        if name == "dtensor":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

            mesh = init_device_mesh("cpu", (dist.get_world_size(),))
            styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
            for layer in model.model.layers:
                parallelize_module(layer, mesh, {k: styles[v]() for k, v in LAYER_PLAN.items()})
            local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
        params = list(model.parameters())
        # foreach kernels refuse a mix of DTensor and plain tensors: one optimizer for each kind
        kinds = [[p for p in params if hasattr(p, "to_local") == d] for d in (True, False)]
        opts = [torch.optim.AdamW(ps, **adamw, foreach=True) for ps in kinds if ps]

        def fwd_bwd(b):
            loss = model(**b).loss
            loss.backward()
            return loss

        def step():
            for opt in opts:
                opt.step()
                opt.zero_grad(set_to_none=False)

        mem = lambda: dict(params_bytes=nbytes(local(p) for p in params),  # noqa: E731
                           grads_bytes=nbytes(local(p.grad) for p in params if p.grad is not None),
                           optimizer_bytes=nbytes(local(v) for opt in opts for v in opt_state(opt)))
        return fwd_bwd, step, mem
    import dsc

    rules = "auto" if name == "dsc-auto" else {"model.embed_tokens": "replicate", "lm_head": "replicate",
                                                **{f"model.layers.*.{k}": v for k, v in LAYER_PLAN.items()}}
    plan = {"tensor_parallel": {"size": dist.get_world_size(), "rules": rules},
            "optimizer": {"type": "adamw", **{k: list(v) if k == "betas" else v for k, v in adamw.items()}},
            "batch": {"micro_batch_size": args.micro}}
    compiled = dsc.compile(model, plan, example_inputs=batch)

    def fwd_bwd(b):
        loss = compiled(**b).loss
        compiled.backward(loss)
        return loss

    return fwd_bwd, compiled.step, compiled.memory_bytes


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = batches(args, args.warmup + args.steps)
    model = build(args)
    n_params = sum(p.numel() for p in model.parameters())
    fwd_bwd, step, mem = setup(args.contender, args, model, data[0])
    times, m = [], None
    for i, b in enumerate(data):
        dist.barrier()
        t0 = time.perf_counter()
        loss = fwd_bwd(b)
        if i == args.warmup - 1:
            m = dict(mem())
        step()
        dist.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    final = loss.detach()
    final = float(final.full_tensor() if hasattr(final, "full_tensor") else final)
    res = {"name": args.contender, "world": world, "num_params": n_params, "median_step_s": statistics.median(times),
           "step_s": times, "final_loss": final, **m, "model_state_bytes": sum(m.values()),
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    per_rank = [None] * world
    dist.all_gather_object(per_rank, res)
    if rank == 0:
        res["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in per_rank)
        print(MARK + json.dumps(res), flush=True)
    import dsc.runtime.mesh

    dsc.runtime.mesh.shutdown()


def launch(name, python, nproc, argv) -> dict | None:
    return bench_dp.launch(name, python, nproc, argv, script=__file__)


def table(results) -> str:
    base = next((r["median_step_s"] for r in results if r["name"] == "dtensor"), None)
    rows = [["name", "median step s", "vs dtensor", "params MiB", "grads MiB", "optim MiB", "model-state MiB",
             "peak RSS MiB", "final loss"]]
    for r in results:
        t = r["median_step_s"]
        rows.append([r["name"], f"{t:.3f}", f"{t / base:.2f}x" if base else "-",
                     *(f"{r[k] / MiB:.1f}" for k in ("params_bytes", "grads_bytes", "optimizer_bytes",
                                                      "model_state_bytes", "peak_rss_bytes")),
                     f"{r['final_loss']:.4f}"])
    return bench_dp.format_table(rows)


def parent(args, argv) -> int:
    results, names, nproc = bench_dp.run_contenders(args, argv, CONTENDERS, launch)
    r0 = results[0] if results else {}
    bench_dp.print_results(args, results, f"Llama {r0.get('num_params', 0) / 1e6:.2f}M params, tp={nproc} "
                           f"(every rank the same batch {args.micro} x seq {args.seq}), fp32 AdamW, "
                           f"{args.warmup} warm-up + {args.steps} timed steps; MiB per rank (rank 0)", table)
    return 0 if len(results) == len(names) else 1


def main() -> int:
    return bench_dp.main(parse_args, worker, parent)


if __name__ == "__main__":
    sys.exit(main())
