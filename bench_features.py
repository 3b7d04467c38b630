"""
Timing features.py: the collection's tokens/s and peak memory at GPT-2-small shape, and how long a large index
takes to load in headless Chromium.

    python bench_features.py collect                   # random GPT-2 small, SAE at layer 6 of ratio 8, 100k tokens
    python bench_features.py collect --l0 32           # the same SAE with biases set for a trained SAE's L0
    python bench_features.py page --n 46080            # a synthetic 46,080-feature index, paged and all rows at once

collect writes a random GPT-2 (transformers' GPT2Config() defaults: 12 layers, d 768, ctx 1024) with
save_pretrained, a random SAE (sae.save_sae, untrained: about half its features fire on every token, the
dense worst case for the histograms) and a text file of random words under --tmp, then runs features.py on
them in a fresh process --repeat times and prints the fastest run's tokens/s (the collection loop: the model
to layer L, the encoder, the top-k, the histograms; on a shared machine other jobs only slow a run down) and
the processes' peak RSS (getrusage of children); before each run, for scale, the tokens/s of the model's
forward to layer L alone on batches of the same shape.
page writes a synthetic index.html with --page_rows rows per page (opened as is, and as #sort=2: all rows sorted
by their max first), again with every row on one page, and a view file of PER features, and
reports the time from navigation start to the table built and laid out (the page's own data-render-ms) and the
wall time of a whole headless Chromium run (start, load, render, dump, exit), the median of --repeat runs each.
"""
import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

import features
from cli import nonempty, nonneg_int, one_line_errors, positive_int

HERE = os.path.dirname(os.path.abspath(__file__))
WORDS = ("the of and to in is was for on that with as by at from it his an were are which this be or had not but "
         "first one their its new after who they have her she two been other when there all during into school").split()


def chromium(url, screenshot=None, size=(1280, 900), timeout=60):
    """The DOM of a page (a file:// URL) after its scripts ran, from headless Chromium; with screenshot, also a
    PNG of the window. For the tests, the page-load benchmark and the README's picture."""
    exe = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if exe is None:
        raise ValueError("no chromium found (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}"]
        shot = [f"--screenshot={os.path.abspath(screenshot)}"] if screenshot else []
        return subprocess.run(cmd + shot + ["--dump-dom", url], capture_output=True, text=True, timeout=timeout,
                              check=True).stdout


def collect(tmp, n_tokens, ratio, layer, batch_size, device, l0, repeat):
    import torch
    from data import load_rows
    from model import GPT
    from sae import SAE, save_sae
    model, sae_dir, data = (os.path.join(tmp, n) for n in ("gpt2-random", "sae", "words.txt"))
    if not os.path.isfile(os.path.join(model, "config.json")):
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        GPT2LMHeadModel(GPT2Config()).save_pretrained(model)
    rng = np.random.default_rng(0)
    with open(data, "w") as f:
        f.write(" ".join(rng.choice(WORDS, int(n_tokens * 1.1) + 2048)))
    torch.manual_seed(0)
    sae = SAE(768, ratio * 768)
    if l0:  # each feature's bias at the (1 - l0 / n_dict) quantile of its pre-activation on 4 rows: L0 ≈ l0
        with torch.no_grad():
            idx = torch.from_numpy(load_rows(data, 1024, cache_dir=os.path.join(tmp, "cache"))[:4].astype(np.int64))
            z = GPT.from_pretrained(model).forward_to_layer(idx, layer).reshape(-1, 768) @ sae.encoder.weight.T
            sae.encoder.bias.copy_(-z.kthvalue(int(len(z) * (1 - l0 / sae.n_dict)), dim=0).values)
    save_sae(sae, sae_dir, dict(layer=layer, model=model, center=True))
    out = os.path.join(tmp, "site")
    cmd = [sys.executable, os.path.join(HERE, "features.py"), sae_dir, "--dataset", data, "--ctx", "1024",
           "--n_tokens", str(n_tokens), "--out", out, "--data_dir", os.path.join(tmp, "cache"),
           "--batch_size", str(batch_size), "--device", device]
    gpt, idx = GPT.from_pretrained(model).to(device), torch.randint(0, 50257, (batch_size, 1024), device=device)
    runs = []
    for _ in range(repeat):
        with torch.no_grad():                             # the model's own share: its forward to layer L alone
            gpt.forward_to_layer(idx, layer)
            t0 = time.time()
            for _ in range(3):
                gpt.forward_to_layer(idx, layer)
        forward = round(3 * idx.numel() / (time.time() - t0))
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True)
        if p.returncode:
            sys.exit(p.stdout + p.stderr)
        meta = json.load(open(os.path.join(out, "site.json")))
        runs.append(dict(tokens_per_s=meta["tokens_per_s"], forward_only_tokens_per_s=forward,
                         collect_s=meta["seconds"], wall_s=round(time.time() - t0, 1)))
        print(p.stdout.strip().splitlines()[0], "| forward alone", forward, "tokens/s", flush=True)
    best = max(runs, key=lambda r: r["tokens_per_s"])
    print(json.dumps(dict(tokens=meta["tokens"], n_dict=meta["n_dict"], layer=layer, l0=round(meta["l0"], 1),
                          alive=meta["alive"], **best, best_of=repeat,
                          peak_rss_mb=round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024))))


