"""The transformer feed-forward: Linear, activation, dropout, Linear, dropout (timm's ``Mlp``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from vlp.blocks.weight_init import init_weights


class Mlp(nn.Module):
    """``fc2(drop(act(fc1(x))))``; the hidden width defaults to ``4 * dim``."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int | None = None,
        out_dim: int | None = None,
        *,
        act_layer: Callable[..., nn.Module] = nn.GELU,
        drop: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        hidden_dim = hidden_dim or 4 * dim
        out_dim = out_dim or dim
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, out_dim, bias=bias)
        self.drop2 = nn.Dropout(drop)
        self.apply(init_weights)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop1(self.act(self.fc1(x)))  # (..., hidden_dim)
        return self.drop2(self.fc2(x))  # (..., out_dim)
