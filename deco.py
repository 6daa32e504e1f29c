"""
DeCo: "DeCo: Frequency-Decoupled Pixel Diffusion for End-to-End Image Generation"
(Ma, Wei, Wang, Zhang, Tian; arXiv 2511.19365). Official code: Zehong-Ma/DeCo.
Section, equation, table, figure and appendix numbers ("§3.3, Eq. 12", "Tab. 4(e)", "Fig. 8", "App. B.2", "Alg. 1")
refer to arXiv 2511.19365v2 (8 Apr 2026).

The idea in five lines:
  1. A DiT on 16x16 pixel patches sees only patch tokens, so let it model the LOW frequencies (semantics).
  2. A tiny attention-free pixel decoder (3 blocks, width 32) runs on EVERY pixel of the noisy image and predicts
     the velocity, including the HIGH-frequency detail the DiT no longer has to carry.
  3. The decoder is modulated pixel by pixel (AdaLN) by the DiT output of the pixel's patch.
  4. Training adds a frequency-aware flow-matching loss: 8x8 block DCT of YCbCr velocities, each frequency weighted
     by the inverse JPEG quantisation step, so the visually salient frequencies count most.
  5. REPA (§3.1 Eq. 6, App. B.1: a DiT block aligned with DINOv2 features; block 8 is the official align_layer, the
     paper names no block); Euler, 100 steps, CFG for sampling (App. B.2, Tab. 5).
Start reading at `PixelDecoder` (then `frequency_loss`).

Time: z_t = t*x + (1-t)*e, t=0 noise, t=1 data (all our scripts); the model predicts v = dz/dt = x - e. (The paper
writes the reversed convention, §3.1 Eqs. 2-3: x_t = (1-t)*x0 + t*x1 with x1 the noise, v_t = x1 - x0; the official
code uses ours.)
Shapes: B batch, C=3 channels, H=W image size, p patch (16), N=(H/p)^2 DiT tokens, D DiT width, P=p*p pixels per
patch, d decoder width (32), K=8 DCT block size.

    python deco.py                                    # built-in shapes data: DeCo-S/8 at 64px (no GPU: DeCo-T)
    python deco.py --data ffhq128                     # FFHQ thumbnails in data/ffhq128, DeCo-L/16
    torchrun --nproc_per_node=8 deco.py --data imagenet       # the paper's run (§4.2, Tab. 2): DeCo-XL/16, 256px, REPA
    torchrun --nproc_per_node=8 deco.py --data imagenet --img-size 512 --steps 100000 \
        --init-from runs/deco-imagenet --out runs/deco-imagenet512   # the paper's 512 model from the 256 one (App. B.2)
    python sample.py runs/deco-shapes --grid grid.png # sample a checkpoint (sample.py)
Where the paper and the official code disagree we follow the code and say so (time convention, decoder
normalisation, REPA weight); where the paper gives no value we take the code's (REPA block, label dropout of the
L and XL configs). Differences from the official code: grep "DIFF:".
"""
import argparse
import contextlib
import copy
import functools
import json
import math
import os
import random
import re
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

SCRIPT = "deco"

# ---------------------------------------------------------------------------------------------------------------
# ---- 1. Configs (official configs_c2i/DeCo_large.yaml, DeCo_XL.yaml, DeCo_XL_512.yaml) ----
# ---------------------------------------------------------------------------------------------------------------
# depth/width/heads: the DiT trunk ("num_cond_blocks", "hidden_size", "num_groups" in the official yaml).
# dec_depth/dec_width: the pixel decoder (official: num_blocks - num_cond_blocks = 3, hidden_size_x = 32).
# repa_layer: the DiT block whose output REPA aligns with DINOv2 (official align_layer = 8, 1-based).
# label_drop: probability of replacing the class by the null class in training (for CFG). The official XL yamls
#   set null_condition_p 0.2; the L yaml keeps the default 0.1. The paper states no label-dropout probability (its
#   only 0.1 is the CFG interval's lower end, App. B.2, Tab. 5).
CONFIGS = {
    # paper Tab. 5 (and Tab. 1): 426M params (we count 426.9M: the REPA projector is not counted: repa_dim=0)
    "DeCo-L/16": dict(depth=22, width=1024, heads=16, patch=16, dec_depth=3, dec_width=32, repa_layer=8,
                      label_drop=0.1),
    # paper Tab. 5 (and Tab. 2): 682M params (we count 682.3M)
    "DeCo-XL/16": dict(depth=28, width=1152, heads=16, patch=16, dec_depth=3, dec_width=32, repa_layer=8,
                       label_drop=0.2),
    # Ours, not in the paper: DiT-S-sized trunk (12 x 384, as the other scripts' small configs) with patch 8 for
    # the built-in 64px `shapes` data (8 x 8 tokens), the paper's 3 x 32 decoder (§4.4, Tab. 4(a)-(b), Tab. 5), REPA
    # at block 4 (about 1/3 of the depth, like 8 of 22). 33M params with 8 classes.
    "DeCo-S/8": dict(depth=12, width=384, heads=6, patch=8, dec_depth=3, dec_width=32, repa_layer=4,
                     label_drop=0.1),
    # Ours, not in the paper: the laptop preset's model (LAPTOP_PRESET: 32px shapes in minutes on a CPU); patch 8,
    # so 4 x 4 tokens at 32px.
    "DeCo-T": dict(depth=6, width=192, heads=4, patch=8, dec_depth=2, dec_width=16, repa_layer=2, label_drop=0.1),
    # For the tests only: one forward+backward at 32px in milliseconds on a CPU.
    "tiny": dict(depth=2, width=64, heads=2, patch=8, dec_depth=2, dec_width=16, repa_layer=1, label_drop=0.1),
}
MODEL_KEYS = ("depth", "width", "heads", "patch", "dec_depth", "dec_width", "repa_layer")  # -> DeCo(...)


