"""
PixNerd: "PixNerd: Pixel Neural Field Diffusion" (Shuai Wang, Ziteng Gao, Chenhui Zhu, Weilin Huang, Limin Wang,
arXiv 2507.23268). Official code: MCG-NJU/PixNerd (Lightning + YAML). Section, equation, table and figure
numbers below refer to arXiv 2507.23268v2; figure numbers are the PDF's (the arXiv HTML leaves the PDF's Fig. 1,
the title-page figure, uncaptioned, so its first figures are numbered one lower).

A single-scale, single-stage pixel-space DiT on big 16x16 patches (256 tokens at 256px, as many as a latent
DiT-XL/2). A linear head cannot paint the 768 values of such a patch well, so PixNerd replaces DiT's final linear
layer by a per-patch NEURAL FIELD (§3.2, Eqs. 9-11; Fig. 1, right): the transformer's last hidden state of each
patch is turned into the weights of a small MLP, which maps (noisy pixel RGB, DCT encoding of the pixel's position in
the patch) -> that pixel's velocity. The rest is a modern DiT (RMSNorm, SwiGLU, 2D RoPE: §4 "Training Details" and
§4.1; qk-norm: official code, not in the paper), flow matching (§3.1), optional REPA to DINOv2 (§4).
Start reading at `NeuralField`.

Time: z_t = t*x + (1-t)*e, t=0 noise e, t=1 data x (all our scripts); the network predicts v = dz/dt = x - e.
Shapes: B batch, C=3 channels, H=W image size, p patch, h=w=H/p patch grid, N=h*w tokens (patches), D width,
        P=p*p pixels per patch, F field width (64), M field MLP hidden (128), E=768 DINOv2 feature width.

    python pixnerd.py                                    # built-in "shapes" data: PixNerd-S/8 (no GPU: PixNerd-T)
    python pixnerd.py --data ffhq128                     # FFHQ 128x128 (see README for the download)
    torchrun --nproc_per_node=8 pixnerd.py --data imagenet --config PixNerd-L/16     # ImageNet-256 (§4.4, Tab. 2)
    python pixnerd.py --data imagenet --dinov2-path ~/dinov2   # REPA (on for imagenet) from a local dinov2 clone
    python sample.py runs/pixnerd-shapes --grid grid.png # sample a checkpoint (sample.py)

Differences from the official code: grep "DIFF:".
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

SCRIPT = "pixnerd"  # written into every checkpoint; sample.py dispatches on it

# ---------------------------------------------------------------------------------------------------------------
# ---- 1. Configs (model names: Tab. 2, §4.2; official configs_c2i/pix256std1_repa_pixnerd_{large,xl}.yaml) ----
# ---------------------------------------------------------------------------------------------------------------
# depth: transformer blocks ("num_cond_blocks"), width/heads: their size, patch: the patch side p (L/16: 22 blocks
# of width 1024, §4.2). nerf_depth: neural-field blocks ("num_blocks - num_cond_blocks"; 2 for L/16, §4.2, Fig. 7c),
# nerf_width: field width F ("hidden_size_x"; 64, §4.2, Fig. 7b), nerf_hidden: hidden width M of each field MLP
# (F * "nerf_mlpratio" = 64 * 2; not in the paper). repa_layer: the transformer block whose output REPA aligns to
# DINOv2 ("align_layer", counted from 1; "the 8th layer", §4 "Training Details").
CONFIGS = {
    "PixNerd-L/16": dict(depth=22, width=1024, heads=16, patch=16, nerf_depth=2, nerf_width=64, nerf_hidden=128,
                         repa_layer=8),   # 452.1M params (paper Tab. 2: 458M)
    "PixNerd-XL/16": dict(depth=26, width=1152, heads=16, patch=16, nerf_depth=4, nerf_width=64, nerf_hidden=128,
                          repa_layer=8),  # 700.6M params (Tab. 2, Tab. 3, official README: 700M)
    # Not in the paper: a DiT-B-sized PixNerd, our FFHQ-128 default (64 tokens at 128px); 154.1M params with 1
    # class, 25M of them in the two field weight generators Linear(768 -> 16384).
    "PixNerd-B/16": dict(depth=12, width=768, heads=12, patch=16, nerf_depth=2, nerf_width=64, nerf_hidden=128,
                         repa_layer=4),
    # Not in the paper: a DiT-S-sized PixNerd with 8x8 patches, our default for the built-in shapes data at 64px
    # (64 tokens, a 64-pixel field per patch); 44.8M params with 8 classes, 12.6M of them in the two field
    # weight generators Linear(384 -> 16384).
    "PixNerd-S/8": dict(depth=12, width=384, heads=6, patch=8, nerf_depth=2, nerf_width=64, nerf_hidden=128,
                        repa_layer=4),
    # Not in the paper: the laptop preset's model (LAPTOP_PRESET: 32px shapes in minutes on a CPU); 8x8 patches.
    "PixNerd-T": dict(depth=6, width=192, heads=4, patch=8, nerf_depth=2, nerf_width=16, nerf_hidden=32, repa_layer=2),
    # For the tests only: one forward+backward at 32px in milliseconds on a CPU.
    "tiny": dict(depth=2, width=64, heads=2, patch=8, nerf_depth=2, nerf_width=16, nerf_hidden=32, repa_layer=1),
}
REPA_DIM = 768  # width E of the DINOv2 ViT-B/14 patch tokens that REPA aligns to (official proj_encoder_dim)

# ---------------------------------------------------------------------------------------------------------------
# ---- 2. The neural field head: the paper's idea (§3.2, Eqs. 9-11; Fig. 1, right, "PixNerd architecture": "replacing
# ----    the final linear projection with a neural field"; official NerfEmbedder, NerfBlock, NerfFinalLayer) ----
# ---------------------------------------------------------------------------------------------------------------
# A neural field is a function of a coordinate: here, inside each p x p patch, an MLP maps a pixel's position
# (and its noisy value) to that pixel's velocity (§3.1 "Neural Field", Eq. 8). Its weights are not learned directly:
# they are PREDICTED per patch from the transformer's hidden state of that patch (Eq. 9), so every patch gets its own
# little MLP. Step by step, for one patch with condition vector s (D,) and its P = p*p noisy pixels:
#   1. coordinates:  each pixel (i, j) gets 64 DCT-basis features cos(pi*x*fx) * cos(pi*y*fy) / (1 + fx*fy)
#                    (dct_features; the paper's DCT-PE, Eq. 12, better than sine/cosine in Fig. 7d); concatenated
#                    with its 3 noisy RGB values (Eq. 10) and embedded by a Linear(67 -> F).
#   2. weights:      per field block, a Linear(D -> 2*F*M) turns s into W1 (F x M) and W2 (M x F) (Eq. 9). Both
#                    are L2-normalised over their INPUT dimension (each output unit's weight vector has norm 1:
#                    the paper's "row-wise normalization", §3.2, Eq. 10; ablated in §4.2, Fig. 7a), which keeps
#                    the predicted MLP well-scaled whatever the magnitude of s.
#   3. the MLP:      h = h + silu(RMSNorm(h) @ W1) @ W2 (a pre-norm residual MLP, no biases), once per field block
#                    (the paper's Linear-SiLU-Linear MLP, §3.1 "Neural Field", Eqs. 8, 10; RMSNorm, residual:
#                    official).
#   4. output:       RMSNorm(F) -> Linear(F -> 3), zero-initialised, gives the pixel's velocity (Eq. 11).
# All B*N patches run at once: the per-patch matrix products are torch.bmm over a batch of B*N patches. For the
# paper's configs (F=64: §4.2, Fig. 7b; M=128: official, not in the paper) each patch's predicted MLP has
# 2*64*128 = 16,384 weights, for 768 pixel values.
NERF_FREQS = 8      # DCT frequencies per axis (official max_freqs): 8 x 8 = 64 features. Eq. 12's K is also
#                     §3.2's pixel-coordinate range i, j in (0, K), which would make it the patch side, 16.


class NeuralField(nn.Module):
    """The head that replaces DiT's final linear layer: noisy patch pixels + per-patch condition s -> velocity."""

    def __init__(self, dim, patch, width, hidden, depth):
        super().__init__()
        self.register_buffer("dct", dct_features(patch), persistent=False)    # (P, 64)
        self.embed = nn.Linear(3 + NERF_FREQS ** 2, width)                     # step 1: [RGB, DCT] -> F
        self.blocks = nn.ModuleList([NerfBlock(dim, width, hidden) for _ in range(depth)])   # steps 2 and 3
        self.norm = RMSNorm(width)
        self.linear = nn.Linear(width, 3)                                      # step 4 (zero-init in the model)

    def forward(self, pixels, s):                            # pixels: (B*N, P, 3), s: (B*N, D)
        dct = self.dct.to(pixels.dtype).expand(pixels.shape[0], -1, -1)     # (B*N, P, 64): same for every patch
        h = self.embed(torch.cat([pixels, dct], dim=-1))     # (B*N, P, 67) -> (B*N, P, F)
        for block in self.blocks:
            h = block(h, s)                                  # (B*N, P, F)
        return self.linear(self.norm(h))                     # (B*N, P, 3)


