"""BiFormer as the official code computes it, written as plain functions over the official state dict.

An anchor, not a model to use: it follows the official `models/biformer.py` and `ops/bra_legacy.py`
(rayleizhu/BiFormer) step by step, including the gather of `topk` key/value copies per query region
and the materialized attention matrix, with `auto_pad` on for sizes that are not multiples of the
region count. Tests compare the zoo model with it, and `benchmarks/biformer_vs_official.py` times the zoo model
against it. Also provides `official_biformer_shapes`, the key names and shapes of the released checkpoints, and
`official_bra`, one routing attention layer the official way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SIZES = {
    "t": dict(depths=(2, 2, 8, 2), dims=(64, 128, 256, 512)),
    "s": dict(depths=(4, 4, 18, 4), dims=(64, 128, 256, 512)),
    "b": dict(depths=(4, 4, 18, 4), dims=(96, 192, 384, 768)),
}
TOPKS, N_WIN, HEAD_DIM, MLP_RATIO, LAST_STAGE_HEADS = (1, 4, 16), 7, 32, 3, 8


def official_biformer_shapes(size: str, num_classes: int = 1000) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an official BiFormer-{T,S,B} state dict (the "model" entry of a release file)."""
    depths, dims = SIZES[size]["depths"], SIZES[size]["dims"]
    shapes: dict[str, tuple[int, ...]] = {}

    def conv(p, cout, cin, k, groups=1):
        shapes[p + "weight"], shapes[p + "bias"] = (cout, cin // groups, k, k), (cout,)

    def bn(p, c):
        for n in ("weight", "bias", "running_mean", "running_var"):
            shapes[p + n] = (c,)
        shapes[p + "num_batches_tracked"] = ()

    def linear(p, cout, cin, bias=True):
        shapes[p + "weight"] = (cout, cin)
        if bias:
            shapes[p + "bias"] = (cout,)

    conv("downsample_layers.0.0.", dims[0] // 2, 3, 3)
    bn("downsample_layers.0.1.", dims[0] // 2)
    conv("downsample_layers.0.3.", dims[0], dims[0] // 2, 3)
    bn("downsample_layers.0.4.", dims[0])
    for i in range(1, 4):
        conv(f"downsample_layers.{i}.0.", dims[i], dims[i - 1], 3)
        bn(f"downsample_layers.{i}.1.", dims[i])
    for i, (depth, c) in enumerate(zip(depths, dims, strict=True)):
        for j in range(depth):
            p = f"stages.{i}.{j}."
            conv(p + "pos_embed.", c, c, 3, groups=c)
            linear(p + "norm1.", c, 1, bias=True)
            shapes[p + "norm1.weight"] = (c,)
            if i < 3:
                linear(p + "attn.qkv.qkv.", 3 * c, c)
                linear(p + "attn.wo.", c, c)
            else:
                linear(p + "attn.qkv.", 3 * c, c, bias=False)
                linear(p + "attn.proj.", c, c)
            conv(p + "attn.lepe.", c, c, 5, groups=c)
            shapes[p + "norm2.weight"], shapes[p + "norm2.bias"] = (c,), (c,)
            linear(p + "mlp.0.", MLP_RATIO * c, c)
            linear(p + "mlp.3.", c, MLP_RATIO * c)
    bn("norm.", dims[3])
    linear("head.", num_classes, dims[3])
    return shapes


def random_official_state_dict(size: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with the official keys and shapes, filled so that activations stay well scaled."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in official_biformer_shapes(size).items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(100)
        elif key.endswith("running_var"):
            out[key] = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith("running_mean") or key.endswith("bias"):
            out[key] = 0.1 * torch.randn(shape, generator=gen)
        elif key.startswith("norm") or ".norm" in key or key.endswith(".1.weight") or key.endswith(".4.weight"):
            out[key] = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
            out[key] = torch.randn(shape, generator=gen) / fan_in**0.5
    return out


def _bn(x, sd, p):
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"], False)


def official_bra(x, sd, p, num_heads, topk):
    """Official BiLevelRoutingAttention (identity kv downsampling, auto_pad); x: (N, H, W, C)."""
    n, h_in, w_in, c = x.shape
    pad_r, pad_b = (N_WIN - w_in % N_WIN) % N_WIN, (N_WIN - h_in % N_WIN) % N_WIN
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    _, h, w, _ = x.shape
    wh, ww = h // N_WIN, w // N_WIN
    x = x.reshape(n, N_WIN, wh, N_WIN, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(n, N_WIN**2, wh, ww, c)
    q, kv = F.linear(x, sd[p + "qkv.qkv.weight"], sd[p + "qkv.qkv.bias"]).split([c, 2 * c], dim=-1)
    p2, w2 = N_WIN**2, wh * ww
    q_pix, kv_pix = q.reshape(n, p2, w2, c), kv.reshape(n, p2, w2, 2 * c)
    q_win, k_win = q.mean([2, 3]), kv[..., :c].mean([2, 3])
    v_map = kv[..., c:].reshape(n, N_WIN, N_WIN, wh, ww, c).permute(0, 5, 1, 3, 2, 4).reshape(n, c, h, w)
    lepe = F.conv2d(v_map, sd[p + "lepe.weight"], sd[p + "lepe.bias"], padding=2, groups=c).permute(0, 2, 3, 1)
    scale = c**-0.5
    r_idx = torch.topk((q_win * scale) @ k_win.transpose(-2, -1), k=topk, dim=-1).indices
    # The official gather: topk copies of every routed key/value region per query region.
    kv_sel = torch.gather(
        kv_pix.view(n, 1, p2, w2, 2 * c).expand(-1, p2, -1, -1, -1),
        dim=2,
        index=r_idx.view(n, p2, topk, 1, 1).expand(-1, -1, -1, w2, 2 * c),
    )
    k_sel, v_sel = kv_sel.split([c, c], dim=-1)
    d = c // num_heads
    k_sel = k_sel.reshape(n * p2, topk * w2, num_heads, d).permute(0, 2, 3, 1)
    v_sel = v_sel.reshape(n * p2, topk * w2, num_heads, d).permute(0, 2, 1, 3)
    q_pix = q_pix.reshape(n * p2, w2, num_heads, d).permute(0, 2, 1, 3)
    attn = ((q_pix * scale) @ k_sel).softmax(dim=-1)
    out = (attn @ v_sel).permute(0, 2, 1, 3).reshape(n, N_WIN, N_WIN, wh, ww, c)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(n, h, w, c) + lepe
    out = F.linear(out, sd[p + "wo.weight"], sd[p + "wo.bias"])
    return out[:, :h_in, :w_in].contiguous()


def _attention_lepe(x, sd, p):
    """Official AttentionLePE (8 heads, LePE on the input); x: (N, H, W, C)."""
    n, h, w, c = x.shape
    tokens = x.reshape(n, h * w, c)
    qkv = F.linear(tokens, sd[p + "qkv.weight"]).reshape(n, h * w, 3, LAST_STAGE_HEADS, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    lepe = F.conv2d(x.permute(0, 3, 1, 2), sd[p + "lepe.weight"], sd[p + "lepe.bias"], padding=2, groups=c)
    attn = (q @ k.transpose(-2, -1) * (c // LAST_STAGE_HEADS) ** -0.5).softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(n, h * w, c) + lepe.flatten(2).transpose(1, 2)
    return F.linear(out, sd[p + "proj.weight"], sd[p + "proj.bias"]).reshape(n, h, w, c)


def official_biformer_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, size: str) -> torch.Tensor:
    """Logits of the official BiFormer-{size} (eval mode) with weights `sd`; x: (N, 3, H, W)."""
    depths, dims = SIZES[size]["depths"], SIZES[size]["dims"]
    x = F.conv2d(x, sd["downsample_layers.0.0.weight"], sd["downsample_layers.0.0.bias"], stride=2, padding=1)
    x = F.gelu(_bn(x, sd, "downsample_layers.0.1."))
    x = F.conv2d(x, sd["downsample_layers.0.3.weight"], sd["downsample_layers.0.3.bias"], stride=2, padding=1)
    x = _bn(x, sd, "downsample_layers.0.4.")
    for i in range(4):
        if i:
            p = f"downsample_layers.{i}."
            x = _bn(F.conv2d(x, sd[p + "0.weight"], sd[p + "0.bias"], stride=2, padding=1), sd, p + "1.")
        c = dims[i]
        for j in range(depths[i]):
            p = f"stages.{i}.{j}."
            x = x + F.conv2d(x, sd[p + "pos_embed.weight"], sd[p + "pos_embed.bias"], padding=1, groups=c)
            x = x.permute(0, 2, 3, 1)
            y = F.layer_norm(x, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], 1e-6)
            if i < 3:
                y = official_bra(y, sd, p + "attn.", num_heads=c // HEAD_DIM, topk=TOPKS[i])
            else:
                y = _attention_lepe(y, sd, p + "attn.")
            x = x + y
            y = F.layer_norm(x, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], 1e-6)
            y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"])), sd[p + "mlp.3.weight"])
            x = (x + y + sd[p + "mlp.3.bias"]).permute(0, 3, 1, 2)
    x = _bn(x, sd, "norm.").flatten(2).mean(-1)
    return F.linear(x, sd["head.weight"], sd["head.bias"])
