"""
The paper's figures and numbers from run folders (or any source eval.py reads: Apollo .pt, SAELens folder).

    python analysis.py geometry out/local_L6 out/e2e_L6 --out geometry.png   # Fig. 3 numbers for two SAEs
    python analysis.py geometry out/local_L6                                 # within one SAE
    python analysis.py pareto out/*_L6 --out pareto.png                      # Fig. 1: L0 and alive vs CE increase
    python analysis.py pareto out/sweep_local-e2e-e2e_ds_L6 --out pareto.png # a sweep folder: each of its SAEs
    python analysis.py downstream out/*_L6 --out downstream.png              # Fig. 2: MSE at every later layer
    python analysis.py seeds out/e2e_L6_s0 out/e2e_L6_s1 out/e2e_L6_s2       # seed stability, decoder and encoder
Every command prints a short table of the numbers the paper reports; --json prints all of them as one JSON
object instead. pareto and downstream read the last line of each run's eval.jsonl (its final eval);
`python eval.py SRC --json >> SRC/eval.jsonl` makes one for any SAE. They take run folders, sweep folders, and
patterns the shell did not expand ('out/*_L6'). pareto also prints the paper's headline number, each series'
L0 over local's at the same CE increase (matched_l0); seeds also the spread of the final evals over the seeds.
scipy (geometry of two SAEs, seeds) and matplotlib (--out) are
optional: a command that needs a missing one says in one line what to install.

Pareto series: one per loss kind, and one per variant of a kind (variant(), from the run's sae.json), so a
fine-tuned or ablated run never joins the plain runs' front: "e2e_ds (from local_L6)" (--init_from),
"e2e_ds ds_layers=next" (--ds_layers not all), "e2e_ds local_frac=0.5" (--local_frac > 0). Each series has its
own colour and marker; the fronts' runs are named on the plot, labels kept apart. --log puts the L0 and alive
axes in log scale; --clip Q limits both axes of each panel to the (1 - Q)..Q quantiles of the points and draws
the points beyond at the edge as open triangles.

Geometry (paper §3.3) on the unit directions u_i of the alive features: the decoder columns D (as the paper)
and the encoder rows W_e / ‖W_e‖_row (which the paper did not study).
    within A      w_i = max_{j≠i} u_i·u_j         mean, histogram; feature splitting shows as high values
    A→B, B→A      a_i = max_j u_i·v_j              directional: several features of A near one of B all score high
    matching      a one-to-one assignment π maximising Σ u_i·v_π(i) (Hungarian); exact up to --match_cap
                  features a side, else a random --match_cap subset of A against as many candidates of B
                  (the subset's nearest B features, then second nearest, ...; at most its best into all of B)
    CI            mean(w_A) − mean(w_B) and its 95% two-sample bootstrap interval
Similarities are computed --chunk rows at a time and reduced to running maxima: no n×n matrix is ever built
(two 46,080 × 768 SAEs, all of the above: 4.5 min and 1.3 GB peak RSS on 2 CPU cores).
Alive features come from the source's saved firing frequencies (firing.safetensors, written by train.py's
final eval and by `eval.py --save_firing`, or a SAELens sparsity.safetensors), else all features; --alive_from eval counts them.
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

from cli import fraction, nonempty, nonneg_int, one_line_errors, positive_int

HIST_BINS = 100  # over [-1, 1]: bins of 0.02
COLORS = {"local": "tab:blue", "e2e": "tab:red", "e2e_ds": "tab:green"}
VARIANT_STYLES = [(c, m) for c, m in zip(("tab:purple", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan"),
                                         ("s", "^", "D", "v", "P", "X"))]  # fine-tuned / ablated series


def require(module, what, alt=""):
    """module, imported; ValueError in one line naming what needs it and the pip command when it is missing.
    scipy (the one-to-one matching, the t-interval) and matplotlib (the plots) are optional: they are imported
    only where they are used."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        pkg = module.split(".")[0]
        raise ValueError(f"{what} needs {pkg}: pip install {pkg}{alt}") from None


def unit_rows(W):
    """Each row of W (n, d) divided by its L2 norm, fp32."""
    W = W.detach().float()
    return W / W.norm(dim=1, keepdim=True).clamp_min(1e-12)


@torch.no_grad()
def nearest_cos(U, V=None, chunk=1024):
    """Max cosine of each row of U (n, d) over the rows of V (m, d), rows unit norm: (best_u (n,), best_v (m,)),
    best_v being each row of V's max over U. V None: within U, each row's max over the *other* rows; only
    blocks on and above the diagonal are multiplied, the matrix being symmetric."""
    n, within, V = U.size(0), V is None, U if V is None else V
    if n < 1 + within or V.size(0) < 1:
        raise ValueError(f"too few alive features to compare ({n} and {V.size(0)})")
    best_u, best_v = torch.full((n,), -float("inf")), torch.full((V.size(0),), -float("inf"))
    for i in range(0, n, chunk):
        j = min(i + chunk, n)
        lo = i if within else 0                                   # within: columns >= i only
        S = U[i:j] @ V[lo:].T                                     # (j - i, m - lo)
        if within:
            S.diagonal().fill_(-float("inf"))                     # (r, r) is row i + r against itself
        best_u[i:j] = torch.maximum(best_u[i:j], S.max(dim=1).values)
        best_v[lo:] = torch.maximum(best_v[lo:], S.max(dim=0).values)
        del S
    return (torch.maximum(best_u, best_v), None) if within else (best_u, best_v)


