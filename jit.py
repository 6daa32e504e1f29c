"""
JiT: "Back to Basics: Let Denoising Generative Models Denoise" (Tianhong Li & Kaiming He, arXiv 2511.13720)

A plain ViT ("Just image Transformer") on raw pixels with big patches (16 at 256px, 32 at 512px) is trained as a
flow-matching model, but the network predicts the CLEAN image x, not the noise or the velocity. Clean images lie
on a low-dimensional manifold; noise does not. A 3*16*16 = 768-dim patch token can represent x with a width-768
transformer, but not the full-rank noise that eps- or v-prediction must reproduce (§4.2, Tab. 2; toy version §3.3,
Fig. 2). The loss is still taken on velocity ("x-prediction, v-loss", paper Alg. 1), which weights the timesteps well.

Time convention (all our scripts): z_t = t*x + (1-t)*e, t=0 is pure noise e, t=1 is data x; v = x - e.
Shapes: B batch, C=3 channels, H=W image size, p patch, h=w=H/p patch grid, N=h*w tokens, D width.

    python jit.py                                        # built-in "shapes" data, JiT-S, learns in minutes
    python jit.py --data ffhq128                         # FFHQ 128x128 (see README for the download)
    torchrun --nproc_per_node=8 jit.py --data imagenet --config JiT-B/16     # the paper's ImageNet-256 run
    python jit.py --data ffhq128 --config JiT-S --patch-size 8 --pred v      # one cell of the ablation (§4.2)
    python jit.py --toy                                  # the paper's toy experiment (Fig. 2), CPU, ~1 minute
    python sample.py runs/jit-shapes --grid grid.png     # sample a checkpoint (sample.py)

Official code: LTH14/JiT (PyTorch). Differences from it: grep "DIFF:".
"""

import argparse
import copy
import json
import math
import os
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

SCRIPT = "jit"  # written into every checkpoint; sample.py dispatches on it

# ---------------------------------------------------------------------------------------------------------------
# ---- 1. Configs (paper Tab. 9, App. A; parameter counts Tab. 7-8; official model_jit.py) ----
# ---------------------------------------------------------------------------------------------------------------
# depth/width/heads: the ViT sizes. bottleneck: width of the linear bottleneck in the patch embed (§4.2, Fig. 4).
# ctx_start: the block before which the 32 in-context class tokens are inserted. drop: dropout in the middle half.
CONFIGS = {
    "JiT-B/16": dict(depth=12, width=768, heads=12, patch=16, bottleneck=128, ctx_start=4, drop=0.0),    # 131M
    "JiT-L/16": dict(depth=24, width=1024, heads=16, patch=16, bottleneck=128, ctx_start=8, drop=0.0),   # 459M
    "JiT-H/16": dict(depth=32, width=1280, heads=16, patch=16, bottleneck=256, ctx_start=10, drop=0.2),  # 953M
    "JiT-G/16": dict(depth=40, width=1664, heads=16, patch=16, bottleneck=256, ctx_start=10, drop=0.2),  # 2.0B
    "JiT-B/32": dict(depth=12, width=768, heads=12, patch=32, bottleneck=128, ctx_start=4, drop=0.0),    # 133M
    "JiT-L/32": dict(depth=24, width=1024, heads=16, patch=32, bottleneck=128, ctx_start=8, drop=0.0),   # 462M
    "JiT-H/32": dict(depth=32, width=1280, heads=16, patch=32, bottleneck=256, ctx_start=10, drop=0.2),  # 956M
    # Not in the paper. DiT-S-sized, the size the FFHQ-128 patch-size reproduction calls "JiT-S"; 33M params
    # (with 1 class). Our default for the built-in shapes data (with --patch-size 8 at 64px).
    "JiT-S": dict(depth=12, width=384, heads=6, patch=16, bottleneck=128, ctx_start=4, drop=0.0),
    # For the tests only: one forward+backward at 32px in milliseconds on a CPU.
    "tiny": dict(depth=4, width=64, heads=2, patch=8, bottleneck=16, ctx_start=1, drop=0.0),
}
IN_CONTEXT_LEN = 32  # number of in-context class tokens (paper §4.4 and App. A, Tab. 9)

# What `--data NAME` means: image size and the training defaults we use for it. Every value can be overridden on
# the command line. blr = base lr per 256 images (lr = blr * batch / 256: the official code's rule; the paper's
# Tab. 9 gives its result, lr 2e-4 at batch 1024).
# DIFF: for the built-in shapes demo we use blr 4e-4 (lr 2e-4 at batch 128, the paper's ImageNet lr at batch 1024)
# so a 10k-step run moves visibly; ffhq128 and imagenet keep the paper's blr 5e-5.
DATA_PRESETS = {
    "shapes": dict(img_size=64, config="JiT-S", patch_size=8, batch_size=128, steps=10_000, blr=4e-4,
                   sample_every=1000, ckpt_every=1000),
    "ffhq128": dict(img_size=128, config="JiT-B/16", batch_size=128, steps=200_000, blr=5e-5,
                    sample_every=5000, ckpt_every=5000, unconditional=True),  # its 1000-image folders aren't classes
    "imagenet": dict(img_size=256, config="JiT-B/16", batch_size=1024, steps=750_000, blr=5e-5,
                     sample_every=10_000, ckpt_every=10_000),  # 600 epochs at batch 1024 = 750k steps
}
FOLDER_DEFAULTS = dict(img_size=256, config="JiT-B/16", batch_size=128, steps=200_000, blr=5e-5,
                       sample_every=5000, ckpt_every=5000)

# ---------------------------------------------------------------------------------------------------------------
# ---- 2. Building blocks ----
# ---------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm with a learnable gain, computed in fp32 whatever the autocast dtype (official util/model_util.py)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight, self.eps).type_as(x)


def modulate(x, shift, scale):  # x: (B, N, D), shift/scale: (B, D)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (B, D). The raw t goes into the sinusoid (NOT t*1000 as in DiT), ordered [cos | sin]."""

    def __init__(self, dim, freq_dim=256, max_period=10_000):
        super().__init__()
        half = freq_dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half) / half), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):                                           # (B,)
        args = t.float()[:, None] * self.freqs[None]                # (B, 128)
        return self.mlp(torch.cat([args.cos(), args.sin()], -1))    # (B, 256) -> (B, D)


class BottleneckPatchEmbed(nn.Module):
    """Paper §4.2: a p x p patch (3*p*p values) is linearly projected to a small bottleneck d_b, then up to D.
    Two linear maps with nothing in between: a low-rank patch embedding, which the paper finds helps (Fig. 4:
    d_b = 128 is best)."""

    def __init__(self, p, bottleneck, dim):
        super().__init__()
        self.proj1 = nn.Conv2d(3, bottleneck, kernel_size=p, stride=p, bias=False)  # = Linear(3*p*p -> d_b)
        self.proj2 = nn.Conv2d(bottleneck, dim, kernel_size=1)                       # = Linear(d_b -> D)

    def forward(self, x):                                   # (B, 3, H, W)
        x = self.proj2(self.proj1(x))                       # (B, D, h, w)
        return x.flatten(2).transpose(1, 2)                 # (B, N, D), token n = row * w + col


def sincos_pos_embed(dim, h):
    """Fixed 2D sin-cos position embedding (MAE style), (h*h, dim). The first half of the channels encodes the
    column, the second half the row; each half is [sin | cos] of pos * 1/10000^(k/(dim/4))."""
    omega = 1.0 / 10_000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (D/4,)
    row, col = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(h, dtype=torch.float64),
                              indexing="ij")                                          # (h, h) each

    def embed_1d(pos):                                       # (N,) -> (N, D/2)
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed_1d(col), embed_1d(row)], dim=1).float()  # (N, D)


