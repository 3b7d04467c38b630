"""features.py: the collection against brute force on a tiny model, and the site in headless Chromium (a
dataset holding <script> shows it as text), one source and two compared."""
import html
import json
import math
import os
import re
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

import features
from bench_features import chromium
from conftest import ROOT, make_text
from model import GPT
from sae import SAE, load_sae, save_sae
from test_train import tiny_args

ENV = dict(os.environ, OMP_NUM_THREADS="1")
XSS = "<script>alert(1)</script>"


def tiny_sae(d=32, n_dict=64, seed=0):
    torch.manual_seed(seed)
    sae = SAE(d, n_dict)
    with torch.no_grad():
        sae.encoder.bias[:5] = -10                    # dead
        sae.encoder.bias[5:20] -= 0.2                 # rare
    return sae


@pytest.mark.parametrize("batch_size,chunk", [(3, 2 ** 22), (4, 16 * 64 * 2), (3, 5 * 64)])
def test_collect_equals_brute_force(tiny_model_dir, batch_size, chunk):
    """Whole batches, two rows per slice, and 5 tokens of one row per slice give the brute-force answer."""
    model, sae = GPT.from_pretrained(tiny_model_dir), tiny_sae()
    rows = np.random.default_rng(0).integers(0, 50257, size=(11, 16)).astype(np.uint16)
    k, before, after = 4, 3, 2
    st = features.collect(model, sae, 1, rows, k=k, before=before, after=after, batch_size=batch_size, chunk=chunk)
    with torch.no_grad():
        c = sae.encode(model.forward_to_layer(torch.from_numpy(rows.astype(np.int64)), 1))    # (11, 16, F)
    assert st["tokens"] == 11 * 16
    assert torch.equal(st["counts"], (c > 0).sum((0, 1)))
    rmax, rpos = c.max(1)                                                              # (11, F)
    dead = 0
    for f in range(sae.n_dict):
        fired = (rmax[:, f] > 0).nonzero().squeeze(1)
        want = fired[rmax[fired, f].argsort(descending=True)][:k]                      # top rows, descending
        n = len(want)
        dead += n == 0
        assert st["row"][:n, f].tolist() == want.tolist() and (st["row"][n:, f] == -1).all()
        assert torch.allclose(st["val"][:n, f], rmax[want, f]) and (st["val"][n:, f] == 0).all()
        assert st["pos"][:n, f].tolist() == rpos[want, f].tolist()
        for j, (r, p) in enumerate(zip(want.tolist(), rpos[want, f].tolist())):
            ref = torch.tensor([c[r, q, f].item() if 0 <= q < 16 else float("nan")
                                for q in range(p - before, p + after + 1)])
            assert torch.allclose(st["win"][j, f], ref, atol=1e-6, equal_nan=True)
        v = c[..., f][c[..., f] > 0]
        if n == 0:
            assert st["hi"][f] == 0 and st["hist"][f].sum() == 0
            continue
        hi = st["hi"][f].item()
        assert hi / 2 <= v.max() < hi and math.log2(hi) == round(math.log2(hi))      # smallest power of two above
        ref = torch.bincount((v * features.BINS / hi).long(), minlength=features.BINS)
        assert torch.equal(st["hist"][f], ref)                                         # exact, after re-binning
        q = features.quantiles(st["hist"][f:f + 1], st["hi"][f:f + 1])[0]
        srt = v.sort().values
        for qq, est in zip(features.QUANTILES, q.tolist()):
            assert abs(est - srt[math.ceil(qq * len(v)) - 1].item()) <= hi / features.BINS + 1e-7
    assert 5 <= dead < sae.n_dict - 10                                                 # dead, rare and common ones


def test_hist_rebins_exactly():
    hist, hi = torch.zeros(2, features.BINS, dtype=torch.long), torch.zeros(2)
    vals = [0.3, 0.01, 5.0, 0.7, 100.0, 3.3, 0.0]
    for v in vals:
        features.add_hist(hist, hi, torch.tensor([[v, 0.0]]))
    assert hi.tolist() == [128.0, 0.0]                                                 # 100 < 2^7
    ref = torch.bincount((torch.tensor(vals[:-1]) * features.BINS / 128).long(), minlength=features.BINS)
    assert torch.equal(hist[0], ref) and hist[1].sum() == 0


