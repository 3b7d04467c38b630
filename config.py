"""
What a run is: its SAEs, and every flag's value, resolved and checked in one place.

A flag's value comes from the command line, else the --init_from source, else the model's recipe (TinyStories-1M),
else the paper's table for the SAE's kind and layer (KINDS), else the flag's default; with --resume every flag not
on the command line takes the run's own (resolve).

    --loss local,e2e_ds --layer 2,6 --l1 local=1,4 e2e_ds=10,50   ->  8 SAEs, one Namespace each (plan_runs)

Each SAE's Namespace holds the flags its single run would have (kind, layer, λ, the coefficient of each loss term,
the local phase's λ), so loss_step, sae.json and eval.py see an ordinary run. The checks raise ValueError with
one line naming the bad value: check_args (flags alone), check_model (against the model), check_init (an
--init_from source against the run).
"""
import argparse
import importlib.util
import math
import os

import torch

from checkpoint import check_tensors, load_checkpoint
from cli import resolve_device
from files import file_id
from hf_files import HUB_ALIASES, is_tinystories_1m
from sae import check_fits

# The kinds of SAE: the coefficient of each loss term (loss_step adds the terms whose coefficient is not 0), and
# λ. A value is a number, or {layer: value} from the paper, read at the nearest of its layers (the lower on a tie):
# λ is Table 2's "similar CE increase" column, the downstream β the paper's per layer. A new kind is a new row.
KINDS = {
    #           MSE at L   KL(clean‖spliced)   downstream MSE (β)               sparsity (λ)
    "local":  dict(mse=1.0, kl=0.0, ds=0.0,                            l1={2: 0.8, 6: 4.0, 10: 6.0}),
    "e2e":    dict(mse=0.0, kl=1.0, ds=0.0,                            l1={2: 0.5, 6: 3.0, 10: 1.5}),
    "e2e_ds": dict(mse=0.0, kl=0.5, ds={2: 2.5, 6: 2.5, 10: 0.05},     l1={2: 10.0, 6: 50.0, 10: 1.75}),
}
LOCAL = "local"  # the row of --local_frac's first phase
WARMUP_FRAC = 0.05  # the paper's warmup: 20k of 400k samples; --n_samples without --warmup_samples keeps the fraction
# the paper's TinyStories-1M recipe: what a flag not on the command line takes when --model is TinyStories-1M
# (hf_files.is_tinystories_1m). lr and n_samples are per kind, β (--ds_coeff) 1000 for e2e_ds; the KL coefficients are
# the usual 1.0 / 0.5. λ: the paper gives none. local 0.01 and e2e 3 are the reference implementation's own
# TinyStories-1M configs (layer 4, ratio 50); e2e_ds 50 is our estimate, e2e's 3 times GPT-2's e2e_ds / e2e ratio
# at layer 6 (50 / 3). Sweep them: --l1 local=0.005,0.01,0.02 e2e=1.5,3,6 e2e_ds=25,50,100.
TINYSTORIES = dict(dataset="apollo-research/roneneldan-TinyStories-tokenizer-gpt2", ctx=512, dict_ratio=50.0, layer="4",
                   batch_size=20, grad_accum=1, warmup_samples=20_000, grad_clip=1.0)
TINYSTORIES_PER_KIND = dict(lr=dict(local=1e-2, e2e=1e-3, e2e_ds=1e-3),
                            n_samples=dict(local=400_000, e2e=450_000, e2e_ds=250_000),
                            l1=dict(local=0.01, e2e=3.0, e2e_ds=50.0), ds_coeff=dict(e2e_ds=1000.0))
TINYSTORIES_HELP = """TinyStories-1M (--model roneneldan/TinyStories-1M, or a local folder whose config.json is a gpt_neo of
8 layers with d_model 64): every flag not given takes the paper's TinyStories recipe instead of the GPT-2
defaults above: --dataset apollo-research/roneneldan-TinyStories-tokenizer-gpt2 --ctx 512 --dict_ratio 50
--layer 4 --batch_size 20 --grad_accum 1 --warmup_samples 20000 --grad_clip 1.0, --ds_coeff 1000 (e2e_ds);
per kind --lr local 1e-2, e2e and e2e_ds 1e-3; --n_samples local 400k, e2e 450k, e2e_ds 250k; --l1 local 0.01,
e2e 3 (the reference implementation's TinyStories configs), e2e_ds 50 (an estimate: 3 x GPT-2's e2e_ds/e2e
ratio at layer 6). A sweep mixing kinds whose recipe --lr or --n_samples differ must give that flag."""


