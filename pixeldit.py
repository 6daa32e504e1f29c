"""
PixelDiT: "PixelDiT: Pixel Diffusion Transformers for Image Generation" (Yu et al., NVIDIA, arXiv 2511.20645)

A diffusion transformer on raw pixels, no autoencoder, in two levels (§3.1, Fig. 2: its "dual-level design"):
  1. a PATCH-level DiT on 16x16 patches models the global layout (one token per patch, as a latent DiT would);
  2. a shallow PIXEL-level transformer (PiT blocks, a 16-dim token for EVERY pixel) refines the texture.
The PiT block joins them: "pixel-wise AdaLN" expands each patch token into p*p distinct shift/scale/gate sets (one
per pixel), and "pixel token compaction" squeezes the p*p pixel tokens of a patch into ONE token for global attention
and back, so attention costs O(patches^2), not O(pixels^2). The network predicts v = x - e; training adds REPA.
Start reading at `PiTBlock`.

Time (all our scripts): z_t = t*x + (1-t)*e, t=0 noise, t=1 data; v = dz/dt = x - e.
Shapes: B batch, C=3, H=W image, p patch, h=w=H/p patch grid, L=h*w patches (patch tokens), P=p*p pixels per
        patch, D patch-level width, c=16 pixel-level width.

    python pixeldit.py                                   # built-in "shapes" data: PixelDiT-S/8 (no GPU: PixelDiT-T)
    python pixeldit.py --data ffhq128                    # FFHQ 128x128, PixelDiT-B/16 (README: download, defaults)
    python pixeldit.py --data ffhq128 --repa             # + REPA alignment to DINOv2 (downloads it via torch.hub)
    torchrun --nproc_per_node=8 pixeldit.py --data imagenet       # ImageNet-256, official pix256_xl.yaml: XL/16, REPA
    python sample.py runs/pixeldit-shapes --grid grid.png          # sample a checkpoint (sample.py)

Official code: NVlabs/PixelDiT (PyTorch Lightning), as in gcy-hub/PixelDiT commit d433a79 ("forked from PixelDiT");
model in pixdit_core/pixeldit_c2i.py and modules.py, objective and sampler in c2i/src/diffusion.py, training
settings in c2i/configs/pix256_xl.yaml (pix512_xl.yaml at 512px), evaluation settings in c2i/README.md. Our
parameter names follow pixdit_core/pixeldit_c2i.py, so a released checkpoint's "ema_denoiser." weights load into
create_model(...) after stripping that prefix.
Differences from the official code: grep "DIFF:".
Citations: "official FILE: key" is a file and key of that code; §, Eq., Tab. and Fig. are those of the paper's
arXiv v2 (v1 numbers its tables and figures differently), with a table's or figure's caption words where they help
find it.
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

SCRIPT = "pixeldit"  # written into every checkpoint; sample.py dispatches on it

# ---------------------------------------------------------------------------------------------------------------
# ---- 1. Configs (the paper's table of its B, L and XL models; official c2i/configs/pix256_xl.yaml: XL) ----
# ---------------------------------------------------------------------------------------------------------------
# depth: patch-level DiT blocks (N). pixel_depth: PiT blocks (M). width: patch-level D. heads: attention heads of
# both levels (the pixel level attends over compacted tokens of width D). pixel_dim: per-pixel token width c.
# patch: p. repa_layer: the patch block whose output REPA aligns to DINOv2 (official align_layer: 8, 1-indexed).
# Parameter counts are for 1000 classes at 256px and match that table's to < 0.5% (a test checks).
CONFIGS = {
    "PixelDiT-B/16": dict(depth=12, pixel_depth=2, width=768, heads=12, pixel_dim=16, patch=16, repa_layer=8),  # 184M
    "PixelDiT-L/16": dict(depth=22, pixel_depth=4, width=1024, heads=16, pixel_dim=16, patch=16, repa_layer=8),  # 569M
    "PixelDiT-XL/16": dict(depth=26, pixel_depth=4, width=1152, heads=16, pixel_dim=16, patch=16, repa_layer=8),  # 797M
    # Not in the paper: DiT-S widths with 8x8 patches, our default for the built-in 64px shapes data (8x8 = 64
    # patch tokens; a 16-pixel patch would leave only 4x4). 39.7M params with 8 classes at 64px.
    "PixelDiT-S/8": dict(depth=12, pixel_depth=2, width=384, heads=6, pixel_dim=16, patch=8, repa_layer=4),
    # Not in the paper: the laptop preset's model (LAPTOP_PRESET: 32px shapes in minutes on a CPU); 8x8 patches.
    "PixelDiT-T": dict(depth=6, pixel_depth=1, width=192, heads=4, pixel_dim=16, patch=8, repa_layer=2),
    # For the tests only: one forward+backward at 32px in milliseconds on a CPU.
    "tiny": dict(depth=2, pixel_depth=1, width=64, heads=2, pixel_dim=16, patch=8, repa_layer=1),
}

# ---------------------------------------------------------------------------------------------------------------
# ---- 2. The paper's new part: the PiT block (§3.2: pixel-wise AdaLN + pixel token compaction) ----
# ---------------------------------------------------------------------------------------------------------------
# The pixel level keeps one c-dim token per pixel, grouped by patch: x is (B, L, P, c), token [b, l, i*p + j] is
# pixel (i, j) of patch l. Its only view of the class and the global layout is s_cond (B, L, D), one vector per
# patch, computed by the patch-level DiT (PixelDiT.forward). A PiT block (the right half of Fig. 2, "Overview of
# PixelDiT: a dual-level, fully transformer-based diffusion architecture ...") does, per pixel:
#
#     shift1, scale1, gate1, shift2, scale2, gate2 = Linear(D -> 6*P*c)(s_cond)    # (B, L, P, c) each
#     x = x + gate1 * Expand(Attn(Compress(RMSNorm(x) * (1 + scale1) + shift1)))   # token compaction
#     x = x + gate2 * MLP(RMSNorm(x) * (1 + scale2) + shift2)                      # per-pixel MLP
#
# Pixel-wise AdaLN (§3.2, "pixel-wise AdaLN modulation"; design C of Fig. 3, which draws the designs A-C):
# DiT's AdaLN gives ALL tokens of an image one (shift, scale, gate); a patch-wise AdaLN would give all P pixels of a
# patch one set. Here each pixel gets its OWN c-vector of each, so the patch level can paint detail inside its patch
# (Tab. 5, "Ablations of PixelDiT-XL on ImageNet 256x256", at 80 epochs: patch-wise 3.50 -> pixel-wise 2.36 gFID).
# Pixel token compaction (§3.2): attention over all H*W pixel tokens costs O((H*W)^2) (65,536 tokens at 256px:
# in Tab. 5 the dual-level model without compaction is "OOM"). Compress flattens the P modulated pixel tokens of a
# patch (P*c = 4096 for p=16, c=16) and maps them by a Linear to ONE token of width D; attention then mixes the L
# patch tokens (256 at 256px) with the patch level's qk-norm and RoPE; Expand maps each result back to P*c, one
# c-vector per pixel.


class PiTBlock(nn.Module):
    """Pixel Transformer block (official PiTBlock). x: (B, L, P, c) pixel tokens; s_cond: (B, L, D) per patch.

    post_modulation=True is the variant of official PR #8, the maintainers' fix for the loss / grad-norm spikes
    reported with PixelDiT-B (NVlabs/PixelDiT#6): Linear(D -> 4*P*c) gives per-pixel (scale1, shift1, scale2,
    shift2) that modulate the OUTPUT of attention and MLP, whose inputs are plain RMSNorm(x); no gates.
    Default off: the released checkpoints use the pre-modulation above."""

    def __init__(self, pixel_dim, dim, heads, patch, post_modulation=False):
        super().__init__()
        P = patch * patch
        self.post_modulation = post_modulation
        self.norm1 = RMSNorm(pixel_dim)
        self.compress_to_attn = nn.Linear(P * pixel_dim, dim)       # (P*c) -> D: one token per patch
        self.attn = Attention(dim, heads)
        self.expand_from_attn = nn.Linear(dim, P * pixel_dim)       # D -> (P*c): back to one token per pixel
        self.norm2 = RMSNorm(pixel_dim)
        self.mlp = PixelMLP(pixel_dim)
        n_mod = 4 if post_modulation else 6
        # nn.Sequential around one Linear only for the official key "adaLN_modulation.0". Zero-init: with
        # pre-modulation the gates start at 0, so the block starts as the identity (post-modulation has no gates).
        self.adaLN_modulation = nn.Sequential(nn.Linear(dim, n_mod * P * pixel_dim))

    def forward(self, x, s_cond, cos, sin):                     # x: (B, L, P, c), s_cond: (B, L, D)
        B, L, P, c = x.shape
        # Pixel-wise AdaLN: the per-patch vector becomes P per-pixel parameter sets. The layout is the official
        # one (pixel-major: output unit i*6c + k*c + j is pixel i, parameter k, channel j), so weights interchange.
        mod = self.adaLN_modulation(s_cond).view(B, L, P, -1)   # (B, L, P*6c) -> (B, L, P, 6c) (4c: post-mod.)
        if self.post_modulation:
            scale1, shift1, scale2, shift2 = mod.chunk(4, dim=-1)                    # (B, L, P, c) each
            h = self.norm1(x)                                                        # (B, L, P, c)
        else:
            shift1, scale1, gate1, shift2, scale2, gate2 = mod.chunk(6, dim=-1)      # (B, L, P, c) each
            h = self.norm1(x) * (1 + scale1) + shift1           # pixel-wise AdaLN: a shift/scale PER PIXEL
        # Token compaction: all pixels of a patch -> one D-dim token -> global attention -> back to pixels.
        h = self.compress_to_attn(h.reshape(B, L, P * c))       # (B, L, P*c) -> (B, L, D)
        h = self.attn(h, cos, sin)                               # (B, L, D): attention over the L patches only
        h = self.expand_from_attn(h).view(B, L, P, c)            # (B, L, P*c) -> (B, L, P, c)
        if self.post_modulation:                                 # PR #8: modulate the branch outputs, no gates
            x = x + (h * (1 + scale1) + shift1)
            x = x + (self.mlp(self.norm2(x)) * (1 + scale2) + shift2)
        else:
            x = x + gate1 * h                                    # (B, L, P, c): a gate per pixel too
            x = x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)
        return x                                                 # (B, L, P, c)


class PixelMLP(nn.Module):
    """PiT feed-forward, per pixel: Linear(c -> 4c), exact GELU, Linear(4c -> c), with biases (16 -> 64 -> 16)."""

    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):                                       # (B, L, P, c) -> (B, L, P, 4c) -> (B, L, P, c)
        return self.fc2(F.gelu(self.fc1(x)))


def image_to_pixel_tokens(x, p):                            # (B, c, H, W) -> (B, L, P, c)
    """Group the pixels of an image by patch: token [b, l, i*p + j] is pixel (i, j) of patch l (row-major), the
    same patch order as the patch level's F.unfold (a test checks), so s_cond of patch l conditions its pixels."""
    B, c, H, W = x.shape
    x = x.reshape(B, c, H // p, p, W // p, p)               # (B, c, h, p, w, p)
    x = x.permute(0, 2, 4, 3, 5, 1)                         # (B, h, w, p, p, c): channels fastest
    return x.reshape(B, (H // p) * (W // p), p * p, c)      # (B, L, P, c)


def pixel_tokens_to_image(x, p):                            # (B, L, P, c) -> (B, c, H, W), the inverse
    B, L, P, c = x.shape
    h = math.isqrt(L)
    x = x.reshape(B, h, h, p, p, c)                         # (B, h, w, p, p, c)
    x = x.permute(0, 5, 1, 3, 2, 4)                         # (B, c, h, p, w, p)
    return x.reshape(B, c, h * p, h * p)                    # (B, c, H, W)


class PixelEmbedder(nn.Module):
    """Pixel embedding (the pixel-level DiT's input): Linear(3 -> c) per pixel plus a fixed 2D sin-cos embedding
    over the FULL H x W pixel grid (so a pixel knows where it is in the image, not only in its patch), grouped by
    patch."""

    def __init__(self, pixel_dim, img_size, patch):
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(3, pixel_dim)
        pos = sincos_pos_embed(pixel_dim, img_size).view(1, img_size, img_size, pixel_dim)  # (1, H, W, c)
        self.register_buffer("pos_embed", pos, persistent=False)   # rebuilt from the config, never trained

    def forward(self, z):                                             # (B, 3, H, W)
        x = self.proj(z.permute(0, 2, 3, 1)) + self.pos_embed         # (B, H, W, c)
        return image_to_pixel_tokens(x.permute(0, 3, 1, 2), self.patch)  # (B, c, H, W) -> (B, L, P, c)


class FinalLayer(nn.Module):
    """RMSNorm(c) -> Linear(c -> 3) per pixel, no modulation; zero-init so the model outputs exactly 0 at init."""

    def __init__(self, pixel_dim):
        super().__init__()
        self.norm = RMSNorm(pixel_dim)
        self.linear = nn.Linear(pixel_dim, 3)

    def forward(self, x):                                   # (B, L, P, c) -> (B, L, P, 3)
        return self.linear(self.norm(x))


# ---------------------------------------------------------------------------------------------------------------
# ---- 3. The model: patch-level DiT -> s_cond -> pixel-level PiT blocks (§3.1, Fig. 2: the dual-level design) ----
# ---------------------------------------------------------------------------------------------------------------


class PixelDiT(nn.Module):
    """z (B,3,H,W), t (B,), y (B,) -> the velocity v = x - e (B,3,H,W).
    repa_dim > 0 adds the REPA projector; forward(..., return_repa=True) then also returns the projected
    patch-level feature (B, L, repa_dim)."""

    def __init__(self, config, img_size, num_classes, depth, pixel_depth, width, heads, pixel_dim, patch,
                 repa_layer, post_modulation=False, repa_dim=0):
        super().__init__()
        if img_size % patch:
            raise SystemExit(f"--img-size {img_size} is not a multiple of the patch size {patch} of {config}.")
        if repa_dim and not 1 <= repa_layer <= depth:
            raise SystemExit(f"{config}: REPA taps patch block {repa_layer}, but the model has {depth} blocks.")
        self.config, self.img_size, self.num_classes = config, img_size, num_classes
        self.patch, self.repa_layer, self.post_modulation, self.repa_dim = patch, repa_layer, post_modulation, repa_dim
        h = img_size // patch                                              # patch grid side
        # ---- patch level. No absolute position embedding: positions enter only through RoPE (Tab. 5:
        # RoPE and RMSNorm take its "Vanilla DiT/16" from 9.84 to 8.53 gFID at 80 epochs).
        self.s_embedder = PatchEmbedder(patch, width)
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = LabelEmbedder(num_classes, width)
        self.patch_blocks = nn.ModuleList([PatchBlock(width, heads) for _ in range(depth)])
        # One RoPE table serves both levels: the pixel level attends over the same L patch positions.
        # DIFF: the official code builds its RoPE and pixel sin-cos tables on the fly for each input size and caches
        # them in Python dicts; we build them once for img_size as non-persistent buffers (rebuilt from the config
        # on load, never saved): no Python state in forward, so torch.compile traces it whole.
        cos, sin = rope_2d(width // heads, h)
        self.register_buffer("rope_cos", cos, persistent=False)           # (L, head_dim)
        self.register_buffer("rope_sin", sin, persistent=False)
        # ---- pixel level
        self.pixel_embedder = PixelEmbedder(pixel_dim, img_size, patch)
        self.pixel_blocks = nn.ModuleList([PiTBlock(pixel_dim, width, heads, patch, post_modulation)
                                           for _ in range(pixel_depth)])
        self.final_layer = FinalLayer(pixel_dim)
        # ---- REPA projector (official REPATrainer.proj): D -> D -> D -> repa_dim with SiLU.
        # DIFF: the official code keeps this MLP in the trainer, outside the denoiser's checkpoint; we keep it in the
        # model (only when REPA is on), so one state dict, one optimizer and DDP cover it. Sampling never uses it.
        if repa_dim:
            self.repa_proj = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                           nn.Linear(width, repa_dim))
        self.initialize_weights()

    def initialize_weights(self):
        # Official PixDiT.initialize_weights: patch embed xavier-uniform (bias 0); class table and t-MLP N(0, 0.02);
        # every modulation layer and the final linear zero; every other Linear keeps PyTorch's default init.
        nn.init.xavier_uniform_(self.s_embedder.proj.weight)
        nn.init.zeros_(self.s_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[0] for b in [*self.patch_blocks, *self.pixel_blocks]] + [
                self.final_layer.linear]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, z, t, y, return_repa=False):
        cos, sin = self.rope_cos, self.rope_sin                            # (L, head_dim) each
        # ---- patch level: a DiT on L patch tokens
        t_emb = self.t_embedder(t)                                         # (B, D)
        c = F.silu(t_emb + self.y_embedder(y))                             # (B, D): the adaLN condition
        s = self.s_embedder(z)                                             # (B, 3, H, W) -> (B, L, D)
        for i, block in enumerate(self.patch_blocks):
            s = block(s, c, cos, sin)                                      # (B, L, D)
            if i + 1 == self.repa_layer:
                feature = s                                                # REPA taps this block's output
        # No final layer: each patch token, plus t, becomes the condition of its pixels (the class enters only
        # through the patch level).
        s_cond = F.silu(t_emb.unsqueeze(1) + s)                            # (B, L, D)
        # ---- pixel level: PiT blocks on one c-dim token per pixel
        x = self.pixel_embedder(z)                                         # (B, L, P, c)
        for block in self.pixel_blocks:
            x = block(x, s_cond, cos, sin)                                 # (B, L, P, c)
        v = pixel_tokens_to_image(self.final_layer(x), self.patch)         # (B, L, P, 3) -> (B, 3, H, W)
        if return_repa:
            return v, self.repa_proj(feature)                              # (B, L, repa_dim)
        return v


class PatchBlock(nn.Module):
    """Patch-level DiT block (official AugmentedDiTBlock): adaLN-Zero with RMSNorm, RoPE attention, SwiGLU.
    c = SiLU(t_emb + y_emb) already holds the SiLU, so adaLN_modulation is a bare Linear(D, 6D)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim)
        # nn.Sequential with one Linear only so that the key is "adaLN_modulation.0" as in the official checkpoints.
        self.adaLN_modulation = nn.Sequential(nn.Linear(dim, 6 * dim))   # zero-init: the block starts as identity

    def forward(self, s, c, cos, sin):                     # s: (B, L, D), c: (B, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=-1)  # (B, D) each
        s = s + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(s), shift1, scale1), cos, sin)
        s = s + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(s), shift2, scale2))
        return s                                           # (B, L, D)


def default_shift(img_size):
    """Official configs: the logit-normal t is shifted by s = 1 at 256px and s = 3 at 512px (REPATrainer timeshift:
    1.0 in c2i/configs/pix256_xl.yaml, 3.0 in pix512_xl.yaml; more pixels need more noise to hide the signal). We
    use 1 below 512 (our 64/128px data included) and 3 from 512 on."""
    return 3.0 if img_size >= 512 else 1.0


def create_model(config, img_size, num_classes, post_modulation=False, repa_dim=0):
    """The PixelDiT of CONFIGS[config]. post_modulation: the PiT variant of official PR #8 (see PiTBlock).
    repa_dim > 0 adds the REPA projector to that many channels (REPA_DIM = 768 for DINOv2 ViT-B/14)."""
    if config not in CONFIGS:
        raise SystemExit(f"unknown --config {config!r}; choose one of: {', '.join(CONFIGS)}")
    return PixelDiT(config, img_size, num_classes, post_modulation=post_modulation, repa_dim=repa_dim,
                    **CONFIGS[config])


# ---------------------------------------------------------------------------------------------------------------
# ---- 4. Flow matching and REPA (official c2i/src/diffusion.py, REPATrainer) ----
# ---------------------------------------------------------------------------------------------------------------
# z = t*x + (1-t)*e, v = dz/dt = x - e. The network predicts v; the loss is the plain MSE to v plus 0.5 x REPA.
# From (z, t) and v: x = z + (1-t)*v (exact; the sampler's last step is this, v_to_x), e = z - t*v. Back from x:
# v = (x - z)/(1-t) divides by 0 at t=1, so x_to_v clamps (1-t) at T_EPS = 0.05 as JiT does (only needed to drive
# this sampler with an x-predictor; PixelDiT itself never divides).
T_EPS = 0.05
LABEL_DROP = 0.1      # probability of replacing the label by the null class (for CFG); official null_condition_p
REPA_WEIGHT = 0.5     # lambda of the REPA loss (official feat_loss_weight)
REPA_DIM = 768        # width of DINOv2 ViT-B/14 patch tokens (the projector's output)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)   # DINOv2's input normalisation


def v_to_x(v, z, t):
    """x = z + (1-t) * v: exact on the straight path z_t = t*x + (1-t)*e, no clamp needed."""
    return z + (1 - _bcast(t, z)) * v


def x_to_v(x_pred, z, t):
    """v = (x - z) / max(1-t, T_EPS): the inverse of v_to_x away from t=1, finite at t=1 (weight capped at 20).
    Our loss and sampler predict v and never need this direction: it is here for converting an x-prediction."""
    return (x_pred - z) / (1 - _bcast(t, z)).clamp_min(T_EPS)


def shift_t(t, shift):
    """Resolution time shift (SD3-style), official time_shift_fn: t -> t / (t + (1-t) * s). With s > 1 it moves t
    towards 0 (noise): in logit space it is exactly logit(t) - log(s). s = 1 is the identity."""
    return t / (t + (1 - t) * shift)


def sample_t(n, device, shift=1.0):
    """Training t (official lognorm_t): t = sigmoid(N(0, 1)), then the resolution shift."""
    return shift_t(torch.sigmoid(torch.randn(n, device=device)), shift)


def flow_loss(model, x, y, num_classes, shift=1.0, encoder=None, repa_weight=REPA_WEIGHT):
    """The training objective: x (B,3,H,W) in [-1,1], y (B,) class ids. Returns (loss, terms):
    loss = MSE(v_pred, x - e) + repa_weight * mean(1 - cos(proj(h), DINOv2(x))), h the output of patch block
    repa_layer (8 in the paper's configs); the REPA term only when an encoder is given (load_dinov2: clean [0, 1]
    images -> (B, L, 768)); terms = dict(mse, repa), detached 0-dim."""
    B = x.shape[0]
    t = sample_t(B, x.device, shift)                                   # (B,)
    e = torch.randn_like(x)                                            # (B, 3, H, W)
    z = _bcast(t, x) * x + (1 - _bcast(t, x)) * e                      # noisy image z_t
    y = torch.where(torch.rand(B, device=y.device) < LABEL_DROP, num_classes, y)   # label dropout -> null class
    if encoder is None:
        v, repa = model(z, t, y), torch.zeros((), device=x.device)
    else:
        # REPA (Yu et al. 2024, "Representation Alignment"; the paper's objective, §3.3; official REPATrainer): align
        # the patch-level feature of the NOISY input to the frozen encoder's feature of the CLEAN image, token by
        # token, by cosine similarity.
        v, h = model(z, t, y, return_repa=True)                        # (B, 3, H, W), (B, L, 768)
        with torch.no_grad():
            target = encoder((x + 1) / 2)                              # (B, L, 768): [0, 1] input, no grad
        repa = repa_loss(h, target)
    mse = (v.float() - (x - e)).pow(2).mean()                          # mean over B, C, H, W
    return mse + repa_weight * repa, dict(mse=mse.detach(), repa=repa.detach())


def repa_loss(h, target):
    """REPA (Yu et al. 2024): mean over tokens and batch of 1 - cos(projected hidden state, frozen encoder feature);
    h, target: (B, L, 768). Zero when every projected token points the same way as its target."""
    return (1 - F.cosine_similarity(h.float(), target.float(), dim=-1)).mean()


def load_dinov2(device, patch, path=None):
    """The frozen REPA target as a plain callable encode(x01): clean images in [0, 1] (B, 3, H, W) -> DINOv2
    ViT-B/14 x_norm_patchtokens (B, N, 768), as the official wrapper. ImageNet mean/std normalisation, then a
    bicubic resize to 14 * (H / patch), so the ViT-B/14 sees one 14x14 patch per patch of ours (224px at 256px,
    patch 16). Loaded with torch.hub from GitHub (code and weights cached in $TORCH_HOME/hub), or from a local
    clone of facebookresearch/dinov2 (`path`, --dinov2-path; the weights still come from the hub cache). Any
    callable with this contract can stand in for it (the tests use a tiny one).
    DIFF: the official wrapper resizes to 14 * H/16 whatever the patch size and average-pools the student's
    feature grid to the teacher's; we resize to 14 * H/p: identical at p = 16 (every config of the paper's table), and
    token-aligned without pooling for our configs with other patch sizes.
    DIFF: the official wrapper torch.compiles DINOv2; we run it eagerly (frozen, forward only).
    DIFF: the official wrapper casts DINOv2's weights and its features to bf16; we keep fp32 weights and run it under
    the training step's autocast (bf16 matmuls on CUDA); repa_loss compares in fp32."""
    if path and not Path(path, "hubconf.py").is_file():
        raise SystemExit(f"--dinov2-path {path}: no hubconf.py there; pass a clone of "
                         "https://github.com/facebookresearch/dinov2, or train with --no-repa.")
    try:
        if path:
            net = torch.hub.load(path, "dinov2_vitb14", source="local")
        else:
            net = torch.hub.load("facebookresearch/dinov2", "dinov2_vitb14", trust_repo=True)
    except Exception as err:  # no network, no cached weights, a broken checkout: all end the same way
        raise SystemExit(f"--repa: could not load DINOv2 ViT-B/14 ({type(err).__name__}: {str(err)[:200]}). "
                         "Connect once to the internet (torch.hub caches it in ~/.cache/torch/hub), or pass "
                         "--dinov2-path to a clone of github.com/facebookresearch/dinov2 (with "
                         "dinov2_vitb14_pretrain.pth in ~/.cache/torch/hub/checkpoints), or train with --no-repa.")
    net = net.to(device).eval().requires_grad_(False)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def encode(x01):                                                  # (B, 3, H, W) in [0, 1]
        size = (14 * (x01.shape[-2] // patch), 14 * (x01.shape[-1] // patch))
        x = F.interpolate((x01.float() - mean) / std, size=size, mode="bicubic")   # normalise, resize (official)
        return net.forward_features(x)["x_norm_patchtokens"]         # (B, N, 768), under the step's autocast
    return encode


# ---------------------------------------------------------------------------------------------------------------
# ---- 5. Sampler (official FlowDPMSolverSampler: 2nd-order Adams-Bashforth; settings: c2i/README.md) ----
# ---------------------------------------------------------------------------------------------------------------


def sampler_defaults(config, img_size):
    """The official evaluation settings (c2i/README.md, "Sampler Settings Summary"): Adams-Bashforth 2 (its
    FlowDPMSolver), 100 steps, CFG inside (0.1, 1.0).
    256px: CFG 3.25, shift 1 (80/160-epoch checkpoints; the 320-epoch one uses 2.75 on (0.1, 0.9)).
    512px: CFG 3.5, shift 2.0 (training used 3). Published for XL only; we use them for every size."""
    if img_size >= 512:
        return dict(steps=100, cfg=3.5, interval=(0.1, 1.0), solver="ab2", shift=2.0)
    return dict(steps=100, cfg=3.25, interval=(0.1, 1.0), solver="ab2", shift=1.0)


def time_grid(steps, shift):
    """The official sampling grid, in float32 as theirs: linspace(0, 1 - 1/steps, steps), then 1.0 (0, 0.01, ...,
    0.99, 1 for 100 steps): uniform steps of 1/steps. A Python list, so the CFG-interval test is decided on the
    host, never a GPU sync. PixelDiT then applies the time shift to it: shift_t(grid, shift) (t = 0 and t = 1 stay
    put; shift 1 changes nothing)."""
    return shift_t(torch.cat([torch.linspace(0, 1 - 1 / steps, steps), torch.ones(1)]), shift).tolist()


# Strict at both ends, as the official code: a grid point equal to float32(0.1) is not guided.
def in_cfg_interval(t, interval):
    """The official guidance test, in float32 as the official tensor comparison: lo < t < hi."""
    t, lo, hi = np.float32(t), np.float32(interval[0]), np.float32(interval[1])
    return bool(lo < t < hi)            # strict at both ends (deco.py: lo < t <= hi, jit.py: lo = 0 guides t = 0)


@torch.no_grad()
def velocity(model, z, t, y, cfg, interval):
    """v(z, t) for all B images at time t (a python float), with classifier-free guidance v_u + cfg * (v_c - v_u)
    inside the CFG interval (in_cfg_interval); there cond and uncond run as ONE batched forward of 2B.
    DIFF: the official sampler always runs cond + uncond and discards the uncond half outside the interval; we run
    only the conditional half outside it: with AB2-100 and interval (0.1, 1) 189 instead of 200 network
    evaluations per image (11 steps unguided)."""
    B = z.shape[0]
    tt = torch.full((B,), t, device=z.device)
    if cfg == 1.0 or not in_cfg_interval(t, interval):
        return model(z, tt, y).float()
    null = torch.full_like(y, model.num_classes)                            # the null class row (CFG)
    v_c, v_u = model(torch.cat([z, z]), torch.cat([tt, tt]), torch.cat([y, null])).float().chunk(2)
    return v_u + cfg * (v_c - v_u)                                          # (B, 3, H, W)


@torch.no_grad()
def sample(model, y, steps=None, cfg=None, interval=None, solver=None, noise=None, generator=None, progress=False,
           shift=None):
    """Integrate dz/dt = v from t=0 (noise) to t=1 (data) on the shifted grid (time_grid). Solvers:
      "ab2"   (default, official): the first step Euler, then z += dt * (1.5 v_i - 0.5 v_{i-1}); one network call
              per step. The fixed 1.5/-0.5 weights are exact for v linear in t on a UNIFORM grid (shift 1); on a
              shifted grid they are the official approximation and we keep them.
      "euler": z += dt * v.
      "heun":  Euler predictor + trapezoid corrector, 2 calls per step; the last step is Euler.
               DIFF: the official HeunSampler (default exact_henu=False) reuses the corrector's velocity, taken at
               the Euler-predicted point, as the next step's start (2 calls in the first step, then 1, none in the
               last); ours is the textbook Heun (as in jit.py).
    Returns images (B, 3, H, W) clamped to [-1, 1] (the official sampler returns raw values and clamps when
    converting to uint8: the same PNGs). None arguments take the official evaluation settings (sampler_defaults);
    `noise` (B,3,H,W) overrides the starting noise."""
    d = sampler_defaults(model.config, model.img_size)
    steps = steps or d["steps"]
    cfg = d["cfg"] if cfg is None else cfg
    cfg = 1.0 if model.num_classes == 1 else cfg           # unconditional data: nothing to guide towards
    interval = interval or d["interval"]
    solver = solver or d["solver"]
    shift = d["shift"] if shift is None else shift
    if solver not in ("ab2", "euler", "heun"):
        raise SystemExit(f"unknown solver {solver!r}: pixeldit.py samples with 'ab2' (official), 'euler' or 'heun'")
    dev = next(model.parameters()).device
    y = y.to(dev)
    B, H = y.shape[0], model.img_size
    if noise is None:
        noise = torch.randn(B, 3, H, H, generator=generator, device=generator.device if generator else dev)
    z = noise.to(dev, torch.float32)                       # z_0 = e ~ N(0, I)
    ts = time_grid(steps, shift)
    v_prev = None
    with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
        for i in tqdm(range(steps), desc="sampling", disable=not progress, leave=False):
            t, t_next = ts[i], ts[i + 1]
            dt = t_next - t
            v = velocity(model, z, t, y, cfg, interval)    # (B, 3, H, W)
            if solver == "ab2" and v_prev is not None:
                step_v = 1.5 * v - 0.5 * v_prev            # 2nd-order Adams-Bashforth
            elif solver == "heun" and i < steps - 1:
                step_v = 0.5 * (v + velocity(model, z + dt * v, t_next, y, cfg, interval))   # trapezoid
            else:                                          # Euler (solver "euler", AB2's first step, Heun's last)
                step_v = v
            v_prev = v
            if i < steps - 1:
                z = z + dt * step_v
            else:                                          # the last step lands on t = 1: z_1 = z_t + (1-t) v
                z = v_to_x(step_v, z, torch.full((B,), t, device=dev))
    return z.clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------------------
# ---- 6. Standard DiT parts (shared with pixnerd.py and deco.py: the same text in each) ----
# ---------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm with a learnable gain (eps 1e-6), computed in fp32 whatever the autocast dtype; returns the input
    dtype.
    PixelDiT uses it in place of DiT's LayerNorm at both levels (see PixelDiT.__init__ for the ablation).
    DIFF: the official RMSNorm multiplies by the gain after casting back to the input dtype, so under bf16 autocast
    it returns fp32; we apply the gain in fp32 and return the input dtype (equal up to bf16 rounding)."""

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


class LabelEmbedder(nn.Module):
    """Class table with num_classes + 1 rows; row num_classes is the null label used for CFG (label dropout).
    A module of its own only for the official key "y_embedder.embedding_table.weight"."""

    def __init__(self, num_classes, dim):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y):                                           # (B,) -> (B, D)
        return self.embedding_table(y)


class PatchEmbedder(nn.Module):
    """Patch embedding (the official "s_embedder"): each p x p patch unfolded channel-major (3*p*p values, the
    order of F.unfold / a stride-p conv) -> Linear -> D."""

    def __init__(self, patch, dim):
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(3 * patch * patch, dim)

    def forward(self, z):                                               # (B, 3, H, W)
        s = F.unfold(z, kernel_size=self.patch, stride=self.patch)      # (B, 3*p*p, L): channel, then row, col
        return self.proj(s.transpose(1, 2))                             # (B, L, 3*p*p) -> (B, L, D)


def rope_2d(head_dim, h, theta=10_000.0, scale=16.0):
    """2D rotary embedding of the official precompute_freqs_cis_2d, as real tables cos, sin of shape (h*h, head_dim).
    Positions: linspace(0, 16, h) along each axis (NOT the integer grid), so the grid spans [0, 16] at any
    resolution (at 512px the same range is sampled twice as densely). Frequencies theta^(-4k/head_dim),
    k < head_dim/4, shared by both axes. Channel pairs (2i, 2i+1) rotate together and alternate axes: pair 2k
    (channels 4k, 4k+1) turns with the column x, pair 2k+1 (channels 4k+2, 4k+3) with the row y."""
    freqs = theta ** (-torch.arange(0, head_dim, 4, dtype=torch.float64) / head_dim)  # (head_dim/4,)
    pos = torch.linspace(0, scale, h, dtype=torch.float64)                           # (h,)
    row, col = torch.meshgrid(pos, pos, indexing="ij")                               # (h, h); token = row*h + col
    angle = torch.stack([col.reshape(-1, 1) * freqs, row.reshape(-1, 1) * freqs], -1)  # (N, head_dim/4, 2): x, y
    angle = angle.flatten(1).repeat_interleave(2, dim=-1)                            # (N, head_dim): one per channel
    return angle.cos().float(), angle.sin().float()


def apply_rope(x, cos, sin):
    """x: (B, heads, N, d). Rotates each adjacent channel pair (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin): the
    official complex product (x0 + i x1) * e^(i angle), in real arithmetic (torch.compile-friendly). Returns fp32."""
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)     # (B, heads, N, d/2) each
    rotated = torch.stack([-x1, x0], dim=-1).flatten(-2)      # (B, heads, N, d): "rotate_half", interleaved
    return x.float() * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head self-attention: qkv without bias, q/k RMSNorm per head, then 2D RoPE, proj with bias (official)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(dim // heads)
        self.k_norm = RMSNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin):                                            # (B, N, D)
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, heads, N, d)
        q = apply_rope(self.q_norm(q), cos, sin).to(v.dtype)
        k = apply_rope(self.k_norm(k), cos, sin).to(v.dtype)
        # Speed: F.scaled_dot_product_attention runs flash attention on CUDA in bf16 (fp32 softmax accumulator):
        # the (N, N) score matrix is never stored, so memory is O(N). apply_rope returns q, k in fp32;
        # .to(v.dtype) brings them back to bf16, since the flash kernel needs q, k, v of one dtype.
        x = F.scaled_dot_product_attention(q, k, v)                           # (B, heads, N, d)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))                  # (B, N, D)


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases, hidden = int(2 * 4D / 3) (LLaMA; the official FeedForward, same keys)."""

    def __init__(self, dim):
        super().__init__()
        hidden = int(2 * (4 * dim) / 3)                # 2048 for D=768, 2730 for D=1024, 3072 for D=1152
        self.w1 = nn.Linear(dim, hidden, bias=False)   # gate
        self.w3 = nn.Linear(dim, hidden, bias=False)   # value
        self.w2 = nn.Linear(hidden, dim, bias=False)   # out

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def sincos_pos_embed(dim, h):
    """Fixed 2D sin-cos position embedding (MAE style), (h*h, dim). The first half of the channels encodes the
    column, the second half the row; each half is [sin | cos] of pos * 1/10000^(k/(dim/4)). Positions are integers."""
    omega = 1.0 / 10_000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))  # (dim/4,)
    row, col = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(h, dtype=torch.float64),
                              indexing="ij")                                           # (h, h) each

    def embed_1d(pos):                                       # (N,) -> (N, dim/2)
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([embed_1d(col), embed_1d(row)], dim=1).float()  # (N, dim)


