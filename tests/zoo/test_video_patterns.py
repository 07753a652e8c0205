"""The zoo's VideoDiT with each video sparse-attention pattern (STA, GNA, Radial, VMoBA) as its attention:
trains (finite gradients), computes the pattern (not dense), and keeps the pattern through save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from zoo.blocks.sparse_patterns import pattern_at_density

from zoo.video.dit import VideoDiT
from zoo.video.patterns import PATTERN_ATTENTIONS, PatternAttnProcessor

KW = dict(in_channels=1, patch_size=(4, 2, 2))


def _inputs():
    torch.manual_seed(0)
    return torch.randn(2, 1, 16, 16, 16), torch.tensor([300.0, 700.0]), torch.tensor([1, 2])


@pytest.mark.parametrize("attention", PATTERN_ATTENTIONS)
def test_every_pattern_trains_and_differs_from_dense(attention):
    model = VideoDiT.from_size("xs", **KW, attention=attention, pattern_config={"density": 0.3}).eval()
    dense = VideoDiT.from_size("xs", **KW).eval()
    dense.load_state_dict(model.state_dict())
    # Non-zero output gates, so that attention reaches the output of a fresh (adaLN-zero) model.
    for m in (model, dense):
        torch.manual_seed(1)
        for block in m.blocks:
            torch.nn.init.normal_(block.modulation[-1].weight, std=0.1)
        torch.nn.init.normal_(m.proj_out.weight, std=0.1)
    x, t, labels = _inputs()
    out = model(x, t, labels).sample
    out.square().mean().backward()
    assert all(isinstance(b.attn.processor, PatternAttnProcessor) for b in model.blocks)
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        reference = dense(x, t, labels).sample
    density = model.blocks[-1].attn.processor.last_density
    if density < 1.0:
        assert not torch.allclose(out.detach(), reference, atol=1e-5)


def test_a_static_pattern_is_what_the_attention_computes():
    # One block's attention output equals dense SDPA under the pattern's token mask on the same q, k, v.
    model = VideoDiT.from_size("xs", **KW, attention="sta", pattern_config={"density": 0.15}).eval()
    attn = model.blocks[0].attn
    hidden = torch.randn(1, 4, 8, 8, attn.qkv.in_features)
    with torch.no_grad():
        got = attn(hidden)
        q, k, v = attn.heads_qkv(hidden, None)
        mask = pattern_at_density("sta", (4, 8, 8), 0.15, tile=(1, 2, 2)).token_mask()
        want = attn.output(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), hidden.shape)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_pattern_survives_save_and_load(tmp_path):
    model = VideoDiT.from_size("xs", **KW, attention="vmoba", pattern_config={"threshold": 0.5, "chunk": [1, 4, 4]})
    model.save_pretrained(tmp_path)
    loaded = VideoDiT.from_pretrained(tmp_path)
    assert loaded.config.attention == "vmoba" and loaded.config.pattern_config["threshold"] == 0.5
    assert isinstance(loaded.blocks[0].attn.processor, PatternAttnProcessor)
    assert loaded.blocks[0].attn.processor.config.chunk == (1, 4, 4)


def test_bad_pattern_settings_are_named():
    with pytest.raises(ValueError, match="attention must be one of"):
        VideoDiT.from_size("xs", **KW, attention="moba")
    with pytest.raises(ValueError, match="pattern_config.density must lie in"):
        VideoDiT.from_size("xs", **KW, attention="sta", pattern_config={"density": 0})
