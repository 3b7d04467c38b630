"""
Train SAEs on GPT-2's residual stream entering block --layer: local (MSE), e2e (KL) or e2e_ds (KL + MSE at
every later layer), with the recipe of Braun et al. 2024. One SAE, or a sweep of many sharing each batch.

    python train.py --loss e2e_ds --layer 6                    # the paper's SAE_e2e+ds (GPT-2 small, OpenWebText)
    python train.py --loss local --layer 2 --l1 4              # a local SAE at another sparsity
    python train.py --loss local,e2e,e2e_ds --layer 6 --l1 local=1,2,4,8 e2e=0.5,1,2,3 e2e_ds=10,25,50,100
                                                               # a sweep: the paper's Fig. 1 at layer 6, 12 SAEs
    python train.py --resume --out_dir out/e2e_ds_L6           # continue a stopped run with its own arguments
    python train.py --model roneneldan/TinyStories-1M --loss e2e_ds   # the paper's TinyStories-1M recipe (see --help)
    torchrun --standalone --nproc_per_node=4 train.py --loss e2e --layer 6  # 4 GPUs, DDP on the SAE
    # a small CPU run of GPT-2 small (12 layers) on a local text file (minutes):
    python train.py --model gpt2 --dataset input.txt --loss e2e --layer 6 --ctx 128 --n_samples 512 \\
        --batch_size 4 --grad_accum 1 --dict_ratio 4 --eval_samples 16 --eval_every 256 --warmup_samples 64 --device cpu

Sweeps: --loss, --layer and --l1 take comma lists, and --l1 also one KIND=LIST token per kind; the SAEs are
every (loss, layer, λ) combination, and a kind given no λ gets its paper default. With one SAE --out_dir is
its run folder; with several each gets the run folder --out_dir/{loss}_L{layer}_l{λ}. Each SAE starts, sees
the batches and ends exactly as its single run would; they share the batch, the frozen prefix and the clean
pass (and the clean side of the KL), so a sweep of K costs far less than K runs.

Long runs: --out_dir gets ckpt.pt (every SAE) every --save_every samples and on SIGTERM/SIGINT (the step
finishes, then it saves and exits with 128 + the signal). A run killed in any way continues from its last
checkpoint exactly as if never stopped: with --resume, or by running the same command again. A step with a
non-finite loss or gradient is skipped for that SAE; --max_bad_steps in a row stop the run.
DDP: --batch_size is per process, --grad_accum counts micro-batches over all processes, so the samples per
step (batch_size * grad_accum) and the result do not depend on the number of processes (nor does a resume).
"""
import argparse
import contextlib
import importlib.util
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

import torch

from checkpoint import (PER_SAE, append_eval_log, check_out_dir, check_resumable, load_checkpoint, restore_rng,
                        save_checkpoint, trim_eval_log)
from losses import clean_logprobs, downstream_mse, fused_kl_div, mse_loss, sparsity_loss

# paper Table 2 ("similar CE increase"): λ per (loss, layer); β (--ds_coeff) per layer. For a layer the
# paper did not train, the nearest of 2, 6, 10 is used (the lower one on a tie).
L1_SIMILAR_CE = {("local", 2): 0.8, ("e2e", 2): 0.5, ("e2e_ds", 2): 10.0, ("local", 6): 4.0, ("e2e", 6): 3.0,
                 ("e2e_ds", 6): 50.0, ("local", 10): 6.0, ("e2e", 10): 1.5, ("e2e_ds", 10): 1.75}
DS_COEFF = {2: 2.5, 6: 2.5, 10: 0.05}
KL_COEFF = {"e2e": 1.0, "e2e_ds": 0.5}
KINDS = ("local", "e2e", "e2e_ds")
# the paper's TinyStories-1M recipe: what a flag not on the command line takes when --model is TinyStories-1M
# (model.is_tinystories_1m). lr and n_samples are per kind, β (--ds_coeff) 1000 for e2e_ds; the KL coefficients are
# the usual 1.0 / 0.5. λ: the paper gives none. local 0.01 and e2e 3 are the reference implementation's own
# TinyStories-1M configs (layer 4, ratio 50); e2e_ds 50 is our estimate, e2e's 3 times GPT-2's e2e_ds / e2e ratio
# at layer 6 (50 / 3). Sweep them: --l1 local=0.005,0.01,0.02 e2e=1.5,3,6 e2e_ds=25,50,100.
TINYSTORIES = dict(dataset="apollo-research/roneneldan-TinyStories-tokenizer-gpt2", ctx=512, dict_ratio=50.0, layer="4",
                   batch_size=20, grad_accum=1, warmup_samples=20_000, grad_clip=1.0)
TINYSTORIES_PER_KIND = dict(lr=dict(local=1e-2, e2e=1e-3, e2e_ds=1e-3),
                            n_samples=dict(local=400_000, e2e=450_000, e2e_ds=250_000),
                            l1=dict(local=0.01, e2e=3.0, e2e_ds=50.0))