def _bcast(t, z):           # (B,) -> (B, 1, ..., 1) with as many dims as z: (B, 1, 1, 1) for images
    return t.view(-1, *[1] * (z.dim() - 1))


# ---------------------------------------------------------------------------------------------------------------
# ---- 7. Data (ADM center crop; the built-in `shapes` data is in the appendix) ----
# ---------------------------------------------------------------------------------------------------------------
# The standard parts: data, training, checkpoints, command line. A helper here has the same code in every
# script that has it (test_all.py's SHARED lists them), except this paper's recipe: lr_at, model_kwargs, build,
# train_step, the presets, get_args and main.
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
# ---- 8. Training (official c2i/configs/pix256_xl.yaml, c2i/src/lightning.py; lr drop: paper §4.1) ----
# ---------------------------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of the weights, updated in place with one fused _foreach op per step.
    DIFF: the official SimpleEMA uses a fixed 0.9999 from step 0; we warm it up, decay_k = min(decay, (1+k)/(10+k))
    (TensorFlow's num_updates rule): the official 0.9999 (pix256_xl.yaml ema_tracker decay) after ~90k of its 1.6M
    steps (max_steps), while a fixed 0.9999 would still give the random init a weight of 0.9999^10000 = 37% after a
    user's 10k steps.
    warmup=False: the fixed decay (an EMA loaded by --init-from)."""

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
    """A constant lr (official pix256_xl.yaml: AdamW lr 1e-4 and no lr scheduler, so no warmup), divided by 10 after
    160 epochs in the ImageNet run (paper §4.1, implementation details; --lr-drop-epoch, which main() turns into
    args.lr_drop_steps)."""
    # DIFF: the official trainer has no lr schedule; its override_lr_on_resume (c2i/src/lightning.py) can set a new
    # lr when a run resumes.
    drop = args.lr_drop_steps is not None and step > args.lr_drop_steps
    return args.lr * (0.1 if drop else 1.0)


def model_kwargs(args):
    """create_model's arguments beyond (config, img_size, num_classes); saved in checkpoints for sample.py."""
    return dict(post_modulation=args.post_modulation, repa_dim=REPA_DIM if args.repa else 0)


def build(args, num_classes, device):
    """The plain model, its EMA and the optimizer: what main() trains and bench.py times."""
    raw = create_model(args.config, args.img_size, num_classes, **model_kwargs(args)).to(device)
    # Official pix256_xl.yaml: AdamW, weight_decay 0.0, no betas given (PyTorch's default (0.9, 0.999)); the REPA
    # projector (inside raw with --repa) too. fused: one kernel for all parameters on CUDA.
    opt = torch.optim.AdamW(raw.parameters(), lr=lr_at(1, args), betas=(0.9, 0.999), weight_decay=0.0,
                            fused=device.type == "cuda")
    return raw, EMA(raw, args.ema), opt


def compile_and_wrap(raw, args, device, ddp=False):
    """What runs the training forward: DDP over GPUs, then torch.compile of the whole model, which fuses the norms,
    modulations, RoPE and activations around the matmuls; it traces as one graph (a test checks)."""
    model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None) if ddp else raw
    return torch.compile(model) if args.compile else model


