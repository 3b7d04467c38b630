"""
Train SAEs on GPT-2's residual stream entering block --layer: local (MSE), e2e (KL) or e2e_ds (KL + MSE at
every later layer), with the recipe of Braun et al. 2024 (docs/PAPER.md). One SAE, or a sweep of many sharing
each batch.

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

Sweeps: --loss, --layer and --l1 take comma lists (--l1 also KIND=LIST tokens); the SAEs are every (loss, layer,
λ), each in --out_dir/{loss}_L{layer}_l{λ}, each exactly as its single run, sharing the batch and the frozen passes.
Long runs (docs/LONG_RUNS.md): ckpt.pt every --save_every samples and on SIGTERM/SIGINT; a run killed in any way
continues exactly (--resume, or the same command); bad steps are skipped, --max_bad_steps in a row stop the run.
DDP: --batch_size is per process and --grad_accum over all, so the result does not depend on the process count.
"""
import argparse
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

import config
import ddp
from checkpoint import RunFolder, check_resumable, guarded_step, setup_failed, setup_signals
from cli import HelpFormatter, nonempty, nonneg_int, one_line_errors, resolve_device
from logs import Log
from data import DEFAULT_CACHE, eval_batches, get_batch, load_split, sample_rows
from eval import evaluate_many
from files import write_error
from losses import (clean_logprobs, downstream_mse, fused_kl_div, kl_chunk_defaults, kl_div, mm_dtype, mse_loss,
                    sparsity_loss)
from model import GPT
from sae import new_sae, save_firing


parser = one_line_errors(argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
                                                 epilog=config.TINYSTORIES_HELP), "train.py")
arg = parser.add_argument_group("model").add_argument
arg("--model", type=nonempty, default="gpt2", help="hub id (gpt2, gpt2-medium, ...) or a local save_pretrained folder")
arg("--layer", default="6", help="SAE on the residual stream entering this block; a comma list sweeps")
arg("--no_center", action="store_true", help="do not centre the residual stream (center_writing_weights)")
arg = parser.add_argument_group("SAE and loss (the kinds' coefficients: config.KINDS)").add_argument
arg("--loss", default="e2e_ds", help=f"{', '.join(config.KINDS)}; a comma list sweeps")
arg("--dict_ratio", type=float, default=60.0, help="n_dict = dict_ratio * d_model")
arg("--l1", nargs="+", default=None, help="sparsity λ, a comma list, or KIND=LIST (local=1,2 e2e_ds=10,50); default: the paper's")
arg("--kl_coeff", type=float, default=None, help="coefficient of the KL; default 1.0 (e2e), 0.5 (e2e_ds)")
arg("--ds_coeff", type=float, default=None, help="β of the downstream MSE; default 2.5 (layers 2, 6), 0.05 (10), the nearest")
arg("--ds_layers", type=nonempty, default="all", help="blocks whose input the downstream MSE compares: all, next, next:N, last, or a list")
arg("--init_from", type=nonempty, default=None, help="start every SAE from this run folder, Apollo .pt or SAELens folder; default: none")
arg("--local_frac", type=float, default=0.0, help="train this first fraction of the samples with the local loss, then --loss")
arg("--local_l1", type=float, default=None, help="λ of --local_frac's local phase; default: the paper's local λ")
arg = parser.add_argument_group("data").add_argument
arg("--dataset", type=nonempty, default="apollo-research/Skylion007-openwebtext-tokenizer-gpt2",
    help="hub dataset (input_ids or text column) or a local .txt/.jsonl/.parquet file or folder")
