"""The heads grafted onto a backbone: Linear layers with GELU between them, and an output layer
whose width the loss decides (agecls.models.losses: 1 for regression, K age classes, K-1 thresholds)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


class CoralLayer(nn.Module):
    """CORAL's output layer (Cao, Mirjalili and Raschka 2020): one weight vector shared by the K-1
    binary tasks "age > threshold k" and K-1 biases. Sharing the weights is what makes the K-1
    probabilities rank-consistent (they fall with k for every input), so their sum is an age.

    Parameters: in_features + K-1 (a Linear of width K-1 would have (in_features + 1) * (K-1)).
    The biases start evenly spaced from 1 down to 1/(K-1), as coral-pytorch's CoralLayer does,
    so training starts with ordered thresholds.
    """

    def __init__(self, in_features: int, num_thresholds: int) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(num_thresholds)
        self.weight = nn.Linear(self.in_features, 1, bias=False)
        self.bias = nn.Parameter(torch.arange(num_thresholds, 0, -1, dtype=torch.float32) / num_thresholds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight(x) + self.bias


OutputLayer = Callable[[int], nn.Module]


class MLPHead(nn.Sequential):
    """features -> hidden[0] -> ... -> hidden[-1] -> out_features, GELU after every hidden Linear.

    With the study's sizes (small: 512, 256, 32; large: 2048, 512, 128) the Linear layers have
    exactly the parameter counts of its tables, e.g. 512->256 has 512*256 + 256 = 131,328. The
    hidden layers are the study's whatever the loss; only the output layer follows it:
    `out_features` wide (a Linear), or what `output_layer(width)` builds (CORAL's CoralLayer).
    """

    def __init__(self, in_features: int, hidden: Sequence[int], dropout: float = 0.0, out_features: int = 1,
                 output_layer: OutputLayer | None = None) -> None:
        layers: list[nn.Module] = []
        width = in_features
        for size in hidden:
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            layers += [nn.Linear(width, int(size)), nn.GELU()]
            width = int(size)
        last = output_layer(width) if output_layer is not None else nn.Linear(width, int(out_features))
        layers.append(last)
        super().__init__(*layers)
        self.in_features = in_features
        self.hidden = [int(h) for h in hidden]
        self.out_features = int(getattr(last, "out_features", out_features))

    def linear_param_counts(self) -> list[int]:
        """Parameters of each layer with weights, in order (the output layer last)."""
        return [sum(p.numel() for p in m.parameters()) for m in self if isinstance(m, (nn.Linear, CoralLayer))]