TINYSTORIES_HELP = """TinyStories-1M (--model roneneldan/TinyStories-1M, or a local folder whose config.json is a gpt_neo of
8 layers with d_model 64): every flag not given takes the paper's TinyStories recipe instead of the GPT-2
defaults above: --dataset apollo-research/roneneldan-TinyStories-tokenizer-gpt2 --ctx 512 --dict_ratio 50
--layer 4 --batch_size 20 --grad_accum 1 --warmup_samples 20000 --grad_clip 1.0, --ds_coeff 1000 (e2e_ds);
per kind --lr local 1e-2, e2e and e2e_ds 1e-3; --n_samples local 400k, e2e 450k, e2e_ds 250k; --l1 local 0.01,
e2e 3 (the reference implementation's TinyStories configs), e2e_ds 50 (an estimate: 3 x GPT-2's e2e_ds/e2e
ratio at layer 6). A sweep mixing kinds whose recipe --lr or --n_samples differ must give that flag."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default."""


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
# model
parser.add_argument("--model", default="gpt2", help="hub id (gpt2, gpt2-medium, ...) or a local save_pretrained folder")
parser.add_argument("--layer", default="6", help="SAE on the residual stream entering this block; a comma list sweeps")
parser.add_argument("--no_center", action="store_true", help="do not centre the residual stream (center_writing_weights)")
# sae and loss
parser.add_argument("--loss", default="e2e_ds", help="local, e2e or e2e_ds; a comma list sweeps")
parser.add_argument("--dict_ratio", type=float, default=60.0, help="n_dict = dict_ratio * d_model")
parser.add_argument("--l1", nargs="+", default=None, help="sparsity coefficient λ, a comma list, or KIND=LIST tokens "
                    "(local=1,2 e2e_ds=10,50); default: paper Table 2 'similar CE' value for (loss, layer), the "
                    "nearest of layers 2/6/10 for other layers")
parser.add_argument("--kl_coeff", type=float, default=None, help="default 1.0 (e2e), 0.5 (e2e_ds)")
parser.add_argument("--ds_coeff", type=float, default=None, help="β of the downstream MSE; default 2.5 (layers 2, 6), "
                    "0.05 (layer 10), nearest of those for other layers")
parser.add_argument("--ds_layers", default="all", help="e2e_ds: the later residuals of the downstream MSE (blocks they "
                    "enter): all (the paper), next, next:N, last, or a comma list of block indices after --layer")
# ablations: start from an SAE, or train the first part of the run as local
parser.add_argument("--init_from", default=None, help="start every SAE from this one (a run folder, an Apollo .pt or a "
                    "SAELens folder) with a fresh optimizer; --layer, --dict_ratio, --model and centring default to its")
parser.add_argument("--local_frac", type=float, default=0.0, help="train the first this fraction of the samples with "
                    "the local loss (λ --local_l1), the rest with --loss, under one LR schedule")
parser.add_argument("--local_l1", type=float, default=None, help="λ of the local phase of --local_frac; default: the "
                    "paper's local λ for the layer")
# data
parser.add_argument("--dataset", default="apollo-research/Skylion007-openwebtext-tokenizer-gpt2",
                    help="hub dataset (input_ids or text column) or a local .txt/.jsonl/.parquet file or folder")
