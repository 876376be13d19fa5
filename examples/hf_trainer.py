"""Lion in the Hugging Face Trainer: `Trainer(optimizers=(lion_dist.Lion(...), scheduler))`, or from a DeepSpeed JSON.

    python examples/hf_trainer.py --steps 6 --save-steps 3                        # one process
    torchrun --nproc-per-node 2 examples/hf_trainer.py --steps 6                  # DDP: NCCL on GPUs, gloo on CPU
    python examples/hf_trainer.py --resume-from-checkpoint runs/hf_trainer/checkpoint-3 --out runs/hf_resumed
    torchrun --nproc-per-node 2 examples/hf_trainer.py --deepspeed examples/hf_ds_zero3.json   # DeepSpeed ZeRO-3
    torchrun --nproc-per-node 2 examples/hf_trainer.py --fsdp                      # the Trainer's FSDP2 (GPUs)

With `--deepspeed`, DeepSpeed builds Lion from the config's `"optimizer": {"type": "LionDist", "params": {"lr":
"auto", "betas": "auto", "weight_decay": "auto"}}`: the Trainer fills the "auto" values from TrainingArguments
(learning_rate, adam_beta1/adam_beta2, weight_decay) and the batch (train_batch_size = per-device batch x gradient
accumulation x ranks); the one line `lion_dist.deepspeed.register()` lets DeepSpeed find "LionDist", and Lion's
batch guard then checks DeepSpeed's train_batch_size. Without `--deepspeed`, the Trainer takes the optimizer you
pass; tell Lion the global batch yourself. With `--fsdp` (the Trainer's FSDP2) the Trainer refuses `optimizers=`
and builds Lion itself from `optimizer_cls_and_kwargs`, on the sharded params. The Trainer saves Lion's momentum in
each checkpoint's optimizer.pt (DeepSpeed: in its own checkpoint files), and `resume_from_checkpoint` continues the
run exactly.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from hf_toy import make_lm, token_dataset
from transformers import Trainer, TrainingArguments, get_cosine_schedule_with_warmup

import lion_dist
import lion_dist.deepspeed
from lion_dist.train.loop import close_process_groups


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train; return the Trainer's logged losses and the number of ranks (for the tests)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/hf_trainer", help="output_dir: checkpoints go to OUT/checkpoint-N")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--save-steps", type=int, default=3)
    parser.add_argument("--per-device-batch", type=int, default=32)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3, help="toy-sized; Lion wants 3-10x less than AdamW")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup-steps", type=int, default=0, help="> 0 needs a fix in lion_dist (README: limits)")
    parser.add_argument("--resume-from-checkpoint", default=None, help="a checkpoint-N directory of an earlier run")
    parser.add_argument("--deepspeed", default=None, help='a DeepSpeed JSON whose optimizer is "LionDist"')
    parser.add_argument("--fsdp", action="store_true", help="the Trainer's FSDP2 (Accelerate applies it on GPUs only)")
    args = parser.parse_args(argv)

    if args.deepspeed:
        lion_dist.deepspeed.register()  # the one line: DeepSpeed finds "LionDist" and trusts it under ZeRO
        if not torch.cuda.is_available():  # CPU only: the Trainer leaves DeepSpeed's comm down until it starts
            import deepspeed  # the engine, but ZeRO-3's zero.Init (when the model is built) needs the world size

            deepspeed.init_distributed(dist_backend="gloo")
    training_args = TrainingArguments(  # before the model: under ZeRO-3 it turns on zero.Init
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.per_device_batch,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        adam_beta1=0.9,  # DeepSpeed's "betas": "auto" reads these: Lion's defaults are (0.9, 0.99)
        adam_beta2=0.99,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        save_steps=args.save_steps,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        deepspeed=args.deepspeed,
        fsdp="full_shard" if args.fsdp else "",
        fsdp_config={"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]} if args.fsdp else None,
        seed=0,
    )
    model = make_lm()
    world = training_args.world_size
    lion_args = dict(lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    global_batch = args.per_device_batch * args.grad_accum * world
    optimizers: tuple[Any, Any] = (None, None)  # with --deepspeed, DeepSpeed builds Lion from the config
    build: Any = None
    if args.fsdp:  # the Trainer builds Lion after sharding (it applies weight decay to weights only)
        build = (lion_dist.Lion, {**lion_args, "global_batch_size": global_batch})
    elif not args.deepspeed:
        optimizer = lion_dist.Lion(model.parameters(), **lion_args, global_batch_size=global_batch)
        scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, args.steps)  # as "cosine" above
        optimizers = (optimizer, scheduler)
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=token_dataset(1024),
        optimizers=optimizers,
        optimizer_cls_and_kwargs=build,
    )
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    if trainer.is_world_process_zero():
        print(f"loss {losses[0]:.5f} -> {losses[-1]:.5f} after {trainer.state.global_step} steps on {world} ranks")
    return {"losses": losses, "world": world}


if __name__ == "__main__":
    main()
    close_process_groups()  # after main's Trainer is gone: no gloo thread outlives the interpreter