def at_layer(value, layer):
    """A KINDS entry for an SAE at layer: the number, or the paper's value at the nearest of its layers."""
    return value[min(value, key=lambda l: (abs(l - layer), l))] if isinstance(value, dict) else value


def sae_flags(args, kind, layer, l1=None):
    """The flags of one SAE: args with its kind, layer, λ (default: the kind's), name, and the coefficient of each
    loss term from its KINDS row (--kl_coeff / --ds_coeff replace a row's value that is not 0)."""
    row = KINDS[kind]
    r = argparse.Namespace(**vars(args))
    r.loss, r.layer, r.l1 = kind, layer, at_layer(row["l1"], layer) if l1 is None else l1
    r.name = f"{kind}_L{layer}_l{r.l1:g}"
    r.mse_coeff = at_layer(row["mse"], layer)
    for term in ("kl", "ds"):
        given, paper = getattr(args, f"{term}_coeff", None), at_layer(row[term], layer)
        setattr(r, f"{term}_coeff", 0.0 if paper == 0 else paper if given is None else given)
    local_l1 = getattr(args, "local_l1", None)
    r.local_l1 = at_layer(KINDS[LOCAL]["l1"], layer) if local_l1 is None else local_l1
    return r


def local_phase(r):
    """The flags of --local_frac's first phase: the local row, with λ = --local_l1."""
    row = KINDS[LOCAL]
    return argparse.Namespace(**dict(vars(r), loss=LOCAL, l1=r.local_l1, mse_coeff=at_layer(row["mse"], r.layer),
                                     kl_coeff=at_layer(row["kl"], r.layer), ds_coeff=at_layer(row["ds"], r.layer), ds=[]))


def ds_blocks(r, n_layer):
    """The blocks whose input residual an SAE's downstream MSE compares: r.ds (check_model, from --ds_layers),
    else every later one if its downstream coefficient is not 0."""
    return r.ds if hasattr(r, "ds") else list(range(r.layer + 1, n_layer)) if r.ds_coeff else []


def uses(kinds, term):
    """Does any of the kinds have a term (mse, kl, ds) whose coefficient is not 0?"""
    return any(KINDS[k][term] != 0 for k in kinds)


def resolve(parser, argv=None):
    """(args, runs, the checkpoint in --out_dir or None, the --init_from source's (SAE, cfg) or None): the flags
    resolved in the order of the module docstring. Local paths (dataset, model, data_dir, init_from) are made
    absolute, so the run's records work from any directory."""
    args = parser.parse_args(argv)
    unset = object()  # argparse leaves a flag that is not on the command line at what the namespace holds
    given = {k for k, v in vars(parser.parse_args(argv, namespace=argparse.Namespace(
        **dict.fromkeys(vars(args), unset)))).items() if v is not unset}
    init, adopted = None, {}
    if args.init_from is not None and not args.resume:
        from interop import load_any
        src, cfg, _ = load_any(args.init_from)
        init = (src, cfg)
        trained = cfg.get("args") or {}  # a run folder's own flags: its data too
        adopted = {k: v for k, v in dict(layer=str(cfg["layer"]), dict_ratio=src.n_dict / src.d, model=cfg.get("model"),
                                         no_center=not cfg["center"], dataset=trained.get("dataset"),
                                         ctx=trained.get("ctx"), eval_samples=trained.get("eval_samples"),
                                         ).items() if k not in given and v is not None}
        vars(args).update(adopted)
    model_defaults(args, given)
    vars(args).update(adopted)  # the source's own layer, size, model and data win over a recipe's defaults
    if "n_samples" in given and "warmup_samples" not in given:  # the recipe's warmup, 5% of the run, scales with it
        args.warmup_samples = round(WARMUP_FRAC * args.n_samples)
    if args.out_dir is None:
        one = len(plan_runs(args)) == 1
        args.out_dir = os.path.join("out", f"{args.loss}_L{args.layer}" if one else
                                    f"sweep_{args.loss.replace(',', '-')}_L{args.layer.replace(',', '-')}")
    path = os.path.join(args.out_dir, "ckpt.pt")
    seen = file_id(path)
    ckpt = load_checkpoint(path) if os.path.lexists(path) else None
    if ckpt is not None:
        ckpt["file_id"] = seen  # set-up checks, once it holds the folder's lock, that no other run wrote it since
    if args.resume:
        if ckpt is None:
            raise ValueError(f"--resume: --out_dir {args.out_dir!r} holds no checkpoint (ckpt.pt) to resume from")
        actions = {a.dest: a for a in parser._actions}
        for k, v in ckpt["args"].items():
            if k not in given and k not in ("out_dir", "resume") and k in actions:
                if not stored_value_ok(actions[k], v):
                    raise ValueError(f"{path!r} holds --{k} {v!r}, not a value of that flag; the checkpoint is "
                                     "damaged: move it away or choose another --out_dir")
                setattr(args, k, v)
    args.data_dir = os.path.abspath(args.data_dir)
    for k in ("dataset", "model", "init_from"):  # a path that exists here, not a hub id
        if getattr(args, k) and os.path.exists(getattr(args, k)):
            setattr(args, k, os.path.abspath(getattr(args, k)))
    runs = plan_runs(args)
    for r in runs:  # one SAE: --out_dir is its run folder; several: each its own subfolder
        r.out_dir = args.out_dir if len(runs) == 1 else os.path.join(args.out_dir, r.name)
    return args, runs, ckpt, init


