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
non-finite loss or gradient, or where the SAE diverges (loss or weight norm 1e6 times its first step's), is
skipped for that SAE; --max_bad_steps in a row stop the run. One train.py at a time per --out_dir (a lock); a
new run refuses a folder holding another program's run files (see checkpoint.py).
DDP: --batch_size is per process, --grad_accum counts micro-batches over all processes, so the samples per
step (batch_size * grad_accum) and the result do not depend on the number of processes (nor does a resume).
"""
import argparse
import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import dataclass

if __name__ == "__main__":  # Ctrl-C while torch loads: one line, no traceback (nothing is written yet)
    def _interrupted(signum, frame):
        print("train.py: interrupted while starting; nothing was written", file=sys.stderr)
        os._exit(130)
    signal.signal(signal.SIGINT, _interrupted)
import torch

from checkpoint import (PER_SAE, append_eval_log, check_out_dir, check_resumable, check_tensors, load_checkpoint,
                        restore_rng, save_checkpoint, trim_eval_log)
from cli import nonempty, nonneg_int
from files import file_id, lock_run, unlock_run, write_error
from losses import clean_logprobs, downstream_mse, fused_kl_div, kl_chunk_defaults, mm_dtype, mse_loss, sparsity_loss
from sweep import TINYSTORIES_HELP, check_args, check_init, check_model, model_defaults, plan_runs

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default."""


parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
# model
parser.add_argument("--model", type=nonempty, default="gpt2",
                    help="hub id (gpt2, gpt2-medium, ...) or a local save_pretrained folder")
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
parser.add_argument("--ds_layers", type=nonempty, default="all",
                    help="e2e_ds: the later residuals of the downstream MSE (blocks they "
                    "enter): all (the paper), next, next:N, last, or a comma list of block indices after --layer")
# ablations: start from an SAE, or train the first part of the run as local
parser.add_argument("--init_from", type=nonempty, default=None,
                    help="start every SAE from this one (a run folder, an Apollo .pt or a "
                    "SAELens folder) with a fresh optimizer; --layer, --dict_ratio, --model and centring default to its")
parser.add_argument("--local_frac", type=float, default=0.0, help="train the first this fraction of the samples with "
                    "the local loss (λ --local_l1), the rest with --loss, under one LR schedule")
parser.add_argument("--local_l1", type=float, default=None, help="λ of the local phase of --local_frac; default: the "
                    "paper's local λ for the layer")
# data
parser.add_argument("--dataset", type=nonempty, default="apollo-research/Skylion007-openwebtext-tokenizer-gpt2",
                    help="hub dataset (input_ids or text column) or a local .txt/.jsonl/.parquet file or folder")
parser.add_argument("--ctx", type=int, default=1024, help="tokens per sample")
parser.add_argument("--data_dir", type=nonempty, default=os.path.join(os.path.expanduser("~"), ".cache", "nanosae"),
                    help="token cache")
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
parser.add_argument("--wandb_project", type=nonempty, default="nanosae", help="W&B project")
# system
parser.add_argument("--out_dir", type=nonempty, default=None,
                    help="default out/{loss}_L{layer} (a sweep: out/sweep_{losses}_L{layers})")
parser.add_argument("--save_every", type=int, default=20_000, help="checkpoint every this many samples (and at the end)")
parser.add_argument("--resume", action="store_true", help="continue the run in --out_dir (which must hold one); "
                    "flags not given take the run's values. Without it an unfinished run with the same flags continues")
parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype for matmuls")
parser.add_argument("--compile", action="store_true",
                    help="torch.compile the GPT blocks, the SAE and the KL's elementwise work per chunk")
parser.add_argument("--kl_chunk", type=int, default=None, help=f"tokens per chunk of the fused KL (default {kl_chunk_defaults()})")
parser.add_argument("--no_kl_share", action="store_true", help="with several e2e SAEs, recompute the clean side of "
                    "the KL per SAE instead of holding it once (batch_size x ctx x vocab fp32)")
parser.add_argument("--max_bad_steps", type=int, default=10, help="stop after this many bad steps in a row, each "
                    "skipped: a non-finite loss or gradient, or a diverging SAE: its loss above 1e6 x max(1, its "
                    "loss at its first step) or its weight norm above 1e6 x its first step's (the initial weights; "
                    "with --local_frac the reference is taken again at the switch)")
parser.add_argument("--seed", type=nonneg_int, default=0, help="SAE init and batch order")
parser.error = lambda msg: sys.exit(f"train.py: error: {msg}")  # one line, no usage dump
parser.epilog = TINYSTORIES_HELP


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
    if args.init_from is not None and not args.resume:
        from interop import load_any
        src, cfg, _ = load_any(args.init_from)
        init = (src, cfg)
        adopted = {k: v for k, v in dict(layer=str(cfg["layer"]), dict_ratio=src.n_dict / src.d, model=cfg.get("model"),
                                         no_center=not cfg["center"]).items() if k not in given and v is not None}
        vars(args).update(adopted)
    if not args.resume:
        model_defaults(args, given)
    vars(args).update(adopted)  # the source's own layer, size and model win over a recipe's defaults
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
        clean = clean_logprobs(h_clean, model.unembedding(mm_dtype(h_clean)), e2e[0].kl_chunk, model.config.vocab_size)
    return dict(resid=resid, h_clean=h_clean, clean=clean)


def loss_step(model, sae, r, shared, fired=None):
    """(loss, parts) of one SAE (its flags r) on a micro-batch's shared passes: the only place the three
    kinds differ. The SAE reads the residual at r.layer; local compares its output with it; e2e kinds run
    the spliced suffix with gradients flowing through the frozen blocks into the SAE, against the clean
    final hidden state (KL) and, for e2e_ds, the clean residuals entering blocks r.ds (--ds_layers; all
    later ones in the paper). fired (n_dict,), if given, is incremented by how often each feature fired."""
    L, ln_f = r.layer, model.transformer.ln_f
    x = shared["resid"][L]                                               # (B, T, C)
    x_hat, c = sae(x)
    parts = dict(sparsity=sparsity_loss(c, x.size(-1)))
    if r.loss == "local":
        parts["mse"] = mse_loss(x_hat, x)
        loss = parts["mse"] + r.l1 * parts["sparsity"]
    else:
        _, resids = model.forward_from_layer(x_hat.float(), L, logits=False)
        W_U = model.unembedding(mm_dtype(x))                              # (V_pad, C), aligned GEMMs
        parts["kl"] = fused_kl_div(ln_f(resids[-1]), shared["h_clean"], W_U, r.kl_chunk, clean=shared["clean"],
                                   vocab=model.config.vocab_size, compiled=getattr(r, "compile", False))
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
    ref: list = None  # [loss, weight norm] at its first step: what diverging() compares with
    diverged: bool = False  # the bad streak holds a diverging step (warned once)

    def sae_cfg(self):
        r = self.r
        return dict(layer=r.layer, model=r.model, center=not r.no_center, loss=r.loss, init_from=r.init_from,
                    args={k: v for k, v in vars(r).items() if k != "name"})

    def flags(self, step, switch):
        """The flags of the loss at step: before the --local_frac switch, local with λ = --local_l1."""
        if step >= switch or self.r.loss == "local":
            return self.r
        return argparse.Namespace(**dict(vars(self.r), loss="local", l1=self.r.local_l1, kl_coeff=0.0, ds_coeff=0.0))


DIVERGE = 1e6  # a loss or SAE weight norm this many times its reference counts as a bad step


def adam(sae, lr):
    """The SAE's optimizer: Adam, fused into one kernel per step on CPU and CUDA (the same update up to
    rounding; 7.6 against 23.7 ms a step for the per-tensor loop, an SAE of 768 x 6144 on CPU)."""
    fused = next(sae.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.Adam(sae.parameters(), lr=lr, fused=fused or None)


def diverging(s, loss, norm, fresh):
    """Has SAE s diverged: is the step's loss above DIVERGE x max(1, its reference loss), or the SAE's weight
    norm (all parameters, entering the step) above DIVERGE x its reference norm? The reference is the loss and
    norm of the SAE's first step, i.e. of its initial weights; fresh: take it again (the --local_frac switch,
    where the loss changes kind). A healthy run's loss goes down and its norm changes by a small factor;
    only a blow-up gets near 1e6. loss, norm: finite floats, the same on every process."""
    if s.ref is None or fresh:
        s.ref = [loss, norm]
        return False
    return loss > DIVERGE * max(1.0, s.ref[0]) or norm > DIVERGE * s.ref[1]


REPORT_GRACE_S = 20  # how long a failed rank > 0 leaves rank 0 to report the same error
LOCKS = []  # rank 0's lock on --out_dir (files.lock_run), held from set-up to exit


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
    if rank == 0:
        check_out_dir(args.out_dir, ckpt_exists=ckpt is not None, run_dirs=[r.out_dir for r in runs])
        LOCKS.append(lock_run(args.out_dir))  # one train.py per run folder, until this process ends
        if file_id(os.path.join(args.out_dir, "ckpt.pt")) != (ckpt and ckpt["file_id"]):
            raise ValueError(f"another train.py wrote --out_dir {args.out_dir!r} while this one started; run the "
                             "command again")
    if ckpt is not None:
        check_resumable(ckpt, args, runs, data=None)  # the arguments now, the data once it is loaded
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
    if ckpt is not None:  # its tensors fit the SAEs of this model and --dict_ratio
        C = model.config.n_embd
        check_tensors(ckpt, os.path.join(args.out_dir, "ckpt.pt"), C, int(args.dict_ratio * C))
    if init is not None:
        check_init(init, args, runs, model)
    from sae import check_fits  # every SAE of the sweep, on each process's device, before anything is written
    check_fits(model.config.n_embd, int(args.dict_ratio * model.config.n_embd), device, k=len(runs),
               what=f"--dict_ratio {args.dict_ratio:g}")
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
    if rank == 0 and ckpt is not None:  # the first writes, once every check has passed (a new run: save(0))
        for r in runs:
            os.makedirs(r.out_dir, exist_ok=True)
            trim_eval_log(os.path.join(r.out_dir, "eval.jsonl"), ckpt["step"])  # redone from there
    return args, runs, ckpt, init, device, model, (eval_rows, train_rows, data)


def main():
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    ddp, master = world > 1, rank == 0
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C in set-up: KeyboardInterrupt, handled below
    try:
        args, runs, ckpt, init, device, model, (eval_rows, train_rows, data) = setup(rank, world)
    except (ValueError, OSError, KeyboardInterrupt) as e:
        for lock in LOCKS:
            unlock_run(lock, tidy=True)  # and a folder made for it goes again: nothing was written
        if isinstance(e, KeyboardInterrupt):
            if master:
                print("train.py: interrupted during set-up; nothing was written", file=sys.stderr)
            sys.exit(130)
        if master:
            sys.exit(f"train.py: error: {e}")
        # the same check fails on rank 0 (same arguments), which reports it and ends the job while this
        # process waits; an error of this process alone (its disk, its GPU) is reported after the wait.
        # Exiting at once would let torchrun kill rank 0 before it printed anything.
        time.sleep(REPORT_GRACE_S)
        sys.exit(f"train.py: error (process {rank}): {e}")
    if ddp:
        import torch.distributed as dist
    from data import eval_batches, get_batch, sample_rows
    from eval import evaluate_many
    from interop import save_firing
    from sae import new_sae, save_sae
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for fp32 matmuls on Ampere+
        torch.backends.cudnn.allow_tf32 = True
    C, sweep, ckpt_path = model.config.n_embd, len(runs) > 1, os.path.join(args.out_dir, "ckpt.pt")
    saes = []
    for r in runs:
        torch.manual_seed(args.seed)  # each SAE starts as its single run would, wherever it is in the list
        try:
            sae = new_sae(C, int(args.dict_ratio * C), device)
        except ValueError as e:  # out of memory: one line (check_fits refused what clearly cannot fit)
            for lock in LOCKS:
                unlock_run(lock, tidy=True)  # nothing was written yet
            sys.exit(f"train.py: error: {e}")
        if init is not None and ckpt is None:  # --init_from: its weights, a fresh optimizer
            sae.load_state_dict(init[0].state_dict())
        saes.append(SAERun(r, sae, adam(sae, args.lr),
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
            s.bad, s.ref, s.diverged = saved["bad_steps"], saved.get("ref"), saved.get("diverged", False)
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
    if args.dtype == "bfloat16":
        model.cast_frozen(torch.bfloat16)  # the frozen weights cast once, not at every use
    stop = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.append(signum))  # finish the step, save, exit
    wandb_id = ckpt.get("wandb_id") if ckpt else None
    if master and args.wandb:
        import wandb
        wandb_id = wandb.init(project=args.wandb_project, config=vars(args), id=wandb_id, resume="allow").id

    def tag(s, sep):  # a sweep's lines and W&B keys name their SAE
        return s.r.name + sep if sweep else ""

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
                ref=s.ref, diverged=s.diverged, sae=s.sae.state_dict(), optimizer=s.optimizer.state_dict()) for s in saes])
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
            print(f"eval step {step} | {tag(s, ' | ')}l0 {m['l0']:.2f} | alive {m['alive']} | "
                  f"ce +{m['ce_increase']:.4f} | kl {m['kl']:.4f} | mse {m['mse']:.4g} | "
                  f"ev {m['explained_variance']:.3f}", flush=True)
            if args.wandb:
                wandb.log({f"eval/{tag(s, '/')}{k}": v for k, v in m.items()
                           if not isinstance(v, list)}, step=step)
            s.fired.zero_()  # alive_train counts features fired since the last eval

    def optimizer_step(s, logs):  # collective: clip, then step unless the loss or gradient is non-finite anywhere
        # or the SAE diverges (diverging); such a step changes nothing and counts towards --max_bad_steps
        norm = torch.nn.utils.clip_grad_norm_(s.sae.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        seen = torch.stack([logs["loss"].float(), norm.float(), torch.nn.utils.get_total_norm(s.sae.parameters())])
        if ddp:  # the gradient and weights are already shared; the loss is not: its mean (inf or nan if any is)
            dist.all_reduce(seen)
            seen /= world
        loss, norm, w_norm = seen.tolist()
        nonfinite = not (math.isfinite(loss) and math.isfinite(norm))
        diverged = not nonfinite and diverging(s, loss, w_norm, fresh=step == switch)
        if not nonfinite and not diverged:
            s.optimizer.step()
            s.bad, s.diverged = 0, False
        else:
            s.bad += 1
            if master and nonfinite:
                print(f"step {step:5d} | {tag(s, ' | ')}non-finite loss {loss:.4g} "
                      f"or grad norm {norm:.4g}: skipped ({s.bad} in a row)", flush=True)
            elif master and not s.diverged:  # once a streak
                print(f"step {step:5d} | {tag(s, ' | ')}warning: diverging (over {DIVERGE:g}x the first step's "
                      f"loss or weight norm): loss {loss:.4g} (first step {s.ref[0]:.4g}), weight norm {w_norm:.4g} "
                      f"(first step {s.ref[1]:.4g}); skipped, {args.max_bad_steps} such steps in a row stop the run",
                      flush=True)
            s.diverged = s.diverged or diverged
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
            print(f"step {step:5d}/{steps} | {tag(s, ' | ')}loss {logs['loss']:.4f} | {line} | "
                  f"alive {int((s.fired > 0).sum())} | lr {s.optimizer.param_groups[0]['lr']:.2e} | "
                  f"{dt * 1000:.0f}ms | {eff_batch * args.ctx / dt / 1000:.1f}k tok/s | {fmt_time(elapsed)} | "
                  f"eta {fmt_time(eta)}", flush=True)
            if args.wandb:
                wandb.log({f"train/{tag(s, '/')}{k}": v for k, v in logs.items()}, step=step)

    def signalled():  # collective: did any process get SIGTERM / SIGINT (one verdict for all)
        if not ddp:
            return bool(stop)
        flag = torch.tensor(float(bool(stop)), device=device)
        dist.all_reduce(flag)
        return flag.item() > 0

    def stop_nonfinite():  # each SAE is that of its last good step: skipped steps change nothing
        worst = max(saes, key=lambda s: s.bad)
        save(step + 1)
        what, hint = (f"diverging steps in a row (loss or weight norm over {DIVERGE:g}x the first step's, ",
                      "Start again with a lower --lr") if worst.diverged else \
            ("non-finite steps in a row (", "Resume with --resume --dtype float32 or a larger --max_bad_steps, or "
             "start again with a lower --lr")
        leave(f"train.py: error: {worst.bad} {what}steps {step - worst.bad + 1}..{step})"
              f"{' of ' + worst.r.name if sweep else ''}; stopped, the SAE of the last good step is saved in "
              f"{worst.r.out_dir}. {hint}")

    def stop_by_signal():  # after the checkpoint: exit 128 + the signal, as a shell does
        signum = stop[0] if stop else signal.SIGTERM
        if master:
            print(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved in "
                  f"{args.out_dir}, resume with --resume (or the same command)", flush=True)
        leave(128 + signum)

    def final_eval():  # if it fails, the trained SAEs and checkpoint are saved all the same, then it is reported
        try:
            run_eval(True)
        except Exception as e:
            save(step, finished=True)
            leave(f"train.py: error: the final evaluation failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
                  f"); the trained SAE{'s are' if sweep else ' is'} saved in {args.out_dir}: evaluate with python eval.py "
                  f"{runs[0].out_dir if not sweep else args.out_dir + '/NAME'}")

    if ckpt is None:
        save(0)  # ckpt.pt before any other file: a folder with a run's files but no ckpt.pt is not ours
    t_start, t_train, n_timed = time.time(), 0.0, 0
    for step in range(step, steps + 1):
        last = step == steps
        if last or (step > 0 and step % max(1, args.eval_every // eff_batch) == 0) or (step == 0 and args.init_from) \
                or (step == switch and 0 < switch < steps):  # also the start of a fine-tune, and the switch
            final_eval() if last else run_eval(False)
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
        stopping = signalled()
        if max(s.bad for s in saes) >= args.max_bad_steps:
            stop_nonfinite()
        if (step + 1) % max(1, args.save_every // eff_batch) == 0 or stopping:
            save(step + 1)
        if stopping:
            stop_by_signal()
    if master:
        nxt = f"python analysis.py pareto {args.out_dir}" if sweep else f"python eval.py {args.out_dir}"
        where = f"{len(saes)} SAEs in {args.out_dir}/{{{','.join(r.name for r in runs)}}}" if sweep else \
            f"SAE in {args.out_dir}"
        print(f"done: {steps} steps in {fmt_time(time.time() - t_start)}; {where}; next: {nxt}", flush=True)
    leave()


if __name__ == "__main__":
    try:
        main()
    except OSError as e:  # a save failed (disk full, read-only): the file it replaced, and ckpt.pt, are whole
        sys.exit(f"train.py: error: {write_error(e)}; the run folder's ckpt.pt is its last whole checkpoint: resume "
                 "with --resume once this is fixed")
    except KeyboardInterrupt:  # before the SIGINT handler of training is set: nothing is being written
        sys.exit("train.py: interrupted; the run folder's ckpt.pt is its last whole checkpoint")
