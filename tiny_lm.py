"""
Train model.py's GPT from scratch as a tiny language model, and save it as a Hugging Face GPT2LMHeadModel folder
(config.json + model.safetensors) that train.py (--model FOLDER) and transformers both load: the first step of
docs/LESSON.md, the paper on a CPU in an hour.

    python tiny_lm.py                                  # 6 layers, d 128, 4 heads, ctx 128 on the Python docs, 1400
                                                       # steps: about 25 min on 2 CPU cores; writes out/tiny_lm
    python tiny_lm.py --data input.txt --out out/my_lm # your own text (a .txt/.jsonl/.parquet file or a folder)
    python tiny_lm.py --data input.txt --n_layer 2 --n_embd 32 --n_head 2 --ctx 32 --batch_size 8 --val_rows 8 \
        --steps 30 --warmup 3 --lr 1e-2 --eval_every 10 --out /tmp/lm     # a smoke test: seconds
    python train.py --model out/tiny_lm --dataset input.txt --layer 3 --ctx 128 ...   # then SAEs on it

The default corpus is the reStructuredText source of Python's documentation (about 11 MB of English technical
prose, the PSF licence), which Debian's python3-doc package installs under /usr/share/doc/python3*/html/_sources
(`apt-get install python3-doc`); nothing is downloaded at run time but tiktoken's GPT-2 vocabulary (see
docs/OFFLINE.md). Tokens: GPT-2's (tiktoken), rows of ctx + 1 tokens (data.py), so every step predicts ctx
next tokens with the model's full context. --val_rows rows, drawn at random with a fixed seed (the same for every
--seed), are held out for the validation loss. The loop: AdamW, linear warmup then cosine decay, grad clipping;
train loss every --log_every steps, validation loss every --eval_every steps and at the end. The folder holds the
trained (uncentred) weights in GPT-2's layout (Conv1D weights (in, out), lm_head tied to wte) and lm_log.json,
the loss curve.
"""
import argparse
import glob
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from cli import (HelpFormatter, fmt_time, fraction, nonempty, nonneg_float, nonneg_int, one_line_errors, positive_float,
                 positive_int, resolve_device, run)
from data import DEFAULT_CACHE, get_batch, load_rows, sample_rows, split_rows
from files import check_target, replace_dir, write_error
from model import GPT, GPTConfig

DOC_SOURCES = "/usr/share/doc/python3*/html/_sources"  # python3-doc's reST sources (python3.11 on Debian 12)
VAL_SEED = 1234  # which rows are held out: fixed, so runs of different --seed share one validation set

parser = one_line_errors(argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter),
                         "tiny_lm.py")
arg = parser.add_argument_group("model").add_argument
arg("--n_layer", type=positive_int, default=6, help="transformer blocks")
arg("--n_embd", type=positive_int, default=128, help="d_model")
arg("--n_head", type=positive_int, default=4, help="attention heads (a divisor of --n_embd)")
arg("--ctx", type=positive_int, default=128, help="context length (the model's n_positions)")
arg = parser.add_argument_group("data").add_argument
arg("--data", type=nonempty, default=None,
    help="a local .txt/.jsonl/.parquet file or folder; default: the Python docs of python3-doc")
arg("--val_rows", type=positive_int, default=256, help="rows of ctx + 1 tokens held out for validation")
arg("--data_dir", type=nonempty, default=DEFAULT_CACHE, help="token cache")
arg = parser.add_argument_group("optimisation").add_argument
arg("--steps", type=positive_int, default=1400, help="optimizer steps")
arg("--batch_size", type=positive_int, default=16, help="rows per step")
arg("--lr", type=positive_float, default=2e-3, help="peak learning rate (AdamW)")
arg("--warmup", type=nonneg_int, default=100, help="linear warmup steps")
arg("--min_lr_ratio", type=fraction, default=0.1, help="cosine decay to this fraction of --lr")
arg("--weight_decay", type=nonneg_float, default=0.1, help="AdamW's, on matrices and embeddings")
arg("--grad_clip", type=nonneg_float, default=1.0, help="clip the grad norm (0: off)")
arg("--seed", type=nonneg_int, default=0, help="init and batch order")
arg = parser.add_argument_group("evaluation").add_argument
arg("--eval_every", type=positive_int, default=200, help="validation loss every this many steps")
arg("--log_every", type=positive_int, default=25, help="train loss every this many steps")
arg = parser.add_argument_group("system").add_argument
arg("--out", type=nonempty, default="out/tiny_lm", help="the model folder to write")
arg("--force", action="store_true", help="replace --out if it is not empty")
arg("--device", default="auto", help="cpu, cuda, cuda:N or auto")