def stored_value_ok(action, v):
    """Is v, read from a checkpoint's args, a value the flag of this argparse action can take?"""
    if v is None or isinstance(action, argparse._StoreTrueAction):
        return v is None and action.default is None or type(v) is bool and action.default is False
    if action.nargs == "+":
        return isinstance(v, list) and all(isinstance(x, str) for x in v)
    if action.choices is not None:
        return v in action.choices
    conv = action.type or str
    if conv is float:
        return type(v) in (int, float)
    if conv is str or getattr(conv, "__name__", "") == "nonempty":
        return isinstance(v, str) and bool(v.strip())
    return type(v) is int  # int and the integer types of cli.py


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
    """One Namespace per SAE (sae_flags): every (kind, layer, λ) of the --loss, --layer and --l1 lists.
    ValueError (one line) on a bad list."""
    kinds = split_list("--loss", args.loss, str)
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"--loss {kind!r} is not one of {', '.join(KINDS)}")
    layers, l1 = split_list("--layer", args.layer, int), parse_l1(args.l1, kinds)
    runs = [sae_flags(args, kind, layer, lam) for kind in kinds for layer in layers for lam in l1[kind] or [None]]
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
    if args.resume or not is_tinystories_1m(args.model):
        return
    for k, v in TINYSTORIES.items():
        if k not in given:
            setattr(args, k, v)
    kinds = [k for k in split_list("--loss", args.loss, str) if k in KINDS]  # plan_runs names a bad one
    missing = [k for k in kinds if k not in TINYSTORIES_PER_KIND["lr"]]
    if missing:
        raise ValueError(f"--loss {missing[0]} has no TinyStories-1M recipe; give --lr, --n_samples and --l1")
    for k in ("lr", "n_samples"):
        values = {TINYSTORIES_PER_KIND[k][kind] for kind in kinds}
        if k not in given and len(values) > 1:
            each = ", ".join(f"{kind} {TINYSTORIES_PER_KIND[k][kind]:g}" for kind in kinds)
            raise ValueError(f"--loss {args.loss} on TinyStories-1M: the recipe's --{k} differs by kind ({each}); "
                             f"give --{k}, or train one kind per run")
        if k not in given and values:
            setattr(args, k, values.pop())
    ds = {TINYSTORIES_PER_KIND["ds_coeff"][k] for k in kinds if k in TINYSTORIES_PER_KIND["ds_coeff"]}
    if ds and args.ds_coeff is None:
        args.ds_coeff = ds.pop()
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
    for name in ("kl_coeff", "ds_coeff"):  # also where the kinds trained ignore them
        if getattr(args, name) is not None and not 0 <= getattr(args, name) < math.inf:
            raise ValueError(f"--{name} must be a number >= 0, got {getattr(args, name)}")
    for r in runs:
        for name in ("l1", "kl_coeff", "ds_coeff"):
            if not 0 <= getattr(r, name) < math.inf:
                raise ValueError(f"--{name} must be a number >= 0, got {getattr(r, name)}")
        if not (r.mse_coeff or r.kl_coeff or r.ds_coeff):
            raise ValueError(f"--loss {r.loss} with --kl_coeff {r.kl_coeff:g} and --ds_coeff {r.ds_coeff:g} leaves "
                             "the SAE no term to reconstruct by (MSE, KL or downstream); give a coefficient > 0")
    if args.lr == 0 or args.dict_ratio == 0:
        raise ValueError(f"--lr and --dict_ratio must be > 0, got {args.lr} and {args.dict_ratio}")
    kinds = {r.loss for r in runs}
    for k in ("kl_coeff", "ds_coeff"):
        if not uses(kinds, k[:2]) and (getattr(args, k) or 0) > 0:
            raise ValueError(f"--{k} {getattr(args, k)} has no effect with --loss {args.loss}; leave it out")
    if not 0 <= args.min_lr_ratio <= 1:
        raise ValueError(f"--min_lr_ratio must be in [0, 1], got {args.min_lr_ratio}")
    if not 0 <= args.local_frac <= 1:
        raise ValueError(f"--local_frac must be in [0, 1], got {args.local_frac}")
    if args.local_l1 is not None and not 0 <= args.local_l1 < math.inf:
        raise ValueError(f"--local_l1 must be a number >= 0, got {args.local_l1}")
    all_local = kinds == {LOCAL}
    for flag, value, useless in (("local_frac", args.local_frac, all_local),
                                 ("local_l1", args.local_l1, args.local_frac == 0 or all_local),
                                 ("ds_layers", None if args.ds_layers == "all" else args.ds_layers, not uses(kinds, "ds"))):
        if useless and value:
            raise ValueError(f"--{flag} {value} has no effect with --loss {args.loss}"
                             f"{' and --local_frac 0' if flag == 'local_l1' and not all_local else ''}; leave it out")
    if args.ctx < 2:
        raise ValueError(f"--ctx must be >= 2, got {args.ctx}: the evaluation's cross-entropy predicts each next token "
                         "of a row, so a row needs at least 2")
    eff_batch = args.batch_size * args.grad_accum
    if args.n_samples < eff_batch:
        raise ValueError(f"--n_samples {args.n_samples} is less than one step of {eff_batch} samples")
    if args.warmup_samples // eff_batch >= args.n_samples // eff_batch > 1:
        raise ValueError(f"--warmup_samples {args.warmup_samples} covers the whole run of --n_samples {args.n_samples}: "
                         f"the learning rate would never reach --lr; give a smaller one (the paper's is "
                         f"{WARMUP_FRAC:.0%} of the run: {round(WARMUP_FRAC * args.n_samples)}), or leave it out")
    resolve_device(args.device)  # a bad one is refused before the folder is touched
    if args.wandb and importlib.util.find_spec("wandb") is None:
        raise ValueError("--wandb needs the wandb package (pip install wandb)")