@torch.no_grad()
def matching(U, V, cap=4096, k=8, chunk=1024, seed=0):
    """One-to-one matching of rows of U (n, d) to rows of V (m, d) maximising the summed cosine
    (scipy linear_sum_assignment). Returns dict(mean, pairs, exact, cap, directional_mean (the same U rows' max
    over all of V), rows_u, rows_v (the matched indices))."""
    linear_sum_assignment = require("scipy.optimize", "the one-to-one matching").linear_sum_assignment
    n, m = U.size(0), V.size(0)
    rng = np.random.default_rng(seed)
    sub = np.arange(n) if n <= cap else np.sort(rng.choice(n, cap, replace=False))
    if m <= cap:
        cand = np.arange(m)
    else:  # candidates: every subset row's 1st nearest row of V, then 2nd, ... up to k, then random ones
        top = torch.cat([(U[sub[i:i + chunk]] @ V.T).topk(min(k, m), dim=1).indices
                         for i in range(0, len(sub), chunk)])    # (len(sub), k)
        order = top.T.reshape(-1).numpy()                         # rank-major
        cand = order[np.sort(np.unique(order, return_index=True)[1])][:cap]
        if len(cand) < len(sub):
            rest = np.setdiff1d(np.arange(m), cand)
            cand = np.concatenate([cand, rng.choice(rest, len(sub) - len(cand), replace=False)])
    S = (U[sub] @ V[cand].T).double().numpy()                    # (len(sub), len(cand))
    r, c = linear_sum_assignment(S, maximize=True)
    directional = nearest_cos(U[sub], V, chunk)[0].mean().item()
    return dict(mean=float(S[r, c].mean()), pairs=len(r), exact=bool(n <= cap and m <= cap), cap=cap,
                directional_mean=directional, rows_u=sub[r].tolist(), rows_v=cand[c].tolist())


