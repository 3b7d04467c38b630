"""analysis.py: geometry on SAEs with known answers, the bootstrap, fronts, and the plots from real tiny runs."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import analysis
from analysis import bootstrap_diff, front, matching, nearest_cos, unit_rows
from conftest import ROOT, make_text
from sae import SAE, save_firing, save_sae
from test_train import tiny_args

ENV = dict(os.environ, OMP_NUM_THREADS="1")  # tiny models: threads only contend


def dense_nearest(U, V=None):
    S = U @ (U if V is None else V).T
    if V is None:
        S.fill_diagonal_(-float("inf"))
    return S.max(1).values, S.max(0).values


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_nearest_cos_equals_dense(chunk):
    torch.manual_seed(0)
    U, V = unit_rows(torch.randn(50, 8)), unit_rows(torch.randn(30, 8))
    w, none = nearest_cos(U, chunk=chunk)
    assert none is None and torch.allclose(w, dense_nearest(U)[0], atol=1e-6)
    a, b = nearest_cos(U, V, chunk=chunk)
    ra, rb = dense_nearest(U, V)
    assert torch.allclose(a, ra, atol=1e-6) and torch.allclose(b, rb, atol=1e-6)


def test_duplicated_decoder_columns_give_within_similarity_one():
    torch.manual_seed(0)
    sae = SAE(16, 40)
    with torch.no_grad():
        sae.decoder.weight[:, 20:] = 3 * sae.decoder.weight[:, :20]  # 20 pairs, different raw norms
    w, _ = nearest_cos(unit_rows(sae.dict_elements().T), chunk=9)
    assert torch.allclose(w, torch.ones(40), atol=1e-5)
    orth = unit_rows(torch.eye(16))
    assert torch.allclose(nearest_cos(orth)[0], torch.zeros(16))  # and orthogonal ones give 0


@pytest.mark.parametrize("cap", [64, 16])
def test_permuted_copy(cap):
    torch.manual_seed(0)
    A = unit_rows(torch.randn(64, 24))
    perm = torch.randperm(64)
    B = A[perm]                                  # B's feature k is A's feature perm[k]
    a, b = nearest_cos(A, B, chunk=10)
    assert torch.allclose(a, torch.ones(64), atol=1e-5) and torch.allclose(b, torch.ones(64), atol=1e-5)
    m = matching(A, B, cap=cap, chunk=10)
    assert m["mean"] == pytest.approx(1, abs=1e-5) and m["pairs"] == min(cap, 64) and m["exact"] == (cap >= 64)
    assert [perm[j].item() for j in m["rows_v"]] == m["rows_u"]  # each A feature matched to its own copy


def test_directional_metric_differs_from_matching():
    """PAPER.md's example: several features of A near one feature of B all score high A→B."""
    e = torch.eye(8)
    b = unit_rows(torch.stack([e[0], e[1], e[2]]))
    a = unit_rows(torch.stack([e[0] + 0.1 * e[5], e[0] + 0.1 * e[6], e[0] + 0.1 * e[7]]))
    a_to_b, b_to_a = nearest_cos(a, b)
    assert a_to_b.mean() > 0.99                                 # every A feature has a close B feature
    assert b_to_a.mean().item() == pytest.approx(a_to_b[0].item() / 3, abs=1e-6)  # but only one B feature is covered
    m = matching(a, b)
    assert m["exact"] and m["pairs"] == 3 and m["mean"] == pytest.approx(b_to_a.mean().item(), abs=1e-6)
    assert m["directional_mean"] - m["mean"] > 0.6


def test_bootstrap_diff_known_answer():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.5, 0.01, 2000), rng.normal(0.3, 0.01, 3000)
    r = bootstrap_diff(a, b, n_boot=2000)
    assert r["diff"] == pytest.approx(float(a.mean() - b.mean()))
    lo, hi = r["ci95"]
    se = np.sqrt(0.01 ** 2 / 2000 + 0.01 ** 2 / 3000)
    assert lo < r["diff"] < hi and 2 * 1.96 * se * 0.9 < hi - lo < 2 * 1.96 * se * 1.1  # a 95% interval
    same = bootstrap_diff(a, a, n_boot=200)
    assert same["diff"] == 0 and same["ci95"][0] < 0 < same["ci95"][1]


