"""
Benchmark training steps of each loss on a randomly initialised GPT-2 (or GPT-Neo) of a given shape.

    python bench.py                                            # GPT-2 small shape, ctx 128, batch 4, layer 6
    python bench.py --n_layer 4 --n_head 4 --n_embd 128 --batch_size 8 --layer 2 --naive   # fast vs naive
    python bench.py --device cuda --dtype bfloat16 --compile --ctx 1024 --batch_size 8 --dict_ratio 60
    python bench.py --loss e2e_ds --n_sae 4                    # one sweep step of 4 SAEs vs one single step
    python bench.py --arch gpt_neo --n_layer 8 --n_embd 64 --n_head 16 --ctx 512 --batch_size 20 --layer 4 \
        --dict_ratio 50                                        # TinyStories-1M's shape and the paper's recipe

Each (loss, path) runs in a fresh process, so peak memory is its own (CPU: peak RSS; CUDA: max allocated).
After --warmup steps, --steps optimizer steps are timed. One step = one micro-batch forward + backward,
grad clip and Adam step, exactly train.py's loss_step. --naive also runs train.reference_loss_step, the way
the reference implementation does it: a full clean forward to fp32 logits, a second full forward from the embedding with
the SAE spliced in, full fp32 logits, the plain KL (losses.kl_div), and Adam's per-tensor loop. --n_sae K
also times one step of a sweep of K SAEs of each loss (λ = 1, 2, 4, ...; train.py's shared passes, then each
SAE's loss, backward, clip and Adam step), in its own process, and reports its time and peak memory over the
single step's.

MFU = the step's model FLOPs / the matmul FLOP/s measured on this machine, in this run, in the same
dtype. Model FLOPs count each matmul the step needs once (2·m·n·k): prefix, clean suffix and unembedding
(e2e kinds), SAE forward and backward, spliced suffix forward and its input-gradient backward, and the
three unembedding matmuls of the KL (spliced, clean, gradient). Recomputation is not counted. Attention
is counted over all T keys, also in GPT-Neo's local layers (SDPA computes the masked scores too).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from cli import nonempty, nonneg_int, one_line_errors, positive_float, positive_int, resolve_device
from losses import kl_chunk_defaults

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
# model shape (a random GPT-2 or GPT-Neo; the defaults are GPT-2 small's)
parser.add_argument("--arch", default="gpt2", choices=["gpt2", "gpt_neo"], help="gpt_neo: GPT-Neo's attention "
                    "(no q/k/v bias, unscaled scores, layers alternating global and local as in TinyStories-1M)")
parser.add_argument("--window_size", type=positive_int, default=256, help="GPT-Neo's local attention window")
parser.add_argument("--n_layer", type=positive_int, default=12, help="blocks")
parser.add_argument("--n_head", type=positive_int, default=12, help="attention heads")
parser.add_argument("--n_embd", type=positive_int, default=768, help="d_model")
parser.add_argument("--vocab_size", type=positive_int, default=50257,
                    help="vocabulary (the unembedding the KL runs over)")
# step
parser.add_argument("--ctx", type=positive_int, default=128, help="tokens per sample")
parser.add_argument("--batch_size", type=positive_int, default=4, help="samples per step")
parser.add_argument("--layer", type=nonneg_int, default=6, help="SAE on the residual stream entering this block")
parser.add_argument("--dict_ratio", type=positive_float, default=8.0, help="n_dict = dict_ratio * n_embd")
parser.add_argument("--loss", default="all", choices=["local", "e2e", "e2e_ds", "all"], help="the loss to time; all: each")
parser.add_argument("--kl_chunk", type=positive_int, default=None,
                    help=f"tokens per fused-KL chunk; if unset, losses.kl_chunk for the device, width and dtype ({kl_chunk_defaults()})")
# measurement
parser.add_argument("--steps", type=positive_int, default=5, help="timed steps")
parser.add_argument("--warmup", type=nonneg_int, default=2, help="untimed steps first")
parser.add_argument("--device", type=nonempty, default="auto", help="cpu, cuda or auto")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype for matmuls")
parser.add_argument("--compile", action="store_true",
                    help="torch.compile the GPT blocks, the SAE and the KL's elementwise work per chunk")
parser.add_argument("--naive", action="store_true", help="also run the reference's way, side by side")
parser.add_argument("--n_sae", type=positive_int, default=1, help="also time one sweep step of this many SAEs (K > 1)")
parser.add_argument("--no_kl_share", action="store_true", help="in the sweep, recompute the clean side of the KL per SAE")
parser.add_argument("--json", action="store_true", help="print one JSON line per measurement instead of the table")
parser.add_argument("--profile", type=int, default=0, metavar="K",
                    help="also profile one step after the timed ones and print its top K ops by self time "
                         "(CUDA: kernel time), per (loss, path)")
parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # "loss:fast|naive": one measurement
one_line_errors(parser, "bench.py")


def step_flops(cfg, args, n_dict, n_sae=1):
    """Model FLOPs of one step of n_sae SAEs sharing the frozen passes (see the module docstring)."""
    N, C, V, T = args.batch_size * args.ctx, cfg.n_embd, cfg.vocab_size, args.ctx
    block = 2 * (4 * C * C + 2 * C * cfg.n_inner) + 4 * T * C  # per token: 4 C×C + 2 C×4C matmuls, QKᵀ and AV
    prefix, suffix = args.layer * block, (cfg.n_layer - args.layer) * block
    sae = 2 * C * n_dict * 2 * 3  # encoder + decoder, forward and backward (two grads each)
    if args.loss == "local":
        return N * (prefix + n_sae * sae)
    unembed = 2 * C * V
    return N * (prefix + (suffix + unembed) + n_sae * (sae + 2 * suffix + 2 * unembed))  # clean; spliced fwd, bwd


def matmul_flops(device, dtype, n=2048, reps=3, trials=5):
    """FLOP/s of an n×n×n matmul in dtype, the best of several trials: the machine's attainable peak."""
    a, b = torch.randn(n, n, device=device).to(dtype), torch.randn(n, n, device=device).to(dtype)
    a @ b
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    best = 0.0
    for _ in range(trials):
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t))
    return best