def default_corpus():
    """The folder of python3-doc's reST sources (the newest Python's if several), or a one-line ValueError."""
    found = sorted({os.path.realpath(p) for p in glob.glob(DOC_SOURCES) if os.path.isdir(p)})
    if not found:
        raise ValueError(f"the default corpus, Python's documentation ({DOC_SOURCES}), is not installed: "
                         f"`apt-get install python3-doc`, or give your own text with --data FILE")
    return max(found, key=lambda p: [tuple(map(int, v)) for v in re.findall(r"python(\d+)\.(\d+)", p)])  # 3.11 > 3.9


def load_data(args):
    """(rows, val rows, train indices, source): the token rows (R, ctx + 1), a memmap of the token cache; the rows
    held out for validation, drawn at random with VAL_SEED (in memory); the indices of the rows trained on."""
    source = args.data or default_corpus()
    if not os.path.exists(source):
        raise ValueError(f"--data {source!r} does not exist (a local .txt/.jsonl/.parquet file or folder)")
    rows = load_rows(source, args.ctx + 1, cache_dir=args.data_dir)                     # (R, ctx + 1)
    if len(rows) < args.val_rows + args.batch_size:
        raise ValueError(f"--data {source!r} has {len(rows)} rows of {args.ctx + 1} tokens, fewer than --val_rows "
                         f"{args.val_rows} + one batch of {args.batch_size}: give more text, or smaller --ctx / "
                         f"--val_rows / --batch_size")
    val_idx, train_idx = split_rows(np.random.default_rng(VAL_SEED).permutation(len(rows)), args.val_rows)
    return rows, rows[np.sort(val_idx)], train_idx, source


def lr_at(step, args):
    """Linear warmup from 0 over --warmup steps, then cosine decay to min_lr_ratio × lr at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def lm_loss(model, idx):
    """Mean next-token cross-entropy of rows idx (B, ctx + 1): the model reads idx[:, :-1]."""
    logits = model(idx[:, :-1])                                                          # (B, ctx, V)
    return F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten())


@torch.no_grad()
def val_loss(model, rows, batch_size, device):
    """Mean cross-entropy over every held-out token."""
    model.eval()
    total = 0.0
    for i in range(0, len(rows), batch_size):
        idx = get_batch(rows, np.arange(i, min(i + batch_size, len(rows))), device)
        total += lm_loss(model, idx).item() * len(idx)
    model.train()
    return total / len(rows)


def hf_config(config):
    """transformers' GPT2Config as config.json holds it, for a model.GPTConfig (no dropout: none was trained with)."""
    return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=config.vocab_size,
                n_positions=config.n_positions, n_embd=config.n_embd, n_layer=config.n_layer, n_head=config.n_head,
                n_inner=None, activation_function="gelu_new", layer_norm_epsilon=config.layer_norm_epsilon,
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.02, scale_attn_weights=True,
                bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=True, torch_dtype="float32", use_cache=True)


def hf_state_dict(model):
    """The model's weights under GPT2LMHeadModel's names, as it saves them: nn.Linear's (out, in) weights of
    c_attn, c_proj and c_fc transposed to GPT-2's Conv1D (in, out); lm_head left out (tied to wte)."""
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    return {k: (w.t() if k.endswith(conv1d) else w).detach().float().cpu().contiguous()
            for k, w in model.state_dict().items() if k != "lm_head.weight"}


def save(model, out, log, force):
    """--out written whole (files.replace_dir): config.json, model.safetensors, lm_log.json."""
    from safetensors.torch import save as safetensors_bytes
    assert not model.centered  # the trained weights, as transformers computes with them

    def fill(tmp):
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config(model.config), f, indent=2)
        with open(os.path.join(tmp, "model.safetensors"), "wb") as f:  # open(): the umask's mode, as the others
            f.write(safetensors_bytes(hf_state_dict(model), metadata={"format": "pt"}))
        with open(os.path.join(tmp, "lm_log.json"), "w") as f:
            json.dump(log, f, indent=1)
    replace_dir(out, fill, force)


