"""The per-group step plan: what does not change between steps, computed once and reused.

A plan holds, for one param group and one set of params that have gradients: each param's local view and momentum, where
every tensor goes (the backend its declaration in `lion_dist.backends` picks) and what each backend prepared (pointer
tables, buckets, layouts). A step then only reads what must be read: each param's gradient, checked against the plan in
a few C-level passes (`map` over the list: dtype, contiguity, DTensor spec), and the addresses of the params' local
storage, whose change (`p.data = ...`) rebuilds the plan. The plan keeps references to the tensors it prepared, so a
kernel never sees freed memory.

Everything the plan depends on is in its key or checked: the params of the group (ZeRO-3 swaps them in and out,
so a group keeps several plans), which of them have gradients, the hyperparameters that choose backends
(`ROUTING_KEYS`, and whether lr is a tensor), the gradients' dtypes (and layouts), and the params' storage.
The optimizer drops every plan on `load_state_dict` (new momentum tensors) and on `add_param_group`.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import compress, repeat
from operator import attrgetter, is_, is_not
from typing import Any

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

from lion_dist import _torch, backends, formats, layouts
from lion_dist.backends import Backend, Entry, Need, NoisePlace, StepArgs
from lion_dist.formats import compensation
from lion_dist.layouts import Layout

ROUTING_KEYS = (
    "backend",
    "cautious_factor",
    "cautious_wd",
    "stochastic_rounding",
    "momentum_dtype",
    "int8_block_size",
    "compensation",
    "capturable",
)
MAX_PLANS_PER_GROUP = 256  # ZeRO-3 calls step() once per sub-group, each with its own params

_grad = attrgetter("grad")
_is_sparse = attrgetter("is_sparse")
_dtype = attrgetter("dtype")
_data_ptr = Tensor.data_ptr


@dataclass
class Route:
    """One backend's share of a plan: which entries, and what the backend prepared for them."""

    backend: Backend
    index: list[int]  # positions in the plan's entries
    prepared: Any


@dataclass
class GroupPlan:
    """See the module docstring. Built by `build`; `bind` checks a step's gradients against it."""

    params: tuple[Tensor, ...]  # the group's params, all of them
    mask: list[bool] | None  # which have a gradient (None: all)
    signature: tuple  # the routing hyperparameters it was built for
    dtensor_specs: list[Any] | None  # per param with a gradient: the spec its DTensor gradient must have
    grad_dtypes: list[torch.dtype]
    grad_sizes: list[torch.Size]
    grad_devices: list[int]
    nonempty: list[int] | None  # of the params with a gradient, those with local elements (None: all)
    present: list[Tensor]  # the params with a gradient (empty local shards included: collectives count them)
    present_layouts: list[Layout]
    entries: list[Entry]
    entry_params: list[Tensor]  # the (global) param of each entry
    entry_numels: list[int]  # elements of each entry's whole param, as real numbers (a complex one counts 2)
    complex: list[bool] | None  # of the params with a gradient, which are complex (None: none)
    entry_positions: list[int]  # each entry's index in the group, to name it in errors
    local_params: list[Tensor]  # what the entries update (DTensors: their local tensors)
    param_ptrs: Any  # their addresses, checked every step
    routes: list[Route]
    staged: list[tuple[Tensor, Tensor]]  # (strided original, contiguous copy a fused backend updates)


class Bound:
    """A plan and this step's local, contiguous gradients, one per entry."""

    __slots__ = ("grads", "plan")

    def __init__(self, plan: GroupPlan, grads: list[Tensor]) -> None:
        self.plan, self.grads = plan, grads

    def step(self, args: StepArgs) -> None:
        """One Lion step of every entry, each route on its backend."""
        single = len(self.plan.routes) == 1
        with _staged(self.plan):
            for route in self.plan.routes:
                grads = self.grads if single else [self.grads[i] for i in route.index]
                route.backend.step(route.prepared, grads, args.subset(route.index))

    def direction(self, args: StepArgs) -> list[Tensor]:
        """Each entry's sign of `c`, momentum advanced (the first half of Distributed Lion's step)."""
        result: list[Tensor] = list(self.grads)
        with _staged(self.plan):
            for route in self.plan.routes:
                directions = route.backend.direction(route.prepared, [self.grads[i] for i in route.index], args)
                for i, u in zip(route.index, directions, strict=True):
                    result[i] = u
        return result

    def apply(self, directions: Sequence[Tensor], args: StepArgs) -> None:
        """`p <- p * (1 - lr * wd) - lr * u` on every entry (the second half)."""
        with _staged(self.plan):
            for route in self.plan.routes:
                route.backend.apply(route.prepared, [directions[i] for i in route.index], args)


