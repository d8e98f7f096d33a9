"""What every task needs across processes (DDP under torchrun): gathering per-process rows."""

from __future__ import annotations

import ignite.distributed as idist
import torch

__all__ = ["gather_rows"]


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0 tensors whose number of rows may differ between processes."""
    if idist.get_world_size() == 1:
        return t
    n = torch.tensor([t.shape[0]], dtype=torch.long, device=t.device)
    sizes = [int(s) for s in idist.all_gather(n)]
    # torch.distributed.all_gather needs equal shapes: pad to the largest, then trim each part
    pad = torch.zeros((max(sizes) - t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    gathered = idist.all_gather(torch.cat([t, pad]))
    parts = gathered.reshape(len(sizes), max(sizes), *t.shape[1:])
    return torch.cat([parts[i, :s] for i, s in enumerate(sizes)])
