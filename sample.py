"""
sample.py: sample and evaluate a checkpoint of any of our four scripts (jit.py, pixeldit.py, pixnerd.py, deco.py).

The checkpoint's `script` field says which script made it; we import that script, rebuild the model with its own
`create_model`, load the EMA weights (or --weights raw) and call its own `sample()` with the paper's default sampler
(`sampler_defaults`); --steps, --cfg, --interval and --solver override it. Every sample i starts from its own noise,
seeded by (--seed, i), so the same sample comes out whatever the batch size, the number of GPUs, or how often the
run was interrupted.

Time convention (all our scripts): z_t = t*x + (1-t)*e, t=0 noise, t=1 data.
Shapes: B batch, H=W image size, N number of samples, F=2048 Inception features.

    python sample.py runs/jit-shapes --grid grid.png                    # 64 samples, classes balanced
    python sample.py runs/jit-imagenet --grid grid.png --n 32 --classes 207,360,387,974 --cfg 2.0
    python sample.py RUN --n 50000 --outdir samples/ --npz samples.npz  # ADM-suite archive (uint8 NHWC arr_0)
    torchrun --nproc_per_node=8 sample.py RUN --num-samples 50000 --outdir samples/ --npz samples.npz  # 8 GPUs
    python sample.py --fid data/ffhq128 --save-stats ffhq128_stats.npz  # reference statistics, once
    python sample.py RUN --n 50000 --outdir samples/ --fid ffhq128_stats.npz                 # FID-50k
    python sample.py --official checkpoint-last.pth --script jit --config JiT-B/16 --n 50000 --npz jit.npz  # authors'

FID uses pytorch-fid's network and weight file (the TF FID Inception, ported), reimplemented below in plain torch;
get the weights once: see INCEPTION_URL. Differences from pytorch-fid: grep "DIFF:".
"""

import argparse
import importlib
import json
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

# No paper script is imported here: load_model imports only the one a checkpoint names, so sample.py runs next to
# any subset of jit.py, pixeldit.py, pixnerd.py, deco.py. It has its own ADM center crop (the scripts' code: a test
# compares the pixels) and its own torchrun setup.

SCRIPTS = ("jit", "pixeldit", "pixnerd", "deco")  # the `script` values a checkpoint may carry
IMG_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
GRID_MAX = 256     # --grid shows the first min(n, 256) samples (with --n 50000 the grid is a preview)

# ---------------------------------------------------------------------------------------------------------------
# ---- 1. Checkpoints: find, dispatch on `script`, rebuild the model ----
# ---------------------------------------------------------------------------------------------------------------


def find_checkpoint(path):
    """A run folder (its latest checkpoint, ckpt.pt) or a checkpoint file -> the file's Path."""
    path = Path(path)
    if path.is_dir():
        if not (path / "ckpt.pt").is_file():
            raise SystemExit(f"{path} is a folder without ckpt.pt: pass a run folder that holds a checkpoint "
                             "(training writes one every --ckpt-every steps) or a .pt file.")
        return path / "ckpt.pt"
    if not path.is_file():
        raise SystemExit(f"no checkpoint at {path}: pass a run folder (runs/jit-shapes) or a checkpoint .pt file.")
    return path


def import_script(name, source=""):
    """The paper script `name` (jit, pixeldit, pixnerd or deco) as a module, imported only when a checkpoint needs
    it, so sample.py works with whichever scripts are present."""
    if name not in SCRIPTS:
        raise SystemExit(f"{source} was written by {name!r}, not by one of our scripts ({', '.join(SCRIPTS)}).")
    here = Path(__file__).resolve().parent
    if not (here / f"{name}.py").is_file():
        raise SystemExit(f"{source} is a {name}.py checkpoint but {here / (name + '.py')} is missing: "
                         f"put {name}.py next to sample.py.")
    if str(here) not in sys.path:
        sys.path.insert(0, str(here))
    return importlib.import_module(name)