# ---------------------------------------------------------------------------------------------------------------
# ---- 2. The "lightweight pixel decoder" (paper §3.2, Eqs. 5, 7-9, Fig. 3; official SimpleMLPAdaLN + NerfEmbedder) --
# ---------------------------------------------------------------------------------------------------------------
# The decoder is the point of the paper. Step by step, for each of the N patches (all B*N patches at once):
#   a. Every pixel becomes a token: its noisy RGB value plus 64 patch-local "DCT" position features (the cosine
#      basis below; it tells the pixel where it sits inside its patch) -> Linear(67 -> d) -> Linear(d -> d)
#      (§3.2 "Dense Query Construction", Eq. 7; paper vs code: Eq. 7 has one W_in, the code these two Linears).
#   b. The DiT output of the patch, s = SiLU(x_low + t) (one D-vector), is "up-sampled" by ONE linear map D -> P*d
#      and cut into P vectors of width d: every pixel gets its own condition vector (§3.2 "Decoder Block":
#      "linearly upsampled and reshaped to match the spatial resolution of xt").
#   c. 3 attention-free blocks, each a per-pixel MLP with per-pixel AdaLN from that condition (§3.2, Eqs. 8-9):
#         (shift, scale, gate) = Linear(d -> 3d)(SiLU(cond_pixel))
#         x = x + gate * MLP(LayerNorm(x) * (1 + scale) + shift),   MLP = Linear(d, d), SiLU, Linear(d, d)
#      Paper vs code: Eq. 8 adds t after the up-sampling, MLP(SiLU(up(x_low) + t)); the code adds it before,
#      Linear(SiLU(up(SiLU(x_low + t)))), with (b)'s up-sampling shared by the blocks. We follow the code.
#   d. LayerNorm (no affine) -> Linear(d -> 3) gives the pixel's velocity; fold the patches back into the image.
# No operation mixes pixels: every op is per pixel except (b), which only reads the pixel's own patch token.
# So pixels of different patches never interact inside the decoder (tested), and the decoder costs ~7 GFLOPs per
# 256px image. This per-pixel decoder is the paper's decoder patch size 1 (Tab. 4(c), App. B.1); the official
# SimpleMLPAdaLN's `patch_size` (the DiT's 16) only sizes step (b) (Zehong-Ma/DeCo#1, #6).
class PixelDecoder(nn.Module):
    """Noisy patches zp (B, N, C*P) + DiT condition s (B, N, D) -> velocity patches (B, N, C*P), channel-major."""

    def __init__(self, D, p, d, depth, in_ch=3, max_freqs=8):
        super().__init__()
        self.p, self.d = p, d
        self.register_buffer("pos", dct_position_features(p, max_freqs), persistent=False)  # (P, 64)
        self.x_embed = nn.Linear(in_ch + max_freqs ** 2, d)  # (a) 67 -> d (official NerfEmbedder; default init)
        self.input_proj = nn.Linear(d, d)                    # (a) d -> d
        self.cond_embed = nn.Linear(D, p * p * d)            # (b) the "up-sampling": D -> P*d
        self.blocks = nn.ModuleList([DecoderBlock(d) for _ in range(depth)])              # (c)
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)                # (d)
        self.linear_out = nn.Linear(d, in_ch)

    def forward(self, zp, s):                                            # zp (B, N, C*P), s (B, N, D)
        B, N, CP = zp.shape
        P = self.p * self.p
        C = CP // P
        x = zp.reshape(B, N, C, P).transpose(2, 3)                       # (B, N, P, C): one RGB token per pixel
        # (a) x_embed(concat[rgb, pos]) written as W_rgb @ rgb + (W_pos @ pos + b): the same Linear(67 -> d) and
        # the same weights, without materialising a (B, N, P, 67) concat (the position half is (P, d), shared).
        W = self.x_embed.weight                                          # (d, C + 64)
        x = F.linear(x, W[:, :C]) + F.linear(self.pos, W[:, C:], self.x_embed.bias)  # (B, N, P, d)
        x = self.input_proj(x)                                           # (B, N, P, d)
        cond = self.cond_embed(s).reshape(B, N, P, self.d)               # (b) (B, N, D) -> (B, N, P, d)
        for block in self.blocks:                                        # (c)
            x = block(x, cond)                                           # (B, N, P, d)
        x = self.linear_out(self.norm_out(x))                            # (d) (B, N, P, C)
        return x.transpose(2, 3).reshape(B, N, CP)                       # (B, N, C*P) channel-major, as zp


class DecoderBlock(nn.Module):
    """Step (c): attention-free residual MLP block with per-pixel AdaLN (official ResBlock)."""

    def __init__(self, d):
        super().__init__()
        # Paper vs code: Eq. 9 (§3.2) has no norm, Fig. 3 draws a "Layer Norm" in the decoder block; we follow the
        # code's normalisation, a LayerNorm (eps 1e-6, with affine) before the AdaLN.
        self.norm = nn.LayerNorm(d, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(d, 3 * d))

    def forward(self, x, cond):                                          # x, cond: (B, N, P, d)
        shift, scale, gate = self.adaLN(cond).chunk(3, dim=-1)           # 3 x (B, N, P, d): one set PER PIXEL
        # modulate() inline: the shift and scale here are per pixel, not one (B, D) pair per image
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)   # (B, N, P, d)


def dct_position_features(p, max_freqs=8):                              # -> (P, max_freqs^2)
    """Step (a)'s position code, PixNerd's patch-local cosine features: local coordinates linspace(0, 1, p),
    frequencies linspace(0, 8, 8) (not integers: 0, 8/7, 16/7, ... 8, as officially), feature[fx*8 + fy] =
    cos(pi*x*fx) * cos(pi*y*fy) / (1 + fx*fy). Pixel order = row-major inside the patch, as patchify."""
    y, x = torch.meshgrid(torch.linspace(0, 1, p), torch.linspace(0, 1, p), indexing="ij")  # (p, p)
    x, y = x.reshape(-1, 1, 1), y.reshape(-1, 1, 1)                     # (P, 1, 1)
    f = torch.linspace(0, max_freqs, max_freqs)
    fx, fy = f[None, :, None], f[None, None, :]                         # (1, 8, 1), (1, 1, 8)
    feat = torch.cos(math.pi * x * fx) * torch.cos(math.pi * y * fy) / (1 + fx * fy)  # (P, 8, 8)
    return feat.reshape(p * p, max_freqs ** 2)                          # (P, 64)


# ---------------------------------------------------------------------------------------------------------------
# ---- 3. The "frequency-aware flow-matching loss" (paper §3.3, Eqs. 10-12, App. D, tables in Fig. 8; official
# ----    src/diffusion/flow_matching/training_repa_DeCo.py) ----
# ---------------------------------------------------------------------------------------------------------------
# L_freq = E[ w * (DCT(YCbCr(v_pred)) - DCT(YCbCr(v)))^2 ]   (Eqs. 10, 12; Alg. 1 in App. E.1)
#   YCbCr: Y = .299R + .587G + .114B, Cb = -.168736R - .331264G + .5B, Cr = .5R - .418688G - .081312B (JPEG,
#          no +128 offsets: they cancel in a difference anyway).
#   DCT:   every 8x8 block X of each channel -> F = D X D^T, with the orthonormal DCT-II matrix
#          D[k, n] = a_k cos(pi (2n + 1) k / 16), a_0 = sqrt(1/8), a_k = sqrt(2/8) = 1/2. Row index = vertical
#          frequency u, column = horizontal frequency v, the layout of the JPEG tables.
#   w:     JPEG quantisation table Q at quality q (luma for Y, chroma for Cb and Cr), w = (1/Q) / mean_64(1/Q)
#          (§3.3, App. D; Alg. 1: w = 1/Qcur, then w / w.mean()):
#          a small step = a frequency JPEG keeps = a perceptually important one = a large weight.
# The paper's ablations (§4.4, Tab. 4(e), (f)): weight 1 (0.5 and 2 are worse), quality 85 (50 about the same,
# 100 = no weighting worse).
FREQ_WEIGHT = 1.0   # weight of L_freq in the total loss (paper Tab. 4(e), §4.4; official)
JPEG_QUALITY = 85   # quality of the tables the weights come from (paper Tab. 4(f), §4.4, Fig. 8; official)
YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
JPEG_LUMA = (  # ITU-T T.81 Annex K, Table K.1 (= the paper's base tables, Fig. 8)
    (16, 11, 10, 16, 24, 40, 51, 61), (12, 12, 14, 19, 26, 58, 60, 55), (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62), (18, 22, 37, 56, 68, 109, 103, 77), (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101), (72, 92, 95, 98, 112, 100, 103, 99))