def test_front():
    xs, ys = [1, 2, 3, 4, 2.5], [5, 3, 4, 1, 3]
    assert front(xs, ys) == [0, 1, 3]  # (3, 4) is dominated by (2, 3); (2.5, 3) ties y with (2, 3)


def fake_run(path, loss, l0, ce, alive, **args):
    """A run folder with only sae.json (its loss, layer 6 and args) and an eval.jsonl whose last line counts."""
    os.makedirs(path)
    json.dump(dict(loss=loss, layer=6, args=args), open(os.path.join(path, "sae.json"), "w"))
    with open(os.path.join(path, "eval.jsonl"), "w") as f:
        f.write(json.dumps(dict(l0=99, ce_increase=9, alive=1)) + "\n")  # an earlier eval: ignored
        f.write(json.dumps(dict(l0=l0, ce_increase=ce, alive=alive)) + "\n")
    return str(path)


def test_pareto_fronts_per_kind(tmp_path):
    r1, r2, r3 = (fake_run(tmp_path / n, "local", *v) for n, v in (("r1", (10, 0.1, 100)), ("r2", (20, 0.05, 50)),
                                                                  ("r3", (30, 0.2, 200))))
    e1 = fake_run(tmp_path / "e1", "e2e", 5, 0.3, 10, ds_layers="all", local_frac=0.0, init_from=None)  # plain
    res = analysis.pareto([r1, r2, r3, e1])
    assert res["series"]["local"] == dict(loss="local", variant=False, runs=[r1, r2, r3], front_l0=[r1, r2],
                                          front_alive=[r3, r1, r2])
    assert list(res["series"]) == ["local", "e2e"] and res["series"]["e2e"]["front_l0"] == [e1]
    assert res["points"][0]["l0"] == 10
    rows = [line.split() for line in analysis.format_pareto(res).splitlines()]
    assert rows[0] == ["run", "series", "layer", "l0", "alive", "ce_increase", "front"]
    assert rows[1:5] == [[r1, "local", "6", "10.00", "100", "0.1000", "l0,", "alive"],
                         [r2, "local", "6", "20.00", "50", "0.0500", "l0,", "alive"],
                         [r3, "local", "6", "30.00", "200", "0.2000", "alive"], [e1, "e2e", "6", "5.00", "10", "0.3000", "l0,", "alive"]]


def test_pareto_l0_against_local_at_the_same_ce_increase(tmp_path):
    """The headline number: L0 over local's, local's log L0 interpolated along CE between its front's points;
    points outside local's CE range and points off their own front are left out."""
    local = [fake_run(tmp_path / f"local_{i}", "local", l0, ce, 100) for i, (l0, ce) in
             enumerate(((10, 0.4), (40, 0.1), (50, 0.3)))]  # (50, 0.3) is off the front
    ds = [fake_run(tmp_path / f"ds_{i}", "e2e_ds", l0, ce, 100) for i, (l0, ce) in
          enumerate(((5, 0.2), (4, 0.5), (20, 0.05), (8, 0.3)))]  # 0.5 and 0.05: outside; (8, 0.3): off the front
    res = analysis.pareto(local + ds)
    m = res["matched"]
    assert list(m) == ["e2e_ds"] and [q["run"] for q in m["e2e_ds"]["points"]] == [ds[0]]
    want = 5 / (40 * (10 / 40) ** (1 / 3))  # CE 0.2 is a third of the way from (40, 0.1) to (10, 0.4)
    assert m["e2e_ds"]["points"][0]["ratio"] == pytest.approx(want) and m["e2e_ds"]["ratio"] == pytest.approx(want)
    assert f"e2e_ds: {want:.2f}x local's L0 at the same CE increase" in analysis.format_pareto(res)
    assert analysis.pareto(ds)["matched"] == {}  # no local series: no ratio


