"""Distributed Lion's wire format: votes packed 1 bit per element, counted back, and the bytes each costs.

What goes over the wire (bytes each worker sends per step for n elements and N replicas, ring algorithms: an
all-gather forwards N - 1 chunks, an all-reduce sends 2 (N - 1) / N of the buffer; see `vote_bytes_sent`):

    fp32 gradient all-reduce (DDP)     2 (N - 1) / N * 4 n
    "gather": all-gather packed bits   (N - 1) * ceil(n / 8)          -> 64 / N times fewer: 16x at N = 4
    "reduce": all-reduce int8 votes    2 (N - 1) / N * n              -> 4x fewer (int16 above N = 127)

The all-gather is cheaper below N = 16, the int8 reduce above; `choose_transport` picks the smaller by that count
(ties go to the gather). Both give the same sums, hence the same params.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TRANSPORTS = ("auto", "gather", "reduce")
_INT8_MAX_WORLD = 127  # |S| <= N must fit the reduce's integer type
_BYTES = torch.arange(256)
_SPREAD = sum(((_BYTES >> k) & 1) << (8 * k) for k in range(8))  # byte k of _SPREAD[v] = bit k of v



def pack_bits(bits: Tensor) -> Tensor:
    """A 1-D bool tensor as uint8, 8 elements per byte (element i is bit i % 8 of byte i // 8; zero padded).

    Each group of 8 bools is read as one int64 whose bytes are 0 or 1, and three shift-ors fold the 8 bytes'
    low bits into the low byte: a few passes over n / 8 words instead of a per-bit loop.
    """
    words = torch.cat([bits, bits.new_zeros((-bits.numel()) % 8)]).view(torch.int64)  # a fresh, aligned copy
    for shift in (7, 14, 28):
        words |= words >> shift
    return words.to(torch.uint8)  # keeps the low byte


def count_set_bits(rows: Tensor, numel: int) -> Tensor:
    """For packed rows (shape (R, B), uint8, from `pack_bits`), how many rows have each of the first `numel`
    elements' bit set, as int16 (int32 from 2**15 rows).

    A 256-entry table spreads a byte's 8 bits into the 8 byte lanes of an int64; adding up to 255 spread rows
    counts 8 elements per int64 add without carries between lanes.
    """
    count_dtype = torch.int16 if rows.shape[0] < 2**15 else torch.int32
    total = torch.zeros(numel, dtype=count_dtype, device=rows.device)
    spread = _SPREAD.to(rows.device)
    for start in range(0, rows.shape[0], 255):
        lanes = torch.zeros(rows.shape[1], dtype=torch.int64, device=rows.device)
        for row in rows[start : start + 255]:
            lanes += spread.index_select(0, row.int())
        total += lanes.view(torch.uint8)[:numel]
    return total


def reduce_dtype(world_size: int) -> torch.dtype:
    return torch.int8 if world_size <= _INT8_MAX_WORLD else torch.int16


def ring_bytes_sent(collective: str, payload_bytes: int, world_size: int) -> int:
    """Bytes one worker sends in a ring `collective` whose per-rank input is `payload_bytes`.

    A ring all-gather forwards the N - 1 other ranks' chunks: (N - 1) x payload. A ring all-reduce is a
    reduce-scatter plus an all-gather, each sending (N - 1) / N of the buffer: 2 (N - 1) / N x payload.
    """
    if collective == "all_gather":
        return (world_size - 1) * payload_bytes
    if collective == "all_reduce":
        return math.ceil(2 * (world_size - 1) * payload_bytes / world_size)
    raise ValueError(f"collective must be 'all_gather' or 'all_reduce', got {collective!r}")


def vote_bytes_sent(transport: str, numel: int, world_size: int) -> int:
    """Bytes one worker sends per step to exchange `numel` votes with `transport` ("gather" or "reduce").

    Compare `ring_bytes_sent("all_reduce", 4 * numel, world_size)`, the fp32 gradient all-reduce it replaces.
    """
    if transport == "gather":
        return ring_bytes_sent("all_gather", math.ceil(numel / 8), world_size)
    if transport == "reduce":
        return ring_bytes_sent("all_reduce", numel * reduce_dtype(world_size).itemsize, world_size)
    raise ValueError(f"transport must be 'gather' or 'reduce', got {transport!r}")


def choose_transport(numel: int, world_size: int) -> str:
    """The transport that sends fewer bytes per worker: "gather" up to 16 workers (16: a tie), "reduce" above."""
    reduce_is_cheaper = vote_bytes_sent("reduce", numel, world_size) < vote_bytes_sent("gather", numel, world_size)
    return "reduce" if reduce_is_cheaper else "gather"
