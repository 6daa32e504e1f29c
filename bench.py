"""
bench.py: how fast does each paper script train and sample on this machine? (in the spirit of nanoGPT's bench.py)

It times the script's OWN training step, `mod.train_step` (uint8 -> [-1, 1], forward, loss, backward, AdamW, EMA:
the code main() runs, not a copy), built with `mod.build` and compiled with `mod.compile_and_wrap` exactly as
main() does, on synthetic uint8 images already on the device (so the data loader is not measured). It prints

    img/s and ms/step       N steps timed with CUDA events after warm-up (the first steps include torch.compile)
    peak memory             torch.cuda.max_memory_allocated over warm-up + timed steps (CUDA only)
    GFLOP per image         torch.utils.flop_counter on one training step of the plain model (attention included)
    MFU                     achieved FLOP/s / the bf16 (or fp32) matmul rate measured in the same run
    sampler img/s           with --sample: the paper's default sampler (mod.sample, mod.sampler_defaults)

    python bench.py --script jit --config JiT-B/16 --img-size 256 --batch-size 128           # one GPU
    python bench.py --script jit --config JiT-B/16 --sample                                  # + the sampler
    python bench.py --all --sample --json speed.json        # every paper config, one fresh process each
    python bench.py --script jit --device cpu               # CPU: tiny config, 32px, batch 4, fp32, no compile
    python bench.py --script deco --config DeCo-L/16 -- --freq-weight 0    # after --: flags for deco.get_args

The script's flags are its own defaults for `--data imagenet` (the paper's setting; no image is read). REPA's
frozen DINOv2 encoder needs downloaded weights, so bench runs without REPA unless --repa is given (see --repa).
"""

import argparse
import datetime
import importlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------------------------
# ---- 1. What --all runs, and the figures we compare with ----
# ---------------------------------------------------------------------------------------------------------------
# (script, config, batch) at 256px: the paper configs, named as in each script's CONFIGS. Batch 128 for
# JiT (the official figures below were measured at 128), 64 for the larger-activation pixel-decoder models.
PAPER_RUNS = [
    ("jit", "JiT-B/16", 128),
    ("jit", "JiT-L/16", 128),
    ("pixnerd", "PixNerd-L/16", 64),
    ("pixeldit", "PixelDiT-B/16", 64),
    ("pixeldit", "PixelDiT-XL/16", 64),
    ("deco", "DeCo-L/16", 64),
]
# The official LTH14/JiT code, measured by us on one H100 80GB (bf16, batch 128 at 256px, random data on the GPU,
# its own train step with EMA; its sampler: Heun-50 with CFG at batch 128). Printed next to ours on an H100.
OFFICIAL_H100 = {
    ("jit", "JiT-B/16"): dict(img_per_s=1181, peak_gib=24.9, sample_img_per_s=16.0),
    ("jit", "JiT-L/16"): dict(img_per_s=400, peak_gib=67.3),
}

# ---------------------------------------------------------------------------------------------------------------
# ---- 2. Measuring: time, FLOPs, the matmul peak ----
# ---------------------------------------------------------------------------------------------------------------


