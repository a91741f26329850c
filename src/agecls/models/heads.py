"""The regression heads grafted onto a backbone: Linear layers with GELU between them."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


class MLPHead(nn.Sequential):
    """features -> hidden[0] -> ... -> hidden[-1] -> 1, GELU after every hidden Linear.

    With the study's sizes (small: 512, 256, 32; large: 2048, 512, 128) the Linear layers have
    exactly the parameter counts of its tables, e.g. 512->256 has 512*256 + 256 = 131,328.
    """

    def __init__(self, in_features: int, hidden: Sequence[int], dropout: float = 0.0) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            layers += [nn.Linear(width, int(size)), nn.GELU()]
            width = int(size)
        layers.append(nn.Linear(width, 1))
        super().__init__(*layers)
        self.in_features = in_features
        self.hidden = [int(h) for h in hidden]

    def linear_param_counts(self) -> list[int]:
        return [sum(p.numel() for p in m.parameters()) for m in self if isinstance(m, nn.Linear)]