parser.add_argument("--ctx", type=int, default=1024, help="tokens per sample")
parser.add_argument("--data_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "nanosae"), help="token cache")
# optimization
parser.add_argument("--n_samples", type=int, default=400_000, help="training samples (rows of ctx tokens)")
parser.add_argument("--batch_size", type=int, default=8, help="micro-batch, in samples")
parser.add_argument("--grad_accum", type=int, default=2, help="micro-batches per optimizer step (across all ranks)")
parser.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (Adam)")
parser.add_argument("--warmup_samples", type=int, default=20_000, help="linear warmup from 0 over this many samples")
parser.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine decay to this fraction of --lr")
parser.add_argument("--grad_clip", type=float, default=10.0, help="clip the SAE's grad norm (0: off)")
# evaluation and logging
parser.add_argument("--eval_every", type=int, default=20_000, help="evaluate every this many samples (and at the end)")
parser.add_argument("--eval_samples", type=int, default=500, help="held-out rows for evaluation (never trained on)")
parser.add_argument("--log_every", type=int, default=10, help="log every this many steps")
parser.add_argument("--wandb", action="store_true", help="also log to Weights & Biases")
parser.add_argument("--wandb_project", default="nanosae", help="W&B project")
# system
parser.add_argument("--out_dir", default=None, help="default out/{loss}_L{layer} (a sweep: out/sweep_{losses}_L{layers})")
parser.add_argument("--save_every", type=int, default=20_000, help="checkpoint every this many samples (and at the end)")
parser.add_argument("--resume", action="store_true", help="continue the run in --out_dir (which must hold one); "
                    "flags not given take the run's values. Without it an unfinished run with the same flags continues")
parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype for matmuls")
parser.add_argument("--compile", action="store_true", help="torch.compile the GPT blocks and the SAE")
parser.add_argument("--kl_chunk", type=int, default=None, help="tokens per chunk of the fused KL (default 64 on CPU, 512 on CUDA)")
parser.add_argument("--no_kl_share", action="store_true", help="with several e2e SAEs, recompute the clean side of "
                    "the KL per SAE instead of holding it once (batch_size x ctx x vocab fp32)")
parser.add_argument("--max_bad_steps", type=int, default=10, help="stop after this many non-finite steps in a row")
parser.add_argument("--seed", type=int, default=0, help="SAE init and batch order")
parser.error = lambda msg: sys.exit(f"train.py: error: {msg}")  # one line, no usage dump
parser.epilog = TINYSTORIES_HELP


def nearest_paper_layer(layer):
    return min((2, 6, 10), key=lambda l: (abs(l - layer), l))


def split_list(flag, value, conv):
    """'1,2,4' (or a list of such tokens, or a number) -> [conv(each)]; ValueError names the bad token."""
    tokens = [t.strip() for v in (value if isinstance(value, list) else [value]) for t in str(v).split(",")]
    try:
        return [conv(t) for t in tokens]
    except ValueError:
        bad = next(t for t in tokens if not _converts(conv, t))
        raise ValueError(f"{flag} {','.join(tokens)!r}: {bad!r} is not a{'n integer' if conv is int else ' number'}") from None


def _converts(conv, t):
    try:
        conv(t)
        return True
    except ValueError:
        return False


def parse_l1(value, losses):
    """--l1 tokens -> {loss: [λ, ...] or None (paper default)}: one list for every kind, or KIND=LIST tokens."""
    if value is None:
        return dict.fromkeys(losses)
    tokens = value if isinstance(value, list) else [value]
    keyed = [str(t) for t in tokens if "=" in str(t)]
    if not keyed:
        return dict.fromkeys(losses, split_list("--l1", tokens, float))
    if len(keyed) != len(tokens):
        raise ValueError(f"--l1 {' '.join(map(str, tokens))!r} mixes plain lists and KIND=LIST tokens; use one form")
    out = dict.fromkeys(losses)
    for t in keyed:
        kind, lams = t.split("=", 1)
        if kind not in losses:
            raise ValueError(f"--l1 {t!r} names kind {kind!r}, which is not in --loss {','.join(losses)}")
        if out[kind] is not None:
            raise ValueError(f"--l1 gives kind {kind!r} twice")
        out[kind] = split_list(f"--l1 {kind}=", lams, float)
    return out


def plan_runs(args):
    """One Namespace per SAE: args with its own loss, layer, l1, kl_coeff, ds_coeff, name and out_dir; the
    flags a single run of that SAE would have. ValueError (one line) on a bad list."""
    losses = split_list("--loss", args.loss, str)
    for loss in losses:
        if loss not in KINDS:
            raise ValueError(f"--loss {loss!r} is not one of {', '.join(KINDS)}")
    layers, l1 = split_list("--layer", args.layer, int), parse_l1(args.l1, losses)
    runs = []
    for loss in losses:
        for layer in layers:
            for lam in l1[loss] or [L1_SIMILAR_CE[(loss, nearest_paper_layer(layer))]]:
                r = argparse.Namespace(**vars(args))
                r.loss, r.layer, r.l1, r.name = loss, layer, lam, f"{loss}_L{layer}_l{lam:g}"
                r.kl_coeff = 0.0 if loss == "local" else KL_COEFF[loss] if args.kl_coeff is None else args.kl_coeff
                r.ds_coeff = (DS_COEFF[nearest_paper_layer(layer)] if args.ds_coeff is None else args.ds_coeff) \
                    if loss == "e2e_ds" else 0.0
                r.local_l1 = L1_SIMILAR_CE[("local", nearest_paper_layer(layer))] if args.local_l1 is None else args.local_l1
                runs.append(r)
    names = [r.name for r in runs]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ValueError(f"the SAE {dup} is asked for twice (--loss {args.loss}, --layer {args.layer}, --l1 "
                         f"{' '.join(map(str, args.l1 or []))}); give each (loss, layer, λ) once")
    return runs


def model_defaults(args, argv=None):
    """The flags not on the command line take the TinyStories recipe (TINYSTORIES) when --model is TinyStories-1M;
    for any other model, or with --resume (the checkpoint holds the run's values), nothing changes. A kind with
    no λ in --l1 gets the recipe's; lr and n_samples come from the kinds trained, which must agree."""
    from model import is_tinystories_1m
    if args.resume or not is_tinystories_1m(args.model):
        return
    unset = object()  # argparse leaves a flag that is not on the command line at what the namespace holds
    given = vars(parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(vars(args), unset))))
    for k, v in TINYSTORIES.items():
        if given[k] is unset:
            setattr(args, k, v)
    kinds = [k for k in split_list("--loss", args.loss, str) if k in KINDS]  # plan_runs names a bad one
    for k in ("lr", "n_samples"):
        values = {TINYSTORIES_PER_KIND[k][kind] for kind in kinds}
        if given[k] is unset and len(values) > 1:
            each = ", ".join(f"{kind} {TINYSTORIES_PER_KIND[k][kind]:g}" for kind in kinds)
            raise ValueError(f"--loss {args.loss} on TinyStories-1M: the recipe's --{k} differs by kind ({each}); "
                             f"give --{k}, or train one kind per run")
        if given[k] is unset and values:
            setattr(args, k, values.pop())
    if "e2e_ds" in kinds and args.ds_coeff is None:
        args.ds_coeff = 1000.0
    tokens = [str(t) for t in args.l1 or []]
    if all("=" in t for t in tokens):  # none given, or KIND=LIST tokens: the kinds left out get the recipe's λ
        named = {t.split("=", 1)[0] for t in tokens}
        args.l1 = tokens + [f"{kind}={TINYSTORIES_PER_KIND['l1'][kind]:g}" for kind in kinds if kind not in named] or None


