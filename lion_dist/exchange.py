"""What a split step plugs into `Lion`: a direction exchange (Distributed Lion's 1-bit vote is the one we have).

Without an exchange, `Lion.step` runs one fused step per group. With an active one it splits the step: the exchange
takes every group's local directions (the sign of `b1 * m + (1 - b1) * g`, each momentum advanced: `Bound.direction`,
or earlier, while backward still runs), agrees with the other replicas, and the optimizer applies the agreed
directions (`p <- p * (1 - lr * wd) - lr * u`: `Bound.apply`). Replicas then keep momenta of their own,
which a checkpoint must keep apart: the exchange turns the optimizer's state dict into one that holds every
replica's (`stacked_state_dict`) and back (`unstacked_state_dict`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from lion_dist.backends import StepArgs
    from lion_dist.plan import Bound


class DirectionExchange(ABC):
    """How replicas agree on one direction per element."""

    @abstractmethod
    def active(self) -> bool:
        """Whether there is anything to exchange (more than one replica)."""

    def check_group(self, group: dict[str, Any]) -> None:
        """Raise a ValueError for a param group whose settings the exchange cannot keep consistent."""
        return

    def data_parallel_size(self, params: Sequence[Tensor]) -> int | None:
        """How many ranks see different data, for the batch guard (None: the params' layout says)."""
        return None

    @abstractmethod
    def exchange(
        self, bound: Sequence[Bound], args: Sequence[StepArgs], groups: Sequence[dict[str, Any]]
    ) -> list[list[Tensor] | None]:
        """Every group's agreed directions, one per entry of its plan (None: leave that group's params)."""

    def stacked_state_dict(
        self, state_dict: dict[str, Any], param_groups: Sequence[dict[str, Any]]
    ) -> dict[str, Any]:
        """The optimizer's state dict with state that differs between replicas kept for every replica."""
        return state_dict

    def unstacked_state_dict(
        self, state_dict: dict[str, Any], param_groups: Sequence[dict[str, Any]]
    ) -> dict[str, Any]:
        """This replica's part of a `stacked_state_dict` (checked)."""
        return state_dict
