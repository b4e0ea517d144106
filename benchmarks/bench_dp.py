"""Data-parallel benchmark: torch DDP vs dsc ZeRO-0/1/2 (vs DeepSpeed ZeRO-0/1/2 when installed).

Every contender trains the same small GPT (examples/gpt.py, ~7.5M parameters by default) from the
same seed on the same token batches, on N ranks (gloo, 1 torch thread per rank), with AdamW:

    ddp          torch DistributedDataParallel + torch.optim.AdamW (the baseline)
    dsc-z0/1/2   dsc.compile(model, {"zero": {"stage": s}, ...}); dsc-z2-overlap adds overlap_comm
    ds-z0/1/2    deepspeed.initialize(..., optimizer=torch.optim.AdamW) -- only if deepspeed imports
                 (in this interpreter, or in the one given by --ds-python)

Measured per contender, each in its own torchrun job (so peak RSS is that contender's alone):
  - median step time over --steps timed steps (forward + backward + optimizer step, with a
    dist.barrier() before and after each step) after --warmup untimed steps, and its ratio to DDP;
  - per-rank bytes of params / grads / optimizer state from the live tensors, read in the last
    warm-up step between backward and the optimizer step (gradients and optimizer state both
    exist then). dsc: compiled.memory_bytes(); DDP: params, p.grad, optimizer.state; DeepSpeed:
    params plus its fp32 partition copy ("params"), p.grad and its gradient partitions/buffers,
    optimizer.state. "model-state" is their sum;
  - "live": every distinct tensor storage Python can reach at that point (gc walk). Storage held
    only from C++ is missed, e.g. DDP's gradient buckets (another copy of the grads);
  - peak RSS (ru_maxrss, max over ranks, process lifetime: includes import and compile);
  - final loss (mean over ranks of the last step), to show all contenders trained the same thing.

Run (either form; the second re-launches itself under `dsc run --nproc 2`):
    dsc run --nproc 2 benchmarks/bench_dp.py --steps 20
    python benchmarks/bench_dp.py [--only ddp,dsc-z2] [--json] [--n-layer 6 --n-embd 320 ...]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
CONTENDERS = ["ddp", "dsc-z0", "dsc-z1", "dsc-z2", "dsc-z2-overlap", "ds-z0", "ds-z1", "ds-z2"]
MARK = "BENCH_RESULT "
MiB = 2**20


def build_parser(doc: str = __doc__, contenders=CONTENDERS) -> argparse.ArgumentParser:
    """The options both benchmarks share (bench_zero adds --persistence)."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    p.add_argument("--nproc", type=int, default=2, help="ranks (when launched with plain python)")
    p.add_argument("--micro", type=int, default=4, help="micro-batch size per rank")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=320)
    p.add_argument("--n-head", type=int, default=5)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--bucket", type=int, default=2_000_000,
                   help="bucket in elements, the same for all (DDP: bucket_cap_mb = 4*bucket/MiB; dsc: "
                        "reduce/allgather/prefetch_bucket_size; DeepSpeed: reduce_bucket_size and "
                        "stage3_prefetch_bucket_size)")
    p.add_argument("--only", default="", help="comma-separated subset of " + ",".join(contenders))
    p.add_argument("--ds-python", default="", help="python with deepspeed installed (for ds-*); bench_zero "
                   "also tries /tmp/dsvenv/bin/python")
    p.add_argument("--json", action="store_true", help="print results as JSON lines")
    p.add_argument("--contender", default="", help=argparse.SUPPRESS)  # internal: worker mode
    return p


def parse_args(argv=None):
    return build_parser().parse_args(argv)


# -- one contender, on one rank ---------------------------------------------------------------------
def batches(args, rank, world, n):
    """n steps of (x, y) for this rank: windows of a repeated random text, so the loss can fall."""
    import torch

    g = torch.Generator().manual_seed(1234)
    text = torch.randint(0, 257, (997,), generator=g).repeat(4)
    out = []
    for _ in range(n):
        starts = torch.randint(0, text.numel() - args.seq - 1, (args.micro * world,), generator=g)
        idx = torch.stack([text[s: s + args.seq + 1] for s in starts.tolist()])
        mine = idx[rank * args.micro: (rank + 1) * args.micro]
        out.append((mine[:, :-1].contiguous(), mine[:, 1:].contiguous()))
    return out


def nbytes(tensors) -> int:
    seen = {}
    for t in tensors:
        if t is not None and t.numel() and t.device.type != "meta":
            try:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            except RuntimeError:  # FakeTensors kept by captured graphs hold no memory
                pass
    return sum(seen.values())


def live_tensor_bytes() -> int:
    import torch

    gc.collect()
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        return nbytes(o for o in gc.get_objects() if isinstance(o, torch.Tensor))


def opt_state(opt):
    return [v for s in opt.state.values() for v in s.values() if hasattr(v, "untyped_storage")]


