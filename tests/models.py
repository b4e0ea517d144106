"""Models the parity tests train: our example GPT and third-party transformers architectures built
from small configs with random weights (no hub access). Each entry gives a model builder and a
batch maker; a batch is (args, kwargs) and the model returns the mean loss (or an output with
`.loss`)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

VOCAB, SEQ = 97, 12


def _tokens(n: int, seed: int, seq: int = SEQ) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seq + 1), generator=g)


def add_parallel_args(p) -> None:
    """The options every multi-rank worker takes: tensor-parallel size and vocabulary."""
    p.add_argument("--tp", type=int, default=1, help="tensor_parallel.size")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary size of the model and data")


def join_job(args) -> tuple[int, int, int, int]:
    """Set the vocabulary, join the torchrun job; (rank, world, dp_rank, dp). Tensor-parallel ranks
    are adjacent and share a batch, so data is split by the data-parallel coordinate."""
    import dsc
    import torch.distributed as dist

    if args.vocab:
        set_vocab(args.vocab)
    dsc.runtime.mesh.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    return rank, world, rank // args.tp, world // args.tp


def set_vocab(n: int) -> None:
    """Vocabulary of every model built (and token drawn) from now on: 97 (prime) exercises
    ZeRO padding; tensor-parallel runs use one divisible by tp (vocabulary-parallel embedding)."""
    global VOCAB
    VOCAB = n


def gpt():
    from gpt import build_model

    return build_model(seed=0, vocab_size=VOCAB, block_size=SEQ, n_layer=2, n_head=4, n_embd=32)


def gpt_batch(idx):
    return (idx[:, :-1].contiguous(), idx[:, 1:].contiguous()), {}


def hf_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=SEQ + 1, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg)


def hf_llama(heads: int = 4, kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_size=32,
                      intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=64, use_cache=False,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def hf_bert():
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=32, intermediate_size=48,
                     vocab_size=VOCAB, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, pad_token_id=0)
    return BertForMaskedLM(cfg)


def hf_batch(idx):
    return (), {"input_ids": idx[:, :-1].contiguous(), "labels": idx[:, 1:].contiguous()}


MODELS = {
    "gpt": (gpt, gpt_batch),
    "hf_gpt2": (hf_gpt2, hf_batch),
    "hf_llama": (hf_llama, hf_batch),
    # grouped-query attention with 4 kv heads (8 query heads): divides by tp=4
    "hf_llama_kv4": (lambda: hf_llama(heads=8, kv_heads=4), hf_batch),
    "hf_bert": (hf_bert, hf_batch),
}


def loss_of(out) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.loss


def dataset(steps: int, global_batch: int, seed: int = 123) -> torch.Tensor:
    """Token rows for `steps` optimizer steps of `global_batch` samples each."""
    return _tokens(steps * global_batch, seed)


def rank_micro_batches(data: torch.Tensor, step: int, global_batch: int, rank: int, dp: int, gas: int):
    """The micro-batches rank `rank` trains on at `step`: its contiguous 1/dp of the global batch."""
    rows = data[step * global_batch:(step + 1) * global_batch]
    mine = rows.chunk(dp)[rank]
    return mine.chunk(gas)