def train_step(model, ema, opt, x, y, step, args, encoder=None):
    """One optimisation step, exactly what main() runs and bench.py times. x: uint8 (B, 3, H, W) on the device;
    encoder: the frozen REPA teacher with --repa. Returns {"loss", "mse", "repa"} as 0-dim tensors (no host sync)."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, args)
    x = x.float() / 127.5 - 1.0                                           # uint8 [0, 255] -> [-1, 1], on device
    if args.flip:                                                         # off by default: no flip in official data.py
        x = torch.where(torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
    raw, terms = unwrap(model), {}
    opt.zero_grad(set_to_none=True)
    try:
        for xk, yk in micro_batches(model, x, y, args.grad_accum):       # one, unless --grad-accum K
            with torch.autocast(x.device.type, torch.bfloat16, enabled=args.precision == "bf16"):  # no GradScaler:
                loss, parts = flow_loss(model, xk, yk, raw.num_classes, args.shift, encoder, args.repa_weight)  # bf16
            (loss / args.grad_accum).backward()                          # has fp32's range (official "bf16-mixed")
            for k, v in dict(loss=loss.detach(), **parts).items():
                terms[k] = terms.get(k, 0) + v / args.grad_accum
    except torch.OutOfMemoryError:
        k = args.grad_accum * 2
        raise SystemExit(f"out of GPU memory at {x.shape[0]} images per forward per GPU ({args.config}, "
                         f"{args.img_size}px): add --grad-accum {k} (the same batch in {k} pieces), lower "
                         "--batch-size, use more GPUs, or keep --precision bf16.") from None
    except NotImplementedError as err:                                    # an op the MPS backend lacks
        raise SystemExit(f"{x.device.type}: {str(err).splitlines()[0][:150]}; use --device cpu, or set "
                         "PYTORCH_ENABLE_MPS_FALLBACK=1 to run such ops on the CPU.") from None
    # Official gradient_clip_val 1.0 (pix256_xl.yaml; 0.5 in pix512_xl.yaml), gradient_clip_algorithm norm. No host
    # sync: the norm stays on the device.
    torch.nn.utils.clip_grad_norm_(raw.parameters(), args.grad_clip)
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
    """--init-from FILE: a new run from another run's weights: its ckpt.pt (weights, EMA, Adam moments), a snapshot
    (weights, EMA) or the authors' checkpoint (from_official: its EMA starts both). At another class count the label
    table keeps its fresh init, with a warning; the REPA projector comes from a run that has one, else starts fresh."""
    path = find_checkpoint(args.init_from, "--init-from")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:                            # empty, truncated, random bytes
        raise SystemExit(f"--init-from: {path} is not a readable checkpoint (truncated or corrupt? "
                         f"{type(err).__name__}).") from None
    if isinstance(obj, dict) and obj.get("script") == SCRIPT:
        weights, averaged, adam = obj["model"], obj["ema"], obj.get("opt")
    else:                                               # the authors' layout (another script's: a one-line error)
        weights = averaged = from_official(obj)
        adam = None
    mine = raw.state_dict()
    fresh = {k: v for k, v in mine.items() if k.startswith("repa_proj.") and k not in weights}
    if weights.get(LABEL_TABLE, mine[LABEL_TABLE]).shape != mine[LABEL_TABLE].shape:
        warnings.warn(f"--init-from: {path} has {weights[LABEL_TABLE].shape[0] - 1} classes, this data "
                      f"{num_classes}: the label table starts from scratch, the rest from the file.")
        fresh[LABEL_TABLE] = mine[LABEL_TABLE]
    for state, model in ((weights, raw), (averaged, ema.model)):
        state = {k: v for k, v in state.items() if k in mine or not k.startswith("repa_proj.")}   # no --repa here
        load_weights(model, {**state, **fresh}, path, args.config)
    if adam is not None and not fresh and set(weights) == set(mine):   # Adam's moments fit only the same parameters
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
    CPUs). Plain `python pixeldit.py`: one process on --device."""
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
# ---- 9. Command line and main ----
# ---------------------------------------------------------------------------------------------------------------
# What `--data NAME` means: the training defaults we use for it (any flag overrides them). A folder that is not one
# of these names gets FOLDER_DEFAULTS. The official time shift (1 at 256px, 3 at 512px) and grad clip (1.0 / 0.5)
# of pix256_xl.yaml / pix512_xl.yaml follow --img-size unless given (get_args).
# DIFF: for the built-in shapes demo (ours) we use a small model and lr 2e-4 (official: 1e-4), chosen for its short
# 10k-step run (LAPTOP_PRESET: lr 4e-3 for its 800 steps); ffhq128 and imagenet keep the official lr.
DATA_PRESETS = {
    "shapes": dict(img_size=64, config="PixelDiT-S/8", batch_size=128, steps=10_000, lr=2e-4,
                   sample_every=1000, ckpt_every=1000),
    # FFHQ-128 (70k faces, unconditional): B/16 gives an 8x8 patch grid; the pixel level renders each 16x16 patch.
    # The official lr and time shift (1: 128px has fewer pixels than 256px, where pix256_xl.yaml already uses 1).
    "ffhq128": dict(img_size=128, config="PixelDiT-B/16", batch_size=128, steps=200_000, lr=1e-4,
                    sample_every=5000, ckpt_every=5000, unconditional=True),  # its 1000-image folders aren't classes
    # ImageNet-256 as official pix256_xl.yaml: XL/16, batch 256 (32 x 8 GPUs), max_steps 1.6M = 320 epochs, lr 1e-4,
    # REPA on; and the paper's lr drop to 1e-5 after 160 epochs (§4.1).
    "imagenet": dict(img_size=256, config="PixelDiT-XL/16", batch_size=256, steps=1_600_000, lr=1e-4,
                     lr_drop_epoch=160, repa=True, sample_every=10_000, ckpt_every=10_000),
}
# `--data shapes` with no GPU (and no --config / --img-size): PixelDiT-T at 32px, 800 steps of 32 images, 4.4 min on
# our 2-core CPU, to a grid whose columns follow their classes (README "No GPU?"). lr 4e-3: ours, for this short run.
# 50-step grids (half the official 100). No loader worker: the shapes are drawn in the training process, and torch
# keeps both cores.
LAPTOP_PRESET = dict(img_size=32, config="PixelDiT-T", batch_size=32, steps=800, lr=4e-3,
                     sample_every=400, sample_steps=50, ckpt_every=400, log_every=50, num_workers=0)
