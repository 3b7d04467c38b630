"""
Train an SAE on GPT-2's residual stream entering block --layer: local (MSE), e2e (KL) or e2e_ds
(KL + MSE at every later layer), with the recipe of Braun et al. 2024.

    python train.py --loss e2e_ds --layer 6                    # the paper's SAE_e2e+ds (GPT-2 small, OpenWebText)
    python train.py --loss local --layer 2 --l1 4              # a local SAE at another sparsity
    python train.py --resume --out_dir out/e2e_ds_L6           # continue a stopped run with its own arguments
    torchrun --standalone --nproc_per_node=4 train.py --loss e2e --layer 6  # 4 GPUs, DDP on the SAE
    # a small CPU run on a local text file (minutes):
    python train.py --dataset input.txt --loss e2e --layer 6 --ctx 128 --n_samples 512 --batch_size 4 \\
        --grad_accum 1 --dict_ratio 4 --eval_samples 16 --eval_every 256 --warmup_samples 64 --device cpu

Long runs: --out_dir gets ckpt.pt every --save_every samples and on SIGTERM/SIGINT (the step finishes,
then it saves and exits with 128 + the signal). A run killed in any way continues from its last checkpoint
exactly as if never stopped: with --resume, or by running the same command again (which says it resumes).
A step with a non-finite loss or gradient is skipped; --max_bad_steps in a row stop the run.
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

import torch

from checkpoint import (append_eval_log, check_out_dir, check_resumable, load_checkpoint, restore, save_checkpoint,
                        trim_eval_log)
from losses import downstream_mse, fused_kl_div, mse_loss, sparsity_loss

# paper Table 2 ("similar CE increase"): λ per (loss, layer); β (--ds_coeff) per layer. For a layer the
# paper did not train, the nearest of 2, 6, 10 is used (the lower one on a tie).
L1_SIMILAR_CE = {("local", 2): 0.8, ("e2e", 2): 0.5, ("e2e_ds", 2): 10.0, ("local", 6): 4.0, ("e2e", 6): 3.0,
                 ("e2e_ds", 6): 50.0, ("local", 10): 6.0, ("e2e", 10): 1.5, ("e2e_ds", 10): 1.75}
DS_COEFF = {2: 2.5, 6: 2.5, 10: 0.05}
KL_COEFF = {"e2e": 1.0, "e2e_ds": 0.5}

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
# model
parser.add_argument("--model", default="gpt2", help="hub id (gpt2, gpt2-medium, ...) or a local save_pretrained folder")
parser.add_argument("--layer", type=int, default=6, help="SAE on the residual stream entering this block")
parser.add_argument("--no_center", action="store_true", help="do not centre the residual stream (center_writing_weights)")
# sae and loss
parser.add_argument("--loss", default="e2e_ds", choices=["local", "e2e", "e2e_ds"])
parser.add_argument("--dict_ratio", type=float, default=60.0, help="n_dict = dict_ratio * d_model")
parser.add_argument("--l1", type=float, default=None, help="sparsity coefficient λ; default: paper Table 2 "
                    "'similar CE' value for (loss, layer), nearest of layers 2/6/10 for other layers")
parser.add_argument("--kl_coeff", type=float, default=None, help="default 1.0 (e2e), 0.5 (e2e_ds)")
parser.add_argument("--ds_coeff", type=float, default=None, help="β of the downstream MSE; default 2.5 (layers 2, 6), "
                    "0.05 (layer 10), nearest of those for other layers")
# data
parser.add_argument("--dataset", default="apollo-research/Skylion007-openwebtext-tokenizer-gpt2",
                    help="hub dataset (input_ids or text column) or a local .txt/.jsonl/.parquet file or folder")
parser.add_argument("--ctx", type=int, default=1024, help="tokens per sample")
parser.add_argument("--data_dir", default=os.path.join(os.path.expanduser("~"), ".cache", "nanosae"), help="token cache")
# optimization
parser.add_argument("--n_samples", type=int, default=400_000, help="training samples (rows of ctx tokens)")
parser.add_argument("--batch_size", type=int, default=8, help="micro-batch, in samples")
parser.add_argument("--grad_accum", type=int, default=2, help="micro-batches per optimizer step (across all ranks)")
parser.add_argument("--lr", type=float, default=5e-4)
parser.add_argument("--warmup_samples", type=int, default=20_000, help="linear warmup from 0 over this many samples")
parser.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine decay to this fraction of --lr")
parser.add_argument("--grad_clip", type=float, default=10.0, help="clip the SAE's grad norm (0: off)")
# evaluation and logging
parser.add_argument("--eval_every", type=int, default=20_000, help="evaluate every this many samples (and at the end)")
parser.add_argument("--eval_samples", type=int, default=500, help="held-out rows for evaluation (never trained on)")
parser.add_argument("--log_every", type=int, default=10, help="log every this many steps")
parser.add_argument("--wandb", action="store_true", help="also log to Weights & Biases")
parser.add_argument("--wandb_project", default="nanosae")
# system
parser.add_argument("--out_dir", default=None, help="default out/{loss}_L{layer}")
parser.add_argument("--save_every", type=int, default=20_000, help="checkpoint every this many samples (and at the end)")
parser.add_argument("--resume", action="store_true", help="continue the run in --out_dir (which must hold one); "
                    "flags not given take the run's values. Without it an unfinished run with the same flags continues")
parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype for matmuls")
parser.add_argument("--compile", action="store_true", help="torch.compile the GPT blocks and the SAE")
parser.add_argument("--kl_chunk", type=int, default=None, help="tokens per chunk of the fused KL (default 64 on CPU, 512 on CUDA)")
parser.add_argument("--max_bad_steps", type=int, default=10, help="stop after this many non-finite steps in a row")
parser.add_argument("--seed", type=int, default=0)
parser.error = lambda msg: sys.exit(f"train.py: error: {msg}")  # one line, no usage dump


def nearest_paper_layer(layer):
    return min((2, 6, 10), key=lambda l: (abs(l - layer), l))


def resolve_defaults(args):
    if args.l1 is None:
        args.l1 = L1_SIMILAR_CE[(args.loss, nearest_paper_layer(args.layer))]
    if args.kl_coeff is None:
        args.kl_coeff = KL_COEFF.get(args.loss, 0.0)
    if args.ds_coeff is None:
        args.ds_coeff = DS_COEFF[nearest_paper_layer(args.layer)] if args.loss == "e2e_ds" else 0.0
    return args


def parse_args(argv=None):
    """(args, the checkpoint in --out_dir or None). With --resume the folder must hold a checkpoint, and every
    flag not on the command line takes the run's value; without it the flags are as given."""
    args = parser.parse_args(argv)
    args.out_dir = args.out_dir or os.path.join("out", f"{args.loss}_L{args.layer}")
    path = os.path.join(args.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path) if os.path.lexists(path) else None
    if args.resume:
        if ckpt is None:
            raise ValueError(f"--resume: --out_dir {args.out_dir!r} holds no checkpoint (ckpt.pt) to resume from")
        unset = object()  # argparse leaves a flag that is not on the command line at what the namespace holds
        given = vars(parser.parse_args(argv, namespace=argparse.Namespace(**dict.fromkeys(vars(args), unset))))
        for k, v in ckpt["args"].items():
            if given.get(k) is unset and k not in ("out_dir", "resume"):
                setattr(args, k, v)
    return resolve_defaults(args), ckpt