def bootstrap_diff(a, b, n_boot=1000, seed=0):
    """mean(a) − mean(b) and the 2.5 / 97.5 percentiles of its two-sample bootstrap (each resampled with
    replacement, n_boot times)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    rng = np.random.default_rng(seed)
    diffs = np.array([a[rng.integers(0, a.size, a.size)].mean() - b[rng.integers(0, b.size, b.size)].mean()
                      for _ in range(n_boot)])
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return dict(diff=float(a.mean() - b.mean()), ci95=[float(lo), float(hi)], n_boot=n_boot)


def summary(x):
    """Mean, median and histogram (HIST_BINS bins over [-1, 1]) of a 1-d tensor of cosines."""
    x = x.double().numpy()
    counts = np.histogram(np.clip(x, -1, 1), bins=HIST_BINS, range=(-1, 1))[0]
    return dict(n=int(x.size), mean=float(x.mean()), median=float(np.median(x)),
                hist=dict(range=[-1, 1], bins=HIST_BINS, counts=counts.tolist()))


@torch.no_grad()
def load_directions(path, alive_from="saved", **eval_kw):
    """(dict(decoder=(n_alive, d), encoder=(n_alive, d)) unit rows, info dict) for one source."""
    if alive_from == "eval":
        from eval import firing
        p, counts, tokens = firing(path, **eval_kw)
        sae, cfg = p["sae"], p["cfg"]
        for note in p["notes"]:
            print(f"analysis.py: note: {path}: {note}", file=sys.stderr)
        alive, how = counts > 0, f"eval: fired on {tokens} tokens of {p['info']['dataset']}"
    else:
        from interop import load_any
        sae, cfg, firing = load_any(path)
        if alive_from == "saved" and firing is not None:
            alive, how = firing["freq"] > 0, f"saved: {firing['file']} ({firing.get('tokens') or 'unknown'} tokens)"
        else:
            alive = torch.ones(sae.n_dict, dtype=torch.bool)
            how = "all features (" + ("--alive_from all)" if alive_from == "all" else "no saved firing frequencies)")
    dirs = dict(decoder=unit_rows(sae.dict_elements().T[alive]), encoder=unit_rows(sae.encoder.weight[alive]))
    info = dict(path=path, loss=cfg.get("loss"), layer=cfg["layer"], n_dict=sae.n_dict,
                alive=int(alive.sum()), alive_from=how, seed=cfg.get("args", {}).get("seed"))
    info["_args"] = cfg.get("args", {})  # for seeds(): what else differs between runs
    return dirs, info


def geometry(path_a, path_b=None, alive_from="saved", match_cap=4096, chunk=1024, n_boot=1000, **eval_kw):
    """All geometry numbers of the module docstring, for one SAE or two, as one JSON-able dict."""
    runs = {"A": load_directions(path_a, alive_from, **eval_kw)}
    if path_b is not None:
        runs["B"] = load_directions(path_b, alive_from, **eval_kw)
        a, b = (runs[k][0]["decoder"].size(1) for k in "AB")  # (n_alive, d)
        if a != b:
            raise ValueError(f"{path_a!r} is an SAE of d {a} and {path_b!r} one of d {b}: their features live in "
                             f"different spaces, so geometry compares only SAEs of the same d")
    out = dict(runs={k: _public(v[1]) for k, v in runs.items()}, match_cap=match_cap)
    for kind in ("decoder", "encoder"):
        res, within = {}, {}
        for k, (dirs, _) in runs.items():
            within[k] = nearest_cos(dirs[kind], chunk=chunk)[0]
        res["within"] = {k: summary(v) for k, v in within.items()}
        if path_b is not None:
            A, B = runs["A"][0][kind], runs["B"][0][kind]
            res["within_diff_A_minus_B"] = bootstrap_diff(within["A"].numpy(), within["B"].numpy(), n_boot)
            a_to_b, b_to_a = nearest_cos(A, B, chunk)
            m = matching(A, B, match_cap, chunk=chunk)
            res["cross"] = dict(A_to_B=summary(a_to_b), B_to_A=summary(b_to_a),
                                matching={k: v for k, v in m.items() if not k.startswith("rows_")})
        out[kind] = res
    return out, {k: v[0] for k, v in runs.items()}


def _public(info):
    return {k: v for k, v in info.items() if not k.startswith("_")}


def mean_ci(x):
    """Mean of x, its sample sd and its 95% interval, mean ± t₀.₉₇₅(n−1) · sd / √n (sd and interval: None for a
    single value)."""
    t = require("scipy.stats", "the t-interval").t
    x = np.asarray(x, dtype=np.float64)
    if x.size < 2:
        return dict(mean=float(x.mean()), sd=None, ci95=None, n=int(x.size))
    sd = float(x.std(ddof=1))
    h = t.ppf(0.975, x.size - 1) * sd / np.sqrt(x.size)
    return dict(mean=float(x.mean()), sd=sd, ci95=[float(x.mean() - h), float(x.mean() + h)], n=int(x.size))


SEED_FREE = {"seed", "out_dir", "resume", "device", "compile", "wandb", "wandb_project", "data_dir", "eval_every",
             "log_every", "save_every", "max_bad_steps", "kl_chunk", "no_kl_share", "name"}


def seeds(paths, alive_from="saved", match_cap=4096, chunk=1024, **eval_kw):
    """Seed stability: for every pair of runs (i < j) that differ only in --seed, the cross-seed similarity of
    decoder and of encoder directions (mean A→B and B→A max-cosine, and the one-to-one matching mean, as in
    geometry), then each number's mean over pairs with a 95% t-interval (pairs share runs, so the interval
    is a rough guide)."""
    if len(paths) < 2:
        raise ValueError(f"seeds needs at least two runs, got {len(paths)}")
    runs = [load_directions(p, alive_from, **eval_kw) for p in paths]
    base = runs[0][1]
    for dirs, info in runs[1:]:
        diff = sorted(k for k in set(base["_args"]) | set(info["_args"]) if k not in SEED_FREE
                      and base["_args"].get(k) != info["_args"].get(k))
        if diff or info["layer"] != base["layer"] or dirs["decoder"].size(1) != runs[0][0]["decoder"].size(1):
            what = diff[0] if diff else "layer or d"
            raise ValueError(f"{info['path']!r} differs from {base['path']!r} in {what} "
                             f"({base['_args'].get(what)!r} vs {info['_args'].get(what)!r}), not only in the seed")
    pairs = []
    for i in range(len(runs)):
        for j in range(i + 1, len(runs)):
            rec = dict(a=paths[i], b=paths[j])
            for kind in ("decoder", "encoder"):
                A, B = runs[i][0][kind], runs[j][0][kind]
                a_to_b, b_to_a = nearest_cos(A, B, chunk)
                m = matching(A, B, match_cap, chunk=chunk)
                rec[kind] = dict(A_to_B=a_to_b.mean().item(), B_to_A=b_to_a.mean().item(), matching=m["mean"],
                                 matching_exact=m["exact"], matching_pairs=m["pairs"])
            pairs.append(rec)
    summary_ = {kind: {k: mean_ci([p[kind][k] for p in pairs]) for k in ("A_to_B", "B_to_A", "matching")}
                for kind in ("decoder", "encoder")}
    return dict(runs=[_public(r[1]) for r in runs], pairs=pairs, summary=summary_, match_cap=match_cap,
                metrics=seed_metrics(paths))


SEED_METRICS = ("l0", "alive", "ce_increase", "explained_variance", "final_mse")


def seed_metrics(paths):
    """How much the final eval moves with the seed: each of SEED_METRICS that every run's eval.jsonl has, its
    values, mean, sample sd and 95% t-interval (mean_ci); {} when a source has no eval.jsonl (a SAELens folder)."""
    try:
        last = [final_eval(p)[1] for p in paths]
    except ValueError:
        return {}
    out = {}
    for k in SEED_METRICS:
        if all(_number(m.get(k)) for m in last):
            v = [float(m[k]) for m in last]
            out[k] = dict(values=v, **mean_ci(v))
    return out


# ----------------------------------------------------------------------------- run folders and plots

def expand_runs(paths):
    """Run folders, with a sweep folder (train.py with several SAEs: one run folder per SAE inside it)
    replaced by its run folders, and a pattern the shell left unexpanded ('out/*_L6') by the paths it matches.
    ValueError naming a path that does not exist or a pattern that matches nothing."""
    import glob
    out = []
    for p in paths:
        found = [p] if os.path.lexists(p) else sorted(glob.glob(p)) if glob.has_magic(p) else []
        if not found:
            raise ValueError(f"no folder matches the pattern {p!r}" if glob.has_magic(p) else
                             f"{p!r} does not exist; give run folders (sae.json and eval.jsonl) or sweep folders")
        for q in found:
            subs = sorted(os.path.join(q, d) for d in os.listdir(q) if os.path.isfile(os.path.join(q, d, "sae.json"))) \
                if os.path.isdir(q) and not os.path.isfile(os.path.join(q, "sae.json")) else []
            out += subs or [q]
    return out


def final_eval(path, keys=()):
    """(sae.json cfg, the last eval.jsonl line) of a run folder; ValueError naming the file when either is not
    readable or the line lacks one of keys."""
    f, j = os.path.join(path, "eval.jsonl"), os.path.join(path, "sae.json")
    if not (os.path.isfile(f) and os.path.isfile(j)):
        raise ValueError(f"{path!r} is not a run folder with sae.json and eval.jsonl "
                         f"(`python eval.py SRC --json >> SRC/eval.jsonl` writes one)")
    from sae import read_sae_json
    cfg = read_sae_json(j, required=("layer",))
    with open(f, "rb") as fh:
        data = fh.read()
    try:
        lines = [line for line in data.decode("utf-8").split("\n") if line.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{f!r} is not UTF-8 text (byte {e.start}); expected the JSON lines eval.py writes") from None
    try:
        last = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise ValueError(f"{f!r} has no readable last line") from None
    lacks = next((k for k in keys if k not in last), None) if isinstance(last, dict) else "an object"
    if lacks:
        raise ValueError(f"{f!r}: its last line (line {len(lines)}) is not an evaluation of eval.py: it lacks "
                         f"{lacks!r}")
    for k in keys + ("downstream_layers",) * ("downstream_layers" in last):  # numbers; downstream_*: lists of them
        v, many = last[k], k.startswith("downstream")
        if not (isinstance(v, list) and all(map(_number, v)) if many else _number(v)):
            raise ValueError(f"{f!r}: its last line (line {len(lines)}) has {k} {json.dumps(v)[:40]}; expected "
                             f"{'a list of numbers' if many else 'a number'}")
    if "layer" in last and not (type(last["layer"]) is int and last["layer"] >= 0):
        raise ValueError(f"{f!r}: its last line (line {len(lines)}) has layer {json.dumps(last['layer'])[:40]}; "
                         "expected an integer >= 0")
    lists = {k: len(v) for k, v in last.items() if k.startswith("downstream") and k in keys + ("downstream_layers",)}
    if len(set(lists.values())) > 1:
        raise ValueError(f"{f!r}: its last line (line {len(lines)}) has lists of different lengths "
                         f"({', '.join(f'{k} {n}' for k, n in lists.items())}); expected one per downstream layer")
    return cfg, last


def _number(v):
    return type(v) in (int, float)


def front(xs, ys):
    """Indices of the non-dominated points when lower x and lower y are both better, sorted by x."""
    best, keep = float("inf"), []
    for i in sorted(range(len(xs)), key=lambda i: (xs[i], ys[i])):
        if ys[i] < best:
            best, keep = ys[i], keep + [i]
    return keep


def _plt():
    require("matplotlib", "a plot (--out)").use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out):
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    _plt().close(fig)


def variant(cfg):
    """What sets a run apart from a plain run of its kind, from its sae.json: [] for a plain run, else parts of
    its series label: '(from NAME)' (--init_from: fine-tuned), 'ds_layers=SPEC' (not all), 'local_frac=F' (> 0)."""
    args = cfg.get("args") or {}
    init, ds, frac = args.get("init_from", cfg.get("init_from")), args.get("ds_layers"), args.get("local_frac")
    out = [f"(from {os.path.basename(os.path.normpath(init)) or init})"] if isinstance(init, str) and init else []
    out += [f"ds_layers={ds}"] if isinstance(ds, str) and ds != "all" else []
    return out + ([f"local_frac={frac:g}"] if _number(frac) and frac > 0 else [])


def pareto(paths, out=None, log=False, clip=None):
    """L0 and alive against CE increase, one series per loss kind and per variant of it (variant(): fine-tuned or
    ablated runs are their own series); the JSON has every point and each series' non-dominated front (lower L0
    and lower CE increase; more alive and lower CE increase)."""
    points = []
    for p in expand_runs(paths):
        cfg, m = final_eval(p, keys=("l0", "alive", "ce_increase"))
        loss = cfg.get("loss") or "unknown"
        points.append(dict(run=p, loss=loss, series=" ".join([loss] + variant(cfg)), layer=cfg.get("layer"), l0=m["l0"],
                           alive=m["alive"], alive_tokens=m.get("alive_tokens"), ce_increase=m["ce_increase"],
                           step=m.get("step")))
    found = {q["loss"] for q in points}
    kinds = [k for k in COLORS if k in found] + sorted(found - set(COLORS))  # each kind's plain series, then variants
    names = [n for k in kinds for n in sorted({q["series"] for q in points if q["loss"] == k},
                                              key=lambda n: (n != k, n))]
    series = {}
    for name in names:
        pts = [q for q in points if q["series"] == name]
        fr = {key: [pts[i]["run"] for i in front([sign * q[key] for q in pts], [q["ce_increase"] for q in pts])]
              for key, sign in (("l0", 1), ("alive", -1))}
        series[name] = dict(loss=pts[0]["loss"], variant=name != pts[0]["loss"], runs=[q["run"] for q in pts],
                            front_l0=fr["l0"], front_alive=fr["alive"])
    res = dict(points=points, series=series, matched=matched_l0(points, series), out=out, log=log, clip=clip)
    if out:
        plot_pareto(res, out)
    return res


def matched_l0(points, series, ref="local"):
    """The paper's headline number: each series' L0 over the ref series' at the same CE increase. For each point
    on a series' L0 front whose CE increase c lies within the ref front's range, ratio = L0 / L0_ref(c), with
    log L0_ref interpolated linearly in CE between the two ref front points around c (no extrapolation); then
    the ratios' geometric mean. {series: dict(points=[{run, ce_increase, l0, l0_ref, ratio}], ratio)}, only
    series with such a point; {} without a ref series of two front points or more."""
    at = {q["run"]: q for q in points}
    rf = sorted((at[r] for r in series.get(ref, {}).get("front_l0", [])), key=lambda q: q["ce_increase"])
    if len(rf) < 2 or any(q["l0"] <= 0 for q in rf):
        return {}
    ce, log_l0 = [q["ce_increase"] for q in rf], np.log([q["l0"] for q in rf])
    out = {}
    for name, s in series.items():
        pts = [dict(run=q["run"], ce_increase=q["ce_increase"], l0=q["l0"],
                    l0_ref=float(np.exp(np.interp(q["ce_increase"], ce, log_l0))))
               for q in (at[r] for r in s["front_l0"]) if name != ref and ce[0] <= q["ce_increase"] <= ce[-1]]
        for q in pts:
            q["ratio"] = q["l0"] / q["l0_ref"]
        if pts:
            out[name] = dict(points=pts, ratio=float(np.exp(np.mean(np.log([max(q["ratio"], 1e-12) for q in pts])))))
    return out


def series_styles(series):
    """{name: (colour, marker)}: a plain kind its COLORS entry and circles, each variant series its own pair."""
    styles, k = {}, 0
    for name, s in series.items():
        if s["variant"] or s["loss"] not in COLORS:
            styles[name], k = VARIANT_STYLES[k % len(VARIANT_STYLES)], k + 1
        else:
            styles[name] = (COLORS[s["loss"]], "o")
    return styles


def clip_limits(values, q, log=False):
    """Axis limits (lo, hi) holding the (1 - q)..q quantiles of values, with a 5% margin (log: in log10 space)."""
    v = np.asarray([x for x in values if x > 0 or not log], dtype=np.float64)
    if v.size == 0:
        return None
    v = np.log10(v) if log else v
    lo, hi = np.quantile(v, [1 - q, q])
    pad = 0.05 * (hi - lo) or 0.05 * max(abs(hi), 1.0)                   # all equal: a margin all the same
    lo, hi = lo - pad, hi + pad
    return (10 ** lo, 10 ** hi) if log else (lo, hi)


def plot_pareto(res, out):
    """The two panels of pareto(): every series' points, its front as a line, the front's runs named (labels kept
    apart), --log x axes, --clip Q limits with the points beyond drawn at the edge as open triangles."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    styles, points, labels = series_styles(res["series"]), res["points"], []
    for ax, key, better in ((axes[0], "l0", "lower L0"), (axes[1], "alive", "more alive")):
        if res["log"]:
            ax.set_xscale("log")
        lim = [clip_limits([q[k] for q in points], res["clip"], res["log"] and k == key) if res["clip"] else None
               for k in (key, "ce_increase")]
        names, spots = [], []
        for name, s in res["series"].items():
            color, marker = styles[name]
            pts = [q for q in points if q["series"] == name]
            xy = [edge((q[key], q["ce_increase"]), lim) for q in pts]
            ax.scatter([p[0] for p, _ in xy], [p[1] for p, _ in xy], color=color, marker=marker, alpha=0.5)
            for (x, y), side in xy:
                if side:
                    ax.scatter([x], [y], marker=side, s=90, facecolors="none", edgecolors=color, clip_on=False)
            fr = set(s[f"front_{key}"])
            line = sorted((p for p, q in zip(xy, pts) if q["run"] in fr), key=lambda p: p[0][0])
            ax.plot([p[0][0] for p in line], [p[0][1] for p in line], "-", marker=marker, color=color,
                    label=f"{name} ({len(pts)} run{'s' * (len(pts) != 1)})")
            names += [os.path.basename(os.path.normpath(q["run"])) for q in pts if q["run"] in fr]
            spots += [p[0] for p, q in zip(xy, pts) if q["run"] in fr]
        for axis, lm in zip((ax.set_xlim, ax.set_ylim), lim):
            if lm:
                axis(*lm)
        ax.set_xlabel(("L0 (active features per token)" if key == "l0" else "alive dictionary elements")
                      + (", log scale" if res["log"] else ""))
        ax.set_ylabel("CE loss increase")
        ax.set_title(f"lines: non-dominated front ({better}, lower CE increase)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        labels.append((ax, spots, names))
    fig.suptitle(f"L0 and alive dictionary elements vs CE increase, by series (layer "
                 f"{', '.join(sorted({str(q['layer']) for q in points}))})" + (
                     f"\nopen triangles: points beyond the axes, which span the "
                     f"{1 - res['clip']:.3g}..{res['clip']:.3g} quantiles (--clip)" if res["clip"] else ""))
    fig.tight_layout()  # the final layout first: labels are placed in its pixels and left out of the next one
    for ax, spots, names in labels:
        if len(spots) <= 24:  # name the fronts' runs while that stays readable
            label_points(ax, spots, names)
    _save(fig, out)


def edge(xy, lim):
    """(the point moved onto the axis limits lim [(lo, hi) or None, x then y], the triangle marker pointing the way
    it was moved, or None)."""
    out, side = list(xy), None
    for i, lm in enumerate(lim):
        if lm and not lm[0] <= out[i] <= lm[1]:
            low = out[i] < lm[0]
            out[i] = lm[0] if low else lm[1]
            side = ("<" if low else ">") if i == 0 else ("v" if low else "^")
    return tuple(out), side


def label_points(ax, xy, texts, fontsize=7):
    """Name the points xy with texts, each just above and right of its point (left of it at the right edge),
    moved up one line at a time until its box overlaps no label placed before it, with a thin line to its point
    when moved. Returns the annotations."""
    renderer, placed, out = ax.figure.canvas.get_renderer(), [], []

    def put(i, dy, left, line=False):
        a = ax.annotate(texts[i], xy[i], xytext=(-4 if left else 4, dy), textcoords="offset points",
                        fontsize=fontsize, ha="right" if left else "left",
                        arrowprops=dict(arrowstyle="-", lw=0.5, color="0.5") if line else None)
        a.set_in_layout(False)
        return a, a.get_window_extent(renderer)
    for i in sorted(range(len(xy)), key=lambda i: (xy[i][1], xy[i][0])):
        for dy in range(3, 3 + 40 * (fontsize + 1), fontsize + 1):
            a, box = put(i, dy, left=False)
            if box.x1 > ax.bbox.x1:                           # past the right edge: left of the point
                a.remove()
                a, box = put(i, dy, left=True)
            a.remove()
            if not any(box.overlaps(b) for b in placed):
                break
        placed.append(box)
        out.append(put(i, dy, a.get_horizontalalignment() == "right", line=dy > 3)[0])
    return out


def downstream(paths, out=None):
    """Per-layer MSE and explained variance from L to the final residual (Fig. 2), one line per run."""
    rows = []
    for p in expand_runs(paths):
        cfg, m = final_eval(p, keys=("mse", "downstream_mse", "final_mse", "explained_variance",
                                     "downstream_explained_variance", "final_explained_variance"))
        L = m.get("layer", cfg["layer"])
        layers = [str(L)] + [str(k) for k in m.get("downstream_layers", range(L + 1, L + 1 + len(m["downstream_mse"])))] + ["final"]
        rows.append(dict(run=p, loss=cfg.get("loss", "unknown"), layers=layers,
                         mse=[m["mse"]] + m["downstream_mse"] + [m["final_mse"]],
                         explained_variance=[m["explained_variance"]] + m["downstream_explained_variance"]
                         + [m["final_explained_variance"]]))
    if out:
        plt = _plt()
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for i, r in enumerate(rows):
            kw = dict(color=COLORS.get(r["loss"]), marker="o", linestyle=("-", "--", ":", "-.")[i % 4],
                      label=f"{os.path.basename(os.path.normpath(r['run']))} ({r['loss']})")
            axes[0].plot(r["layers"], r["mse"], **kw)
            axes[1].plot(r["layers"], r["explained_variance"], **kw)
        axes[0].set_ylabel("MSE, spliced vs clean residual")
        axes[1].set_ylabel("explained variance")
        for ax in axes:
            ax.set_xlabel("residual stream entering layer (L = the SAE's layer)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle("downstream reconstruction from the SAE's layer to the final residual")
        _save(fig, out)
    return dict(runs=rows, out=out)


def table(rows):
    """Rows of cells (strings) as aligned text: the first column left-aligned, the others right-aligned."""
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w[i]) if i else c.ljust(w[0]) for i, c in enumerate(r)).rstrip() for r in rows)


