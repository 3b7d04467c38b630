"""
The SAEs of a train.py run, and every check of its flags: one SAE, or a sweep of many.

    --loss local,e2e_ds --layer 2,6 --l1 local=1,4 e2e_ds=10,50   ->  8 SAEs, one Namespace each (plan_runs)

Each SAE's Namespace holds the flags its single run would have (loss, layer, λ, coefficients, the local phase's
λ), so loss_step, sae.json and eval.py see an ordinary run. Defaults are the paper's: Table 2's "similar CE"
λ per (kind, layer), β per layer, and the TinyStories-1M recipe for that model (model_defaults). The checks
raise ValueError with one line naming the bad value: check_args (flags alone), check_model (against the
model), check_init (an --init_from source against the run).
"""
import argparse
import importlib.util
import math
import os

import torch

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


def model_defaults(args, given):
    """The flags not on the command line (not in given) take the TinyStories recipe (TINYSTORIES) when --model is TinyStories-1M;
    for any other model, or with --resume (the checkpoint holds the run's values), nothing changes. A kind with
    no λ in --l1 gets the recipe's; lr and n_samples come from the kinds trained, which must agree."""
    from hf_files import is_tinystories_1m
    if args.resume or not is_tinystories_1m(args.model):
        return
    for k, v in TINYSTORIES.items():
        if k not in given:
            setattr(args, k, v)
    kinds = [k for k in split_list("--loss", args.loss, str) if k in KINDS]  # plan_runs names a bad one
    for k in ("lr", "n_samples"):
        values = {TINYSTORIES_PER_KIND[k][kind] for kind in kinds}
        if k not in given and len(values) > 1:
            each = ", ".join(f"{kind} {TINYSTORIES_PER_KIND[k][kind]:g}" for kind in kinds)
            raise ValueError(f"--loss {args.loss} on TinyStories-1M: the recipe's --{k} differs by kind ({each}); "
                             f"give --{k}, or train one kind per run")
        if k not in given and values:
            setattr(args, k, values.pop())
    if "e2e_ds" in kinds and args.ds_coeff is None:
        args.ds_coeff = 1000.0
    tokens = [str(t) for t in args.l1 or []]
    if all("=" in t for t in tokens):  # none given, or KIND=LIST tokens: the kinds left out get the recipe's λ
        named = {t.split("=", 1)[0] for t in tokens}
        args.l1 = tokens + [f"{kind}={TINYSTORIES_PER_KIND['l1'][kind]:g}" for kind in kinds if kind not in named] or None


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
    if args.ctx < 2:
        raise ValueError(f"--ctx must be >= 2, got {args.ctx}: the evaluation's cross-entropy predicts each next token "
                         "of a row, so a row needs at least 2")
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
    from hf_files import HUB_ALIASES
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