def load_model(path, weights="ema", device="cpu"):
    """Checkpoint -> (script module, model in eval mode on `device`, checkpoint dict without the optimizer).
    The checkpoint holds the PLAIN module's state dicts (contract): `ema` (default) or `model` (--weights raw)."""
    path = find_checkpoint(path)
    # weights_only=False: our checkpoints hold numpy RNG states and the args dict. Only load files you trust.
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:                            # empty, truncated, random bytes: the zip reader or unpickler
        raise SystemExit(f"{path} is not a readable checkpoint (truncated or corrupt? {type(err).__name__}).") from None
    if not isinstance(ckpt, dict) or "script" not in ckpt:
        raise SystemExit(f"{path} is not a checkpoint of our scripts (no 'script' field).")
    mod = import_script(ckpt["script"], str(path))
    model = mod.create_model(ckpt["config"], ckpt["img_size"], ckpt["num_classes"], **ckpt.get("model_kwargs", {}))
    mod.load_weights(model, ckpt["ema" if weights == "ema" else "model"], path, ckpt["config"])   # misfit: one line
    ckpt = {k: v for k, v in ckpt.items() if k not in ("model", "ema", "opt")}  # free the other copies
    return mod, model.to(device).eval().requires_grad_(False), ckpt


def load_official(path, script, config, img_size, num_classes, weights="ema", device="cpu"):
    """The authors' released checkpoint -> the same triple as load_model: the script's from_official maps its keys
    to ours, then a strict load into create_model(config, img_size, num_classes) (load_weights: one line if the
    file does not fit the config)."""
    mod = import_script(script, f"--script {script}")
    if config not in mod.CONFIGS:
        raise SystemExit(f"--config {config!r}: {script}.py has {', '.join(mod.CONFIGS)}.")
    if not Path(path).is_file():
        raise SystemExit(f"--official {path}: no such file; pass the authors' checkpoint file (README).")
    try:                                                # official files hold pickled objects (JiT: argparse args)
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:                            # empty, truncated, random bytes
        raise SystemExit(f"{path} is not a readable checkpoint (truncated or corrupt? {type(err).__name__}).") from None
    model = mod.create_model(config, img_size, num_classes)
    mod.load_weights(model, mod.from_official(obj, ema=weights == "ema"), path, config)
    info = dict(script=script, config=config, img_size=img_size, num_classes=num_classes, step=None)
    return mod, model.to(device).eval().requires_grad_(False), info


# ---------------------------------------------------------------------------------------------------------------
# ---- 2. Seeds, labels and the sampling loop ----
# ---------------------------------------------------------------------------------------------------------------


def class_labels(n, num_classes, classes=None):
    """Label of sample i = classes[i % len(classes)] (default: all classes), a pure function of i: balanced
    (50 per class for 50k ImageNet samples, as the papers' FID-50k) and the same on every GPU and every resume."""
    pool = list(range(num_classes)) if classes is None else list(classes)
    return torch.tensor([pool[i % len(pool)] for i in range(n)], dtype=torch.long)   # (n,)


def sample_noise(seed, indices, img_size):
    """Starting noise e ~ N(0, I) for the samples `indices`: sample i draws from its own generator, numpy's
    default_rng([seed, i]) (both numbers go through SeedSequence: no two (seed, i) pairs share a stream; torch's CPU
    generator would keep only 32 bits of a combined seed). So sample i never depends on the batch it lands in or the
    GPU that runs it (DiT's sample_ddp.py seeds per GPU: its samples change with the world size), and the noise is
    the same on every machine."""
    # DIFF: DiT's sample_ddp.py (and evaluation scripts built on it) draws one noise tensor per batch from the seed
    # global_seed * world_size + rank; we seed each sample, so results do not depend on the GPU count.
    e = [np.random.default_rng([seed, int(i)]).standard_normal((3, img_size, img_size), dtype=np.float32)
         for i in indices]
    return torch.from_numpy(np.stack(e))                                     # (B, 3, H, W)


def to_uint8(x):
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8 numpy, rounded as our scripts' grids and official JiT
    (round((x+1)/2 * 255)). What is saved is what FID sees."""
    x = ((x.float() + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)    # (B, 3, H, W)
    return x.permute(0, 2, 3, 1).cpu().numpy()                           # (B, H, W, 3)


def generate(mod, model, indices, labels, settings, seed, batch_size, bar=None):
    """Yields (indices, uint8 (B, H, W, 3)) for `indices` in batches, sampled with the script's own sample()."""
    dev = next(model.parameters()).device
    for start in range(0, len(indices), batch_size):
        idx = indices[start: start + batch_size]
        noise = sample_noise(seed, idx, model.img_size).to(dev)             # (B, 3, H, W)
        y = labels[idx].to(dev)                                              # (B,)
        with torch.no_grad(), torch.autocast(dev.type, torch.bfloat16, enabled=dev.type == "cuda"):
            x = mod.sample(model, y, settings["steps"], settings["cfg"], tuple(settings["interval"]),
                           settings["solver"], noise=noise)                  # (B, 3, H, W) in [-1, 1]
        if bar is not None:
            bar.update(len(idx))
        yield idx, to_uint8(x)


