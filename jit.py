"""
JiT: "Back to Basics: Let Denoising Generative Models Denoise" (Tianhong Li & Kaiming He, arXiv 2511.13720)

A plain ViT ("Just image Transformer") on raw pixels with big patches (16 at 256px, 32 at 512px), trained as a
flow-matching model whose network predicts the CLEAN image x, not the noise or the velocity. Clean images lie on a
low-dimensional manifold; noise does not: a 3*16*16 = 768-dim patch token can carry x through a width-768
transformer, but not the full-rank noise that eps- or v-prediction must reproduce (§4.2, Tab. 2; toy version §3.3,
Fig. 2). The loss is still taken on velocity ("x-prediction, v-loss", Alg. 1), which weights the timesteps well.
Start reading at `flow_loss` (Alg. 1, one screen), then `sample` (Alg. 2) and the model `JiT`.

Time convention (all our scripts): z_t = t*x + (1-t)*e, t=0 is pure noise e, t=1 is data x; v = dz/dt = x - e.
Shapes: B batch, C=3 channels, H=W image size, p patch, h=w=H/p patch grid, N=h*w tokens, D width.

    python jit.py                                        # built-in "shapes" data: JiT-S (no GPU: JiT-T, 4 min)
    python jit.py --data ffhq128                         # FFHQ 128x128 (see README for the download)
    torchrun --nproc_per_node=8 jit.py --data imagenet --config JiT-B/16     # the paper's ImageNet-256 run
    python jit.py --data ffhq128 --config JiT-S --patch-size 8 --pred v      # a cell of the FFHQ patch-size sweep
    python jit.py --toy                                  # the paper's toy experiment (Fig. 2), CPU
    python sample.py runs/jit-shapes --grid grid.png     # sample a checkpoint (sample.py)

Official code: LTH14/JiT (PyTorch). Differences from it: grep "DIFF:".
"""

import argparse
import contextlib
import copy
import json
import math
import os
import random
import signal
import socket
import sys
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
    # Not in the paper: the laptop preset's model (LAPTOP_PRESET: 32px shapes in minutes on a CPU); 8x8 patches.
    "JiT-T": dict(depth=6, width=128, heads=4, patch=8, bottleneck=32, ctx_start=2, drop=0.0),
    # For the tests only: one forward+backward at 32px in milliseconds on a CPU.
    "tiny": dict(depth=4, width=64, heads=2, patch=8, bottleneck=16, ctx_start=1, drop=0.0),
}
IN_CONTEXT_LEN = 32  # number of in-context class tokens (paper §4.4 and App. A, Tab. 9)

# ---------------------------------------------------------------------------------------------------------------
# ---- 2. The objective: x-prediction, v-loss (paper §3.1 Eqs. 1-4, Tab. 1 row (3)(a), §4.3, Alg. 1) ----
# ---------------------------------------------------------------------------------------------------------------
# z = t*x + (1-t)*e and v = dz/dt = x - e, so from (z, t) and a prediction of x:  v = (x - z) / (1-t).
# Dividing by (1-t) blows up at the data end t=1: the official code clamps (1-t) at T_EPS = 0.05, at training AND
# at sampling, which caps the v-loss weight on x at 1/0.05^2 = 400 and keeps t=1 finite (the value is not
# explained; in LTH14/JiT#68 a user saw 2e-2 and 1e-3 blow up on a non-image task). The network's other possible
# outputs (eps, v) are the ablation: appendix A.
T_EPS = 0.05                # official --t_eps
P_MEAN, P_STD = -0.8, 0.8   # logit-normal t: t = sigmoid(N(P_MEAN, P_STD^2)), official --P_mean / --P_std
LABEL_DROP = 0.1            # probability of replacing the label by the null class (for CFG)


def _bcast(t, z):           # (B,) -> (B, 1, ..., 1) with as many dims as z: (B, 1, 1, 1) for images
    return t.view(-1, *[1] * (z.dim() - 1))


def x_to_v(x_pred, z, t):
    """v = (x - z) / max(1-t, T_EPS): paper Alg. 1, used by the loss (prediction AND target) and the sampler."""
    return (x_pred - z) / (1 - _bcast(t, z)).clamp_min(T_EPS)


def v_to_x(v, z, t):
    """x = z + (1-t) * v: the inverse of x_to_v where 1-t >= T_EPS (exact, no clamp needed)."""
    return z + (1 - _bcast(t, z)) * v


def sample_t(n, device, p_mean=P_MEAN, p_std=P_STD):
    """Logit-normal t (paper §3.1; mu from Tab. 3, sigma App. A): sigmoid of N(-0.8, 0.8^2) puts most samples at
    the noisy half, t < 0.5."""
    return torch.sigmoid(torch.randn(n, device=device) * p_std + p_mean)


def flow_loss(model, x, y, num_classes, noise_scale=1.0):
    """Paper Alg. 1 (training): x (B, 3, H, W) clean images in [-1, 1], y (B,) class ids -> the scalar v-loss.
    The target goes through the same clamped x_to_v as the prediction, so the clamp acts as a loss weight and a
    perfect prediction has exactly zero loss (the official code does the same)."""
    t = sample_t(x.shape[0], x.device)                                  # (B,)
    e = torch.randn_like(x) * noise_scale                               # (B, 3, H, W) noise, std: App. A
    z = _bcast(t, x) * x + (1 - _bcast(t, x)) * e                       # noisy image z_t
    y = torch.where(torch.rand_like(t) < LABEL_DROP, num_classes, y)    # label dropout -> null class (CFG)
    x_pred = model(z, t, y).float()                                     # the net predicts the clean image
    v_pred = x_to_v(x_pred, z, t)                                       # (x_pred - z) / max(1-t, t_eps)
    v = x_to_v(x, z, t)                                                 # = x - e wherever 1-t >= t_eps
    return (v - v_pred).pow(2).mean()                                   # mean over C, H, W and the batch


# ---------------------------------------------------------------------------------------------------------------
# ---- 3. Sampler (paper §3.1, Alg. 2, Tab. 9; official denoiser.py generate()) ----
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
    """v(z, t) for all B images at time t (a python float), with classifier-free guidance v_u + cfg * (v_c - v_u)
    inside the CFG interval (in_cfg_interval); there cond and uncond run as ONE batched forward of 2B.
    DIFF: the official code always runs both halves, as two forwards, and multiplies by a scale of 1 outside the
    interval; we batch them, and skip the unconditional half outside the interval: the same result, and with
    Heun-50 and interval (0.1, 1) 187 instead of 198 network evaluations per image (99 calls, 88 of them guided):
    5.6% fewer."""
    B = z.shape[0]
    tt = torch.full((B,), t, device=z.device)
    if cfg == 1.0 or not in_cfg_interval(t, interval):
        return net_velocity(model, z, tt, y)
    null = torch.full_like(y, model.num_classes)                            # the null class row (CFG)
    z2, t2 = torch.cat([z, z]), torch.cat([tt, tt])                         # (2B, 3, H, W), (2B,)
    v_c, v_u = net_velocity(model, z2, t2, torch.cat([y, null])).chunk(2)
    return v_u + cfg * (v_c - v_u)                                          # (B, 3, H, W)


def net_velocity(model, z, t, y):
    """The velocity the network implies: x_to_v of its x-prediction (Alg. 2); for the ablation's eps- and
    v-predicting networks, the conversion of appendix A."""
    out = model(z, t, y).float()
    return x_to_v(out, z, t) if model.pred == "x" else to_v(model.pred, out, z, t)


def in_cfg_interval(t, interval):
    """The official guidance test, in float32 as the official tensor comparison: t < hi and (lo == 0 or t > lo)
    (official denoiser.py), so interval (0, 1) guides the first step t = 0, and (0.1, 1) does not guide the 50-step
    grid's t = 5/50, which float32 linspace gives as 0.099999994, below 0.1."""
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
# ---- 4. The model (paper §4.1 and §4.4, Fig. 3) ----
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
        self.t_embedder = TimestepEmbedder(width, max_period=10_000)
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


