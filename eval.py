"""
Metrics of an SAE spliced into GPT-2 at layer L (the residual stream entering block L), on eval data.

    python eval.py out/e2e_ds_L6                        # a run folder: its model, data and held-out rows
    python eval.py out/e2e_ds_L6 --eval_samples 100 --json
    python eval.py out/e2e_ds_L6 --save_firing          # also write firing.safetensors (analysis, export)
    python eval.py e2e_similar_ce_layer_6.pt --json     # Apollo's release: the .pt, with its .yaml beside it
    python eval.py export/e2e_ds_L6 --model gpt2        # a SAELens folder

Sources (see interop.py): a run folder, an Apollo .pt or a SAELens folder. Model, dataset and ctx come from
--model / --dataset / --ctx, else the source's own record (sae.json args, the Apollo yaml, SAELens metadata),
else gpt2, Apollo's pre-tokenised OpenWebText, 1024. The centring always comes from the source (Apollo:
centred; SAELens: metadata.model_from_pretrained_kwargs.center_writing_weights, default true).

Rows. The eval rows are the first --eval_samples rows (train.py holds out exactly the first eval_samples).
`alive` is counted over at least --alive_tokens tokens (default 500k, as in the paper), in whole rows: the
eval rows, then extra rows through the encoder only. For a run trained here on a hub dataset the extra rows
are the ones past the eval_samples + n_samples rows training streamed, never seen; a local dataset was
wholly in the training pool, so it has none left (give another --dataset); for an SAE trained elsewhere its
training rows are unknown. Each such case is noted on stderr and in `held_out`.

evaluate(model, sae, layer, batches) returns one dict (train.py appends it to eval.jsonl at each eval):
    l0                   mean number of active features per token (all positions)
    alive, alive_tokens  features that fired at least once, over that many tokens (the eval batches)
    n_dict               dictionary size
    ce_clean, ce_spliced next-token cross-entropy over positions 0..T-2, clean / with the SAE spliced in
    ce_increase          ce_spliced - ce_clean
    kl                   KL(p_clean || p_spliced), mean over all positions
    mse, explained_variance   x_hat vs x at layer L; EV = 1 - sum (x - x_hat)^2 / sum (x - mean x)^2
    layer, downstream_layers  L and the later layers [L+1 .. n_layer-1]
    downstream_mse, downstream_explained_variance   lists, one per downstream_layers entry
                         (spliced vs clean residual entering that block)
    final_mse, final_explained_variance   the same for the final residual (the input of ln_f); with the
                         two above, the per-layer data behind the paper's Fig. 2 (analysis.py downstream)
    norm_ratio_pos0, norm_ratio_rest      mean ||x_hat|| / ||x|| at position 0 and at positions > 0
The CLI's --json prints that dict, one line, with these keys changed or added:
    alive, alive_tokens  recounted over the eval rows plus the extra rows (alive_tokens >= --alive_tokens
                         unless the data ran out)
    alive_tokens_requested, eval_rows, eval_tokens (what every other metric is over)
    held_out             true: every row is known to lie outside the SAE's training data; false: some do
                         not; null: unknown (an SAE trained elsewhere)
    source, format ("run", "apollo", "saelens"), model, dataset, ctx, center, loss
The CLI reports progress on stderr, at each tenth of the batches and at least every 30 s, e.g.
    eval.py: alive 120/500 batches | 12s | eta 38s        eta = elapsed · (total − done) / done
evaluate() and count_firing() are silent unless given progress= (train.py calls evaluate without it).
"""
import argparse
import json
import os
import sys
import time

import torch

from cli import nonempty, nonneg_int, one_line_errors, positive_int, resolve_device
from losses import logit_stats, mm_dtype


class _Moments:
    """Streaming sums for MSE and explained variance of a (B, T, C) prediction against its target."""

    def __init__(self):
        self.err = self.sx = self.sxx = 0.0
        self.n = 0  # elements

    def add(self, pred, target):
        target = target.double()
        self.err += (pred.double() - target).pow(2).sum().item()
        self.sx = self.sx + target.reshape(-1, target.size(-1)).sum(0)    # (C,)
        self.sxx += target.pow(2).sum().item()
        self.n += target.numel()

    def mse(self):
        return self.err / self.n

    def explained_variance(self):
        n_tok = self.n / self.sx.numel()
        total = self.sxx - (self.sx.pow(2).sum().item() / n_tok)  # sum (x - mean x)^2
        return 1.0 - self.err / total if total > 0 else float("nan")