# ---------------------------------------------------------------------------------------------------------------
# ---- 3. Writing samples: grid, one PNG per sample, .npz archive ----
# ---------------------------------------------------------------------------------------------------------------


def png_path(outdir, i):
    return Path(outdir) / f"{i:06d}.png"                 # index-named: 000000.png is sample 0


def png_ok(path):
    """Whether an earlier run wrote this sample completely. A crash or a full disk can leave an empty or truncated
    PNG; such a one is drawn again (each sample is a pure function of its index, so it comes out the same)."""
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except (OSError, ValueError):
        return False


def save_png(img, path):
    """Write via a temp file + os.replace: a run killed mid-write leaves no truncated PNG that resume would skip."""
    tmp = Path(str(path) + ".tmp")
    Image.fromarray(img).save(tmp, format="PNG")
    os.replace(tmp, path)


def save_npz(images, path):
    """uint8 (N, H, W, 3) as `arr_0` of an .npz: the sample batch format of the ADM evaluation suite
    (openai/guided-diffusion evaluations/evaluator.py), which PixelDiT, PixNerd and DeCo report FID with (JiT: LTH14's
    torch-fidelity fork). `images` is any sequence of (H, W, 3) arrays; they go through a memory-mapped .npy, so with
    --outdir (the samples read back from its PNGs) 50k 512px samples (39 GB) need no RAM."""
    first = np.asarray(images[0])
    tmp = Path(str(path) + ".npy.tmp")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(images), *first.shape))
    for i in range(len(images)):
        arr[i] = images[i]
    np.savez(path, arr_0=arr)                            # np.savez streams a memmap in chunks (uncompressed zip)
    del arr
    tmp.unlink()


def center_crop_arr(img, size):
    """ADM center crop (guided-diffusion's, as in the official JiT, PixNerd and DeCo loaders): halve with a box
    filter while the short side is >= 2*size, bicubic-resize the short side to `size`, take the center crop. PIL
    image -> (size, size, 3) uint8. A copy of the scripts' center_crop_arr (a test checks they agree): FID
    references get the training crop."""
    while min(*img.size) >= 2 * size:
        img = img.resize(tuple(s // 2 for s in img.size), resample=Image.BOX)
    scale = size / min(*img.size)
    img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top: top + size, left: left + size]


class Images(torch.utils.data.Dataset):
    """uint8 (H, W, 3) images from an (N, H, W, 3) array, or from image files center-cropped to `size`
    (a DataLoader reads files in parallel for FID). The one image source for the grid, the .npz and FID."""

    def __init__(self, array=None, files=None, size=None):
        self.array, self.files, self.size = array, files, size

    def __len__(self):
        return len(self.array) if self.array is not None else len(self.files)

    def __getitem__(self, i):
        if self.array is not None:
            return self.array[i]
        with Image.open(self.files[i]) as img:
            img = img.convert("RGB")
            return np.asarray(img) if self.size is None else center_crop_arr(img, self.size)


def image_files(folder):
    """Every image under `folder`, recursively, sorted (ImageNet's class subfolders included).
    DIFF: pytorch-fid takes only the top level of the folder; we recurse, so data/imagenet works as a reference."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMG_EXTS and p.is_file())


# ---------------------------------------------------------------------------------------------------------------
# ---- 4. The FID Inception-v3 (Szegedy et al., arXiv 1512.00567), as pytorch-fid runs it ----
# ---------------------------------------------------------------------------------------------------------------
# FID (Heusel et al., arXiv 1706.08500) is defined by ONE network: the TensorFlow Inception graph of 2015-12-05
# that the original TTUR code used. pytorch-fid ported its weights to a torchvision-style Inception3 whose blocks
# differ from torchvision's in two TF quirks, kept here on purpose: (1) the 3x3 average pools of the A, C, E blocks
# ignore the zero padding (count_include_pad=False); (2) the pool branch of the LAST block (Mixed_7c) is a MAX pool.
# Module names copy torchvision's Inception3 (num_classes=1008, no aux head) so pytorch-fid's published state dict
# loads with strict=True. Shapes below are for the 299x299 input.
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE}"


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3, TF's) -> ReLU."""

    def __init__(self, cin, cout, **conv_args):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **conv_args)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    """TF's 3x3/1 average pool: border windows average only the real pixels (quirk 1 above)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b/c/d at 35x35: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1 -> 64 + 64 + 96 + pool_features channels."""

    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):                                                   # (B, cin, 35, 35)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(tf_avg_pool(x))], 1)   # (B, 224+pool, 35, 35)