def torch_contender(forward, model, opt, local=lambda t: t):
    """(fwd_bwd, step, memory, finish) for a plain torch wrapper (DDP, FSDP2) and a torch optimizer.
    `local` maps a parameter, gradient or state tensor to this rank's part (DTensor.to_local)."""
    import torch.distributed as dist

    def fwd_bwd(x, y):
        loss = forward(x, y)
        loss.backward()
        return loss

    def step():
        opt.step()
        opt.zero_grad(set_to_none=False)

    params = list(model.parameters())
    mem = lambda: dict(params_bytes=nbytes(local(p) for p in params),  # noqa: E731
                       grads_bytes=nbytes(local(p.grad) for p in params if p.grad is not None),
                       optimizer_bytes=nbytes(local(v) for v in opt_state(opt)))
    return fwd_bwd, step, mem, lambda: (dist.barrier(), dist.destroy_process_group())


def deepspeed_engine(args, model, zero: dict):
    """(engine, its optimizer, fwd_bwd) for DeepSpeed with the given zero_optimization section."""
    import deepspeed
    import torch

    cfg = {"train_micro_batch_size_per_gpu": args.micro, "gradient_accumulation_steps": 1,
           "zero_optimization": zero, "zero_allow_untested_optimizer": True,
           "gradient_clipping": 0.0, "steps_per_print": 10**9}
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01,
                            fused=True)
    engine, dopt, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)

    def fwd_bwd(x, y):
        loss = engine(x, y)
        engine.backward(loss)
        return loss

    return engine, dopt, fwd_bwd


def setup(name, args, model, x, y):
    """(fwd_bwd(x, y) -> loss, step(), memory() -> {params,grads,optimizer}_bytes, finish()) for `name`."""
    import torch
    import torch.distributed as dist

    adamw = dict(lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    fused = dict(fused=True)  # DDP and DeepSpeed get torch's fused AdamW, as dsc uses
    if name == "ddp":
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=4 * args.bucket / MiB)
        return torch_contender(ddp, model, torch.optim.AdamW(model.parameters(), **adamw, **fused))
    if name.startswith("dsc-"):
        import dsc

        plan = {"zero": {"stage": int(name[5]), "overlap_comm": name.endswith("overlap"),
                         "reduce_bucket_size": args.bucket, "allgather_bucket_size": args.bucket,
                         "prefetch_bucket_size": args.bucket,  # ZeRO-3 (bench_zero) only
                         "param_persistence_threshold": getattr(args, "persistence", 0)},
                "optimizer": {"type": "adamw", **{k: list(v) if k == "betas" else v for k, v in adamw.items()}},
                "batch": {"micro_batch_size": args.micro, "gradient_accumulation_steps": 1}}
        compiled = dsc.compile(model, plan, example_inputs=(x, y))

        def fwd_bwd(x, y):
            loss = compiled(x, y)
            compiled.backward(loss)
            return loss

        return fwd_bwd, compiled.step, compiled.memory_bytes, dsc.runtime.mesh.shutdown
    # ds-z*
    zero = {"stage": int(name[4]), "reduce_bucket_size": args.bucket, "allgather_bucket_size": args.bucket}
    engine, dopt, fwd_bwd = deepspeed_engine(args, model, zero)

    def mem():
        params = list(model.parameters())
        inner = getattr(dopt, "optimizer", dopt)
        masters = list(getattr(dopt, "single_partition_of_fp32_groups", None) or [])  # fp32 copies
        grads = [p.grad for p in params + masters] + list(getattr(dopt, "ipg_buffer", None) or [])
        grads += [t for g in (getattr(dopt, "averaged_gradients", None) or {}).values() for t in (g or [])]
        grads.append(getattr(dopt, "grads_in_partition", None))
        return dict(params_bytes=nbytes(params + masters), grads_bytes=nbytes(grads),
                    optimizer_bytes=nbytes(opt_state(inner)))

    return fwd_bwd, engine.step, mem, lambda: (dist.barrier(), dist.destroy_process_group())