FOLDER_DEFAULTS = dict(img_size=256, config="PixelDiT-B/16", batch_size=128, steps=200_000, lr=1e-4,
                       sample_every=5000, ckpt_every=5000)
# MACHINE adds dinov2_path to the shared tuple: a path on the machine that wrote the checkpoint, not a run setting.
LABEL_TABLE = "y_embedder.embedding_table.weight"  # the class embedding, num_classes + 1 rows (--init-from)
MACHINE = ("out", "resume", "device", "compile", "precision", "num_workers", "dinov2_path")  # never from a ckpt
SAME_RUN = ("config", "img_size", "post_modulation", "repa", "shift")  # a resumed run cannot change these


def get_args(argv=None):
    """The run's settings. Each value comes from the command line, else the resumed checkpoint, else the --data
    preset (DATA_PRESETS), else the defaults below: `--resume RUN` alone continues RUN exactly as it was."""
    p = argparse.ArgumentParser(description="Train PixelDiT (Yu et al., arXiv 2511.20645).", formatter_class=Help)
    g = p.add_argument_group("data and model")
    g.add_argument("--data", default="shapes", help="'shapes' (built in), a folder of images, or NAME for data/NAME")
    g.add_argument("--img-size", type=int, default=64, help="image side in pixels")
    g.add_argument("--config", default="PixelDiT-S/8", help=f"model config: {', '.join(CONFIGS)}")
    g.add_argument("--unconditional", action=argparse.BooleanOptionalAction, default=False,
                   help="ignore class subfolders, train one class (FFHQ's folders are not classes)")
    g.add_argument("--post-modulation", action=argparse.BooleanOptionalAction, default=False,
                   help="PiT post-modulation (official PR #8): try it if the loss spikes")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=False, help="random horizontal flip")
    g = p.add_argument_group("objective (flow matching on v, + REPA)")
    g.add_argument("--shift", type=float, help="time shift of the training t (default: 1, 3 from 512px: official)")
    g.add_argument("--repa", action=argparse.BooleanOptionalAction, default=False,
                   help="REPA loss to DINOv2 ViT-B/14 features (paper: on; needs torch.hub or --dinov2-path)")
    g.add_argument("--repa-weight", type=float, default=REPA_WEIGHT, help="weight of the REPA loss (official: 0.5)")
    g.add_argument("--dinov2-path", help="local clone of facebookresearch/dinov2, for --repa without network")
    g = p.add_argument_group("optimisation (official c2i/configs/pix256_xl.yaml)")
    g.add_argument("--lr", type=float, default=2e-4, help="learning rate (official: 1e-4 at batch 256)")
    g.add_argument("--lr-drop-epoch", type=float, help="divide the lr by 10 after this many epochs (paper §4.1: 160)")
    g.add_argument("--grad-clip", type=float, help="max global gradient norm (default: 1.0, 0.5 from 512px: official)")
    g.add_argument("--ema", type=float, default=0.9999, help="EMA decay (official: 0.9999), reached after a warmup")
    g = p.add_argument_group("sample grids")
    g.add_argument("--cfg", type=float,
                   help="CFG scale of the grids, none on one-class data (default: official README, 3.25 at 256px)")
    g.add_argument("--sample-steps", type=int, help="sampler steps of the grids (default: official README, 100 AB2)")
    args = resolve_args(add_run_flags(p), argv)
    args.shift = args.shift or default_shift(args.img_size)          # official: 1 at 256px, 3 at 512px
    if args.grad_clip is None:                          # official: 1.0, 0.5 at 512px
        args.grad_clip = 0.5 if args.img_size >= 512 else 1.0
    args.lr_drop_steps = None                           # main() sets it from --lr-drop-epoch and the dataset size
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