@contextmanager
def _staged(plan: GroupPlan) -> Iterator[None]:
    """Around a fused backend's work: strided originals into their contiguous copies, and back."""
    for original, copy in plan.staged:
        copy.copy_(original)
    yield
    for original, copy in plan.staged:
        original.copy_(copy)


def signature(group: dict[str, Any]) -> tuple:
    """What of a group's hyperparameters decides where its tensors go."""
    return (*(group[k] for k in ROUTING_KEYS), isinstance(group["lr"], Tensor))


class PlanCache:
    """Each group's recent plans, newest last; `bind` returns a plan for this step, building one if needed."""

    def __init__(self) -> None:
        self._plans: dict[Hashable, OrderedDict[tuple, GroupPlan]] = {}

    def clear(self) -> None:
        self._plans.clear()

    def __len__(self) -> int:
        return sum(len(plans) for plans in self._plans.values())

    def bind(
        self,
        gi: Hashable,
        group: dict[str, Any],
        state: dict[Tensor, dict[str, Any]],
        name: Callable[[int], str],
        *,
        split: bool = False,
    ) -> Bound:
        """This step's plan of group `gi` (its index, or another key for a plan of some of its params) with its
        gradients. `name(pi)` names param `pi` in errors; `split`: the backends must have a split step
        (Distributed Lion)."""
        params = group["params"]
        grads = list(map(_grad, params))
        mask = None if all(map(is_not, grads, repeat(None))) else list(map(is_not, grads, repeat(None)))
        if any(map(_is_sparse, compress(grads, mask) if mask is not None else grads)):
            # Lion moves every element (sign(b1 * m) where a row has no gradient): a sparse gradient
            # (nn.Embedding(sparse=True)) is used densified, which is lion-pytorch's arithmetic too
            grads = [g.to_dense() if g is not None and g.is_sparse else g for g in grads]
        sig = (*signature(group), split)
        plans = self._plans.setdefault(gi, OrderedDict())
        present = grads if mask is None else list(compress(grads, mask))
        plan = _find(plans, params, mask, sig)
        local_grads = None if plan is None else _check(plan, present)
        if local_grads is None:  # a new plan: this raises if a gradient does not fit its param
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    "lion_dist: a CUDA graph is being captured, but this step needs a new plan (the first step, or "
                    "new params, gradients or settings), whose tables are built with host copies that a capture "
                    "cannot record. Take one step before capturing, and keep the gradients alive between steps "
                    "(zero_grad(set_to_none=False))."
                )
            key = (tuple(map(id, params)), None if mask is None else tuple(mask), sig)
            for stale in [k for k, other in plans.items() if other.signature != sig]:
                del plans[stale]  # built for other routing keys: `build` may replace the state tensors they hold
            plan = plans[key] = build(group, state, name, grads, mask, sig, split)
            plans.move_to_end(key)
            if len(plans) > MAX_PLANS_PER_GROUP:
                plans.popitem(last=False)
            local_grads = _check(plan, present)
            assert local_grads is not None, "a freshly built plan accepts the gradients it was built from"
        if plan.complex is not None:  # Lion is element-wise: real and imaginary parts are elements of their own
            local_grads = [torch.view_as_real(g) if c else g for g, c in zip(local_grads, plan.complex, strict=True)]
        if plan.nonempty is not None:
            local_grads = [local_grads[i] for i in plan.nonempty]
        if not all(map(Tensor.is_contiguous, local_grads)):
            local_grads = [g.contiguous() for g in local_grads]
        return Bound(plan, local_grads)


def array_of(tensors: Sequence[Tensor]) -> array:
    """The addresses of `tensors`, as a compact array (compared with `==` in one C-level pass)."""
    return array("q", map(_data_ptr, tensors))


