"""Capture benchmark: how long `dsc.capture` (torch.export, non-strict) takes per model, with and
without per-node stack traces.

dsc captures without them (`compiler/capture.py`, `_stack_traces`); `DSC_DEBUG=1` records them
for the source line of every node. Each model is captured `--reps` times in each mode, alternating, after
one warm-up capture (the first export in a process also pays for torch's lazy imports), and the median
is printed with the ratio:

    python benchmarks/bench_capture.py [--layers 2] [--reps 5]

Models: the example GPT (examples/gpt.py), and transformers' GPT-2 and Llama built from configs
with random weights, each called with labels so the loss is part of the graph, as dsc.compile
captures them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))


def models(layers: int):
    """name -> (module, args, kwargs)."""
    import gpt
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    ids = torch.randint(0, 512, (4, 64))
    out = {"gpt (examples/gpt.py)": (gpt.build_model(n_layer=layers), gpt.example_inputs(), {})}
    out["transformers GPT-2"] = (GPT2LMHeadModel(GPT2Config(
        n_layer=layers, n_embd=256, n_head=4, vocab_size=512, n_positions=64, use_cache=False)), (),
        {"input_ids": ids, "labels": ids})
    out["transformers Llama"] = (LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=layers, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=688, vocab_size=512, max_position_embeddings=64, use_cache=False,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)), (), {"input_ids": ids, "labels": ids})
    return out


def timed(model, args, kwargs, reps: int) -> tuple[float, float, int]:
    """Median seconds per capture without and with stack traces, the two modes alternating (this
    VM's speed drifts by tens of percent within minutes), and the graph's node count."""
    from dsc.capture import capture

    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(reps):
        for debug in (False, True):
            if debug:
                os.environ["DSC_DEBUG"] = "1"
            else:
                os.environ.pop("DSC_DEBUG", None)
            t0 = time.perf_counter()
            cap = capture(model, args, kwargs)
            times[debug].append(time.perf_counter() - t0)
    return statistics.median(times[False]), statistics.median(times[True]), len(cap.gm.graph.nodes)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=2, help="decoder layers per model")
    p.add_argument("--reps", type=int, default=5, help="captures per model and mode (median)")
    args = p.parse_args(argv)
    debug_before = os.environ.get("DSC_DEBUG")
    try:
        built = models(args.layers)
        first = next(iter(built.values()))
        timed(*first, reps=1)  # warm-up: torch.export's lazy imports
        print(f"{'model':<24} {'nodes':>6} {'no traces (dsc)':>16} {'traces (DSC_DEBUG=1)':>21} {'ratio':>6}")
        for name, (model, a, kw) in built.items():
            quiet, loud, nodes = timed(model, a, kw, args.reps)
            print(f"{name:<24} {nodes:>6} {quiet:>14.3f} s {loud:>19.3f} s {loud / quiet:>5.2f}x")
    finally:
        if debug_before is None:
            os.environ.pop("DSC_DEBUG", None)
        else:
            os.environ["DSC_DEBUG"] = debug_before


if __name__ == "__main__":
    main()
