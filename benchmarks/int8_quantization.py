"""How well each 8-bit momentum format follows Lion's fp32 momentum, on the main job's model and data.

    python benchmarks/int8_quantization.py             # 200 steps of the default main-job model (minutes on CPU)
    python benchmarks/int8_quantization.py --smoke     # a tiny model, a few steps: checks that the script runs

One process trains the main job's GPT with `lion_dist.Lion` (fp32 momentum, lr 1e-3, weight decay 0.1, global
batch 64) and, fed the very same gradients, keeps one shadow momentum per format for every param that
`momentum_dtype="int8"` would quantize: dequantize, `b2 * m + (1 - b2) * g`, requantize, as the optimizer's
int8 step does. The shadows do not steer training (open loop), so every format sees the same gradients, and the
closed-loop effect on validation loss is measured separately by `lion-dist compare` (benchmarks/RESULTS.md).

Formats: linear absmax (`lion_dist.spec.quantize_momentum`, what lion_dist implements) with blocks of 32, 128
and 256 and nearest or stochastic requantization; and bitsandbytes' signed dynamic map (its 8-bit optimizers'
non-linear code book: 7 decades of magnitude with fewer levels each) per block of 128 and 256, nearest or
stochastic (between the two neighbouring codes, in proportion to the distance). Reported per format: its state
bytes per element, the share of Lion's update signs sign(b1 * m + (1 - b1) * g) that differ from the fp32
momentum's (Lion's update is only this sign: a differing sign is a wrong step for that element), and the
relative L2 error of the momentum at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from lion_dist import Lion, spec
from lion_dist.formats import int8
from lion_dist.spec import NoiseStream
from lion_dist.train.data import load_corpus, train_batches
from lion_dist.train.model import GPT, GPTConfig

BETAS = (0.9, 0.99)


def dynamic_map() -> Tensor:
    """bitsandbytes' signed dynamic quantization map (`create_dynamic_map(signed=True)`, 7 exponent bits): 256
    sorted values in [-1, 1], 0 and 1 included, each decade 10**-6 .. 1 with twice the levels of the one below."""
    values = [0.0, 1.0]
    for i in range(7):
        bounds = torch.linspace(0.1, 1, 2**i + 1)
        means = ((bounds[:-1] + bounds[1:]) / 2 * 10.0 ** (i - 6)).tolist()
        values += means + [-v for v in means]
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values))


@dataclass
class Format:
    """One 8-bit momentum format: how a float momentum becomes its state, and back."""

    name: str
    quantize: Callable[[Tensor, Tensor | None], tuple[Tensor, Tensor]]  # (m, noise or None) -> (codes, scales)
    dequantize: Callable[[Tensor, Tensor], Tensor]
    stochastic: bool = False


def _blocks(m: Tensor, block: int) -> Tensor:
    """`m`'s rows cut into blocks of `block` along the last dim, the last one padded with zeros: (..., n, block)."""
    pad = -m.shape[-1] % block
    return F.pad(m, (0, pad)).unflatten(-1, (-1, block))


def _unblocks(x: Tensor, n: int) -> Tensor:
    return x.flatten(-2)[..., :n]


def linear(block: int, stochastic: bool) -> Format:
    name = f"linear absmax, block {block}, {'stochastic' if stochastic else 'nearest'}"
    return Format(
        name,
        lambda m, noise: spec.quantize_momentum(m, block, noise),
        lambda codes, scales: spec.dequantize_momentum(codes, scales, block),
        stochastic,
    )


def dynamic(block: int, stochastic: bool) -> Format:
    table = dynamic_map()

    def quantize(m: Tensor, noise: Tensor | None) -> tuple[Tensor, Tensor]:
        blocks = _blocks(m, block)
        scales = blocks.abs().amax(-1)
        x = (blocks / torch.where(scales == 0, 1, scales)[..., None]).clamp(-1, 1)
        upper = torch.searchsorted(table, x.contiguous()).clamp(1, 255)
        lo, hi = table[upper - 1], table[upper]
        frac = (x - lo) / (hi - lo).clamp_min(1e-30)
        threshold = 0.5 if noise is None else _blocks(noise.reshape(m.shape).float() / 65536, block)
        pick_hi = frac > threshold
        index = torch.where(pick_hi, upper, upper - 1)
        return _unblocks(index, m.shape[-1]).to(torch.uint8), scales

    def dequantize(codes: Tensor, scales: Tensor) -> Tensor:
        values = _blocks(table[codes.long()], block) * scales[..., None]
        return _unblocks(values, codes.shape[-1])

    name = f"dynamic map (bitsandbytes), block {block}, {'stochastic' if stochastic else 'nearest'}"
    return Format(name, quantize, dequantize, stochastic)