# ---------------------------------------------------------------------------------------------------------------
# ---- 5. Standard ViT / DiT parts (official model_jit.py, util/model_util.py) ----
# ---------------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm with a learnable gain (eps 1e-6), computed in fp32 whatever the autocast dtype; returns the input
    dtype."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight, self.eps).type_as(x)


def modulate(x, shift, scale):                  # x: (B, N, D), shift/scale: (B, D)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> (B, D): 256 sinusoids of the RAW t (not t*1000 as in DiT), ordered [cos | sin], then an MLP
    256 -> D -> D. max_period is the official code's (10 for PixNerd, PixelDiT and DeCo; 10000 for JiT)."""

    def __init__(self, dim, freq_dim=256, max_period=10):
        super().__init__()
        half = freq_dim // 2
        self.register_buffer("freqs", torch.exp(-math.log(max_period) * torch.arange(half) / half), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t):                                           # (B,)
        args = t.float()[:, None] * self.freqs[None]                # (B, 128)
        return self.mlp(torch.cat([args.cos(), args.sin()], -1))    # (B, 256) -> (B, D)


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
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, heads, N, d)
        q = apply_rope(self.q_norm(q), cos, sin).to(v.dtype)
        k = apply_rope(self.k_norm(k), cos, sin).to(v.dtype)
        # DIFF: LTH14/JiT computes softmax(q k^T) by hand in fp32 (and applies a never-used zero bias); we call
        # F.scaled_dot_product_attention, which runs flash attention in bf16 with an fp32 softmax accumulator:
        # same math, faster, O(N) memory. The author kept fp32 against loss spikes he saw with
        # v/eps-prediction (LTH14/JiT#15); with qk-norm the logits are bounded.
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
# ---- 6. Data (ADM center crop, official main_jit.py; the built-in `shapes` data is in the appendix) ----
# ---------------------------------------------------------------------------------------------------------------
# The standard parts: data, training, checkpoints, command line. A helper here has the same code in every
# script that has it (test_all.py's SHARED lists them), except this paper's recipe: lr_at, model_kwargs, build,
# train_step, init_from (JiT has no REPA projector to carry over), the presets, get_args and main.
IMG_EXTS = (".png", ".jpg", ".jpeg", ".webp")
DATA_HELP = {  # what to do when `--data NAME` is not found in data/NAME
    "ffhq128": "download the FFHQ 128x128 thumbnails (70k PNGs, 'thumbnails128x128' of NVlabs/ffhq-dataset, "
               "~2 GB) and put or link them in data/ffhq128/ (subfolders are fine; the ffhq128 defaults follow "
               "the folder's name)",
    "imagenet": "put the ImageNet-1k train split (one subfolder per class, e.g. data/imagenet/n01440764/*.JPEG) "
                "in data/imagenet/, or link it there: ln -s /path/to/train data/imagenet (the imagenet defaults "
                "follow the folder's name)",
}


def center_crop_arr(img, size):
    """ADM center crop (guided-diffusion's center_crop_arr, as in the official JiT, PixNerd and DeCo loaders): halve
    with a box filter while the short side is >= 2*size, bicubic-resize it to `size`, take the center.
    PIL image -> (size, size, 3) uint8."""
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    arr = np.asarray(img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC))
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size]


def open_rgb(path):
    """An image file as 8-bit RGB. 16-bit greyscale is scaled to 8 bits (PIL's own conversion clips it: mid-grey
    would come out white); palette, alpha, CMYK and 1-bit images convert as usual."""
    with Image.open(path) as img:
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8))
        return img.convert("RGB")


class ImageFolder(torch.utils.data.Dataset):
    """Every image under `root` (recursive) as (uint8 (3, H, W), label); [-1, 1] is made on the device. Class
    subfolders (ImageNet: every image inside a top-level folder) give labels, else one class (FFHQ)."""

    def __init__(self, root, size, class_cond=True):
        self.root, self.size = Path(root), size
        self.files = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMG_EXTS and p.is_file())
        if not self.files:
            raise SystemExit(f"no images (png/jpg/jpeg/webp) found under {root}: check the --data path.")
        tops = [p.relative_to(self.root).parts for p in self.files]
        self.classes = sorted({q[0] for q in tops}) if class_cond and all(len(q) > 1 for q in tops) else ["all"]
        index = {c: i for i, c in enumerate(self.classes)}
        self.labels = [index.get(q[0], 0) for q in tops]
        self.bad = set()                                # unreadable files met by this process (or worker)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        for j in range(i, i + 100):                    # an unreadable file is replaced by the next readable one
            path = self.files[j % len(self.files)]
            try:
                arr = center_crop_arr(open_rgb(path), self.size)
                return torch.from_numpy(arr.copy()).permute(2, 0, 1), self.labels[j % len(self.files)]
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                if path not in self.bad:                # one warning per file, not one per epoch
                    self.bad.add(path)
                    warnings.warn(f"skipping unreadable image {path} ({err}); {len(self.bad)} skipped so far here")
        # RuntimeError, not SystemExit: a DataLoader worker passes an Exception's message back to the main process.
        raise RuntimeError(f"100 unreadable images in a row under {self.root}: is this an image folder?")


def make_dataset(args):
    """`--data`: "shapes" (built in, appendix), a folder of images, or NAME for the folder data/NAME."""
    if args.data == "shapes":
        return Shapes(args.img_size)
    for folder in (Path(args.data), Path("data", args.data)):
        if folder.is_dir():
            return ImageFolder(folder, args.img_size, class_cond=not args.unconditional)
    if args.data in DATA_HELP:
        raise SystemExit(f"--data {args.data}: data/{args.data} not found. To get it: {DATA_HELP[args.data]}.")
    raise SystemExit(f"--data {args.data}: no such folder (nor data/{args.data}). Pass a folder of images or 'shapes'.")


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (a seeded permutation per epoch, sharded over ranks) that starts `skip` samples in, so a
    resumed run continues at the batch where the killed one stopped."""
    skip = 0

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self):
        return super().__len__() - self.skip


def make_batches(dataset, args, rank, world, device, data_state):
    """Endless (x, y) batches on the device: uint8 (B/world, 3, H, W), (B/world,). Workers decode into pinned memory.
    data_state {"epoch", "pos"} counts the batches consumed; checkpoints save it, so a resume takes the next one."""
    sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size // world, sampler=sampler, num_workers=args.num_workers, drop_last=True,
        pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0, worker_init_fn=ignore_sigint,
        generator=torch.Generator().manual_seed(args.seed))   # its own RNG: a new epoch must not draw from the
    while True:                                               # global one, or a resumed run would diverge
        sampler.set_epoch(data_state["epoch"])
        sampler.skip = data_state["pos"] * loader.batch_size
        try:
            for x, y in loader:
                data_state["pos"] += 1
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        except RuntimeError as err:                     # raised in a worker (its last line says what), or one died
            last = str(err).strip().splitlines()[-1]
            hint = " (out of host memory? try a lower --num-workers)" if "exited unexpectedly" in last else ""
            raise SystemExit(f"data loading failed: {last}{hint}. Once fixed, continue with --resume {args.out} "
                             "(from its last checkpoint).") from None
        data_state["epoch"], data_state["pos"] = data_state["epoch"] + 1, 0


def ignore_sigint(worker_id):
    """Loader workers leave Ctrl-C to the main process, which saves and stops the run (main)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def default_workers():
    """Loader processes per training process: this machine's cores over its torchrun processes, less one, <= 32.
    Watch img_per_s in log.jsonl to see whether more are needed."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(32, cores // int(os.environ.get("LOCAL_WORLD_SIZE", 1)) - 1))


# ---------------------------------------------------------------------------------------------------------------
# ---- 7. Training (paper Tab. 9, App. A; official main_jit.py / engine_jit.py) ----
# ---------------------------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of the weights, updated in place with one fused _foreach op per step.
    DIFF: the official code keeps two EMAs (0.9999 and 0.9996) from step 0 (the paper picks per model among
    0.9996/0.9998/0.9999, App. A); we keep one, with the warmup decay_k = min(decay, (1 + k) / (10 + k)) (the
    num_updates rule of TensorFlow's ExponentialMovingAverage). For the paper's 750k-step runs this is 0.9999
    after ~90k steps, while a fixed 0.9999 would still give the random init a weight of 0.9999^10000 = 37% after a
    user's 10k steps (EMA decay is a known reproduction pitfall: LTH14/JiT#42, #56).
    warmup=False: the fixed decay from the first update (to continue an EMA loaded from another run)."""

    def __init__(self, model, decay, warmup=True):
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.src, self.dst = list(model.parameters()), list(self.model.parameters())

    @torch.no_grad()
    def update(self, step):
        d = min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay
        torch._foreach_lerp_(self.dst, self.src, 1 - d)          # ema += (1 - d) * (param - ema)


