"""Ignite metrics every task uses, over MONAI's decollated outputs (a list of per-image dicts)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

__all__ = ["MeanOfOutput"]


def _identity(output: Any) -> Any:
    return output


class MeanOfOutput(Metric):
    """Mean over images of a per-image value stored under ``key`` (e.g. ``masked_l1``)."""

    def __init__(self, key: str, output_transform: Callable = _identity, device: str | torch.device = "cpu") -> None:
        self.key = key
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.tensor(0.0, dtype=torch.float64, device=self._device)
        self._count = torch.tensor(0, dtype=torch.long, device=self._device)

    @reinit__is_reduced
    def update(self, output: Sequence[dict[str, Any]]) -> None:
        for item in output:
            self._sum += float(item[self.key])
            self._count += 1

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        return float(self._sum / self._count) if int(self._count) else float("nan")