JPEG_CHROMA = (  # Table K.2
    (17, 18, 24, 47, 99, 99, 99, 99), (18, 21, 26, 66, 99, 99, 99, 99), (24, 26, 56, 99, 99, 99, 99, 99),
    (47, 66, 99, 99, 99, 99, 99, 99), *[(99,) * 8] * 4)


def frequency_loss(v_pred, v, quality=JPEG_QUALITY):
    """L_freq for (B, 3, H, W) velocities, H and W multiples of 8: mean over batch, channel, block, u, v of
    w[c, u, v] * (F_pred - F)^2."""
    assert v.shape[-1] % 8 == 0 and v.shape[-2] % 8 == 0, "frequency_loss needs H, W multiples of 8"
    w = _frequency_weights_on(int(quality), v.device)                   # (3, K, K) fp32
    # DIFF: the official code transforms v_pred and v separately, then subtracts, in bf16 under autocast. YCbCr and
    # DCT are linear, so we transform the difference once (same value, half the work), and in fp32 so the loss
    # does not depend on the bf16 rounding of two nearly equal sets of coefficients.
    with torch.autocast(v.device.type, enabled=False):
        coef = block_dct(rgb_to_ycbcr(v_pred.float() - v.float()))      # (B, 3, H/8, W/8, K, K)
        return (w[:, None, None] * coef.square()).mean()                # w broadcast over the blocks


def frequency_weights(quality=JPEG_QUALITY):                            # -> (3, K, K) float64: w_Y, w_Cb, w_Cr
    """w = (1/Q) / mean(1/Q) per channel; the official 'inv_gamma' mode with gamma 1 is the same number."""
    inv = [1 / jpeg_table(JPEG_LUMA, quality), 1 / jpeg_table(JPEG_CHROMA, quality)]
    w_y, w_c = [w / w.mean() for w in inv]
    return torch.stack([w_y, w_c, w_c])


def jpeg_table(base, quality):                                          # -> (K, K) float64
    """libjpeg's quality scaling as the official code writes it: scale = 5000/q (q < 50) or 200 - 2q, then
    Q = clamp(floor((base * scale + 50) / 100), 1, 255). At q = 85: scale 30, e.g. 16 -> floor(5.3) = 5.
    Note: the paper's Eq. 11 (§3.3), Qcur = max(1, floor((Qbase * (100 - q) + 25) / 50)), rounds the same way for
    50 <= q <= 100, the range it is given for. Its Fig. 8 chroma table at q = 85 is this one; its luma table is 1
    lower at 12 entries (base 55: 16 there, 17 here). We follow the code and Eq. 11. (For q < 50 it keeps 5000/q
    as a float where libjpeg divides integers.)"""
    q = max(1, min(100, int(quality)))
    scale = 5000 / q if q < 50 else 200 - 2 * q
    return torch.floor((torch.tensor(base, dtype=torch.float64) * scale + 50) / 100).clamp(1, 255)


def rgb_to_ycbcr(x):                                                    # (B, 3, H, W) -> (B, 3, H, W)
    M = _transforms_on(x.device, x.dtype)[0]                            # (3, 3)
    return torch.einsum("ck,bkhw->bchw", M, x)