def check_args(args):
    """Every flag that needs no model or data, checked up front: ValueError with a one-line message."""
    for name in ("batch_size", "grad_accum", "n_samples", "ctx", "eval_samples", "eval_every", "save_every",
                 "log_every", "kl_chunk", "max_bad_steps"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(args, name)}")
    for name in ("l1", "kl_coeff", "ds_coeff", "warmup_samples", "grad_clip", "lr", "dict_ratio"):
        if not 0 <= getattr(args, name) < math.inf:  # also catches nan
            raise ValueError(f"--{name} must be a number >= 0, got {getattr(args, name)}")
    if args.lr == 0 or args.dict_ratio == 0:
        raise ValueError(f"--lr and --dict_ratio must be > 0, got {args.lr} and {args.dict_ratio}")
    for k, unused in (("kl_coeff", args.loss == "local"), ("ds_coeff", args.loss != "e2e_ds")):
        if unused and getattr(args, k) > 0:
            raise ValueError(f"--{k} {getattr(args, k)} has no effect with --loss {args.loss}; leave it out")
    if not 0 <= args.min_lr_ratio <= 1:
        raise ValueError(f"--min_lr_ratio must be in [0, 1], got {args.min_lr_ratio}")
    if args.n_samples < args.batch_size * args.grad_accum:
        raise ValueError(f"--n_samples {args.n_samples} is less than one step of {args.batch_size * args.grad_accum} samples")
    if args.device != "auto" and not (args.device == "cpu" or args.device.startswith("cuda")):
        raise ValueError(f"--device {args.device!r} is not one of cpu, cuda, cuda:N, auto")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device!r} asked for, but no CUDA GPU is available")
    if args.wandb and importlib.util.find_spec("wandb") is None:
        raise ValueError("--wandb needs the wandb package (pip install wandb)")


