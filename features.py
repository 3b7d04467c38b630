"""
Looking at features: a static feature browser for one SAE, or two side by side (the paper's local vs e2e).

    python features.py out/e2e_ds_L6 --out pages/e2e_ds_L6                     # 1M held-out tokens
    python features.py out/local_L6 --compare out/e2e_ds_L6 --out pages/local_vs_e2e_ds
    python features.py out/e2e_L6 --dataset other.txt --n_tokens 20000 --k 5 --out pages/tiny --device cpu
Then open DIR/index.html (file://: no server, no network, inline CSS and JS only).

RUN is any source eval.py reads (run folder, Apollo .pt + .yaml, SAELens folder); model, dataset and ctx come
from the flags, else the source's record (eval.prepare). Tokens: the first ⌈N / ctx⌉ rows of eval.prepare's
held-out rows (its eval rows, then its extra rows; notes on stderr say when they may overlap training, and one
note when there are fewer than --n_tokens: a run trained on a local file has only its eval rows held out, all
the rest of the file was in its training pool, so --dataset OTHER_FILE is how to read more held-out text).
Progress goes to stderr as eval.py's does (`features.py: collect RUN 120/500 batches | 12s | eta 38s`, at each
tenth and at least every 30 s; the same for writing the pages once that has taken PAGES_QUIET_S); stdout holds
the collection's summary line and the site's path.
For feature i at token t, c_i(t) = ReLU(W_e[i]·x_t + b_e[i]) with x_t the residual entering block L:
    freq_i      #{t : c_i(t) > 0} / N                              (features with freq 0 are dead)
    max_i       max_t c_i(t)
    contexts    the k rows with the largest row maximum of c_i (one context per row, rows where it fired),
                each shown as the tokens from --before to --after around that row's argmax, with c_i at each
                (recomputed by the same formula from x of that row when the row enters the top k)
    hist_i      BINS bins over [0, hi_i) of the nonzero c_i(t), hi_i the smallest power of two above max_i.
                When a larger value arrives hi_i doubles and bin pairs merge; powers of two make this exact,
                the same histogram as one made over the final range in one go. Quantiles 50/90/99% of the
                nonzero activations are read from it, linear inside a bin: the ⌈qn⌉-th smallest nonzero value
                lies in the same bin, so the error is at most one bin, hi_i / BINS ≤ max_i / 64.
    effect_i    the logit-lens reading of the decoder direction: e_i = W_U (γ ⊙ D_i) ∈ R^V, D_i the unit decoder
                column, γ = ln_f.weight, W_U the unembedding (V, d); no centring, no division by a std, no β (the
                same for every feature). The --n_logits largest entries are the promoted tokens, the smallest
                the suppressed ones.
Memory is bounded whatever N: top-k values, rows and positions (k, n_dict), their windows (k, n_dict,
before + after + 1), the histograms (n_dict, BINS), and one slice of at most --chunk tokens × features of
activations at a time; never a (N, n_dict) matrix. The collection's tokens/s is printed and kept in site.json
(bench_features.py times it at GPT-2-small shape).

Compare (--compare B): both sources are collected on the same flags, then the unit decoder directions
(analysis.load_directions) of the features that fired in A and in B are paired one to one by analysis.matching
(Hungarian up to --match_cap features a side, else a random subset of A). Each pair shows the cosine of its decoder
directions and of its encoder rows, and both features' contexts side by side; unmatched alive features of
each side and dead ones are listed. DIR/a and DIR/b are each one source's full site.

The pages name the source, model and dataset as given for hub ids, and by their last part for local paths
(the run folder's name, the file's name): a site holds no folder of the user's machine.
The site: DIR/index.html, a table of the alive features sorted by a click on a header (or index.html#sort=C,
C the column), --page_rows rows at a time, each row an element with data-feature=ID, then the dead features
as ranges; views DIR/f/NNNN.html#ID with NNNN = ID // PER (PER features a file); DIR/site.json, the numbers.
The site is built in a new folder beside DIR, which takes DIR's place only when it is whole (files.replace_dir):
a refused, failed or interrupted run leaves a previous site as it was; a user's own files in it are kept.
Dataset text reaches a page only as JSON inside <script type="application/json"> with < > & written as \\u
escapes, and the page puts it into the DOM with textContent / setAttribute only: never parsed as HTML, so a
document holding <script> shows as text.
"""
import argparse
import html
import itertools
import json
import os
import re
import shutil
import sys
import time