def progress_printer(label, total, every_s=30.0):
    """A progress callable for evaluate / count_firing: progress(done) after each of total batches prints
    `label done/total batches | 12s | eta 38s` to stderr when done crosses another tenth of total, when every_s
    seconds have passed since the last line, and at the end."""
    t0 = last = time.time()

    def secs(t):
        t = round(t)
        return f"{t}s" if t < 60 else f"{t // 60}m{t % 60:02d}s" if t < 3600 else f"{t // 3600}h{t % 3600 // 60:02d}m"

    def progress(done):
        nonlocal last
        now = time.time()
        if done == total or done * 10 // total > (done - 1) * 10 // total or now - last >= every_s:
            last, elapsed = now, now - t0
            print(f"{label} {done}/{total} batches | {secs(elapsed)} | eta {secs(elapsed * (total - done) / done)}",
                  file=sys.stderr, flush=True)
    return progress


class _Sums:
    """Running sums of every metric of one SAE (see the module docstring)."""

    def __init__(self, n_sites):
        self.counts, self.n_tok, self.l0 = None, 0, 0.0
        self.logits = dict(kl=0.0, ce=0.0, ce_clean=0.0, n_kl=0, n_ce=0)
        self.sites = [_Moments() for _ in range(n_sites)]  # L, L+1 .. n_layer-1, final
        self.ratio0 = self.ratio_rest = 0.0
        self.n0 = self.n_rest = 0

    def add(self, model, idx, x, x_hat, c, clean, spliced):
        ln_f = model.transformer.ln_f
        W_U = model.unembedding(mm_dtype(x))
        for k, v in logit_stats(ln_f(spliced[-1]), ln_f(clean[-1]), W_U, idx, vocab=model.config.vocab_size).items():
            self.logits[k] += v
        active = c > 0                                                         # (B, T, n_dict)
        fired = active.reshape(-1, active.size(-1)).sum(0, dtype=torch.float64)
        self.counts = fired if self.counts is None else self.counts + fired
        self.l0 += active.sum().item()
        self.n_tok += idx.numel()
        for m, (pred, target) in zip(self.sites, [(x_hat, x)] + list(zip(spliced, clean))):
            m.add(pred, target)
        ratio = x_hat.norm(dim=-1) / x.float().norm(dim=-1).clamp_min(1e-12)   # (B, T)
        self.ratio0 += ratio[:, 0].sum().item()
        self.ratio_rest += ratio[:, 1:].sum().item()
        self.n0, self.n_rest = self.n0 + ratio.size(0), self.n_rest + ratio[:, 1:].numel()

    def metrics(self, layer):
        if self.n_tok == 0:
            raise ValueError("evaluate got no batches")
        sums, sites = self.logits, self.sites
        ce, ce_clean = sums["ce"] / sums["n_ce"], sums["ce_clean"] / sums["n_ce"]
        later = sites[1:-1]
        return dict(
            l0=self.l0 / self.n_tok, alive=int((self.counts > 0).sum().item()), alive_tokens=self.n_tok,
            n_dict=int(self.counts.numel()), ce_clean=ce_clean, ce_spliced=ce, ce_increase=ce - ce_clean,
            kl=sums["kl"] / sums["n_kl"], mse=sites[0].mse(), explained_variance=sites[0].explained_variance(),
            layer=layer, downstream_layers=list(range(layer + 1, layer + 1 + len(later))),
            downstream_mse=[m.mse() for m in later],
            downstream_explained_variance=[m.explained_variance() for m in later],
            final_mse=sites[-1].mse(), final_explained_variance=sites[-1].explained_variance(),
            norm_ratio_pos0=self.ratio0 / self.n0,
            norm_ratio_rest=self.ratio_rest / self.n_rest if self.n_rest else float("nan"),
        )