def formats() -> list[Format]:
    bf16 = Format("bf16 (momentum_dtype=torch.bfloat16)", lambda m, _: (m.bfloat16(), m[:0]), lambda c, _: c.float())
    result = [bf16] + [linear(block, sr) for block in (32, 128, 256) for sr in (False, True)]
    return result + [dynamic(block, sr) for block in (128, 256) for sr in (False, True)]


def state_bytes(states: list[tuple[Tensor, Tensor]]) -> int:
    """The bytes of a format's codes and scales over all params (a block never crosses a row)."""
    return sum(t.numel() * t.element_size() for state in states for t in state)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Print the table; return each format's bytes per element, % of differing update signs and momentum error."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--smoke", action="store_true", help="a tiny model and 3 steps")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    corpus = load_corpus()
    size = dict(n_layer=1, d_model=64) if args.smoke else dict(n_layer=4, d_model=128)
    steps = 3 if args.smoke else args.steps
    model = GPT(GPTConfig(vocab_size=corpus.vocab_size, seq_len=64, n_head=4, **size))
    opt = Lion(model.parameters(), lr=1e-3, betas=BETAS, weight_decay=0.1, batch_size_policy="ignore")
    quantized = [p for p in model.parameters() if int8.refusal(p) is None]
    fmts = formats()
    shadows = {f.name: [f.quantize(torch.zeros_like(p), None) for p in quantized] for f in fmts}
    wrong = dict.fromkeys(shadows, 0)
    counted = 0
    start = time.time()
    for step in range(steps):
        ((x, y),) = train_batches(
            corpus.train, step=step, seed=0, seq_len=64, micro_batch=64, grad_accum=1, rank=0, world=1
        )
        opt.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        for k, p in enumerate(quantized):
            g = p.grad
            exact = opt.state[p]["exp_avg"] if p in opt.state else torch.zeros_like(p)
            sign = torch.sign(exact * BETAS[0] + g * (1 - BETAS[0]))
            counted += g.numel()
            for f in fmts:
                codes, scales = shadows[f.name][k]
                m = f.dequantize(codes, scales)
                wrong[f.name] += int((torch.sign(m * BETAS[0] + g * (1 - BETAS[0])) != sign).sum())
                m = m * BETAS[1] + g * (1 - BETAS[1])
                noise = spec.sr_noise(NoiseStream(spec.sr_key(0, 0, step), k, 0, spec.MOMENTUM_STREAM), m.numel())
                shadows[f.name][k] = f.quantize(m, noise.reshape(m.shape) if f.stochastic else None)
        opt.step()
    exact = torch.cat([opt.state[p]["exp_avg"].flatten() for p in quantized])
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"# 8-bit momentum formats against fp32 momentum\n\n{steps} steps of a {n_params:,}"
        f"-param GPT ({size['n_layer']} layers, width {size['d_model']}) on {corpus.source}; {len(quantized)} params "
        f"({exact.numel():,} elements) quantized; {time.time() - start:.0f} s; "
        f"`python benchmarks/int8_quantization.py{' --smoke' if args.smoke else ''}`.\n"
    )
    print("| format | state bytes per element | update signs unlike fp32 momentum's | momentum rel. error at the end |")
    print("|---|---|---|---|")
    print("| fp32 (lion_dist default: the reference) | 4 | 0 | 0 |")
    results = {}
    for f in fmts:
        m = torch.cat([f.dequantize(*state).flatten() for state in shadows[f.name]])
        results[f.name] = {
            "bytes_per_element": state_bytes(shadows[f.name]) / exact.numel(),
            "signs_differing_percent": 100 * wrong[f.name] / counted,
            "momentum_rel_error": float((m - exact).norm() / exact.norm()),
        }
        r = results[f.name]
        print(
            f"| {f.name} | {r['bytes_per_element']:.3f} | {r['signs_differing_percent']:.3f}% "
            f"| {r['momentum_rel_error']:.4f} |"
        )
    return results


if __name__ == "__main__":
    main()
