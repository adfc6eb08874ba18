"""The MoE layer computed the slow, obvious way: the correctness oracle of tests/test_moe.py and the
'naive' variant of bench.py's moe section."""
from typing import Optional

import torch
import torch.nn.functional as F

from DeepSeekMoE import MoE


def forward_reference(moe: MoE, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """moe(x, mask) by a naive per-expert loop with host-side counts: the same routing and maths.

    It neither tracks usage nor updates the balancing state.
    """
    b, n, d = x.shape
    xf = x.reshape(b * n, d)
    xn = F.layer_norm(xf, (d,))
    weights, indices = moe.router(xn)
    e, s = moe.cfg.n_routed_experts, moe.cfg.n_shared_experts
    if s:
        indices = torch.cat([indices, torch.arange(e, e + s, device=x.device).expand(b * n, s)], 1)
        weights = torch.cat([weights, weights.new_ones(b * n, s)], 1)
    if mask is not None:
        indices = indices.masked_fill(~mask.reshape(-1, 1).to(torch.bool), e + s)
    y = torch.zeros_like(xf)
    for i in range(e + s):
        chosen = indices == i                                           # (t, k+s)
        if chosen.sum().item() == 0:
            continue
        tok, slot = chosen.nonzero(as_tuple=True)
        gate, up = (xn[tok] @ moe.w_in[i]).chunk(2, dim=-1)
        out = (F.silu(gate) * up) @ moe.w_out[i].t()
        y = y.index_add(0, tok, out * weights[tok, slot].unsqueeze(1))
    y = F.dropout(y, moe.cfg.dropout, moe.training)
    if moe.cfg.residual:
        y = y + xf
    return y.view(b, n, d)