def rope_2d(head_dim, h, num_prefix=0, theta=10_000.0):
    """2D axial rotary embedding (official VisionRotaryEmbeddingFast). Returns cos, sin of shape (num_prefix + N,
    head_dim). The first half of head_dim rotates with the row, the second half with the column; inside each half,
    the channel pairs (2i, 2i+1) are rotated together by angle pos * theta^(-2i/(head_dim/2)). Positions are the
    integer grid. The num_prefix in-context tokens get no rotation (cos=1, sin=0)."""
    d = head_dim // 2                                                       # channels per axis
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)  # (d/2,)
    freqs = freqs.repeat_interleave(2)                                      # (d,): pairs share an angle
    row, col = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(h, dtype=torch.float64),
                              indexing="ij")
    angle = torch.cat([row.reshape(-1, 1) * freqs, col.reshape(-1, 1) * freqs], dim=1)  # (N, head_dim)
    angle = torch.cat([torch.zeros(num_prefix, head_dim, dtype=torch.float64), angle])  # (P + N, head_dim)
    return angle.cos().float(), angle.sin().float()


def apply_rope(x, cos, sin):
    """x: (B, heads, N, hd). Rotates each adjacent channel pair (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin)."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)     # (B, heads, N, hd/2) each
    rotated = torch.stack([-x1, x0], dim=-1).flatten(-2)      # (B, heads, N, hd): "rotate_half", interleaved
    return x.float() * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head self-attention with qk-RMSNorm (per head) and 2D RoPE applied after the norm."""

    def __init__(self, dim, heads, drop=0.0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)                   # with bias, as the official code
        self.q_norm = RMSNorm(dim // heads)
        self.k_norm = RMSNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)
        # DIFF: the official Attention has a separate dropout on the attention probabilities (attn_drop) besides
        # the projection dropout; every published config sets attn_drop = 0, so we keep only the projection's.
        self.drop = nn.Dropout(drop)

    def forward(self, x, cos, sin):                                            # (B, N, D)
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, hd, N, d)
        q = apply_rope(self.q_norm(q), cos, sin).to(v.dtype)
        k = apply_rope(self.k_norm(k), cos, sin).to(v.dtype)
        # DIFF: LTH14/JiT computes softmax(q k^T) by hand in fp32 (and applies a never-used zero bias); we call
        # F.scaled_dot_product_attention, which runs flash attention in bf16 with an fp32 softmax accumulator:
        # same math, several times faster, O(N) memory. The author kept fp32 against loss spikes he saw with
        # v/eps-prediction (LTH14/JiT#15); with qk-norm the logits are bounded (README, "Differences").
        x = F.scaled_dot_product_attention(q, k, v)                           # (B, heads, N, d)
        return self.drop(self.proj(x.transpose(1, 2).reshape(B, N, D)))       # (B, N, D)


class SwiGLU(nn.Module):
    """SwiGLU MLP with hidden = int(4D * 2/3) (2048 for D=768): one fused Linear makes both halves."""

    def __init__(self, dim, drop=0.0):
        super().__init__()
        hidden = int(int(4 * dim) * 2 / 3)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.drop(F.silu(x1) * x2))


class JiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero (DiT): c -> (shift, scale, gate) for attention and for the MLP."""

    def __init__(self, dim, heads, drop=0.0):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads, drop)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim, drop)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))  # zero-init: block = identity

    def forward(self, x, c, cos, sin):                      # x: (B, N, D), c: (B, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), cos, sin)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """RMSNorm + adaLN (shift, scale only) + Linear(D -> p*p*3). Zero-init: the network outputs 0 at init."""

    def __init__(self, dim, p):
        super().__init__()
        self.norm_final = RMSNorm(dim)
        self.linear = nn.Linear(dim, p * p * 3)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):                                # (B, N, D) -> (B, N, p*p*3)
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def patchify(x, p):                                         # (B, C, H, W) -> (B, N, p*p*C)
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)               # (B, C, h, p, w, p)
    x = x.permute(0, 2, 4, 3, 5, 1)                         # (B, h, w, p, p, C): channels fastest
    return x.reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(x, p):                                       # (B, N, p*p*C) -> (B, C, H, W), inverse of patchify
    B, N, _ = x.shape
    h = math.isqrt(N)
    x = x.reshape(B, h, h, p, p, -1)                        # (B, h, w, p, p, C)
    x = x.permute(0, 5, 1, 3, 2, 4)                         # (B, C, h, p, w, p)
    return x.reshape(B, -1, h * p, h * p)


# ---------------------------------------------------------------------------------------------------------------
# ---- 3. The model (paper §4.1 and §4.4, Fig. 3) ----
# ---------------------------------------------------------------------------------------------------------------


class JiT(nn.Module):
    """z (B,3,H,W), t (B,), y (B,) -> the network's prediction (B,3,H,W): the clean image x by default (pred="x").
    `pred` only labels what the output means (the ablation of §4.2, Tab. 2, trains the same network to output eps
    or v)."""

    def __init__(self, config, img_size, num_classes, depth, width, heads, patch, bottleneck, ctx_start, drop,
                 pred="x", noise_scale=1.0):
        super().__init__()
        if img_size % patch:
            raise SystemExit(f"--img-size {img_size} is not a multiple of the patch size {patch}.")
        self.config, self.img_size, self.num_classes = config, img_size, num_classes
        self.patch, self.ctx_start, self.pred, self.noise_scale = patch, ctx_start, pred, noise_scale
        h = img_size // patch                                              # patch grid side
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = nn.Embedding(num_classes + 1, width)             # row num_classes = null label (CFG)
        self.x_embedder = BottleneckPatchEmbed(patch, bottleneck, width)
        # DIFF: the official code keeps pos_embed as a frozen nn.Parameter; we use a non-persistent buffer: the
        # same fixed tensor, rebuilt from the config on load, not in the optimizer, not counted as a parameter.
        self.register_buffer("pos_embed", sincos_pos_embed(width, h)[None], persistent=False)  # (1, N, D)
        self.in_context_posemb = nn.Parameter(torch.zeros(1, IN_CONTEXT_LEN, width))
        # RoPE tables: one for the image tokens alone, one with the 32 in-context tokens in front (no rotation).
        for name, prefix in (("rope", 0), ("rope_ctx", IN_CONTEXT_LEN)):
            cos, sin = rope_2d(width // heads, h, prefix)
            self.register_buffer(f"{name}_cos", cos, persistent=False)       # (P + N, head_dim)
            self.register_buffer(f"{name}_sin", sin, persistent=False)
        # Dropout only in the middle half of the blocks (official model_jit.py; 0 for B and L).
        self.blocks = nn.ModuleList(
            [JiTBlock(width, heads, drop if depth // 4 <= i < depth // 4 * 3 else 0.0) for i in range(depth)])
        self.final_layer = FinalLayer(width, patch)
        self.initialize_weights()

    def initialize_weights(self):
        # xavier-uniform for every Linear (bias 0); the patch-embed convs likewise, viewed as Linears.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for conv in (self.x_embedder.proj1, self.x_embedder.proj2):
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj2.bias)
        # Label table, t-MLP and in-context position embedding: N(0, 0.02).
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.in_context_posemb, std=0.02)
        # adaLN-Zero: every modulation output layer and the final linear start at 0 (DiT §3.2).
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                       self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, z, t, y):
        t_emb, y_emb = self.t_embedder(t), self.y_embedder(y)   # (B, D) each
        c = t_emb + y_emb                                        # the adaLN condition
        x = self.x_embedder(z) + self.pos_embed                  # (B, N, D)
        cos, sin = self.rope_cos, self.rope_sin
        for i, block in enumerate(self.blocks):
            if i == self.ctx_start:
                # In-context conditioning: 32 copies of the class embedding (not t) + a learned position
                # embedding are prepended; from here on the RoPE table has 32 unrotated rows in front.
                ctx = y_emb.unsqueeze(1) + self.in_context_posemb    # (B, 32, D)
                x = torch.cat([ctx.to(x.dtype), x], dim=1)           # (B, 32 + N, D)
                cos, sin = self.rope_ctx_cos, self.rope_ctx_sin
            x = block(x, c, cos, sin)
        x = self.final_layer(x[:, IN_CONTEXT_LEN:], c)           # strip the class tokens: (B, N, p*p*3)
        return unpatchify(x, self.patch)                         # (B, 3, H, W)


def default_noise_scale(img_size):
    """Paper App. A / Tab. 9: noise e ~ N(0, s^2 I) with s = 1.0 x image_size / 256 (1 at 256px, 2 at 512px, 4 at
    1024px: more noise for more, more correlated pixels). The paper has no size below 256; there we keep s = 1 (the
    official code's default)."""
    return max(1.0, img_size / 256)


def create_model(config, img_size, num_classes, patch_size=None, pred="x", noise_scale=None):
    """The JiT of CONFIGS[config]. patch_size overrides the config's patch (ablation §4.2; bottleneck and
    in-context tokens unchanged); pred says what the output is ("x", "eps" or "v"); noise_scale the std of e."""
    if config not in CONFIGS:
        raise SystemExit(f"unknown --config {config!r}; choose one of: {', '.join(CONFIGS)}")
    cfg = dict(CONFIGS[config])
    if patch_size:
        cfg["patch"] = patch_size
    noise_scale = noise_scale or default_noise_scale(img_size)
    return JiT(config, img_size, num_classes, pred=pred, noise_scale=noise_scale, **cfg)


# ---------------------------------------------------------------------------------------------------------------
# ---- 4. Flow matching (paper §3.1 Eqs. 1-4, Tab. 1, §4.3, Alg. 1; official denoiser.py) ----
# ---------------------------------------------------------------------------------------------------------------
# z = t*x + (1-t)*e and v = dz/dt = x - e. From (z, t) and any ONE of x, e, v the other two follow:
#     from x:  v = (x - z) / (1-t)         e = (z - t*x) / (1-t)
#     from e:  v = (z - e) / t             x = (z - (1-t)*e) / t
#     from v:  x = z + (1-t)*v             e = z - t*v
# Dividing by (1-t) blows up near the data end t=1: the official code clamps (1-t) at T_EPS = 0.05, at training
# AND at sampling, which caps the v-loss weight on x at 1/0.05^2 = 400 and keeps t=1 finite (larger t_eps hurt,
# much smaller blew up: LTH14/JiT#68). We clamp t the same way where we divide by it (eps-prediction, only used by
# the ablation), so no conversion can produce inf or NaN at either end.
T_EPS = 0.05
P_MEAN, P_STD = -0.8, 0.8   # logit-normal t: t = sigmoid(N(P_MEAN, P_STD^2)), official --P_mean / --P_std
LABEL_DROP = 0.1            # probability of replacing the label by the null class (for CFG)


def _bcast(t, z):           # (B,) -> (B, 1, ..., 1) with as many dims as z: (B, 1, 1, 1) for images
    return t.view(-1, *[1] * (z.dim() - 1))


def to_x(kind, out, z, t):
    """The clean image x implied by a prediction `out` of quantity `kind` ("x", "eps" or "v") at (z, t)."""
    t = _bcast(t, z)
    if kind == "x":
        return out
    if kind == "eps":
        return (z - (1 - t) * out) / t.clamp_min(T_EPS)
    return z + (1 - t) * out


def to_eps(kind, out, z, t):
    """The noise e implied by a prediction `out` of quantity `kind` at (z, t)."""
    t = _bcast(t, z)
    if kind == "x":
        return (z - t * out) / (1 - t).clamp_min(T_EPS)
    if kind == "eps":
        return out
    return z - t * out


def to_v(kind, out, z, t):
    """The velocity v = x - e implied by a prediction `out` of quantity `kind` at (z, t)."""
    t = _bcast(t, z)
    if kind == "x":
        return (out - z) / (1 - t).clamp_min(T_EPS)
    if kind == "eps":
        return (z - out) / t.clamp_min(T_EPS)
    return out


CONVERT = {"x": to_x, "eps": to_eps, "v": to_v}


def x_to_v(x_pred, z, t):
    """v = (x - z) / max(1-t, t_eps): paper Alg. 1, used by the loss and the sampler."""
    return to_v("x", x_pred, z, t)


def v_to_x(v, z, t):
    """x = z + (1-t) * v (exact, no clamp needed)."""
    return to_x("v", v, z, t)


def sample_t(n, device, p_mean=P_MEAN, p_std=P_STD):
    """Logit-normal t (paper §3.1; mu from Tab. 3, sigma App. A): sigmoid of N(-0.8, 0.8^2) puts most samples at
    the noisy half, t < 0.5."""
    return torch.sigmoid(torch.randn(n, device=device) * p_std + p_mean)


def flow_loss(model, x, y, num_classes, pred="x", loss="v", noise_scale=1.0):
    """Paper Alg. 1 (training): x (B,3,H,W) in [-1,1], y (B,) class ids. Returns the scalar loss.
    The net outputs `pred`; the MSE is taken in the space of `loss` (the default x-pred/v-loss is the paper's;
    all 9 pairs are its Tab. 2, conversions Tab. 1). The target is the same conversion applied to the ground truth
    of what the net predicts, so the t_eps clamp acts as a loss weight and
    a perfect prediction has exactly zero loss."""
    B = x.shape[0]
    t = sample_t(B, x.device)                                           # (B,)
    e = torch.randn_like(x) * noise_scale                               # (B, 3, H, W)
    z = _bcast(t, x) * x + (1 - _bcast(t, x)) * e                       # noisy image z_t
    y = torch.where(torch.rand(B, device=y.device) < LABEL_DROP, num_classes, y)   # label dropout -> null class
    out = model(z, t, y).float()                                        # the net's prediction of `pred`
    truth = {"x": x, "eps": e, "v": x - e}[pred]
    target = CONVERT[loss](pred, truth, z, t)                           # e.g. v = (x - z) / max(1-t, t_eps)
    return (CONVERT[loss](pred, out, z, t) - target).pow(2).mean()      # mean over C, H, W and the batch


# ---------------------------------------------------------------------------------------------------------------
# ---- 5. Sampler (paper §3.1, Alg. 2, Tab. 9; official denoiser.py generate()) ----
# ---------------------------------------------------------------------------------------------------------------
CFG_SCALES = {  # official README (evaluation commands): CFG scale per model size at 256px and at 512px. The paper
    # sweeps [1, 4] per model (App. A) and publishes no table; no scale is published for G at all: we use H's.
    256: {"B": 3.0, "L": 2.4, "H": 2.2, "G": 2.2},
    512: {"B": 3.0, "L": 2.5, "H": 2.3, "G": 2.3},
}


def sampler_defaults(config, img_size):
    """The paper's sampler: Heun, 50 steps, CFG in v-space inside the interval (0.1, 1.0)."""
    size = config.split("-")[1][0] if config.startswith("JiT-") else "B"     # "JiT-L/16" -> "L"
    cfg = CFG_SCALES[512 if img_size >= 512 else 256].get(size, 3.0)
    return dict(steps=50, cfg=cfg, interval=(0.1, 1.0), solver="heun")


@torch.no_grad()
def velocity(model, z, t, y, cfg, interval):
    """v(z, t) with classifier-free guidance in v-space: v_u + w * (v_c - v_u), applied where t < interval[1] and
    (interval[0] == 0 or t > interval[0]): the official denoiser.py rule, so interval (0, 1) guides the first step
    t = 0 while (0.1, 1) does not guide t = 0.1. t is a python float (the same for the batch); the test is done in
    float32 like the official code's, so a grid point equal to float32(0.1) is not guided.
    Inside the interval cond and uncond run as ONE batched forward.
    DIFF: the official code always runs both halves and multiplies by a scale of 1 outside the interval; we skip
    the unconditional half there: the same result, and with Heun-50 and interval (0.1, 1) 187 instead of 198
    network evaluations per image (99 calls, 88 of them guided): 5.6% fewer."""
    B = z.shape[0]
    tt = torch.full((B,), t, device=z.device)
    if cfg != 1.0 and in_cfg_interval(t, interval):
        null = torch.full_like(y, model.num_classes)
        z2, t2 = torch.cat([z, z]), torch.cat([tt, tt])                         # (2B, 3, H, W), (2B,)
        v_c, v_u = to_v(model.pred, model(z2, t2, torch.cat([y, null])).float(), z2, t2).chunk(2)
        return v_u + cfg * (v_c - v_u)
    return to_v(model.pred, model(z, tt, y).float(), z, tt)


def in_cfg_interval(t, interval):
    """The official test t < hi and (lo == 0 or t > lo), in float32 as the official tensor comparison (on the
    50-step grid t = 5/50 is float32(0.1), not guided with lo = 0.1)."""
    t, lo, hi = np.float32(t), np.float32(interval[0]), np.float32(interval[1])
    return bool(t < hi and (lo == 0 or t > lo))


@torch.no_grad()
def sample(model, y, steps=None, cfg=None, interval=None, solver=None, noise=None, generator=None, progress=False):
    """Integrate dz/dt = v from t=0 (noise) to t=1 (data) on the uniform grid linspace(0, 1, steps+1) (Alg. 2).
    Heun (2nd order) on every interval but the last, where t_next = 1 and the (1-t) clamp makes a Heun
    correction meaningless, so the official code ends with one Euler step. Returns images (B,3,H,W) clamped to
    [-1, 1] (the official sampler returns raw values and clamps when converting to uint8: the same PNGs).
    None arguments take the paper's defaults (sampler_defaults). `noise` overrides the starting noise."""
    d = sampler_defaults(model.config, model.img_size)
    steps = steps or d["steps"]
    cfg = d["cfg"] if cfg is None else cfg
    cfg = 1.0 if model.num_classes == 1 else cfg           # unconditional data: nothing to guide towards
    interval = interval or d["interval"]
    solver = solver or d["solver"]
    if solver not in ("heun", "euler"):
        raise SystemExit(f"unknown solver {solver!r}: jit.py samples with 'heun' (the paper's) or 'euler'")
    dev = next(model.parameters()).device
    y = y.to(dev)
    B, H = y.shape[0], model.img_size
    if noise is None:
        noise = torch.randn(B, 3, H, H, generator=generator, device=generator.device if generator else dev)
    z = noise.to(dev, torch.float32) * model.noise_scale       # z_0 = e ~ N(0, noise_scale^2): App. A
    with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
        z = integrate(lambda z, t: velocity(model, z, t, y, cfg, interval), z, steps, solver, progress)
    return z.clamp(-1, 1)


def integrate(vel, z, steps, solver="heun", progress=False):
    """Solve dz/dt = vel(z, t) from t=0 to t=1 on linspace(0, 1, steps+1) (float32, as the official grid).
    Heun: an Euler predictor, then the average of the slopes at both ends; Euler alone on the last interval."""
    ts = torch.linspace(0, 1, steps + 1).tolist()
    for i in tqdm(range(steps), desc="sampling", disable=not progress, leave=False):
        t, t_next = ts[i], ts[i + 1]
        v = vel(z, t)
        if solver == "heun" and i < steps - 1:
            v = 0.5 * (v + vel(z + (t_next - t) * v, t_next))       # slope at the Euler point z + dt * v
        z = z + (t_next - t) * v
    return z


# ---------------------------------------------------------------------------------------------------------------
# ---- 6. Data ----
# ---------------------------------------------------------------------------------------------------------------
IMG_EXTS = (".png", ".jpg", ".jpeg", ".webp")
DATA_HELP = {  # what to do when `--data NAME` is not found in data/NAME
    "ffhq128": "download the FFHQ 128x128 thumbnails (70k PNGs, 'thumbnails128x128' of NVlabs/ffhq-dataset, "
               "~2 GB) and put them in data/ffhq128/ (subfolders are fine), or pass --data /path/to/folder",
    "imagenet": "put the ImageNet-1k train split (one subfolder per class, e.g. data/imagenet/n01440764/*.JPEG) "
                "in data/imagenet/, or pass --data /path/to/train",
}


def center_crop_arr(img, size):
    """ADM center crop (guided-diffusion, used by all four papers): halve with a box filter while the short side is
    >= 2*size, bicubic-resize the short side to `size`, take the center crop. PIL image -> (size, size, 3) uint8."""
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size]