def check_model(args, model):
    """The flags that depend on the model, and the model itself: ValueError with a one-line message."""
    n_layer, C = model.config.n_layer, model.config.n_embd
    if not 0 <= args.layer < n_layer:
        raise ValueError(f"--layer {args.layer} is outside 0..{n_layer - 1} for this {n_layer}-layer model")
    if args.loss == "e2e_ds" and args.layer == n_layer - 1:
        raise ValueError(f"--loss e2e_ds at --layer {args.layer} has no later layer; use e2e or a lower layer")
    if args.ctx > model.config.n_positions:
        raise ValueError(f"--ctx {args.ctx} is above the model's context of {model.config.n_positions}")
    if int(args.dict_ratio * C) < 1:
        raise ValueError(f"--dict_ratio {args.dict_ratio} gives no features at d_model {C}")
    bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad:
        raise ValueError(f"model {args.model!r} has non-finite weights ({bad})")


def lr_at(step, steps, args, eff_batch):
    """Linear warmup from 0 over warmup_samples, then cosine decay to min_lr_ratio × lr at the last step."""
    warmup = args.warmup_samples // eff_batch
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def loss_step(model, sae, idx, args, fired=None):
    """(loss, parts) for one micro-batch of token ids (B, T): the only place the three kinds differ.
    The prefix to layer L runs once without grad; for e2e kinds the clean suffix runs without grad (its
    final hidden state and later residuals are the targets); then the SAE, then the spliced suffix with
    gradients flowing through the frozen blocks into the SAE. Local runs never run the suffix.
    fired (n_dict,), if given, is incremented by how often each feature fired."""
    L, ln_f, W_U = args.layer, model.transformer.ln_f, model.lm_head.weight
    with torch.no_grad():
        x = model.forward_to_layer(idx, L)                              # (B, T, C)
        if args.loss != "local":
            _, clean = model.forward_from_layer(x, L, logits=False)     # residuals entering L+1.., final
            h_clean = ln_f(clean[-1])                                   # (B, T, C)
    x_hat, c = sae(x)
    parts = dict(sparsity=sparsity_loss(c, x.size(-1)))
    if args.loss == "local":
        parts["mse"] = mse_loss(x_hat, x)
        loss = parts["mse"] + args.l1 * parts["sparsity"]
    else:
        _, resids = model.forward_from_layer(x_hat.float(), L, logits=False)
        parts["kl"] = fused_kl_div(ln_f(resids[-1]), h_clean, W_U, args.kl_chunk)
        loss = args.kl_coeff * parts["kl"] + args.l1 * parts["sparsity"]
        if args.loss == "e2e_ds":
            parts["ds"] = downstream_mse(resids[:-1], clean[:-1])
            loss = loss + args.ds_coeff * parts["ds"]
    active = (c > 0).reshape(-1, c.size(-1))                            # (B*T, n_dict)
    parts["l0"] = active.sum(-1).float().mean()
    if fired is not None:
        fired.add_(active.sum(0, dtype=torch.float64))
    return loss, parts