def test_pareto_variants_are_their_own_series(tmp_path, capsys):
    """A fine-tuned run (--init_from) and ablations (--ds_layers, --local_frac) are series of their own, with their
    own fronts: the fine-tuned run, better than every plain e2e_ds run, takes none of them off the plain front."""
    plain = [fake_run(tmp_path / f"e2e_ds_l{i}", "e2e_ds", l0, ce, 300, ds_layers="all", local_frac=0.0)
             for i, (l0, ce) in enumerate(((5, 0.05), (3, 0.08)))]
    ft = fake_run(tmp_path / "ft", "e2e_ds", 2, 0.01, 310, init_from="/home/someone/out/local_L6", ds_layers="all")
    nxt = fake_run(tmp_path / "next", "e2e_ds", 6, 0.045, 310, ds_layers="next")
    mixed = fake_run(tmp_path / "mixed", "e2e_ds", 6.1, 0.046, 310, local_frac=0.5)
    far = fake_run(tmp_path / "local_far", "local", 5000, 3.0, 5)
    png = str(tmp_path / "p.png")
    analysis.main(["pareto", str(tmp_path / "*"), "--out", png, "--log", "--clip", "0.9", "--json"])  # a pattern
    res = json.loads(capsys.readouterr().out)
    assert {k: (v["runs"], v["variant"], v["front_l0"]) for k, v in res["series"].items()} == {
        "local": ([far], False, [far]), "e2e_ds": (plain, False, plain[::-1]),
        "e2e_ds (from local_L6)": ([ft], True, [ft]), "e2e_ds ds_layers=next": ([nxt], True, [nxt]),
        "e2e_ds local_frac=0.5": ([mixed], True, [mixed])}
    assert list(res["series"])[:2] == ["local", "e2e_ds"] and res["log"] and res["clip"] == 0.9
    assert {q["run"]: q["series"] for q in res["points"]}[ft] == "e2e_ds (from local_L6)"
    styles = analysis.series_styles(res["series"])
    assert len(set(styles.values())) == 5                                          # a colour and marker each
    import matplotlib.image
    assert matplotlib.image.imread(png).std() > 0.05
    for flags in (["--log"], ["--clip", "0.95"], []):
        os.remove(png)
        analysis.main(["pareto", str(tmp_path), "--out", png, *flags])
        assert os.path.getsize(png) > 10_000 and "e2e_ds ds_layers=next" in capsys.readouterr().out
    for argv, msg in ((["--clip", "0.3", "--out", png], "--clip must be in (0.5, 1], got 0.3"),
                      (["--clip", "2", "--out", png], "argument --clip: must be a number in [0, 1], got 2"),
                      (["--log"], "--log shapes the plot; give --out PLOT.png too")):
        with pytest.raises(SystemExit) as e:
            analysis.main(["pareto", str(tmp_path), *argv])
        assert str(e.value.code).startswith(f"analysis.py: error: {msg}"), e.value.code


def test_clip_moves_far_points_to_the_edge():
    lim = [analysis.clip_limits([1, 2, 3, 4, 1000], 0.75), None]
    assert lim[0][1] < 1000 and analysis.edge((1000, 0.5), lim) == ((lim[0][1], 0.5), ">")
    assert analysis.edge((2, 0.5), lim) == ((2, 0.5), None)
    lo, hi = analysis.clip_limits([1, 10, 100], 1.0, log=True)
    assert lo < 1 and hi > 100 and lo > 0.5                                        # 5% of the log range