def setup(args):
    """Check everything, load the data, build the model and optimizer; every bad input is a ValueError here."""
    if args.n_embd % args.n_head:
        raise ValueError(f"--n_embd {args.n_embd} is not a multiple of --n_head {args.n_head}")
    if args.warmup >= args.steps:
        raise ValueError(f"--warmup {args.warmup} is not below --steps {args.steps}: the run would never reach --lr; "
                         f"give a smaller --warmup")
    check_target(args.out, args.force)  # before the work, not after it
    device = resolve_device(args.device)
    rows, val_rows, train_idx, source = load_data(args)
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig(n_positions=args.ctx, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                          n_inner=4 * args.n_embd)).to(device)
    params = list(model.parameters())  # wte once: lm_head is the same tensor
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=args.weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]  # biases and LayerNorms
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), fused=device.split(":")[0] in ("cpu", "cuda"))
    return device, (rows, val_rows, train_idx, source), model, optimizer


def main(argv=None):
    args = parser.parse_args(argv)
    try:
        device, (rows, val_rows, train_idx, source), model, optimizer = setup(args)
    except (ValueError, OSError) as e:
        sys.exit(f"tiny_lm.py: error: {write_error(e) if isinstance(e, OSError) else e}")
    n_params, tok_step = sum(p.numel() for p in model.parameters()), args.batch_size * args.ctx
    log = dict(args=vars(args), source=source, n_params=n_params, train_tokens=len(train_idx) * args.ctx,
               val_tokens=len(val_rows) * args.ctx, train=[], val=[])
    epochs = args.steps * tok_step / log["train_tokens"]
    print(f"tiny LM: {args.n_layer} layers, d {args.n_embd}, {args.n_head} heads, ctx {args.ctx}, "
          f"{n_params / 1e6:.2f}M parameters | {source}: {log['train_tokens'] / 1e6:.2f}M train tokens, "
          f"{log['val_tokens'] / 1e3:.1f}k val | {args.steps} steps of {tok_step} tokens ({epochs:.2f} epochs) | "
          f"{device}", flush=True)
    t_start, t_train, n_timed = time.time(), 0.0, 0
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            loss = val_loss(model, val_rows, args.batch_size, device)
            log["val"].append(dict(step=step, loss=loss, time_s=time.time() - t_start))
            print(f"val   {step:5d}/{args.steps} | val loss {loss:.4f} | {fmt_time(time.time() - t_start)}",
                  flush=True)
        if step == args.steps:
            break
        t0 = time.time()
        lr = lr_at(step, args)
        for g in optimizer.param_groups:
            g["lr"] = lr
        order = sample_rows(args.seed, len(train_idx), step * args.batch_size, args.batch_size)
        idx = get_batch(rows, train_idx[order], device)                                  # (B, ctx + 1)
        loss = lm_loss(model, idx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        t_train, n_timed = t_train + time.time() - t0, n_timed + 1
        if step % args.log_every == 0 or step == args.steps - 1:
            dt, loss = t_train / n_timed, loss.item()
            log["train"].append(dict(step=step, loss=loss, lr=lr, step_ms=dt * 1000))
            print(f"step  {step:5d}/{args.steps} | loss {loss:.4f} | lr {lr:.2e} | {dt * 1000:.0f}ms | "
                  f"{tok_step / dt / 1000:.1f}k tok/s | {fmt_time(time.time() - t_start)} | "
                  f"eta {fmt_time(dt * (args.steps - step - 1))}", flush=True)
            t_train, n_timed = 0.0, 0
    log.update(final_val_loss=log["val"][-1]["loss"], time_s=time.time() - t_start)
    try:
        save(model, args.out, log, args.force)
    except (ValueError, OSError) as e:
        sys.exit(f"tiny_lm.py: error: {write_error(e) if isinstance(e, OSError) else e}")
    print(f"done: {args.steps} steps in {fmt_time(log['time_s'])} | final val loss {log['final_val_loss']:.4f} "
          f"(perplexity {math.exp(log['final_val_loss']):.1f}) | saved {args.out}; next: python train.py --model "
          f"{args.out} --dataset {source} --ctx {args.ctx} --layer {args.n_layer // 2} ...", flush=True)
    return model, log


if __name__ == "__main__":
    run(main, "tiny_lm.py")