class InceptionB(nn.Module):
    """Mixed_6a, grid reduction 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 -> 384 + 96 + cin channels."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):                                                   # (B, 288, 35, 35)
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)   # (B, 768, 17, 17)


class InceptionC(nn.Module):
    """Mixed_6b/c/d/e at 17x17, factorised 7x7 convs (1x7 then 7x1) of width c7 -> 4 x 192 = 768 channels."""

    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):                                                   # (B, 768, 17, 17)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            bd = conv(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(tf_avg_pool(x))], 1)   # (B, 768, 17, 17)


class InceptionD(nn.Module):
    """Mixed_7a, grid reduction 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 -> 320 + 192 + 768 = 1280."""

    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):                                                   # (B, 768, 17, 17)
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)   # (B, 1280, 8, 8)


class InceptionE(nn.Module):
    """Mixed_7b/c at 8x8, with 1x3 and 3x1 convs side by side -> 320 + 768 + 768 + 192 = 2048 channels.
    pool="max" for Mixed_7c (quirk 2: the TF graph has a max pool there, torchvision an average)."""

    def __init__(self, cin, pool="avg"):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):                                                   # (B, cin, 8, 8)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)   # (B, 768, 8, 8)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)   # (B, 768, 8, 8)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.pool == "max" else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pooled)], 1)   # (B, 2048, 8, 8)


def fid_preprocess(images):
    """uint8 (B, 3, H, W) -> (B, 3, 299, 299) in [-1, 1], exactly pytorch-fid's input path: [0, 1] floats (as
    ToTensor), bilinear resize to 299x299 (align_corners=False, no antialiasing), then 2x - 1."""
    x = images.float() / 255
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return 2 * x - 1


class FIDInceptionV3(nn.Module):
    """uint8 images (B, 3, H, W) -> pool3 features (B, 2048): the activations FID is defined on."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")
        self.fc = nn.Linear(2048, 1008)   # the 1008-way classifier: unused by FID, kept so the weight file loads

    def forward(self, images):                                              # (B, 3, H, W) uint8
        x = fid_preprocess(images)                                           # (B, 3, 299, 299) in [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                         # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                        # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                         # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))                   # (B, 288, 35, 35)
        x = self.Mixed_6a(x)                                                 # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))    # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))                   # (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))                                            # (B, 2048): pool3 = global avg pool


def inception_weights_path(path=None):
    """--inception-weights, else pytorch-fid's own download location (torch hub cache), else ./INCEPTION_FILE."""
    candidates = [Path(path)] if path else [Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE,
                                            Path(INCEPTION_FILE)]
    for p in candidates:
        if p.is_file():
            return p
    raise SystemExit(f"FID needs the Inception weights {INCEPTION_FILE} (pytorch-fid's port of the TF FID "
                     f"Inception), not found at {' or '.join(map(str, candidates))}. Download it once from "
                     f"{INCEPTION_URL} and pass --inception-weights FILE.")