def test_labels_of_close_points_do_not_overlap():
    plt = analysis._plt()
    fig, ax = plt.subplots()
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 10)
    xy = [(5, 5), (5.01, 5.01), (5, 5.02), (9.99, 5), (9.98, 5.01)]                 # a clump, two at the right edge
    ann = analysis.label_points(ax, xy, ["run_a", "run_b", "run_cc", "right_1", "right_2"])
    from matplotlib.text import Text
    r = fig.canvas.get_renderer()
    boxes = [Text.get_window_extent(a, r) for a in ann]                            # the text, not its line
    assert not any(boxes[i].overlaps(boxes[j]) for i in range(5) for j in range(i))
    assert all(b.x1 <= ax.bbox.x1 + 1 for b in boxes)                              # none past the right edge
    plt.close(fig)


def test_pattern_and_missing_runs_are_named(tmp_path):
    for argv, msg in ((["pareto", str(tmp_path / "*_L6")], f"no folder matches the pattern {str(tmp_path / '*_L6')!r}"),
                      (["downstream", str(tmp_path / "out" / "e2e_L6")],
                       f"{str(tmp_path / 'out' / 'e2e_L6')!r} does not exist")):
        with pytest.raises(SystemExit) as e:
            analysis.main(argv)
        assert str(e.value.code).startswith(f"analysis.py: error: {msg}") and "eval.jsonl" not in msg, e.value.code


def test_optional_packages_missing_is_one_line(tmp_path, monkeypatch, capsys):
    """scipy and matplotlib are optional: a command that needs a missing one says what to install, the others run,
    and importing analysis imports neither."""
    p = subprocess.run([sys.executable, "-c", "import analysis, sys; print(sorted({'scipy', 'matplotlib'} & set(sys.modules)))"],
                       capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)
    assert p.stdout.strip() == "[]", p.stdout + p.stderr
    run = fake_run(tmp_path / "r", "local", 10, 0.1, 100)
    torch.manual_seed(0)
    for name in ("a", "b"):
        save_sae(SAE(16, 20), str(tmp_path / name), dict(layer=1, model="gpt2", center=True, loss="local"))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    cases = (("matplotlib", ["pareto", run, "--out", str(tmp_path / "p.png")],
              "pareto --out (the plot) needs matplotlib: pip install matplotlib, or leave out --out", ["pareto", run]),
             ("matplotlib", ["geometry", a, "--out", str(tmp_path / "g.png")], "geometry --out (the plot) needs matplotlib",
              ["geometry", a]),
             ("scipy", ["geometry", a, b], "geometry of two SAEs (the one-to-one matching) needs scipy: pip install scipy",
              ["geometry", a]),
             ("scipy", ["seeds", a, b], "seeds (the one-to-one matching and the t-interval) needs scipy: pip install scipy",
              ["pareto", run, "--out", str(tmp_path / "p.png")]))
    for name, argv, msg, fine in cases:
        with monkeypatch.context() as m:
            m.setitem(sys.modules, name, None)                                     # import name fails
            with pytest.raises(SystemExit) as e:
                analysis.main(argv)
            assert str(e.value.code).startswith(f"analysis.py: error: {msg}"), e.value.code
            analysis.main(fine)                                                    # what does not need it runs
    assert os.path.getsize(tmp_path / "p.png") > 10_000 and not os.path.exists(tmp_path / "g.png")


def test_geometry_on_run_folders(tmp_path):
    torch.manual_seed(0)
    sae = SAE(16, 40)
    with torch.no_grad():
        sae.decoder.weight[:, 20:] = sae.decoder.weight[:, :20]
    cfg = dict(layer=1, model="gpt2", center=True, loss="local")
    save_sae(sae, str(tmp_path / "a"), cfg)
    perm = torch.randperm(40)
    copy = SAE(16, 40)
    copy.load_state_dict({k: v[perm] if k.startswith("encoder") else (v[:, perm] if v.dim() == 2 else v)
                          for k, v in sae.state_dict().items()})
    save_sae(copy, str(tmp_path / "b"), dict(cfg, loss="e2e"))
    freq = torch.ones(40, dtype=torch.float64)
    freq[perm[:5]] = 0                                             # 5 dead features in b
    save_firing(str(tmp_path / "b"), freq, 1000)
    res, dirs = analysis.geometry(str(tmp_path / "a"), str(tmp_path / "b"), n_boot=50)
    ra, rb = res["runs"]["A"], res["runs"]["B"]
    assert (ra["alive"], rb["alive"]) == (40, 35) and "all features" in ra["alive_from"] and "saved" in rb["alive_from"]
    dec = res["decoder"]
    assert dec["within"]["A"]["mean"] == pytest.approx(1, abs=1e-5)  # duplicated columns
    assert dec["cross"]["B_to_A"]["mean"] == pytest.approx(1, abs=1e-5)  # a copy: every B feature is in A
    assert dec["cross"]["matching"]["mean"] == pytest.approx(1, abs=1e-5) and dec["cross"]["matching"]["pairs"] == 35
    assert sum(dec["within"]["B"]["hist"]["counts"]) == 35 and res["match_cap"] == 4096
    assert set(res["encoder"]["cross"]) == {"A_to_B", "B_to_A", "matching"} and dirs["B"]["encoder"].shape == (35, 16)