def parse_args(argv=None):
    """(args, runs, the checkpoint in --out_dir or None, the --init_from source's (SAE, cfg) or None). With
    --resume the folder must hold a checkpoint, and every flag not on the command line takes the run's value;
    without it the flags are as given, and --init_from's source gives the defaults of --layer, --dict_ratio,
    --model and --no_center. Local paths (dataset, model, data_dir, init_from) are made absolute, so the
    run's records work from any directory."""
    args = parser.parse_args(argv)
    unset = object()  # argparse leaves a flag that is not on the command line at what the namespace holds
    given = {k for k, v in vars(parser.parse_args(argv, namespace=argparse.Namespace(
        **dict.fromkeys(vars(args), unset)))).items() if v is not unset}
    init, adopted = None, {}
    if args.init_from and not args.resume:
        from interop import load_any
        src, cfg, _ = load_any(args.init_from)
        init = (src, cfg)
        adopted = {k: v for k, v in dict(layer=str(cfg["layer"]), dict_ratio=src.n_dict / src.d, model=cfg.get("model"),
                                         no_center=not cfg["center"]).items() if k not in given and v is not None}
        vars(args).update(adopted)
    model_defaults(args, argv)
    vars(args).update(adopted)  # the source's own layer, size and model win over a recipe's defaults
    if args.out_dir is None:
        one = len(plan_runs(args)) == 1
        args.out_dir = os.path.join("out", f"{args.loss}_L{args.layer}" if one else
                                    f"sweep_{args.loss.replace(',', '-')}_L{args.layer.replace(',', '-')}")
    path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path) if os.path.lexists(path) else None
    if args.resume:
        if ckpt is None:
            raise ValueError(f"--resume: --out_dir {args.out_dir!r} holds no checkpoint (ckpt.pt) to resume from")
        for k, v in ckpt["args"].items():
            if k not in given and k not in ("out_dir", "resume") and hasattr(args, k):
                setattr(args, k, v)
    args.data_dir = os.path.abspath(args.data_dir)
    for k in ("dataset", "model", "init_from"):  # a path that exists here, not a hub id
        if getattr(args, k) and os.path.exists(getattr(args, k)):
            setattr(args, k, os.path.abspath(getattr(args, k)))
    runs = plan_runs(args)
    for r in runs:  # one SAE: --out_dir is its run folder; several: each its own subfolder
        r.out_dir = args.out_dir if len(runs) == 1 else os.path.join(args.out_dir, r.name)
    return args, runs, ckpt, init


def parse_ds_layers(spec, layer, n_layer):
    """--ds_layers for an SAE at layer of an n_layer model -> the block indices whose input residual the
    downstream MSE compares: all = layer+1 .. n_layer-1 (the paper), next = layer+1, next:N = the N after
    layer, last = n_layer-1, or a comma list. ValueError names the bad value."""
    later = list(range(layer + 1, n_layer))
    if spec in ("all", "next", "last"):
        return {"all": later, "next": later[:1], "last": later[-1:]}[spec]
    if spec.startswith("next:"):
        n = split_list("--ds_layers next:N", spec[5:], int)[0]
        if not 1 <= n <= len(later):
            raise ValueError(f"--ds_layers {spec}: N must be in 1..{len(later)} at --layer {layer} of {n_layer} layers")
        return later[:n]
    ks = split_list("--ds_layers", spec, int)
    bad = next((k for k in ks if k not in later), None)
    if bad is not None or len(set(ks)) != len(ks):
        raise ValueError(f"--ds_layers {spec!r}: {'block ' + str(bad) + ' is not' if bad is not None else 'give each block once, all'}"
                         f" after --layer {layer} (blocks {layer + 1}..{n_layer - 1}); or all, next, next:N, last")
    return sorted(ks)


def check_args(args, runs):
    """Every flag that needs no model or data, checked up front: ValueError with a one-line message."""
    for name in ("batch_size", "grad_accum", "n_samples", "ctx", "eval_samples", "eval_every", "save_every",
                 "log_every", "kl_chunk", "max_bad_steps"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(args, name)}")
    for name in ("warmup_samples", "grad_clip", "lr", "dict_ratio"):
        if not 0 <= getattr(args, name) < math.inf:  # also catches nan
            raise ValueError(f"--{name} must be a number >= 0, got {getattr(args, name)}")
    for r in runs:
        for name in ("l1", "kl_coeff", "ds_coeff"):
            if not 0 <= getattr(r, name) < math.inf:
                raise ValueError(f"--{name} must be a number >= 0, got {getattr(r, name)}")
    if args.lr == 0 or args.dict_ratio == 0:
        raise ValueError(f"--lr and --dict_ratio must be > 0, got {args.lr} and {args.dict_ratio}")
    kinds = {r.loss for r in runs}
    for k, used in (("kl_coeff", kinds - {"local"}), ("ds_coeff", kinds & {"e2e_ds"})):
        if not used and (getattr(args, k) or 0) > 0:
            raise ValueError(f"--{k} {getattr(args, k)} has no effect with --loss {args.loss}; leave it out")
    if not 0 <= args.min_lr_ratio <= 1:
        raise ValueError(f"--min_lr_ratio must be in [0, 1], got {args.min_lr_ratio}")
    if not 0 <= args.local_frac <= 1:
        raise ValueError(f"--local_frac must be in [0, 1], got {args.local_frac}")
    if args.local_l1 is not None and not 0 <= args.local_l1 < math.inf:
        raise ValueError(f"--local_l1 must be a number >= 0, got {args.local_l1}")
    for flag, value, useless in (("local_frac", args.local_frac, kinds == {"local"}),
                                 ("local_l1", args.local_l1, args.local_frac == 0 or kinds == {"local"}),
                                 ("ds_layers", None if args.ds_layers == "all" else args.ds_layers, "e2e_ds" not in kinds)):
        if useless and value:
            raise ValueError(f"--{flag} {value} has no effect with --loss {args.loss}"
                             f"{' and --local_frac 0' if flag == 'local_l1' and kinds != {'local'} else ''}; leave it out")
    if args.n_samples < args.batch_size * args.grad_accum:
        raise ValueError(f"--n_samples {args.n_samples} is less than one step of {args.batch_size * args.grad_accum} samples")
    if args.device != "auto" and not (args.device == "cpu" or args.device.startswith("cuda")):
        raise ValueError(f"--device {args.device!r} is not one of cpu, cuda, cuda:N, auto")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device!r} asked for, but no CUDA GPU is available")
    if args.wandb and importlib.util.find_spec("wandb") is None:
        raise ValueError("--wandb needs the wandb package (pip install wandb)")