def check_model(args, runs, model, ckpt=None, init=None, device="cpu"):
    """The flags that depend on the model, the model itself, a checkpoint's tensors (they fit this model and
    --dict_ratio), an --init_from source (check_init), and whether the SAEs fit the device's memory: ValueError
    with a one-line message."""
    n_layer, C = model.config.n_layer, model.config.n_embd
    for r in runs:
        if not 0 <= r.layer < n_layer:
            raise ValueError(f"--layer {r.layer} is outside 0..{n_layer - 1} for this {n_layer}-layer model")
        if r.ds_coeff and r.layer == n_layer - 1:
            raise ValueError(f"--loss {r.loss} at --layer {r.layer} has no later layer; use e2e or a lower layer")
        r.ds = parse_ds_layers(args.ds_layers, r.layer, n_layer) if r.ds_coeff else []
    if args.ctx > model.config.n_positions:
        raise ValueError(f"--ctx {args.ctx} is above the model's context of {model.config.n_positions}")
    if int(args.dict_ratio * C) < 1:
        raise ValueError(f"--dict_ratio {args.dict_ratio} gives no features at d_model {C}")
    bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad:
        raise ValueError(f"model {args.model!r} has non-finite weights ({bad})")
    if ckpt is not None:
        check_tensors(ckpt, os.path.join(args.out_dir, "ckpt.pt"), C, int(args.dict_ratio * C))
    if init is not None:
        check_init(init, args, runs, model)
    check_fits(C, int(args.dict_ratio * C), device, k=len(runs), what=f"--dict_ratio {args.dict_ratio:g}")


def same_model(a, b):
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


if __name__ == "__main__":  # python config.py: what a run is, and the kinds' table
    print(__doc__.strip() + "\n\nKINDS (config.KINDS; train.py --help shows every flag):")
    for kind, row in KINDS.items():
        print(f"  {kind:8s} " + "  ".join(f"{k} {v}" for k, v in row.items()))