def test_geometry_table_and_json(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = dict(layer=1, model="gpt2", center=True)
    save_sae(SAE(16, 40), str(tmp_path / "a"), dict(cfg, loss="local"))
    save_sae(SAE(16, 30), str(tmp_path / "b"), dict(cfg, loss="e2e"))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    analysis.main(["geometry", a, b, "--n_boot", "50", "--match_cap", "20", "--json"])
    res = json.loads(capsys.readouterr().out)  # --json: every number, one object
    analysis.main(["geometry", a, b, "--n_boot", "50", "--match_cap", "20"])
    text = capsys.readouterr().out
    assert text.splitlines()[0] == f"A  {a}: local, layer 1, 40/40 alive (all features (no saved firing frequencies))"
    rows = {c[0]: c[1:] for c in (re.split(r"\s{2,}", line.strip()) for line in text.splitlines()[2:])}  # label: values
    dec, enc = res["decoder"], res["encoder"]
    assert rows["within A (nearest other feature of A)"] == [f"{dec['within']['A']['mean']:.4f}", f"{enc['within']['A']['mean']:.4f}"]
    assert rows["within B (nearest other feature of B)"] == [f"{dec['within']['B']['mean']:.4f}", f"{enc['within']['B']['mean']:.4f}"]
    assert rows["A→B (each A feature's nearest in B)"] == [f"{dec['cross']['A_to_B']['mean']:.4f}", f"{enc['cross']['A_to_B']['mean']:.4f}"]
    assert rows["B→A (each B feature's nearest in A)"] == [f"{dec['cross']['B_to_A']['mean']:.4f}", f"{enc['cross']['B_to_A']['mean']:.4f}"]
    assert rows["one-to-one matching (subset, 20 pairs)"] == [f"{dec['cross']['matching']['mean']:.4f}",
                                                              f"{enc['cross']['matching']['mean']:.4f}"]
    d, e = dec["within_diff_A_minus_B"], enc["within_diff_A_minus_B"]
    assert rows["within A − within B"] == [f"{d['diff']:+.4f}", f"{e['diff']:+.4f}"]
    assert rows["95% CI (50 bootstrap resamples)"] == [f"[{d['ci95'][0]:+.4f}, {d['ci95'][1]:+.4f}]",
                                                       f"[{e['ci95'][0]:+.4f}, {e['ci95'][1]:+.4f}]"]
    assert d["ci95"][0] < d["diff"] < d["ci95"][1] and len(set(rows)) == 8
    analysis.main(["geometry", a])  # one SAE: its within row only
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[2].split()[-2:] == [f"{dec['within']['A']['mean']:.4f}", f"{enc['within']['A']['mean']:.4f}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, text_file):
    """Three short runs on the tiny model, one per loss kind, trained side by side."""
    tmp = tmp_path_factory.mktemp("runs")
    outs = {loss: str(tmp / loss) for loss in ("local", "e2e", "e2e_ds")}
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"),
                               *map(str, tiny_args(tiny_model_dir, text_file, out, loss, n_samples=16, eval_every=16,
                                                   eval_samples=4, log_every=100))],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for loss, out in outs.items()]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, out + err
    return outs


