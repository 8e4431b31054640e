"""A plain multi-layer perceptron: ``blocks.i`` = Linear → activation (→ dropout), then ``head``.

Each block's output is the natural DFA feedback point (``feedback_points: ["blocks.*"]``).

Shapes:
    x: ``[*, in_features]`` -> logits ``[*, out_features]``
"""
from __future__ import annotations

from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


class MLP(nn.Module):
    """Args:
        in_features, out_features: input and output widths.
        hidden: widths of the hidden layers (default: ``[256, 256]``).
        activation: ``relu``, ``tanh`` or ``gelu`` (default: ``"relu"``).
        dropout: dropout after each activation (default: ``0.0``).
    """

    def __init__(self, in_features: int, out_features: int, hidden: list[int] | None = None,
                 activation: str = "relu", dropout: float = 0.0) -> None:
        super().__init__()
        widths = [in_features, *(hidden if hidden is not None else [256, 256])]
        blocks = []
        for d_in, d_out in zip(widths[:-1], widths[1:]):
            layers = [nn.Linear(d_in, d_out), ACTIVATIONS[activation]()]
            if dropout:
                layers.append(nn.Dropout(dropout))
            blocks.append(nn.Sequential(*layers))
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(widths[-1], out_features)

    def forward(self, x):
        return self.head(self.blocks(x))