def timed(fn, n, device):
    """Seconds per call of fn(), averaged over n calls. On CUDA the kernels run asynchronously: CUDA events
    bracket the n calls and one synchronize at the end reads them (no host sync between steps, as in training)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000 / n
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


# torch.utils.flop_counter knows the CUDA attention kernels (flash, memory-efficient, cuDNN) but, as of torch 2.13,
# not the CPU flash kernel that F.scaled_dot_product_attention runs on a CPU: attention would count as 0 there. We
# add it with the same convention: forward = Q K^T and P V (2 FLOPs per multiply-add); backward = 5 such matmuls
# (flash recomputes P = softmax(Q K^T), then dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q).
def _attn_fwd_flops(q, k, v, *args, out_shape=None, **kwargs):      # q (B, heads, Nq, d), k/v (B, heads, Nk, d)
    return 2 * 2 * q[0] * q[1] * q[2] * k[2] * q[3]


def _attn_bwd_flops(grad_out, q, k, v, *args, out_shape=None, **kwargs):
    return 5 * 2 * q[0] * q[1] * q[2] * k[2] * q[3]


CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attn_fwd_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _attn_bwd_flops,
}


def count_flops(fn):
    """FLOPs of everything fn() runs (matmuls, convolutions, attention; elementwise ops count 0), eagerly.
    Counted by torch.utils.flop_counter at the aten level, so the forward, the backward and any extra network in
    the step (a REPA encoder) are all in. Returns an int."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(device, dtype):
    """The FLOP/s this device reaches on large square matmuls of `dtype`: the denominator of our MFU. Measured
    rather than taken from a datasheet (an H100 SXM is sold as 989 TFLOP/s dense bf16; we measured ~784), so MFU
    says how close the step is to what this very GPU, at its clocks and power limit, can do."""
    n, reps = (8192, 20) if device.type == "cuda" else (1024, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timed(lambda: a @ b, 3, device)                           # warm-up: cuBLAS heuristics, clocks up
    return 2 * n**3 / timed(lambda: a @ b, reps, device)      # 2 FLOPs per multiply-add


def machine_line(device):
    """One line saying what was measured, with what, and when."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        what = f"{prop.name} ({prop.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    else:
        what = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return f"{what}, torch {torch.__version__}, {when}"


# ---------------------------------------------------------------------------------------------------------------
# ---- 3. One benchmark: one script, one config ----
# ---------------------------------------------------------------------------------------------------------------


def load_script(name):
    """Import jit.py / pixnerd.py / ... from this folder as a module."""
    if not (HERE / f"{name}.py").is_file():
        raise SystemExit(f"--script {name}: no {name}.py next to bench.py; choose one of: "
                         f"{', '.join(sorted({s for s, _, _ in PAPER_RUNS if (HERE / f'{s}.py').is_file()}))}")
    sys.path.insert(0, str(HERE))
    return importlib.import_module(name)


def script_args(mod, b, device):
    """The script's own argparse Namespace for this run, finished the way its main() finishes it."""
    argv = ["--data", b.data, "--config", b.config, "--img-size", str(b.img_size), "--batch-size", str(b.batch_size),
            "--device", str(device)]
    argv += [] if b.compile is None else ["--compile" if b.compile else "--no-compile"]
    argv += [] if b.precision is None else ["--precision", b.precision]
    args = mod.get_args(argv + b.extra)                 # an unknown --config stops here, with the choices
    # get_args resolves compile / precision from --device (compile and bf16 on CUDA, fp32 on CPU) and the lr; an
    # lr warmup (set by main() from the dataset size) stays off here: the lr's value does not change the speed.
    if hasattr(args, "repa"):
        args.repa = b.repa
    return args


def repa_encoder(mod, args, device):
    """The frozen REPA encoder (DINOv2 ViT-B/14) with --repa, through the script's own load_dinov2; else None."""
    if not getattr(args, "repa", False):
        return None
    return mod.load_dinov2(device, mod.CONFIGS[args.config]["patch"], getattr(args, "dinov2_path", None))


def bench_one(b):
    """Build, count, warm up, time. Returns a dict of figures (also what --json writes)."""
    mod = load_script(b.script)
    device = torch.device(b.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", device.index or 0)  # set_device(torch.device("cuda")) raises: no index
        torch.cuda.set_device(device)
    args = script_args(mod, b, device)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = True        # as main(): TF32 for whatever still runs in fp32
    torch.backends.cudnn.allow_tf32 = True
    raw, ema, opt = mod.build(args, b.num_classes, device)
    wrap = getattr(mod, "compile_and_wrap", None)       # main()'s own wrapping (torch.compile of the whole model)
    model = wrap(raw, args, device) if wrap else (torch.compile(raw) if args.compile else raw)
    encoder = repa_encoder(mod, args, device)
    step_kwargs = {"encoder": encoder} if encoder is not None else {}

    # Synthetic data, already on the device, as the loader would hand it over: uint8 images, long labels. The same
    # batch every step: the step's cost does not depend on the pixel values.
    B, H = args.batch_size, args.img_size
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randint(0, 256, (B, 3, H, H), dtype=torch.uint8, device=device, generator=gen)
    y = torch.randint(0, b.num_classes, (B,), device=device, generator=gen)

    # FLOPs per image of one training step, counted eagerly on the plain model at batch 2 (FLOPs are linear in
    # the batch; a full-batch eager step could need more memory than the compiled one). Also one forward alone,
    # to compare with the papers' "Gflops" (which are multiply-adds: half our count).
    nb = min(2, B)
    train_flops = count_flops(lambda: mod.train_step(raw, ema, opt, x[:nb], y[:nb], 1, args, **step_kwargs)) / nb
    z, t = torch.randn(nb, 3, H, H, device=device), torch.rand(nb, device=device)
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"):
        fwd_flops = count_flops(lambda: raw(z, t, y[:nb])) / nb

    # Warm-up (the first call compiles the forward and the backward: minutes for the large configs), then N timed
    # steps. The peak is reset here so the eager FLOP-count step above does not enter it; it does include the
    # compile-time peak, as a real run's first steps would.
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = 1
    losses = []

    def one_step():
        nonlocal step
        step += 1
        losses.append(mod.train_step(model, ema, opt, x, y, step, args, **step_kwargs)["loss"])

    t0 = time.perf_counter()
    if b.warmup:
        timed(one_step, b.warmup, device)
    warmup_s = time.perf_counter() - t0
    step_s = timed(one_step, b.steps, device)
    # Read the losses only now (a host sync per step would be timed too). Random weights on random data can
    # diverge; that does not change the speed, so it is a warning, not an error.
    if not torch.isfinite(torch.stack(losses[-b.steps:])).all():
        print("warning: non-finite loss during the timed steps (random data and weights; the speed is still valid)")
    peak_gib = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    # The matmul peak in the precision the step ran in (bf16 autocast -> bf16 tensor cores), measured after the
    # model so the GPU is as warm as during the steps.
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = matmul_peak(device, dtype)
    r = dict(script=b.script, config=args.config, img_size=H, batch_size=B, num_classes=b.num_classes,
             precision=args.precision, compile=bool(args.compile), repa=bool(getattr(args, "repa", False)),
             device=device.type, machine=machine_line(device), torch=torch.__version__,
             params_m=sum(p.numel() for p in raw.parameters()) / 1e6, steps=b.steps, warmup=b.warmup,
             warmup_s=warmup_s, step_ms=step_s * 1000, img_per_s=B / step_s, peak_gib=peak_gib,
             train_gflop_per_img=train_flops / 1e9, fwd_gflop_per_img=fwd_flops / 1e9,
             matmul_peak_tflops=peak / 1e12, matmul_dtype=str(dtype).split(".")[-1],
             mfu=train_flops * B / step_s / peak)

    if b.sample:
        r.update(bench_sampler(mod, ema.model, args, b, device, peak))
    return r


def bench_sampler(mod, net, args, b, device, peak):
    """img/s of mod.sample with the paper's defaults (sampler_defaults) on the EMA model at --sample-batch.
    With compile on, the EMA model is compiled with static shapes: the sampler calls it at batch B (outside the
    CFG interval) and 2B (cond + uncond), i.e. two graphs, compiled during the warm-up call."""
    d = mod.sampler_defaults(args.config, args.img_size)
    steps = b.sample_steps or d["steps"]
    n = b.sample_batch or args.batch_size
    y = torch.arange(n, device=device) % b.num_classes
    flops = count_flops(lambda: mod.sample(net, y[:2], steps=steps)) / 2     # eager, plain EMA model, batch 2
    run = torch.compile(net, dynamic=False) if args.compile else net
    timed(lambda: mod.sample(run, y, steps=steps), 1, device)                 # warm-up (and compile)
    sec = timed(lambda: mod.sample(run, y, steps=steps), b.sample_reps, device)
    return dict(sampler=dict(d, steps=steps), sample_batch=n, sample_compile=bool(args.compile),
                sample_img_per_s=n / sec,
                sample_gflop_per_img=flops / 1e9, sample_mfu=flops * n / sec / peak)


def report(r):
    """Print one run's figures in a few lines."""
    print(f"{r['script']} {r['config']} @{r['img_size']}px, batch {r['batch_size']}, {r['precision']}, "
          f"compile={r['compile']}, repa={r['repa']}, {r['params_m']:.1f}M params")
    print(f"  measured on {r['machine']}")
    peak = f"peak {r['peak_gib']:.1f} GiB" if r["peak_gib"] is not None else "peak memory n/a on CPU"
    print(f"  train : {r['img_per_s']:9.1f} img/s  {r['step_ms']:8.1f} ms/step  {peak}  "
          f"{r['train_gflop_per_img']:.2f} GFLOP/img (forward {r['fwd_gflop_per_img']:.2f})  "
          f"MFU {100 * r['mfu']:.1f}% of {r['matmul_peak_tflops']:.3g} TFLOP/s ({r['matmul_dtype']} matmul, "
          f"measured); warm-up {r['warmup']} steps {r['warmup_s']:.0f} s")
    if "sample_img_per_s" in r:
        s = r["sampler"]
        print(f"  sample: {r['sample_img_per_s']:9.2f} img/s at batch {r['sample_batch']} ({s['solver']}, "
              f"{s['steps']} steps, cfg {s['cfg']} in {tuple(s['interval'])}, "
              f"{'compiled' if r['sample_compile'] else 'eager'})  "
              f"{r['sample_gflop_per_img']:.1f} GFLOP/img  MFU {100 * r['sample_mfu']:.1f}%")
    official = OFFICIAL_H100.get((r["script"], r["config"]))
    if official and "H100" in r["machine"] and r["img_size"] == 256 and r["batch_size"] == 128:
        line = f"  official LTH14/JiT on one H100 (measured by us): {official['img_per_s']} img/s, " \
               f"{official['peak_gib']} GiB -> ours {r['img_per_s'] / official['img_per_s']:.2f}x"
        if "sample_img_per_s" in official and r.get("sample_batch") == 128 and r["sampler"]["steps"] == 50:
            line += f"; sampler {official['sample_img_per_s']} img/s -> ours " \
                    f"{r['sample_img_per_s'] / official['sample_img_per_s']:.2f}x"
        print(line)


# ---------------------------------------------------------------------------------------------------------------
# ---- 4. --all: every paper config, each in a fresh process so memory peaks and compile caches do not mix ----
# ---------------------------------------------------------------------------------------------------------------
COLUMNS = "| script | config | batch | img/s | step ms | peak GiB | GFLOP/img | MFU | sampler img/s |"


def table_row(r):
    def f(v, fmt):
        return "n/a" if v is None else format(v, fmt)
    return (f"| {r['script']} | {r['config']} | {r['batch_size']} | {r['img_per_s']:.0f} | {r['step_ms']:.1f} | "
            f"{f(r['peak_gib'], '.1f')} | {r['train_gflop_per_img']:.4g} | {100 * r['mfu']:.0f}% | "
            f"{f(r.get('sample_img_per_s'), '.1f')} |")


def bench_all(b):
    """Run bench.py once per (script, config) in a subprocess; print a Markdown table. --script (comma list)
    restricts the scripts, --config / --img-size / --batch-size replace the paper's values (e.g. tiny on CPU)."""
    only = b.script.split(",") if b.script else None
    runs = [(s, b.config or c, b.batch_size or bs) for s, c, bs in PAPER_RUNS if not only or s in only]
    runs = list(dict.fromkeys(runs))                  # --config tiny: one run per script, not one per paper config
    runs += [(s, b.config, b.batch_size) for s in (only or []) if s not in {r[0] for r in PAPER_RUNS}]
    # Flags shared by every run; the per-run ones are added below.
    common = [a for a in ["--sample"] if b.sample]
    for flag in ("device", "steps", "warmup", "num_classes", "sample_steps", "sample_batch", "sample_reps",
                 "precision", "data"):
        if getattr(b, flag) is not None:
            common += [f"--{flag.replace('_', '-')}", str(getattr(b, flag))]
    common += [] if b.compile is None else ["--compile" if b.compile else "--no-compile"]
    common += ["--repa"] if b.repa else []
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (script, config, batch) in enumerate(runs):
            if not (HERE / f"{script}.py").is_file():
                print(f"skip {script} {config}: no {script}.py yet")
                continue
            out = Path(tmp) / f"{i}.json"
            cmd = [sys.executable, str(HERE / "bench.py"), "--script", script, "--json", str(out), *common]
            cmd += [] if config is None else ["--config", config]
            cmd += [] if batch is None else ["--batch-size", str(batch)]
            cmd += ["--img-size", str(b.img_size or 256)]
            cmd += ["--", *b.extra] if b.extra else []
            print(f"\n$ {' '.join(cmd[1:])}", flush=True)
            if subprocess.run(cmd).returncode or not out.is_file():
                print(f"FAILED: {script} {config} (see above); going on with the next run")
                results.append(dict(script=script, config=config, batch_size=batch, error=True))
                continue
            results.append(json.loads(out.read_text()))
    ok = [r for r in results if not r.get("error")]
    print("\n" + (ok[0]["machine"] if ok else "no run succeeded"))
    print(COLUMNS + "\n" + "|---" * 9 + "|")
    for r in results:
        print(table_row(r) if not r.get("error") else f"| {r['script']} | {r['config']} | {r['batch_size']} | "
              "failed | | | | | |")
    return results


# ---------------------------------------------------------------------------------------------------------------
# ---- 5. main ----
# ---------------------------------------------------------------------------------------------------------------


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Time a paper script's training step and sampler.",
                                epilog="Flags after -- go to the script's own get_args (e.g. -- --patch-size 8).")
    # -- what to run
    p.add_argument("--script", help="jit, pixnerd, pixeldit or deco (with --all: a comma list to restrict)")
    p.add_argument("--config", help="model config (default: the paper config on CUDA, 'tiny' on CPU)")
    p.add_argument("--img-size", type=int, help="image side (default 256; one run on a CPU: 32)")
    p.add_argument("--batch-size", type=int, help="batch (default: the paper run's; one run on a CPU: 4)")
    p.add_argument("--num-classes", type=int, default=1000, help="real classes (ImageNet: 1000)")
    p.add_argument("--data", default="imagenet", help="the script's --data preset whose defaults apply (no "
                   "image is read)")
    p.add_argument("--repa", action="store_true", help="include REPA's DINOv2 encoder (needs its weights)")
    p.add_argument("--all", action="store_true", help="every paper config of every script present, "
                   "each in a fresh subprocess")
    # -- how long
    p.add_argument("--steps", type=int, help="timed training steps (default 20 on CUDA, 2 on CPU)")
    p.add_argument("--warmup", type=int, help="untimed steps first, compile included (default 5 on CUDA, 1 on CPU)")
    p.add_argument("--sample", action="store_true", help="also time the paper's default sampler")
    p.add_argument("--sample-batch", type=int, help="images per sampler call (default: --batch-size)")
    p.add_argument("--sample-steps", type=int, help="override the paper's sampler steps (tests only)")
    p.add_argument("--sample-reps", type=int, default=1, help="timed sampler calls")
    # -- system
    p.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda if available)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile (default: on CUDA)")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="autocast dtype (default: bf16 on CUDA)")
    p.add_argument("--json", help="write the figures to this file (--all: a list)")
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    b = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    b.extra = extra
    for flag in ("img_size", "batch_size", "num_classes", "steps", "sample_batch", "sample_steps", "sample_reps"):
        if getattr(b, flag) is not None and getattr(b, flag) <= 0:
            raise SystemExit(f"--{flag.replace('_', '-')} {getattr(b, flag)}: must be a positive whole number.")
    if b.warmup is not None and b.warmup < 0:
        raise SystemExit(f"--warmup {b.warmup}: must be 0 or more.")
    cuda = (b.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"--device {b.device}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu.")
    if b.all:
        if not cuda and not b.config:
            raise SystemExit("--all runs the paper configs at 256px, which needs a GPU; on a CPU add "
                             "--config tiny --img-size 32 --batch-size 4.")
        return b
    if not b.script:
        raise SystemExit("pass --script NAME (jit, pixnerd, pixeldit, deco) or --all.")
    paper = [(c, bs) for s, c, bs in PAPER_RUNS if s == b.script]
    b.config = b.config or (paper[0][0] if cuda and paper else "tiny")
    b.img_size = b.img_size or (256 if cuda else 32)
    b.batch_size = b.batch_size or (dict(paper).get(b.config, 64) if cuda else 4)
    b.steps = b.steps or (20 if cuda else 2)
    b.warmup = b.warmup if b.warmup is not None else (5 if cuda else 1)
    return b


def main(argv=None):
    b = get_args(argv)
    if b.all:
        results = bench_all(b)
    else:
        try:
            results = bench_one(b)
        except torch.OutOfMemoryError:
            raise SystemExit(f"out of GPU memory: {b.script} {b.config} at batch {b.batch_size}; "
                             "lower --batch-size.")
        report(results)
    if b.json:
        Path(b.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
