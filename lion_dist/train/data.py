"""Character-level data: the default corpus (the Python standard library's own source) or any text file.

Batches are a pure function of (seed, step), so the step is the whole data position: a resumed run draws
exactly the batches an uninterrupted one would, on any world size with the same global batch.
"""

from __future__ import annotations

import math
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

DEFAULT_CORPUS_CHARS = 4_000_000
# Left out: test suites, third-party packages, codec tables and pydoc's generated topic strings (not library code).
_SKIPPED_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "encodings",
    "pydoc_data",
}
_VAL_EVERY_NTH_FILE = 10


@dataclass
class Corpus:
    """Token ids (indices into `chars`) for training and validation, and where they came from."""

    train: Tensor
    val: Tensor
    chars: str
    source: str

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def decode(self, ids: Tensor) -> str:
        return "".join(self.chars[i] for i in ids.tolist())


def stdlib_files() -> list[Path]:
    """The standard library's .py files in sorted order, without tests, third-party packages or data tables."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS]  # never walk into site-packages
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).parts)


def _stdlib_text(max_chars: int) -> tuple[str, str]:
    """(train, val) text: files in sorted order until `max_chars`; every 10th file goes to validation."""
    train_parts: list[str] = []
    val_parts: list[str] = []
    total = 0
    for i, path in enumerate(stdlib_files()):
        text = path.read_text(encoding="utf-8", errors="replace")
        (val_parts if i % _VAL_EVERY_NTH_FILE == _VAL_EVERY_NTH_FILE - 1 else train_parts).append(text)
        total += len(text)
        if total >= max_chars:
            break
    if not train_parts or not val_parts:
        raise FileNotFoundError(
            f"found too few Python source files under {sysconfig.get_paths()['stdlib']!r} for the default corpus; "
            "pass --data FILE with any text file instead"
        )
    return "".join(train_parts), "".join(val_parts)


def _file_text(path: Path, val_fraction: float) -> tuple[str, str]:
    if not path.is_file():
        raise FileNotFoundError(f"--data {str(path)!r}: no such file; pass a text file (UTF-8), e.g. --data enwik8")
    text = path.read_text(encoding="utf-8", errors="replace")
    split = int(len(text) * (1 - val_fraction))
    return text[:split], text[split:]


def _codes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def load_corpus(data: str | None = None, *, val_fraction: float = 0.1, min_len: int = 2) -> Corpus:
    """The default stdlib corpus (`data=None`) or the text file `data`, split into train and validation.

    The vocabulary is every character that occurs, sorted by code point. `min_len`: each split must hold at
    least this many characters (one sequence plus its target).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if data is None:
        train_text, val_text = _stdlib_text(DEFAULT_CORPUS_CHARS)
        source = f"Python {sysconfig.get_python_version()} standard library source (.py files, sorted)"
    else:
        train_text, val_text = _file_text(Path(data), val_fraction)
        source = str(data)
    for name, text in (("training", train_text), ("validation", val_text)):
        if len(text) < min_len:
            raise ValueError(
                f"{source}: the {name} split has {len(text)} characters, fewer than the {min_len} one sequence "
                "needs; use a longer file or a smaller --seq-len"
            )
    codes = np.concatenate([_codes(train_text), _codes(val_text)])
    present = np.zeros(int(codes.max()) + 1, dtype=bool)
    present[codes] = True
    uniques = np.flatnonzero(present)  # the vocabulary, sorted by code point (a linear pass, not a sort)
    code_to_id = np.cumsum(present, dtype=np.int32) - 1
    ids = torch.from_numpy(code_to_id[codes].astype(np.int32 if len(uniques) > 32767 else np.int16))
    chars = "".join(chr(c) for c in uniques)
    return Corpus(train=ids[: len(train_text)], val=ids[len(train_text) :], chars=chars, source=source)


def _sequences(data: Tensor, offsets: Tensor, seq_len: int) -> tuple[Tensor, Tensor]:
    window = data[offsets[:, None] + torch.arange(seq_len + 1)].long()
    return window[:, :-1], window[:, 1:]


def train_batches(
    data: Tensor, *, step: int, seed: int, seq_len: int, micro_batch: int, grad_accum: int, rank: int, world: int
) -> list[tuple[Tensor, Tensor]]:
    """This rank's `grad_accum` micro batches (inputs, targets) of step `step`.

    The step's global batch of `micro_batch * grad_accum * world` sequences is drawn from (seed, step) alone;
    rank r takes its slice of each accumulation round.
    """
    rng = np.random.default_rng([seed, step])
    offsets = torch.from_numpy(rng.integers(0, len(data) - seq_len, size=(grad_accum, world, micro_batch)))
    return [_sequences(data, offsets[a, rank], seq_len) for a in range(grad_accum)]


def eval_batches(
    data: Tensor, *, n_seqs: int, seq_len: int, micro_batch: int, rank: int, world: int
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """(inputs, targets, weights) over `n_seqs` fixed, evenly spaced validation sequences.

    Every rank yields the same number of batches (FSDP needs every rank in every forward); padding
    sequences have weight 0.
    """
    last = len(data) - seq_len - 1
    offsets = torch.arange(n_seqs) * last // max(n_seqs - 1, 1)
    per_rank = math.ceil(n_seqs / world)
    mine = offsets[rank * per_rank : (rank + 1) * per_rank]
    weights = torch.ones(per_rank)
    weights[len(mine) :] = 0
    mine = torch.cat([mine, offsets[:1].expand(per_rank - len(mine))])
    for start in range(0, per_rank, micro_batch):
        x, y = _sequences(data, mine[start : start + micro_batch], seq_len)
        yield x, y, weights[start : start + micro_batch]
