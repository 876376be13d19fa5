"""The job's human-readable end-of-run report, from its `summary.json` record."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any


def format_summary(s: dict[str, Any], out: Path) -> str:
    """The human-readable end-of-run report."""
    mib = 1 << 20
    if s["step"] < s["steps"]:
        head = f"stopped at step {s['step']} of {s['steps']} (--stop-at); continue with the same flags plus --resume"
    else:
        head = f"done: {s['steps']} steps of {s['optimizer']}"
        if s["distributed_lion"]:
            head += f" (Distributed Lion, {s['distributed_lion']['aggregate']})"
    tok = "n/a (nothing trained)" if s["tokens_per_s"] is None else f"{s['tokens_per_s']:,.0f} tokens/s"
    lines = [
        "",
        head,
        f"  val loss         {s['final_val_loss']:.4f} ({s['final_val_loss'] / math.log(2):.3f} bits per char)",
        f"  throughput       {tok} over {s['world_size']} rank{'s' if s['world_size'] > 1 else ''} ({s['device']})",
        f"  optimizer state  {', '.join(f'{b:,}' for b in s['optimizer_state_bytes_per_rank'])} bytes per rank "
        f"({s['n_params']:,} params)",
        f"  peak memory      {', '.join(f'{m / mib:,.0f}' for m in s['peak_memory_bytes_per_rank'])} MiB per rank "
        f"({s['peak_memory_kind']})",
        f"  outputs          {out / 'metrics.jsonl'}, {out / 'loss.png'}, {out / 'summary.json'}",
        f"  checkpoint       {s['checkpoint']}",
        f"  layout           {s['layout']['words']}",
        f"  communication    {_comm_words(s['comm'])}",
    ]
    if s["distributed_lion"]:
        lines.append(f"  exchange         {exchange_words(s['distributed_lion'])}")
    lay = s["layout"]
    if lay["replicas"] > 1:
        same = "bit-identical" if lay["replicas_identical"] else "DIFFERENT (a bug: please report it)"
        digests = lay["param_sha256_per_rank"]
        where = (
            f"on all {len(digests)} ranks"
            if lay["shards"] == 1
            else f"across the {lay['replicas']} replicas, shard by shard ({lay['shards']} shards each)"
        )
        lines.append(f"  replicas         params {same} {where}")
    for i, sample in enumerate(s["samples"]):
        lines += [f"--- sample {i + 1} (prompt, then generated) ---", sample["prompt"] + sample["continuation"]]
    return "\n".join(lines)


def exchange_words(exchange: dict[str, Any]) -> str:
    if exchange["replicas"] == 1:
        return "1 replica: nothing to exchange, each step is plain Lion's"
    sent, fp32 = exchange["bytes_sent_per_worker_per_step"], exchange["fp32_all_reduce_bytes_per_worker_per_step"]
    how = "an all-gather of packed sign bits" if exchange["transport"] == "gather" else "an all-reduce of integer votes"
    return (
        f"{exchange['replicas']} replicas apply the {exchange['aggregate']} of their signs: {sent:,} bytes sent per "
        f"worker per step ({how}), {fp32 / sent:.0f}x fewer than an fp32 gradient all-reduce's {fp32:,}"
    )


def _comm_words(comm: dict[str, Any]) -> str:
    if not comm["steps"]:
        return "n/a (nothing trained)"
    sent, link = comm["bytes_sent_per_rank_per_step"], comm["link_bytes_sent_per_rank_per_step"]
    words = (
        f"{max(sent):,.0f} bytes sent per rank per step in {comm['collectives_per_step']:.0f} collectives (ring "
        f"count, the largest rank's); to other nodes {max(link):,.0f}"
    )
    if comm["nodes"] > 1:
        words += f" (per node: {', '.join(f'{b:,.0f}' for b in comm['link_bytes_sent_per_node_per_step'])})"
    if comm["link_tx_bytes_per_node_per_step"]:
        tx = ", ".join(f"{b:,.0f}" for b in comm["link_tx_bytes_per_node_per_step"])
        words += f"; {comm['link_iface']} counted {tx} bytes sent per node per step"
    return words