class ImageFolder(torch.utils.data.Dataset):
    """Every image under `root`, searched recursively. Class subfolders (ImageNet layout: every image inside a
    top-level folder) give class labels; otherwise (FFHQ) one class. Returns (uint8 (3, H, W), label): the
    normalisation to [-1, 1] happens on the GPU (train_step) so the host only moves bytes."""

    def __init__(self, root, size, class_cond=True):
        self.root, self.size = Path(root), size
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMG_EXTS and p.is_file())
        if not self.files:
            raise SystemExit(f"no images (png/jpg/jpeg/webp) found under {root}: check the --data path.")
        top = [p.relative_to(self.root).parts for p in self.files]
        if class_cond and all(len(parts) > 1 for parts in top):
            self.classes = sorted({parts[0] for parts in top})
            index = {c: i for i, c in enumerate(self.classes)}
            self.labels = [index[parts[0]] for parts in top]
        else:
            self.classes, self.labels = ["all"], [0] * len(self.files)
        self.bad = 0    # unreadable files met by this process (each DataLoader worker counts its own)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        for j in range(i, i + 100):                    # an unreadable file is replaced by the next readable one
            path = self.files[j % len(self.files)]
            try:
                with Image.open(path) as img:
                    arr = center_crop_arr(img.convert("RGB"), self.size)
                return torch.from_numpy(arr.copy()).permute(2, 0, 1), self.labels[j % len(self.files)]
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                self.bad += 1
                warnings.warn(f"skipping unreadable image {path} ({err}); {self.bad} skipped so far here")
        # RuntimeError, not SystemExit: a DataLoader worker passes an Exception's message back to the main process.
        raise RuntimeError(f"100 unreadable images in a row under {self.root}: is this an image folder?")