def block_dct(x):                                                       # (B, C, H, W) -> (B, C, H/8, W/8, K, K)
    """Orthonormal 2D DCT-II of every 8x8 block as two matmuls: F = D X D^T (JPEG's transform)."""
    B, C, H, W = x.shape
    D = _transforms_on(x.device, x.dtype)[1]                            # (K, K)
    X = x.reshape(B, C, H // 8, 8, W // 8, 8)                           # (B, C, H/8, K, W/8, K)
    X = X.permute(0, 1, 2, 4, 3, 5)                                     # (B, C, H/8, W/8, K, K): one block each
    return D @ X @ D.T                                                  # F[u, v] = sum_ij D[u, i] X[i, j] D[v, j]


def dct_matrix(n=8):                                                    # -> (n, n) float64, D @ D.T = I
    k = torch.arange(n, dtype=torch.float64)[:, None]                   # frequency (rows)
    i = torch.arange(n, dtype=torch.float64)[None, :]                   # sample position (columns)
    a = torch.full((n, 1), math.sqrt(2 / n), dtype=torch.float64)
    a[0] = math.sqrt(1 / n)
    return a * torch.cos(math.pi * (2 * i + 1) * k / (2 * n))


# The constant matrices, built once per device and dtype (not copied to the GPU at every step).
@functools.lru_cache(maxsize=8)
def _transforms_on(device, dtype):                                      # -> YCbCr (3, 3), DCT (K, K)
    # Rounded on the CPU, then moved: the MPS backend has no float64.
    return torch.tensor(YCBCR, dtype=torch.float64).to(dtype).to(device), dct_matrix(8).to(dtype).to(device)


@functools.lru_cache(maxsize=8)
def _frequency_weights_on(quality, device):                             # -> (3, K, K) fp32
    return frequency_weights(quality).float().to(device)                  # on the CPU first: MPS has no float64


# ---------------------------------------------------------------------------------------------------------------
# ---- 4. The model: DiT trunk on patches -> pixel decoder (official PixNerDiT in dit_c2i_DeCo.py) ----
# ---------------------------------------------------------------------------------------------------------------
class DeCo(nn.Module):
    """z (B, C, H, W) noisy image, t (B,) in [0, 1], y (B,) class (num_classes = null) -> v (B, C, H, W).
    The DiT trunk is PixNerd's (DeCo forks its code) without a final layer; its last hidden state, plus t,
    conditions the pixel decoder."""

    def __init__(self, config, img_size, num_classes, depth, width, heads, patch, dec_depth, dec_width,
                 repa_layer, repa_dim=0, in_ch=3):
        super().__init__()
        self.config, self.img_size, self.num_classes = config, img_size, num_classes
        self.patch, self.repa_layer = patch, repa_layer
        D = width
        self.s_embed = nn.Linear(in_ch * patch * patch, D)  # patch embedding (official "s_embedder")
        self.t_embed = TimestepEmbedder(D)
        self.y_embed = nn.Embedding(num_classes + 1, D)     # row num_classes = null class (CFG)
        self.blocks = nn.ModuleList([DiTBlock(D, heads) for _ in range(depth)])
        # No final layer on the DiT: its last hidden state conditions the decoder directly.
        self.decoder = PixelDecoder(D, patch, dec_width, dec_depth, in_ch)
        cos, sin = rope_2d(D // heads, img_size // patch)
        self.register_buffer("rope_cos", cos, persistent=False)  # (N, head_dim), rebuilt from img_size, not saved
        self.register_buffer("rope_sin", sin, persistent=False)
        # REPA projector D -> D -> D -> repa_dim (768 for DINOv2 ViT-B) with SiLU, only when training with REPA.
        # DIFF: the official code keeps the projector in the trainer, outside the model; we keep it in the model
        # (only when repa_dim > 0, recorded in the checkpoint's model_kwargs) so one optimizer, one DDP wrapper
        # and one state dict cover it. It is never used for sampling and not counted in the param tests.
        self.repa_proj = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D), nn.SiLU(),
                                       nn.Linear(D, repa_dim)) if repa_dim > 0 else None
        self.initialize_weights()

    def initialize_weights(self):
        # Trunk (official PixNerDiT.initialize_weights): patch embed xavier + zero bias, class table and the
        # t-MLP weights N(0, 0.02) (their biases keep PyTorch's default); everything else, the DiT blocks
        # included, keeps PyTorch's default init.
        nn.init.xavier_uniform_(self.s_embed.weight)
        nn.init.zeros_(self.s_embed.bias)
        nn.init.normal_(self.y_embed.weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        # Decoder (official SimpleMLPAdaLN.initialize_weights): xavier + zero bias for its Linears, except the
        # 67 -> d embedding (outside dec_net officially: PyTorch default); zero AdaLN and output Linear, so the
        # model output is exactly 0 at init.
        dec = self.decoder
        for m in [dec.input_proj, dec.cond_embed, *[b.mlp[i] for b in dec.blocks for i in (0, 2)]]:
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        for m in [*[b.adaLN[1] for b in dec.blocks], dec.linear_out]:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, z, t, y, return_repa=False):
        """With return_repa=True returns (v, h_proj): also the projected output tokens of DiT block `repa_layer`
        (B, N, repa_dim), for REPA."""
        B, C, H, W = z.shape
        zp = patchify(z, self.patch)                           # (B, N, C*P)
        t_emb = self.t_embed(t)                                # (B, D)
        c = F.silu(t_emb + self.y_embed(y))                    # (B, D) condition of the DiT blocks
        s = self.s_embed(zp)                                   # (B, N, D)
        h = None
        for i, block in enumerate(self.blocks):
            s = block(s, c, self.rope_cos, self.rope_sin)      # (B, N, D)
            if i + 1 == self.repa_layer:
                h = s                                          # REPA taps the OUTPUT of block repa_layer (1-based)
        s = F.silu(t_emb[:, None] + s)                         # (B, N, D) decoder condition: t again, no class term
        v = unpatchify(self.decoder(zp, s), self.patch, H, W)  # (B, N, C*P) -> (B, C, H, W)
        if return_repa:
            return v, self.repa_proj(h)                        # (B, C, H, W), (B, N, repa_dim)
        return v