def test_output_effect_is_the_logit_lens_of_the_decoder(tiny_model_dir):
    model, sae = GPT.from_pretrained(tiny_model_dir), tiny_sae()
    ids_p, val_p, ids_s, val_s = features.output_effect(model, sae, n=5, chunk=7)
    with torch.no_grad():
        e = (model.lm_head.weight @ (model.transformer.ln_f.weight[:, None] * sae.dict_elements())).T  # (F, V)
    assert torch.equal(ids_p, e.topk(5, dim=1).indices) and torch.allclose(val_p, e.topk(5, dim=1).values)
    assert torch.equal(ids_s, (-e).topk(5, dim=1).indices) and torch.allclose(val_s, -(-e).topk(5, dim=1).values)


# ----------------------------------------------------------------------------- the site in a browser

class Dom(HTMLParser):
    """Elements of a dumped DOM: (tag, attrs, text inside)."""

    def __init__(self, text):
        super().__init__()
        self.open, self.elements = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag not in ("meta", "br", "img", "input"):
            self.open.append((tag, dict(attrs), []))

    def handle_endtag(self, tag):
        while self.open:
            el = self.open.pop()
            self.elements.append((el[0], el[1], "".join(el[2])))
            if self.open:
                self.open[-1][2].append("".join(el[2]))
            if el[0] == tag:
                break

    def handle_data(self, data):
        if self.open:
            self.open[-1][2].append(data)

    def find(self, tag=None, **attrs):
        """Elements with that tag and attributes (data_feature=True: present; class_="x": equal)."""
        attrs = {k.rstrip("_").replace("_", "-"): v for k, v in attrs.items()}
        return [e for e in self.elements if (tag is None or e[0] == tag)
                and all(e[1].get(k) == v or (v is True and k in e[1]) for k, v in attrs.items())]


def run_features(*args):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "features.py"), *map(str, args)], capture_output=True,
                       text=True, cwd=ROOT, env=ENV, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return p


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir, text_file):
    """A short local run on the tiny model, and a dataset of other text with a <script> in every document."""
    tmp = tmp_path_factory.mktemp("feat")
    out = str(tmp / "local")
    subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *map(str, tiny_args(
        tiny_model_dir, text_file, out, "local", n_samples=16, eval_every=16, eval_samples=4, log_every=100))],
        cwd=ROOT, env=ENV, capture_output=True, timeout=300, check=True)
    data = tmp / "docs.jsonl"
    with open(data, "w") as f:
        for i in range(40):
            f.write(json.dumps({"text": make_text(30, seed=100 + i) + f" {XSS} " + make_text(10, seed=200 + i)}) + "\n")
    return out, str(data), str(tmp)


def test_site_in_headless_chromium(tiny_run, tmp_path):
    run, data, _ = tiny_run
    out = str(tmp_path / "site")
    p = run_features(run, "--dataset", data, "--n_tokens", 1000, "--k", 5, "--page_rows", 40, "--out", out,
                     "--data_dir", str(tmp_path / "cache"), "--device", "cpu")
    assert re.search(r"1,024 tokens in [\d.]+s, [\d,]+ tokens/s \| alive \d+/128", p.stdout), p.stdout
    meta = json.load(open(os.path.join(out, "site.json")))
    assert meta["tokens"] == 1024 and meta["n_dict"] == 128 and 40 < meta["alive"] < 128     # some dead, more shown
    index = Dom(chromium("file://" + os.path.join(out, "index.html"), screenshot=str(tmp_path / "index.png")))
    rows = index.find("tr", data_feature=True)
    assert len(rows) == 40 and "page 1 of" in index.elements[-1][2]                     # one page of rows
    first = int(rows[0][1]["data-feature"])
    assert rows[0][2].startswith(f"#{first}") and index.find("a", href=f"f/0000.html#{first}")
    assert re.search(rf"dead features \({128 - meta['alive']}\)", index.elements[-1][2])
    data = json.loads(re.search(r'id="data">(.*?)</script>', open(os.path.join(out, "index.html")).read()).group(1))
    by_max = Dom(chromium("file://" + os.path.join(out, "index.html#sort=2"))).find("tr", data_feature=True)
    want = [r[0] for r in sorted(data["rows"], key=lambda r: -r[2])][:40]                # a stable sort by max
    assert [int(r[1]["data-feature"]) for r in by_max] == want != [int(r[1]["data-feature"]) for r in rows]
    blob = re.search(r'id="data">(.*?)</script>', open(os.path.join(out, "f", "0000.html")).read()).group(1)
    assert "<" not in blob and XSS not in blob                                          # escaped in the file
    shown = [f["id"] for f in json.loads(blob)["features"] if any(XSS in "".join(c["t"]) for c in f["ctx"])]
    assert shown, "no feature's contexts hold the whole <script> document"
    dom = chromium(f"file://{out}/f/0000.html#{shown[0]}", screenshot=str(tmp_path / "feature.png"))
    view = Dom(dom)
    ctxs = view.find("div", class_="ctx")
    assert 1 <= len(ctxs) <= 5 and view.find("div", data_feature=str(shown[0]))
    assert any(XSS in c[2] for c in ctxs)                                               # shown as text
    scripts = view.find("script")
    assert len(scripts) == 2 and not any(s[2].strip() == "alert(1)" for s in scripts)    # the data and the app
    assert "<script>alert" not in dom                                                   # only as &lt;script&gt;
    assert os.path.getsize(tmp_path / "feature.png") > 5000 and os.path.getsize(tmp_path / "index.png") > 5000