import numpy as np
import torch

from cli import nonempty, nonneg_int, one_line_errors, positive_int, resolve_device
from files import check_writable, remove_made, replace_dir

BINS = 128          # histogram bins per feature; a power of two
QUANTILES = (0.5, 0.9, 0.99)
PER = 256           # features per view file (pairs per file in compare mode)
SITE = ("index.html", "site.json", "f", "p", "a", "b")  # what a site folder holds (one source, or compare)
HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- collection

def add_hist(hist, hi, c, m=None):
    """Add the nonzero entries of activations c (n, F) to the histograms hist (F, BINS) over [0, hi) (F,),
    first doubling hi and merging bin pairs of each feature whose maximum m (F,) (default: c's) reached hi."""
    F = c.size(1)
    m = c.max(0).values if m is None else m                               # (F,)
    new = (hi == 0) & (m > 0)
    hi[new] = torch.ldexp(torch.ones_like(m[new]), torch.frexp(m[new]).exponent)  # 2^e > m, m = mant · 2^e
    while (grow := (m >= hi) & (m > 0)).any():
        merged = hist[grow].view(-1, BINS // 2, 2).sum(-1)                # (g, BINS / 2)
        hist[grow] = torch.cat([merged, torch.zeros_like(merged)], 1)
        hi[grow] *= 2
    t, f = c.nonzero(as_tuple=True)                                       # a trained SAE's c is sparse
    b = (c[t, f] * (BINS / hi[f])).long().clamp_max(BINS - 1)             # BINS / hi is a power of two: exact
    hist.view(-1).add_(torch.bincount(f * BINS + b, minlength=F * BINS))


@torch.no_grad()
def merge_top(s, rmax, rpos, row_ids, x, sae, offsets):
    """Merge one batch's row maxima rmax (B, F) at rpos (B, F) into the running top-k s. The entries that came in
    get their windows from x (B, T, C): c_f over their row by one matmul per row, then the window positions."""
    k = s["val"].size(0)
    cand = torch.where(rmax > 0, rmax, -1.0)                              # rows where it never fired stay out
    val, j = torch.cat([s["val"], cand]).topk(k, dim=0)                   # (k, F), j indexes old then new
    new = j >= k
    if not new.any():
        return
    s["val"] = val
    s["row"] = torch.cat([s["row"], row_ids[:, None].expand_as(rmax)]).gather(0, j)
    s["pos"] = torch.cat([s["pos"], rpos]).gather(0, j)
    s["win"] = s["win"].gather(0, j.clamp_max(k - 1)[..., None].expand_as(s["win"]))
    slot, f = new.nonzero(as_tuple=True)
    b, T = j[slot, f] - k, x.size(1)                                      # the batch row each came from
    for r in b.unique().tolist():                                         # per row: a matmul, not (n, W, C) gathers
        idx = (b == r).nonzero().squeeze(1)
        for a in range(0, len(idx), 2048):
            sl, ff = slot[idx[a:a + 2048]], f[idx[a:a + 2048]]
            c = sae.encode(x[r], ff)                                      # (T, n): row r's c_f
            pos = s["pos"][sl, ff][None, :] + offsets[:, None]               # (W, n)
            act = c.gather(0, pos.clamp(0, T - 1))
            s["win"][sl, ff] = torch.where((pos >= 0) & (pos < T), act, float("nan")).T


@torch.no_grad()
def collect(model, sae, layer, rows, k=20, before=12, after=4, batch_size=8, chunk=2 ** 22, device="cpu",
            progress=None):
    """Per-feature statistics of the module docstring over token rows (R, T). A dict of CPU tensors: val, row,
    pos (k, F) (the top-k row maxima, descending; val 0 and row -1 where fewer rows fired), win (k, F, W) (c_i
    at row positions pos - before .. pos + after, NaN outside the row), hist (F, BINS) int64, hi (F,), counts
    (F,), and tokens, seconds. progress: None, or a callable given the number of batches done after each one
    (eval.progress_printer)."""
    from data import get_batch
    F, W, (R, T) = sae.n_dict, before + after + 1, rows.shape
    s = dict(val=torch.zeros(k, F, device=device), row=torch.full((k, F), -1, dtype=torch.long, device=device),
             pos=torch.zeros(k, F, dtype=torch.long, device=device),
             win=torch.full((k, F, W), float("nan"), device=device))
    hist, hi = torch.zeros(F, BINS, dtype=torch.long, device=device), torch.zeros(F, device=device)
    offsets = torch.arange(-before, after + 1, device=device)
    g = max(1, chunk // (T * F))                                          # rows per slice of activations,
    t = T if chunk >= T * F else max(1, chunk // F)                       # or tokens of one row per slice
    t0 = time.time()
    for i, r0 in enumerate(range(0, R, batch_size)):
        row_ids = torch.arange(r0, min(R, r0 + batch_size), device=device)
        x = model.forward_to_layer(get_batch(rows, row_ids.cpu().numpy(), device), layer)  # (B, T, C)
        rmax = torch.zeros(x.size(0), F, device=device)
        rpos = torch.zeros(x.size(0), F, dtype=torch.long, device=device)
        for b0 in range(0, x.size(0), g):
            for s0 in range(0, T, t):
                c = sae.encode(x[b0:b0 + g, s0:s0 + t])                   # (g, t, F)
                v, p = c.max(1)                                           # (g, F)
                better = v > rmax[b0:b0 + g]
                rmax[b0:b0 + g] = torch.where(better, v, rmax[b0:b0 + g])
                rpos[b0:b0 + g] = torch.where(better, p + s0, rpos[b0:b0 + g])
                add_hist(hist, hi, c.reshape(-1, F), v.max(0).values)
        merge_top(s, rmax, rpos, row_ids, x, sae, offsets)
        if progress:
            progress(i + 1)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    out = {key: v.cpu() for key, v in dict(s, hist=hist, hi=hi, counts=hist.sum(1)).items()}
    return dict(out, tokens=R * T, seconds=time.time() - t0)


def quantiles(hist, hi, qs=QUANTILES):
    """(F, len(qs)) quantiles of the nonzero activations from the histograms, linear inside a bin; NaN if dead."""
    h = hist.double()
    cum, n = h.cumsum(1), h.sum(1, keepdim=True)                          # (F, BINS), (F, 1)
    out = []
    for q in qs:
        b = (cum < q * n).sum(1, keepdim=True).clamp_max(BINS - 1)        # first bin with cum >= q n
        below = torch.where(b > 0, cum.gather(1, (b - 1).clamp_min(0)), torch.zeros_like(n))
        frac = ((q * n - below) / h.gather(1, b).clamp_min(1)).clamp(0, 1)
        out.append(((b + frac) * hi.double()[:, None] / BINS).squeeze(1))
    return torch.where(n > 0, torch.stack(out, 1), float("nan"))


@torch.no_grad()
def output_effect(model, sae, n=10, chunk=256):
    """(promoted ids, values, suppressed ids, values), each (F, n): the largest / smallest e_i = W_U (γ ⊙ D_i)."""
    W_U, gamma, D = model.lm_head.weight, model.transformer.ln_f.weight, sae.dict_elements()  # (V, C) (C,) (C, F)
    outs = []
    for i in range(0, D.size(1), chunk):
        e = (W_U @ (gamma[:, None] * D[:, i:i + chunk])).T                # (f, V)
        outs.append([*e.topk(n, dim=1)[::-1], *e.topk(n, dim=1, largest=False)[::-1]])
    return tuple(torch.cat([o[m] for o in outs]).cpu() for m in range(4))


def gather(source, n_tokens=1_000_000, k=20, before=12, after=4, n_logits=10, batch_size=8, chunk=2 ** 22,
           device="cpu", **prep_kw):
    """collect() and output_effect() for one source on its held-out rows; adds rows, info, layer, effect.
    Notes (stderr) say when the rows may overlap training and when fewer tokens exist than --n_tokens."""
    from eval import prepare, progress_printer
    p = prepare(source, alive_tokens=n_tokens, device=device, **prep_kw)
    for note in p["notes"]:
        if not note.startswith(EVAL_ALIVE_NOTE):  # it names eval.py's flag; short_note() below says it our way
            print(f"features.py: note: {source}: {note}", file=sys.stderr)
    ctx = p["info"]["ctx"]
    rows = np.concatenate([p["eval_rows"], p["extra_rows"]])[:-(-n_tokens // ctx)]
    if len(rows) * ctx < n_tokens:
        print(f"features.py: note: {source}: {short_note(p, len(rows) * ctx, n_tokens)}", file=sys.stderr)
    tick = progress_printer(f"features.py: collect {source}", -(-len(rows) // batch_size)) if len(rows) else None
    st = collect(p["model"], p["sae"], p["cfg"]["layer"], rows, k, before, after, batch_size, chunk, device, tick)
    st.update(effect=output_effect(p["model"], p["sae"], n_logits), rows=rows, before=before,
              info=dict(p["info"], layer=p["cfg"]["layer"], n_dict=p["sae"].n_dict,
                        vocab_size=p["model"].config.vocab_size))
    alive = int((st["counts"] > 0).sum())
    st["info"].update(tokens=st["tokens"], seconds=round(st["seconds"], 3), alive=alive,
                      l0=st["counts"].sum().item() / st["tokens"],
                      tokens_per_s=round(st["tokens"] / st["seconds"]))
    print(f"{source}: {st['tokens']:,} tokens in {st['seconds']:.1f}s, {st['tokens'] / st['seconds']:,.0f} tokens/s "
          f"| alive {alive}/{p['sae'].n_dict}")
    return st


EVAL_ALIVE_NOTE = "alive counted over"  # eval.plan_rows' note on too few rows: it names eval.py's flag, not ours


def short_note(p, got, asked):
    """The one note on fewer held-out tokens than --n_tokens: how many, and why (eval.plan_rows' cases)."""
    run, info = p["cfg"].get("args", {}), p["info"]
    dataset = info["dataset"]
    own_local = ("n_samples" in run and "eval_samples" in run and dataset == run.get("dataset")
                 and info["ctx"] == run.get("ctx") and os.path.exists(dataset))
    why = (f"the run trained on the local file {dataset!r}, all of it in its training pool but its "
           f"{len(p['eval_rows'])} held-out eval rows; --dataset OTHER_FILE gives more held-out text" if own_local
           else f"dataset {dataset!r} has no more rows; --dataset OTHER_FILE gives more text")
    return f"collected over {got:,} tokens, not the --n_tokens {asked:,} asked for: {why}"


# ----------------------------------------------------------------------------- the site

def vocab(n):
    """Display strings of token ids 0..n-1 (GPT-2's tiktoken encoding; a newline shows as ↵)."""
    from token_cache import _tokenizer
    enc = _tokenizer()
    return [enc.decode_single_token_bytes(i).decode("utf-8", "replace").replace("\n", "↵")
            if i < enc.n_vocab else f"<{i}>" for i in range(n)]


def r3(x):
    return None if x != x else float(f"{x:.3g}")  # 3 significant digits; NaN as null


def records(st, ids, tok):
    """JSON-able dicts of features ids: stats, histogram, output effect and contexts."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    val, row, pos, win = (st[key][:, ids].tolist() for key in ("val", "row", "pos", "win"))
    q, eff = quantiles(st["hist"][ids], st["hi"][ids]).tolist(), [e[ids].tolist() for e in st["effect"]]
    out = []
    for n, i in enumerate(ids.tolist()):
        ctxs = []
        for j in range(len(val)):
            if val[j][n] <= 0:
                break
            p, T, b = pos[j][n], st["rows"].shape[1], st["before"]
            lo, hi = max(0, p - b), min(T, p + len(win[j][n]) - b)
            ctxs.append(dict(row=row[j][n], pos=p, m=p - lo, t=[tok[t] for t in st["rows"][row[j][n], lo:hi].tolist()],
                             a=[r3(a) for a in win[j][n][lo - p + b:hi - p + b]]))
        out.append(dict(id=i, freq=r3(st["counts"][i].item() / st["tokens"]), n=int(st["counts"][i]), max=r3(val[0][n]),
                        q=[r3(v) for v in q[n]], hi=st["hi"][i].item(), hist=st["hist"][i].tolist(), ctx=ctxs,
                        pro=[[tok[t], r3(v)] for t, v in zip(eff[0][n], eff[1][n])],
                        sup=[[tok[t], r3(v)] for t, v in zip(eff[2][n], eff[3][n])]))
    return out


def page(path, title, data):
    """Write one page: the data as escaped JSON, the app's CSS and JS inline (features_page.html)."""
    blob = json.dumps(data, separators=(",", ":"), allow_nan=False)
    blob = blob.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")   # no </script> inside
    with open(os.path.join(HERE, "features_page.html"), encoding="utf-8") as f:
        template = f.read()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(re.sub(r"\{\{(title|data)\}\}", lambda m: html.escape(title) if m[1] == "title" else blob, template))


def ranges(ids):
    """'0-3, 7, 9-12' for sorted ints."""
    out, i = [], 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ", ".join(out)


def shown(name):
    """How a page names a source, model or dataset: a local path (or any absolute one) by its last part, so no
    page holds the user's folders; a hub id as given."""
    local = os.path.isabs(name) or name.startswith("~") or os.path.exists(name)
    return os.path.basename(os.path.normpath(name)) or name if local else name


def public(info):
    """info with its source, model and dataset as shown() names them: what a page and site.json hold."""
    return dict(info, **{k: shown(info[k]) for k in ("source", "model", "dataset") if isinstance(info.get(k), str)})


PAGES_QUIET_S = 5.0  # writing the pages prints progress only once it has taken this long


def pages_progress(n_files, what):
    """A progress callable for writing n_files page files: eval.progress_printer's lines, silent for the first
    PAGES_QUIET_S seconds (a small site prints nothing)."""
    from eval import progress_printer
    t0, tick = time.time(), progress_printer(f"features.py: writing the pages of {what},", n_files)

    def progress(done):
        if time.time() - t0 >= PAGES_QUIET_S:
            tick(done)
    return progress


def write_site(out, st, title, page_rows=100):
    """DIR/index.html, DIR/f/NNNN.html (features id // PER) and DIR/site.json for one source."""
    tok = vocab(st["info"]["vocab_size"])
    alive = (st["counts"] > 0).nonzero().squeeze(1).tolist()
    meta = dict(public(st["info"]), title=title)
    rows, shards = [], [(s, list(ids)) for s, ids in itertools.groupby(alive, key=lambda i: i // PER)]
    tick = pages_progress(len(shards), f"{len(alive):,} features")
    for n, (s, ids) in enumerate(shards):
        recs = records(st, ids, tok)
        page(os.path.join(out, "f", f"{s:04d}.html"), f"{title}: features {s * PER}-{s * PER + PER - 1}",
             dict(kind="features", meta=meta, features=recs, per=PER))
        rows += [[r["id"], r["freq"], r["max"], r["q"][0], r["pro"][:3]] for r in recs]
        tick(n + 1)
    dead = sorted(set(range(st["info"]["n_dict"])) - set(alive))
    page(os.path.join(out, "index.html"), title, dict(kind="index", meta=meta, rows=rows, per=PER, page=page_rows,
                                                      dead=ranges(dead), n_dead=len(dead)))
    with open(os.path.join(out, "site.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return tok


def compare(a, b, out, match_cap=4096, page_rows=100, **kw):
    """Both sources' sites in DIR/a and DIR/b, their alive features paired (module docstring), DIR/index.html
    with the pairs and DIR/p/NNNN.html#J with each pair side by side."""
    from analysis import load_directions, matching
    sts, toks = [], []
    for side, src in (("a", a), ("b", b)):
        sts.append(gather(src, **kw))
        toks.append(write_site(os.path.join(out, side), sts[-1], f"{side.upper()}: {shown(src)}", page_rows))
    alive = [(st["counts"] > 0).nonzero().squeeze(1) for st in sts]
    dirs = [load_directions(src, alive_from="all")[0] for src in (a, b)]
    (U, EU), (V, EV) = ((d["decoder"][al], d["encoder"][al]) for d, al in zip(dirs, alive))
    m = matching(U, V, cap=match_cap)
    ru, rv = torch.tensor(m["rows_u"], dtype=torch.long), torch.tensor(m["rows_v"], dtype=torch.long)
    dec, enc = (U[ru] * V[rv]).sum(1), (EU[ru] * EV[rv]).sum(1)
    order = dec.argsort(descending=True)                                  # pair J: the J-th highest decoder cosine
    ia, ib, dec, enc = alive[0][ru][order], alive[1][rv][order], dec[order].tolist(), enc[order].tolist()
    info = dict(a=public(sts[0]["info"]), b=public(sts[1]["info"]),
                matching={k: v for k, v in m.items() if not k.startswith("rows_")})
    rows, tick = [], pages_progress(-(-len(ia) // PER), f"{len(ia):,} pairs")
    for s in range(0, len(ia), PER):
        ra, rb = records(sts[0], ia[s:s + PER], toks[0]), records(sts[1], ib[s:s + PER], toks[1])
        pairs = [dict(j=s + n, a=x, b=y, dec=r3(dec[s + n]), enc=r3(enc[s + n]))
                 for n, (x, y) in enumerate(zip(ra, rb))]
        page(os.path.join(out, "p", f"{s // PER:04d}.html"), f"pairs {s}-{s + PER - 1}",
             dict(kind="pairs", meta=info, pairs=pairs, per=PER))
        rows += [[p["j"], x["id"], y["id"], p["dec"], p["enc"], x["freq"], y["freq"], x["max"], y["max"]]
                 for p, x, y in zip(pairs, ra, rb)]
        tick(s // PER + 1)
    left = [sorted(set(al.tolist()) - set(i.tolist())) for al, i in zip(alive, (ia, ib))]
    page(os.path.join(out, "index.html"), f"{shown(a)} vs {shown(b)}", dict(
        kind="compare", meta=info, rows=rows, per=PER, page=page_rows, unmatched=[ranges(x) for x in left],
        n_unmatched=[len(x) for x in left], n_dead=[st["info"]["n_dict"] - st["info"]["alive"] for st in sts]))
    with open(os.path.join(out, "site.json"), "w") as f:
        json.dump(info, f, indent=1)


def keep_others(old, new):
    """Into the new site folder, the entries of the old one (a previous site) that are not the site's own (SITE):
    a user's files stay when the site is replaced. Hard links (copies where the file system has none), so the
    old folder is untouched until the new one takes its place."""
    if not os.path.isdir(old):
        return
    for name in sorted(set(os.listdir(old)) - set(SITE)):
        src, dst = os.path.join(old, name), os.path.join(new, name)
        if os.path.islink(src):
            os.symlink(os.readlink(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(src, dst)


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def missing_top(path):
    """The topmost folder of path's parents that does not exist yet (replace_dir makes it), or None."""
    top, d = None, os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(d):
        top, d = d, os.path.dirname(d)
    return top


def build_parser():
    parser = argparse.ArgumentParser(description="A static feature browser for an SAE, or two side by side.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("run", metavar="RUN", type=nonempty,
                        help="a run folder (sae.json), an Apollo .pt (+ .yaml) or a SAELens folder")
    parser.add_argument("--compare", metavar="RUN_B", type=nonempty, default=None,
                        help="a second source: pair its features with RUN's")
    parser.add_argument("--out", type=nonempty, required=True, default=argparse.SUPPRESS,
                        help="site folder (required): new, empty, or a previous site, which is replaced")
    # model and data (None: the source's own record, else gpt2 / Apollo's OpenWebText / 1024, as eval.py)
    parser.add_argument("--model", type=nonempty, default=None,
                        help="hub id or local save_pretrained folder; None: the source's")
    parser.add_argument("--dataset", type=nonempty, default=None,
                        help="hub dataset or local file / folder; None: the source's")
    parser.add_argument("--ctx", type=positive_int, default=None, help="tokens per row; None: the source's")
    parser.add_argument("--data_dir", type=nonempty, default=None,
                        help="token cache folder; None: the source's, else ~/.cache/nanosae")
    # what to collect and show
    parser.add_argument("--n_tokens", type=positive_int, default=1_000_000, help="held-out tokens to read (whole rows)")
    parser.add_argument("--k", type=positive_int, default=20, help="top activating contexts per feature")
    parser.add_argument("--before", type=nonneg_int, default=12, help="context tokens shown before the maximum")
    parser.add_argument("--after", type=nonneg_int, default=4, help="context tokens shown after the maximum")
    parser.add_argument("--n_logits", type=positive_int, default=10, help="promoted and suppressed tokens per feature")
    parser.add_argument("--match_cap", type=positive_int, default=4096, help="features a side in the compare matching")
    parser.add_argument("--page_rows", type=positive_int, default=100, help="table rows per page of the index")
    # system
    parser.add_argument("--batch_size", type=positive_int, default=8, help="rows per forward pass")
    parser.add_argument("--chunk", type=positive_int, default=2 ** 22,
                        help="tokens x features of activations at a time")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    return one_line_errors(parser, "features.py")


def main(argv=None):
    args = build_parser().parse_args(argv)
    from interop import source_format
    try:
        device = resolve_device(args.device)
        if args.compare is not None:
            from analysis import require
            require("scipy", "--compare (its one-to-one matching)")
        for src in [args.run] + ([args.compare] if args.compare is not None else []):
            source_format(src)
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ValueError(f"--out {args.out!r} is a file; give a folder (new, empty, or a previous site)")
        if os.path.isdir(args.out) and os.listdir(args.out) and not os.path.isfile(os.path.join(args.out, "site.json")):
            raise ValueError(f"--out {args.out!r} holds other files; give a new or empty folder, or a previous site")
        check_writable(os.path.dirname(os.path.abspath(args.out)), f"--out {args.out!r}: its parent folder")
        kw = dict(n_tokens=args.n_tokens, k=args.k, before=args.before, after=args.after, n_logits=args.n_logits,
                  batch_size=args.batch_size, chunk=args.chunk, device=device, model_name=args.model,
                  dataset=args.dataset, ctx=args.ctx, data_dir=args.data_dir)

        def fill(tmp):  # the whole work, into a new folder beside --out; the old site stays until it is done
            if args.compare is not None:
                compare(args.run, args.compare, tmp, args.match_cap, args.page_rows, **kw)
            else:
                write_site(tmp, gather(args.run, **kw), shown(args.run), args.page_rows)
            keep_others(args.out, tmp)
        made = missing_top(args.out)
        try:
            replace_dir(args.out, fill, force=True)
        except BaseException:
            remove_made(os.path.dirname(os.path.abspath(args.out)), made)  # folders made for a new --out
            raise
    except (ValueError, OSError) as e:
        sys.exit(f"features.py: error: {e}")
    print(f"site: {os.path.join(args.out, 'index.html')}")


if __name__ == "__main__":
    from cli import run
    run(main, "features.py")
