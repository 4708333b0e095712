"""Plugin state whose shape is known only once it exists (queues, banks, cluster labels)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class ResizableBuffers(nn.Module):
    """Mixin for modules whose buffers named in ``resizable_buffers`` are created small (or
    empty) and take their size later (e.g. a queue's key width, a per-epoch selection): on
    ``load_state_dict`` each such buffer first takes the shape it has in the state, keeping its
    own dtype and device, so a fresh instance loads a trained one's state. List this class
    before the interface: ``class MemoryBank(ResizableBuffers, Teacher)``."""

    resizable_buffers: ClassVar[tuple[str, ...]] = ()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        for name in self.resizable_buffers:
            value = state_dict.get(prefix + name)
            current = getattr(self, name)
            if isinstance(value, Tensor) and value.shape != current.shape:
                setattr(self, name, torch.zeros(value.shape, dtype=current.dtype, device=current.device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