def site_files(out):
    """{path: text} of every file of a site."""
    return {os.path.join(d, n): open(os.path.join(d, n), encoding="utf-8").read()
            for d, _, names in os.walk(out) for n in names}


def test_progress_notes_and_names_on_a_local_run(tiny_run, tiny_model_dir, tmp_path):
    """On the run's own local file (no --dataset): progress with an ETA on stderr, one note that names only real
    flags and says how many tokens there were and how to get more, stdout only the results, and pages that name
    the run, model and dataset without the user's folders."""
    run, _, _ = tiny_run
    out = str(tmp_path / "site")
    p = run_features(run, "--n_tokens", 1000, "--k", 3, "--batch_size", 2, "--out", out, "--device", "cpu")
    for pattern in (rf"features\.py: collect {re.escape(run)} 1/2 batches \| \d+s \| eta \d+s",
                    rf"features\.py: collect {re.escape(run)} 2/2 batches \| \d+s \| eta 0s"):
        assert re.search(f"^{pattern}$", p.stderr, re.M), (pattern, p.stderr)
    notes = [line for line in p.stderr.splitlines() if "note" in line]
    assert notes == [f"features.py: note: {run}: collected over 128 tokens, not the --n_tokens 1,000 asked for: the run "
                     f"trained on the local file {json.load(open(os.path.join(run, 'sae.json')))['args']['dataset']!r}, "
                     "all of it in its training pool but its 4 held-out eval rows; --dataset OTHER_FILE gives more "
                     "held-out text"], p.stderr
    flags = {o for a in features.build_parser()._actions for o in a.option_strings}
    assert set(re.findall(r"--\w+", p.stderr)) <= flags, p.stderr
    lines = p.stdout.splitlines()                                                       # results only
    assert len(lines) == 2 and lines[0].startswith(f"{run}: 128 tokens in ") and lines[1] == f"site: {out}/index.html"
    base = os.path.commonpath([run, tiny_model_dir])                                    # pytest's temp root
    assert not [f for f, text in site_files(out).items() if base in text]
    meta = json.load(open(os.path.join(out, "site.json")))
    assert (meta["title"], meta["source"], meta["model"], meta["dataset"]) == (
        "local", "local", os.path.basename(tiny_model_dir), "input.txt")
    assert "<title>local</title>" in open(os.path.join(out, "index.html")).read()


def test_every_flag_in_features_messages_exists():
    """Every --flag that features.py's source names (messages, notes, help, docstring) is one of its flags."""
    flags = {o for a in features.build_parser()._actions for o in a.option_strings}
    named = set(re.findall(r"--[a-z][a-z_]*", open(os.path.join(ROOT, "features.py")).read()))
    assert named and named <= flags, named - flags


