"""Lion from a DeepSpeed JSON config: `"optimizer": {"type": "LionDist", "params": {...}}`, any ZeRO stage.

    launch/deepspeed.sh launch/ds_zero2.json examples/deepspeed_json.py --steps 100
    launch/deepspeed.sh launch/ds_zero3_offload.json examples/deepspeed_json.py --steps 100   # ZeRO-Offload

`lion_dist.deepspeed.initialize` is `deepspeed.initialize` plus the "LionDist" entry; it checks DeepSpeed's
train_batch_size (micro batch x gradient accumulation x data-parallel ranks) against Lion's minimum of 64.
DeepSpeed picks NCCL on GPUs and gloo on CPU (set DS_ACCELERATOR=cpu there to skip its detection).
"""

from __future__ import annotations

import argparse

from torch import nn
from toy import eval_loss, make_batch, make_model

import lion_dist.deepspeed
from lion_dist.train.loop import close_process_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--deepspeed_config", required=True, help="a DeepSpeed JSON config, e.g. launch/ds_zero2.json")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    args = parser.parse_args()

    engine, _, _, _ = lion_dist.deepspeed.initialize(model=make_model(), config=args.deepspeed_config)
    rank, world = engine.global_rank, engine.dp_world_size
    micro, accum = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()

    first = eval_loss(engine, engine.device)
    for step in range(args.steps):
        x, y = make_batch(step, engine.train_batch_size())
        for k in range(accum):  # engine.step() applies Lion at the end of each accumulation
            lo = (k * world + rank) * micro  # this rank's slice of this micro step
            loss = nn.functional.mse_loss(
                engine(x[lo : lo + micro].to(engine.device)), y[lo : lo + micro].to(engine.device)
            )
            engine.backward(loss)
            engine.step()
    last = eval_loss(engine, engine.device)
    if rank == 0:
        print(f"eval loss {first:.5f} -> {last:.5f} after {args.steps} steps on {world} ranks")


if __name__ == "__main__":
    main()
    close_process_groups()  # after main's engine is gone: no gloo thread outlives the interpreter