def unwrap(model):
    """The plain nn.Module under torch.compile (._orig_mod) and DDP (.module): what we save and sample from."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model)


def lr_at(step, args):
    """lr = blr * batch / 256 (official main_jit.py), linear warmup over 5 epochs (per iteration), then constant
    (paper Tab. 9). Step k (1-based) gets peak * (k-1) / warmup_steps, as the official iteration k-1: the first
    step has lr 0 (official util/lr_sched.py)."""
    peak = args.lr or args.blr * args.batch_size / 256
    return peak * min(1.0, (step - 1) / max(1, args.warmup_steps))


def model_kwargs(args):
    """The create_model arguments of this run beyond (config, img_size, num_classes); saved in checkpoints, so
    sample.py rebuilds the same model."""
    return dict(patch_size=args.patch_size, pred=args.pred,
                noise_scale=args.noise_scale or default_noise_scale(args.img_size))


def build(args, num_classes, device):
    """The plain model, its EMA and the optimizer: what main() trains and bench.py times."""
    raw = create_model(args.config, args.img_size, num_classes, **model_kwargs(args)).to(device)
    ema = EMA(raw, args.ema)
    # Paper Tab. 9: Adam, betas (0.9, 0.95), weight decay 0 (official: AdamW with wd 0, the same thing).
    # fused=True: one kernel for all parameters on CUDA.
    opt = torch.optim.AdamW(raw.parameters(), lr=lr_at(1, args), betas=(0.9, 0.95), weight_decay=0.0,
                            fused=device.type == "cuda")
    return raw, ema, opt


def compile_and_wrap(raw, args, device, ddp=False):
    """What runs the training forward: DDP over GPUs, then torch.compile of the whole model, which fuses the norms,
    modulations, RoPE and activations around the matmuls; it traces as one graph (a test checks)."""
    model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None) if ddp else raw
    return torch.compile(model) if args.compile else model


def train_step(model, ema, opt, x, y, step, args):
    """One optimisation step, exactly what main() runs and bench.py times. x: uint8 (B, 3, H, W) on the device.
    Returns the loss terms as 0-dim tensors, {"loss": ...}, without reading them (no host sync)."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, args)
    x = x.float() / 127.5 - 1.0                                           # uint8 [0, 255] -> [-1, 1], on device
    if args.flip:                                                         # random horizontal flip (official code)
        x = torch.where(torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
    raw, terms = unwrap(model), {}
    opt.zero_grad(set_to_none=True)
    try:
        for xk, yk in micro_batches(model, x, y, args.grad_accum):       # one, unless --grad-accum K
            with torch.autocast(x.device.type, torch.bfloat16, enabled=args.precision == "bf16"):
                # bf16 autocast without a GradScaler (bf16 has fp32's range), as the official code.
                if (args.pred, args.loss) == ("x", "v"):                  # the paper's objective (Alg. 1)
                    loss = flow_loss(model, xk, yk, raw.num_classes, raw.noise_scale)
                else:                                                     # the ablation of Tab. 2 (appendix)
                    loss = ablation_loss(model, xk, yk, raw.num_classes, raw.pred, args.loss, raw.noise_scale)
            (loss / args.grad_accum).backward()                           # K equal means average to the batch's
            terms["loss"] = terms.get("loss", 0) + loss.detach() / args.grad_accum
    except torch.OutOfMemoryError:
        k = args.grad_accum * 2
        raise SystemExit(f"out of GPU memory at {x.shape[0]} images per forward per GPU ({args.config}, "
                         f"{args.img_size}px): add --grad-accum {k} (the same batch in {k} pieces), lower "
                         "--batch-size, use more GPUs, or keep --precision bf16.") from None
    except NotImplementedError as err:                                    # an op the MPS backend lacks
        raise SystemExit(f"{x.device.type}: {str(err).splitlines()[0][:150]}; use --device cpu, or set "
                         "PYTORCH_ENABLE_MPS_FALLBACK=1 to run such ops on the CPU.") from None
    opt.step()
    ema.update(step)
    return terms


def micro_batches(model, x, y, k):
    """--grad-accum K (nanoGPT's gradient_accumulation_steps): the K micro-batches of (x, y), B/K images each. DDP
    averages the gradients over the GPUs once per step, on the last one (no_sync around the others)."""
    for i, (xk, yk) in enumerate(zip(x.chunk(k), y.chunk(k))):
        with model.no_sync() if i < k - 1 and hasattr(model, "no_sync") else contextlib.nullcontext():
            yield xk, yk


class LossLog:
    """The run's record: loss terms summed on the device and read every --log-every steps, the loop's one host sync
    besides checkpoints and grids (an .item() per step would stall the GPU queue). Each reading is a line of
    RUN/log.jsonl; a non-finite one stops the run before anything is saved. first, start: where and when this
    process started training."""

    def __init__(self, run, args, world, rank, step):
        self.path, self.args, self.world, self.rank = run / "log.jsonl", args, world, rank
        self.sums, self.n, self.t0, self.last, self.first, self.start = {}, 0, time.time(), {}, step, time.time()

    def add(self, terms):                                   # terms: train_step's dict of 0-dim tensors
        self.sums = {k: self.sums.get(k, 0) + v for k, v in terms.items()}
        self.n += 1

    def write(self, step, bar):
        sums = torch.stack(list(self.sums.values()))        # (terms,)
        if self.world > 1:
            dist.all_reduce(sums)
            sums /= self.world
        means = dict(zip(self.sums, (sums / self.n).tolist()))
        if not all(map(math.isfinite, means.values())):
            raise SystemExit(f"loss is {means['loss']} at step {step}: training diverged. {self.path.parent}/ckpt.pt "
                             "holds the last good checkpoint; resume from it with a lower --lr (or --precision fp32).")
        rate, self.last = self.n * self.args.batch_size / (time.time() - self.t0), means
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(dict(step=step, **means, lr=lr_at(step, self.args), img_per_s=rate)) + "\n")
            bar.set_postfix({k: f"{v:.4f}" for k, v in means.items()} | dict(img_s=f"{rate:.0f}"))
        self.sums, self.n, self.t0 = {}, 0, time.time()