def _find(plans: OrderedDict[tuple, GroupPlan], params: list[Tensor], mask: list[bool] | None, sig: tuple):
    """The plan for these params, gradient mask and routing hyperparameters, if there is one (newest first)."""
    newest = next(reversed(plans.values()), None)
    if newest is not None and _fits(newest, params, mask, sig):
        return newest
    key = (tuple(map(id, params)), None if mask is None else tuple(mask), sig)
    plan = plans.get(key)
    if plan is not None and _fits(plan, params, mask, sig):
        plans.move_to_end(key)
        return plan
    return None


def _fits(plan: GroupPlan, params: Sequence[Tensor], mask: list[bool] | None, sig: tuple) -> bool:
    return (
        plan.signature == sig
        and plan.mask == mask
        and len(plan.params) == len(params)
        and all(map(is_, plan.params, params))
    )


def _check(plan: GroupPlan, present: list[Tensor]) -> list[Tensor] | None:
    """This step's local gradients if they and the params' storage still fit `plan`, else None."""
    local_grads = _check_grads(plan, present)
    if local_grads is None or array_of(plan.local_params) != plan.param_ptrs or _locals_moved(plan):
        return None
    return local_grads


def _locals_moved(plan: GroupPlan) -> bool:
    """Whether a DTensor param's local tensor is no longer the one the plan prepared (e.g. FSDP2 resharded it)."""
    if plan.dtensor_specs is None:
        return False
    return not all(map(is_, map(layouts.local, plan.entry_params), plan.local_params))


def _check_grads(plan: GroupPlan, present: list[Tensor]) -> list[Tensor] | None:
    """The local gradients of the params that have one, if they fit the plan; None if anything differs.

    torch itself keeps a plain param's `.grad` the param's shape and on its device (assigning one that is not
    raises), so per step only the dtype is checked (`grad_dtype=None` lets it differ); a DTensor gradient must
    have its param's spec: the very object (what FSDP2 hands over), or an equal layout and the planned local
    sizes and devices.
    """
    try:
        if plan.dtensor_specs is not None:
            specs = list(map(_torch.spec, present))
            same = all(map(is_, specs, plan.dtensor_specs))
            if not same and not all(map(_same_layout, specs, plan.dtensor_specs)):
                return None
            present = list(map(layouts.local, present))
            if not same and (
                list(map(Tensor.size, present)) != plan.grad_sizes
                or list(map(Tensor.get_device, present)) != plan.grad_devices
            ):
                return None
        if list(map(_dtype, present)) != plan.grad_dtypes:
            return None
    except (AttributeError, RuntimeError):  # a plain gradient for a DTensor param, a sparse gradient, ...
        return None
    return present


def _same_layout(spec: Any, expected: Any) -> bool:
    """A gradient's DTensor spec (None: a plain tensor) lays its elements out like its param's (FSDP2 shares the
    very spec object)."""
    if spec is None or expected is None:
        return spec is expected
    return spec is expected or (spec.mesh == expected.mesh and spec.placements == expected.placements)


def _validated_local_grad(p: Tensor, grad: Tensor, layout: Layout, name: str) -> Tensor:
    """`grad` (the param's, densified if it was sparse), its local part checked against the param's."""
    local_g = layout.local(grad) if grad is not p.grad else layout.local_grad(p, name)
    if local_g.is_sparse or local_g.layout != torch.strided:
        raise TypeError(f"Lion needs dense (strided) gradients, got a {local_g.layout} one for {name}")
    if local_g.shape != layout.local(p).shape:
        raise ValueError(
            f"{name}: the local gradient has shape {tuple(local_g.shape)}, the local param "
            f"{tuple(layout.local(p).shape)}; a gradient must match its param element for element"
        )
    return local_g


def _real(t: Tensor) -> Tensor:
    """A complex tensor's real view (Lion is element-wise: real and imaginary parts are elements of their own)."""
    return torch.view_as_real(t) if t.is_complex() else t