class Shapes(torch.utils.data.Dataset):
    """Built-in labelled data, so `python jit.py` runs with no download: one coloured shape (the class) on a
    two-colour gradient background, random size, position, rotation and colours. Image i is a pure function of i
    (its own seeded RNG), so every epoch, worker and GPU sees the same images. Drawn at 4x and downsampled."""
    classes = ["circle", "square", "triangle", "diamond", "cross", "ring", "star", "hexagon"]

    def __init__(self, size, n=20_000):
        self.size, self.n = size, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        label = int(rng.integers(len(self.classes)))
        S = 4 * self.size
        c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)             # background gradient colours
        gy, gx = np.mgrid[0:S, 0:S] / S - 0.5                                   # (S, S) coordinates
        a = rng.uniform(0, 2 * np.pi)                                           # gradient direction
        ramp = np.clip(gx * np.cos(a) + gy * np.sin(a) + 0.5, 0, 1)[..., None]  # (S, S, 1) in [0, 1]
        img = Image.fromarray((c0 * (1 - ramp) + c1 * ramp).astype(np.uint8))   # (S, S, 3)
        draw = ImageDraw.Draw(img)
        r = rng.uniform(0.18, 0.35) * S                                         # shape radius
        cx, cy = rng.uniform(r, S - r, 2)
        a0 = rng.uniform(0, 2 * np.pi)                                          # rotation
        color = tuple(int(c) for c in rng.integers(0, 256, 3))

        def polygon(k, radius=r, phase=0.0):                                    # regular k-gon vertices
            return [(cx + radius * np.cos(a0 + phase + 2 * np.pi * j / k),
                     cy + radius * np.sin(a0 + phase + 2 * np.pi * j / k)) for j in range(k)]

        name = self.classes[label]
        if name == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif name == "ring":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=int(r * 0.35))
        elif name == "square":
            draw.polygon(polygon(4), fill=color)
        elif name == "diamond":                                                 # a rhombus: squashed square
            pts = polygon(4)
            draw.polygon([(cx + 0.55 * (px - cx), py) if j % 2 else (px, py) for j, (px, py) in enumerate(pts)],
                         fill=color)
        elif name == "triangle":
            draw.polygon(polygon(3), fill=color)
        elif name == "hexagon":
            draw.polygon(polygon(6), fill=color)
        elif name == "star":
            outer, inner = polygon(5), polygon(5, 0.42 * r, np.pi / 5)
            draw.polygon([p for pair in zip(outer, inner) for p in pair], fill=color)
        else:                                                                   # cross: two thick bars
            for phase in (0.0, np.pi / 2):
                dx, dy = np.cos(a0 + phase), np.sin(a0 + phase)
                draw.line([(cx - r * dx, cy - r * dy), (cx + r * dx, cy + r * dy)], fill=color, width=int(r * 0.5))
        img = img.resize((self.size, self.size), resample=Image.LANCZOS)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), label   # (3, H, W) uint8


def resolve_data(name):
    """`--data` -> (kind, path): "shapes", an existing folder, or data/NAME; a clear exit otherwise."""
    if name == "shapes":
        return "shapes", None
    if Path(name).is_dir():
        return "folder", Path(name)
    if Path("data", name).is_dir():
        return "folder", Path("data", name)
    if name in DATA_HELP:
        raise SystemExit(f"--data {name}: data/{name} not found. To get it: {DATA_HELP[name]}.")
    raise SystemExit(f"--data {name}: no such folder (nor data/{name}). Pass a folder of images or 'shapes'.")