arg("--ctx", type=int, default=1024, help="tokens per sample")
arg("--data_dir", type=nonempty, default=DEFAULT_CACHE, help="token cache (the environment's NANOSAE_CACHE, if set)")
arg = parser.add_argument_group("optimisation").add_argument
arg("--n_samples", type=int, default=400_000, help="training samples (rows of ctx tokens)")
arg("--batch_size", type=int, default=8, help="micro-batch, in samples")
arg("--grad_accum", type=int, default=2, help="micro-batches per optimizer step (across all ranks)")
arg("--lr", type=float, default=5e-4, help="peak learning rate (Adam)")
arg("--warmup_samples", type=int, default=20_000, help="linear warmup from 0 over this many samples (5%% of --n_samples)")
arg("--min_lr_ratio", type=float, default=0.1, help="cosine decay to this fraction of --lr")
arg("--grad_clip", type=float, default=10.0, help="clip the SAE's grad norm (0: off)")
arg("--seed", type=nonneg_int, default=0, help="SAE init and batch order")
arg = parser.add_argument_group("evaluation and logging").add_argument
arg("--eval_every", type=int, default=20_000, help="evaluate every this many samples (and at the end)")
arg("--eval_samples", type=int, default=500, help="held-out rows for evaluation (never trained on)")
arg("--log_every", type=int, default=10, help="log every this many steps")
arg("--wandb", action="store_true", help="also log to Weights & Biases")
arg("--wandb_project", type=nonempty, default="nanosae", help="W&B project")
arg = parser.add_argument_group("system").add_argument
arg("--out_dir", type=nonempty, default=None, help="the run folder; default out/{loss}_L{layer}, a sweep's out/sweep_...")
arg("--save_every", type=int, default=20_000, help="checkpoint every this many samples (and at the end)")
arg("--resume", action="store_true", help="continue the run in --out_dir; flags not given take the run's values")
arg("--device", default="auto", help="cpu, cuda, cuda:N or auto")
arg("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype for matmuls")
arg("--compile", action="store_true", help="torch.compile the GPT blocks, the SAE and the KL's elementwise work per chunk")
arg("--kl_chunk", type=int, default=None, help=f"tokens per chunk of the fused KL; default {kl_chunk_defaults()}")
arg("--no_kl_share", action="store_true", help="a sweep recomputes the KL's clean side per SAE (less memory)")
arg("--max_bad_steps", type=int, default=10, help="stop after this many bad steps in a row (non-finite or diverging)")


# ----------------------------------------------------------------------------- one step: what the kinds share, then each SAE

@torch.no_grad()
def shared_passes(model, idx, runs, kl_share=True):
    """The frozen model's work for one micro-batch (B, T), done once for every SAE of the step:
        resid[l]  the residual entering block l (B, T, C), for each SAE's layer; with e2e kinds also every
                  later one, and resid[n_layer] = the final residual (the clean pass runs to the end once)
        h_clean   ln_f(resid[n_layer]), the KL's target (e2e kinds)
        clean     the clean side of the fused KL (losses.clean_logprobs), when several e2e SAEs share it
    Local SAEs alone stop at the deepest layer they need."""
    e2e = [r for r in runs if r.kl_coeff or r.ds_coeff]
    lo = min(r.layer for r in runs)
    hi = model.config.n_layer if e2e else max(r.layer for r in runs)
    keep = {r.layer for r in runs} | {k for r in e2e for k in config.ds_blocks(r, hi)}  # no residual nobody reads
    x = model.forward_to_layer(idx, lo)                                  # (B, T, C)
    resid = {lo: x}
    for l in range(lo, hi):  # the same blocks, in the same order, as forward_from_layer
        x = model.transformer.h[l](x)
        if l + 1 in keep:
            resid[l + 1] = x
    h_clean = model.transformer.ln_f(x) if e2e else None                 # (B, T, C)
    clean = None
    if kl_share and sum(1 for r in e2e if r.kl_coeff) > 1:
        clean = clean_logprobs(h_clean, model.unembedding(mm_dtype(h_clean)), e2e[0].kl_chunk, model.config.vocab_size)
    return dict(resid=resid, h_clean=h_clean, clean=clean)