class DiTBlock(nn.Module):
    """Pre-RMSNorm transformer block with adaLN (shift, scale, gate for attention, then for the MLP).
    Note: the official code keeps PyTorch's default init here; adaLN is NOT zero-initialised."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = SwiGLU(dim)
        self.adaLN = nn.Linear(dim, 6 * dim)

    def forward(self, x, c, cos, sin):                         # x (B, N, D), c (B, D)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)  # 6 x (B, D)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin)
        x = x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))
        return x                                               # (B, N, D)


def create_model(config, img_size, num_classes, **overrides):
    """DeCo model of a named config. overrides: any key of DeCo(...) (e.g. repa_dim=768 for REPA training)."""
    if config not in CONFIGS:
        raise SystemExit(f"unknown --config {config!r}; choose one of {', '.join(CONFIGS)}")
    kw = {k: CONFIGS[config][k] for k in MODEL_KEYS}
    kw.update(overrides)
    p = kw["patch"]
    if img_size % p:
        raise SystemExit(f"--img-size {img_size} is not a multiple of the patch size {p} of {config}")
    return DeCo(config, img_size, num_classes, **kw)


# ---------------------------------------------------------------------------------------------------------------
# ---- 5. Flow matching: t sampler, x <-> v, the total loss, REPA (official training_repa_DeCo.py) ----
# ---------------------------------------------------------------------------------------------------------------
# z_t = t*x + (1-t)*e; target v = dz/dt = x - e (official LinearScheduler). DeCo predicts v directly.
T_EPS = 0.05        # clamp of (1 - t) in x_to_v only; DeCo itself never divides by (1 - t)
REPA_WEIGHT = 0.5   # weight of the REPA loss (official code; the paper's Eq. 6 and Alg. 1 add L_REPA with weight 1)


def sample_t(n, device):
    """t = sigmoid(N(0, 1)): logit-normal with mean 0, std 1, no shift (paper Tab. 5, App. B.1; official
    lognorm_t=True)."""
    return torch.randn(n, device=device).sigmoid()


def _bcast(t, z):           # (B,) -> (B, 1, ..., 1) with as many dims as z: (B, 1, 1, 1) for images
    return t.view(-1, *[1] * (z.dim() - 1))


def v_to_x(v, z, t):
    """x = z + (1-t) * v: exact on the straight path z_t = t*x + (1-t)*e, no clamp needed."""
    return z + (1 - _bcast(t, z)) * v


def x_to_v(x_pred, z, t):
    """v = (x - z) / max(1-t, T_EPS): the inverse of v_to_x away from t=1, finite at t=1 (weight capped at 20).
    Our loss and sampler predict v and never need this direction: it is here for converting an x-prediction."""
    return (x_pred - z) / (1 - _bcast(t, z)).clamp_min(T_EPS)


def flow_loss(model, x, y, num_classes, label_drop=0.1, freq_weight=FREQ_WEIGHT, quality=JPEG_QUALITY,
              encoder=None, repa_weight=REPA_WEIGHT):
    """The training loss: L = MSE(v_pred, v) + freq_weight * L_freq + repa_weight * L_REPA. The paper's (§3.1 Eq. 6,
    Alg. 1 in App. E.1) is L_FM + L_FreqFM + L_REPA with unit weights; the defaults are freq_weight 1 (Tab. 4(e))
    and the official code's repa_weight 0.5.
    x (B, 3, H, W) clean images in [-1, 1], y (B,) class ids. encoder: None (no REPA: the plain objective, repa
    term 0) or a frozen callable mapping images in [0, 1] to features (B, N, REPA_DIM), e.g. load_dinov2's.
    Returns (loss, terms): terms = dict(mse, freq, repa) of detached 0-dim tensors."""
    B = x.shape[0]
    y = torch.where(torch.rand(B, device=y.device) < label_drop, num_classes, y)  # label dropout -> null class
    t = sample_t(B, x.device)                                  # (B,)
    e = torch.randn_like(x)                                    # (B, 3, H, W)
    z = _bcast(t, x) * x + (1 - _bcast(t, x)) * e              # z_t
    v = x - e                                                  # target velocity
    zero = torch.zeros((), device=x.device)
    if encoder is None:
        v_pred, l_repa = model(z, t, y), zero
    else:
        v_pred, h_proj = model(z, t, y, return_repa=True)      # (B, 3, H, W), (B, N, REPA_DIM)
        with torch.no_grad():
            target = encoder((x + 1) / 2)                      # (B, N, REPA_DIM): features of the CLEAN image
        l_repa = repa_loss(h_proj, target)
    l_mse = (v_pred.float() - v).square().mean()               # mean over B, C, H, W
    l_freq = frequency_loss(v_pred, v, quality) if freq_weight else zero
    loss = l_mse + freq_weight * l_freq + repa_weight * l_repa
    return loss, dict(mse=l_mse.detach(), freq=l_freq.detach(), repa=l_repa.detach())


def deco_loss(model, x, y, num_classes, label_drop=0.1, freq_weight=FREQ_WEIGHT, quality=JPEG_QUALITY,
              repa_weight=REPA_WEIGHT, encoder=None):
    """flow_loss under its earlier name and argument order (repa_weight before encoder), for earlier callers."""
    return flow_loss(model, x, y, num_classes, label_drop, freq_weight, quality, encoder, repa_weight)


def repa_loss(h, target):
    """REPA (Yu et al. 2024): mean over tokens and batch of 1 - cos(projected hidden state, frozen encoder feature);
    h, target: (B, L, 768). Zero when every projected token points the same way as its target."""
    return (1 - F.cosine_similarity(h.float(), target.float(), dim=-1)).mean()


# The REPA target: DINOv2 ViT-B/14, frozen (official src/models/encoder.py).
REPA_DIM = 768  # width of DINOv2 ViT-B/14 patch tokens = output width of the projector
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)   # DINOv2's input normalisation


def load_dinov2(device, patch, path=None):
    """The frozen REPA target as a plain callable encode(x01): clean images in [0, 1] (B, 3, H, W) -> DINOv2
    ViT-B/14 x_norm_patchtokens (B, N, 768), as the official wrapper. ImageNet mean/std normalisation, then a
    bicubic resize to 14 * (H / patch), so the ViT-B/14 sees one 14x14 patch per patch of ours (224px at 256px,
    patch 16). Loaded with torch.hub from GitHub (code and weights cached in $TORCH_HOME/hub), or from a local
    clone of facebookresearch/dinov2 (`path`, --dinov2-path; the weights still come from the hub cache). Any
    callable with this contract can stand in for it (the tests use a tiny one).
    DIFF: the official wrapper resizes to int(14 * H / 16) whatever the patch size and truncates the tokens if the
    counts differ; we resize to 14 * H/p: identical at p = 16 (every paper config), token-aligned for our configs
    with other patch sizes.
    DIFF: the official wrapper torch.compiles DINOv2; we run it eagerly (frozen, forward only)."""
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
# ---- 6. Sampler: Euler (Heun optional) on the official grid, CFG on velocity for t > 0.1 ----
# ---------------------------------------------------------------------------------------------------------------
def sampler_defaults(config, img_size):
    """The paper's sampler for ImageNet (App. B.2, Tab. 5; official DeCo_XL*.yaml): Euler, 100 steps, CFG on
    velocity for t in (0.1, 1], scale 3.2 at 256 (320-epoch model; the paper uses 3.0 for 800 epochs) and 5.0 at 512.
    DIFF: the official DeCo_large.yaml samples with Euler-50, CFG 1.0 on [0, 1]: the setting of the paper's
    L/16 tables, Tab. 1 and Tab. 4 (§4.1, App. B.1: FID without guidance at 200k steps). We give DeCo-L/16 the XL
    main-result sampler too, so its grids are guided; for the ablation numbers use `--steps 50 --cfg 1` (sample.py)."""
    return dict(steps=100, cfg=5.0 if img_size >= 512 else 3.2, interval=(0.1, 1.0), solver="euler")


def time_grid(steps):
    """The official sampling grid, in float32 as theirs: linspace(0, 1 - 1/steps, steps), then 1.0 (0, 0.01, ...,
    0.99, 1 for 100 steps): uniform steps of 1/steps. A Python list, so the CFG-interval test is decided on the
    host, never a GPU sync."""
    return torch.cat([torch.linspace(0, 1 - 1 / steps, steps), torch.ones(1)]).tolist()


def in_cfg_interval(t, interval):
    """The official guidance test, in float32 as the official tensor comparison: lo < t <= hi.
    It matters: the 20-, 40- and 250-step grids hold t = float32(0.1) exactly, guided in float64 (0.1f > 0.1) but
    not in float32 (0.1f > 0.1f is False)."""
    t, lo, hi = np.float32(t), np.float32(interval[0]), np.float32(interval[1])
    return bool(lo < t <= hi)


@torch.no_grad()
def velocity(model, z, t, y, cfg, interval):
    """v(z, t) for all B images at time t (a python float), with classifier-free guidance v_u + cfg * (v_c - v_u)
    inside the CFG interval (in_cfg_interval); there cond and uncond run as ONE batched forward of 2B.
    DIFF: the official code always runs both halves and applies a scale of 1 outside the interval; we run only
    the conditional half there: the same result, and with Euler-100 and interval (0.1, 1] 189 instead of 200
    network evaluations per image (11 of the 100 steps are unguided): 5.5% fewer."""
    B = z.shape[0]
    tt = torch.full((B,), t, device=z.device)
    if cfg == 1.0 or not in_cfg_interval(t, interval):
        return model(z, tt, y).float()
    null = torch.full_like(y, model.num_classes)                            # the null class row (CFG)
    v_c, v_u = model(torch.cat([z, z]), torch.cat([tt, tt]), torch.cat([y, null])).float().chunk(2)
    return v_u + cfg * (v_c - v_u)                                          # (B, 3, H, W)


@torch.no_grad()
def sample(model, y, steps=None, cfg=None, interval=None, solver=None, noise=None, generator=None, progress=False):
    """Integrate dz/dt = v from t=0 (noise) to t=1 (data). None arguments take the paper's defaults
    (sampler_defaults; App. B.2, Tab. 5). Returns images (B, 3, H, W) clamped to [-1, 1] (the official sampler
    returns raw values and clamps when converting to uint8: the same PNGs).
    Heun follows the official HeunSampler with its default exact_henu=False: after the first step, the corrector
    evaluation v(z_hat, t_next) is reused as the next step's predictor, so Heun costs `steps` model calls in all:
    one at the start, then one corrector per step but the last, which is Euler."""
    d = sampler_defaults(model.config, model.img_size)
    steps = steps or d["steps"]
    cfg = d["cfg"] if cfg is None else cfg
    cfg = 1.0 if model.num_classes == 1 else cfg               # unconditional data: nothing to guide towards
    interval = interval or d["interval"]
    solver = solver or d["solver"]
    if solver not in ("euler", "heun"):
        raise SystemExit(f"unknown solver {solver!r}: deco.py samples with 'euler' (the paper's) or 'heun'")
    dev = next(model.parameters()).device
    S = model.img_size
    if noise is None:
        noise = torch.randn(len(y), 3, S, S, generator=generator, device=generator.device if generator else dev)
    z = noise.to(dev, torch.float32)                           # (B, C, H, W), integrated in fp32
    y = y.to(dev)
    ts = time_grid(steps)
    v_next = None                                              # Heun: the corrector's velocity, reused next step
    with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
        for i in tqdm(range(steps), desc="sampling", disable=not progress, leave=False):
            t, t_next = ts[i], ts[i + 1]
            dt = t_next - t
            v = velocity(model, z, t, y, cfg, interval) if v_next is None else v_next
            if i == steps - 1:                                 # the last step lands on t = 1: z_1 = z_t + (1-t) v
                z = v_to_x(v, z, torch.full((len(z),), t, device=dev))    # Euler; also Heun's last step (official)
            elif solver == "euler":
                z = z + dt * v
            else:
                z_hat = z + dt * v                             # Heun predictor
                # official: the corrector's CFG follows the interval test at t, not at t_next
                cfg_t = cfg if in_cfg_interval(t, interval) else 1.0
                v_next = velocity(model, z_hat, t_next, y, cfg_t, (-math.inf, math.inf))
                z = z + dt * (v + v_next) / 2                  # Heun corrector; v_next is reused as the next predictor
    return z.clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------------------
# ---- 7. Standard DiT parts (the same text as in pixeldit.py and pixnerd.py; notes where DeCo's code differs) ----
# ---------------------------------------------------------------------------------------------------------------
# DIFF: the official RMSNorm (LlamaRMSNorm) casts the normalised x back to the input dtype, THEN multiplies by the
# fp32 gain (an fp32 result under bf16 autocast); we apply the gain in fp32 and cast once: identical in fp32, one
# bf16 rounding in another place under autocast.
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


# DIFF: the official precompute_freqs_cis_2d builds the angles in float32; we build them in float64 and round the
# tables to float32: the tables differ by float32 rounding (at most 7e-7 for head_dim 64 at 128 to 1024px).
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


def patchify(x, p):                                     # (B, C, H, W) -> (B, N, C*p*p)
    """Channel-major patches, the layout of F.unfold (official code): feature index = c*p*p + i*p + j."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)           # (B, C, h, p, w, p)
    x = x.permute(0, 2, 4, 1, 3, 5)                     # (B, h, w, C, p, p): channel slowest
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(x, p, H, W):                             # (B, N, C*p*p) -> (B, C, H, W), inverse of patchify
    B, N, _ = x.shape
    x = x.reshape(B, H // p, W // p, -1, p, p)          # (B, h, w, C, p, p)
    x = x.permute(0, 3, 1, 4, 2, 5)                     # (B, C, h, p, w, p)
    return x.reshape(B, -1, H, W)


# ---------------------------------------------------------------------------------------------------------------
# ---- 8. Data (ADM center crop, no flip: official PixImageNet; the built-in `shapes` data: this file's Appendix B) -
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
# ---- 9. Training (official lightning_model.py, simple_ema.py; the optimizer of DeCo_*.yaml) ----
# ---------------------------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of the weights, updated in place with one fused _foreach op per step.
    DIFF: the official code uses a fixed decay 0.9999 (the paper's, Tab. 5) from step 0; we use the warmup
    decay_k = min(decay, (1 + k) / (10 + k)) (the num_updates rule of TensorFlow's ExponentialMovingAverage). For
    the paper's 1.6M-step runs this is 0.9999 after ~90k steps, while a fixed 0.9999 would still give the random
    init a weight of 0.9999^10000 = 37% after a user's 10k steps.
    warmup=False: the fixed decay from the first update (to continue an EMA loaded from another run: --init-from,
    as the official 512px run continues its 256px EMA at 0.9999)."""

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
    """The lr of step k: constant, no warmup, no decay (official DeCo_*.yaml and paper Tab. 5, App. B.1: lr 1e-4 at
    batch 256)."""
    return args.lr


def model_kwargs(args):
    """The create_model arguments of this run beyond (config, img_size, num_classes); saved in checkpoints, so
    sample.py rebuilds the same model: the REPA projector exists only with --repa."""
    return dict(repa_dim=REPA_DIM if args.repa else 0)


def build(args, num_classes, device):
    """The plain model, its EMA and the optimizer: what main() trains and bench.py times."""
    raw = create_model(args.config, args.img_size, num_classes, **model_kwargs(args)).to(device)
    ema = EMA(raw, args.ema)
    # Official DeCo_*.yaml: AdamW, lr 1e-4, default betas (0.9, 0.999), no weight decay, no grad clipping
    # (class-conditional runs). fused=True: one kernel for all parameters on CUDA.
    opt = torch.optim.AdamW(raw.parameters(), lr=lr_at(1, args), betas=(0.9, 0.999), weight_decay=0.0,
                            fused=device.type == "cuda")
    return raw, ema, opt


def compile_and_wrap(raw, args, device, ddp=False):
    """What runs the training forward: DDP over GPUs, then torch.compile of the whole model, which fuses the norms,
    modulations, RoPE and activations around the matmuls; it traces as one graph (a test checks)."""
    model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None) if ddp else raw
    return torch.compile(model) if args.compile else model


def train_step(model, ema, opt, x, y, step, args, encoder=None):
    """One optimisation step, exactly what main() runs and bench.py times. x: uint8 (B, 3, H, W) on the device;
    encoder: the frozen REPA target (repa_encoder) or None. Returns the loss terms as 0-dim tensors,
    {"loss", "mse", "freq", "repa"}, without reading them (no host sync)."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, args)
    x = x.float() / 127.5 - 1.0                                           # uint8 [0, 255] -> [-1, 1], on device
    raw, terms = unwrap(model), {}
    opt.zero_grad(set_to_none=True)
    try:
        for xk, yk in micro_batches(model, x, y, args.grad_accum):       # one, unless --grad-accum K
            with torch.autocast(x.device.type, torch.bfloat16, enabled=args.precision == "bf16"):
                # bf16 autocast without a GradScaler (bf16 has fp32's range), as the official code.
                loss, parts = flow_loss(model, xk, yk, raw.num_classes, args.label_drop, args.freq_weight,
                                        args.jpeg_quality, encoder=encoder, repa_weight=args.repa_weight)
            (loss / args.grad_accum).backward()                           # K equal means average to the batch's
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
    CPUs). Plain `python deco.py`: one process on --device."""
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
# ---- 10. Command line and main ----
# ---------------------------------------------------------------------------------------------------------------
# What `--data NAME` means: the training defaults we use for it (any flag overrides them). The paper trains with a
# constant lr 1e-4 at batch 256 (Tab. 5, App. B.1-B.2). A folder that is not one of these names gets FOLDER_DEFAULTS.
# DIFF: for the built-in shapes demo we use lr 2e-4 (small model, 10k steps) so the run moves visibly
# (LAPTOP_PRESET: lr 4e-3 for its 1100 steps); ffhq128 and imagenet keep the paper's 1e-4 (App. B.1).
DATA_PRESETS = {
    "shapes": dict(img_size=64, config="DeCo-S/8", batch_size=128, steps=10_000, lr=2e-4,
                   sample_every=1000, ckpt_every=1000),
    "ffhq128": dict(img_size=128, config="DeCo-L/16", batch_size=128, steps=200_000, lr=1e-4,
                    sample_every=5000, ckpt_every=5000, unconditional=True),  # its 1000-image folders aren't classes
    # the paper's ImageNet-256 run (App. B.2): XL, batch 256, REPA; 320 epochs = 1.6M steps (FID 1.90 with CFG 3.2:
    # §4.2, Tab. 2)
    "imagenet": dict(img_size=256, config="DeCo-XL/16", batch_size=256, steps=1_600_000, lr=1e-4, repa=True,
                     sample_every=10_000, ckpt_every=10_000),
}
# `--data shapes` with no GPU (and no --config / --img-size): DeCo-T at 32px, 1100 steps of 32 images, 4.1 min on our
# 2-core CPU, to a grid whose columns follow their classes (README "No GPU?"). lr 4e-3: ours, for this short run.
# 50-step grids (half the paper's 100, App. B.2). No loader worker: the shapes are drawn in the training process, and
# torch keeps both cores.
LAPTOP_PRESET = dict(img_size=32, config="DeCo-T", batch_size=32, steps=1100, lr=4e-3,
                     sample_every=550, sample_steps=50, ckpt_every=550, log_every=50, num_workers=0)
FOLDER_DEFAULTS = dict(img_size=256, config="DeCo-L/16", batch_size=128, steps=200_000, lr=1e-4,
                       sample_every=5000, ckpt_every=5000)
LABEL_TABLE = "y_embed.weight"  # the class embedding, num_classes + 1 rows (--init-from)
MACHINE = ("out", "resume", "device", "compile", "precision", "num_workers",   # never taken from a checkpoint
           "dinov2_path")
SAME_RUN = ("config", "img_size", "repa")                                     # a resumed run cannot change these


def get_args(argv=None):
    """The run's settings. Each value comes from the command line, else the resumed checkpoint, else the --data
    preset (DATA_PRESETS), else the defaults below: `--resume RUN` alone continues RUN exactly as it was."""
    p = argparse.ArgumentParser(description="Train DeCo (Ma et al., arXiv 2511.19365).", formatter_class=Help)
    g = p.add_argument_group("data and model")
    g.add_argument("--data", default="shapes", help="'shapes' (built in), a folder of images, or NAME for data/NAME")
    g.add_argument("--img-size", type=int, default=64, help="image side in pixels")
    g.add_argument("--config", default="DeCo-S/8", help=f"model config: {', '.join(CONFIGS)}")
    g.add_argument("--unconditional", action=argparse.BooleanOptionalAction, default=False,
                   help="ignore class subfolders, train one class (FFHQ's folders are not classes)")
    g = p.add_argument_group("objective: MSE + freq-weight * L_freq + repa-weight * L_REPA")
    g.add_argument("--freq-weight", type=float, default=FREQ_WEIGHT, help="weight of L_freq (paper Tab. 4(e))")
    g.add_argument("--jpeg-quality", type=int, default=JPEG_QUALITY, help="JPEG quality of the L_freq weights")
    g.add_argument("--repa", action=argparse.BooleanOptionalAction, default=False,
                   help="REPA with frozen DINOv2 ViT-B/14 (paper: on; needs torch.hub or --dinov2-path)")
    g.add_argument("--repa-weight", type=float, default=REPA_WEIGHT,
                   help="weight of the REPA loss (official; the paper's Eq. 6 has 1)")
    g.add_argument("--dinov2-path", help="local clone of facebookresearch/dinov2 for torch.hub (offline REPA)")
    g.add_argument("--label-drop", type=float, help="label dropout for CFG (default: the config's, 0.1; XL 0.2)")
    g = p.add_argument_group("optimisation (official: AdamW, constant lr 1e-4, batch 256)")
    g.add_argument("--lr", type=float, default=2e-4, help="constant learning rate (paper: 1e-4)")
    g.add_argument("--ema", type=float, default=0.9999, help="EMA decay, reached after a warmup")
    g = p.add_argument_group("sample grids")
    g.add_argument("--cfg", type=float,
                   help="CFG scale of the grids, none on one-class data (default: the paper's, 3.2 at 256)")
    g.add_argument("--sample-steps", type=int, help="sampler steps of the grids (default: the paper's, 100 Euler)")
    args = resolve_args(add_run_flags(p), argv)
    if args.label_drop is None:                         # the config's: 0.1, 0.2 for XL (official yamls)
        args.label_drop = CONFIGS[args.config]["label_drop"]
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
        print(f"{args.config} ({sum(p.numel() for p in raw.parameters()) / 1e6:.1f}M params, freq {args.freq_weight} "
              f"q{args.jpeg_quality}, repa {args.repa_weight if args.repa else 'off'}) on {len(dataset)} images, "
              f"{num_classes} classes, {world} x {device.type}, batch {args.batch_size}, lr {args.lr:.1e}, "
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
            if rank == 0 and (step % args.sample_every == 0 or step == args.steps):   # EMA weights, paper's sampler
                draw_grid(ema.model, grid_y, grid_noise, step, args, run, bar)
            if save:
                save_checkpoint(run / "ckpt.pt", args, raw, ema, opt, step, data_state, num_classes, world, rank, keep)
    bar.close()
    return finish(run, log, step, stopping)


# ---------------------------------------------------------------------------------------------------------------
# ---- Appendix A. The authors' weights: from_official ----
# ---------------------------------------------------------------------------------------------------------------
# The official network is class PixNerDiT of src/models/transformer/dit_c2i_DeCo.py (Zehong-Ma/DeCo, commit
# 9e0a349ae4a552c4670edf2c9e779fb8aa864834). Its state_dict holds the same tensors as ours, same shapes and layouts
# (qkv fused as (3, heads, head_dim), SwiGLU w1/w3 separate, class table with the null class as its last row): only
# module names differ, mapped below. It holds no buffers (its RoPE table sits in a dict, the DCT features in an
# lru_cache), so there is no rebuilt buffer to check.
OFFICIAL_NAMES = (  # (regex on the start of an official key, our prefix); the rest of the key (weight, bias) is kept
    (r"s_embedder\.proj\.", "s_embed."),                            # Embed.proj: Linear(C*p*p -> D); its norm: Identity
    (r"t_embedder\.mlp\.", "t_embed.mlp."),                         # the same Sequential(Linear, SiLU, Linear)
    (r"y_embedder\.embedding_table\.", "y_embed."),                 # LabelEmbedder: (num_classes + 1, D)
    (r"blocks\.(\d+)\.adaLN_modulation\.0\.", r"blocks.\1.adaLN."), # Linear(D -> 6D), the same chunk order
    (r"blocks\.(\d+)\.(norm[12]|attn\.(qkv|[qk]_norm|proj)|mlp\.w[123])\.", r"blocks.\1.\2."),  # same names
    (r"x_embedder\.embedder\.0\.", "decoder.x_embed."),             # NerfEmbedder: Linear(C + 64 -> d), RGB first
    (r"dec_net\.(input_proj|cond_embed)\.", r"decoder.\1."),        # SimpleMLPAdaLN: the same two Linears
    (r"dec_net\.res_blocks\.(\d+)\.in_ln\.", r"decoder.blocks.\1.norm."),             # ResBlock: affine LayerNorm
    (r"dec_net\.res_blocks\.(\d+)\.mlp\.", r"decoder.blocks.\1.mlp."),                # Linear, SiLU, Linear
    (r"dec_net\.res_blocks\.(\d+)\.adaLN_modulation\.1\.", r"decoder.blocks.\1.adaLN.1."),  # after its SiLU
    (r"dec_net\.final_layer\.linear\.", "decoder.linear_out."),     # its LayerNorm has no affine: no tensor
    (r"diffusion_trainer\.proj\.0\.([024])\.", r"repa_proj.\1."),   # REPATrainer.proj = Sequential(Sequential(..))
)
NOT_DECO = {"param_generator1": "a PixNerd network (use pixnerd.py)", "model_ema1": "a JiT checkpoint (use jit.py)",
            "text_refine_blocks": "the text-to-image DeCo-XXL (t2i_DeCo.ckpt); deco.py is class-conditional"}


def from_official(obj, ema=True, repa=False):
    """What torch.load returns for an official DeCo file -> our state dict, for create_model(config, img_size,
    num_classes) and load_state_dict(strict=True); with repa=True for create_model(..., repa_dim=REPA_DIM).
    Accepts (official commit 9e0a349):
      - the Lightning checkpoint main.py writes, and the released imagenet256_epoch{320,600,800}.ckpt and
        imagenet512_epoch340.ckpt (DeCo-XL/16, 1000 classes; run by `main.py predict --ckpt_path`): {"state_dict":
        ..., "optimizer_states", "epoch", ...}, its state_dict from LightningModel.state_dict (src/lightning_model.py):
        "denoiser." raw net, "ema_denoiser." EMA net, "diffusion_trainer.proj." the REPA projector (all that
        REPATrainer.state_dict saves of the trainer); also that state_dict alone;
      - PixNerDiT.state_dict() (keys without prefix; `ema` does not apply).
    ema=True takes ema_denoiser (the net the official predict_step samples with), ema=False denoiser. repa=True
    keeps the projector (to fine-tune with --repa); everything else (optimizer, loops, the other net) is dropped."""
    if not isinstance(obj, dict):
        raise SystemExit(f"not an official DeCo checkpoint: torch.load gave a {type(obj).__name__}, not a dict; "
                         "pass a Zehong-Ma/DeCo .ckpt (e.g. imagenet256_epoch800.ckpt)")
    if "script" in obj:                                   # our save_checkpoint names the script that wrote it
        raise SystemExit(f"a checkpoint of our {obj['script']}.py, not an official DeCo file: pass it to --resume, "
                         "--init-from or sample.py as it is")
    sd = obj.get("state_dict", obj)                       # Lightning: the weights; epoch, optimizer_states dropped
    net = dict(sd)                                        # PixNerDiT.state_dict(): the keys as they are
    if any(k.startswith(("denoiser.", "ema_denoiser.")) for k in sd):   # LightningModel.state_dict()
        which = "ema_denoiser." if ema else "denoiser."
        net = {k[len(which):]: v for k, v in sd.items() if k.startswith(which)}
        if not net:
            raise SystemExit(f"this checkpoint has no {which}* weights; pass ema={not ema}")
        if repa:                                          # the trainer's projector keeps its full key
            net.update({k: v for k, v in sd.items() if k.startswith("diffusion_trainer.proj.")})
    if repa and not any(k.startswith("diffusion_trainer.proj.") for k in net):
        raise SystemExit("repa=True, but this file holds no REPA projector (diffusion_trainer.proj.*); "
                         "pass repa=False (the projector starts fresh)")
    out = {}
    for k, v in net.items():
        for pattern, ours in OFFICIAL_NAMES:
            if m := re.match(pattern, str(k)):
                out[m.expand(ours) + k[m.end():]] = v     # e.g. blocks.3.adaLN_modulation.0.bias -> blocks.3.adaLN.bias
                break
        else:
            what = next((w for mark, w in NOT_DECO.items() if any(mark in str(j) for j in sd)), "")
            raise SystemExit(f"{k!r} is not a key of the official DeCo network (dit_c2i_DeCo.py PixNerDiT)"
                             f"{': this looks like ' + what if what else ''}; pass a Zehong-Ma/DeCo class-to-image "
                             ".ckpt or a PixNerDiT state_dict")
    return out


# ---------------------------------------------------------------------------------------------------------------
# ---- Appendix B. Built-in data: `--data shapes` ----
# ---------------------------------------------------------------------------------------------------------------
class Shapes(torch.utils.data.Dataset):
    """Built-in labelled data, so `python deco.py` runs with no download: one bright shape (the class) of random
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