def test_pareto_png_and_json(runs, tmp_path):
    png = str(tmp_path / "pareto.png")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "analysis.py"), "pareto", *runs.values(), "--out", png, "--json"],
                       capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert list(res["series"]) == ["local", "e2e", "e2e_ds"] and res["out"] == png
    for pt in res["points"]:
        last = json.loads(open(os.path.join(pt["run"], "eval.jsonl")).read().splitlines()[-1])
        assert (pt["l0"], pt["alive"], pt["ce_increase"]) == (last["l0"], last["alive"], last["ce_increase"])
    import matplotlib.image
    img = matplotlib.image.imread(png)
    assert img.shape[:2] == (540, 1320) and img.std() > 0.05  # drawn on, not blank


def test_downstream_and_errors(runs, tmp_path, capsys):
    png = str(tmp_path / "ds.png")
    res = analysis.downstream(list(runs.values()), png)
    assert os.path.getsize(png) > 10_000
    for r in res["runs"]:
        last = json.loads(open(os.path.join(r["run"], "eval.jsonl")).read().splitlines()[-1])
        assert r["layers"] == ["1", "2", "final"]
        assert r["mse"] == [last["mse"], last["downstream_mse"][0], last["final_mse"]]
    analysis.main(["downstream", *runs.values()])
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["MSE", "at", "layer", "1", "2", "final"]
    assert rows[1:] == [[r["run"], f"({r['loss']})", *(f"{v:.4g}" for v in r["mse"])] for r in res["runs"]]
    analysis.main(["downstream", *runs.values(), "--json"])
    assert json.loads(capsys.readouterr().out)["runs"] == res["runs"]
    for argv, words in ((["pareto", str(tmp_path)], ["eval.jsonl"]),
                        (["downstream", runs["local"], "--out", "x.pdf"], ["x.pdf", ".png"]),
                        (["geometry", runs["local"], "--match_cap", "0"], ["--match_cap", "> 0"]),
                        (["geometry", str(tmp_path / "missing")], ["missing", "does not exist"])):
        with pytest.raises(SystemExit) as e:
            analysis.main(argv)
        msg = str(e.value.code)
        assert msg.startswith("analysis.py: error:") and "\n" not in msg and all(w in msg for w in words), msg


def test_progress_of_evaluations_on_trained_runs(runs, tmp_path, capsys):
    """eval.py and geometry --alive_from eval on trained run folders say on stderr how far they are."""
    other = tmp_path / "other.txt"  # another dataset, so alive has extra rows past the run's own data
    other.write_text(make_text(3000, seed=1))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), runs["e2e"], "--dataset", str(other),
                        "--alive_tokens", "640", "--batch_size", "2", "--data_dir", str(tmp_path / "cache"), "--json"],
                       capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["alive_tokens"] == 640  # 4 eval rows (2 batches) + 16 extra rows (8 batches) of 32
    for pattern in (r"eval\.py: metrics 1/2 batches \| \d+s \| eta \d+s", r"eval\.py: metrics 2/2 batches \| \d+s \| eta 0s",
                    r"eval\.py: alive 1/8 batches \| \d+s \| eta \d+s", r"eval\.py: alive 8/8 batches \| \d+s \| eta 0s"):
        assert re.search(f"^{pattern}$", p.stderr, re.M), (pattern, p.stderr)
    analysis.main(["geometry", runs["local"], runs["e2e"], "--alive_from", "eval", "--n_boot", "20", "--json"])
    out, err = capsys.readouterr()
    assert json.loads(out)["runs"]["A"]["alive_from"].startswith("eval: fired on 128 tokens")
    for run in (runs["local"], runs["e2e"]):  # 4 eval rows in 1 batch of 8; the run's local data has no more
        assert re.search(f"^analysis\\.py: alive {re.escape(run)} 1/1 batches \\| \\d+s \\| eta 0s$", err, re.M), err