def check_model(args, runs, model):
    """The flags that depend on the model, and the model itself: ValueError with a one-line message."""
    n_layer, C = model.config.n_layer, model.config.n_embd
    for r in runs:
        if not 0 <= r.layer < n_layer:
            raise ValueError(f"--layer {r.layer} is outside 0..{n_layer - 1} for this {n_layer}-layer model")
        if r.loss == "e2e_ds" and r.layer == n_layer - 1:
            raise ValueError(f"--loss e2e_ds at --layer {r.layer} has no later layer; use e2e or a lower layer")
        r.ds = parse_ds_layers(args.ds_layers, r.layer, n_layer) if r.loss == "e2e_ds" else []
    if args.ctx > model.config.n_positions:
        raise ValueError(f"--ctx {args.ctx} is above the model's context of {model.config.n_positions}")
    if int(args.dict_ratio * C) < 1:
        raise ValueError(f"--dict_ratio {args.dict_ratio} gives no features at d_model {C}")
    bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad:
        raise ValueError(f"model {args.model!r} has non-finite weights ({bad})")


def same_model(a, b):
    from model import HUB_ALIASES
    norm = lambda m: os.path.abspath(m) if os.path.exists(m) else HUB_ALIASES.get(m, m)  # noqa: E731
    return norm(a) == norm(b)


def check_init(init, args, runs, model):
    """ValueError (one line, naming the mismatch) unless the --init_from SAE fits this run: d, n_dict, layer,
    model and centring."""
    src, cfg = init
    C, where = model.config.n_embd, f"--init_from {args.init_from!r}"
    checks = [(src.d == C, f"has d {src.d}, but model {args.model!r} has d_model {C}"),
              (src.n_dict == int(args.dict_ratio * C), f"has {src.n_dict} features, but --dict_ratio {args.dict_ratio:g} "
               f"gives {int(args.dict_ratio * C)}; leave --dict_ratio out"),
              (all(r.layer == cfg["layer"] for r in runs), f"is an SAE of layer {cfg['layer']}, not --layer {args.layer}"),
              (cfg["center"] == (not args.no_center), f"was trained on the {'' if cfg['center'] else 'un'}centred residual "
               f"stream; {'leave --no_center out' if cfg['center'] else 'add --no_center'}"),
              (cfg.get("model") is None or same_model(cfg["model"], args.model),
               f"was trained on model {cfg.get('model')!r}, not {args.model!r}; leave --model out")]
    bad = next((why for ok, why in checks if not ok), None)
    if bad:
        raise ValueError(f"{where} {bad}")


def lr_at(step, steps, args, eff_batch):
    """Linear warmup from 0 over warmup_samples, then cosine decay to min_lr_ratio × lr at the last step."""
    warmup = args.warmup_samples // eff_batch
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def ds_blocks(r, n_layer):
    """The blocks whose input residual an SAE's downstream MSE compares: r.ds (set by check_model from
    --ds_layers); every later one for an e2e_ds SAE without it, none for the other kinds."""
    return getattr(r, "ds", None) or (list(range(r.layer + 1, n_layer)) if r.loss == "e2e_ds" else [])


@torch.no_grad()
def shared_passes(model, idx, runs, kl_share=True):
    """The frozen model's work for one micro-batch (B, T), done once for every SAE of the step:
        resid[l]  the residual entering block l (B, T, C), for each SAE's layer; with e2e kinds also every
                  later one, and resid[n_layer] = the final residual (the clean pass runs to the end once)
        h_clean   ln_f(resid[n_layer]), the KL's target (e2e kinds)
        clean     the clean side of the fused KL (losses.clean_logprobs), when several e2e SAEs share it
    Local SAEs alone stop at the deepest layer they need."""
    e2e = [r for r in runs if r.loss != "local"]
    lo = min(r.layer for r in runs)
    hi = model.config.n_layer if e2e else max(r.layer for r in runs)
    keep = {r.layer for r in runs} | {k for r in e2e for k in ds_blocks(r, hi)}  # no residual nobody reads
    x = model.forward_to_layer(idx, lo)                                  # (B, T, C)
    resid = {lo: x}
    for l in range(lo, hi):  # the same blocks, in the same order, as forward_from_layer
        x = model.transformer.h[l](x)
        if l + 1 in keep:
            resid[l + 1] = x
    h_clean = model.transformer.ln_f(x) if e2e else None                 # (B, T, C)
    clean = None
    if kl_share and len(e2e) > 1:
        clean = clean_logprobs(h_clean, model.lm_head.weight, e2e[0].kl_chunk)
    return dict(resid=resid, h_clean=h_clean, clean=clean)


