"""
Train an SAE on GPT-2's residual stream entering block --layer: local (MSE), e2e (KL) or e2e_ds
(KL + MSE at every later layer), with the recipe of Braun et al. 2024.

    python train.py --loss e2e_ds --layer 6                    # the paper's SAE_e2e+ds (GPT-2 small, OpenWebText)
    python train.py --loss local --layer 2 --l1 4              # a local SAE at another sparsity
    torchrun --nproc_per_node=4 train.py --loss e2e --layer 6  # the same run on 4 GPUs (DDP on the SAE)
    # tiny CPU run on a local text file:
    python train.py --model tests/tiny-gpt2 --dataset input.txt --loss e2e --layer 1 --ctx 64 \\
        --n_samples 256 --batch_size 4 --grad_accum 1 --eval_samples 8 --eval_every 128 --dict_ratio 4

An unfinished run resumes when started again with the same --out_dir (the same command).
"""
import argparse
import contextlib
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch

from losses import downstream_mse, fused_kl_div, mse_loss, sparsity_loss

# paper Table 2 ("similar CE increase"): λ per (loss, layer); β (--ds_coeff) per layer. For a layer the
# paper did not train, the nearest of 2, 6, 10 is used (the lower one on a tie).
L1_SIMILAR_CE = {("local", 2): 0.8, ("e2e", 2): 0.5, ("e2e_ds", 2): 10.0, ("local", 6): 4.0, ("e2e", 6): 3.0,
                 ("e2e_ds", 6): 50.0, ("local", 10): 6.0, ("e2e", 10): 1.5, ("e2e_ds", 10): 1.75}
DS_COEFF = {2: 2.5, 6: 2.5, 10: 0.05}
KL_COEFF = {"e2e": 1.0, "e2e_ds": 0.5}
# what must match for a run to resume from its checkpoint
RESUME_KEYS = ("model", "dataset", "loss", "layer", "no_center", "dict_ratio", "l1", "kl_coeff", "ds_coeff",
               "n_samples", "batch_size", "grad_accum", "ctx", "lr", "warmup_samples", "min_lr_ratio",
               "grad_clip", "eval_samples", "seed")

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
parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype for matmuls")
parser.add_argument("--compile", action="store_true", help="torch.compile the GPT blocks and the SAE")
parser.add_argument("--kl_chunk", type=int, default=128, help="tokens per chunk of the fused KL")
parser.add_argument("--max_bad_steps", type=int, default=10, help="stop after this many non-finite steps in a row")
parser.add_argument("--seed", type=int, default=0)
parser.error = lambda msg: sys.exit(f"train.py: error: {msg}")  # one line, no usage dump


def nearest_paper_layer(layer):
    return min((2, 6, 10), key=lambda l: (abs(l - layer), l))


def resolve_defaults(args):
    args.out_dir = args.out_dir or os.path.join("out", f"{args.loss}_L{args.layer}")
    if args.l1 is None:
        args.l1 = L1_SIMILAR_CE[(args.loss, nearest_paper_layer(args.layer))]
    if args.kl_coeff is None:
        args.kl_coeff = KL_COEFF.get(args.loss, 0.0)
    if args.ds_coeff is None:
        args.ds_coeff = DS_COEFF[nearest_paper_layer(args.layer)] if args.loss == "e2e_ds" else 0.0
    return args


def check_args(args):
    """Every flag that needs no model or data, checked up front: ValueError with a one-line message."""
    for name in ("batch_size", "grad_accum", "n_samples", "ctx", "eval_samples", "eval_every", "save_every",
                 "log_every", "kl_chunk", "max_bad_steps"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(args, name)}")
    for name in ("l1", "kl_coeff", "ds_coeff", "warmup_samples", "grad_clip", "lr", "dict_ratio"):
        if not getattr(args, name) >= 0:  # also catches nan
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.lr == 0 or args.dict_ratio == 0:
        raise ValueError(f"--lr and --dict_ratio must be > 0, got {args.lr} and {args.dict_ratio}")
    if not 0 <= args.min_lr_ratio <= 1:
        raise ValueError(f"--min_lr_ratio must be in [0, 1], got {args.min_lr_ratio}")
    if args.n_samples < args.batch_size * args.grad_accum:
        raise ValueError(f"--n_samples {args.n_samples} is less than one step of {args.batch_size * args.grad_accum} samples")
    if args.device != "auto" and not (args.device == "cpu" or args.device.startswith("cuda")):
        raise ValueError(f"--device {args.device!r} is not one of cpu, cuda, cuda:N, auto")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device!r} asked for, but no CUDA GPU is available")