def loss_step(model, sae, r, shared, fired=None):
    """(loss, parts) of one SAE (its flags r) on a micro-batch's shared passes: the only place the kinds differ,
    each by the coefficients of its row of config.KINDS; a term whose coefficient is 0 is not computed.
        loss = r.mse_coeff · mse(x̂, x) + r.kl_coeff · KL(clean ‖ spliced) + r.ds_coeff · downstream + r.l1 · sparsity
    The SAE reads the residual at r.layer; the e2e terms run the spliced suffix with gradients flowing through the
    frozen blocks into the SAE, against the clean final hidden state (KL) and the clean residuals entering blocks
    r.ds (downstream). fired (n_dict,), if given, is incremented by how often each feature fired."""
    L, ln_f = r.layer, model.transformer.ln_f
    x = shared["resid"][L]                                               # (B, T, C)
    x_hat, c = sae(x)
    parts = dict(sparsity=sparsity_loss(c, x.size(-1)))
    if r.mse_coeff:
        parts["mse"] = mse_loss(x_hat, x)
    if r.kl_coeff or r.ds_coeff:
        _, resids = model.forward_from_layer(x_hat.float(), L, logits=False)   # inputs of blocks L+1.., final
    if r.kl_coeff:
        W_U = model.unembedding(mm_dtype(x))                              # (V_pad, C), aligned GEMMs
        parts["kl"] = fused_kl_div(ln_f(resids[-1]), shared["h_clean"], W_U, r.kl_chunk, clean=shared["clean"],
                                   vocab=model.config.vocab_size, compiled=getattr(r, "compile", False))
    loss = sum(coeff * parts[k] for k, coeff in (("mse", r.mse_coeff), ("kl", r.kl_coeff)) if coeff) \
        + r.l1 * parts["sparsity"]
    if r.ds_coeff:
        ds = config.ds_blocks(r, model.config.n_layer)
        parts["ds"] = downstream_mse([resids[k - L - 1] for k in ds], [shared["resid"][k] for k in ds])
        loss = loss + r.ds_coeff * parts["ds"]
    active = (c > 0).reshape(-1, c.size(-1))                            # (B*T, n_dict)
    parts["l0"] = active.sum(-1).float().mean()
    if fired is not None:
        fired.add_(active.sum(0, dtype=torch.float64))
    return loss, parts


def reference_loss_step(model, sae, idx, r):
    """loss_step the plain way, as the reference implementation computes it: the whole clean model to full fp32
    logits, then the whole model again from the tokens with the SAE spliced in, full logits and the plain KL
    (losses.kl_div). The same value and SAE gradient, at far more time and memory; the tests and bench.py
    --naive compare the two."""
    L = r.layer
    with torch.no_grad():
        logits_clean, clean = model.forward_from_layer(model.forward_to_layer(idx, L), L)
    x = model.forward_to_layer(idx, L)  # the prefix again
    x_hat, c = sae(x)
    logits, resids = model.forward_from_layer(x_hat.float(), L)
    ds = config.ds_blocks(r, model.config.n_layer)
    parts = dict(sparsity=sparsity_loss(c, x.size(-1)), mse=mse_loss(x_hat, x), kl=kl_div(logits, logits_clean.float()),
                 ds=downstream_mse([resids[k - L - 1] for k in ds], [clean[k - L - 1] for k in ds]) if ds else None)
    parts = {k: v for k, v in parts.items() if k == "sparsity" or getattr(r, f"{k}_coeff")}
    loss = r.l1 * parts["sparsity"] + sum(getattr(r, f"{k}_coeff") * v for k, v in parts.items() if k != "sparsity")
    parts["l0"] = (c > 0).sum(-1).float().mean()
    return loss, parts