def repa_encoder(args, device, world):
    """The frozen REPA target (load_dinov2); under torchrun one process per machine fills the torch.hub cache
    before the others read it."""
    first = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if world > 1 and not first:
        dist.barrier()
    encoder = load_dinov2(device, CONFIGS[args.config]["patch"], args.dinov2_path)
    if world > 1 and first:
        dist.barrier()
    return encoder


def main(argv=None, encoder=None):
    """Train. `encoder` replaces DINOv2 as the REPA target with --repa (a callable, as load_dinov2's): tests."""
    args = get_args(argv)
    # Setup processes and devices: one process per GPU under torchrun, else one process on --device.
    rank, world, device = setup_distributed(args)
    if rank == 0 and args.laptop:
        print(f"no GPU: the laptop preset ({args.config}, {args.img_size}px, {args.steps} steps); --config "
              f"{DATA_PRESETS['shapes']['config']} --img-size {DATA_PRESETS['shapes']['img_size']} gives the GPU one.")
    # The REPA target first: a missing DINOv2 stops the run before anything is written, and building it (a random
    # init, then the weights) draws from the RNG before the seeds below are set.
    encoder = (encoder or repa_encoder(args, device, world)) if args.repa else None
    torch.manual_seed(args.seed + rank)                 # ranks draw different t, noise and label drops
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True   # for what still runs in fp32

    # Setup data: the class count comes from it (1 for FFHQ or a flat folder, 1000 for ImageNet).
    dataset = make_dataset(args)
    num_classes = len(dataset.classes)
    if len(dataset) < args.batch_size:
        raise SystemExit(f"{len(dataset)} images is fewer than one batch ({args.batch_size}); lower --batch-size.")
    if args.lr_drop_epoch is not None:                  # paper §4.1 (ImageNet): 1e-4 -> 1e-5 at 160 ep
        args.lr_drop_steps = int(args.lr_drop_epoch * (len(dataset) // args.batch_size))
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
              f"shift {args.shift}, repa={args.repa}, post_modulation={args.post_modulation}) on {len(dataset)} "
              f"images, {num_classes} classes, {world} x {device.type}, batch {args.batch_size}, lr {args.lr:.2e}, "
              f"{args.precision}, compile={args.compile} -> {run}")
    gen = torch.Generator().manual_seed(1234)           # fixed grid noise and labels: successive grids compare
    grid_noise, grid_y = torch.randn(64, 3, args.img_size, args.img_size, generator=gen), torch.arange(64) % num_classes

    # Training loop.
    log, stopping = LossLog(run, args, world, rank, step), False
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, desc=f"{SCRIPT} {args.config}", dynamic_ncols=True)
    with StopSignals() as stop:                         # Ctrl-C, SIGTERM: the step finishes, the run saves, stops
        while step < args.steps and not stopping:
            x, y = next(batches)                        # (B/world, 3, H, W) uint8, (B/world,) long, on the device
            step += 1
            log.add(train_step(model, ema, opt, x, y, step, args, encoder))
            bar.update(1)
            stopping = stop.requested(step, args, world, device)
            keep = args.keep_every > 0 and step % args.keep_every == 0
            save = keep or step % args.ckpt_every == 0 or step == args.steps or stopping
            if step % args.log_every == 0 or save or step - log.first in (1, 10):   # a first reading in seconds
                log.write(step, bar)                    # before any save: a NaN run stops, never checkpointed
            if rank == 0 and (step % args.sample_every == 0 or step == args.steps):   # EMA weights, official sampler
                draw_grid(ema.model, grid_y, grid_noise, step, args, run, bar)
            if save:
                save_checkpoint(run / "ckpt.pt", args, raw, ema, opt, step, data_state, num_classes, world, rank, keep)
    bar.close()
    return finish(run, log, step, stopping)