def load_inception(path=None, device="cpu"):
    """The FID Inception with pytorch-fid's published weights (strict: every key and shape must match)."""
    path = inception_weights_path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, truncated download, ...
        raise SystemExit(f"{path} is not a PyTorch weight file ({type(err).__name__}); download {INCEPTION_URL}")
    net = FIDInceptionV3()
    try:
        net.load_state_dict(state, strict=True)
    except (RuntimeError, AttributeError, TypeError) as err:
        first = str(err).strip().splitlines()[-1].strip()[:200]
        raise SystemExit(f"{path} does not hold the FID Inception weights ({first}); download {INCEPTION_URL}")
    return net.to(device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------
# ---- 5. Statistics and the Fréchet distance ----
# ---------------------------------------------------------------------------------------------------------------


def stack_uint8(batch):                             # DataLoader collate: B arrays (H, W, 3) -> (B, H, W, 3)
    return torch.from_numpy(np.stack(batch))


@torch.no_grad()
def inception_stats(images, net, batch_size=100, num_workers=0, desc="inception"):
    """Images (a Dataset of uint8 (H, W, 3)) -> (mu (F,), sigma (F, F)) of their pool3 features, in float64."""
    dev = next(net.parameters()).device
    loader = torch.utils.data.DataLoader(images, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=stack_uint8)
    feats = []
    for x in tqdm(loader, desc=desc, unit="batch", leave=False):           # (B, H, W, 3) uint8
        feats.append(net(x.to(dev).permute(0, 3, 1, 2)).double().cpu())      # (B, F)
    f = torch.cat(feats).numpy()                                             # (N, F)
    return f.mean(axis=0), np.cov(f, rowvar=False)                           # (F,), (F, F)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID, arXiv 1706.08500):
        d^2 = |mu1 - mu2|^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).
    As the reference implementations: scipy's sqrtm; if the product is singular (few samples) or the root is not
    finite, add eps*I to both covariances; drop the imaginary part sqrtm leaves by rounding, error if it is large."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise SystemExit(f"FID statistics of different sizes ({mu1.shape[0]} vs {mu2.shape[0]} features): "
                         "the reference was not made with the 2048-d pool3 features.")
    diff = mu1 - mu2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    singular = any("singular" in str(w.message) for w in caught)
    if singular or not np.isfinite(covmean).all():
        # DIFF: pytorch-fid retries only on a non-finite root; scipy >= 1.16 returns a finite but inaccurate root
        # for a singular product and warns "Matrix is singular" instead, so we also retry on that warning.
        print(f"FID: the covariance product is singular (fewer samples than features?); adding {eps}*I")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has a large imaginary component ({np.abs(covmean.imag).max():.3g}); "
                             "the statistics are broken (NaNs in features?)")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def reference_stats(ref, net, size, batch_size, num_workers):
    """--fid REF -> (mu, sigma, number of images, description). REF is a folder of images, an .npz of statistics
    `mu`, `sigma` (our --save-stats, pytorch-fid's, or an ADM reference batch), or an .npz of images `arr_0`."""
    ref = Path(ref)
    if ref.suffix == ".npz":
        if not ref.is_file():
            raise SystemExit(f"--fid {ref}: no such file.")
        try:
            f = np.load(ref)
        except Exception as err:                                 # not a zip, pickled objects, truncated
            raise SystemExit(f"--fid {ref}: not a readable .npz ({type(err).__name__}); pass statistics saved by "
                             "--save-stats, pytorch-fid or the ADM suite, or a folder of images.") from None
        with f:
            # Statistics first: an ADM reference batch (VIRTUAL_imagenet256_labeled.npz) holds mu/sigma of the WHOLE
            # dataset plus only 10k images (for precision/recall); FID against those 10k would be biased upwards.
            # Its mu/sigma come from the ADM suite's TF run of the same Inception graph (pytorch-fid's weights are a
            # port of it), so expect small differences from the suite's own number: report that one (README).
            if "mu" in f.files and "sigma" in f.files:
                n = int(f["n"]) if "n" in f.files else 0         # only our files record it
                return f["mu"], f["sigma"], n, f"{ref} (statistics of {n or 'an unrecorded number of'} images)"
            if "arr_0" in f.files:                               # a sample batch: uint8 (N, H, W, 3)
                arr = f["arr_0"]
                if len(arr) < 2:
                    raise SystemExit(f"--fid {ref}: {len(arr)} image(s) in arr_0; FID needs at least 2.")
                return (*inception_stats(Images(array=arr), net, batch_size, 0, "reference"), len(arr),
                        f"{ref} ({len(arr)} images, arr_0)")
        raise SystemExit(f"--fid {ref}: an .npz with neither 'mu'/'sigma' nor 'arr_0'.")
    if not ref.is_dir():
        raise SystemExit(f"--fid {ref}: neither a folder of images nor an .npz.")
    files = image_files(ref)
    if len(files) < 2:
        raise SystemExit(f"--fid {ref}: {len(files)} images (png/jpg/...) in that folder; FID needs at least 2.")
    if size is None:                                # no samples to match: the first image's short side
        with Image.open(files[0]) as img:
            size = min(img.size)
    mu, sigma = inception_stats(Images(files=files, size=size), net, batch_size, num_workers, "reference")
    return mu, sigma, len(files), f"{ref} ({len(files)} images, center-cropped to {size}x{size})"


