"""
Metrics of an SAE spliced into GPT-2 at layer L (the residual stream entering block L), on eval data.

    python eval.py out/e2e_ds_L6                       # the run's own held-out rows
    python eval.py out/e2e_ds_L6 --eval_samples 100 --json

evaluate(model, sae, layer, batches) returns one dict (also what --json prints):
    l0                   mean number of active features per token (all positions)
    alive, alive_tokens  features that fired at least once, over that many tokens
    ce_clean, ce_spliced next-token cross-entropy over positions 0..T-2, clean / with the SAE spliced in
    ce_increase          ce_spliced - ce_clean
    kl                   KL(p_clean || p_spliced), mean over all positions
    mse, explained_variance   x_hat vs x at layer L; EV = 1 - sum (x - x_hat)^2 / sum (x - mean x)^2
    downstream_mse, downstream_explained_variance   lists, one per later layer L+1 .. n_layer-1
                         (spliced vs clean residual entering that block)
    final_mse, final_explained_variance   the same for the final residual (the input of ln_f)
    norm_ratio_pos0, norm_ratio_rest      mean ||x_hat|| / ||x|| at position 0 and at positions > 0
"""
import argparse
import json
import sys

import torch

from losses import logit_stats


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


@torch.no_grad()
def evaluate(model, sae, layer, batches, return_counts=False):
    """One dict of metrics (see the module docstring) over the token batches (B, T). Runs under whatever
    autocast the caller set. With return_counts, also the per-feature firing counts (n_dict,)."""
    counts, n_tok, l0_sum = None, 0, 0.0
    sums = dict(kl=0.0, ce=0.0, ce_clean=0.0, n_kl=0, n_ce=0)
    sites = None  # one _Moments per site: L, L+1 .. n_layer-1, final
    ratio0 = ratio_rest = 0.0
    n0 = n_rest = 0
    for idx in batches:
        x = model.forward_to_layer(idx, layer)                                  # (B, T, C)
        x_hat, c = sae(x)
        x_hat = x_hat.float()
        _, clean = model.forward_from_layer(x, layer, logits=False)
        _, spliced = model.forward_from_layer(x_hat, layer, logits=False)
        ln_f = model.transformer.ln_f
        for k, v in logit_stats(ln_f(spliced[-1]), ln_f(clean[-1]), model.lm_head.weight, idx).items():
            sums[k] += v
        active = c > 0                                                         # (B, T, n_dict)
        fired = active.reshape(-1, active.size(-1)).sum(0, dtype=torch.float64)
        counts = fired if counts is None else counts + fired
        l0_sum += active.sum().item()
        n_tok += idx.numel()
        sites = sites or [_Moments() for _ in range(len(clean) + 1)]
        for m, (pred, target) in zip(sites, [(x_hat, x)] + list(zip(spliced, clean))):
            m.add(pred, target)
        ratio = x_hat.norm(dim=-1) / x.float().norm(dim=-1).clamp_min(1e-12)   # (B, T)
        ratio0 += ratio[:, 0].sum().item()
        ratio_rest += ratio[:, 1:].sum().item()
        n0, n_rest = n0 + ratio.size(0), n_rest + ratio[:, 1:].numel()
    if n_tok == 0:
        raise ValueError("evaluate got no batches")
    ce, ce_clean = sums["ce"] / sums["n_ce"], sums["ce_clean"] / sums["n_ce"]
    later = sites[1:-1]
    metrics = dict(
        l0=l0_sum / n_tok, alive=int((counts > 0).sum().item()), alive_tokens=n_tok, n_dict=int(counts.numel()),
        ce_clean=ce_clean, ce_spliced=ce, ce_increase=ce - ce_clean, kl=sums["kl"] / sums["n_kl"],
        mse=sites[0].mse(), explained_variance=sites[0].explained_variance(),
        downstream_mse=[m.mse() for m in later],
        downstream_explained_variance=[m.explained_variance() for m in later],
        final_mse=sites[-1].mse(), final_explained_variance=sites[-1].explained_variance(),
        norm_ratio_pos0=ratio0 / n0, norm_ratio_rest=ratio_rest / n_rest if n_rest else float("nan"),
    )
    return (metrics, counts) if return_counts else metrics


def format_metrics(m):
    """Human-readable lines of an evaluate() dict."""
    ds = " ".join(f"{v:.4g}" for v in m["downstream_mse"])
    return "\n".join([
        f"l0 {m['l0']:.2f} | alive {m['alive']}/{m['n_dict']} (over {m['alive_tokens']} tokens)",
        f"ce clean {m['ce_clean']:.4f} | spliced {m['ce_spliced']:.4f} | increase {m['ce_increase']:.4f} | kl {m['kl']:.4f}",
        f"mse {m['mse']:.4g} | explained variance {m['explained_variance']:.4f} | "
        f"norm ratio pos0 {m['norm_ratio_pos0']:.3f} rest {m['norm_ratio_rest']:.3f}",
        f"downstream mse (layers after L) [{ds}] | final {m['final_mse']:.4g}",
    ])


def main(argv=None):
    parser = argparse.ArgumentParser(description="Evaluate a trained SAE spliced into its GPT-2.")
    parser.add_argument("out_dir", help="a training run's folder (holds sae.safetensors + sae.json)")
    parser.add_argument("--dataset", default=None, help="token source (default: the run's own dataset)")
    parser.add_argument("--eval_samples", type=int, default=None, help="rows to evaluate (default: the run's)")
    parser.add_argument("--batch_size", type=int, default=None, help="rows per batch (default: the run's)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--data_dir", default=None, help="token cache folder (default: the run's)")
    parser.add_argument("--json", action="store_true", help="print the metrics as one JSON object")
    parser.error = lambda msg: sys.exit(f"eval.py: error: {msg}")
    args = parser.parse_args(argv)
    from data import DEFAULT_CACHE, eval_batches, load_rows
    from model import GPT
    from sae import load_sae
    try:
        device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
        sae, cfg = load_sae(args.out_dir, device)
        run = cfg.get("args", {})
        dataset = args.dataset or run.get("dataset")
        n = args.eval_samples or run.get("eval_samples", 500)
        if n <= 0:
            raise ValueError(f"--eval_samples must be > 0, got {n}")
        if dataset == run.get("dataset") and n > run.get("eval_samples", n):
            print(f"warning: rows beyond the first {run['eval_samples']} were trained on", file=sys.stderr)
        model = GPT.from_pretrained(cfg["model"], center=cfg["center"]).to(device)
        rows = load_rows(dataset, run.get("ctx", model.config.n_positions), n_rows=n,
                         cache_dir=args.data_dir or run.get("data_dir") or DEFAULT_CACHE)[:n]
    except ValueError as e:
        sys.exit(f"eval.py: error: {e}")
    with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
        m = evaluate(model, sae, cfg["layer"], eval_batches(rows, args.batch_size or run.get("batch_size", 8), device))
    print(json.dumps(m) if args.json else format_metrics(m))


if __name__ == "__main__":
    main()