# ---------------------------------------------------------------------------------------------------------------
# ---- Appendix A. The authors' weights: from_official ----
# ---------------------------------------------------------------------------------------------------------------
# Follows NVlabs/PixelDiT as in gcy-hub/PixelDiT commit d433a797a43d82869ff65098939b303bf9d34ee7 ("forked from
# PixelDiT"), whose c2i/ and pixdit_core/ are NVlabs/PixelDiT's.
# Released (official c2i/README.md): https://huggingface.co/nvidia/PixelDiT-ImageNet/resolve/main/<file>, files
# imagenet256_pixeldit_xl_epoch{80,160,320}.ckpt and imagenet512_pixeldit_xl.ckpt: all PixelDiT-XL/16, 1000 classes,
# pre-modulation PiT blocks; load them with create_model("PixelDiT-XL/16", 256 or 512, 1000).
LIGHTNING_PREFIXES = ("ema_denoiser.", "denoiser.")  # official c2i/src/lightning.py, LightningModel.state_dict
REPA_PROJ_PREFIX = "diffusion_trainer.proj.0."  # official REPATrainer.state_dict: proj only, a Sequential(Sequential)


def from_official(obj, ema=True, repa=False):
    """An official PixelDiT checkpoint, as torch.load(file, map_location="cpu") returns it -> a state dict with our
    key names, for create_model(config, img_size, num_classes, repa_dim=REPA_DIM if repa else 0) with strict=True.
    Accepts (layouts of the commit named above):
      - the official Lightning .ckpt (c2i/main.py fit, and the released files, which c2i/main.py predict loads
        with --ckpt_path): {"state_dict": {...}, "optimizer_states": ..., ...}, or that inner "state_dict" alone.
        Its keys are "denoiser.*" (raw), "ema_denoiser.*" (EMA 0.9999; what predict_step samples with unless
        eval_original_model) and "diffusion_trainer.proj.0.{0,2,4}.*" (the REPA projector, no EMA copy).
        ema=True takes "ema_denoiser.", ema=False "denoiser."; a file holding only one of them serves only that one.
      - the official network's own state_dict() (pixdit_core/pixeldit_c2i.py PixDiT): taken as it is (ema unused).
    repa=True keeps the REPA projector as our repa_proj (to continue training with --repa); otherwise it is dropped,
    as are the optimizer state and everything else outside the network. Anything else: a one-line SystemExit."""
    what = ("pass what torch.load returns for an official PixelDiT c2i .ckpt (e.g. imagenet256_pixeldit_xl_epoch80"
            ".ckpt) or for a PixDiT state_dict()")
    if not isinstance(obj, dict):
        raise SystemExit(f"from_official: got a {type(obj).__name__}, not a PixelDiT checkpoint dict; {what}.")
    sd = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj   # Lightning .ckpt -> its weights
    sd = {str(k): v for k, v in sd.items()}
    if any(k.startswith(LIGHTNING_PREFIXES) for k in sd):                      # the Lightning module's layout
        want = "ema_denoiser." if ema else "denoiser."
        if not any(k.startswith(want) for k in sd):
            raise SystemExit(f"from_official: this PixelDiT checkpoint has no {want}* weights; pass ema={not ema}.")
        net = {k[len(want):]: v for k, v in sd.items() if k.startswith(want)}   # strip the prefix: our names
    else:
        net = dict(sd)                                                         # a bare PixDiT state_dict()
    # Every other key is ours unchanged: our modules carry the names, shapes and layouts of the official PixDiT
    # (pixdit_core/pixeldit_c2i.py, modules.py). It keeps its RoPE and pixel sin-cos tables in Python dicts, not
    # buffers, so a checkpoint stores no table for us to check against our rebuilt ones.
    if any(".attn.qkv_x." in k for k in net):                                  # pixdit_core/pixeldit_t2i.py
        raise SystemExit("from_official: this is the text-to-image PixelDiT (PixDiT_T2I, e.g. pixeldit_t2i_v1.pth),"
                         " not the class-conditional c2i model pixeldit.py implements; pass an ImageNet .ckpt.")
    if not any(k.startswith("pixel_blocks.") and ".compress_to_attn." in k for k in net):
        first = ", ".join(list(net)[:3])
        raise SystemExit(f"from_official: no PiT-block keys (pixel_blocks.*.compress_to_attn), so not a PixelDiT "
                         f"checkpoint (its first keys: {first}); {what}.")
    if repa:
        proj = {k[len(REPA_PROJ_PREFIX):]: v for k, v in sd.items() if k.startswith(REPA_PROJ_PREFIX)}
        if not proj:
            raise SystemExit("from_official: repa=True, but the file has no REPA projector "
                             f"({REPA_PROJ_PREFIX}*: only the Lightning .ckpt holds it); pass repa=False.")
        for name, v in proj.items():        # official proj.0.{0,2,4} (Linear, SiLU, Linear, SiLU, Linear) ->
            net["repa_proj." + name] = v    # our repa_proj.{0,2,4}: the inner Sequential's indices are kept
    return net


# ---------------------------------------------------------------------------------------------------------------
# ---- Appendix B. Built-in data: `--data shapes` ----
# ---------------------------------------------------------------------------------------------------------------
class Shapes(torch.utils.data.Dataset):
    """Built-in labelled data, so `python pixeldit.py` runs with no download: one bright shape (the class) of random
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