def make_dataset(args):
    kind, path = resolve_data(args.data)
    if kind == "shapes":
        return Shapes(args.img_size)
    return ImageFolder(path, args.img_size, class_cond=not args.unconditional)


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (a seeded permutation per epoch, sharded over ranks) that can start part-way through
    an epoch, so a resumed run continues at the batch where the killed one stopped instead of replaying it."""
    skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self):
        return super().__len__() - self.skip


def batches(loader, data_state):
    """Endless (x, y) batches; data_state = {"epoch", "pos"} counts the batches consumed (saved in checkpoints)."""
    while True:
        loader.sampler.set_epoch(data_state["epoch"])
        loader.sampler.skip = data_state["pos"] * loader.batch_size
        for batch in loader:
            data_state["pos"] += 1
            yield batch
        data_state["epoch"], data_state["pos"] = data_state["epoch"] + 1, 0


# ---------------------------------------------------------------------------------------------------------------
# ---- 7. Training (paper Tab. 9, App. A; official main_jit.py / engine_jit.py) ----
# ---------------------------------------------------------------------------------------------------------------


class EMA:
    """Exponential moving average of the weights, updated in place with one fused _foreach op per step.
    DIFF: the official code keeps two EMAs (0.9999 and 0.9996) from step 0 (the paper picks per model among
    0.9996/0.9998/0.9999, App. A); we keep one, with the warmup decay_k = min(decay, (1 + k) / (10 + k)) (the
    num_updates rule of TensorFlow's ExponentialMovingAverage). For the paper's 750k-step runs this is 0.9999
    after ~90k steps; for a user's 10k-step run a fixed 0.9999 would still be mostly the random init, and the
    sample grids would show noise (EMA decay is a known reproduction pitfall: LTH14/JiT#42, #56)."""

    def __init__(self, model, decay):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.src = [p for p in model.parameters()]
        self.dst = [p for p in self.model.parameters()]

    @torch.no_grad()
    def update(self, step):
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.dst, self.src, 1 - d)          # ema += (1 - d) * (param - ema)


def unwrap(model):
    """The plain nn.Module under torch.compile (._orig_mod) and DDP (.module): what we save and sample from."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def lr_at(step, args):
    """lr = blr * batch / 256 (official main_jit.py), linear warmup over 5 epochs (per iteration), then constant
    (paper Tab. 9). Step k (1-based) gets peak * (k-1) / warmup_steps, as the official iteration k-1: the first
    step has lr 0 (official util/lr_sched.py)."""
    return args.peak_lr * min(1.0, (step - 1) / max(1, args.warmup_steps))


def build(args, num_classes, device):
    """The plain model, its EMA and the optimizer: what main() trains and bench.py times."""
    raw = create_model(args.config, args.img_size, num_classes, patch_size=args.patch_size, pred=args.pred,
                       noise_scale=args.noise_scale).to(device)
    ema = EMA(raw, args.ema)
    # Paper Tab. 9: Adam, betas (0.9, 0.95), weight decay 0 (official: AdamW with wd 0, the same thing).
    # fused=True: one kernel for all parameters on CUDA.
    opt = torch.optim.AdamW(raw.parameters(), lr=args.peak_lr, betas=(0.9, 0.95), weight_decay=0.0,
                            fused=device.type == "cuda")
    return raw, ema, opt


def compile_and_wrap(raw, args, device, ddp=False):
    """What actually runs the training forward: DDP for several GPUs, then torch.compile of the whole model.
    Speed: compiling the whole model fuses the norms, modulations, RoPE and activations around the matmuls into a
    few kernels, forward and backward; the model traces as one graph, with no graph break (tested)."""
    model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None) if ddp else raw
    return torch.compile(model) if args.compile else model


def train_step(model, ema, opt, x, y, step, args):
    """One optimisation step, exactly what main() runs and bench.py times. x: uint8 (B,3,H,W) on the device.
    Returns the loss as a 0-dim tensor without reading it (no host sync)."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, args)
    x = x.float() / 127.5 - 1.0                                           # uint8 [0, 255] -> [-1, 1], on device
    if args.flip:                                                         # random horizontal flip (official code)
        x = torch.where(torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
    raw = unwrap(model)
    with torch.autocast(x.device.type, torch.bfloat16, enabled=args.precision == "bf16"):
        # bf16 autocast without a GradScaler (bf16 has fp32's range), as the official code.
        loss = flow_loss(model, x, y, raw.num_classes, raw.pred, args.loss, raw.noise_scale)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    ema.update(step)
    return loss.detach()


def save_atomic(obj, path):
    """torch.save to a temp file in the same folder, then os.replace: a kill mid-write never corrupts ckpt.pt."""
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    state = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def find_checkpoint(path):
    """--resume accepts a run folder (its ckpt.pt) or a checkpoint file (LTH14/JiT#66: a file was silently
    ignored there and training restarted from scratch)."""
    path = Path(path)
    if path.is_dir():
        path = path / "ckpt.pt"
    if not path.is_file():
        raise SystemExit(f"--resume: no checkpoint at {path}. Pass a run folder containing ckpt.pt or a .pt file.")
    return path


def load_checkpoint(path):
    ckpt = torch.load(find_checkpoint(path), map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or ckpt.get("script") != SCRIPT:
        made_by = ckpt.get("script", "unknown") if isinstance(ckpt, dict) else "unknown"
        raise SystemExit(f"--resume: {path} is a checkpoint of {made_by}.py, not of {SCRIPT}.py; "
                         f"resume it with {made_by}.py or start a new run with another --out.")
    return ckpt


def save_grid(images, path, nrow):
    """(n, 3, H, W) in [-1, 1] -> one PNG grid with a 2-pixel gap."""
    imgs = ((images.float().cpu() + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    n, H, W, _ = imgs.shape
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (H + 2) + 2, nrow * (W + 2) + 2, 3), 255, np.uint8)
    for i, img in enumerate(imgs):
        r, c = divmod(i, nrow)
        grid[2 + r * (H + 2): 2 + r * (H + 2) + H, 2 + c * (W + 2): 2 + c * (W + 2) + W] = img
    Image.fromarray(grid).save(path)


def default_workers():
    """Data loader processes per training process: the cores this process may use, shared by the processes torchrun
    starts on this machine, one core left to each training process, at most 32. Speed: decoding and ADM-cropping
    one ImageNet JPEG takes ~3.7 ms on one core (README, "Data"), so ~270 img/s per worker: JiT-B/16's 2,400 img/s
    target on one GPU needs 9 or more of them."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(32, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))


def get_args(argv=None, ckpt=None):
    """Parse the CLI. A value is taken from, in order: the command line, the checkpoint being resumed, the
    --data preset (DATA_PRESETS), the built-in default. So `--resume RUN` alone continues RUN as it was."""
    p = argparse.ArgumentParser(description="Train JiT (Li & He, arXiv 2511.13720).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # -- data and model
    p.add_argument("--data", help="'shapes' (built in), a folder of images, or NAME for data/NAME (default shapes)")
    p.add_argument("--img-size", type=int, help="image side in pixels (default: from the --data preset)")
    p.add_argument("--config", help=f"model config: {', '.join(CONFIGS)}")
    p.add_argument("--patch-size", type=int, help="override the config's patch size (ablation §4.2)")
    p.add_argument("--unconditional", action=argparse.BooleanOptionalAction,
                   help="ignore class subfolders and train one class (FFHQ's folders are not classes)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, help="random horizontal flip (default on)")
    # -- objective (paper Alg. 1, Tab. 1-2)
    p.add_argument("--pred", choices=["x", "eps", "v"], help="what the network outputs (paper: x)")
    p.add_argument("--loss", choices=["x", "eps", "v"], help="space the MSE is taken in (paper: v)")
    p.add_argument("--noise-scale", type=float, help="std of the noise e (paper: img_size / 256; 1 below 256px)")
    # -- optimisation
    p.add_argument("--batch-size", type=int, help="GLOBAL batch size, split over the GPUs")
    p.add_argument("--steps", type=int, help="total optimisation steps")
    p.add_argument("--lr", type=float, help="learning rate (default: blr * batch / 256)")
    p.add_argument("--blr", type=float, help="base learning rate per 256 images (official: 5e-5)")
    p.add_argument("--warmup-epochs", type=float, help="linear lr warmup length in epochs (paper: 5)")
    p.add_argument("--ema", type=float, help="EMA decay (official: 0.9999), reached after a warmup")
    # -- run folder, logging, sampling
    p.add_argument("--out", help="run folder (default runs/jit-DATA)")
    p.add_argument("--resume", nargs="?", const="", help="resume from a run folder or ckpt file (alone: --out)")
    p.add_argument("--ckpt-every", type=int, help="steps between checkpoints")
    p.add_argument("--sample-every", type=int, help="steps between EMA sample grids")
    p.add_argument("--log-every", type=int, help="steps between loss readings (the only host syncs)")
    p.add_argument("--cfg", type=float, help="CFG scale for the grids (default: the paper's for the config)")
    p.add_argument("--sample-steps", type=int, help="sampler steps for the grids (paper: 50 Heun)")
    # -- system
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile (default: on CUDA)")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="autocast dtype (default: bf16 on CUDA)")
    p.add_argument("--num-workers", type=int, help="data loader processes per GPU (default: cores per GPU - 1)")
    p.add_argument("--seed", type=int, help="global seed")
    p.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda if available; torchrun: local rank)")
    p.add_argument("--toy", action="store_true", help="run the paper's toy experiment (§3.3, Fig. 2) and exit")
    args = p.parse_args(argv)

    saved = ckpt["args"] if ckpt else {}
    data = args.data or saved.get("data") or "shapes"
    preset = DATA_PRESETS.get(Path(data).name, FOLDER_DEFAULTS)          # "data/ffhq128" is ffhq128 too
    defaults = dict(data="shapes", img_size=256, config="JiT-B/16", patch_size=None, unconditional=False,
                    flip=True, pred="x", loss="v", noise_scale=None, batch_size=128, steps=100_000, lr=None,
                    blr=5e-5, warmup_epochs=5.0, ema=0.9999, out=None, ckpt_every=5000, sample_every=5000,
                    log_every=50, cfg=None, sample_steps=None, compile=None, precision=None,
                    num_workers=default_workers(), seed=0, device=None)
    machine = ("out", "device", "compile", "precision", "num_workers")  # never taken from the checkpoint
    for key, default in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, (saved if key not in machine else {}).get(key, preset.get(key, default)))
    if args.resume and not args.out:                                    # resume writes where the checkpoint is
        args.out = str(Path(args.resume) if Path(args.resume).is_dir() else Path(args.resume).parent)
    args.out = args.out or f"runs/{SCRIPT}-{Path(data).name}"
    # --lr stays what the user gave (None = derive), so a resumed run re-derives it from --blr / --batch-size.
    args.peak_lr = args.lr or args.blr * args.batch_size / 256          # official lr scaling rule
    args.warmup_steps = 0                                               # main() sets it from the dataset size
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    args.compile = cuda if args.compile is None else args.compile       # compile and bf16 by default on GPUs
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    return args


def setup_distributed(args):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: then one process per GPU (DDP). Plain `python jit.py`: one
    process on --device. Returns (rank, world_size, device)."""
    if "RANK" not in os.environ:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda":
            device = torch.device("cuda", device.index or 0)   # "cuda" -> "cuda:0": set_device needs an index
            torch.cuda.set_device(device)
        return 0, 1, device
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available() and args.device != "cpu":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return rank, world, device


def check_compatible(args, ckpt):
    """A checkpoint continues only the run it came from: same script (checked on load), model and objective."""
    for key in ("config", "img_size", "patch_size", "pred", "loss", "noise_scale"):
        if key in ckpt["args"] and getattr(args, key) != ckpt["args"][key]:
            raise SystemExit(f"--resume: the checkpoint has {key}={ckpt['args'][key]!r} but this run asks for "
                             f"{getattr(args, key)!r}; drop that flag to continue the run, or use another --out.")


# ---------------------------------------------------------------------------------------------------------------
# ---- 8. main ----
# ---------------------------------------------------------------------------------------------------------------


def main(argv=None):
    # -- The run's settings. A resumed run re-reads its own settings from the checkpoint (flags given now win).
    args = get_args(argv)
    if args.toy:                                        # paper Fig. 2 on CPU: prints a table, writes the PNGs
        return toy_experiment(out=Path(args.out) / "toy")
    ckpt = None
    if args.resume is not None:
        ckpt_path = find_checkpoint(args.resume or args.out)
        ckpt = load_checkpoint(ckpt_path)
        args = get_args(argv, ckpt)
        check_compatible(args, ckpt)
    elif (Path(args.out) / "ckpt.pt").exists():
        raise SystemExit(f"{args.out}/ckpt.pt exists: pass --resume to continue that run, or choose another --out.")

    # -- Processes and devices: one process per GPU under torchrun, else one process on --device.
    rank, world, device = setup_distributed(args)
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by the {world} processes (GPUs); "
                         "use a multiple.")
    torch.manual_seed(args.seed + rank)                         # ranks draw different t, noise and label drops
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = True                # TF32 for whatever still runs in fp32
    torch.backends.cudnn.allow_tf32 = True

    # -- Data: the class count comes from the data (1 for a flat folder or FFHQ, 1000 for ImageNet).
    dataset = make_dataset(args)
    num_classes = len(dataset.classes)
    if len(dataset) < args.batch_size:
        raise SystemExit(f"{len(dataset)} images is fewer than one batch ({args.batch_size}); lower --batch-size.")
    args.warmup_steps = int(args.warmup_epochs * len(dataset) // args.batch_size)   # paper: 5 epochs
    # -- Model, EMA, optimizer; on resume every piece of state comes back: weights, EMA, Adam moments, step,
    #    every rank's RNG and the position in the epoch, so the resumed run continues exactly (a test checks it).
    raw, ema, opt = build(args, num_classes, device)
    step, data_state = 0, {"epoch": 0, "pos": 0}
    if ckpt:
        if ckpt["num_classes"] != num_classes:
            raise SystemExit(f"--resume: the checkpoint has {ckpt['num_classes']} classes, this data "
                             f"{num_classes}; resume with the data it was trained on.")
        raw.load_state_dict(ckpt["model"])
        ema.model.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step, data_state = ckpt["step"], dict(ckpt["data"])
        set_rng_state(ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0])
        del ckpt
    model = compile_and_wrap(raw, args, device, ddp=world > 1)

    # -- Loader: uint8 images from worker processes into pinned memory, copied asynchronously (non_blocking) to
    #    the GPU, where train_step normalises them. persistent_workers keeps the workers alive across epochs.
    local_batch = args.batch_size // world
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=local_batch, sampler=sampler, num_workers=args.num_workers, drop_last=True,
        pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0,
        generator=torch.Generator().manual_seed(args.seed))   # own RNG: a new epoch must not draw from the global
                                                              # one, or a resumed run would diverge from the original
    data = batches(loader, data_state)

    run = Path(args.out)
    if rank == 0:
        run.mkdir(parents=True, exist_ok=True)
        (run / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))
        n_params = sum(p.numel() for p in raw.parameters())
        print(f"{args.config} ({n_params / 1e6:.1f}M params, patch {raw.patch}, pred {args.pred}, loss {args.loss}) "
              f"on {len(dataset)} images, {num_classes} classes, {world} x {device.type}, batch {args.batch_size}, "
              f"lr {args.peak_lr:.2e}, {args.precision}, compile={args.compile} -> {run}")
    # Fixed noise and labels for the grids, so successive grids show the same samples improving.
    gen = torch.Generator().manual_seed(1234)
    grid_noise = torch.randn(64, 3, args.img_size, args.img_size, generator=gen)
    grid_y = torch.arange(64) % num_classes

    def log_and_check(loss_sum, n, t0):
        """The only host sync: read the mean loss of the last n steps, stop on NaN/inf, write log.jsonl."""
        if world > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= world
        loss = loss_sum.item() / n
        if not math.isfinite(loss):
            raise SystemExit(f"loss is {loss} at step {step}: training diverged. {run}/ckpt.pt holds the last good "
                             "checkpoint; resume from it with a lower --lr (or --precision fp32).")
        rate = n * args.batch_size / (time.time() - t0)
        if rank == 0:
            with open(run / "log.jsonl", "a") as f:
                f.write(json.dumps(dict(step=step, loss=loss, lr=lr_at(step, args), img_per_s=rate)) + "\n")
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.0f}", lr=f"{lr_at(step, args):.1e}")

    # -- The loop. The loss stays on the GPU (loss_sum) and is read every --log-every steps only: a .item() per
    #    step would make the CPU wait for the GPU and leave it idle while the next step is queued.
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, desc=f"{SCRIPT} {args.config}", dynamic_ncols=True)
    loss_sum, n, t0 = torch.zeros((), device=device), 0, time.time()
    try:
        while step < args.steps:
            x, y = next(data)                                     # (B/world, 3, H, W) uint8, (B/world,) long
            step += 1
            loss_sum += train_step(model, ema, opt, x.to(device, non_blocking=True),
                                   y.to(device, non_blocking=True), step, args)
            n += 1
            bar.update(1)
            if step % args.log_every == 0 or step % args.ckpt_every == 0 or step == args.steps:
                log_and_check(loss_sum, n, t0)                     # before any save: never checkpoint a NaN
                loss_sum, n, t0 = torch.zeros((), device=device), 0, time.time()
            if step % args.sample_every == 0 or step == args.steps:   # EMA weights, the paper's sampler
                if rank == 0:
                    images = sample(ema.model, grid_y, steps=args.sample_steps, cfg=args.cfg, noise=grid_noise)
                    save_grid(images, run / f"grid_{step:07d}.png", nrow=8)
            if step % args.ckpt_every == 0 or step == args.steps:
                rngs = [None] * world
                if world > 1:
                    dist.all_gather_object(rngs, rng_state())    # every rank's RNG, for an exact resume
                else:
                    rngs = [rng_state()]
                if rank == 0:                                     # the checkpoint layout all 4 scripts share
                    save_atomic(dict(script=SCRIPT, config=args.config, img_size=args.img_size,
                                     num_classes=num_classes, pred=args.pred,
                                     model_kwargs=dict(patch_size=args.patch_size, pred=args.pred,
                                                       noise_scale=raw.noise_scale),
                                     model=raw.state_dict(), ema=ema.model.state_dict(), opt=opt.state_dict(),
                                     step=step, args=vars(args), rng=rngs, data=dict(data_state)), run / "ckpt.pt")
    except torch.OutOfMemoryError:
        raise SystemExit(f"out of GPU memory at {local_batch} images per GPU ({args.config}, {args.img_size}px): "
                         "lower --batch-size, use more GPUs, or keep --precision bf16.")
    bar.close()
    if world > 1:
        dist.destroy_process_group()
    return run


