"""The `dsc` command line.

    dsc compile model.py --config plan.json [--world-size N] [--out DIR] [--format text|json]
    dsc validate plan.json [--world-size N] [--strict]
    dsc schema
    dsc inspect DIR [--rank R | --kernels] [--format text|json]
    dsc run --nproc N script.py [args ...]
    dsc checkpoint consolidate DIR OUT
    dsc report
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import warnings
from pathlib import Path

EPILOG = "Run `dsc COMMAND --help` for a command's options. Docs: README.md of the dsc repository."


def _progress(msg: str) -> None:
    print(f"[dsc] {msg}", file=sys.stderr, flush=True)


def _load_model_file(path: str, entry: str):
    """Import `path` and call its model and inputs functions (`build_model:example_inputs`)."""
    build_name, _, inputs_name = entry.partition(":")
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"dsc: cannot import model file {path!r}")
    sys.path.insert(0, str(Path(path).resolve().parent))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(mod)
    missing = [n for n in (build_name, inputs_name) if not hasattr(mod, n)]
    if missing:
        raise SystemExit(f"dsc: {path} must define {' and '.join(f'{n}()' for n in missing)} "
                         f"(or name other functions with --entry BUILD:INPUTS)")
    return getattr(mod, build_name)(), getattr(mod, inputs_name)()


def cmd_compile(args) -> int:
    from dsc.api import model_info
    from dsc.capture import call_args, capture
    from dsc.passes.tensor_parallel import ShardingError, ShardingRuleError
    from dsc.pipeline import compile_rank, graph_code
    from dsc.report import build_report, explain
    from dsc.schemas import PlanError, load_plan

    _progress(f"building the model from {args.model}")
    model, example = _load_model_file(args.model, args.entry)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = load_plan(args.config, world_size=args.world_size, strict=args.strict,
                             model_info=model_info(model))
        for w in caught:
            if issubclass(w.category, UserWarning) and "dsc" in w.category.__module__:
                print(f"warning: {w.message}", file=sys.stderr)
    except PlanError as e:
        print(f"dsc: {e}", file=sys.stderr)
        return 1
    a, kw = call_args(example)
    _progress("capturing the graph")
    captured = capture(model, a, kw)
    programs = []
    t0 = time.perf_counter()
    for r in range(args.world_size):
        if args.world_size > 1:
            _progress(f"compiling rank {r + 1}/{args.world_size}")
        try:
            programs.append(compile_rank(captured, plan, r, args.world_size, a, kw))
        except (ShardingError, ShardingRuleError) as e:  # the plan asks for a sharding this model cannot take
            print(f"dsc: {e}", file=sys.stderr)
            return 1
    _progress(f"compiled {args.world_size} rank(s) in {time.perf_counter() - t0:.2f} s")
    report = build_report(model, plan, captured, programs)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "plan.json").write_text(json.dumps({"plan": report["plan"], "sources": report["sources"]},
                                                  indent=2) + "\n")
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        for prog in programs:
            (out / f"rank{prog.rank}.py").write_text(graph_code(prog))
        kernels = {k["name"]: k for p in programs for k in p.artifacts.get("kernels", [])}
        if kernels:
            (out / "kernels").mkdir(exist_ok=True)
            for name, k in kernels.items():
                src = Path(k["source"])
                (out / "kernels" / f"{name}{src.suffix}").write_text(src.read_text())
                if k.get("backward_source"):  # .c or, for Triton, .py
                    bwd = Path(k["backward_source"])
                    (out / "kernels" / f"{name}_bwd{bwd.suffix}").write_text(bwd.read_text())
        extra = f", kernels/ ({len(kernels)} generated kernel sources)" if kernels else ""
        _progress(f"wrote {out}/: plan.json, report.json, rank0.py .. rank{args.world_size - 1}.py{extra}")
    print(json.dumps(report, indent=2) if args.format == "json" else explain(report))
    return 0


def cmd_validate(args) -> int:
    from dsc.schemas import validate_source

    plan, problems = validate_source(args.file, world_size=args.world_size, strict=args.strict)
    errors = [p for p in problems if p.severity == "error" or args.strict]
    for p in problems:
        print(f"{'error' if p in errors else p.severity}: {p}")
    if plan is None or errors:
        print(f"{args.file}: invalid ({len(errors)} error(s), world size {args.world_size})")
        return 1
    warn = len(problems)
    print(f"{args.file}: valid for world size {args.world_size}" + (f" ({warn} warning(s))" if warn else ""))
    return 0


def cmd_schema(args) -> int:
    from dsc.schemas import Plan

    print(json.dumps(Plan.model_json_schema(), indent=2))
    return 0


def cmd_inspect(args) -> int:
    from dsc.report import explain

    folder = Path(args.dir)
    if not (folder / "report.json").exists():
        print(f"dsc: {folder} has no report.json; create it with `dsc compile ... --out {folder}`",
              file=sys.stderr)
        return 1
    report = json.loads((folder / "report.json").read_text())
    if args.kernels:
        kernels = report.get("kernels", [])
        if not kernels:
            print("no generated kernels (enable them with the plan's fusion section)")
        for k in kernels:
            src = folder / "kernels" / f"{k['name']}{Path(k['source']).suffix}"
            bwd = {"generated": "backward kernel", "pass-through": "backward passes gradients through"}.get(
                k.get("backward"), "backward recomputes")
            print(f"{k['name']:<36} {k['backend']:<5} {k['pattern']:<10} {k['dtype']:<8} "
                  f"{'x'.join(map(str, k['shape'])):<12} x{k['uses']:<3} replaces {' + '.join(k['ops'])}; "
                  f"{bwd}  ({src})")
        for d in report.get("declined_fusion", []):
            print(f"declined: {d['what']}: {d['reason']}")
        return 0
    if args.rank is not None:
        path = folder / f"rank{args.rank}.py"
        if not path.exists():
            print(f"dsc: no graph for rank {args.rank} in {folder}", file=sys.stderr)
            return 1
        print(path.read_text())
        return 0
    print(json.dumps(report, indent=2) if args.format == "json" else explain(report))
    return 0


def cmd_run(args) -> int:
    from dsc.runtime.launch import launch

    if not args.script:
        print("dsc run: give a script to run, e.g. `dsc run --nproc 2 train.py`", file=sys.stderr)
        return 2
    return launch(args.script[0], args.script[1:], args.nproc, args.nnodes, args.master_addr, args.master_port,
                  keep_memory=args.keep_freed_memory == "on")


def cmd_checkpoint(args) -> int:
    from dsc.runtime.checkpoint import consolidate

    try:
        state = consolidate(args.dir, args.out, args.tag)
    except (FileNotFoundError, ValueError) as e:
        print(f"dsc: {e}", file=sys.stderr)
        return 1
    n = sum(v.numel() for v in state.values())
    print(f"wrote {args.out}: {len(state)} tensors, {n:,} elements (load with model.load_state_dict)")
    return 0


def cmd_report(args) -> int:
    import torch
    import torch.distributed as dist

    from dsc import __version__

    try:
        import triton  # noqa: F401

        triton_v = triton.__version__
    except Exception:  # noqa: BLE001
        triton_v = "not installed"
    info = {
        "dsc": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "triton": triton_v,
        "cuda available": torch.cuda.is_available(),
        "gpus": torch.cuda.device_count(),
        "backends": {"gloo": dist.is_gloo_available(), "nccl": dist.is_nccl_available(),
                     "mpi": dist.is_mpi_available()},
        "cpu threads": torch.get_num_threads(),
    }
    for k, v in info.items():
        print(f"{k:<16} {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsc", description="Compile PyTorch models for distributed training "
                                "from a declarative plan (native dsc plan or DeepSpeed ds_config.json).",
                                epilog=EPILOG)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("compile", help="compile a model for every rank and print the per-rank plan",
                       description="Compile MODEL.py for every rank in one process (no cluster needed) and "
                       "print the resolved plan, the pass log and per-rank memory and communication.")
    c.add_argument("model", help="a Python file defining build_model() and example_inputs()")
    c.add_argument("--config", "-c", required=True, help="plan JSON (dsc plan or DeepSpeed ds_config)")
    c.add_argument("--world-size", "-n", type=int, default=1, help="number of ranks to compile for (default 1)")
    c.add_argument("--out", "-o", help="write the artifact folder here (plan, report, each rank's graph)")
    c.add_argument("--format", choices=["text", "json"], default="text", help="output format (default text)")
    c.add_argument("--entry", default="build_model:example_inputs",
                   help="model and inputs function names in MODEL.py (default build_model:example_inputs)")
    c.add_argument("--strict", action="store_true", help="treat plan warnings (unsupported keys) as errors")
    c.set_defaults(fn=cmd_compile)

    v = sub.add_parser("validate", help="validate a plan or DeepSpeed config",
                       description="Validate FILE; print one line per problem. Exit 0 when valid, 1 when not.")
    v.add_argument("file")
    v.add_argument("--world-size", "-n", type=int, default=1, help="world size to resolve batch sizes for")
    v.add_argument("--strict", action="store_true", help="warnings (unsupported DeepSpeed keys) are errors")
    v.set_defaults(fn=cmd_validate)

    s = sub.add_parser("schema", help="print the JSON Schema of the native plan")
    s.set_defaults(fn=cmd_schema)

    i = sub.add_parser("inspect", help="print an artifact folder written by `dsc compile --out`")
    i.add_argument("dir")
    i.add_argument("--rank", type=int, help="print this rank's graph instead of the report")
    i.add_argument("--kernels", action="store_true", help="list the generated kernels (name, backend, pattern, "
                   "shape, the ops each replaced, its source file)")
    i.add_argument("--format", choices=["text", "json"], default="text")
    i.set_defaults(fn=cmd_inspect)

    r = sub.add_parser("run", help="launch a training script on N local ranks (torchrun underneath)",
                       description="Run SCRIPT on N processes with torchrun; arguments after the script go "
                       "to it; the exit code is the script's.")
    r.add_argument("--nproc", "-n", type=int, default=2, help="processes (ranks) on this node (default 2)")
    r.add_argument("--nnodes", type=int, default=1, help="number of nodes (default 1)")
    r.add_argument("--master-addr", default="127.0.0.1", help="rendezvous address (default 127.0.0.1)")
    r.add_argument("--master-port", type=int, default=0, help="rendezvous port (default: a free one)")
    r.add_argument("--keep-freed-memory", choices=["on", "off"], default="on",
                   help="on (default): the ranks' glibc keeps freed memory for reuse instead of returning it "
                   "to the kernel, so a training step does not page-fault its buffers in again (sets "
                   "MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ where the environment does not)")
    r.add_argument("script", nargs=argparse.REMAINDER, help="script and its arguments")
    r.set_defaults(fn=cmd_run)

    k = sub.add_parser("checkpoint", help="work with checkpoints written by compiled.save_checkpoint")
    ksub = k.add_subparsers(dest="action", metavar="ACTION", required=True)
    kc = ksub.add_parser("consolidate", help="write one plain fp32 state_dict from a sharded checkpoint",
                         description="Gather every rank's shards of DIR (its latest checkpoint, or --tag) "
                         "into one state_dict with the model's own keys, loadable by model.load_state_dict.")
    kc.add_argument("dir")
    kc.add_argument("out")
    kc.add_argument("--tag", help="checkpoint tag (default: the one DIR/latest names)")
    kc.set_defaults(fn=cmd_checkpoint)

    e = sub.add_parser("report", help="print the environment: versions, backends, GPUs")
    e.set_defaults(fn=cmd_report)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
