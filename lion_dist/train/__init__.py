"""The main job: a small GPT-style character-level language model trained with FSDP2 and `lion_dist.Lion`.

`lion-dist train` launches it on local workers, `lion-dist compare` runs Lion against AdamW, and
`torchrun --nproc-per-node N -m lion_dist.train` runs it under a user's own launcher.
"""
