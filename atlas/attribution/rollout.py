"""Attention rollout (Abnar & Zuidema 2020): how much of each patch reaches the class token.

Each attention layer's weights, averaged over heads, plus the identity (the
residual connection), renormalized so every row sums to one, are multiplied
through the layers from the first to the last; the class token's row of the
product, over the patch tokens, is the map. It needs no gradient and does not
depend on the class explained: the random-logit check shows that, as it should.

Only global self-attention over the token sequence rolls out: torchvision's
ViT (`nn.MultiheadAttention`) and timm's ViT and DeiT (`Attention`). Windowed
attention (Swin, MaxViT) and convolutional networks have no such sequence,
and the stage records the method as skipped on them, with this reason.

The weights are read without editing the model: torchvision computes them
with `need_weights=False`, so a forward pre-hook asks for them (averaged over
heads) and a forward hook keeps them; timm's fused attention never forms
them, so its `fused_attn` switch is turned off for the pass and a hook on
`attn_drop` keeps the softmax it receives.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Iterator

import torch
from torch import nn

from atlas.attribution.base import Attribution, Explanation
from atlas.attribution.cam import spread, upsample
from atlas.errors import AtlasError
from atlas.layers import patch_grid


def _timm_attention(module: nn.Module) -> bool:
    return hasattr(module, "fused_attn") and hasattr(module, "qkv") and isinstance(
        getattr(module, "attn_drop", None), nn.Module)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The model's global self-attention modules, in definition order (torchvision's and timm's)."""
    return [m for m in model.modules() if isinstance(m, nn.MultiheadAttention) or _timm_attention(m)]


@contextmanager
def attention_weights(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within it, every forward pass appends each attention call's weights, averaged over heads,
    [B, N, N], to the yielded list (in call order).

    Raises:
        AtlasError: the model has no global self-attention.
    """
    found = attention_modules(model)
    if not found:
        raise AtlasError(f"attention_rollout: {type(model).__name__} has no global self-attention "
                         "(nn.MultiheadAttention or timm's Attention); rollout applies to vision transformers "
                         "such as ViT and DeiT, not to convolutional or windowed-attention (Swin, MaxViT) models")
    kept: list[torch.Tensor] = []
    with ExitStack() as stack:
        for m in found:
            if isinstance(m, nn.MultiheadAttention):
                stack.callback(m.register_forward_pre_hook(_ask_weights, with_kwargs=True).remove)
                stack.callback(m.register_forward_hook(lambda _m, _a, out: kept.append(out[1].float())).remove)
            else:
                fused, m.fused_attn = m.fused_attn, False
                stack.callback(setattr, m, "fused_attn", fused)
                stack.callback(m.attn_drop.register_forward_hook(
                    lambda _m, _a, out: kept.append(out.float().mean(1))).remove)
        yield kept


def _ask_weights(_module, args, kwargs):
    return args, {**kwargs, "need_weights": True, "average_attn_weights": True}


def rollout(weights: list[torch.Tensor]) -> torch.Tensor:
    """The product of (A + I) / 2 over the layers, first layer rightmost: [B, N, N].

    Rows of A sum to one, so (A + I) / 2 is A + I renormalized.
    """
    eye = torch.eye(weights[0].shape[-1], device=weights[0].device)
    out = eye.expand_as(weights[0])
    for a in weights:
        out = ((a + eye) / 2) @ out
    return out


class AttentionRollout(Attribution):
    """Attention rollout over a vision transformer's layers, read at the class token.

    The map is the class token's row over the patch grid, upsampled to the
    input (a third on each colour). A model without a class token (global
    average pooling) gets the mean of the patch rows.

    Raises (at `explain`):
        AtlasError: the model has no global self-attention, or its sequence holds no patch grid.
    """

    name = "attention_rollout"

    def _explain(self, inputs, target):
        grids = torch.cat(self.chunked(lambda a, b: self._grid(inputs[a:b]), inputs.shape[0]))
        return Explanation(spread(upsample(grids, inputs)))

    def _grid(self, x: torch.Tensor) -> torch.Tensor:
        """[b, 1, h, w]: how much of each patch the class token holds after the last layer."""
        with attention_weights(self.model) as kept:
            self.model(x)
        if not kept:
            raise AtlasError(f"attention_rollout: no attention layer of {type(self.model).__name__} ran")
        joint = rollout(kept)
        side, extra = patch_grid(joint.shape[-1])
        if side == 0:
            raise AtlasError(f"attention_rollout: {joint.shape[-1]} tokens hold no square patch grid")
        rows = joint[:, 0, extra:] if extra else joint.mean(1)
        return rows.reshape(-1, 1, side, side)
