"""The Triton launcher's device tables: what a launch reads besides the tensors it updates.

- Static tables (pointers, layouts, program maps) of a prepared route: built once on the host and uploaded with
  `upload`: on CUDA through pinned memory with one non-blocking copy (the caching host allocator keeps the pinned
  block until its copy has run), so a plan build, or a one-shot `functional.lion` call, never makes a pageable,
  blocking copy.
- `DeviceTable`: a persistent int64 device tensor the host rewrites only when its values change: this step's
  gradient (or direction) addresses, and the host part of the hyperparameters. STAGING pinned staging buffers
  take turns, each with an event recorded after its copy, so the host never overwrites values that a still queued
  copy has yet to read, and waits (on an event, never on the stream) only when it runs STAGING uploads ahead of the
  device (a float lr schedule uploads every step); nothing is copied when the values are the last upload's
  (persistent gradients, a constant or device lr), and nothing is allocated per step.
- `HyperTable`: the hyperparameters as one device tensor (`kernels.HP_SLOTS` int64; lr, betas, 1 - betas and the
  weight decay as float64 bit patterns, the Philox keys, their device step counts, flags), which every kernel reads.
  Values known on the host (a float lr, the betas, the weight decay, integer keys) travel through a `DeviceTable`;
  a device lr tensor and a device step count (`spec.DeviceKey`) are copied into their slots by device-side copies,
  every step. A float lr and a tensor lr are the same to the kernels, and a capturable step is one whose host
  values stay put.

CUDA graphs. A captured graph replays the device work the capture recorded: kernel launches with the arguments
they had (the addresses of these tables, of the hp table, of the skip flag), device-to-device copies, and
host-to-device copies from the host buffers they named. No Python runs at a replay. Therefore:
- static tables and address tables are read at a replay as they are: they must not need an upload during the
  capture (an upload raises: take one step before capturing, and keep the gradients alive between steps);
- the hp table's host values are uploaded only when they change, must not change during a capture (that raises)
  and keep, at every replay, what they were at the capture: a float lr that a scheduler changes later never
  reaches the graph. (Recording their host-to-device copy instead would not help: each replay would copy whatever
  the staging buffer holds by then, which the eager steps that alternate between the buffers overwrite.);
- the device-side copies from the lr tensor and from the step count are recorded by the capture, so every replay
  re-executes them: it reads the lr that a scheduler wrote into the lr tensor in place between replays
  (`torch.optim.lr_scheduler` fills a tensor lr in place) and the step count that the previous replay advanced.
  That is how a schedule reaches a captured step: give `lr` as a 1-element tensor on the params' device.
"""

from __future__ import annotations

import ctypes
import struct
from array import array

import numpy as np
import torch
from torch import Tensor

from lion_dist.backends import StepArgs
from lion_dist.backends.triton import kernels as k
from lion_dist.spec import DeviceKey

STAGING = 4  # pinned staging buffers per table: the host waits at most for the copy made STAGING uploads ago
_F64 = struct.Struct("<d")
_I64 = struct.Struct("<q")


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def upload(values: np.ndarray, device: torch.device) -> Tensor:
    """A static int64 table on `device` (a fresh array: on CPU the tensor shares its memory)."""
    if capturing():
        raise RuntimeError(
            "lion_dist: a CUDA graph is being captured, but this step must build launch tables (a new plan, a new "
            "alignment of the gradients, or the first split step), whose host copies a replay would not redo. "
            + _REPLAY
        )
    host = torch.from_numpy(np.ascontiguousarray(values, dtype=np.int64))
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class DeviceTable:
    """`n` int64 values on the device, rewritten from the host only when they change (see the module docstring).

    `changed` words the error for a change during a CUDA-graph capture: a replay would not redo the copy.
    """

    def __init__(self, device: torch.device, n: int, changed: str) -> None:
        self.device, self.n, self.changed = device, n, changed
        self.tensor = torch.zeros(n, dtype=torch.int64, device=device)
        self.last: array | None = None  # the values the device tensor holds
        self._host: list[Tensor] = []  # pinned staging (CUDA), allocated at the first uploads
        self._events: list = []
        self._turn = 0

    def upload(self, values: array) -> bool:
        """Make the device tensor hold `values` (n int64); whether they changed (and were copied)."""
        if values == self.last:
            return False
        if capturing():
            raise RuntimeError(f"lion_dist: {self.changed} while a CUDA graph was being captured. {_REPLAY}")
        if self.device.type != "cuda":
            ctypes.memmove(self.tensor.data_ptr(), values.buffer_info()[0], 8 * self.n)
        else:
            if len(self._host) <= self._turn:
                self._host.append(torch.empty(self.n, dtype=torch.int64, pin_memory=True))
                self._events.append(torch.cuda.Event())
            else:
                self._events[self._turn].synchronize()  # its previous copy has run (normally long ago)
            host = self._host[self._turn]
            ctypes.memmove(host.data_ptr(), values.buffer_info()[0], 8 * self.n)
            self.tensor.copy_(host, non_blocking=True)
            self._events[self._turn].record()
            self._turn = (self._turn + 1) % STAGING
        self.last = array("q", values)
        return True


