"""timm's `Mlp` whose forward runs through the fused pointwise ops and can take the residual it is added to.

The blocks' MLPs are where CPU inference spends a third of its time, most of it outside the GEMMs: the GELU
pass over the 4C-wide hidden map and the residual add. `zoo.kernels.fused_pointwise` folds both into the GEMMs
where it may; it takes fc1 and fc2 as modules, so hooks on them and wrapped Linears are honoured.
"""

import torch
import torch.nn as nn
from timm.layers import Mlp

from zoo.kernels.fused_pointwise import is_plain, linear, linear_add, linear_gelu

__all__ = ["ResidualMlp"]


class ResidualMlp(Mlp):
    """fc1, act, dropout, norm, fc2, dropout (timm's `Mlp`, same arguments and parameter names), plus a residual.

    `forward(x, residual)` returns `residual + mlp(x)` with the add inside fc2's GEMM when fused.
    """

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: (..., C_in) -> (..., C_out); plus `residual` (..., C_out) when given."""
        if torch.jit.is_scripting():
            # TorchScript cannot hand modules to `zoo.kernels.fused_pointwise`: the modules are called as they are.
            out = self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))
            return out if residual is None else residual + out
        if is_plain(self.act, nn.GELU):
            hidden = linear_gelu(x, self.fc1, self.act.approximate)
        else:
            hidden = self.act(linear(x, self.fc1))
        hidden = self.norm(self.drop1(hidden))
        if residual is None:
            return self.drop2(linear(hidden, self.fc2))
        if self.training and self.drop2.p > 0:  # the dropout sits between fc2 and the add
            return residual + self.drop2(linear(hidden, self.fc2))
        return linear_add(hidden, self.fc2, residual)