# ---------------------------------------------------------------------------------------------------------------
# ---- 6. main ----
# ---------------------------------------------------------------------------------------------------------------


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Sample a checkpoint of jit/pixeldit/pixnerd/deco.py; FID.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("ckpt", nargs="?", help="run folder (its ckpt.pt) or checkpoint file; omit with --save-stats")
    p.add_argument("--weights", choices=["ema", "raw"], default="ema", help="EMA weights or the raw model's")
    # -- the authors' released weights instead of our checkpoint (README "Using the authors' weights")
    p.add_argument("--official", metavar="FILE", help="an official checkpoint of the paper of --script, as released")
    p.add_argument("--script", choices=SCRIPTS, help="with --official: the paper (jit, pixeldit, pixnerd, deco)")
    p.add_argument("--config", help="with --official: its config, e.g. JiT-B/16, PixelDiT-XL/16, DeCo-XL/16")
    p.add_argument("--img-size", type=int, default=256, help="with --official: the image size it was trained at")
    p.add_argument("--num-classes", type=int, default=1000, help="with --official: its class count (ImageNet)")
    # -- what to sample
    # --num-samples is the same flag: torchrun's own parser rejects "--n" as an ambiguous prefix of its options.
    p.add_argument("--n", "--num-samples", dest="n", type=int, default=64,
                   help="number of samples (sample i always gets the same noise)")
    p.add_argument("--classes", default="balanced", help="'balanced' (i %% num_classes) or a list: 1,2,3")
    p.add_argument("--seed", type=int, default=0, help="sample i starts from noise seeded by (seed, i)")
    # -- the sampler: default = the paper's (the script's sampler_defaults for the checkpoint's config)
    p.add_argument("--steps", type=int, help="sampler steps")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--interval", help="CFG interval in t, 'lo,hi', each script's official rule: jit.py lo < t < hi "
                   "(lo = 0 guides t = 0), pixeldit.py and pixnerd.py lo < t < hi, deco.py lo < t <= hi")
    p.add_argument("--solver", help="ODE solver: euler or heun, ab2 for PixelDiT (what the script offers)")
    # -- outputs
    p.add_argument("--grid", help=f"write the first min(n, {GRID_MAX}) samples as one PNG grid")
    p.add_argument("--nrow", type=int, help="grid columns (default: ceil(sqrt) of the grid's sample count)")
    p.add_argument("--outdir", help="one PNG per sample, 000000.png...; a rerun skips those already there")
    p.add_argument("--npz", help="uint8 (n, H, W, 3) arr_0 archive for the ADM evaluation suite")
    # -- FID
    p.add_argument("--fid", metavar="REF", help="FID against a folder of images or a stats/images .npz")
    p.add_argument("--save-stats", metavar="FILE", help="save REF's statistics (mu, sigma) to FILE.npz")
    p.add_argument("--inception-weights", metavar="FILE", help=f"{INCEPTION_FILE} (from {INCEPTION_URL})")
    p.add_argument("--ref-size", type=int, help="center-crop reference images to this size (default: samples')")
    # -- system
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward, per GPU (not in the results)")
    p.add_argument("--num-workers", type=int, default=min(8, os.cpu_count() or 1), help="image readers for FID")
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available; torchrun: local rank)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="torch.compile the network on CUDA (bench.py times the sampler this way)")
    args = p.parse_args(argv)
    if args.n <= 0:
        raise SystemExit(f"--n {args.n}: the number of samples must be positive.")
    for flag in ("batch_size", "steps", "nrow"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            raise SystemExit(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be a positive whole number.")
    if args.fid and (args.ckpt or args.official) and args.n < 2:
        raise SystemExit(f"--fid with --n {args.n}: FID needs at least 2 samples (a covariance); pass a larger --n.")
    for flag in ("npz", "save_stats"):                 # np.savez adds .npz to a name without it: say the real name
        if getattr(args, flag) and not getattr(args, flag).endswith(".npz"):
            setattr(args, flag, getattr(args, flag) + ".npz")
    if args.save_stats and not args.fid:
        raise SystemExit("--save-stats FILE saves the statistics of --fid REF: pass both.")
    if args.official and (args.ckpt or not (args.script and args.config)):
        raise SystemExit("--official FILE replaces the checkpoint argument and needs --script and --config, e.g. "
                         "--official checkpoint-last.pth --script jit --config JiT-B/16")
    if args.official and (args.img_size <= 0 or args.num_classes <= 0):
        raise SystemExit(f"--img-size {args.img_size} --num-classes {args.num_classes}: both must be positive.")
    args.ckpt = args.ckpt or args.official
    if args.ckpt is None and not args.save_stats:
        raise SystemExit("pass a checkpoint (run folder or .pt); without one, only --fid REF --save-stats FILE.")
    if args.ckpt and not (args.grid or args.outdir or args.npz or args.fid):
        raise SystemExit("nothing to do: pass --grid FILE, --outdir DIR, --npz FILE and/or --fid REF.")
    return args


def parse_list(text, cast, flag):
    try:
        return [cast(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"{flag} {text!r}: expected comma-separated numbers, e.g. 1,2,3")


def sampler_settings(mod, model, args):
    """The paper's sampler for this checkpoint (mod.sampler_defaults), with the command line's overrides."""
    d = mod.sampler_defaults(model.config, model.img_size)
    interval = parse_list(args.interval, float, "--interval") if args.interval else list(d["interval"])
    if len(interval) != 2:
        raise SystemExit(f"--interval {args.interval!r}: give two numbers, lo,hi")
    cfg = d["cfg"] if args.cfg is None else args.cfg
    return dict(steps=args.steps or d["steps"], cfg=1.0 if model.num_classes == 1 else cfg,  # 1 class: no CFG
                interval=interval, solver=args.solver or d["solver"])


def setup_distributed(args):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: then one process per GPU (DDP). Plain `python sample.py`: one
    process on --device. Returns (rank, world_size, device)."""
    if "RANK" not in os.environ:
        name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        have = ["cpu"] + ["cuda"] * torch.cuda.is_available() + ["mps"] * torch.backends.mps.is_available()
        try:
            device = torch.device(name)
        except RuntimeError:                            # not a device name torch knows
            device = None
        if device is None or device.type not in have or device.type == "cuda" and (device.index or 0) >= \
                torch.cuda.device_count():
            raise SystemExit(f"--device {name}: not available here; this machine has {', '.join(have)}.")
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


def check_outdir(outdir, record):
    """A rerun into the same --outdir continues it (skips written PNGs) only with the same checkpoint step and
    sampler settings, else the folder would mix two models' samples. --n may grow: sample i does not depend on n."""
    path = Path(outdir) / "sample_args.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = [k for k in record if k != "ckpt" and old.get(k) != record[k]]
        if changed:
            k = changed[0]
            raise SystemExit(f"{outdir} holds samples made with {k}={old.get(k)!r}, not {record[k]!r}: pass another "
                             f"--outdir, or delete that folder to start over.")
    else:
        path.write_text(json.dumps(record, indent=2))


def main(argv=None):
    """Returns dict(n, fid, reference) (fid None without --fid): the tests read it."""
    args = get_args(argv)
    # torchrun: one process per GPU, each sampling every world-th index; plain python: one process on --device.
    rank, world, device = setup_distributed(args)
    result = dict(n=0, fid=None, reference=None)
    samples = None                                             # the samples as an `Images` source, on rank 0
    if args.fid:                                               # every rank: none waits for one that stopped
        inception_weights_path(args.inception_weights)        # fail before sampling, not after an hour of it

    if args.ckpt:
        mod, model, ckpt = load_official(args.official, args.script, args.config, args.img_size, args.num_classes,
                                         args.weights, device) if args.official else \
            load_model(args.ckpt, args.weights, device)
        if args.compile and device.type == "cuda":
            # One graph per batch shape (B, and 2B inside the CFG interval); the compiled module forwards the
            # attributes the scripts' sample() reads (config, img_size, num_classes, ...) to the plain model.
            model = torch.compile(model, dynamic=False)
        classes = None if args.classes == "balanced" else parse_list(args.classes, int, "--classes")
        if classes and not all(0 <= c < model.num_classes for c in classes):
            raise SystemExit(f"--classes {args.classes}: this model has classes 0..{model.num_classes - 1}.")
        settings = sampler_settings(mod, model, args)
        if world > 1 and not args.outdir:
            raise SystemExit("under torchrun pass --outdir DIR: each GPU writes its PNGs there, rank 0 reads them.")
        labels = class_labels(args.n, model.num_classes, classes)            # (n,)
        if args.outdir:
            Path(args.outdir).mkdir(parents=True, exist_ok=True)
            if rank == 0:
                check_outdir(args.outdir, dict(ckpt=str(args.ckpt), script=ckpt["script"], config=ckpt["config"],
                                               step=ckpt.get("step"), weights=args.weights, seed=args.seed,
                                               classes=args.classes, **settings))
            if world > 1:
                dist.barrier()                                 # rank 0 checked the folder before anyone writes
        # This GPU's share: every world-th index; with --outdir, minus the samples already written (resume).
        mine = range(rank, args.n, world)
        todo = [i for i in mine if not (args.outdir and png_ok(png_path(args.outdir, i)))]
        if rank == 0:
            s = settings
            print(f"{ckpt['script']}.py {ckpt['config']} {model.img_size}px, step {ckpt.get('step')}, "
                  f"{args.weights} weights: {s['steps']} {s['solver']} steps, cfg {s['cfg']} on "
                  f"t in {tuple(s['interval'])}, seed {args.seed}; {args.n} samples on {world} x {device.type}"
                  + (f", {len(mine) - len(todo)} of GPU 0's {len(mine)} already in {args.outdir}" if args.outdir
                     else ""))
        kept = None if args.outdir else np.empty((args.n, model.img_size, model.img_size, 3), np.uint8)
        bar = tqdm(total=len(todo), unit="img", desc="sampling", disable=rank != 0, dynamic_ncols=True)
        for idx, imgs in generate(mod, model, todo, labels, settings, args.seed, args.batch_size, bar):
            for i, img in zip(idx, imgs):
                if args.outdir:
                    save_png(img, png_path(args.outdir, i))
                else:
                    kept[i] = img
        bar.close()
        del model
        if world > 1:
            dist.barrier()                                     # every GPU has written its PNGs
        if args.outdir:
            samples = Images(files=[png_path(args.outdir, i) for i in range(args.n)])
        else:
            samples = Images(array=kept)
        result["n"] = args.n
        if rank == 0 and args.grid:
            k = min(args.n, GRID_MAX)
            grid = torch.from_numpy(np.stack([samples[i] for i in range(k)]))      # (k, H, W, 3) uint8
            # The script's own grid writer (the layout of its training grids) takes [-1, 1]; u / 127.5 - 1 maps
            # back to exactly u there, so the grid holds the very pixels of the PNGs and the .npz.
            nrow = args.nrow or math.ceil(math.sqrt(k))
            Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
            mod.save_grid(grid.permute(0, 3, 1, 2).float() / 127.5 - 1, args.grid, nrow)    # (k, 3, H, W)
            print(f"grid of {k} samples -> {args.grid}")
        if rank == 0 and args.npz:
            Path(args.npz).parent.mkdir(parents=True, exist_ok=True)
            save_npz(samples, args.npz)
            print(f"{args.n} samples -> {args.npz} (arr_0, uint8 NHWC)")

    if rank == 0 and args.fid:
        # FID features in true fp32: cuDNN would otherwise run the convolutions in TF32 (its default on Ampere+).
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        net = load_inception(args.inception_weights, device)
        size = args.ref_size or (samples[0].shape[0] if samples is not None else None)
        mu_r, sigma_r, n_ref, ref_desc = reference_stats(args.fid, net, size, args.batch_size, args.num_workers)
        result["reference"] = ref_desc
        if args.save_stats:
            Path(args.save_stats).parent.mkdir(parents=True, exist_ok=True)
            np.savez(args.save_stats, mu=mu_r, sigma=sigma_r, n=n_ref)   # pytorch-fid's keys, plus n
            print(f"statistics of {ref_desc} -> {args.save_stats}")
        if samples is not None:
            mu, sigma = inception_stats(samples, net, args.batch_size, args.num_workers, "samples")
            result["fid"] = frechet_distance(mu, sigma, mu_r, sigma_r)
            # FID depends on the number of samples and on the reference: always report both with it.
            print(f"FID {result['fid']:.3f}  ({args.n} samples vs {ref_desc})")
    if world > 1:
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