def format_geometry(res):
    """The geometry numbers of the paper (§3.3) as a table: decoder and encoder directions side by side."""
    runs, dec = res["runs"], res["decoder"]
    lines = [f"{k}  {r['path']}: {r['loss']}, layer {r['layer']}, {r['alive']}/{r['n_dict']} alive ({r['alive_from']})"
             for k, r in runs.items()]
    rows = [["mean cosine to the nearest feature", "decoder", "encoder"]]
    rows += [[f"within {k} (nearest other feature of {k})"] + [f"{res[kind]['within'][k]['mean']:.4f}"
                                                           for kind in ("decoder", "encoder")] for k in runs]
    if "cross" in dec:
        m = dec["cross"]["matching"]
        for key, label in (("A_to_B", "A→B (each A feature's nearest in B)"), ("B_to_A", "B→A (each B feature's nearest in A)"),
                           ("matching", f"one-to-one matching ({'exact' if m['exact'] else 'subset'}, {m['pairs']} pairs)")):
            rows.append([label] + [f"{res[kind]['cross'][key]['mean']:.4f}" for kind in ("decoder", "encoder")])
        diff = [res[kind]["within_diff_A_minus_B"] for kind in ("decoder", "encoder")]
        rows.append(["within A − within B"] + [f"{d['diff']:+.4f}" for d in diff])
        rows.append([f"  95% CI ({diff[0]['n_boot']} bootstrap resamples)"] + [f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]"
                                                                               for d in diff])
    return "\n".join(lines + [table(rows)] + ([f"plot: {res['out']}"] if res.get("out") else []))