def build(
    group: dict[str, Any],
    state: dict[Tensor, dict[str, Any]],
    name: Callable[[int], str],
    grads: list[Tensor | None],
    mask: list[bool] | None,
    sig: tuple,
    split: bool,
) -> GroupPlan:
    """Validate a group's params and gradients, create or convert their state, and route and prepare every
    tensor."""
    params = group["params"]
    positions = [pi for pi, g in enumerate(grads) if g is not None]
    present_layouts = [layouts.of(params[pi]) for pi in positions]
    local_grads = [
        _validated_local_grad(params[pi], grads[pi], layout, name(pi))
        for pi, layout in zip(positions, present_layouts, strict=True)
    ]
    group_format = formats.of_group(group)

    entries: list[Entry] = []
    entry_params, entry_numels, entry_positions, nonempty = [], [], [], []
    staged: list[tuple[Tensor, Tensor]] = []
    originals: list[tuple[Tensor, Tensor]] = []
    chosen: dict[tuple[str, torch.device], list[int]] = {}
    for k, (pi, g, layout) in enumerate(zip(positions, local_grads, present_layouts, strict=True)):
        p = params[pi]
        formats.conform(p, state[p], group, layout, create=True)
        local_p = layout.local(p)
        if local_p.numel() == 0:  # an empty shard (FSDP uneven sharding): nothing to update
            continue
        fmt = group_format.for_param(p)
        local_state = tuple(_real(layout.local(state[p][key])) for key in fmt.keys)
        local_c = state[p].get(compensation.KEY)
        local_p, g = _real(local_p), _real(g)
        momentum_dtype = fmt.float_dtype(p)
        need = Need(
            local_p.device.type,
            (local_p.dtype, g.dtype, local_state[0].dtype if momentum_dtype is not None else torch.float32),
            cautious=group["cautious_factor"] is not None or group["cautious_wd"],
            stochastic_rounding=group["stochastic_rounding"] and local_p.dtype == torch.bfloat16,
            split=split,
            capturable=group["capturable"],
            compensation=local_c is not None,
            format=fmt.kind,
        )
        try:
            backend = backends.select(group["backend"], need)
        except (ValueError, RuntimeError) as error:
            raise type(error)(f"{name(pi)}: {error}") from error
        entry_params.append(p)
        entry_numels.append(p.numel() * (2 if p.is_complex() else 1))
        entry_positions.append(pi)
        nonempty.append(k)
        originals.append((local_p, local_state[0]))
        if not backends.capabilities(backend).strided:  # a fused kernel updates contiguous copies of strided tensors
            local_p = staged_copy(local_p, staged)
            local_state = tuple(staged_copy(t, staged) for t in local_state)
        base, shard = layout.noise_place()
        if p.is_complex():
            base *= 2
        chosen.setdefault((backend, local_p.device), []).append(len(entries))
        entries.append(
            Entry(
                local_p,
                local_state,
                fmt,
                g.dtype,
                NoisePlace(pi, base, shard),
                compensation=None if local_c is None else layout.local(local_c),
            )
        )

    backends.refuse_overlaps(originals, [name(pi) for pi in entry_positions])
    routes = []
    for (backend_name, _), index in chosen.items():
        backend = backends.get(backend_name)
        routes.append(Route(backend, index, backend.prepare([entries[i] for i in index])))
    local_params = [layouts.local(p) for p in entry_params]
    any_dtensor = any(isinstance(params[pi], DTensor) for pi in positions)
    return GroupPlan(
        params=tuple(params),
        mask=mask,
        signature=sig,
        dtensor_specs=[_torch.spec(params[pi]) for pi in positions] if any_dtensor else None,
        grad_dtypes=[g.dtype for g in local_grads],
        grad_sizes=[g.size() for g in local_grads],
        grad_devices=[g.get_device() for g in local_grads],
        nonempty=None if len(nonempty) == len(positions) else nonempty,
        present=[params[pi] for pi in positions],
        present_layouts=present_layouts,
        entries=entries,
        entry_params=entry_params,
        entry_numels=entry_numels,
        complex=[params[pi].is_complex() for pi in positions]
        if any(params[pi].is_complex() for pi in positions)
        else None,
        entry_positions=entry_positions,
        local_params=local_params,
        param_ptrs=array_of(local_params),
        routes=routes,
        staged=staged,
    )


def staged_copy(tensor: Tensor, staged: list[tuple[Tensor, Tensor]]) -> Tensor:
    """`tensor` itself if contiguous, else a persistent contiguous copy that `Bound.step` syncs around the step."""
    if tensor.is_contiguous():
        return tensor
    copy = tensor.contiguous()
    staged.append((tensor, copy))
    return copy