def save_grid(images, path, nrow):
    """(n, 3, H, W) in [-1, 1] -> one PNG grid with a 2-pixel gap. uint8 = clip((x+1)*127.5+0.5)."""
    imgs = ((images.float().cpu() + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    n, H, W, _ = imgs.shape
    grid = np.full((math.ceil(n / nrow) * (H + 2) + 2, nrow * (W + 2) + 2, 3), 255, np.uint8)
    for i, img in enumerate(imgs):
        r, c = divmod(i, nrow)
        grid[2 + r * (H + 2): 2 + r * (H + 2) + H, 2 + c * (W + 2): 2 + c * (W + 2) + W] = img
    Image.fromarray(grid).save(path)


def plot_loss(log, path, size=(720, 360)):
    """RUN/loss.png from RUN/log.jsonl, drawn with Pillow: each loss term against the step, log scale, every reading
    thin and a running mean of log-loss thick. A term that is 0 throughout (REPA off) is left out."""
    rows = [json.loads(r) for r in log.read_text().splitlines() if r.endswith("}")] if log.exists() else []
    curves = {k: [(r["step"], math.log10(r[k])) for r in rows if r.get(k, 0) > 0]
              for k in (rows[0] if rows else {}) if k not in ("step", "lr", "img_per_s")}
    curves = {k: c for k, c in curves.items() if c}
    W, H, left, right, top, bottom = *size, 56, 80, 24, 36
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 6), f"{log.parent.name}: loss per reading (log scale) vs step", fill="black")
    if curves:
        xs, ys = [s for c in curves.values() for s, _ in c], [v for c in curves.values() for _, v in c]
        x0, x1 = min(xs), max(max(xs), min(xs) + 1)
        y0, y1 = math.floor(min(ys)), max(math.ceil(max(ys)), math.floor(min(ys)) + 1)   # whole decades
        X = lambda s: left + (s - x0) / (x1 - x0) * (W - left - right)          # noqa: E731
        Y = lambda v: H - bottom - (v - y0) / (y1 - y0) * (H - top - bottom)    # noqa: E731
        for e in range(y0, y1 + 1):
            draw.line([(left, Y(e)), (W - right, Y(e))], fill=(225, 225, 225))
            draw.text((4, Y(e) - 6), f"1e{e}", fill="black")
        for s in (x0, (x0 + x1) // 2, x1):
            draw.text((X(s) - 12, H - bottom + 6), str(s), fill="black")
        draw.rectangle([left, top, W - right, H - bottom], outline="black")
        colors = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189)]
        for i, (k, c) in enumerate(curves.items()):
            color, smooth, m = colors[i % len(colors)], [], c[0][1]
            for s, v in c:
                m = 0.7 * m + 0.3 * v
                smooth.append((X(s), Y(m)))
            draw.line([(X(s), Y(v)) for s, v in c], fill=tuple((3 * ch + 2 * 255) // 5 for ch in color), width=1)
            draw.line(smooth, fill=color, width=3)
            draw.text((W - right + 8, top + 16 * i), k, fill=color)
    img.save(path)


def draw_grid(model, y, noise, step, args, run, bar):
    """RUN/grid_STEP.png: the EMA model's samples (sampler_defaults; --sample-steps, --cfg override it) of fixed noise
    and labels (image i is class i mod K: with the 8 shapes classes, column c is class c), so successive grids
    compare, and RUN/loss.png redrawn."""
    t0, path = time.time(), run / f"grid_{step:07d}.png"
    bar.write(f"step {step}: sampling a grid of {len(y)} images with the EMA weights ...")
    save_grid(sample(model, y, steps=args.sample_steps, cfg=args.cfg, noise=noise), path, nrow=8)
    plot_loss(run / "log.jsonl", run / "loss.png")
    bar.write(f"step {step}: {path} and {run / 'loss.png'} ({time.time() - t0:.0f} s)")


def finish(run, log, step, stopping):
    """The end of a run: the run folder is freed; a stopped run says how to continue, a finished one what it did,
    where its files are and the command that samples it."""
    if log.rank == 0:
        (run / "lock").unlink(missing_ok=True)
    if stopping:
        raise SystemExit(f"stopped at step {step}, saved {run}/ckpt.pt; continue with --resume {run}")
    if log.rank == 0:
        n, seconds, grids = step - log.first, time.time() - log.start, sorted(run.glob("grid_*.png"))
        took = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
        print(f"done: {n} steps (to step {step}) in {took}, {n * log.args.batch_size / seconds:.0f} img/s, final "
              f"loss {log.last.get('loss', float('nan')):.4f}\n  checkpoint  {run / 'ckpt.pt'}\n"
              f"  last grid   {grids[-1] if grids else '(none)'}\n  loss curve  {run / 'loss.png'}\n"
              f"  sample it   python sample.py {run} --grid {run / 'samples.png'}")
    if log.world > 1:
        dist.destroy_process_group()
    return run


# ---- Checkpoints: one layout in all four scripts; atomic; everything an exact resume needs ----
def rng_state():
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state() if torch.cuda.is_available() else None)


def save_checkpoint(path, args, raw, ema, opt, step, data_state, num_classes, world, rank, keep=False):
    """RUN/ckpt.pt with everything an exact resume needs, every rank's RNG state included. Written to a temp file,
    then os.replace: a kill mid-write never corrupts it. Non-finite weights are never saved: the run stops and the
    last good file stays. keep (--keep-every): also ckpt_STEP.pt, weights and EMA only, for sample.py and
    --init-from (LTH14/JiT#42: the best EMA and CFG differ between 200 and 600 epochs)."""
    tensors = list(raw.state_dict().values()) + list(ema.model.state_dict().values())
    if not torch.stack([torch.isfinite(v).all() for v in tensors if v.is_floating_point()]).all():   # one sync
        raise SystemExit(f"the weights are not finite at step {step}: not saved. {path} holds the last good "
                         "checkpoint; resume from it with a lower --lr (or --precision fp32).")
    rngs = [rng_state()] * world
    if world > 1:
        dist.all_gather_object(rngs, rng_state())
    if rank == 0:
        ckpt = dict(script=SCRIPT, config=args.config, img_size=args.img_size, num_classes=num_classes,
                    model_kwargs=model_kwargs(args), model=raw.state_dict(), ema=ema.model.state_dict(),
                    opt=opt.state_dict(), step=step, args=vars(args), rng=rngs, data=dict(data_state))
        snapshot = {k: v for k, v in ckpt.items() if k not in ("opt", "rng", "data")}
        for dest, content in [(path, ckpt)] + [(path.with_name(f"ckpt_{step:07d}.pt"), snapshot)] * keep:
            tmp = Path(str(dest) + ".tmp")
            try:
                torch.save(content, tmp)
            except (OSError, RuntimeError) as err:      # disk full or quota (torch's writer raises RuntimeError)
                tmp.unlink(missing_ok=True)
                raise SystemExit(f"could not write {dest} ({str(err).splitlines()[0][:100]}): is the disk full? "
                                 "Free space or use another --out; the previous checkpoint is intact.") from None
            os.replace(tmp, dest)


def find_checkpoint(path, flag="--resume"):
    """A run folder (its ckpt.pt) or a checkpoint file (LTH14/JiT#66: a file was silently ignored there)."""
    path = Path(path) / "ckpt.pt" if Path(path).is_dir() else Path(path)
    if not path.is_file():
        raise SystemExit(f"{flag}: no checkpoint at {path}. Pass a run folder containing ckpt.pt or a .pt file.")
    return path


def load_checkpoint(path):
    """The resumable checkpoint of a run folder or file, refusing another script's, a snapshot or a corrupt file.
    mmap: a tensor is read only when used (resolve_args reads just the settings)."""
    path = find_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as err:                            # empty, truncated, random bytes: the zip reader or unpickler
        raise SystemExit(f"{path} is not a readable checkpoint (truncated or corrupt? {type(err).__name__}); resume "
                         "from another copy, or start a new run with another --out.") from None
    made_by = ckpt.get("script", "unknown") if isinstance(ckpt, dict) else "unknown"
    if made_by != SCRIPT:
        raise SystemExit(f"--resume: {path} is a checkpoint of {made_by}.py, not of {SCRIPT}.py; "
                         f"resume it with {made_by}.py or start a new run with another --out.")
    if "opt" not in ckpt:                               # a --keep-every snapshot: no optimizer, RNG or data position
        raise SystemExit(f"--resume: {path} is a snapshot (weights only); resume from {path.parent}/ckpt.pt, or "
                         f"start a new run from it with --init-from {path}.")
    return ckpt


def restore(args, raw, ema, opt, num_classes, rank):
    """(step, data position). A new run: 0, with --init-from's weights if given. --resume: every piece of state
    comes back (weights, EMA, Adam moments, step, this rank's RNG, the position in the epoch), so the run continues
    exactly as if never stopped (a test checks it); log lines written after that checkpoint are dropped."""
    if args.resume is None:
        if args.init_from:
            init_from(args, raw, ema, opt, num_classes)
            ema.warmup = False                          # continue the loaded EMA at its decay
        return 0, {"epoch": 0, "pos": 0}
    ckpt = load_checkpoint(args.resume)
    if ckpt["num_classes"] != num_classes:
        raise SystemExit(f"--resume: the checkpoint has {ckpt['num_classes']} classes, this data {num_classes}; "
                         "resume with the data it was trained on.")
    raw.load_state_dict(ckpt["model"])
    ema.model.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["opt"])
    ema.warmup = not args.init_from
    rng = ckpt["rng"][rank] if rank < len(ckpt["rng"]) else ckpt["rng"][0]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    log = Path(args.out) / "log.jsonl"
    if rank == 0 and log.exists():                      # keep what was logged up to the checkpoint (a line cut off
        rows = [r for r in log.read_text().splitlines() if r.endswith("}") and json.loads(r)["step"] <= ckpt["step"]]
        log.write_text("".join(r + "\n" for r in rows))    # by a kill lacks its "}")
    return ckpt["step"], dict(ckpt["data"])