@torch.no_grad()
def evaluate_many(model, saes, batches, return_counts=False, progress=None):
    """evaluate() for several SAEs [(sae, layer), ...] on the same batches: the clean pass runs once per
    batch, from the shallowest layer, and every SAE reads its layer's residual from it. A list of what
    evaluate() returns, one per SAE, each equal to evaluating that SAE alone."""
    lo, n_layer = min(layer for _, layer in saes), model.config.n_layer
    sums = [_Sums(n_layer - layer + 1) for _, layer in saes]
    for i, idx in enumerate(batches):
        x = model.forward_to_layer(idx, lo)                                    # (B, T, C)
        _, after = model.forward_from_layer(x, lo, logits=False)
        resid = [None] * lo + [x] + after                                      # resid[l] enters block l; [n_layer]: final
        for (sae, layer), acc in zip(saes, sums):
            x_hat, c = sae(resid[layer])
            x_hat = x_hat.float()
            _, spliced = model.forward_from_layer(x_hat, layer, logits=False)
            acc.add(model, idx, resid[layer], x_hat, c, resid[layer + 1:], spliced)
        if progress:
            progress(i + 1)
    out = [acc.metrics(layer) for (_, layer), acc in zip(saes, sums)]
    return [(m, acc.counts) for m, acc in zip(out, sums)] if return_counts else out


def evaluate(model, sae, layer, batches, return_counts=False, progress=None):
    """One dict of metrics (see the module docstring) over the token batches (B, T). Runs under whatever
    autocast the caller set. With return_counts, also the per-feature firing counts (n_dict,). progress:
    None, or a callable given the number of batches done after each one (progress_printer)."""
    return evaluate_many(model, [(sae, layer)], batches, return_counts, progress)[0]


@torch.no_grad()
def count_firing(model, sae, layer, batches, progress=None):
    """(counts (n_dict,) fp64, tokens): how often each feature fires, from the prefix and the encoder only.
    progress as in evaluate."""
    counts, n_tok = torch.zeros(sae.n_dict, dtype=torch.float64), 0
    for i, idx in enumerate(batches):
        c = sae.encode(model.forward_to_layer(idx, layer))                    # (B, T, n_dict)
        counts += (c > 0).reshape(-1, c.size(-1)).sum(0, dtype=torch.float64).cpu()
        n_tok += idx.numel()
        if progress:
            progress(i + 1)
    return counts, n_tok


