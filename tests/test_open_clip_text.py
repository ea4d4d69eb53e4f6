"""open_clip's fused attention split into q/k/v/out (lora_trainer/backbones/open_clip_text.py): with no LoRA it
computes what torch's nn.MultiheadAttention computes, in every layout open_clip uses, and leaves nothing behind."""

import pytest
import torch
from torch import nn

from lora_trainer.backbones.open_clip_text import OpenClipText, split_forward
from lora_trainer.errors import ModelError


def causal(length: int, boolean: bool) -> torch.Tensor:
    upper = torch.ones(length, length).triu(1).bool()
    return upper if boolean else torch.zeros(length, length).masked_fill(upper, float("-inf"))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("mask", ["float", "bool", "none"])
def test_split_attention_is_multihead_attention(batch_first, mask):
    torch.manual_seed(0)
    attention = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    text = OpenClipText([type("Block", (), {"attn": attention})()], "lora_te_", 1)
    x = torch.randn(3, 7, 16) if batch_first else torch.randn(7, 3, 16)
    attn_mask = None if mask == "none" else causal(7, mask == "bool")
    with torch.no_grad():
        expected = attention(x, x, x, need_weights=False, attn_mask=attn_mask)[0]
        split = split_forward(attention, text.views[0])(x, x, x, need_weights=False, attn_mask=attn_mask)[0]
        unbatched = split_forward(attention, text.views[0])(x[:, 0] if not batch_first else x[0],
                                                           *(x[:, 0] if not batch_first else x[0],) * 2,
                                                           attn_mask=attn_mask)[0]
    assert (split - expected).abs().max() <= 1e-6
    assert (unbatched - (expected[:, 0] if not batch_first else expected[0])).abs().max() <= 1e-6


def test_views_are_rows_of_in_proj_and_the_split_is_undone():
    attention = nn.MultiheadAttention(8, 2)
    block = type("Block", (), {"attn": attention, "mlp": nn.Module()})()
    block.mlp.c_fc, block.mlp.c_proj = nn.Linear(8, 16), nn.Linear(16, 8)
    text = OpenClipText([block], "lora_te2_", 1)
    targets = text.targets()
    assert sorted(targets) == sorted(f"lora_te2_text_model_encoder_layers_0_{k}" for k in (
        "self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"))
    k_view = targets["lora_te2_text_model_encoder_layers_0_self_attn_k_proj"]
    assert torch.equal(k_view.weight, attention.in_proj_weight[8:16]) and list(k_view.parameters()) == []
    assert targets["lora_te2_text_model_encoder_layers_0_self_attn_out_proj"] is attention.out_proj
    with pytest.raises(RuntimeError), text.split_attention():
        assert "forward" in attention.__dict__
        raise RuntimeError("a failed step")
    assert "forward" not in attention.__dict__


def test_an_unusual_attention_is_one_clear_refusal():
    odd = nn.MultiheadAttention(8, 2, add_bias_kv=True)
    with pytest.raises(ModelError, match="train_text_encoder: false"):
        OpenClipText([type("Block", (), {"attn": odd})()], "lora_te_", 1)