# ---------------------------------------------------------------------------------------------------------------
# ---- 9. Toy experiment (paper §3.3, Fig. 2) ----
# ---------------------------------------------------------------------------------------------------------------
# The paper's argument in one small experiment. d = 2 dimensional data x_hat (a curve in the plane) is "buried" in
# a D-dimensional space by a fixed random column-orthogonal matrix P (D, 2), P^T P = I:  x = P x_hat.  The model
# never sees P: for it this is a D-dimensional generation problem. A 5-layer ReLU MLP with 256 hidden units is
# trained with x-, eps- or v-prediction, ALL with the v-loss (paper §3.3: "all using the v-loss, i.e. Tab. 1(3)(a-c)"),
# then samples are drawn with the ODE sampler and projected back to the plane with P^T for viewing. As D grows past
# the MLP's width (D = 512 > 256: under-complete) eps- and v-prediction fail, because their targets (noise,
# velocity) fill all D dimensions, while x-prediction still works: its target lives on a 2-D plane.
#     python jit.py --toy                    # 4 dims x 3 predictions = 12 small MLPs, about a minute on 2 CPU cores
# What the paper does not say (our choices, marked "choice:"): the curve, its scale, how t enters the MLP, the
# optimizer, steps and batch size, the number of samples, and the metric (the paper only shows scatter plots).
# Shapes in this section: N points, D ambient dimension, d = 2.
# The x / eps / v conversions are §4's to_x / to_eps / to_v (their _bcast works for (B, D) points as for images).


# choice: the paper's text does not name the 2-D distribution; we use a spiral arc (no noise, as most public
# re-creations of Fig. 2 do), scaled so each of its two coordinates has std ~1 (like [-1, 1] pixels), and unit
# noise per dimension, as for images. Its arms are ~1.3 apart, so a blob over the whole spiral scores ~0.4 below.
SPIRAL_TURNS = (0.5, 1.75)  # theta from 2*pi*0.5 to 2*pi*1.75: 1.25 turns, not starting at the centre
SPIRAL_SCALE = 0.2          # radius = 0.2 * theta: max radius 0.7*pi ~ 2.2, std per coordinate ~ 1.0