def init_from(args, raw, ema, opt, num_classes):
    """--init-from FILE: a NEW run (step 0, data from the start) from another jit.py run (its ckpt.pt: weights, EMA
    and Adam moments; a ckpt_STEP.pt snapshot: weights and EMA) or from the authors' checkpoint (from_official:
    its EMA weights start both). At another class count the label table keeps its fresh init, with a warning
    (fine-tuning on your own classes); everything else must fit this config (load_weights)."""
    path = find_checkpoint(args.init_from, "--init-from")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)     # official files hold an argparse args
    except Exception as err:                            # empty, truncated, random bytes
        raise SystemExit(f"--init-from: {path} is not a readable checkpoint (truncated or corrupt? "
                         f"{type(err).__name__}).") from None
    if isinstance(obj, dict) and obj.get("script") == SCRIPT:
        weights, averaged, adam = obj["model"], obj["ema"], obj.get("opt")
    else:                                               # the authors' layout (another script's: a one-line error)
        weights = averaged = from_official(obj)
        adam = None
    fresh = raw.state_dict()[LABEL_TABLE]
    if weights.get(LABEL_TABLE, fresh).shape != fresh.shape:
        warnings.warn(f"--init-from: {path} has {weights[LABEL_TABLE].shape[0] - 1} classes, this data "
                      f"{num_classes}: the label table starts from scratch, the rest from the file.")
        weights, averaged, adam = {**weights, LABEL_TABLE: fresh}, {**averaged, LABEL_TABLE: fresh}, None
    load_weights(raw, weights, path, args.config)
    load_weights(ema.model, averaged, path, args.config)
    if adam is not None:                                # Adam's moments fit only the very same parameters
        opt.load_state_dict(adam)


def load_weights(model, state, source, config):
    """model.load_state_dict(state), strict, but a misfit is one line naming the first missing, unexpected or
    mis-shaped key and the config."""
    have = model.state_dict()
    for what, keys in [("missing", [k for k in have if k not in state]), ("unexpected", [k for k in state if k not in
                       have]), ("mis-shaped", [k for k in have if k in state and state[k].shape != have[k].shape])]:
        if keys:
            shapes = f" {tuple(state[keys[0]].shape)}, {config} has {tuple(have[keys[0]].shape)}" \
                if what == "mis-shaped" else ""
            raise SystemExit(f"{source} does not fit {config} ({len(keys)} {what} keys, first {keys[0]!r}{shapes}): "
                             "pass the config, image size and class count it was made with.")
    model.load_state_dict(state)