def neo_config(args):
    """The GPTConfig of a GPT-Neo with this shape as model.from_pretrained reads it (TinyStories-1M's: 8 layers,
    d 64, 16 heads, attention_types [[["global", "local"], 4]], window 256, context 2048)."""
    from model import GPTConfig
    return GPTConfig(n_positions=max(2048, args.ctx), vocab_size=args.vocab_size, n_layer=args.n_layer,
                     n_head=args.n_head, n_embd=args.n_embd, n_inner=4 * args.n_embd, qkv_bias=False, scale_attn=False,
                     attention_layers=("global", "local") * (args.n_layer // 2) + ("global",) * (args.n_layer % 2),
                     window_size=args.window_size)


def measure(args, loss, path):
    """One (loss, path) measurement in this process (path: fast, naive or sweep); returns the JSON dict."""
    from model import GPT, GPTConfig
    from config import sae_flags
    from sae import new_sae
    from train import adam, loss_step, reference_loss_step, shared_passes
    device = args.device
    torch.manual_seed(0)
    cfg = neo_config(args) if args.arch == "gpt_neo" else GPTConfig(
        n_positions=max(1024, args.ctx), vocab_size=args.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
        n_embd=args.n_embd, n_inner=4 * args.n_embd)
    model = GPT(cfg).center_writing_weights().to(device).requires_grad_(False).eval()
    k = args.n_sae if path == "sweep" else 1
    saes = [new_sae(cfg.n_embd, int(args.dict_ratio * cfg.n_embd), device) for _ in range(k)]  # ValueError: no memory
    if args.compile:
        for block in model.transformer.h:
            block.compile()
        for sae in saes:
            sae.compile()
    opts = [torch.optim.Adam(sae.parameters(), lr=1e-4) if path == "naive" else adam(sae, 1e-4) for sae in saes]
    step_args = [sae_flags(argparse.Namespace(kl_chunk=args.kl_chunk, batch_size=args.batch_size, ctx=args.ctx,
                                              compile=args.compile, ds_coeff=2.5), loss, args.layer, 2.0 ** i)
                 for i in range(k)]
    idx = torch.randint(0, cfg.vocab_size, (args.batch_size, args.ctx), device=device)
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    if args.dtype == "bfloat16":
        model.cast_frozen(torch.bfloat16)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def step():
        with autocast:
            shared = None if path == "naive" else shared_passes(model, idx, step_args, not args.no_kl_share)
        for sae, opt, r in zip(saes, opts, step_args):
            with autocast:
                loss_value, _ = reference_loss_step(model, sae, idx, r) if path == "naive" else \
                    loss_step(model, sae, r, shared)
            loss_value.backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 10.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        del shared
        sync()

    times = []
    for i in range(args.warmup + args.steps):
        sync()
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    s = sorted(times[args.warmup:])[len(times[args.warmup:]) // 2]  # median
    top = profile_step(step, device, args.profile) if args.profile else None
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 20
    flops = step_flops(cfg, step_args[0], saes[0].n_dict, k)
    mm = matmul_flops(device, torch.bfloat16 if args.dtype == "bfloat16" else torch.float32)
    return dict(loss=loss, path=path, n_sae=k, arch=args.arch, device=device, dtype=args.dtype, compile=args.compile,
                s_per_step=s, tokens_per_s=args.batch_size * args.ctx / s, peak_mem_mb=peak,
                step_gflop=flops / 1e9, matmul_gflops=mm / 1e9, mfu=flops / s / mm, threads=torch.get_num_threads(),
                **({"profile": top} if top else {}))


def profile_step(step, device, k):
    """The top k ops (CPU) or kernels (CUDA) of one step by self time: [(name, ms, share of the step, calls)]."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.startswith("cuda")
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.key_averages() if (e.self_device_time_total if cuda else e.self_cpu_time_total) > 0]
    self_us = [(e.self_device_time_total if cuda else e.self_cpu_time_total) for e in events]
    total = sum(self_us)
    rows = sorted(zip(events, self_us), key=lambda p: -p[1])[:k]
    return [(e.key[:90], us / 1000, us / total, e.count) for e, us in rows]


def check(args):
    """One line on a flag combination the workers would fail on (exits)."""
    if not 0 <= args.layer < args.n_layer:
        sys.exit(f"bench.py: error: --layer {args.layer} is outside 0..{args.n_layer - 1}")
    if args.loss in ("e2e_ds", "all") and args.layer == args.n_layer - 1:
        sys.exit(f"bench.py: error: --loss {args.loss} needs a layer after --layer {args.layer}; use a lower --layer")
    if args.n_embd % args.n_head:
        sys.exit(f"bench.py: error: --n_embd {args.n_embd} is not a multiple of --n_head {args.n_head}")
    if int(args.dict_ratio * args.n_embd) < 1:
        sys.exit(f"bench.py: error: --dict_ratio {args.dict_ratio:g} gives no features at --n_embd {args.n_embd}")
    from sae import check_fits
    try:  # the sweep step holds --n_sae SAEs at once
        check_fits(args.n_embd, int(args.dict_ratio * args.n_embd), args.device, k=args.n_sae,
                   what=f"--dict_ratio {args.dict_ratio:g}")
    except ValueError as e:
        sys.exit(f"bench.py: error: {e}")


def run_worker(argv, loss, path, device):
    """One (loss, path) measurement in a fresh process (this file with --worker): its JSON dict."""
    p = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, "--worker", f"{loss}:{path}",
                        "--device", device], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"bench.py: error: {loss}/{path} failed: {(p.stderr.strip().splitlines() or ['no message'])[-1]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def print_table(rows, args):
    """The measurements as a table (stdout), then each profile when --profile."""
    neo = f" (GPT-Neo, window {args.window_size})" if args.arch == "gpt_neo" else ""
    shape = f"{args.n_layer}L{neo} d{args.n_embd} V{args.vocab_size} ctx {args.ctx} batch {args.batch_size} layer {args.layer} ratio {args.dict_ratio:g}"
    print(f"{shape} | {rows[0]['device']} {args.dtype}{' compile' if args.compile else ''} | "
          f"matmul {rows[0]['matmul_gflops']:.0f} GFLOP/s | {rows[0]['threads']} threads")
    print(f"{'loss':8s} {'path':9s} {'s/step':>8s} {'tok/s':>9s} {'peak MB':>8s} {'MFU':>6s} {'speed-up':>8s} "
          f"{'time/single':>11s} {'mem/single':>10s}")
    for r in rows:
        same = {n["path"]: n for n in rows if n["loss"] == r["loss"]}
        gain = f"{same['naive']['s_per_step'] / r['s_per_step']:.2f}x" if "naive" in same and r["path"] == "fast" else ""
        vs = (f"{r['s_per_step'] / same['fast']['s_per_step']:11.2f} {r['peak_mem_mb'] / same['fast']['peak_mem_mb']:10.2f}"
              if r["path"] == "sweep" else "")
        path = f"sweep x{r['n_sae']}" if r["path"] == "sweep" else r["path"]
        print(f"{r['loss']:8s} {path:9s} {r['s_per_step']:8.3f} {r['tokens_per_s']:9.0f} {r['peak_mem_mb']:8.0f} "
              f"{r['mfu']:6.2f} {gain:>8s} {vs}".rstrip())
    for r in rows if args.profile else []:
        print(f"\nprofile of one {r['loss']} {r['path']} step: top {args.profile} by self "
              f"{'GPU' if r['device'].startswith('cuda') else 'CPU'} time")
        print(f"{'ms':>8s} {'share':>6s} {'calls':>6s}  name")
        for name, ms, share, calls in r["profile"]:
            print(f"{ms:8.2f} {share:6.1%} {calls:6d}  {name}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        args.device = resolve_device(args.device)
    except ValueError as e:
        sys.exit(f"bench.py: error: {e}")
    if args.worker:
        loss, path = args.worker.split(":")
        if args.device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = True
        try:
            print(json.dumps(measure(args, loss, path)))
        except ValueError as e:
            sys.exit(str(e))  # the parent reports this last line of stderr
        return
    check(args)
    losses = ["local", "e2e", "e2e_ds"] if args.loss == "all" else [args.loss]
    todo = [(loss, path) for loss in losses for path in ["fast"] + ["naive"] * args.naive + ["sweep"] * (args.n_sae > 1)
            if not (path == "naive" and loss == "local")]  # naive is the same step as fast for local runs
    rows, t0 = [], time.time()
    for i, (loss, path) in enumerate(todo):
        rows.append(run_worker(argv, loss, path, args.device))
        print(f"bench.py: {loss} {path} {rows[-1]['s_per_step']:.3f} s/step ({i + 1}/{len(todo)}) | "
              f"{time.time() - t0:.0f}s", file=sys.stderr, flush=True)
        if args.json:  # stdout: the JSON lines as they come, or only the table at the end
            print(json.dumps(rows[-1]), flush=True)
    if not args.json:
        print_table(rows, args)


if __name__ == "__main__":
    from cli import run
    run(main, "bench.py")