def worker(args, setup_fn=None) -> None:
    """One contender on this rank: warm up, time, measure, and (rank 0) print the JSON result line.
    bench_zero passes its own `setup_fn`; memory() may add "gathered_peak_bytes" (dsc ZeRO-3)."""
    import torch
    import torch.distributed as dist
    from gpt import build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    data = batches(args, rank, world, args.warmup + args.steps)
    model = build_model(0, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, block_size=args.seq)
    n_params = model.get_num_params()  # tied weights once
    fwd_bwd, step, mem, finish = (setup_fn or setup)(args.contender, args, model, *data[0])
    times, loss, m, live = [], None, None, 0
    for i, (x, y) in enumerate(data):
        dist.barrier()
        t0 = time.perf_counter()
        loss = fwd_bwd(x, y)
        if i == args.warmup - 1:  # untimed: memory when gradients exist and optimizer state too
            m, live = dict(mem()), live_tensor_bytes()
        step()
        dist.barrier()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    final = loss.detach().clone()
    final = final.to_local() if hasattr(final, "to_local") else final  # FSDP2 may return a DTensor
    dist.all_reduce(final)
    gathered = m.pop("gathered_peak_bytes", None)
    res = {"name": args.contender, "world": world, "num_params": n_params,
           "median_step_s": statistics.median(times), "step_s": times,
           "final_loss": float(final) / world, **m,
           "model_state_bytes": sum(m.values()), "gathered_peak_bytes": gathered, "live_tensor_bytes": live,
           "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    res["psi_over_n"] = res["model_state_bytes"] * world / n_params
    per_rank = [None] * world
    dist.all_gather_object(per_rank, res)
    if rank == 0:
        res["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in per_rank)
        res["per_rank"] = [{k: r[k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "model_state_bytes",
                                              "gathered_peak_bytes", "live_tensor_bytes", "peak_rss_bytes")}
                           for r in per_rank]
        print(MARK + json.dumps(res), flush=True)
    finish()


# -- parent: one torchrun job per contender, then the table -----------------------------------------
def has_deepspeed(python: str) -> bool:
    r = subprocess.run([python, "-c", "import deepspeed"], capture_output=True)
    return r.returncode == 0


def launch(name, python, nproc, argv, script: str = __file__) -> dict | None:
    """Run one contender as its own torchrun job of `script`; its JSON result line, or None."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("TORCHELASTIC") or k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK",
                   "ROLE_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCH_NCCL_ASYNC_ERROR_HANDLING"))}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"))
    cmd = [python, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={port}", os.path.abspath(script), *argv, "--contender", name]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK):])
    print(f"[{name}] failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}", file=sys.stderr)
    return None


def table(results) -> str:
    base = next((r["median_step_s"] for r in results if r["name"] == "ddp"), None)
    head = ["name", "median step s", "vs DDP", "params MiB", "grads MiB", "optim MiB",
            "model-state MiB", "live MiB", "peak RSS MiB", "final loss"]
    rows = [head]
    for r in results:
        ratio = f"{r['median_step_s'] / base:.2f}x" if base else "-"
        rows.append([r["name"], f"{r['median_step_s']:.3f}", ratio,
                     *(f"{r[k] / MiB:.1f}" for k in ("params_bytes", "grads_bytes", "optimizer_bytes",
                                                      "model_state_bytes", "live_tensor_bytes",
                                                      "peak_rss_bytes")),
                     f"{r['final_loss']:.4f}"])
    return format_table(rows)


def format_table(rows: list[list[str]]) -> str:
    """Rows of cells (the first is the header) as an aligned text table."""
    w = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(row)) for row in rows]
    lines.insert(1, "-+-".join("-" * x for x in w))
    return "\n".join(lines)


def run_contenders(args, argv, contenders, launch_fn, ds_fallback: str | None = None):
    """Launch each contender in turn; returns (results, names asked for, nproc). Shared with bench_zero."""
    nproc = int(os.environ.get("WORLD_SIZE", args.nproc))
    names = [n for n in (args.only.split(",") if args.only else contenders) if n]
    ds_python = args.ds_python or sys.executable
    if any(n.startswith("ds-") for n in names) and not has_deepspeed(ds_python):
        if not args.ds_python and ds_fallback and os.path.exists(ds_fallback) and has_deepspeed(ds_fallback):
            ds_python = ds_fallback
        else:
            print(f"deepspeed does not import in {ds_python}: skipping ds-* (see --ds-python)", file=sys.stderr)
            names = [n for n in names if not n.startswith("ds-")]
    results = []
    for name in names:
        t = time.time()
        r = launch_fn(name, ds_python if name.startswith("ds-") else sys.executable, nproc, argv)
        print(f"[{name}] done in {time.time() - t:.0f}s", file=sys.stderr, flush=True)
        if r:
            results.append(r)
    return results, names, nproc


def print_results(args, results, header: str, table_fn) -> None:
    if args.json:
        for r in results:
            print(json.dumps(r))
    else:
        print(header)
        print(table_fn(results))


def parent(args, argv) -> int:
    results, names, nproc = run_contenders(args, argv, CONTENDERS, launch)
    r0 = results[0] if results else {}
    print_results(args, results, f"GPT {r0.get('num_params', 0) / 1e6:.2f}M params, {nproc} ranks x micro-batch "
                  f"{args.micro} x seq {args.seq}, fp32 AdamW, {args.warmup} warm-up + {args.steps} timed steps; "
                  "MiB are per rank (rank 0)", table)
    return 0 if len(results) == len(names) else 1


def main(parse=None, work=None, drive=None) -> int:
    """Entry point of bench_dp and bench_zero: worker under --contender, else rank 0 drives."""
    argv = sys.argv[1:]
    args = (parse or parse_args)(argv)
    if args.warmup < 2:
        sys.exit("--warmup must be >= 2 (memory is read in the last warm-up step, after an optimizer step)")
    if args.contender:
        (work or worker)(args)
        return 0
    if os.environ.get("RANK", "0") != "0":
        return 0  # under `dsc run`: rank 0 drives the benchmark, the other ranks have nothing to do
    return (drive or parent)(args, argv)


if __name__ == "__main__":
    sys.exit(main())