def loss_step(model, sae, r, shared, fired=None):
    """(loss, parts) of one SAE (its flags r) on a micro-batch's shared passes: the only place the three
    kinds differ. The SAE reads the residual at r.layer; local compares its output with it; e2e kinds run
    the spliced suffix with gradients flowing through the frozen blocks into the SAE, against the clean
    final hidden state (KL) and, for e2e_ds, the clean residuals entering blocks r.ds (--ds_layers; all
    later ones in the paper). fired (n_dict,), if given, is incremented by how often each feature fired."""
    L, ln_f, W_U = r.layer, model.transformer.ln_f, model.lm_head.weight
    x = shared["resid"][L]                                               # (B, T, C)
    x_hat, c = sae(x)
    parts = dict(sparsity=sparsity_loss(c, x.size(-1)))
    if r.loss == "local":
        parts["mse"] = mse_loss(x_hat, x)
        loss = parts["mse"] + r.l1 * parts["sparsity"]
    else:
        _, resids = model.forward_from_layer(x_hat.float(), L, logits=False)
        parts["kl"] = fused_kl_div(ln_f(resids[-1]), shared["h_clean"], W_U, r.kl_chunk, clean=shared["clean"])
        loss = r.kl_coeff * parts["kl"] + r.l1 * parts["sparsity"]
        if r.loss == "e2e_ds":  # the residuals entering blocks r.ds (--ds_layers), spliced vs clean
            ds = ds_blocks(r, model.config.n_layer)
            parts["ds"] = downstream_mse([resids[k - L - 1] for k in ds], [shared["resid"][k] for k in ds])
            loss = loss + r.ds_coeff * parts["ds"]
    active = (c > 0).reshape(-1, c.size(-1))                            # (B*T, n_dict)
    parts["l0"] = active.sum(-1).float().mean()
    if fired is not None:
        fired.add_(active.sum(0, dtype=torch.float64))
    return loss, parts


@dataclass
class SAERun:
    """One SAE of the run and everything that is its own: flags (r), weights, Adam, firing counts since the
    last eval, non-finite streak, and the run folder it is saved to (r.out_dir)."""
    r: argparse.Namespace
    sae: torch.nn.Module
    optimizer: torch.optim.Optimizer
    fired: torch.Tensor
    bad: int = 0
    module: torch.nn.Module = None  # what the step calls: the SAE, or its DDP wrapper

    def sae_cfg(self):
        r = self.r
        return dict(layer=r.layer, model=r.model, center=not r.no_center, loss=r.loss, init_from=r.init_from,
                    args={k: v for k, v in vars(r).items() if k != "name"})

    def flags(self, step, switch):
        """The flags of the loss at step: before the --local_frac switch, local with λ = --local_l1."""
        if step >= switch or self.r.loss == "local":
            return self.r
        return argparse.Namespace(**dict(vars(self.r), loss="local", l1=self.r.local_l1, kl_coeff=0.0, ds_coeff=0.0))


def fmt_time(s):
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def setup(rank, world):
    """Parse and check everything, then load the model and data: (args, runs, ckpt, device, model, splits).
    Every bad input fails here with a ValueError, before anything is written."""
    ddp = world > 1
    args, runs, ckpt, init = parse_args()
    check_args(args, runs)
    if args.grad_accum % world:
        raise ValueError(f"--grad_accum {args.grad_accum} must be a multiple of the {world} processes")
    if ckpt is not None:
        check_resumable(ckpt, args, runs, data=None)  # the arguments now, the data once it is loaded
    if rank == 0:
        check_out_dir(args.out_dir, ckpt_exists=ckpt is not None, run_dirs=[r.out_dir for r in runs])
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if ddp:
        import torch.distributed as dist
        if device.startswith("cuda"):
            per_node, n_gpu = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count()
            if per_node > n_gpu:
                raise ValueError(f"{per_node} processes on this node but {n_gpu} GPU(s); one GPU per process")
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            torch.cuda.set_device(device)
        from datetime import timedelta  # long enough for rank 0 to tokenise a dataset while the others wait
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(hours=1))
        at = ckpt["step"] if ckpt else -1
        seen = torch.tensor([at, -at], device=device)  # (max, -min) over processes of the step they resume at
        dist.all_reduce(seen, dist.ReduceOp.MAX)
        if seen[0] != -seen[1]:
            raise ValueError(f"the processes see different checkpoints in --out_dir {args.out_dir!r}; with "
                             "several machines it must be a folder they share")
    from data import load_split
    from model import GPT
    model = GPT.from_pretrained(args.model, center=not args.no_center).to(device)
    check_model(args, runs, model)
    if init is not None:
        check_init(init, args, runs, model)
    if ddp and rank > 0:
        torch.distributed.barrier()  # rank 0 tokenises into the cache first; the others then read it
    eval_rows, train_rows, data = load_split(args.dataset, args.ctx, args.eval_samples, args.n_samples,
                                             model.config.vocab_size, cache_dir=args.data_dir)
    if ddp and rank == 0:
        torch.distributed.barrier()
    if len(train_rows) < args.batch_size:
        raise ValueError(f"dataset {args.dataset!r} has {len(train_rows)} training rows of {args.ctx} tokens, "
                         f"fewer than one batch of {args.batch_size}")
    if ckpt is not None:
        check_resumable(ckpt, args, runs, data)
    if rank == 0:
        for r in runs:
            os.makedirs(r.out_dir, exist_ok=True)
            trim_eval_log(os.path.join(r.out_dir, "eval.jsonl"), ckpt["step"] if ckpt else 0)  # redone from there
    return args, runs, ckpt, init, device, model, (eval_rows, train_rows, data)