_REPLAY = (
    "A graph replays the tables it was captured with: take one step before capturing, keep the gradients alive "
    "between steps (zero_grad(set_to_none=False)), use capturable=True (the step count on the device), and give lr "
    "as a 1-element tensor on the params' device, whose value every replay reads (a float lr is fixed at capture)"
)


def _float_bits(x: float) -> int:
    return _I64.unpack(_F64.pack(x))[0]


def _one_element(t: Tensor, dtypes: tuple[torch.dtype, ...], what: str, device: torch.device) -> Tensor:
    if t.numel() != 1 or t.dtype not in dtypes or t.device != device:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise ValueError(
            f"{what} for the Triton kernel must be one {names} element on {device}, got {t.numel()} {t.dtype} "
            f"element(s) on {t.device}"
        )
    return t.reshape(1)


class HyperTable:
    """The hyperparameters of a prepared route as one int64 device tensor (`kernels.HP_SLOTS`; see the module
    docstring): `write(args)` fills it for a step and returns it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.values = DeviceTable(
            device, k.HP_SLOTS.value, "lr, betas, weight decay or a stochastic-rounding key given as a number changed"
        )
        table = self.values.tensor
        self._lr = table[k.HP_LR.value : k.HP_LR.value + 1].view(torch.float64)
        self._sr_step = table[k.HP_SR_STEP.value : k.HP_SR_STEP.value + 1]
        self._quant_step = table[k.HP_QUANT_STEP.value : k.HP_QUANT_STEP.value + 1]
        assert k.HP_QUANT_STEP.value == k.HP_SR_STEP.value + 1
        self._steps = table[k.HP_SR_STEP.value : k.HP_QUANT_STEP.value + 1]
        self._host_values: tuple | None = None  # what the host part was last uploaded from

    def write(self, args: StepArgs) -> Tensor:
        """This step's table: the host values uploaded if they changed, then the device copies (a tensor lr, device
        step counts), in stream order before the launches that read them."""
        hp, sr_key, quant_key = args.hp, args.sr_key, args.quant_key
        lr = hp.lr
        if isinstance(lr, Tensor):
            lr = _one_element(lr, (torch.float32, torch.float64), "a tensor lr", self.device)
        # what the host part depends on (a DeviceKey by its base: its step is copied on the device)
        host = (
            None if isinstance(lr, Tensor) else lr, hp.beta1, hp.beta2, hp.weight_decay, hp.maximize,
            sr_key.base if isinstance(sr_key, DeviceKey) else sr_key, isinstance(sr_key, DeviceKey),
            quant_key.base if isinstance(quant_key, DeviceKey) else quant_key, isinstance(quant_key, DeviceKey),
        )  # fmt: skip
        if host != self._host_values:  # else the device holds them (under a capture, `upload` refuses a change)
            self._upload(host, lr, sr_key, quant_key)
        steps = [key.step for key in (sr_key, quant_key) if isinstance(key, DeviceKey)]
        steps = [_one_element(step, (torch.int64,), "a device step count", self.device) for step in steps]
        if isinstance(lr, Tensor):
            self._lr.copy_(lr)
        if len(steps) == 2 and steps[0].data_ptr() == steps[1].data_ptr():
            self._steps.copy_(steps[0].expand(2))  # one copy for both keys' shared step count
        elif len(steps) == 2:
            self._sr_step.copy_(steps[0])
            self._quant_step.copy_(steps[1])
        elif steps:
            (self._sr_step if isinstance(sr_key, DeviceKey) else self._quant_step).copy_(steps[0])
        return self.values.tensor

    def _upload(self, host: tuple, lr, sr_key, quant_key) -> None:
        slots = [0] * k.HP_SLOTS.value
        if not isinstance(lr, Tensor):
            slots[k.HP_LR.value] = _float_bits(float(lr))
        _, beta1, beta2, weight_decay, maximize = host[:5]
        sign = -1.0 if maximize else 1.0  # fma(-g, b, x) == fma(g, -b, x) exactly
        slots[k.HP_BETA1.value] = _float_bits(float(beta1))
        slots[k.HP_ONE_MINUS_BETA1.value] = _float_bits(sign * (1.0 - beta1))
        slots[k.HP_BETA2.value] = _float_bits(float(beta2))
        slots[k.HP_ONE_MINUS_BETA2.value] = _float_bits(sign * (1.0 - beta2))
        slots[k.HP_WEIGHT_DECAY.value] = _float_bits(float(weight_decay))
        flags = 0
        for key, slot, sr_flag, step_flag in (
            (sr_key, k.HP_SR_KEY, k.PARAM_SR, k.SR_KEY_STEP),
            (quant_key, k.HP_QUANT_KEY, k.QUANT_SR, k.QUANT_KEY_STEP),
        ):
            if key is None:
                continue
            flags |= sr_flag.value
            if isinstance(key, DeviceKey):
                flags |= step_flag.value
                slots[slot.value] = key.base
            else:
                slots[slot.value] = key
        slots[k.HP_FLAGS.value] = flags
        self.values.upload(array("q", slots))
        self._host_values = host