def format_seeds(res):
    """Per pair and over pairs: decoder and encoder cross-seed similarity (1 = the same directions)."""
    lines = [f"run {i}: {r['path']} (seed {r['seed']}, {r['alive']}/{r['n_dict']} alive)" for i, r in enumerate(res["runs"])]
    cols = [(kind, k) for kind in ("decoder", "encoder") for k in ("A_to_B", "B_to_A", "matching")]
    rows = [["pair"] + [f"{kind[:3]} {k.replace('_to_', '→').replace('matching', '1:1')}" for kind, k in cols]]
    idx = {r["path"]: i for i, r in enumerate(res["runs"])}
    rows += [[f"{idx[p['a']]}-{idx[p['b']]}"] + [f"{p[kind][k]:.4f}" for kind, k in cols] for p in res["pairs"]]
    rows.append(["mean"] + [f"{res['summary'][kind][k]['mean']:.4f}" for kind, k in cols])
    ci = [res["summary"][kind][k]["ci95"] for kind, k in cols]
    if ci[0] is not None:
        rows.append(["95% CI"] + [f"{c[0]:.3f}..{c[1]:.3f}" for c in ci])
    metrics = [["final eval", *[f"run {i}" for i in range(len(res["runs"]))], "mean", "sd"]]
    metrics += [[k, *[f"{v:.4g}" for v in m["values"]], f"{m['mean']:.4g}", f"{m['sd']:.2g}"]
                for k, m in res.get("metrics", {}).items()]
    return "\n".join(lines + [table(rows), "A→B: each feature of the first run's nearest in the second; 1:1: "
                               "one-to-one (Hungarian) matching mean; 1 = identical directions"]
                     + ([table(metrics)] if len(metrics) > 1 else []))