def lr_at(step, steps, args, eff_batch):
    """Linear warmup from 0 over warmup_samples, then cosine decay to min_lr_ratio × lr at the last step."""
    warmup = args.warmup_samples // eff_batch
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_rows(seed, n_rows, start, count):
    """Row indices for training positions start .. start+count: epoch e is permutation(seed + e) of all rows,
    so the data order is a pure function of (seed, position) and a resumed run reads what it would have."""
    out, pos = [], start
    while pos < start + count:
        epoch, off = divmod(pos, n_rows)
        take = min(start + count - pos, n_rows - off)
        out.append(np.random.default_rng(seed + epoch).permutation(n_rows)[off:off + take])
        pos += take
    return np.concatenate(out)


def atomic_torch_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact


def load_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        assert isinstance(ckpt, dict) and {"sae", "optimizer", "step", "args"} <= set(ckpt)
    except Exception as e:
        raise ValueError(f"{path!r} is not a readable nanoSAE checkpoint ({type(e).__name__}); "
                         "move it away or choose another --out_dir") from None
    return ckpt


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
    args = resolve_defaults(parser.parse_args())
    # ---------------------------------------------------------------- set-up: every bad input fails here
    ddp = int(os.environ.get("WORLD_SIZE", 1)) > 1
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    master = rank == 0
    try:
        check_args(args)
        if args.grad_accum % world:
            raise ValueError(f"--grad_accum {args.grad_accum} must be a multiple of the {world} processes")
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        if ddp:
            import torch.distributed as dist
            if device.startswith("cuda"):
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        from data import load_rows, split_rows
        from model import GPT
        model = GPT.from_pretrained(args.model, center=not args.no_center).to(device)
        n_layer, C = model.config.n_layer, model.config.n_embd
        if not 0 <= args.layer < n_layer:
            raise ValueError(f"--layer {args.layer} is outside 0..{n_layer - 1} for this {n_layer}-layer model")
        if args.loss == "e2e_ds" and args.layer == n_layer - 1:
            raise ValueError(f"--loss e2e_ds at --layer {args.layer} has no later layer; use e2e or a lower layer")
        if args.ctx > model.config.n_positions:
            raise ValueError(f"--ctx {args.ctx} is above the model's context of {model.config.n_positions}")
        rows = load_rows(args.dataset, args.ctx, n_rows=args.eval_samples + args.n_samples, cache_dir=args.data_dir)
        eval_rows, train_rows = split_rows(rows, args.eval_samples)
        if len(train_rows) < args.batch_size:
            raise ValueError(f"dataset {args.dataset!r} has {len(train_rows)} training rows of {args.ctx} tokens, "
                             f"fewer than one batch of {args.batch_size}")
        if int(rows.max()) >= model.config.vocab_size:  # checked once; the cache is on disk
            raise ValueError(f"dataset {args.dataset!r} has token id {int(rows.max())}, outside the model's "
                             f"vocabulary of {model.config.vocab_size}")
        ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
        ckpt = load_checkpoint(ckpt_path) if os.path.exists(ckpt_path) else None
        if ckpt is not None:
            diff = [k for k in RESUME_KEYS if ckpt["args"].get(k) != getattr(args, k)]
            if diff:
                k = diff[0]
                raise ValueError(f"--out_dir {args.out_dir!r} holds a run with --{k} {ckpt['args'].get(k)!r}, "
                                 f"not {getattr(args, k)!r}; use the same arguments to resume or another --out_dir")
            if ckpt.get("finished"):
                raise ValueError(f"--out_dir {args.out_dir!r} holds a finished run; choose another --out_dir")
        if master:
            os.makedirs(args.out_dir, exist_ok=True)
            if not os.access(args.out_dir, os.W_OK):
                raise ValueError(f"--out_dir {args.out_dir!r} is not writable")
    except (ValueError, OSError) as e:
        sys.exit(f"train.py: error: {e}")

    from eval import evaluate
    from data import eval_batches, get_batch
    from sae import SAE, save_sae
    torch.manual_seed(args.seed)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for fp32 matmuls on Ampere+
        torch.backends.cudnn.allow_tf32 = True
    sae = SAE(C, int(args.dict_ratio * C)).to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=args.lr)
    step, fired = 0, torch.zeros(sae.n_dict, dtype=torch.float64, device=device)
    if ckpt is not None:
        sae.load_state_dict(ckpt["sae"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, fired = ckpt["step"], ckpt["fired"].to(device)
        torch.set_rng_state(ckpt["rng"])
        if master:
            print(f"resuming {args.out_dir} from step {step}")
    if args.compile:
        for block in model.transformer.h:
            block.compile()
        sae.compile()
    sae_ddp = sae
    if ddp:
        from torch.nn.parallel import DistributedDataParallel
        sae_ddp = DistributedDataParallel(sae, device_ids=[int(device.split(":")[1])] if ":" in device else None)
    eff_batch = args.batch_size * args.grad_accum  # samples per optimizer step, over all ranks
    steps = args.n_samples // eff_batch
    accum = args.grad_accum // world  # micro-batches per rank
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    L = args.layer
    sae_cfg = dict(layer=L, model=args.model, center=not args.no_center, loss=args.loss, args=vars(args))
    stop = []
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda signum, frame: stop.append(signum))  # finish the step, save, exit
    if master and args.wandb:
        import wandb
        wandb.init(project=args.wandb_project, config=vars(args), resume="allow")

    def save(next_step, finished=False):
        if not master:
            return
        save_sae(sae, args.out_dir, sae_cfg)
        atomic_torch_save(dict(sae=sae.state_dict(), optimizer=optimizer.state_dict(), step=next_step, args=vars(args),
                               fired=fired.cpu(), rng=torch.get_rng_state(), finished=finished), ckpt_path)

    bad, t_train, n_timed = 0, 0.0, 0
    for step in range(step, steps + 1):
        last = step == steps
        if master and (last or (step > 0 and step % max(1, args.eval_every // eff_batch) == 0)):
            sae.eval()
            with autocast:
                m = evaluate(model, sae, L, eval_batches(eval_rows, args.batch_size, device))
            sae.train()
            m.update(step=step, samples=step * eff_batch, alive_train=int((fired > 0).sum()))
            print(f"eval step {step} | l0 {m['l0']:.2f} | alive {m['alive']} | ce +{m['ce_increase']:.4f} | "
                  f"kl {m['kl']:.4f} | mse {m['mse']:.4g} | ev {m['explained_variance']:.3f}", flush=True)
            with open(os.path.join(args.out_dir, "eval.jsonl"), "a") as f:
                f.write(json.dumps(m) + "\n")
            if args.wandb:
                wandb.log({f"eval/{k}": v for k, v in m.items() if not isinstance(v, list)}, step=step)
            fired.zero_()  # alive_train counts features fired since the last eval
        if last:
            save(step, finished=True)
            break
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
        if torch.isfinite(norm) and torch.isfinite(logs["loss"]):
            optimizer.step()
            bad = 0
        else:
            bad += 1
            if master:
                print(f"step {step}: non-finite loss or gradient ({logs['loss'].item():.4g}, norm {norm.item():.4g}); "
                      f"skipped ({bad} in a row)", flush=True)
            if bad >= args.max_bad_steps:
                save(step + 1)
                sys.exit(f"train.py: error: {bad} non-finite steps in a row at step {step}; the last good state "
                         f"is saved in {args.out_dir}. Try a lower --lr or --dtype float32")
        optimizer.zero_grad(set_to_none=True)
        t_train, n_timed = t_train + time.time() - t0, n_timed + 1
        if ddp and world > 1:  # every rank must agree to stop at the same step
            flag = torch.tensor([float(bool(stop))], device=device)
            dist.all_reduce(flag)
            stop += [signal.SIGTERM] if flag.item() and not stop else []
        if (step + 1) % max(1, args.save_every // eff_batch) == 0 or stop:
            save(step + 1)
        if stop:
            if master:
                print(f"stopped by signal {stop[0]} after step {step}; checkpoint saved in {args.out_dir}, "
                      "run the same command to resume", flush=True)
            sys.exit(128 + stop[0])
        if master and step % args.log_every == 0:
            dt, t_train, n_timed = t_train / n_timed, 0.0, 0
            line = " | ".join(f"{k} {v.item():.4g}" for k, v in logs.items() if k != "loss")
            print(f"step {step:5d} | loss {logs['loss'].item():.4f} | {line} | alive {int((fired > 0).sum())} | "
                  f"lr {optimizer.param_groups[0]['lr']:.2e} | {dt * 1000:.0f}ms | "
                  f"{eff_batch * args.ctx / dt / 1000:.1f}k tok/s", flush=True)
            if args.wandb:
                wandb.log({f"train/{k}": v.item() for k, v in logs.items()}, step=step)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
