"""The tiny Hugging Face model and data the HF Trainer and Accelerate examples train; nothing is downloaded.

A 2-layer Llama built from a config (about 25k parameters) learns a fixed random bigram table: each sequence
starts at a random token and every next token is `TABLE[token]`, so the loss falls from ln(64) within a few steps,
and every run, engine and number of ranks sees the same sequences for a given seed.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedModel

VOCAB = 64
SEQ_LEN = 16
TABLE = torch.randperm(VOCAB, generator=torch.Generator().manual_seed(-1))


def make_lm() -> PreTrainedModel:
    """The same initial model on every rank (built under DeepSpeed's ZeRO-3 `zero.Init` where that is on)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=SEQ_LEN,
    )
    return AutoModelForCausalLM.from_config(config)


def sequences(count: int, seed: int = 0) -> torch.Tensor:
    """`count` token sequences of SEQ_LEN: a random first token, then TABLE applied over and over."""
    tokens = [torch.randint(0, VOCAB, (count,), generator=torch.Generator().manual_seed(seed))]
    for _ in range(SEQ_LEN - 1):
        tokens.append(TABLE[tokens[-1]])
    return torch.stack(tokens, dim=1)


def token_dataset(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """The sequences as a causal-LM dataset for the Trainer (the model shifts the labels itself)."""
    return [{"input_ids": x, "labels": x} for x in sequences(count, seed)]


def eval_loss(model: torch.nn.Module, device: torch.device) -> float:
    """Loss on a fixed held-out batch."""
    x = sequences(64, seed=-2).to(device)
    with torch.no_grad():
        return model(input_ids=x, labels=x).loss.item()
