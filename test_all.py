"""The test suite: CPU only, tiny configs, a few minutes on 2 cores. Run: python -m pytest -q test_all.py

Every test asserts values that matter (not only shapes). Sections follow the scripts: jit, pixnerd, pixeldit,
deco, sample, bench.
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import jit

torch.set_num_threads(2)
TINY = ["--config", "tiny", "--img-size", "32", "--num-workers", "0", "--sample-steps", "2", "--device", "cpu"]


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def read_log(run):
    return [json.loads(line) for line in open(Path(run) / "log.jsonl")]


# =================================================================================================================
# jit.py
# =================================================================================================================


@pytest.mark.parametrize("name", [n for n in jit.CONFIGS])
def test_jit_every_config_forward_backward(name):
    """Each config's real width / heads / patch / bottleneck, with 2 blocks (in-context tokens from block 1) at
    the smallest image that holds 2x2 patches, so even JiT-G runs on a CPU in seconds."""
    cfg = dict(jit.CONFIGS[name], depth=2, ctx_start=1)
    torch.manual_seed(0)
    model = jit.JiT(name, 2 * cfg["patch"], 10, **cfg)
    z = torch.randn(2, 3, 2 * cfg["patch"], 2 * cfg["patch"])
    nn_out = model(z, torch.rand(2), torch.tensor([3, 10]))
    assert nn_out.shape == z.shape
    assert torch.count_nonzero(nn_out) == 0                       # zero-init final layer: exactly 0 at init
    torch.nn.init.normal_(model.final_layer.linear.weight, std=0.02)
    out = model(z, torch.rand(2), torch.tensor([3, 10]))
    out.square().mean().backward()
    assert torch.isfinite(out).all() and out.abs().sum() > 0
    assert model.x_embedder.proj1.weight.grad.abs().sum() > 0     # gradient reaches the first layer


@pytest.mark.parametrize("name,size,paper_m", [("JiT-B/16", 256, 131), ("JiT-L/16", 256, 459),
                                               ("JiT-H/16", 256, 953), ("JiT-G/16", 256, 2000),
                                               ("JiT-B/32", 512, 133)])
def test_jit_param_counts_match_paper(name, size, paper_m):
    with torch.device("meta"):
        model = jit.create_model(name, size, 1000)
    assert abs(count_params(model) / 1e6 - paper_m) / paper_m < 0.005


def test_jit_patchify_roundtrip_and_layout():
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(jit.unpatchify(jit.patchify(x, 8), 8), x)
    tokens = jit.patchify(x, 8)
    assert torch.equal(tokens[0, 1, :3], x[0, :, 0, 8])           # token 1 = row 0, col 1; channels fastest


def test_jit_conversions_roundtrip_and_clamp():
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(4, 3, 8, 8, dtype=torch.float64, generator=g), torch.randn(4, 3, 8, 8, dtype=torch.float64,
                                                                                 generator=g)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=torch.float64)     # away from both clamps
    tb = t.view(-1, 1, 1, 1)
    z = tb * x + (1 - tb) * e
    v = x - e
    assert torch.allclose(jit.x_to_v(x, z, t), v, atol=1e-12)
    assert torch.allclose(jit.v_to_x(v, z, t), x, atol=1e-12)
    for kind, truth in (("x", x), ("eps", e), ("v", v)):
        assert torch.allclose(jit.to_x(kind, truth, z, t), x, atol=1e-10)
        assert torch.allclose(jit.to_eps(kind, truth, z, t), e, atol=1e-10)
        assert torch.allclose(jit.to_v(kind, truth, z, t), v, atol=1e-10)
    # At t = 1 the clamp caps 1/(1-t) at 1/0.05 = 20: finite, and exactly (x - z) * 20.
    t1 = torch.ones(4, dtype=torch.float64)
    out = jit.x_to_v(x, e, t1)
    assert torch.isfinite(out).all() and torch.allclose(out, (x - e) / 0.05)


def test_jit_t_sampler_is_logit_normal():
    torch.manual_seed(0)
    t = jit.sample_t(200_000, "cpu")
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean() - jit.P_MEAN) < 0.01 and abs(logit.std() - jit.P_STD) < 0.01
    assert 0 < t.min() and t.max() < 1


class FieldModel(torch.nn.Module):
    """A stand-in network for the sampler tests: out = fn(z, t, y), with the attributes sample() reads."""

    def __init__(self, fn, pred, num_classes=10, size=8):
        super().__init__()
        self.fn, self.pred, self.num_classes, self.img_size = fn, pred, num_classes, size
        self.config, self.noise_scale, self.calls = "JiT-B/16", 1.0, []
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, z, t, y):
        self.calls.append(z.shape[0])
        return self.fn(z, t, y)


def test_jit_heun_is_exact_on_a_linear_field():
    """v(z) = a*z: Heun multiplies z by 1 + ha + (ha)^2/2 per step, the final Euler step by 1 + ha."""
    a, steps = -0.7, 10
    model = FieldModel(lambda z, t, y: a * z, pred="v")
    noise = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    out = jit.sample(model, torch.zeros(3, dtype=torch.long), steps=steps, cfg=1.0, noise=noise.float(),
                     solver="heun")
    h = 1 / steps
    expected = noise * (1 + h * a + (h * a) ** 2 / 2) ** (steps - 1) * (1 + h * a)
    assert torch.allclose(out.double(), expected.clamp(-1, 1), atol=1e-5)
    assert len(model.calls) == 2 * (steps - 1) + 1                 # Heun: 2 evaluations/step, last step Euler


def test_jit_sampler_with_x_prediction_follows_the_straight_path_and_the_clamp():
    """A perfect x-predictor (x* everywhere) moves z on the line t*x* + (1-t)*z0 up to t = 0.95; the last steps
    are inside the t_eps clamp. With d = z0 - x* (residual r = (1-t) d on the path):
      Heun 0.94 -> 0.96: v = -d, then -0.8 d at the Euler point  -> r = 0.06 - 0.02 * 0.9   = 0.042
      Heun 0.96 -> 0.98: v = -0.84 d, then -0.504 d              -> r = 0.042 - 0.02 * 0.672 = 0.02856
      Euler 0.98 -> 1:   v = -0.5712 d                           -> r = 0.02856 - 0.011424  = 0.017136"""
    x_star = torch.rand(2, 3, 8, 8) - 0.5
    model = FieldModel(lambda z, t, y: x_star.expand_as(z), pred="x")
    noise = torch.randn(2, 3, 8, 8) * 0.5
    out = jit.sample(model, torch.zeros(2, dtype=torch.long), steps=50, cfg=1.0, noise=noise)
    assert torch.allclose(out, (x_star + 0.017136 * (noise - x_star)).clamp(-1, 1), atol=1e-5)


def test_jit_cfg_scale_one_is_the_conditional_prediction_and_guidance_is_batched():
    fn = lambda z, t, y: z * 0 + (y.float() / 10).view(-1, 1, 1, 1)   # label-dependent velocity
    noise = torch.randn(2, 3, 8, 8) * 0.1
    y = torch.tensor([2, 5])
    m1 = FieldModel(fn, pred="v")
    out1 = jit.sample(m1, y, steps=4, cfg=1.0, noise=noise, solver="euler")
    assert torch.allclose(out1, noise + (y.float() / 10).view(-1, 1, 1, 1), atol=1e-6)
    assert m1.calls == [2, 2, 2, 2]                                # no unconditional pass at all with cfg = 1
    m3 = FieldModel(fn, pred="v")
    out3 = jit.sample(m3, y, steps=4, cfg=3.0, interval=(0.1, 1.0), noise=noise, solver="euler")
    # t = 0 and 0.25 ... only t in (0.1, 1) is guided: t=0 uses v_c, t=0.25/0.5/0.75 use v_u + 3 (v_c - v_u).
    v_c, v_u = y.float() / 10, torch.ones(2)                       # null label = 10 -> v_u = 1
    expected = noise + (0.25 * v_c + 0.75 * (v_u + 3 * (v_c - v_u))).view(-1, 1, 1, 1)
    assert torch.allclose(out3, expected.clamp(-1, 1), atol=1e-6)
    assert m3.calls == [2, 4, 4, 4]                                # cond + uncond in ONE batched forward


def test_jit_loss_zero_for_perfect_prediction_and_loss_weight_capped():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8) * 2 - 1

    class Oracle(torch.nn.Module):                                 # knows the noise the loss will draw
        def forward(self, z, t, y):
            return {"x": self.x, "eps": self.e, "v": self.x - self.e}[self.pred]

    for pred in ("x", "eps", "v"):
        for loss in ("x", "eps", "v"):
            oracle = Oracle()
            oracle.x, oracle.pred = x, pred
            torch.manual_seed(1)
            jit.sample_t(4, "cpu")                                 # replay the loss's random draws to get e
            oracle.e = torch.randn_like(x)
            torch.manual_seed(1)
            assert jit.flow_loss(oracle, x, torch.zeros(4, dtype=torch.long), 10, pred, loss).item() < 1e-10


def test_jit_overfits_one_batch():
    torch.manual_seed(0)
    args = jit.get_args(TINY + ["--lr", "2e-3", "--ema", "0.9"])
    args.warmup_steps, args.precision = 0, "fp32"
    raw, ema, opt = jit.build(args, 8, torch.device("cpu"))
    ds = jit.Shapes(32)
    x = torch.stack([ds[i][0] for i in range(8)])
    y = torch.tensor([ds[i][1] for i in range(8)])
    losses = [jit.train_step(raw, ema, opt, x, y, s, args).item() for s in range(1, 301)]
    first, last = np.mean(losses[:20]), np.mean(losses[-20:])
    assert last < 0.5 * first, (first, last)                       # stated factor: the loss at least halves


def test_jit_cli_smoke_writes_checkpoint_grid_and_log(tmp_path):
    run = jit.main(TINY + ["--steps", "6", "--batch-size", "8", "--log-every", "3", "--sample-every", "6",
                           "--ckpt-every", "6", "--out", str(tmp_path / "run")])
    ckpt = torch.load(run / "ckpt.pt", weights_only=False)
    assert ckpt["script"] == "jit" and ckpt["step"] == 6 and ckpt["config"] == "tiny" and ckpt["img_size"] == 32
    assert set(ckpt["model"]) == set(ckpt["ema"]) and not any(k.startswith(("_orig_mod", "module")) for k in
                                                               ckpt["model"])
    assert not torch.equal(ckpt["model"]["blocks.0.adaLN_modulation.1.weight"],
                           ckpt["ema"]["blocks.0.adaLN_modulation.1.weight"])   # EMA is a distinct average
    grid = Image.open(run / "grid_0000006.png")
    assert grid.size == (8 * 34 + 2, 8 * 34 + 2) and np.asarray(grid).std() > 1
    assert [r["step"] for r in read_log(run)] == [3, 6] and all(math.isfinite(r["loss"]) for r in read_log(run))
    # The checkpoint rebuilds the model with create_model + model_kwargs, as sample.py does.
    model = jit.create_model(ckpt["config"], ckpt["img_size"], ckpt["num_classes"], **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["ema"])


def test_jit_resume_continues_with_identical_losses(tmp_path):
    common = TINY + ["--batch-size", "8", "--log-every", "1", "--sample-every", "100", "--ckpt-every", "2",
                     "--warmup-epochs", "0"]
    jit.main(common + ["--steps", "4", "--out", str(tmp_path / "a")])
    jit.main(common + ["--steps", "2", "--out", str(tmp_path / "b")])
    jit.main(common + ["--steps", "4", "--out", str(tmp_path / "b"), "--resume"])
    a, b = read_log(tmp_path / "a"), read_log(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]        # steps 3, 4 after resume: bit-identical
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["data"] == {"epoch": 0, "pos": 4}


def test_jit_resume_refuses_wrong_checkpoint_and_existing_run(tmp_path):
    run = tmp_path / "run"
    jit.main(TINY + ["--steps", "1", "--batch-size", "4", "--sample-every", "100", "--out", str(run)])
    with pytest.raises(SystemExit, match="--resume"):             # another config than the run's
        jit.main(TINY[2:] + ["--config", "JiT-S", "--steps", "2", "--batch-size", "4", "--out", str(run),
                             "--resume"])
    with pytest.raises(SystemExit, match="exists: pass --resume"):  # never silently overwrite a run
        jit.main(TINY + ["--steps", "2", "--batch-size", "4", "--out", str(run)])
    other = tmp_path / "other.pt"
    torch.save(dict(script="pixnerd", args={}), other)
    with pytest.raises(SystemExit, match="checkpoint of pixnerd.py, not of jit.py"):
        jit.main(TINY + ["--resume", str(other)])
    with pytest.raises(SystemExit, match="no checkpoint at"):
        jit.main(TINY + ["--resume", str(tmp_path / "nothing")])


def make_images(folder, n, size=40, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size + 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_jit_image_folder_classes_flat_and_corrupt(tmp_path):
    make_images(tmp_path / "cls" / "cat", 3)
    make_images(tmp_path / "cls" / "dog", 2, seed=1)
    ds = jit.ImageFolder(tmp_path / "cls", 32)
    assert ds.classes == ["cat", "dog"] and sorted(ds.labels) == [0, 0, 0, 1, 1]
    x, y = ds[4]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
    # ADM center crop of a 40x48 image at 32: bicubic to 32x38 (short side 32), center 32 columns.
    src = Image.open(ds.files[4]).convert("RGB").resize((38, 32), Image.BICUBIC)
    assert torch.equal(x, torch.from_numpy(np.asarray(src)[:, 3:35].copy()).permute(2, 0, 1))
    assert jit.ImageFolder(tmp_path / "cls", 32, class_cond=False).classes == ["all"]
    make_images(tmp_path / "flat", 3)
    (tmp_path / "flat" / "1.png").write_bytes(b"not a png")        # corrupt file in the middle
    flat = jit.ImageFolder(tmp_path / "flat", 32)
    assert flat.classes == ["all"]
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        items = [flat[i] for i in range(3)]
    assert flat.bad == 1 and torch.equal(items[1][0], items[2][0])  # replaced by the next readable image


def test_jit_clear_errors_for_missing_data(tmp_path):
    with pytest.raises(SystemExit, match="data/ffhq128 not found. To get it: download the FFHQ"):
        jit.main(TINY + ["--data", "ffhq128", "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="no such folder"):
        jit.main(TINY + ["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images"):
        jit.main(TINY + ["--data", str(tmp_path / "empty"), "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit, match="unknown --config"):
        jit.main(TINY[2:] + ["--config", "JiT-Z", "--out", str(tmp_path / "r")])


# ---- jit.py: the paper's ablation (prediction target x loss space, patch size) ----

PAIRS = [(p, l) for p in ("x", "eps", "v") for l in ("x", "eps", "v")]


def test_jit_no_conversion_is_inf_or_nan_at_either_end():
    z, out = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    for t in (torch.tensor([0.95, 0.99, 1.0]), torch.tensor([0.0, 1e-4, 0.05])):
        for kind in ("x", "eps", "v"):
            for convert in (jit.to_x, jit.to_eps, jit.to_v):
                assert torch.isfinite(convert(kind, out, z, t)).all()
    # The clamp caps the weight 1/(1-t) at exactly 1/T_EPS = 20 for t >= 1 - T_EPS.
    ones = torch.ones(1, 1, 1, 1)
    assert jit.to_v("x", ones, 0 * ones, torch.tensor([0.999])).item() == pytest.approx(20.0)


@pytest.mark.parametrize("pred,loss", PAIRS)
def test_jit_every_pred_loss_pair_trains_without_nan(pred, loss):
    torch.manual_seed(0)
    args = jit.get_args(TINY + ["--pred", pred, "--loss", loss, "--lr", "1e-3"])
    args.warmup_steps, args.precision = 0, "fp32"
    raw, ema, opt = jit.build(args, 8, torch.device("cpu"))
    assert raw.pred == pred
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    losses = [jit.train_step(raw, ema, opt, x, torch.arange(4), s, args) for s in range(1, 5)]
    assert all(torch.isfinite(l) for l in losses)
    assert all(torch.isfinite(p).all() for p in raw.parameters())


def test_jit_patch_size_override_and_v_checkpoint_samples_with_v(tmp_path):
    run = jit.main(TINY + ["--steps", "2", "--batch-size", "4", "--sample-every", "100", "--pred", "v",
                           "--patch-size", "4", "--out", str(tmp_path / "v")])
    ckpt = torch.load(run / "ckpt.pt", weights_only=False)
    assert ckpt["pred"] == "v" and ckpt["model_kwargs"]["patch_size"] == 4
    model = jit.create_model(ckpt["config"], ckpt["img_size"], ckpt["num_classes"], **ckpt["model_kwargs"])
    model.load_state_dict(ckpt["ema"])
    assert model.pred == "v" and model.patch == 4 and model.x_embedder.proj1.kernel_size == (4, 4)
    assert model.pos_embed.shape[1] == (32 // 4) ** 2                       # 64 tokens
    # The sampler reads the network's output as v for this checkpoint, as x for an x-prediction one.
    z, t, y = torch.randn(2, 3, 32, 32), 0.5, torch.tensor([1, 2])
    out = model(z, torch.full((2,), t), y)
    assert torch.allclose(jit.velocity(model, z, t, y, 1.0, (0.1, 1.0)), out, atol=1e-6)
    model.pred = "x"
    assert torch.allclose(jit.velocity(model, z, t, y, 1.0, (0.1, 1.0)), (out - z) / 0.5, atol=1e-5)