def spiral(s):
    """Points on the ground-truth curve for s in [0, 1]: (N,) -> (N, 2)."""
    theta = 2 * math.pi * (SPIRAL_TURNS[0] + (SPIRAL_TURNS[1] - SPIRAL_TURNS[0]) * s)   # (N,)
    r = theta * SPIRAL_SCALE                                                            # radius grows with angle
    return torch.stack([r * torch.cos(theta), r * torch.sin(theta)], dim=-1)            # (N, 2)


def random_projection(D, generator):
    """Fixed random column-orthogonal P (D, 2): QR of a Gaussian matrix, so P^T P = I (paper §3.3)."""
    q, _ = torch.linalg.qr(torch.randn(D, 2, generator=generator, dtype=torch.float64))  # (D, 2), orthonormal cols
    return q.float()


class ToyMLP(nn.Module):
    """Paper §3.3: "a 5-layer ReLU MLP with 256-dim hidden units": 5 Linear layers, ReLU between them.
    choice: t enters as one extra input feature (the paper does not say how the MLP is conditioned on t)."""

    def __init__(self, D, width=256, depth=5):
        super().__init__()
        dims = [D + 1] + [width] * (depth - 1) + [D]                    # D+1 -> 256 -> 256 -> 256 -> 256 -> D
        layers = []
        for i in range(depth):
            layers += [nn.Linear(dims[i], dims[i + 1]), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])                          # no ReLU after the output layer

    def forward(self, z, t):                                            # z: (B, D), t: (B,) -> (B, D)
        return self.net(torch.cat([z, t[:, None]], dim=1))             # (B, D+1) -> (B, D)


def toy_loss(net, pred, x, g, p_mean=0.0, p_std=1.0):
    """The v-loss (paper Eq. 3, Tab. 1 row (3)) for a net that outputs `pred`. x: (B, D) clean data.
    choice: logit-normal t with mu=0, sigma=1 (SD3's default; the paper's mu=-0.8 was tuned for ImageNet 256,
    Tab. 3, and almost never draws t > 0.8, which leaves the end of the toy trajectories untrained)."""
    B = x.shape[0]
    t = torch.sigmoid(torch.randn(B, generator=g) * p_std + p_mean).to(x.device)   # (B,) logit-normal t
    e = torch.randn(x.shape, generator=g).to(x.device)                             # (B, D) noise
    z = _bcast(t, x) * x + (1 - _bcast(t, x)) * e                        # z_t = t*x + (1-t)*e
    truth = {"x": x, "eps": e, "v": x - e}[pred]
    # Target = the same conversion applied to the ground truth, so the t_eps clamp acts as a loss weight and a
    # perfect net has exactly zero loss (for x-pred this is the official target v = (x - z) / max(1-t, t_eps)).
    return (to_v(pred, net(z, t), z, t) - to_v(pred, truth, z, t)).pow(2).mean()


@torch.no_grad()
def toy_sample(net, pred, n, D, steps, g, device):
    """Paper Eq. 4 with jit.py's sampler: Heun on linspace(0, 1, steps+1), a last Euler step. Returns (n, D)."""
    z = torch.randn(n, D, generator=g).to(device)                       # z_0 = e ~ N(0, I), (n, D)

    def vel(z, t):                                                      # every prediction is integrated as v
        tt = torch.full((n,), t, device=device)
        return to_v(pred, net(z, tt), z, tt)

    return integrate(vel, z, steps)                                     # Heun, last step Euler


def curve_distance(pts, curve):
    """Mean Euclidean distance from each point of pts (N, 2) to the dense curve samples (M, 2), nearest one."""
    return torch.cdist(pts, curve).min(dim=1).values.mean().item()


def draw_scatter(path, pts, curve, title, size=320, extent=2.5):
    """One PNG: the true curve in grey, the generated points (projected to 2-D) in blue. Pillow only."""
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    to_px = lambda p: ((p[:, 0] / extent + 1) * size / 2, (1 - p[:, 1] / extent) * size / 2)   # y axis up
    cx, cy = to_px(curve)
    draw.line(list(zip(cx.tolist(), cy.tolist())), fill=(190, 190, 190), width=3)
    px, py = to_px(pts)
    for u, w in zip(px.tolist(), py.tolist()):
        if 0 <= u < size and 0 <= w < size:                             # points off the plot are not drawn
            draw.ellipse([u - 1.5, w - 1.5, u + 1.5, w + 1.5], fill=(30, 90, 200))
    draw.text((6, 4), title, fill="black")
    img.save(path)


def toy_experiment(dims=(2, 8, 16, 512), preds=("x", "eps", "v"), steps=1000, out=None, seed=0, device="cpu",
                   batch=128, lr=2e-3, width=256, n_samples=1000, sample_steps=50, verbose=True):
    """Paper Fig. 2 as numbers: train one MLP per (D, pred), sample, project back with P^T, and return
    {(D, pred): mean distance of the generated points to the true curve}. Prints the table (rows D, columns pred)
    and, if `out` is a folder, writes toy_D{D}_{pred}.png there.
    choice (not in the paper): Adam, lr 2e-3 decayed linearly to 0, batch 128, 1000 steps, fresh curve points every
    step: the budget that trains all 12 models on 2 CPU cores in about a minute. At this budget eps-prediction is
    still under-trained even at D=2 (0.19; 0.08 after 3000 steps): it learns slowest, its v = (z - e)/t multiplies
    errors by up to 1/t_eps = 20 at the noise end, where the sampler starts."""
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
    curve = spiral(torch.linspace(0, 1, 4000))                          # (M, 2) dense ground truth, for the metric
    threads = torch.get_num_threads()
    # One thread for these tiny matmuls: on an idle 2-core machine two threads are ~1.5x faster, but on a busy one
    # (CI, other jobs) they were 5-10x slower here. Restored at the end.
    torch.set_num_threads(1)
    results = {}
    for D in dims:
        P = random_projection(D, torch.Generator().manual_seed(seed)).to(device)   # (D, 2), fixed for this D
        for pred in preds:
            # The same init, data, t, noise and starting noise for x, eps and v: only the parameterisation differs.
            with torch.random.fork_rng(devices=[]):                     # seed the init, leave the global RNG alone
                torch.manual_seed(seed)
                net = ToyMLP(D, width).to(device)
            g = torch.Generator().manual_seed(seed + 1)                 # data, t, noise, starting noise
            opt = torch.optim.Adam(net.parameters(), lr=lr)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
            for _ in range(steps):
                x = spiral(torch.rand(batch, generator=g)).to(device) @ P.T      # (B, 2) @ (2, D) -> (B, D)
                loss = toy_loss(net, pred, x, g)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
            pts = (toy_sample(net, pred, n_samples, D, sample_steps, g, device) @ P).cpu()   # (N, D) -> (N, 2)
            results[(D, pred)] = curve_distance(pts, curve)
            if out is not None:
                draw_scatter(out / f"toy_D{D}_{pred}.png", pts.numpy(), curve.numpy(),
                             f"D={D}  {pred}-pred  dist={results[(D, pred)]:.3f}")
    torch.set_num_threads(threads)
    if verbose:
        print("mean distance of generated points to the true curve, after projecting back with P^T (lower is better)")
        print("D".rjust(6) + "".join(f"{p + '-pred':>10}" for p in preds))
        for D in dims:
            print(f"{D:6d}" + "".join(f"{results[(D, p)]:10.3f}" for p in preds))
    return results


if __name__ == "__main__":
    main()