def plan_rows(cfg, dataset, ctx, n_eval, alive_tokens, cache_dir):
    """(eval rows, extra rows for alive, held_out True / False / None, notes): see the module docstring."""
    from data import load_rows
    run = cfg.get("args", {})
    trained = "n_samples" in run and "eval_samples" in run   # by train.py, so its held-out rows are known
    same = trained and dataset == run.get("dataset") and ctx == run.get("ctx")
    n_extra = max(0, -(-alive_tokens // ctx) - n_eval)
    held_out, notes = (True if trained else None), []
    if not trained:
        notes.append("the SAE was trained elsewhere and its training rows are unknown; eval rows may overlap them")
    elif dataset == run.get("dataset") and ctx != run.get("ctx"):
        held_out = False
        notes.append(f"ctx {ctx} is not the run's {run.get('ctx')}: rows past its first eval tokens overlap its training data")
    elif same and n_eval > run["eval_samples"]:
        held_out = False
        notes.append(f"rows beyond the first {run['eval_samples']} were trained on")
    start = n_eval                                          # first extra row
    if same:  # a local source is read whole, so every row past the eval rows was in the training pool
        start = None if os.path.exists(dataset) else max(n_eval, run["eval_samples"] + run["n_samples"])
    n_rows = start + n_extra if start is not None and n_extra else n_eval
    rows = load_rows(dataset, ctx, n_rows=n_rows, cache_dir=cache_dir)
    eval_rows = rows[:n_eval]
    if len(eval_rows) < n_eval:
        notes.append(f"dataset {dataset!r} has {len(rows)} rows of {ctx} tokens; evaluating on those, not {n_eval}")
    extra = rows[start:start + n_extra] if start is not None and n_extra else rows[:0]
    got = (len(eval_rows) + len(extra)) * ctx
    if got < alive_tokens:
        why = ("the run's local dataset has no rows outside its training pool; give another --dataset"
               if start is None else f"dataset {dataset!r} has no more rows")
        notes.append(f"alive counted over {got} tokens, fewer than --alive_tokens {alive_tokens}: {why}")
    return eval_rows, extra, held_out, notes


def prepare(source, model_name=None, dataset=None, ctx=None, eval_samples=None, alive_tokens=500_000, device="cpu",
            data_dir=None):
    """Everything an eval of source needs, as a dict: sae, cfg, model, eval_rows, extra_rows, held_out, notes,
    info (what --json reports about the inputs). Raises ValueError with a one-line message on bad input."""
    from data import DEFAULT_CACHE
    from interop import load_any
    from model import GPT
    if alive_tokens < 0:
        raise ValueError(f"--alive_tokens must be >= 0, got {alive_tokens}")
    sae, cfg, _ = load_any(source, device)
    run = cfg.get("args", {})
    # a flag given wins; None: the source's record, else the default (never `or`: 0 or '' is not "unset")
    name = model_name if model_name is not None else cfg.get("model") or "gpt2"
    dataset = dataset if dataset is not None else \
        run.get("dataset") or "apollo-research/Skylion007-openwebtext-tokenizer-gpt2"
    ctx = ctx if ctx is not None else run.get("ctx") or 1024
    n = eval_samples if eval_samples is not None else run.get("eval_samples", 500)
    if n <= 0 or ctx <= 0:
        raise ValueError(f"--eval_samples and --ctx must be > 0, got {n} and {ctx}")
    if ctx < 2:
        raise ValueError(f"--ctx must be >= 2, got {ctx}: the cross-entropy predicts each next token of a row")
    gpt = GPT.from_pretrained(name, center=cfg["center"]).to(device)
    c = gpt.config
    if not 0 <= cfg["layer"] < c.n_layer or sae.d != c.n_embd:
        raise ValueError(f"the SAE (layer {cfg['layer']}, d {sae.d}) does not fit model {name!r} "
                         f"({c.n_layer} layers, d {c.n_embd}); give the right --model")
    if ctx > c.n_positions:
        raise ValueError(f"--ctx {ctx} is above model {name!r}'s context of {c.n_positions}")
    data_dir = data_dir if data_dir is not None else run.get("data_dir") or DEFAULT_CACHE
    eval_rows, extra, held_out, notes = plan_rows(cfg, dataset, ctx, n, alive_tokens, data_dir)
    from data import check_vocab
    for r in (eval_rows, extra):
        check_vocab(r, dataset, c.vocab_size)  # names the file and line of the first id outside it
    info = dict(source=source, format=cfg["format"], model=name, dataset=dataset, ctx=ctx, center=cfg["center"],
                loss=cfg.get("loss"), held_out=held_out, eval_rows=len(eval_rows), eval_tokens=len(eval_rows) * ctx,
                alive_tokens_requested=alive_tokens)
    return dict(sae=sae, cfg=cfg, model=gpt, eval_rows=eval_rows, extra_rows=extra, held_out=held_out,
                notes=notes, info=info)


def firing(source, batch_size=8, device="cpu", progress=None, **kw):
    """(prepare() dict, counts (n_dict,) fp64, tokens): how often each feature fires over the eval and extra
    rows, from the encoder alone (analysis.py --alive_from eval). progress: None, or the start of the
    progress lines on stderr (e.g. "analysis.py:")."""
    from data import eval_batches
    p = prepare(source, device=device, **kw)
    rows = p["eval_rows"], p["extra_rows"]
    total = sum(-(-len(r) // batch_size) for r in rows)
    tick = progress_printer(f"{progress} alive {source}", total) if progress and total else None
    batches = (b for r in rows for b in eval_batches(r, batch_size, device))
    counts, tokens = count_firing(p["model"], p["sae"], p["cfg"]["layer"], batches, tick)
    return p, counts, tokens


def format_metrics(m):
    """Human-readable lines of an evaluate() dict (or the CLI's)."""
    ds = " ".join(f"{v:.4g}" for v in m["downstream_mse"])
    ho = {True: "held out", False: "NOT all held out", None: "held-out status unknown"}.get(m.get("held_out"), "")
    return "\n".join([
        f"l0 {m['l0']:.2f} | alive {m['alive']}/{m['n_dict']} (over {m['alive_tokens']} tokens)" + (f" | rows {ho}" if ho else ""),
        f"ce clean {m['ce_clean']:.4f} | spliced {m['ce_spliced']:.4f} | increase {m['ce_increase']:.4f} | kl {m['kl']:.4f}",
        f"mse {m['mse']:.4g} | explained variance {m['explained_variance']:.4f} | "
        f"norm ratio pos0 {m['norm_ratio_pos0']:.3f} rest {m['norm_ratio_rest']:.3f}",
        f"downstream mse (layers {m.get('downstream_layers', 'after L')}) [{ds}] | final {m['final_mse']:.4g}",
    ])


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate an SAE (run folder, Apollo .pt or SAELens folder) "
                                     "spliced into its GPT-2.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("source", type=nonempty,
                        help="a run folder (sae.json), an Apollo .pt (+ .yaml) or a SAELens folder")
    # model and data (unset: the source's own record, else gpt2 / Apollo's OpenWebText / 1024)
    parser.add_argument("--model", type=nonempty, default=None,
                        help="hub id or local save_pretrained folder; if unset, the source's model, else gpt2")
    parser.add_argument("--dataset", type=nonempty, default=None,
                        help="token source: hub dataset or local file / folder; if unset, "
                        "the source's dataset, else Apollo's pre-tokenised OpenWebText")
    parser.add_argument("--ctx", type=positive_int, default=None,
                        help="tokens per row; if unset, the source's ctx, else 1024")
    parser.add_argument("--data_dir", type=nonempty, default=None,
                        help="token cache folder; if unset, the run's, else ~/.cache/nanosae")
    # evaluation
    parser.add_argument("--eval_samples", type=positive_int, default=None,
                        help="eval rows; if unset, the run's, else 500")
    parser.add_argument("--alive_tokens", type=nonneg_int, default=500_000,
                        help="count alive over at least this many tokens")
    parser.add_argument("--batch_size", type=positive_int, default=None,
                        help="rows per batch; if unset, the run's, else 8")
    parser.add_argument("--save_firing", action="store_true", help="write firing.safetensors into the run folder (refused while a train.py runs in it)")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    # system
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="autocast dtype for matmuls")
    one_line_errors(parser, "eval.py")
    args = parser.parse_args(argv)
    from data import eval_batches
    from files import check_writable, lock_holder, write_error
    from interop import source_format
    from sae import save_firing

    def check_not_training():  # train.py writes firing.safetensors itself; never under a running one
        holder = lock_holder(args.source)
        if holder:
            raise ValueError(f"--save_firing: run folder {args.source!r} is in use by {holder}, which writes "
                             "firing.safetensors itself; wait for it to end (or stop it), or leave out --save_firing")
    try:
        device = resolve_device(args.device)
        if args.save_firing and source_format(args.source) != "run":
            raise ValueError(f"--save_firing writes into a run folder and {args.source!r} is not one; "
                             "import it first with interop.py")
        if args.save_firing:  # before the evaluation, not after it
            check_not_training()
            check_writable(args.source, "--save_firing: run folder")
        p = prepare(args.source, args.model, args.dataset, args.ctx, args.eval_samples, args.alive_tokens, device,
                    args.data_dir)
        bs = args.batch_size if args.batch_size is not None else p["cfg"].get("args", {}).get("batch_size", 8)
        if bs <= 0:
            raise ValueError(f"--batch_size must be > 0, got {bs}")
    except (ValueError, OSError) as e:
        sys.exit(f"eval.py: error: {e}")
    for note in p["notes"]:
        print(f"eval.py: note: {note}", file=sys.stderr)
    model, sae, layer = p["model"], p["sae"], p["cfg"]["layer"]
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
        m, counts = evaluate(model, sae, layer, eval_batches(p["eval_rows"], bs, device), return_counts=True,
                             progress=progress_printer("eval.py: metrics", -(-len(p["eval_rows"]) // bs)))
        extra, n_extra = count_firing(model, sae, layer, eval_batches(p["extra_rows"], bs, device),
                                      progress=progress_printer("eval.py: alive", -(-len(p["extra_rows"]) // bs)))
    counts, tokens = counts.cpu() + extra, m["alive_tokens"] + n_extra
    m.update(p["info"], alive=int((counts > 0).sum()), alive_tokens=tokens)
    if args.save_firing:
        try:
            check_not_training()  # again: a train.py may have started during the evaluation
            save_firing(args.source, counts / tokens, tokens, dataset=m["dataset"], held_out=m["held_out"])
        except ValueError as e:
            sys.exit(f"eval.py: error: {e}")
        except OSError as e:  # the file it would replace is whole
            sys.exit(f"eval.py: error: {write_error(e)}")
    print(json.dumps(m) if args.json else format_metrics(m))


if __name__ == "__main__":
    from cli import run
    run(main, "eval.py")
