"""Validation metrics of pretraining, as Ignite metrics over MONAI's decollated outputs.

They take ``engine.state.output`` as MONAI leaves it after decollation: a list of
per-image dicts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce

from echocare.ontology import AnatomyOntology

__all__ = ["AnatomyLevelAccuracy"]


def _identity(output: Any) -> Any:
    return output


class AnatomyLevelAccuracy(Metric):
    """Top-1 accuracy of the anatomy classifier at one level of the tree.

    For each item labelled at least down to ``level``, the prediction descends the tree
    greedily from the root (the best region by coherent score, then its best organ, ...)
    down to that level; it is correct when that node is the label truncated to ``level``.
    Unlike a thresholded path this rewards ranking, so it is informative from the first
    epochs. NaN when no item reaches that level. Reads ``anatomy_scores`` (N,) and
    ``anatomy`` (the label path, "" if none) from each decollated output item.

    Args:
        ontology: the anatomy tree.
        level: ``"region"``, ``"organ"`` or ``"structure"`` (or 0, 1, 2).
    """

    def __init__(
        self,
        ontology: AnatomyOntology,
        level: str | int,
        output_transform: Callable = _identity,
        device: str | torch.device = "cpu",
    ) -> None:
        self.ontology = ontology
        self.level = level
        self.depth = ontology.level_names.index(level) if isinstance(level, str) else int(level)
        super().__init__(output_transform=output_transform, device=device)

    def greedy_node(self, scores: torch.Tensor) -> int:
        """Index of the node reached at ``self.depth`` by greedy descent over (N,) scores."""
        candidates = self.ontology.regions()
        node = max(candidates, key=lambda i: float(scores[i]))
        for _ in range(self.depth):
            children = self.ontology.children(node)
            if not children:
                break
            node = max(children, key=lambda i: float(scores[i]))
        return node

    @reinit__is_reduced
    def reset(self) -> None:
        self._correct = torch.tensor(0, dtype=torch.long, device=self._device)
        self._count = torch.tensor(0, dtype=torch.long, device=self._device)

    @reinit__is_reduced
    def update(self, output: Sequence[dict[str, Any]]) -> None:
        for item in output:
            truth = self.ontology.truncate(item.get("anatomy") or None, self.depth)
            if truth is None:
                continue
            predicted = self.ontology.nodes[self.greedy_node(torch.as_tensor(item["anatomy_scores"]))]
            self._correct += int(predicted == truth)
            self._count += 1

    @sync_all_reduce("_correct", "_count")
    def compute(self) -> float:
        return float(self._correct) / float(self._count) if int(self._count) else float("nan")