def test_pages_progress_once_writing_takes_long(tiny_run, tmp_path, monkeypatch, capsys):
    run, data, _ = tiny_run
    argv = [run, "--dataset", data, "--n_tokens", "256", "--k", "2", "--out", str(tmp_path / "site"),
            "--data_dir", str(tmp_path / "cache"), "--device", "cpu"]
    monkeypatch.setattr(features, "PAGES_QUIET_S", 0.0)
    features.main(argv)
    out, err = capsys.readouterr()
    assert re.search(r"^features\.py: writing the pages of \d+ features, 1/1 batches \| \d+s \| eta 0s$", err, re.M), err
    assert "batches" not in out and "eta" not in out
    monkeypatch.setattr(features, "PAGES_QUIET_S", 1e9)                                  # a quick site: no line
    features.main(argv)
    assert "writing the pages" not in capsys.readouterr().err


def test_compare_without_scipy_is_one_line(tiny_run, tmp_path, monkeypatch):
    run, _, _ = tiny_run
    monkeypatch.setitem(sys.modules, "scipy", None)
    with pytest.raises(SystemExit) as e:
        features.main([run, "--compare", run, "--out", str(tmp_path / "site")])
    assert str(e.value.code) == "features.py: error: --compare (its one-to-one matching) needs scipy: pip install scipy"
    assert not os.path.exists(tmp_path / "site")


def test_contexts_align_on_their_maximum(tiny_run, tmp_path):
    """In Chromium, the maximum token of every context row of a feature starts at one x position, whatever the
    length of the text before it (as in Neuronpedia or SAE-Vis: the maxima read down one column)."""
    run, data, _ = tiny_run
    out = str(tmp_path / "site")
    run_features(run, "--dataset", data, "--n_tokens", 1000, "--k", 5, "--out", out,
                 "--data_dir", str(tmp_path / "cache"), "--device", "cpu")
    text = open(os.path.join(out, "f", "0000.html"), encoding="utf-8").read()
    feats = json.loads(re.search(r'id="data">(.*?)</script>', text).group(1))["features"]
    f = max(feats, key=lambda f: len({len("".join(c["t"][:c["m"]])) for c in f["ctx"]}))  # the most ragged rows
    lefts = {len("".join(c["t"][:c["m"]])) for c in f["ctx"]}
    assert len(lefts) >= 3 and 0 < max(lefts) <= 60, lefts
    probe = ('<script>document.documentElement.dataset.maxX = JSON.stringify([...document.querySelectorAll('
             '".ctx .max")].map(e => e.getBoundingClientRect().left));</script></body>')       # after the app ran
    with open(os.path.join(out, "f", "probe.html"), "w", encoding="utf-8") as fh:
        fh.write(text.replace("</body>", probe))
    dom = chromium(f"file://{out}/f/probe.html#{f['id']}")
    xs = json.loads(html.unescape(re.search(r'data-max-x="([^"]*)"', dom).group(1)))
    assert len(xs) == len(f["ctx"]) and max(xs) - min(xs) < 0.5, xs
    view = Dom(dom)
    rows = view.find("div", class_="ctx")
    assert [r[2] for r in rows] == ["".join(c["t"]) for c in f["ctx"]]                 # every token, in order, as text
    assert [m[2] for m in view.find("span", class_="max")] == [c["t"][c["m"]] for c in f["ctx"]]


def test_hostile_text_stays_text(tmp_path):
    """Tokens and names that would close the data <script> or open elements are shown as text, in Chromium."""
    bad = ["</script><script>alert(1)</script>", "<img src=x onerror=alert(2)>", "&lt;b&gt;", "</"]
    f = dict(id=3, freq=0.5, n=10, max=2.0, q=[1, 1.5, 2], hi=2.0, hist=[1] * features.BINS,
             pro=[[t, 1.0] for t in bad], sup=[[t, -1.0] for t in bad],
             ctx=[dict(row=0, pos=1, m=1, t=bad, a=[0.5, 2.0, 1.0, None])])
    features.page(str(tmp_path / "f" / "0000.html"), bad[0],
                  dict(kind="features", meta=dict(tokens=10), features=[f], per=256))
    dom = chromium(f"file://{tmp_path}/f/0000.html#3")
    view = Dom(dom)
    assert len(view.find("script")) == 2 and not view.find("img") and not view.find("b")
    assert view.find("title")[0][2] == bad[0]
    assert [c[2] for c in view.find("div", class_="ctx")] == ["".join(bad)]
    assert sum(t[2] in bad for t in view.find("span", class_="tok")) == 2 * len(bad)