class NerfBlock(nn.Module):
    """One residual MLP layer of the per-patch neural field, with weights predicted from s (steps 2 and 3)."""

    def __init__(self, dim, width, hidden):
        super().__init__()
        self.width, self.hidden = width, hidden
        self.param_generator = nn.Linear(dim, 2 * width * hidden)    # s -> [W1 | W2], with bias (official)
        self.norm = RMSNorm(width)

    def weights(self, s):                                            # s: (B*N, D)
        """The predicted field weights of every patch: W1 (B*N, F, M) and W2 (B*N, M, F), each column (one
        output unit) of unit L2 norm over the input dimension, dim=-2 (official F.normalize(dim=-2))."""
        w1, w2 = self.param_generator(s).chunk(2, dim=-1)            # (B*N, F*M) each
        w1 = F.normalize(w1.view(-1, self.width, self.hidden), dim=-2)   # (B*N, F, M): unit norm over F
        w2 = F.normalize(w2.view(-1, self.hidden, self.width), dim=-2)   # (B*N, M, F): unit norm over M
        return w1, w2

    def forward(self, h, s):                                         # h: (B*N, P, F), s: (B*N, D)
        w1, w2 = self.weights(s)
        return h + torch.bmm(F.silu(torch.bmm(self.norm(h), w1)), w2)    # (B*N, P, M) -> (B*N, P, F)


def dct_features(p, num_freqs=NERF_FREQS):
    """DCT-basis coordinate encoding of the p x p pixels of a patch, (p*p, num_freqs^2) (official fetch_pos; Eq. 12).
    Pixel k = i*p + j (row i, column j) sits at x = j/(p-1), y = i/(p-1) in [0, 1]. Feature a*num_freqs + b is
    cos(pi * x * f_a) * cos(pi * y * f_b) / (1 + f_a * f_b) with f = linspace(0, 8, 8): note the frequencies
    are NOT the integers 0..7 of a true DCT (0, 8/7, 16/7, ..., 8, as the official code), and the 1/(1 + fx*fy)
    weight damps the high frequencies (neither is in the paper's Eq. 12)."""
    pos = torch.linspace(0, 1, p, dtype=torch.float64)                                  # (p,)
    y, x = torch.meshgrid(pos, pos, indexing="ij")                                      # (p, p): row, column
    x, y = x.reshape(-1, 1, 1), y.reshape(-1, 1, 1)                                     # (P, 1, 1)
    f = torch.linspace(0, num_freqs, num_freqs, dtype=torch.float64)                    # (8,)
    fx, fy = f.view(1, -1, 1), f.view(1, 1, -1)                                         # (1, 8, 1), (1, 1, 8)
    basis = torch.cos(math.pi * x * fx) * torch.cos(math.pi * y * fy) / (1 + fx * fy)   # (P, 8, 8): fx outer
    return basis.reshape(p * p, num_freqs * num_freqs).float()                          # (P, 64)