def main():
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    ddp, master = world > 1, rank == 0
    try:
        args, runs, ckpt, init, device, model, (eval_rows, train_rows, data) = setup(rank, world)
    except (ValueError, OSError) as e:
        sys.exit(f"train.py: error: {e}" if master else 1)
    if ddp:
        import torch.distributed as dist
    from data import eval_batches, get_batch, sample_rows
    from eval import evaluate_many
    from interop import save_firing
    from sae import SAE, save_sae
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for fp32 matmuls on Ampere+
        torch.backends.cudnn.allow_tf32 = True
    C, sweep, ckpt_path = model.config.n_embd, len(runs) > 1, os.path.join(args.out_dir, "ckpt.pt")
    saes = []
    for r in runs:
        torch.manual_seed(args.seed)  # each SAE starts as its single run would, wherever it is in the list
        sae = SAE(C, int(args.dict_ratio * C)).to(device)
        if init is not None and ckpt is None:  # --init_from: its weights, a fresh optimizer
            sae.load_state_dict(init[0].state_dict())
        saes.append(SAERun(r, sae, torch.optim.Adam(sae.parameters(), lr=args.lr),
                           torch.zeros(sae.n_dict, dtype=torch.float64, device=device)))
    # fired: how often each feature fired since the last eval; across processes the counts add up (rank 0
    # holds the sum after sync_fired), and the checkpoint holds the sum
    step = 0
    eff_batch = args.batch_size * args.grad_accum  # samples per optimizer step, over all processes
    steps = args.n_samples // eff_batch
    switch = int(args.local_frac * args.n_samples) // eff_batch  # --local_frac: steps before it are local
    if ckpt is not None:
        step = ckpt["step"]
        for s, saved in zip(saes, ckpt["runs"]):
            s.sae.load_state_dict(saved["sae"])
            s.optimizer.load_state_dict(saved["optimizer"])
            s.bad = saved["bad_steps"]
            if master:
                s.fired.copy_(saved["fired"])
        restore_rng(ckpt, device)
    if master:
        what = f"{len(runs)} SAEs ({', '.join(r.name for r in runs)})" if sweep else "1 SAE"
        print(f"{'resuming' if ckpt else 'starting'} {args.out_dir} at step {step} of {steps}: {what}, {eff_batch} "
              f"samples per step, {world} process{'es' * ddp}, {device}", flush=True)
    if args.compile:
        for block in model.transformer.h:
            block.compile()
        for s in saes:
            s.sae.compile()
    for s in saes:
        s.module = s.sae
        if ddp:
            from torch.nn.parallel import DistributedDataParallel
            s.module = DistributedDataParallel(s.sae, device_ids=[int(device.split(":")[1])] if ":" in device else None)
    accum = args.grad_accum // world  # micro-batches per process
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.append(signum))  # finish the step, save, exit
    wandb_id = ckpt.get("wandb_id") if ckpt else None
    if master and args.wandb:
        import wandb
        wandb_id = wandb.init(project=args.wandb_project, config=vars(args), id=wandb_id, resume="allow").id

    def sync_fired():  # collective: every process calls it at the same step
        for s in saes if ddp else []:
            dist.all_reduce(s.fired)
            if not master:
                s.fired.zero_()

    def save(next_step, finished=False):  # collective
        sync_fired()
        if master:
            state = dict(step=next_step, args=vars(args), data=data, wandb_id=wandb_id, runs=[dict(
                {k: getattr(s.r, k) for k in PER_SAE}, name=s.r.name, bad_steps=s.bad, fired=s.fired.cpu(),
                sae=s.sae.state_dict(), optimizer=s.optimizer.state_dict()) for s in saes])
            save_checkpoint(ckpt_path, finished=False, **state)
            for s in saes:  # after ckpt.pt: an SAE without a checkpoint is not ours
                save_sae(s.sae, s.r.out_dir, s.sae_cfg())
            if finished:  # only once every sae.safetensors is final too
                save_checkpoint(ckpt_path, finished=True, **state)

    def leave(status=None):  # every process exits at once, after rank 0 has saved
        if ddp:
            dist.barrier()
            dist.destroy_process_group()
        sys.exit(status if master or not isinstance(status, str) else 1)

    def run_eval(last):  # rank 0, every SAE on the same held-out batches, sharing the clean pass
        sync_fired()
        if not master:
            return
        for s in saes:
            s.sae.eval()
        with autocast:
            results = evaluate_many(model, [(s.sae, s.r.layer) for s in saes],
                                    eval_batches(eval_rows, args.batch_size, device), return_counts=True)
        for s, (m, counts) in zip(saes, results):
            s.sae.train()
            if last:  # per-feature firing frequency on the held-out rows, for analysis and export
                save_firing(s.r.out_dir, counts / m["alive_tokens"], m["alive_tokens"], dataset=args.dataset,
                            held_out=True)
            m.update(step=step, samples=step * eff_batch, alive_train=int((s.fired > 0).sum()))
            if args.local_frac > 0:  # which loss trained the SAE up to here; the switch's own eval marked
                m.update(phase="local" if step <= switch else s.r.loss, **({"switch": True} if step == switch else {}))
            append_eval_log(os.path.join(s.r.out_dir, "eval.jsonl"), m)
            print(f"eval step {step} | {s.r.name + ' | ' if sweep else ''}l0 {m['l0']:.2f} | alive {m['alive']} | "
                  f"ce +{m['ce_increase']:.4f} | kl {m['kl']:.4f} | mse {m['mse']:.4g} | "
                  f"ev {m['explained_variance']:.3f}", flush=True)
            if args.wandb:
                wandb.log({f"eval/{s.r.name + '/' if sweep else ''}{k}": v for k, v in m.items()
                           if not isinstance(v, list)}, step=step)
            s.fired.zero_()  # alive_train counts features fired since the last eval

    def optimizer_step(s, logs):  # collective: clip, then step unless the loss or gradient is non-finite anywhere
        norm = torch.nn.utils.clip_grad_norm_(s.sae.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        nonfinite = torch.tensor(float(not torch.isfinite(logs["loss"])), device=device)
        if ddp:  # the gradient is already shared; the loss is not
            dist.all_reduce(nonfinite)
        if bool(torch.isfinite(norm)) and nonfinite.item() == 0:
            s.optimizer.step()
            s.bad = 0
        else:
            s.bad += 1
            if master:
                print(f"step {step:5d} | {s.r.name + ' | ' if sweep else ''}non-finite loss {logs['loss'].item():.4g} "
                      f"or grad norm {norm.item():.4g}: skipped ({s.bad} in a row)", flush=True)
        s.optimizer.zero_grad(set_to_none=True)

    def log_line(s, logs, dt, elapsed):  # collective: mean over processes, firing counts summed
        vals = torch.stack(list(logs.values()))
        if ddp:
            dist.all_reduce(vals)
            vals /= world
        if master:
            logs = dict(zip(logs, vals.tolist()))
            line = " | ".join(f"{k} {v:.4g}" for k, v in logs.items() if k != "loss")
            eta = dt * (steps - step - 1)
            print(f"step {step:5d}/{steps} | {s.r.name + ' | ' if sweep else ''}loss {logs['loss']:.4f} | {line} | "
                  f"alive {int((s.fired > 0).sum())} | lr {s.optimizer.param_groups[0]['lr']:.2e} | "
                  f"{dt * 1000:.0f}ms | {eff_batch * args.ctx / dt / 1000:.1f}k tok/s | {fmt_time(elapsed)} | "
                  f"eta {fmt_time(eta)}", flush=True)
            if args.wandb:
                wandb.log({f"train/{s.r.name + '/' if sweep else ''}{k}": v for k, v in logs.items()}, step=step)

    t_start, t_train, n_timed = time.time(), 0.0, 0
    for step in range(step, steps + 1):
        last = step == steps
        if last or (step > 0 and step % max(1, args.eval_every // eff_batch) == 0) or (step == 0 and args.init_from) \
                or (step == switch and 0 < switch < steps):  # also the start of a fine-tune, and the switch
            run_eval(last)
        if step == switch and 0 < switch < steps and master:
            print(f"switch at step {step}: local -> {', '.join(sorted({r.loss for r in runs}))} "
                  f"(after {step * eff_batch} samples, --local_frac {args.local_frac:g})", flush=True)
        if last:
            save(step, finished=True)
            break
        t0 = time.time()
        logs = [{} for _ in saes]
        for s in saes:
            s.optimizer.param_groups[0]["lr"] = lr_at(step, steps, args, eff_batch)
        for j in range(accum):  # batch -> shared frozen passes -> each SAE's loss, backward (and last, its step)
            start = (step * args.grad_accum + j * world + rank) * args.batch_size
            idx = get_batch(train_rows, sample_rows(args.seed, len(train_rows), start, args.batch_size), device)
            flags = [s.flags(step, switch) for s in saes]
            with autocast:
                shared = shared_passes(model, idx, flags, kl_share=not args.no_kl_share)
            for s, r, log in zip(saes, flags, logs):
                with (s.module.no_sync() if ddp and j < accum - 1 else contextlib.nullcontext()), autocast:
                    loss, parts = loss_step(model, s.module, r, shared, s.fired)
                    (loss / accum).backward()  # frees this SAE's activations before the next SAE runs
                for k, v in dict(parts, loss=loss).items():
                    log[k] = log.get(k, 0.0) + v.detach() / accum
                if j == accum - 1:
                    optimizer_step(s, log)
            del shared
        t_train, n_timed = t_train + time.time() - t0, n_timed + 1
        if step % args.log_every == 0:
            sync_fired()
            for s, log in zip(saes, logs):
                log_line(s, log, t_train / n_timed, time.time() - t_start)
            t_train, n_timed = 0.0, 0
        stopping = bool(stop)
        if ddp:  # did any process get a signal: one verdict for all
            flag = torch.tensor(float(stopping), device=device)
            dist.all_reduce(flag)
            stopping = flag.item() > 0
        worst = max(saes, key=lambda s: s.bad)
        if worst.bad >= args.max_bad_steps:
            save(step + 1)  # each SAE is that of its last good step: skipped steps change nothing
            leave(f"train.py: error: {worst.bad} non-finite steps in a row (steps {step - worst.bad + 1}..{step})"
                  f"{' of ' + worst.r.name if sweep else ''}; stopped, the SAE of the last good step is saved in "
                  f"{worst.r.out_dir}. Resume with --resume --dtype float32 or a larger --max_bad_steps, or start "
                  "again with a lower --lr")
        if (step + 1) % max(1, args.save_every // eff_batch) == 0 or stopping:
            save(step + 1)
        if stopping:
            signum = stop[0] if stop else signal.SIGTERM
            if master:
                print(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved in "
                      f"{args.out_dir}, resume with --resume (or the same command)", flush=True)
            leave(128 + signum)
    if master:
        nxt = f"python analysis.py pareto {args.out_dir}" if sweep else f"python eval.py {args.out_dir}"
        where = f"{len(saes)} SAEs in {args.out_dir}/{{{','.join(r.name for r in runs)}}}" if sweep else \
            f"SAE in {args.out_dir}"
        print(f"done: {steps} steps in {fmt_time(time.time() - t_start)}; {where}; next: {nxt}", flush=True)
    leave()


if __name__ == "__main__":
    main()