def lock_run(run, resume):
    """Make the run folder and own it: a folder with another run's ckpt.pt needs --resume, and RUN/lock holds the
    host and PID of its run: a second run into the folder stops with a message. A lock whose process is gone (on
    this host) is taken over; finish() removes it."""
    if (run / "ckpt.pt").exists() and Path(resume or run).resolve() != (run / "ckpt.pt").resolve():
        raise SystemExit(f"{run}/ckpt.pt exists: pass --resume to continue that run, or choose another --out.")
    run.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(run / "lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            host, _, pid = (run / "lock").read_text().partition(":")
            if host == socket.gethostname() and pid.isdigit() and (int(pid) == os.getpid() or not alive(int(pid))):
                (run / "lock").unlink(missing_ok=True)  # a stale lock, or our own from an earlier main() call
                continue
            raise SystemExit(f"{run} is in use by process {pid or '?'} on {host or '?'}: wait for it to finish or "
                             f"use another --out (if that run is gone, delete {run / 'lock'}).")
    os.write(fd, f"{socket.gethostname()}:{os.getpid()}".encode())
    os.close(fd)


def alive(pid):
    try:
        os.kill(pid, 0)                                 # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:                             # it exists, as another user's
        pass
    return True


def setup_distributed(args):
    """(rank, world_size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: one process per GPU (DDP; gloo on
    CPUs). Plain `python jit.py`: one process on --device."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    have = ["cpu"] + ["cuda"] * torch.cuda.is_available() + ["mps"] * torch.backends.mps.is_available()
    try:
        device = torch.device(name)
    except RuntimeError:                                # not a device name torch knows
        device = None
    if device is None or device.type not in have or device.type == "cuda" and (device.index or 0) >= \
            torch.cuda.device_count():
        raise SystemExit(f"--device {name}: not available here; this machine has {', '.join(have)}"
                         f"{f' ({torch.cuda.device_count()} GPUs)' if 'cuda' in have else ''}.")
    if device.type == "cuda":   # torchrun: this process's GPU; "cuda" -> "cuda:0" (set_device needs an index)
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) if "RANK" in os.environ else device.index or 0)
        torch.cuda.set_device(device)
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return rank, world, device


class StopSignals:
    """Inside `with`: Ctrl-C (SIGINT) and SIGTERM (as schedulers send) are recorded instead of ending the process
    mid-step; main() then saves and stops. The caller's handlers come back at the end."""

    def __enter__(self):
        self.seen = []
        self.before = {s: signal.signal(s, lambda signum, frame: self.seen.append(signum))
                       for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.before.items():
            signal.signal(s, handler)

    def requested(self, step, args, world, device):
        """Stop after this step? Under torchrun the ranks agree at log steps (one all_reduce): all stop together."""
        if world == 1:
            return bool(self.seen)
        if step % args.log_every:
            return False
        flag = torch.tensor(float(bool(self.seen)), device=device)
        dist.all_reduce(flag)
        return flag.item() > 0


# ---------------------------------------------------------------------------------------------------------------
# ---- 8. Command line and main ----
# ---------------------------------------------------------------------------------------------------------------
# What `--data NAME` means: the training defaults we use for it (any flag overrides them). blr = base lr per 256
# images (lr = blr * batch / 256: the official code's rule; the paper's Tab. 9 gives its result, lr 2e-4 at batch
# 1024). A folder that is not one of these names gets FOLDER_DEFAULTS.
# DIFF: for the built-in shapes demo we use blr 4e-4 (lr 2e-4 at batch 128, the paper's ImageNet lr at batch 1024)
# so a 10k-step run moves visibly (LAPTOP_PRESET: lr 2e-3 for its 600 steps); ffhq128 and imagenet keep the
# paper's blr 5e-5.
DATA_PRESETS = {
    "shapes": dict(img_size=64, config="JiT-S", patch_size=8, batch_size=128, steps=10_000, blr=4e-4,
                   sample_every=1000, ckpt_every=1000),
    "ffhq128": dict(img_size=128, config="JiT-B/16", batch_size=128, steps=200_000, blr=5e-5,
                    sample_every=5000, ckpt_every=5000, unconditional=True),  # its 1000-image folders aren't classes
    "imagenet": dict(img_size=256, config="JiT-B/16", batch_size=1024, steps=750_000, blr=5e-5,
                     sample_every=10_000, ckpt_every=10_000),  # 600 epochs at batch 1024 = 750k steps
}
# `--data shapes` with no GPU (and no --config / --img-size): JiT-T at 32px, 600 steps of 64 images, 4.1 min on our
# 2-core CPU, to a grid whose columns follow their classes (README "No GPU?"). Its grids use Heun-25 (half the paper's
# 50 steps). No loader worker: the shapes are drawn in the training process, and torch keeps both cores.
LAPTOP_PRESET = dict(img_size=32, config="JiT-T", batch_size=64, steps=600, lr=2e-3, warmup_epochs=0.2,
                     sample_every=300, sample_steps=25, ckpt_every=300, log_every=25, num_workers=0)
FOLDER_DEFAULTS = dict(img_size=256, config="JiT-B/16", batch_size=128, steps=200_000, blr=5e-5,
                       sample_every=5000, ckpt_every=5000)
LABEL_TABLE = "y_embedder.weight"  # the class embedding, num_classes + 1 rows (--init-from)
MACHINE = ("out", "resume", "device", "compile", "precision", "num_workers")  # never taken from a checkpoint
SAME_RUN = ("config", "img_size", "patch_size", "pred", "loss", "noise_scale")  # a resumed run cannot change these


def get_args(argv=None):
    """The run's settings. Each value comes from the command line, else the resumed checkpoint, else the --data
    preset (DATA_PRESETS), else the defaults below: `--resume RUN` alone continues RUN exactly as it was."""
    p = argparse.ArgumentParser(description="Train JiT (Li & He, arXiv 2511.13720).", formatter_class=Help)
    g = p.add_argument_group("data and model")
    g.add_argument("--data", default="shapes", help="'shapes' (built in), a folder of images, or NAME for data/NAME")
    g.add_argument("--img-size", type=int, default=64, help="image side in pixels")
    g.add_argument("--config", default="JiT-S", help=f"model config (paper Tab. 9): {', '.join(CONFIGS)}")
    g.add_argument("--patch-size", type=int, help="override the config's patch size (ablation §4.2)")
    g.add_argument("--unconditional", action=argparse.BooleanOptionalAction, default=False,
                   help="ignore class subfolders, train one class (FFHQ's folders are not classes)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="random horizontal flip")
    g = p.add_argument_group("objective (paper Alg. 1; the ablation of Tab. 2)")
    g.add_argument("--pred", choices=["x", "eps", "v"], default="x", help="what the network outputs")
    g.add_argument("--loss", choices=["x", "eps", "v"], default="v", help="the space the MSE is taken in")
    g.add_argument("--noise-scale", type=float, help="std of the noise e (default: img_size / 256, at least 1)")
    g = p.add_argument_group("optimisation (paper Tab. 9)")
    g.add_argument("--lr", type=float, help="learning rate (default: blr * batch / 256)")
    g.add_argument("--blr", type=float, default=4e-4, help="base learning rate per 256 images (paper: 5e-5)")
    g.add_argument("--warmup-epochs", type=float, default=5.0, help="linear lr warmup, in epochs")
    g.add_argument("--ema", type=float, default=0.9999, help="EMA decay, reached after a warmup")
    g = p.add_argument_group("sample grids")
    g.add_argument("--cfg", type=float,
                   help="CFG scale of the grids, none on one-class data (default: the paper's for the config)")
    g.add_argument("--sample-steps", type=int, help="sampler steps of the grids (default: the paper's, 50 Heun)")
    g.add_argument("--toy", action="store_true", help="run the paper's toy experiment (§3.3, Fig. 2) and exit")
    args = resolve_args(add_run_flags(p), argv)
    args.warmup_steps = 0                               # main() sets it from the dataset size
    return args


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help prints every default. A default of None means "derived": the flag's help says from what, in a closing
    "(default: RULE)", which a value set by a preset or a resumed checkpoint replaces."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        rule = action.help.find(" (default:")
        return super()._get_help_string(action) if rule < 0 else action.help[:rule] + " (default: %(default)s)"


def add_run_flags(p):
    """The flags every script has, in the same words: the batch and the length of the run, its folder and files,
    and the machine."""
    g = p.add_argument_group("run")
    g.add_argument("--batch-size", type=int, default=128, help="GLOBAL batch size, split over the GPUs")
    g.add_argument("--steps", type=int, default=10_000, help="total optimisation steps")
    g.add_argument("--grad-accum", type=int, default=1, help="split each step's batch into K micro-batches: the "
                   "same update in 1/K of the memory (DDP syncs once per step)")
    g.add_argument("--init-from", help=f"start a NEW run from another {SCRIPT}.py run's weights (RUN, ckpt.pt, a "
                   "ckpt_STEP.pt snapshot) or from the authors' checkpoint (README)")
    g.add_argument("--out", help=f"run folder (default: runs/{SCRIPT}-DATA; with --resume, the resumed run's)")
    g.add_argument("--resume", nargs="?", const="", help="continue a run: its folder or ckpt file (alone: --out)")
    g.add_argument("--ckpt-every", type=int, default=1000, help="steps between checkpoints")
    g.add_argument("--keep-every", type=int, default=0, help="also keep a weights-only snapshot ckpt_STEP.pt every N "
                   "steps, for sample.py (0: none)")
    g.add_argument("--sample-every", type=int, default=1000, help="steps between EMA sample grids")
    g.add_argument("--log-every", type=int, default=50, help="steps between loss readings (host syncs)")
    g = p.add_argument_group("system")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile (default: on CUDA)")
    g.add_argument("--precision", choices=["bf16", "fp32"], help="autocast dtype (default: bf16 on CUDA)")
    g.add_argument("--num-workers", type=int, default=default_workers(), help="data loader processes per GPU")
    g.add_argument("--seed", type=int, default=0, help="global seed")
    g.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda if available; torchrun: local rank)")
    return p


def resolve_args(p, argv):
    """Parse argv with p's defaults overridden, in this order, by the --data preset (or, with no GPU, the laptop
    one), then the resumed checkpoint's settings (flags still win). Then the derived values and the checks."""
    argv = sys.argv[1:] if argv is None else list(argv)
    known = lambda: p.parse_known_args([a for a in argv if a not in ("-h", "--help")])[0]  # noqa: E731
    p.set_defaults(config=None, img_size=None)                   # None: not given (every preset sets both)
    first, saved, done = known(), {}, 0
    if first.resume is not None:
        first.resume = str(find_checkpoint(first.resume or first.out or f"runs/{SCRIPT}-{Path(first.data).name}"))
        ckpt = load_checkpoint(first.resume)
        saved, done = {k: v for k, v in ckpt["args"].items() if k in vars(first) and k not in MACHINE}, ckpt["step"]
        p.set_defaults(**saved)                                  # so that the preset is the run's --data's
    cuda = (first.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    laptop = not cuda and first.resume is None and first.data == "shapes" and first.config is None and \
        first.img_size is None                                   # no GPU: a result in minutes (README "No GPU?")
    p.set_defaults(**{**(LAPTOP_PRESET if laptop else DATA_PRESETS.get(Path(known().data).name, FOLDER_DEFAULTS)),
                      **saved})
    args = p.parse_args(argv)                                    # --help prints here, with these defaults
    args.laptop, args.resume = laptop, first.resume
    if args.config not in CONFIGS:
        raise SystemExit(f"unknown --config {args.config!r}; choose one of: {', '.join(CONFIGS)}")
    for key in SAME_RUN:
        if key in saved and getattr(args, key) != saved[key]:
            raise SystemExit(f"--resume: the checkpoint has {key}={saved[key]!r} but this run asks for "
                             f"{getattr(args, key)!r}; drop that flag to continue the run, or use another --out.")
    if args.steps < done:
        raise SystemExit(f"--steps {args.steps}: {args.resume} is already at step {done}; pass a larger --steps.")
    args.out = args.out or (str(Path(args.resume).parent) if args.resume else f"runs/{SCRIPT}-{Path(args.data).name}")
    args.compile = cuda if args.compile is None else args.compile       # compile and bf16 by default on GPUs
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    check_numbers(args)
    return args


def check_numbers(args):
    """Values that cannot work stop the run at start, with the flag, its value and the rule (presets and a resumed
    run's settings included). Also: a run folder that holds another run, and a missing --init-from file."""
    for key in ("img_size", "batch_size", "steps", "ckpt_every", "sample_every", "log_every", "grad_accum"):
        if getattr(args, key) <= 0:
            raise SystemExit(f"--{key.replace('_', '-')} {getattr(args, key)}: must be a positive whole number.")
    for key in ("lr", "blr"):
        if getattr(args, key, None) is not None and not getattr(args, key) > 0:        # NaN fails this too
            raise SystemExit(f"--{key} {getattr(args, key)}: the learning rate must be a positive number.")
    if not 0 <= args.ema < 1:
        raise SystemExit(f"--ema {args.ema}: the EMA decay must be in [0, 1).")
    for key in ("keep_every", "num_workers"):
        if getattr(args, key) < 0:
            raise SystemExit(f"--{key.replace('_', '-')} {getattr(args, key)}: must be 0 (none) or more.")
    if args.batch_size % (int(os.environ.get("WORLD_SIZE", 1)) * args.grad_accum):
        raise SystemExit(f"--batch-size {args.batch_size} is not divisible by {os.environ.get('WORLD_SIZE', 1)} "
                         f"processes x --grad-accum {args.grad_accum}; use a multiple.")
    if args.init_from and args.resume is None:          # a missing file stops the run before its folder is made
        find_checkpoint(args.init_from, "--init-from")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise SystemExit(f"--out {args.out}: that is a file; give a folder for the run.")




def main(argv=None):
    """Train (with --toy: the paper's toy experiment, appendix B, instead)."""
    args = get_args(argv)
    if args.toy:                                        # paper Fig. 2 on the CPU (appendix B)
        return toy_experiment(out=Path(args.out) / "toy")

    # Setup processes and devices: one process per GPU under torchrun, else one process on --device.
    rank, world, device = setup_distributed(args)
    if rank == 0 and args.laptop:
        print(f"no GPU: the laptop preset ({args.config}, {args.img_size}px, {args.steps} steps); --config "
              f"{DATA_PRESETS['shapes']['config']} --img-size {DATA_PRESETS['shapes']['img_size']} gives the GPU one.")
    torch.manual_seed(args.seed + rank)                 # ranks draw different t, noise and label drops
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # for what still runs in fp32

    # Setup data: the class count comes from it (1 for FFHQ or a flat folder, 1000 for ImageNet).
    dataset = make_dataset(args)
    num_classes = len(dataset.classes)
    if len(dataset) < args.batch_size:
        raise SystemExit(f"{len(dataset)} images is fewer than one batch ({args.batch_size}); lower --batch-size.")
    args.warmup_steps = int(args.warmup_epochs * len(dataset) // args.batch_size)   # paper Tab. 9: 5 epochs
    run = Path(args.out)
    if rank == 0:                                       # from here on, this process owns the run folder
        lock_run(run, args.resume)

    # Setup model, EMA, optimizer, and on --resume (or --init-from) their state.
    raw, ema, opt = build(args, num_classes, device)
    step, data_state = restore(args, raw, ema, opt, num_classes, rank)
    model = compile_and_wrap(raw, args, device, ddp=world > 1)
    batches = make_batches(dataset, args, rank, world, device, data_state)
    if rank == 0:
        (run / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))
        print(f"{args.config} ({sum(p.numel() for p in raw.parameters()) / 1e6:.1f}M params, patch {raw.patch}, "
              f"pred {args.pred}, loss {args.loss}) on {len(dataset)} images, {num_classes} classes, {world} x "
              f"{device.type}, batch {args.batch_size}, {args.precision}, compile={args.compile} -> {run}")
    gen = torch.Generator().manual_seed(1234)           # fixed grid noise and labels: successive grids compare
    grid_noise, grid_y = torch.randn(64, 3, args.img_size, args.img_size, generator=gen), torch.arange(64) % num_classes

    # Training loop.
    log, stopping = LossLog(run, args, world, rank, step), False
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, desc=f"{SCRIPT} {args.config}", dynamic_ncols=True)
    with StopSignals() as stop:                         # Ctrl-C, SIGTERM: the step finishes, the run saves, stops
        while step < args.steps and not stopping:
            x, y = next(batches)                        # (B/world, 3, H, W) uint8, (B/world,) long, on the device
            step += 1
            log.add(train_step(model, ema, opt, x, y, step, args))
            bar.update(1)
            stopping = stop.requested(step, args, world, device)
            keep = args.keep_every > 0 and step % args.keep_every == 0
            save = keep or step % args.ckpt_every == 0 or step == args.steps or stopping
            if step % args.log_every == 0 or save or step - log.first in (1, 10):   # a first reading in seconds
                log.write(step, bar)                    # before any save: a NaN run stops, never checkpointed
            if rank == 0 and (step % args.sample_every == 0 or step == args.steps):   # EMA weights, paper's sampler
                draw_grid(ema.model, grid_y, grid_noise, step, args, run, bar)
            if save:
                save_checkpoint(run / "ckpt.pt", args, raw, ema, opt, step, data_state, num_classes, world, rank, keep)
    bar.close()
    return finish(run, log, step, stopping)


# ---------------------------------------------------------------------------------------------------------------
# ---- Appendix A. The prediction / loss ablation (paper §4.2, Tab. 1-2: `--pred`, `--loss`) ----
# ---------------------------------------------------------------------------------------------------------------
# From (z, t) and any ONE of x, e, v the other two follow (z = t*x + (1-t)*e, v = x - e):
#     from x:  v = (x - z) / (1-t)         e = (z - t*x) / (1-t)
#     from e:  v = (z - e) / t             x = (z - (1-t)*e) / t
#     from v:  x = z + (1-t)*v             e = z - t*v
# Where we divide by t (eps-prediction) we clamp t at T_EPS the same way as (1-t), so no conversion can produce inf
# or NaN at either end. The paper's cell (x-pred, v-loss) is flow_loss above; the other 8 of Tab. 2 train with
# ablation_loss, and the sampler turns any of the three outputs into v with to_v.


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


def ablation_loss(model, x, y, num_classes, pred, loss, noise_scale=1.0):
    """The 3x3 of Tab. 2: the net outputs `pred`, the MSE is taken in the space of `loss` (Tab. 1). The target is
    the same conversion applied to the ground truth of what the net predicts, so the clamps act as a loss weight
    and a perfect prediction has exactly zero loss. With (pred, loss) = ("x", "v") it equals flow_loss."""
    t = sample_t(x.shape[0], x.device)                                  # (B,): the same draws as flow_loss
    e = torch.randn_like(x) * noise_scale                               # (B, 3, H, W)
    z = _bcast(t, x) * x + (1 - _bcast(t, x)) * e                       # noisy image z_t
    y = torch.where(torch.rand_like(t) < LABEL_DROP, num_classes, y)    # label dropout -> null class
    out = model(z, t, y).float()                                        # the net's prediction of `pred`
    truth = {"x": x, "eps": e, "v": x - e}[pred]
    convert = {"x": to_x, "eps": to_eps, "v": to_v}[loss]
    return (convert(pred, out, z, t) - convert(pred, truth, z, t)).pow(2).mean()


# ---------------------------------------------------------------------------------------------------------------
# ---- Appendix B. Toy experiment (paper §3.3, Fig. 2) ----
# ---------------------------------------------------------------------------------------------------------------
# The paper's argument in one small experiment. d = 2 dimensional data x_hat (a curve in the plane) is "buried" in
# a D-dimensional space by a fixed random column-orthogonal matrix P (D, 2), P^T P = I:  x = P x_hat.  The model
# never sees P: for it this is a D-dimensional generation problem. A 5-layer ReLU MLP with 256 hidden units is
# trained with x-, eps- or v-prediction, ALL with the v-loss (paper §3.3: "all using the v-loss, i.e. Tab. 1(3)(a-c)"),
# then samples are drawn with the ODE sampler and projected back to the plane with P^T for viewing. As D grows past
# the MLP's width (D = 512 > 256: under-complete) eps- and v-prediction fail, because their targets (noise,
# velocity) fill all D dimensions, while x-prediction still works: its target lives on a 2-D plane.
#     python jit.py --toy                    # 4 dims x 3 predictions = 12 small MLPs: 55 s on one CPU thread (README)
# What the paper does not say (our choices, marked "choice:"): the curve, its scale, how t enters the MLP, the
# optimizer, steps and batch size, the number of samples, and the metric (the paper only shows scatter plots).
# Shapes in this section: N points, D ambient dimension, d = 2.
# The x / eps / v conversions are appendix A's to_x / to_eps / to_v (_bcast works for (B, D) points as for images).


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
    step: the budget that trains all 12 models in about a minute on one CPU thread (README). At this budget
    eps-prediction is still under-trained even at D=2 (0.19; 0.08 after 3000 steps): it learns slowest, its v = (z -
    e)/t multiplies errors by up to 1/t_eps = 20 at the noise end, where the sampler starts."""
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
    curve = spiral(torch.linspace(0, 1, 4000))                          # (M, 2) dense ground truth, for the metric
    threads = torch.get_num_threads()
    # One thread for these tiny matmuls, as the README's timing; the caller's thread count comes back at the end.
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


# ---------------------------------------------------------------------------------------------------------------
# ---- Appendix C. The authors' weights: from_official (LTH14/JiT, commit cbc743a) ----
# ---------------------------------------------------------------------------------------------------------------
# Follows LTH14/JiT at commit cbc743a2ada5e9762697da2c83f8c4f8379e8c17 ("include pretrained ckpts"; read in the
# fork zlong928/JiT, whose one later commit, by another author, changes no key). The network is model_jit.py's
# `JiT`; denoiser.py's `Denoiser` holds it as `self.net` and registers nothing else, so its state_dict is the
# net's under "net.". The RoPE tables (VisionRotaryEmbeddingFast) are plain attributes: not in any state_dict.
# util/misc.py save_model writes checkpoint-{epoch|last}.pth = {"model", "optimizer", "epoch", "args",
# "model_ema1", "model_ema2"}: each model* is a full Denoiser state_dict ("net." keys); "args" is main_jit.py's
# argparse.Namespace (model, img_size, class_num, noise_scale), so torch.load needs weights_only=False. The README's
# released models are read the same way (main_jit.py --resume DIR loads DIR/checkpoint-last.pth).
OFFICIAL_EMAS = {True: "model_ema1", "ema1": "model_ema1", "ema2": "model_ema2", False: "model"}


def from_official(obj, ema=True):
    """An official JiT checkpoint (what torch.load returns) -> a state dict for create_model(config, img_size,
    num_classes) with strict=True. Accepts a checkpoint-*.pth of main_jit.py, one of its model / model_ema1 /
    model_ema2 dicts (a Denoiser state_dict, "net." keys), or a JiT state_dict. In a checkpoint, ema picks the
    weights: True or "ema1" -> model_ema1 (decay 0.9999, main_jit.py --ema_decay1; what engine_jit.py evaluate()
    samples with, "hard-coded to be the first one"), "ema2" -> model_ema2 (decay 0.9996), False -> model (raw)."""
    if not isinstance(obj, dict):
        raise SystemExit(f"not an official JiT checkpoint (a {type(obj).__name__}, not a dict): pass a "
                         "checkpoint-*.pth of LTH14/JiT main_jit.py or a JiT state_dict")
    if "script" in obj:                                       # our own layout (save_checkpoint)
        raise SystemExit(f"this is a checkpoint of our {obj['script']}.py, not an official LTH14/JiT one: load it "
                         "as our checkpoint (sample.py RUN, --init-from / --resume)")
    if "state_dict" in obj:                                   # PyTorch Lightning: PixelDiT, PixNerd, DeCo
        raise SystemExit("a Lightning checkpoint ('state_dict'), not an official JiT one (LTH14/JiT saves 'model', "
                         "'model_ema1', 'model_ema2'): load it with its own paper's script")
    if ema not in OFFICIAL_EMAS:
        raise SystemExit(f"ema={ema!r}: choose True/'ema1' (model_ema1), 'ema2' (model_ema2) or False (model)")
    if "model" in obj or "model_ema1" in obj:                 # official util/misc.py save_model
        if OFFICIAL_EMAS[ema] not in obj:
            raise SystemExit(f"this official JiT checkpoint has no {OFFICIAL_EMAS[ema]!r} (it has: "
                             f"{', '.join(map(str, obj))}): pass another ema=")
        obj = obj[OFFICIAL_EMAS[ema]]                         # "optimizer", "epoch", "args" are dropped here
    sd = {k.removeprefix("net."): v for k, v in obj.items()}  # official denoiser.py: self.net = JiT(...)
    if not {"x_embedder.proj1.weight", "y_embedder.embedding_table.weight", "blocks.0.mlp.w12.weight"} <= set(sd):
        first = next(iter(sd), "nothing")
        raise SystemExit(f"not an official JiT checkpoint (first key {first!r}; no net.x_embedder.proj1 / "
                         "y_embedder.embedding_table): pass a checkpoint-*.pth of LTH14/JiT main_jit.py")
    out = {}
    for k, v in sd.items():
        if k == "y_embedder.embedding_table.weight":          # official LabelEmbedder.embedding_table: our
            out["y_embedder.weight"] = v                      # y_embedder is the nn.Embedding itself, (K + 1, D)
        elif k == "pos_embed":                                # official: a frozen nn.Parameter (1, N, D); ours is
            check_sincos(v)                                   # a buffer rebuilt from the config: check, drop
        else:                                                 # every other key and shape is the same as ours
            out[k] = v
    return out


def check_sincos(pos_embed):
    """The official frozen pos_embed must be the sin-cos table we rebuild (sincos_pos_embed), up to the rounding an
    EMA leaves: the official EMA also averages this frozen parameter (denoiser.py update_ema over parameters()),
    which moves it by at most ulp/2 / (1 - decay) = 3e-4 at |x| <= 1 with decay 0.9999 (1.6e-4 measured on a CPU)."""
    h = math.isqrt(pos_embed.shape[1]) if pos_embed.dim() == 3 else 0           # (1, N, D), N = h*h tokens
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1 or h * h != pos_embed.shape[1]:
        raise SystemExit(f"official pos_embed has shape {tuple(pos_embed.shape)}, not (1, h*h, D)")
    err = (pos_embed[0].float() - sincos_pos_embed(pos_embed.shape[2], h)).abs().max().item()
    if err > 1e-3:
        raise SystemExit(f"official pos_embed differs from the fixed sin-cos table ({h}x{h}, D={pos_embed.shape[2]}) "
                         f"by {err:.3g}: not a JiT checkpoint of LTH14/JiT")


# ---------------------------------------------------------------------------------------------------------------
# ---- Appendix D. Built-in data: `--data shapes` ----
# ---------------------------------------------------------------------------------------------------------------
class Shapes(torch.utils.data.Dataset):
    """Built-in labelled data, so `python jit.py` runs with no download: one bright shape (the class) of random
    colour, size and position on a dark background of random colour; upright, so that the class alone decides the
    outline. Image i is a pure function of i (its own seeded RNG), so every epoch, worker and GPU sees the same
    images. Drawn at 4x and downsampled."""
    classes = ["circle", "square", "triangle", "diamond", "cross", "ring", "star", "hexagon"]

    def __init__(self, size, n=20_000):
        self.size, self.n = size, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        rng = np.random.default_rng(i)
        label = int(rng.integers(len(self.classes)))
        S = 4 * self.size
        img = Image.new("RGB", (S, S), tuple(int(c) for c in rng.integers(0, 110, 3)))   # (S, S, 3) dark background
        draw = ImageDraw.Draw(img)
        r = rng.uniform(0.25, 0.40) * S                                         # shape radius
        cx, cy = rng.uniform(r, S - r, 2)                                       # centre, the shape inside the image
        color = tuple(int(c) for c in rng.integers(140, 256, 3))                # bright fill

        def polygon(k, radius=r, phase=-np.pi / 2, squash=1.0):                # regular k-gon, a vertex at the top
            return [(cx + squash * radius * np.cos(phase + 2 * np.pi * j / k),
                     cy + radius * np.sin(phase + 2 * np.pi * j / k)) for j in range(k)]

        name = self.classes[label]
        if name == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        elif name == "ring":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=color, width=int(r * 0.35))
        elif name == "square":                                                  # axis-aligned
            draw.polygon(polygon(4, r * 1.15, np.pi / 4), fill=color)
        elif name == "diamond":                                                 # a rhombus on its tip
            draw.polygon(polygon(4, squash=0.6), fill=color)
        elif name == "triangle":
            draw.polygon(polygon(3), fill=color)
        elif name == "hexagon":                                                 # flat top and bottom
            draw.polygon(polygon(6, phase=0.0), fill=color)
        elif name == "star":
            outer, inner = polygon(5), polygon(5, 0.42 * r, -np.pi / 2 + np.pi / 5)
            draw.polygon([p for pair in zip(outer, inner) for p in pair], fill=color)
        else:                                                                   # cross: an upright plus sign
            w = 0.22 * r
            draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=color)
            draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=color)
        img = img.resize((self.size, self.size), resample=Image.LANCZOS)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1), label   # (3, H, W) uint8


if __name__ == "__main__":
    main()
