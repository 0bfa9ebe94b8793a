"""Multi-layer perceptrons."""

from torch import nn


def mlp(sizes: list[int], activation=nn.SiLU, last_bias: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    for k in range(len(sizes) - 1):
        last = k == len(sizes) - 2
        layers.append(nn.Linear(sizes[k], sizes[k + 1], bias=(last_bias or not last)))
        if not last:
            layers.append(activation())
    return nn.Sequential(*layers)