def format_pareto(res):
    """One row per run: its final eval's L0, alive, CE increase, and which fronts of its series it is on."""
    rows = [["run", "series", "layer", "l0", "alive", "ce_increase", "front"]]
    for q in res["points"]:
        s = res["series"][q["series"]]
        on = [k for k in ("l0", "alive") if q["run"] in s[f"front_{k}"]]
        rows.append([q["run"], q["series"], str(q["layer"]), f"{q['l0']:.2f}", str(q["alive"]), f"{q['ce_increase']:.4f}",
                     ", ".join(on) or "-"])
    matched = []
    for name, m in res.get("matched", {}).items():  # one line per series: the ratio, then each front point's
        each = ", ".join(f"{q['ratio']:.2f} at {q['ce_increase']:.3f}" for q in m["points"])
        matched.append(f"{name}: {m['ratio']:.2f}x local's L0 at the same CE increase (geometric mean over "
                       f"{len(m['points'])} front point{'s' * (len(m['points']) > 1)}: {each})")
    return "\n".join([table(rows), "front: non-dominated within its series (l0: lower L0 and lower CE increase; "
                      "alive: more alive and lower CE increase)"] + matched + ([f"plot: {res['out']}"] if res["out"] else []))


def format_downstream(res):
    """One row per run: MSE (spliced vs clean residual) at its layer L, every later layer and the final residual."""
    layers = sorted({k for r in res["runs"] for k in r["layers"]}, key=lambda k: (k == "final", int(k) if k.isdigit() else 0))
    rows = [["MSE at layer", *layers]]
    for r in res["runs"]:
        mse = dict(zip(r["layers"], r["mse"]))
        rows.append([f"{r['run']} ({r['loss']})"] + [f"{mse[k]:.4g}" if k in mse else "" for k in layers])
    return "\n".join([table(rows)] + ([f"plot: {res['out']}"] if res["out"] else []))