# ---------------------------------------------------------------------------------------------------------------
# ---- 3. The model: a DiT whose head is the neural field (Fig. 1, right; DiT: §3.1 Eqs. 5-6; official PixNerDiT) ----
# ---------------------------------------------------------------------------------------------------------------


class PixNerd(nn.Module):
    """z (B,3,H,W), t (B,), y (B,) -> the predicted velocity v = x - e (B,3,H,W).
    repa_dim > 0 adds the REPA projector (training with REPA: repa_dim = REPA_DIM); with return_repa=True the
    forward then also returns the projected hidden state of block repa_layer, (B, N, repa_dim)."""

    def __init__(self, config, img_size, num_classes, depth, width, heads, patch, nerf_depth, nerf_width,
                 nerf_hidden, repa_layer, repa_dim=0):
        super().__init__()
        if img_size % patch:
            raise SystemExit(f"--img-size {img_size} is not a multiple of the patch size {patch}.")
        if width % heads or (width // heads) % 4:
            raise SystemExit(f"config {config}: width {width} / heads {heads} must give a head_dim divisible by 4.")
        self.config, self.img_size, self.num_classes = config, img_size, num_classes
        self.patch, self.repa_layer, self.repa_dim = patch, repa_layer, repa_dim
        h = img_size // patch                                              # patch grid side
        self.s_embedder = nn.Linear(3 * patch * patch, width)              # patch embed: no norm, no pos-embed
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = nn.Embedding(num_classes + 1, width)             # row num_classes = null label (CFG)
        cos, sin = rope_2d(width // heads, h)
        self.register_buffer("rope_cos", cos, persistent=False)            # (N, head_dim)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.blocks = nn.ModuleList([TransformerBlock(width, heads) for _ in range(depth)])
        self.field = NeuralField(width, patch, nerf_width, nerf_hidden, nerf_depth)
        # REPA projector (official REPATrainer.proj): Linear(D,D), SiLU, Linear(D,D), SiLU, Linear(D,E).
        # DIFF: the official code keeps it in the trainer; we make it a submodule of the model when training with
        # REPA, so one optimizer, one state dict and DDP cover it. It is also EMA-averaged (unused, harmless) and
        # never called at sampling time; with repa_dim=0 it does not exist (param counts without it, as in Tab. 2).
        self.repa_proj = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                       nn.Linear(width, repa_dim)) if repa_dim else None
        self.initialize_weights()

    def initialize_weights(self):
        # Official initialize_weights: only these are re-initialised; every other layer (attention, SwiGLU,
        # adaLN, field weight generators, pixel embed, REPA projector) keeps PyTorch's default init.
        nn.init.xavier_uniform_(self.s_embedder.weight)                    # patch embed as a Linear (DiT)
        nn.init.zeros_(self.s_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.zeros_(self.field.linear.weight)                           # the model outputs exactly 0 at init
        nn.init.zeros_(self.field.linear.bias)

    def forward(self, z, t, y, return_repa=False):
        B = z.shape[0]
        zp = patchify(z, self.patch)                             # (B, N, 3*P): noisy patches, channel-major
        t_emb = self.t_embedder(t)                               # (B, D)
        c = F.silu(t_emb + self.y_embedder(y))                   # (B, D): the adaLN condition
        s = self.s_embedder(zp)                                  # (B, N, D): the transformer's token stream
        repa = None
        for i, block in enumerate(self.blocks):
            s = block(s, c, self.rope_cos, self.rope_sin)        # (B, N, D)
            if return_repa and i + 1 == self.repa_layer:         # official: a hook on blocks[align_layer - 1]
                repa = self.repa_proj(s)                         # (B, N, E)
        # The field's condition: the last hidden state plus the t embedding (NOT the class: y reaches the field
        # only through the transformer), through a SiLU. No final norm (official).
        s = F.silu(t_emb.unsqueeze(1) + s)                       # (B, N, D)
        N, P = s.shape[1], self.patch ** 2
        pixels = zp.reshape(B * N, 3, P).transpose(1, 2)         # (B*N, P, 3): one row per pixel, RGB
        v = self.field(pixels, s.reshape(B * N, -1))             # (B*N, P, 3)
        v = v.transpose(1, 2).reshape(B, N, 3 * P)               # (B, N, 3*P), channel-major again
        v = unpatchify(v, self.patch)                            # (B, 3, H, W)
        return (v, repa) if return_repa else v


def create_model(config, img_size, num_classes, repa_dim=0, **overrides):
    """The PixNerd of CONFIGS[config]; repa_dim=REPA_DIM adds the REPA projector (training with --repa).
    `overrides` replace config entries (e.g. depth=2 in the tests)."""
    if "repa" in overrides:  # checkpoints written before repa_dim stored model_kwargs {"repa": True/False}
        repa_dim = REPA_DIM if overrides.pop("repa") else 0
    if config not in CONFIGS:
        raise SystemExit(f"unknown --config {config!r}; choose one of: {', '.join(CONFIGS)}")
    return PixNerd(config, img_size, num_classes, repa_dim=repa_dim, **dict(CONFIGS[config], **overrides))


# ---------------------------------------------------------------------------------------------------------------
# ---- 4. Flow matching (§3.1) and REPA (§4; official src/diffusion/flow_matching/training_repa.py, REPATrainer) ----
# ---------------------------------------------------------------------------------------------------------------
# z = t*x + (1-t)*e and the network predicts v = dz/dt = x - e directly (§3.1 "Rectified Flow Model"; official
# LinearScheduler: alpha=t, sigma=1-t, dalpha=1, dsigma=-1); the loss is the plain MSE to v, plus REPA_WEIGHT * the
# REPA cosine loss.
# From (z, t) and v the clean image is x = z + (1-t)*v (v_to_x: the sampler's last step, which lands on t=1).
T_EPS = 0.05                # x_to_v's clamp of 1 - t (as JiT's t_eps): finite at t = 1
LABEL_DROP = 0.1            # probability of replacing the label by the null class (official null_condition_p)
REPA_WEIGHT = 0.5           # weight of the REPA cosine loss (§4 "Training Details": 0.5; official feat_loss_weight)


def sample_t(n, device):
    """Logit-normal t = sigmoid(N(0, 1)) (the paper's "lognorm sampling", §4 "Training Details", §4.1; official
    lognorm_t=True, no time shift at 256px), in fp32."""
    return torch.sigmoid(torch.randn(n, device=device, dtype=torch.float32))


def v_to_x(v, z, t):
    """x = z + (1-t) * v: exact on the straight path z_t = t*x + (1-t)*e, no clamp needed."""
    return z + (1 - _bcast(t, z)) * v


def x_to_v(x_pred, z, t):
    """v = (x - z) / max(1-t, T_EPS): the inverse of v_to_x away from t=1, finite at t=1 (weight capped at 20).
    Our loss and sampler predict v and never need this direction: it is here for converting an x-prediction."""
    return (x_pred - z) / (1 - _bcast(t, z)).clamp_min(T_EPS)


def flow_loss(model, x, y, num_classes, encoder=None, repa_weight=REPA_WEIGHT):
    """Training loss: x (B,3,H,W) in [-1,1], y (B,) class ids. Returns (loss, terms), terms = {"mse", "repa"}
    as detached 0-dim tensors (no host sync).
    MSE between the predicted and the true velocity v = x - e (mean over C, H, W and the batch), plus, when an
    `encoder` is given (REPA), repa_weight * (1 - cos) between the projected hidden state of block repa_layer (8 in
    the paper's configs) and the encoder's patch features of the CLEAN image x. `encoder`: a frozen callable, [0, 1]
    images -> (B, N, E) (load_dinov2).
    With encoder=None this is the plain objective (repa term 0)."""
    B = x.shape[0]
    t = sample_t(B, x.device)                                           # (B,), fp32 (an official pitfall: bf16)
    e = torch.randn_like(x)                                             # (B, 3, H, W), fp32
    z = _bcast(t, x) * x + (1 - _bcast(t, x)) * e                       # noisy image z_t
    v = x - e                                                           # target velocity dz/dt
    y = torch.where(torch.rand(B, device=y.device) < LABEL_DROP, num_classes, y)   # label dropout -> null class
    if encoder is None:
        mse, repa = (model(z, t, y).float() - v).pow(2).mean(), torch.zeros((), device=x.device)
    else:
        v_pred, h = model(z, t, y, return_repa=True)                    # (B, 3, H, W), (B, N, E)
        with torch.no_grad():
            target = encoder((x + 1) / 2)                               # (B, N, E): [0, 1] input, no grad
        mse, repa = (v_pred.float() - v).pow(2).mean(), repa_loss(h, target)
    return mse + repa_weight * repa, dict(mse=mse.detach(), repa=repa.detach())


def repa_loss(h, target):
    """REPA (Yu et al. 2024): mean over tokens and batch of 1 - cos(projected hidden state, frozen encoder feature);
    h, target: (B, L, 768). Zero when every projected token points the same way as its target."""
    return (1 - F.cosine_similarity(h.float(), target.float(), dim=-1)).mean()


# ---- REPA's frozen target: DINOv2 ViT-B/14 (§4 "Training Details": DINOv2-Base; official src/models/encoder.py) ----
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)   # DINOv2's input normalisation
def load_dinov2(device, patch, path=None):
    """The frozen REPA target as a plain callable encode(x01): clean images in [0, 1] (B, 3, H, W) -> DINOv2
    ViT-B/14 x_norm_patchtokens (B, N, 768), as the official wrapper. ImageNet mean/std normalisation, then a
    bicubic resize to 14 * (H / patch), so the ViT-B/14 sees one 14x14 patch per patch of ours (224px at 256px,
    patch 16). Loaded with torch.hub from GitHub (code and weights cached in $TORCH_HOME/hub), or from a local
    clone of facebookresearch/dinov2 (`path`, --dinov2-path; the weights still come from the hub cache). Any
    callable with this contract can stand in for it (the tests use a tiny one).
    DIFF: the official wrapper (encoder.py) resizes to 14 * H/16 whatever the patch size, and REPATrainer
    (training_repa.py) truncates the projected tokens to DINOv2's count if they differ; we resize to 14 * H/p:
    identical at p = 16 (every paper config), token-aligned for our configs with other patch sizes.
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
# ---- 5. Sampler (official src/diffusion/flow_matching/sampling.py, EulerSampler; config diffusion_sampler) ----
# ---------------------------------------------------------------------------------------------------------------


def sampler_defaults(config, img_size):
    """The official configs' sampler for every config and size (pix256std1_repa_pixnerd_{large,xl}.yaml: Euler,
    num_steps 100; the paper reports Euler-100 for XL/16, Tab. 2-3, and Euler-50 for L/16, Tab. 2), CFG 3.5 on
    the velocity for 0.1 < t < 1 (§4.3, Fig. 7e; Tab. 2 and Tab. 3 captions; official guidance_interval_min/max),
    no time shift. At 512px the paper's own text differs: §4.4 gives the interval [0.3, 1.0], Tab. 3's caption
    [0.1, 1], which we use."""
    return dict(steps=100, cfg=3.5, interval=(0.1, 1.0), solver="euler")


def time_grid(steps):
    """The official sampling grid, in float32 as theirs: linspace(0, 1 - 1/steps, steps), then 1.0 (0, 0.01, ...,
    0.99, 1 for 100 steps): uniform steps of 1/steps. A Python list, so the CFG-interval test is decided on the
    host, never a GPU sync."""
    return torch.cat([torch.linspace(0, 1 - 1 / steps, steps), torch.ones(1)]).tolist()


def in_cfg_interval(t, interval):
    """The official guidance test, in float32 as the official tensor comparison: lo < t < hi."""
    t, lo, hi = np.float32(t), np.float32(interval[0]), np.float32(interval[1])
    return bool(lo < t < hi)            # strict at both ends (deco.py: lo < t <= hi, jit.py: lo = 0 guides t = 0)


@torch.no_grad()
def velocity(model, z, t, y, cfg, interval):
    """v(z, t) for all B images at time t (a python float), with classifier-free guidance v_u + cfg * (v_c - v_u)
    inside the CFG interval (in_cfg_interval); there cond and uncond run as ONE batched forward of 2B.
    DIFF: the official sampler always runs both halves and uses a scale of 1 outside the interval; we skip the
    unconditional half there: the same result, and with Euler-100 and interval (0.1, 1) 189 instead of 200
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
    """Integrate dz/dt = v from t=0 (noise) to t=1 (data) on time_grid(steps): Euler (the paper's, Tab. 2-3; solvers
    compared in Fig. 7f) or Heun (2nd order; its last step is Euler, as the official HeunSampler). None arguments
    take the paper's defaults (sampler_defaults); `noise` (B,3,H,W) overrides the starting noise.
    Returns images (B, 3, H, W) clamped to [-1, 1] (the official sampler returns raw values and clamps when
    converting to uint8: the same PNGs).
    DIFF: the official HeunSampler (unused in their configs) by default reuses the corrector's velocity as the
    next step's predictor and guides at every t; our Heun is the textbook one (2 evaluations per step) with the
    same CFG interval as Euler."""
    d = sampler_defaults(model.config, model.img_size)
    steps = steps or d["steps"]
    cfg = d["cfg"] if cfg is None else cfg
    cfg = 1.0 if model.num_classes == 1 else cfg           # unconditional data: nothing to guide towards
    interval = interval or d["interval"]
    solver = solver or d["solver"]
    if solver not in ("euler", "heun"):
        raise SystemExit(f"unknown solver {solver!r}: pixnerd.py samples with 'euler' (the paper's) or 'heun'")
    dev = next(model.parameters()).device
    y = y.to(dev)
    B, H = y.shape[0], model.img_size
    if noise is None:
        noise = torch.randn(B, 3, H, H, generator=generator, device=generator.device if generator else dev)
    z = noise.to(dev, torch.float32)                          # z_0 = e ~ N(0, I), (B, 3, H, W)
    ts = time_grid(steps)
    with torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
        for i in tqdm(range(steps), desc="sampling", disable=not progress, leave=False):
            t, t_next = ts[i], ts[i + 1]
            v = velocity(model, z, t, y, cfg, interval)       # (B, 3, H, W), fp32
            if i == steps - 1:                                 # the last step lands on t=1: z_1 = z_t + (1-t) v
                z = v_to_x(v, z, torch.full((B,), t, device=dev))   # (Euler, for both solvers)
            elif solver == "heun":
                v_next = velocity(model, z + (t_next - t) * v, t_next, y, cfg, interval)
                z = z + (t_next - t) * 0.5 * (v + v_next)
            else:
                z = z + (t_next - t) * v
    return z.clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------------------