def page(tmp, n, page_rows, repeat):
    rng = np.random.default_rng(0)
    words = [w.capitalize() for w in WORDS] + [" " + w for w in WORDS]
    dead = set(rng.choice(n, n // 20, replace=False).tolist())
    r3 = features.r3
    rows = [[i, r3(10 ** rng.uniform(-5, -1)), r3(rng.uniform(1, 20)), r3(rng.uniform(0.2, 5)),
             [[words[j], r3(rng.uniform(0.1, 1))] for j in rng.integers(0, len(words), 3)]]
            for i in range(n) if i not in dead]
    meta = dict(title="synthetic", loss="e2e_ds", layer=6, n_dict=n, alive=len(rows), tokens=1_000_000, dataset="none")
    tok = lambda: [[words[j], r3(rng.uniform(-1, 1))] for j in rng.integers(0, len(words), 10)]
    view = [dict(id=i, freq=0.01, n=10_000, max=5.0, q=[1.0, 2.0, 4.0], hi=8.0, hist=rng.integers(0, 999, 128).tolist(),
                 pro=tok(), sup=tok(), ctx=[dict(row=0, pos=12, m=12, t=[w for w, _ in tok() + tok()][:17],
                                                 a=[r3(a) for a in rng.uniform(0, 5, 17)]) for _ in range(20)])
            for i in range(features.PER)]                   # a view file of PER features, 20 contexts of 17 tokens
    features.page(os.path.join(tmp, "f", "0000.html"), "synthetic", dict(kind="features", meta=meta, features=view))
    res = {}
    for per_page, sort in ((page_rows, ""), (page_rows, "#sort=2"), (len(rows), ""), ("view", "#7")):
        path = os.path.join(tmp, f"index_{per_page}.html" if per_page != "view" else "f/0000.html")
        if per_page != "view":
            features.page(path, "synthetic", dict(kind="index", meta=meta, rows=rows, per=features.PER, page=per_page,
                                                  dead=features.ranges(sorted(dead)), n_dead=len(dead)))
        render, wall = [], []
        for _ in range(repeat):
            t0 = time.time()
            dom = chromium("file://" + os.path.abspath(path) + sort)
            wall.append(time.time() - t0)
            render.append(int(re.search(r'data-render-ms="(\d+)"', dom).group(1)))
        name = "feature_view" if per_page == "view" else f"rows_per_page_{per_page}" + ("_sorted_by_max" * bool(sort))
        res[name] = dict(
            shown_rows=dom.count("<tr data-feature="), render_ms=int(np.median(render)),
            chromium_wall_s=round(float(np.median(wall)), 2), html_mb=round(os.path.getsize(path) / 1e6, 1))
    print(json.dumps(dict(features=n, alive=len(rows), **res)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("what", choices=["collect", "page"], help="what to time")
    parser.add_argument("--tmp", type=nonempty, default="/tmp/nanosae_bench_features", help="scratch folder")
    parser.add_argument("--n_tokens", type=positive_int, default=100_000, help="collect: tokens")
    parser.add_argument("--ratio", type=positive_int, default=8, help="collect: SAE features per model dimension")
    parser.add_argument("--layer", type=nonneg_int, default=6, help="collect: the SAE's layer")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="collect: rows of 1024 tokens per forward")
    parser.add_argument("--l0", type=nonneg_int, default=0,
                        help="collect: set the biases for about this L0 (0: untrained)")
    parser.add_argument("--device", type=nonempty, default="cpu", help="collect: device")
    parser.add_argument("--n", type=positive_int, default=46_080, help="page: features in the index")
    parser.add_argument("--page_rows", type=positive_int, default=100, help="page: rows per page of the paged index")
    parser.add_argument("--repeat", type=positive_int, default=3,
                        help="runs: collect reports the fastest, page the median")
    one_line_errors(parser, "bench_features.py")
    args = parser.parse_args()
    if args.layer >= 12:  # the random GPT-2 small of collect
        parser.error(f"--layer {args.layer} is outside 0..11 (GPT-2 small's 12 layers)")
    if args.l0 >= args.ratio * 768:
        parser.error(f"--l0 {args.l0} must be below the SAE's {args.ratio * 768} features (--ratio {args.ratio} x 768)")
    os.makedirs(args.tmp, exist_ok=True)
    if args.what == "collect":
        collect(args.tmp, args.n_tokens, args.ratio, args.layer, args.batch_size, args.device, args.l0, args.repeat)
    else:
        page(args.tmp, args.n, args.page_rows, args.repeat)


if __name__ == "__main__":
    from cli import run
    run(main, "bench_features.py")