def lr_at(step, steps, args, eff_batch):
    """Linear warmup from 0 over warmup_samples, then cosine decay to min_lr_ratio × lr at the last step."""
    warmup = args.warmup_samples // eff_batch
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def adam(sae, lr):
    """The SAE's optimizer: Adam, fused into one kernel per step on CPU and CUDA (the same update up to rounding)."""
    fused = next(sae.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.Adam(sae.parameters(), lr=lr, fused=fused or None)


@dataclass
class SAERun:
    """One SAE of the run and everything that is its own: flags (r, with r.out_dir its run folder), weights, Adam,
    firing counts since the last eval, and its bad-step streak."""
    r: argparse.Namespace
    sae: torch.nn.Module
    optimizer: torch.optim.Optimizer
    fired: torch.Tensor
    module: torch.nn.Module = None  # what the step calls: the SAE, or its DDP wrapper
    bad: int = 0
    ref: list = None  # [loss, weight norm] at its first step: what a diverging step is measured against
    diverged: bool = False  # the bad streak holds a diverging step (warned once)

    def sae_cfg(self):
        r = self.r
        return dict(layer=r.layer, model=r.model, center=not r.no_center, loss=r.loss, init_from=r.init_from,
                    args={k: v for k, v in vars(r).items() if k != "name"})

    def flags(self, step, switch):
        """The flags of the loss at step: before the --local_frac switch, the local row (config.local_phase)."""
        return self.r if step >= switch else config.local_phase(self.r)


# ----------------------------------------------------------------------------- set-up, evaluation, logging

def setup():
    """Resolve and check everything, load the model and data, make the SAEs: (args, runs, ckpt, folder, device, model,
    (eval_rows, train_rows, data), saes). Every bad input fails here with a ValueError, before anything is written."""
    args, runs, ckpt, init = config.resolve(parser)
    config.check_args(args, runs)
    if args.grad_accum % ddp.WORLD:
        raise ValueError(f"--grad_accum {args.grad_accum} must be a multiple of the {ddp.WORLD} processes")
    folder = RunFolder(args, runs, ckpt)  # rank 0 locks --out_dir
    if ckpt is not None:
        check_resumable(ckpt, args, runs, data=None)  # the arguments now, the data once it is loaded
    device = ddp.init(resolve_device(args.device), ckpt["step"] if ckpt else -1, args.out_dir)
    model = GPT.from_pretrained(args.model, center=not args.no_center).to(device)
    config.check_model(args, runs, model, ckpt, init, device)  # and the checkpoint's tensors, the source, memory
    with ddp.master_first():  # rank 0 tokenises into the cache; the others then read it
        eval_rows, train_rows, data = load_split(args.dataset, args.ctx, args.eval_samples, args.n_samples,
                                                 model.config.vocab_size, cache_dir=args.data_dir)
    if len(train_rows) < args.batch_size:
        raise ValueError(f"dataset {args.dataset!r} has {len(train_rows)} training rows of {args.ctx} tokens, "
                         f"fewer than one batch of {args.batch_size}")
    if ckpt is not None:
        check_resumable(ckpt, args, runs, data)
    folder.prepare(runs)  # the first writes, once every check has passed
    saes = []
    for r in runs:
        torch.manual_seed(args.seed)  # each SAE starts as its single run would, wherever it is in the list
        sae = new_sae(model.config.n_embd, int(args.dict_ratio * model.config.n_embd), device)
        if init is not None and ckpt is None:  # --init_from: its weights, a fresh optimizer
            sae.load_state_dict(init[0].state_dict())
        saes.append(SAERun(r, sae, adam(sae, args.lr), torch.zeros(sae.n_dict, dtype=torch.float64, device=device)))
    return args, runs, ckpt, folder, device, model, (eval_rows, train_rows, data), saes


def run_eval(model, saes, args, eval_rows, step, switch, last, log):
    """Every SAE on the same held-out rows (rank 0, sharing the clean pass); eval.jsonl, a line each, W&B."""
    for s in saes:
        ddp.sum_to_master_(s.fired)
    if not ddp.MASTER:
        return
    device = str(saes[0].fired.device)
    results = evaluate_many(model, [(s.sae.eval(), s.r.layer) for s in saes],
                            eval_batches(eval_rows, args.batch_size, device), return_counts=True)
    for s, (m, counts) in zip(saes, results):
        s.sae.train()
        if last:  # per-feature firing frequency on the held-out rows, for analysis and export
            save_firing(s.r.out_dir, counts / m["alive_tokens"], m["alive_tokens"], dataset=args.dataset, held_out=True)
        m.update(step=step, samples=step * args.batch_size * args.grad_accum, alive_train=int((s.fired > 0).sum()))
        if args.local_frac > 0:  # which loss trained the SAE up to here; the switch's own eval marked
            m.update(phase="local" if step <= switch else s.r.loss, **({"switch": True} if step == switch else {}))
        log(s, m)
        if not last:  # alive_train counts features fired since the last eval (kept at the end: a resumed final
            s.fired.zero_()  # save evaluates again and must count the same)


# ----------------------------------------------------------------------------- the loop

def main():
    setup_signals()  # until the loop starts, SIGINT and SIGTERM end set-up in one line
    try:
        args, runs, ckpt, folder, device, model, (eval_rows, train_rows, data), saes = setup()
        eff_batch = args.batch_size * args.grad_accum  # samples per optimizer step, over all processes
        steps = args.n_samples // eff_batch
        switch = int(args.local_frac * args.n_samples) // eff_batch  # --local_frac: steps before it are local
        start = folder.resume(saes, device)
        log = Log(args, saes, ckpt)
        log.start(start, steps, device)
        if args.compile:
            for m in [*model.transformer.h, *(s.sae for s in saes)]:
                m.compile()
        for s in saes:
            s.module = ddp.wrap(s.sae, device)
        if device.startswith("cuda"):
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 for fp32 matmuls
        autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
        if args.dtype == "bfloat16":
            model.cast_frozen(torch.bfloat16)  # the frozen weights cast once, not at every use
        log.init_wandb()
        folder.begin(data, log.wandb_id)  # a new run's ckpt.pt, before any other file; signals now stop the loop
    except (ValueError, OSError, KeyboardInterrupt) as e:
        setup_failed(e)
    accum = args.grad_accum // ddp.WORLD  # micro-batches per process
    t_start, t_train, n_timed = time.time(), 0.0, 0
    for step in range(start, steps + 1):
        last = step == steps
        if last and any(s.bad for s in saes):
            folder.stop_bad(step - 1)  # the run ends inside a bad streak: the last good SAEs are saved, not done
        with autocast:
            if last:
                folder.final_eval(lambda last: run_eval(model, saes, args, eval_rows, step, switch, last, log.eval), step)
            elif (step > 0 and step % max(1, args.eval_every // eff_batch) == 0) or (step == 0 and args.init_from) \
                    or step == switch > 0:  # also the start of a fine-tune, and the switch
                run_eval(model, saes, args, eval_rows, step, switch, False, log.eval)
        if step == switch and 0 < switch < steps:
            log.switch(step, runs)
        if last:
            folder.save(step, finished=True)
            break
        t0 = time.time()
        logs = [{} for _ in saes]
        for s in saes:
            s.optimizer.param_groups[0]["lr"] = lr_at(step, steps, args, eff_batch)
        for j in range(accum):  # batch -> shared frozen passes -> each SAE's loss, backward (and last, its step)
            first = (step * args.grad_accum + j * ddp.WORLD + ddp.RANK) * args.batch_size
            idx = get_batch(train_rows, sample_rows(args.seed, len(train_rows), first, args.batch_size), device)
            flags = [s.flags(step, switch) for s in saes]
            with autocast:
                shared = shared_passes(model, idx, flags, kl_share=not args.no_kl_share)
            for s, r, log_s in zip(saes, flags, logs):
                with ddp.no_sync(s.module, j == accum - 1), autocast:
                    loss, parts = loss_step(model, s.module, r, shared, s.fired)
                    (loss / accum).backward()  # frees this SAE's activations before the next SAE runs
                for k, v in dict(parts, loss=loss).items():
                    log_s[k] = log_s.get(k, 0.0) + v.detach() / accum
                if j == accum - 1:
                    guarded_step(s, log_s["loss"], step, step == switch, args.max_bad_steps, log.tag(s, " | "))
            del shared
        t_train, n_timed = t_train + time.time() - t0, n_timed + 1
        if step % args.log_every == 0:
            log.steps(saes, logs, step, steps, t_train / n_timed, time.time() - t_start)
            t_train, n_timed = 0.0, 0
        folder.end_step(step, save=(step + 1) % max(1, args.save_every // eff_batch) == 0)  # or stop: signal, bad steps
    log.done(steps, time.time() - t_start, runs)
    ddp.leave()


if __name__ == "__main__":
    try:
        main()
    except OSError as e:  # a save failed (disk full, read-only): the file it replaced, and ckpt.pt, are whole
        sys.exit(f"train.py: error: {write_error(e)}; the run folder's ckpt.pt is its last whole checkpoint: resume "
                 "with --resume once this is fixed")