# ---- 6. Standard DiT parts (a DiT with LLaMA-style parts; official src/models/transformer/pixnerd_c2i.py) ----
# ---------------------------------------------------------------------------------------------------------------
# The same text in pixeldit.py, pixnerd.py and deco.py (RMSNorm, modulate, TimestepEmbedder, rope_2d, apply_rope,
# Attention, SwiGLU, _bcast); a DIFF note marks where an official code differs.


class RMSNorm(nn.Module):
    """RMSNorm with a learnable gain (eps 1e-6), computed in fp32 whatever the autocast dtype; returns the input
    dtype.
    DIFF: the official RMSNorm multiplies its fp32 gain into the result after casting back, so under bf16 autocast
    it returns fp32 (and the adaLN modulation then runs in fp32); we return the input dtype, so it runs in bf16:
    a rounding-level difference."""

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

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Old pixnerd.py checkpoints fused w1 and w3 into one Linear "w13" (D -> 2*hidden, rows [w1; w3]): split it
        # back into the official keys, so those checkpoints still load (and give the same outputs; tested).
        w13 = state_dict.pop(prefix + "w13.weight", None)
        if w13 is not None:
            state_dict[prefix + "w1.weight"], state_dict[prefix + "w3.weight"] = w13.chunk(2, dim=0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _bcast(t, z):           # (B,) -> (B, 1, ..., 1) with as many dims as z: (B, 1, 1, 1) for images
    return t.view(-1, *[1] * (z.dim() - 1))


class TransformerBlock(nn.Module):
    """Pre-RMSNorm block with adaLN (DiT): c -> (shift, scale, gate) for attention and for the MLP, gated
    residuals. c = silu(t_emb + y_emb) already carries the SiLU, so adaLN is a bare Linear(D -> 6D); it keeps
    PyTorch's default init (NOT zero as DiT's adaLN-Zero): the official code never re-initialises it."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = RMSNorm(dim)
        self.mlp = SwiGLU(dim)
        self.adaLN_modulation = nn.Linear(dim, 6 * dim)

    def forward(self, x, c, cos, sin):                      # x: (B, N, D), c: (B, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), cos, sin)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x                                            # (B, N, D)


def patchify(x, p):                                         # (B, C, H, W) -> (B, N, C*p*p)
    """CHANNEL-MAJOR patches, the layout of F.unfold that the official code uses: value index c*p*p + i*p + j
    (all of the red channel, then green, then blue). Token n = row * w + col."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)               # (B, C, h, p, w, p)
    x = x.permute(0, 2, 4, 1, 3, 5)                         # (B, h, w, C, p, p): pixel column fastest
    return x.reshape(B, (H // p) * (W // p), C * p * p)


def unpatchify(x, p):                                       # (B, N, C*p*p) -> (B, C, H, W), inverse of patchify
    B, N, _ = x.shape
    h = math.isqrt(N)
    x = x.reshape(B, h, h, -1, p, p)                        # (B, h, w, C, p, p)
    x = x.permute(0, 3, 1, 4, 2, 5)                         # (B, C, h, p, w, p)
    return x.reshape(B, -1, h * p, h * p)                   # (B, C, H, W)


# ---------------------------------------------------------------------------------------------------------------
# ---- 7. Data (ADM center crop, no flip: official src/data/dataset/imagenet.py, PixImageNet; `shapes`: appendix) ----
# ---------------------------------------------------------------------------------------------------------------
# The standard parts: data, training, checkpoints, command line. A helper here has the same code in every
# script that has it (test_all.py's SHARED lists them), except this paper's recipe: lr_at, model_kwargs, build,
# train_step, split_w13_adam_state, the presets, get_args and main.
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
# ---- 8. Training (official src/lightning_model.py, src/callbacks/simple_ema.py; the configs' optimizer) ----
# ---------------------------------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of the weights, updated in place with one fused _foreach op per step.
    DIFF: the official SimpleEMA uses a fixed decay 0.9999 (paper §4.4: "EMA with 0.9999") from step 0; we use the
    warmup decay_k = min(decay, (1 + k) / (10 + k)) (the num_updates rule of TensorFlow's ExponentialMovingAverage).
    For the official 800k-step runs this is 0.9999 after ~90k steps, while a fixed 0.9999 would still give the
    random init a weight of 0.9999^10000 = 37% after a user's 10k steps.
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
    """The lr of step k: constant (official: AdamW at lr 1e-4, no schedule, no warmup; paper §4.4: no warm-up, no lr
    given)."""
    return args.lr


def model_kwargs(args):
    """The create_model arguments of this run beyond (config, img_size, num_classes); saved in checkpoints, so
    sample.py rebuilds the same model."""
    return dict(repa_dim=REPA_DIM if args.repa else 0)     # the REPA projector exists only under --repa


def build(args, num_classes, device):
    """The plain model (with the REPA projector under --repa), its EMA and the optimizer: what main() trains and
    bench.py times. The frozen REPA encoder is not part of it: main() loads it (repa_encoder) for train_step."""
    raw = create_model(args.config, args.img_size, num_classes, **model_kwargs(args)).to(device)
    ema = EMA(raw, args.ema)
    # Official: AdamW, lr 1e-4, weight decay 0, PyTorch's default betas (0.9, 0.999), no grad clipping (§4.4).
    # fused=True: one kernel for all parameters on CUDA.
    opt = torch.optim.AdamW(raw.parameters(), lr=lr_at(1, args), weight_decay=0.0, fused=device.type == "cuda")
    opt.register_load_state_dict_pre_hook(lambda opt, state_dict: split_w13_adam_state(state_dict, raw))
    return raw, ema, opt


def split_w13_adam_state(state_dict, model):
    """The optimizer state of a run saved while SwiGLU fused w1 and w3 into one "w13" (see SwiGLU's
    _load_from_state_dict): each w13 moment (2*hidden, D) is split into w1's and w3's, so --resume continues such a
    run. A state dict of today's layout is returned as it is."""
    names = [name for name, _ in model.named_parameters()]
    old = [n.replace("w1.weight", "w13.weight") for n in names if not n.endswith("mlp.w3.weight")]
    (group,) = state_dict["param_groups"]                   # build() makes one group
    if len(old) == len(names) or len(group["params"]) != len(old):
        return state_dict
    index, state = {name: i for i, name in enumerate(names)}, {}
    for name, i in zip(old, group["params"]):
        if i not in state_dict["state"]:
            continue
        if name.endswith("w13.weight"):                     # rows [w1; w3]; the 0-dim "step" goes to both
            halves = {k: v.chunk(2) if v.dim() else (v, v.clone()) for k, v in state_dict["state"][i].items()}
            for j, part in enumerate(("w1.weight", "w3.weight")):
                state[index[name.replace("w13.weight", part)]] = {k: h[j] for k, h in halves.items()}
        else:
            state[index[name]] = state_dict["state"][i]
    return dict(state=state, param_groups=[dict(group, params=list(range(len(names))))])


def compile_and_wrap(raw, args, device, ddp=False):
    """What runs the training forward: DDP over GPUs, then torch.compile of the whole model, which fuses the norms,
    modulations, RoPE and activations around the matmuls; it traces as one graph (a test checks)."""
    model = DDP(raw, device_ids=[device.index] if device.type == "cuda" else None) if ddp else raw
    return torch.compile(model) if args.compile else model


def train_step(model, ema, opt, x, y, step, args, encoder=None):
    """One optimisation step, exactly what main() runs and bench.py times. x: uint8 (B, 3, H, W) on the device.
    encoder: the frozen REPA target (load_dinov2) with --repa, else None. Returns the loss terms as 0-dim
    tensors, {"loss", "mse", "repa"}, without reading them (no host sync)."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, args)
    x = x.float() / 127.5 - 1.0                                           # uint8 [0, 255] -> [-1, 1], on device
    if args.flip:                                      # off by default: none in the official loader nor the paper
        x = torch.where(torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
    raw, terms = unwrap(model), {}
    opt.zero_grad(set_to_none=True)
    try:
        for xk, yk in micro_batches(model, x, y, args.grad_accum):       # one, unless --grad-accum K
            with torch.autocast(x.device.type, torch.bfloat16, enabled=args.precision == "bf16"):
                # bf16 autocast without a GradScaler (bf16 has fp32's range), as the official bf16-mixed.
                loss, parts = flow_loss(model, xk, yk, raw.num_classes, encoder, args.repa_weight)
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
    CPUs). Plain `python pixnerd.py`: one process on --device."""
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
# What `--data NAME` means: the training defaults we use for it (any flag overrides them). The official configs train
# with a constant lr 1e-4 at global batch 256 (train_batch_size 32 x the 8 A100s of §4.4), no scaling; the paper gives
# neither number (DeCo's App. B.1 attributes both to PixNerd), only "no ... learning rate warm-up" (§4.4). A folder
# that is not one of these names gets FOLDER_DEFAULTS. REPA is on for imagenet (the paper's setting, §4 "Training
# Details"; it needs DINOv2, see --repa) and off elsewhere.
# DIFF: for the built-in shapes demo we use lr 2e-4 so a 10k-step run moves visibly (LAPTOP_PRESET: lr 4e-3 for
# its 1000 steps); ffhq128 and imagenet keep the official 1e-4.
DATA_PRESETS = {
    "shapes": dict(img_size=64, config="PixNerd-S/8", batch_size=128, steps=10_000, lr=2e-4,
                   sample_every=1000, ckpt_every=1000),
    "ffhq128": dict(img_size=128, config="PixNerd-B/16", batch_size=128, steps=200_000, lr=1e-4,
                    sample_every=5000, ckpt_every=5000, unconditional=True),  # its 1000-image folders aren't classes
    "imagenet": dict(img_size=256, config="PixNerd-L/16", batch_size=256, steps=800_000, lr=1e-4,
                     sample_every=10_000, ckpt_every=10_000, repa=True),  # official max_steps 800k
}
# imagenet's 800k steps of 256: ~160 epochs of ImageNet's 1.28M images, Tab. 2's "Epochs 160" (800k: not in the paper).
# `--data shapes` with no GPU (and no --config / --img-size): PixNerd-T at 32px, 1000 steps of 32 images, 4.4 min on
# our 2-core CPU, to a grid whose columns follow their classes (README "No GPU?"). lr 4e-3: ours, for this short run.
# 50-step grids (half the official 100). No loader worker: the shapes are drawn in the training process, and
# torch keeps both cores.
LAPTOP_PRESET = dict(img_size=32, config="PixNerd-T", batch_size=32, steps=1000, lr=4e-3,
                     sample_every=500, sample_steps=50, ckpt_every=500, log_every=50, num_workers=0)
FOLDER_DEFAULTS = dict(img_size=256, config="PixNerd-L/16", batch_size=256, steps=200_000, lr=1e-4,
                       sample_every=5000, ckpt_every=5000)
LABEL_TABLE = "y_embedder.weight"  # the class embedding, num_classes + 1 rows (--init-from)
MACHINE = ("out", "resume", "device", "compile", "precision", "num_workers",   # never taken from a checkpoint
           "dinov2_path")
SAME_RUN = ("config", "img_size", "repa")  # a resumed run cannot change these


def get_args(argv=None):
    """The run's settings. Each value comes from the command line, else the resumed checkpoint, else the --data
    preset (DATA_PRESETS), else the defaults below: `--resume RUN` alone continues RUN exactly as it was."""
    p = argparse.ArgumentParser(description="Train PixNerd (Wang et al., arXiv 2507.23268).", formatter_class=Help)
    g = p.add_argument_group("data and model")
    g.add_argument("--data", default="shapes", help="'shapes' (built in), a folder of images, or NAME for data/NAME")
    g.add_argument("--img-size", type=int, default=64, help="image side in pixels")
    g.add_argument("--config", default="PixNerd-S/8", help=f"model config: {', '.join(CONFIGS)}")
    g.add_argument("--unconditional", action=argparse.BooleanOptionalAction, default=False,
                   help="ignore class subfolders, train one class (FFHQ's folders are not classes)")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction, default=False,
                   help="random horizontal flip (the paper uses none)")
    g = p.add_argument_group("objective: REPA, alignment of block repa_layer (8 for the paper configs) to DINOv2")
    g.add_argument("--repa", action=argparse.BooleanOptionalAction, default=False,
                   help="REPA loss against frozen DINOv2 ViT-B/14 features (on in the imagenet preset)")
    g.add_argument("--repa-weight", type=float, default=REPA_WEIGHT, help="weight of the REPA loss (paper: 0.5)")
    g.add_argument("--dinov2-path", help="local clone of facebookresearch/dinov2 for torch.hub (default: GitHub)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, default=2e-4, help="constant learning rate (official: 1e-4)")
    g.add_argument("--ema", type=float, default=0.9999, help="EMA decay (paper: 0.9999), reached after a warmup")
    g = p.add_argument_group("sample grids")
    g.add_argument("--cfg", type=float,
                   help="CFG scale of the grids, none on one-class data (default: the paper's, 3.5)")
    g.add_argument("--sample-steps", type=int, help="sampler steps of the grids (default: the paper's, 100 Euler)")
    return resolve_args(add_run_flags(p), argv)


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
        print(f"{args.config} ({sum(p.numel() for p in raw.parameters()) / 1e6:.1f}M params, patch {raw.patch}, "
              f"REPA {args.repa}) on {len(dataset)} images, {num_classes} classes, {world} x {device.type}, "
              f"batch {args.batch_size}, lr {args.lr:.2e}, {args.precision}, compile={args.compile} -> {run}")
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
# ---- Appendix A. The authors' weights: from_official (MCG-NJU/PixNerd checkpoints -> our state dict) ----
# ---------------------------------------------------------------------------------------------------------------
# Official key -> ours, for the keys that differ (official src/models/transformer/pixnerd_c2i.py, class PixNerDiT).
# The rest are the same names and shapes: t_embedder.mlp.{0,2}, and in blocks[:depth] norm1, norm2,
# attn.{qkv,q_norm,k_norm,proj} and mlp.{w1,w3,w2} (the official FeedForward keeps w1 and w3 apart, as ours).
# Nothing is re-shaped. The official network stores no buffers (its RoPE table precompute_pos is a plain dict, its
# DCT features NerfEmbedder.fetch_pos an lru_cache), so no rebuilt tensor has to be checked and dropped here.
OFFICIAL_RENAMES = [
    ("s_embedder.proj.", "s_embedder."),             # official Embed: Linear(3*p*p -> D) as .proj, its norm Identity
    ("y_embedder.embedding_table.", "y_embedder."),  # official LabelEmbedder: nn.Embedding(classes + 1, D) inside
    ("adaLN_modulation.0.", "adaLN_modulation."),    # official FlattenDiTBlock: Linear(D -> 6D) in an nn.Sequential
    ("x_embedder.embedder.0.", "field.embed."),      # official NerfEmbedder: Linear(3 + 64 -> F) in an nn.Sequential
    ("param_generator1.0.", "param_generator."),     # official NerfBlock: Linear(D -> 2*F*M) in an nn.Sequential
    ("final_layer.", "field."),                      # official NerfFinalLayer: .norm RMSNorm(F), .linear(F -> 3)
]
OFFICIAL_REPA = "diffusion_trainer.proj.0."          # official REPATrainer.proj = Sequential(Sequential(L, SiLU, ...))


def from_official(obj, ema=True, repa=False):
    """Our state dict (create_model(config, img_size, num_classes, repa_dim=REPA_DIM if repa else 0) loads it with
    strict=True) from what torch.load(file, map_location="cpu") returns for an official file. Follows MCG-NJU/PixNerd
    at commit 6da060bd4b11a4a0ac2443a31b79701090e23c23 (src/models/transformer/pixnerd_c2i.py, src/lightning_model.py,
    src/diffusion/flow_matching/training_repa.py). Accepted layouts:
      - PixNerDiT.state_dict(): official blocks[:depth] are the transformer blocks, blocks[depth:] the NerfBlocks;
      - a Lightning checkpoint (main.py fit; the released .ckpt files, read by main.py predict and app.py the same
        way): {"state_dict": {"denoiser.*", "ema_denoiser.*", "diffusion_trainer.proj.*"}, "optimizer_states", ...}
        (LightningModel.state_dict), that "state_dict" alone, or one holding only "ema_denoiser.*" (EMA only).
    ema=True: the EMA weights (ema_denoiser, what official sampling uses: eval_original_model=False); ema=False: the
    raw denoiser. A bare PixNerDiT state dict is returned as it is, whatever ema. repa=True adds the REPA projector
    (official diffusion_trainer.proj, never EMA-averaged: ours gets the raw one with either ema); otherwise it is
    dropped, with the optimizer state, the loops and every other trainer entry."""
    if not isinstance(obj, dict):
        raise SystemExit(f"not an official PixNerd checkpoint (torch.load gave a {type(obj).__name__}, not a dict): "
                         "pass an MCG-NJU/PixNerd .ckpt or a PixNerDiT state_dict()")
    if "script" in obj or "field.embed.weight" in obj:         # save_checkpoint's dict, or our model's state dict
        raise SystemExit("this is a checkpoint of our pixnerd.py, not an official one: use it as it is (--resume, "
                         "--init-from, sample.py) without from_official")
    sd = obj.get("state_dict", obj)                            # Lightning: the weights under "state_dict"
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise SystemExit("not an official PixNerd checkpoint (no dict of named tensors): pass an MCG-NJU/PixNerd .ckpt "
                         "or a PixNerDiT state_dict()")
    net = sd
    if any(k.startswith(("denoiser.", "ema_denoiser.")) for k in sd):   # official LightningModel.state_dict prefixes
        prefix = "ema_denoiser." if ema else "denoiser."
        net = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if not net:
            raise SystemExit(f"this official PixNerd file holds no {prefix}* weights (an EMA-only release?): pass "
                             f"ema={not ema}")
    if any(k.startswith("dec_net.") for k in net):             # DeCo's PixNerDiT: the same embedders, a dec_net head
        raise SystemExit("this is an official DeCo checkpoint (dec_net.* keys), not PixNerd's: convert it with "
                         "deco.py's from_official")
    for key in ("x_embedder.embedder.0.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight"):
        if key not in net:
            raise SystemExit(f"not an official class-conditional PixNerd checkpoint (no {key!r}; another paper's "
                             "file?): pass an MCG-NJU/PixNerd ImageNet .ckpt or a PixNerDiT state_dict()")
    depth = sum(k.endswith(".attn.qkv.weight") for k in net)   # official num_cond_blocks: blocks with attention
    out = {}
    for k, v in net.items():
        head, _, rest = k.partition(".")
        if head == "blocks" and int(rest.split(".")[0]) >= depth:   # official blocks[depth + j] = our field.blocks[j]
            j, _, rest = rest.partition(".")
            k = f"field.blocks.{int(j) - depth}.{rest}"
        for old, new in OFFICIAL_RENAMES:
            k = k.replace(old, new)
        out[k] = v
    if repa:
        proj = {k[len(OFFICIAL_REPA):]: v for k, v in sd.items() if k.startswith(OFFICIAL_REPA)}
        if not proj:
            raise SystemExit(f"this official PixNerd file has no REPA projector ({OFFICIAL_REPA}*): pass repa=False")
        out.update({"repa_proj." + k: v for k, v in proj.items()})   # official proj.0.{0,2,4} = our repa_proj.{0,2,4}
    return out


# ---------------------------------------------------------------------------------------------------------------
# ---- Appendix B. Built-in data: `--data shapes` ----
# ---------------------------------------------------------------------------------------------------------------
class Shapes(torch.utils.data.Dataset):
    """Built-in labelled data, so `python pixnerd.py` runs with no download: one bright shape (the class) of random
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