def test_compare_pairs_a_permuted_copy(tiny_run, tmp_path):
    """B holds A's features permuted plus 8 new ones: each alive A feature pairs with its copy (cosines 1, the
    same contexts) and B's new alive features are its unmatched ones."""
    run, data, _ = tiny_run
    sae, cfg = load_sae(run)
    perm = torch.randperm(128, generator=torch.Generator().manual_seed(0))
    extra = SAE(32, 8)
    sd, ex = sae.state_dict(), extra.state_dict()
    b = SAE(32, 136)
    b.load_state_dict({"encoder.weight": torch.cat([sd["encoder.weight"][perm], ex["encoder.weight"]]),
                       "encoder.bias": torch.cat([sd["encoder.bias"][perm], ex["encoder.bias"]]),
                       "decoder.weight": torch.cat([sd["decoder.weight"][:, perm], ex["decoder.weight"]], 1),
                       "decoder.bias": sd["decoder.bias"]})
    save_sae(b, str(tmp_path / "b"), {k: v for k, v in cfg.items() if k not in ("d", "n_dict")})
    out = str(tmp_path / "cmp")
    run_features(run, "--compare", tmp_path / "b", "--dataset", data, "--n_tokens", 512, "--k", 3, "--out", out,
                 "--data_dir", str(tmp_path / "cache"), "--device", "cpu")
    info = json.load(open(os.path.join(out, "site.json")))
    m, alive_a, alive_b = info["matching"], info["a"]["alive"], info["b"]["alive"]
    assert m["pairs"] == alive_a and m["exact"] and m["mean"] == pytest.approx(1, abs=1e-5)
    dom = Dom(chromium(f"file://{out}/index.html"))
    rows = dom.find("tr", data_pair=True)
    assert len(rows) == min(100, alive_a)
    inv = {int(p): i for i, p in enumerate(perm)}                                       # A's i is B's inv[i]
    for _, attrs, text in rows:
        a = int(attrs["data-feature"])
        assert text.startswith(f"#{attrs['data-pair']}{a}{inv[a]}11")                    # pair, A, B, both cosines 1
    assert re.search(rf"unmatched alive features of B \({alive_b - alive_a}\)", dom.elements[-1][2])
    view = Dom(chromium(f"file://{out}/p/0000.html#0"))
    boxes = view.find("div", class_="feature")
    assert len(boxes) == 2 and boxes[0][2].split("maximum)")[1] == boxes[1][2].split("maximum)")[1]   # same contexts
    assert os.path.isfile(os.path.join(out, "a", "index.html")) and os.path.isfile(os.path.join(out, "b", "index.html"))
    assert not [f for f, text in site_files(out).items() if str(tmp_path) in text or os.path.dirname(run) in text]
    assert view.find("title")[0][2] == "pairs 0-255" and dom.find("title")[0][2] == "local vs b"   # folders' names


def test_bad_input_one_line(tiny_run, tmp_path, capsys):
    run, data, _ = tiny_run
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    for argv, words in (([run, "--n_tokens", "0"], ["--n_tokens", "> 0", "got 0"]),
                        ([run, "--k", "0"], ["--k", "> 0"]),
                        ([run, "--before", "-1"], ["--before", ">= 0"]),
                        ([run, "--out", str(tmp_path / "file")], ["file", "folder"]),
                        ([run, "--out", str(tmp_path / "full")], ["full", "other files"]),
                        ([str(tmp_path), "--compare", run], [str(tmp_path), "no saved SAE", "run folder"]),
                        ([run, "--device", "tpu"], ["tpu", "cpu, cuda"]),
                        ([run, "--n_tokens", "many"], ["--n_tokens", "many"])):
        argv = argv if "--out" in argv else argv + ["--out", str(tmp_path / "site")]
        with pytest.raises(SystemExit) as e:
            features.main(argv)
        msg = str(e.value.code)
        assert msg.startswith("features.py: error:") and "\n" not in msg and all(w in msg for w in words), msg
    with pytest.raises(SystemExit) as e:
        features.main(["--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())                                     # unwrapped
    for opt in ("--n_tokens", "--k", "--before", "--after", "--n_logits", "--match_cap", "--page_rows", "--batch_size",
                "--chunk", "--device", "--compare", "--dataset"):
        assert opt in text
    assert text.count("(default:") == 15 and "(default: 1000000)" in text                # every option but --out