def plot_geometry(res, out):
    """Histograms of the nearest-other-feature cosines (Fig. 3), decoder and encoder directions."""
    plt = _plt()
    fig, axes = plt.subplots(2, 2 if "cross" in res["decoder"] else 1, figsize=(11, 7), squeeze=False)
    edges = np.linspace(-1, 1, HIST_BINS + 1)
    lows = [edges[np.nonzero(s["hist"]["counts"])[0][0]] for kind in ("decoder", "encoder") for s in
            list(res[kind]["within"].values()) + [res[kind]["cross"][k] for k in ("A_to_B", "B_to_A") if "cross" in res[kind]]]
    lo = min(0.0, np.floor(min(lows) * 10) / 10)  # the paper's [0, 1], widened if any value lies below
    for row, kind in enumerate(("decoder", "encoder")):
        r = res[kind]
        groups = [("within", {f"within {k} ({res['runs'][k]['loss']})": v for k, v in r["within"].items()})]
        if "cross" in r:
            groups.append(("across", {"A→B": r["cross"]["A_to_B"], "B→A": r["cross"]["B_to_A"]}))
        for col, (title, hists) in enumerate(groups):
            ax = axes[row][col]
            for label, s in hists.items():
                ax.stairs(np.asarray(s["hist"]["counts"]) / max(1, s["n"]), edges, label=f"{label}, mean {s['mean']:.3f}")
            ax.set_title(f"{kind} directions, {title}: max cosine to nearest other feature", fontsize=9)
            ax.set_xlabel("cosine similarity")
            ax.set_xlim(lo, 1)
            ax.set_ylabel("fraction of alive features")
            ax.legend(fontsize=8)
    _save(fig, out)


