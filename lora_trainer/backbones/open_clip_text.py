"""Text-encoder LoRA on open_clip's text transformer: A1111's SD2 encoder and SDXL's second one.

open_clip's attention is torch's ``nn.MultiheadAttention``: q, k and v share one fused ``in_proj_weight``, and the
functional attention reads ``out_proj.weight`` directly, so a LoRA cannot attach to them by replacing a layer's
forward. While a text-encoder LoRA trains, each attention's forward is replaced by the same computation split into
four projections: three ``ProjectionView``s over the rows of ``in_proj`` and the real ``out_proj``. LoRA attaches
to those like to any Linear, under the names kohya gives the HF CLIP layers (``..._self_attn_q_proj``, ...,
``..._mlp_fc1``): A1111 merges such a file back into ``in_proj`` (its MultiheadAttention branch, which needs q, k,
v and out together, so all four are always trained), and diffusers loads it into the converted HF encoder.

Nothing here imports open_clip or the WebUI: the module tree is read as it is.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError

PARTS = ("q", "k", "v")


class ProjectionView(nn.Module):
    """q, k or v of a fused attention: a Linear over rows of ``in_proj_weight``, holding no parameters of its own
    (the attention stays in a plain list, out of this module's tree, so nothing is saved or moved twice)."""

    def __init__(self, attention: nn.MultiheadAttention, part: int):
        super().__init__()
        self._attention = [attention]
        self.part = part
        self.in_features = self.out_features = attention.embed_dim

    def _rows(self) -> slice:
        return slice(self.part * self.out_features, (self.part + 1) * self.out_features)

    @property
    def weight(self) -> torch.Tensor:
        return self._attention[0].in_proj_weight[self._rows()]

    @property
    def bias(self):
        bias = self._attention[0].in_proj_bias
        return None if bias is None else bias[self._rows()]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def split_forward(attention: nn.MultiheadAttention, views: List[ProjectionView]):
    """``nn.MultiheadAttention.forward`` for open_clip's use (self-attention, an additive or boolean mask, no
    key-padding mask, no attention weights returned), with q/k/v/out computed by calling the projection modules."""
    heads = attention.num_heads

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if key_padding_mask is not None:
            raise ModelError("text-encoder LoRA on this open_clip model: its attention uses a key-padding mask, "
                             "which is not supported; set train_text_encoder: false")
        batched = query.dim() == 3
        batch_dim = 0 if attention.batch_first else 1
        if not batched:  # [L, D] whatever batch_first says
            query, key, value = (t.unsqueeze(batch_dim) for t in (query, key, value))
        if not attention.batch_first:  # [L, N, D] -> [N, L, D]
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q, k, v = (view(x) for view, x in zip(views, (query, key, value)))
        n, length, width = q.shape
        q, k, v = (t.reshape(n, t.shape[1], heads, width // heads).transpose(1, 2) for t in (q, k, v))
        mask = attn_mask
        if mask is not None:
            if mask.dtype == torch.bool:
                mask = ~mask  # MultiheadAttention: True = may not attend; scaled_dot_product_attention: True = may
            else:
                mask = mask.to(q.dtype)  # an additive mask in the dtype the projections came out in
            if mask.dim() == 3:  # [N * heads, L, S]
                mask = mask.reshape(n, heads, *mask.shape[1:])
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=bool(is_causal and mask is None),
                                             dropout_p=attention.dropout if attention.training else 0.0)
        out = attention.out_proj(out.transpose(1, 2).reshape(n, length, width))
        if not attention.batch_first:
            out = out.transpose(0, 1)
        return (out if batched else out.squeeze(batch_dim)), None

    return forward


class OpenClipText:
    """The LoRA layers of one open_clip text transformer (``.resblocks``), named as kohya names HF CLIP's."""

    def __init__(self, resblocks, prefix: str, layers: int):
        self.prefix = prefix
        self.blocks = list(resblocks)[:layers]
        for block in self.blocks:
            attention = getattr(block, "attn", None)
            if not isinstance(attention, nn.MultiheadAttention) or attention.in_proj_weight is None \
                    or attention.bias_k is not None or attention.add_zero_attn:
                raise ModelError(f"text-encoder LoRA: this open_clip text encoder's attention is not the standard "
                                 f"fused one ({type(attention).__name__}); set train_text_encoder: false")
        self.views = [[ProjectionView(block.attn, i) for i in range(len(PARTS))] for block in self.blocks]

    def targets(self) -> Dict[str, nn.Module]:
        out: Dict[str, nn.Module] = {}
        for i, (block, views) in enumerate(zip(self.blocks, self.views)):
            name = f"{self.prefix}text_model_encoder_layers_{i}_"
            out.update({f"{name}self_attn_{part}_proj": view for part, view in zip(PARTS, views)})
            out[f"{name}self_attn_out_proj"] = block.attn.out_proj
            out[f"{name}mlp_fc1"] = block.mlp.c_fc
            out[f"{name}mlp_fc2"] = block.mlp.c_proj
        return out

    @contextlib.contextmanager
    def split_attention(self) -> Iterator[None]:
        """Every attention computes through its projection modules until the block ends (also on error)."""
        installed = []
        try:
            for block, views in zip(self.blocks, self.views):
                attention = block.attn
                previous = attention.__dict__.get("forward")
                attention.forward = split_forward(attention, views)
                installed.append((attention, previous))
            yield
        finally:
            for attention, previous in reversed(installed):
                if previous is None:
                    attention.__dict__.pop("forward", None)
                else:
                    attention.forward = previous