def main():
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    ddp, master = world > 1, rank == 0
    # ---------------------------------------------------------------- set-up: every bad input fails here
    try:
        args, ckpt = parse_args()
        check_args(args)
        if args.grad_accum % world:
            raise ValueError(f"--grad_accum {args.grad_accum} must be a multiple of the {world} processes")
        if ckpt is not None:
            check_resumable(ckpt, args, data=None)  # the arguments now, the data once it is loaded
        if master:
            check_out_dir(args.out_dir, ckpt_exists=ckpt is not None)
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
        check_model(args, model)
        if ddp and not master:
            dist.barrier()  # rank 0 tokenises into the cache first; the others then read it
        eval_rows, train_rows, data = load_split(args.dataset, args.ctx, args.eval_samples, args.n_samples,
                                                 model.config.vocab_size, cache_dir=args.data_dir)
        if ddp and master:
            dist.barrier()
        if len(train_rows) < args.batch_size:
            raise ValueError(f"dataset {args.dataset!r} has {len(train_rows)} training rows of {args.ctx} tokens, "
                             f"fewer than one batch of {args.batch_size}")
        if ckpt is not None:
            check_resumable(ckpt, args, data)
        ckpt_path, eval_path = os.path.join(args.out_dir, "ckpt.pt"), os.path.join(args.out_dir, "eval.jsonl")
        if master:
            os.makedirs(args.out_dir, exist_ok=True)
            trim_eval_log(eval_path, ckpt["step"] if ckpt else 0)  # evaluations from there on are done again
    except (ValueError, OSError) as e:
        sys.exit(f"train.py: error: {e}" if master else 1)

    from eval import evaluate
    from data import eval_batches, get_batch, sample_rows
    from interop import save_firing
    from sae import SAE, save_sae
    torch.manual_seed(args.seed)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for fp32 matmuls on Ampere+
        torch.backends.cudnn.allow_tf32 = True
    C = model.config.n_embd
    sae = SAE(C, int(args.dict_ratio * C)).to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=args.lr)
    # fired: how often each feature fired since the last eval; across processes the counts add up (rank 0
    # holds the sum after sync_fired), and the checkpoint holds the sum
    step, bad, fired = 0, 0, torch.zeros(sae.n_dict, dtype=torch.float64, device=device)
    eff_batch = args.batch_size * args.grad_accum  # samples per optimizer step, over all processes
    steps = args.n_samples // eff_batch
    if ckpt is not None:
        restore(ckpt, sae, optimizer)
        step, bad = ckpt["step"], ckpt["bad_steps"]
        if master:
            fired.copy_(ckpt["fired"])
    if master:
        print(f"{'resuming' if ckpt else 'starting'} {args.out_dir} at step {step} of {steps} ({eff_batch} samples "
              f"per step, {world} process{'es' * ddp}, {device})", flush=True)
    if args.compile:
        for block in model.transformer.h:
            block.compile()
        sae.compile()
    sae_ddp = sae
    if ddp:
        from torch.nn.parallel import DistributedDataParallel
        sae_ddp = DistributedDataParallel(sae, device_ids=[int(device.split(":")[1])] if ":" in device else None)
    accum = args.grad_accum // world  # micro-batches per process
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    L = args.layer
    sae_cfg = dict(layer=L, model=args.model, center=not args.no_center, loss=args.loss, args=vars(args))
    stop = []
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, frame: stop.append(signum))  # finish the step, save, exit
    wandb_id = ckpt.get("wandb_id") if ckpt else None
    if master and args.wandb:
        import wandb
        wandb_id = wandb.init(project=args.wandb_project, config=vars(args), id=wandb_id, resume="allow").id

    def sync_fired():  # collective: every process calls it at the same step
        if ddp:
            dist.all_reduce(fired)
            if not master:
                fired.zero_()

    def save(next_step, finished=False):  # collective
        sync_fired()
        if master:
            state = dict(step=next_step, bad_steps=bad, fired=fired.cpu(), args=vars(args), data=data,
                         wandb_id=wandb_id)
            save_checkpoint(ckpt_path, sae, optimizer, finished=False, **state)
            save_sae(sae, args.out_dir, sae_cfg)  # after ckpt.pt: an SAE without a checkpoint is not ours
            if finished:  # only once sae.safetensors is final too
                save_checkpoint(ckpt_path, sae, optimizer, finished=True, **state)

    def leave(status=None):  # every process exits at once, after rank 0 has saved
        if ddp:
            dist.barrier()
            dist.destroy_process_group()
        sys.exit(status if master or not isinstance(status, str) else 1)

    t_train, n_timed = 0.0, 0
    for step in range(step, steps + 1):
        last = step == steps
        if last or (step > 0 and step % max(1, args.eval_every // eff_batch) == 0):
            sync_fired()
            if master:
                sae.eval()
                with autocast:
                    m, counts = evaluate(model, sae, L, eval_batches(eval_rows, args.batch_size, device),
                                         return_counts=True)
                sae.train()
                if last:  # per-feature firing frequency on the held-out rows, for analysis and export
                    save_firing(args.out_dir, counts / m["alive_tokens"], m["alive_tokens"], dataset=args.dataset,
                                held_out=True)
                m.update(step=step, samples=step * eff_batch, alive_train=int((fired > 0).sum()))
                append_eval_log(eval_path, m)
                print(f"eval step {step} | l0 {m['l0']:.2f} | alive {m['alive']} | ce +{m['ce_increase']:.4f} | "
                      f"kl {m['kl']:.4f} | mse {m['mse']:.4g} | ev {m['explained_variance']:.3f}", flush=True)
                if args.wandb:
                    wandb.log({f"eval/{k}": v for k, v in m.items() if not isinstance(v, list)}, step=step)
                fired.zero_()  # alive_train counts features fired since the last eval
        if last:
            save(step, finished=True)
            leave()
        t0 = time.time()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, args, eff_batch)
        logs = {}
        for j in range(accum):
            start = (step * args.grad_accum + j * world + rank) * args.batch_size
            idx = get_batch(train_rows, sample_rows(args.seed, len(train_rows), start, args.batch_size), device)
            sync = not ddp or j == accum - 1
            with (contextlib.nullcontext() if sync else sae_ddp.no_sync()), autocast:
                loss, parts = loss_step(model, sae_ddp, idx, args, fired)
                (loss / accum).backward()
            for k, v in dict(parts, loss=loss).items():
                logs[k] = logs.get(k, 0.0) + v.detach() / accum
        norm = torch.nn.utils.clip_grad_norm_(sae.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf"))
        # one verdict for all processes: is the loss non-finite anywhere (the gradient is already shared), and
        # did any process get a signal
        verdict = torch.tensor([float(not torch.isfinite(logs["loss"])), float(bool(stop))], device=device)
        if ddp:
            dist.all_reduce(verdict)
        finite, stopping = bool(torch.isfinite(norm)) and verdict[0].item() == 0, verdict[1].item() > 0
        if finite:
            optimizer.step()
            bad = 0
        else:
            bad += 1
            if master:
                print(f"step {step:5d} | non-finite loss {logs['loss'].item():.4g} or grad norm {norm.item():.4g}: "
                      f"skipped ({bad} in a row)", flush=True)
        optimizer.zero_grad(set_to_none=True)
        t_train, n_timed = t_train + time.time() - t0, n_timed + 1
        if step % args.log_every == 0:
            vals = torch.stack(list(logs.values()))
            if ddp:  # collective: mean over processes, and the firing counts summed
                dist.all_reduce(vals)
                vals /= world
                sync_fired()
            if master:
                dt, t_train, n_timed = t_train / n_timed, 0.0, 0
                logs = dict(zip(logs, vals.tolist()))
                line = " | ".join(f"{k} {v:.4g}" for k, v in logs.items() if k != "loss")
                print(f"step {step:5d} | loss {logs['loss']:.4f} | {line} | alive {int((fired > 0).sum())} | "
                      f"lr {optimizer.param_groups[0]['lr']:.2e} | {dt * 1000:.0f}ms | "
                      f"{eff_batch * args.ctx / dt / 1000:.1f}k tok/s", flush=True)
                if args.wandb:
                    wandb.log({f"train/{k}": v for k, v in logs.items()}, step=step)
        if bad >= args.max_bad_steps:
            save(step + 1)  # the SAE is that of the last good step: skipped steps change nothing
            leave(f"train.py: error: {bad} non-finite steps in a row (steps {step - bad + 1}..{step}); stopped, the "
                  f"SAE of the last good step is saved in {args.out_dir}. Resume with --resume --dtype float32 or a "
                  "larger --max_bad_steps, or start again with a lower --lr")
        if (step + 1) % max(1, args.save_every // eff_batch) == 0 or stopping:
            save(step + 1)
        if stopping:
            signum = stop[0] if stop else signal.SIGTERM
            if master:
                print(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved in "
                      f"{args.out_dir}, resume with --resume (or the same command)", flush=True)
            leave(128 + signum)


if __name__ == "__main__":
    main()