def needs(args):
    """[(module, what needs it, the alternative)]: the optional packages (require) this command line uses."""
    out = []
    if args.cmd == "seeds":
        out.append(("scipy", "seeds (the one-to-one matching and the t-interval)", ""))
    if args.cmd == "geometry" and args.run_b is not None:
        out.append(("scipy", "geometry of two SAEs (the one-to-one matching)", ""))
    if getattr(args, "out", None) is not None:
        out.append(("matplotlib", f"{args.cmd} --out (the plot)", ", or leave out --out"))
    return out


def build_parser():
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description="The paper's figures and numbers from run folders.", formatter_class=fmt)
    one_line_errors(parser, "analysis.py")
    sub = parser.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("geometry", help="nearest-feature cosines within one SAE, or within and across two", formatter_class=fmt)
    g.add_argument("run_a", type=nonempty, help="SAE A: a run folder, a SAELens folder or an Apollo .pt")
    g.add_argument("run_b", nargs="?", type=nonempty,
                   help="SAE B, the same kinds; with it: A→B, B→A, the one-to-one matching and "
                   "within A − within B with its CI; without it: within A only")
    g.add_argument("--alive_from", default="saved", choices=["saved", "eval", "all"],
                   help="which features count as alive: saved = those that fired in the source's saved frequencies "
                   "(firing.safetensors, or a SAELens sparsity.safetensors), all features when it has none; eval = "
                   "count firing now over --alive_tokens tokens, as eval.py does; all = every feature")
    g.add_argument("--alive_tokens", type=nonneg_int, default=500_000,
                   help="with --alive_from eval: count over this many tokens")
    for name, what in (("model", "hub id or save_pretrained folder"), ("dataset", "token source"),
                       ("ctx", "tokens per row"), ("data_dir", "token cache folder")):
        g.add_argument(f"--{name}", type=positive_int if name == "ctx" else nonempty, default=None,
                       help=f"with --alive_from eval: {what}; if unset, the source's")
    g.add_argument("--match_cap", type=positive_int, default=4096, help="features a side in the one-to-one matching")
    g.add_argument("--chunk", type=positive_int, default=1024, help="rows per block of similarities")
    g.add_argument("--n_boot", type=positive_int, default=1000,
                   help="bootstrap resamples for the 95%% CI of within A − within B")
    g.add_argument("--out", type=nonempty, default=None, help="write a PNG of the histograms here")
    sd = sub.add_parser("seeds", help="cross-seed similarity of runs that differ only in --seed", formatter_class=fmt)
    sd.add_argument("runs", nargs="+", type=nonempty,
                    help="two or more run folders (or other sources) of the same SAE, other seeds")
    sd.add_argument("--alive_from", default="saved", choices=["saved", "all"],
                    help="alive features: those that fired in the saved frequencies, or every feature")
    sd.add_argument("--match_cap", type=positive_int, default=4096, help="features a side in the one-to-one matching")
    sd.add_argument("--chunk", type=positive_int, default=1024, help="rows per block of similarities")
    for name in ("pareto", "downstream"):
        p = sub.add_parser(name, help="Fig. 1" if name == "pareto" else "Fig. 2", formatter_class=fmt)
        p.add_argument("runs", nargs="+", type=nonempty,
                       help="run folders, each with sae.json and eval.jsonl, sweep folders, or a quoted pattern")
        p.add_argument("--out", type=nonempty, default=None, help="write the plot to this PNG")
    sub.choices["pareto"].add_argument("--log", action="store_true", help="the plot's L0 and alive axes in log scale")
    sub.choices["pareto"].add_argument("--clip", type=fraction, default=None, metavar="Q",
                                       help="the plot's axes span the (1 - Q)..Q quantiles of the points (0.5 < Q "
                                       "<= 1); points beyond are drawn at the edge; if unset, every point")
    for p in sub.choices.values():
        p.add_argument("--json", action="store_true", help="print every number as one JSON object, not a table")
        p.error = parser.error
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "out", None) is not None and not args.out.endswith(".png"):
            raise ValueError(f"--out {args.out!r} must end in .png")
        if getattr(args, "clip", None) is not None and not args.clip > 0.5:
            raise ValueError(f"--clip must be in (0.5, 1], got {args.clip:g}: the axes span the (1 - Q)..Q quantiles")
        if args.cmd == "pareto" and args.out is None and (args.log or args.clip is not None):
            raise ValueError(f"{'--log' if args.log else '--clip'} shapes the plot; give --out PLOT.png too")
        for module, what, alt in needs(args):  # before any work: one line naming what to install
            require(module, what, alt)
        if args.cmd == "geometry":
            res = geometry(args.run_a, args.run_b, args.alive_from, args.match_cap, args.chunk, args.n_boot,
                           alive_tokens=args.alive_tokens, model_name=args.model, dataset=args.dataset, ctx=args.ctx,
                           data_dir=args.data_dir, progress="analysis.py:")[0]
            if args.out is not None:
                plot_geometry(res, args.out)
            res["out"] = args.out
        elif args.cmd == "seeds":
            res = seeds(args.runs, args.alive_from, args.match_cap, args.chunk)
        elif args.cmd == "pareto":
            res = pareto(args.runs, args.out, args.log, args.clip)
        else:
            res = downstream(args.runs, args.out)
    except (ValueError, OSError) as e:
        sys.exit(f"analysis.py: error: {e}")
    fmt = dict(geometry=format_geometry, seeds=format_seeds, pareto=format_pareto, downstream=format_downstream)[args.cmd]
    print(json.dumps(res) if args.json else fmt(res))


if __name__ == "__main__":
    from cli import run
    run(main, "analysis.py")
