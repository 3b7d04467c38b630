"""eval.py: alive over extra held-out rows, the JSON it prints, and evaluating Apollo / SAELens sources."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import eval as ev
from conftest import ROOT
from interop import load_firing, write_saelens
from model import GPT

D_TINY = 32  # conftest's tiny GPT-2: 3 layers, d 32, context 64


def fake_rows(monkeypatch, total, ctx):
    """data.load_rows replaced by rows whose first token is the row index; records what was asked."""
    asked = []

    def load_rows(source, c, n_rows=None, cache_dir=None):
        asked.append(n_rows)
        rows = np.repeat(np.arange(total, dtype=np.uint16)[:, None], c, axis=1)
        return rows if n_rows is None or os.path.exists(source) else rows[:n_rows]
    monkeypatch.setattr(data, "load_rows", load_rows)
    return asked


RUN = dict(dataset="org/hub-dataset", ctx=4, eval_samples=3, n_samples=10)


def test_extra_rows_for_a_hub_run_are_never_trained_on(monkeypatch):
    asked = fake_rows(monkeypatch, 100, 4)
    ev_rows, extra, held_out, notes = ev.plan_rows(dict(args=RUN), "org/hub-dataset", 4, 3, 4 * 8, None)
    assert ev_rows[:, 0].tolist() == [0, 1, 2] and held_out is True and notes == []
    assert extra[:, 0].tolist() == [13, 14, 15, 16, 17]  # past the 3 + 10 rows training streamed
    assert asked == [18]


def test_extra_rows_other_cases(monkeypatch, tmp_path):
    fake_rows(monkeypatch, 20, 4)
    # trained elsewhere: the next rows, held-out status unknown
    ev_rows, extra, held_out, notes = ev.plan_rows(dict(args=dict(dataset="x", ctx=4)), "x", 4, 3, 4 * 6, None)
    assert extra[:, 0].tolist() == [3, 4, 5] and held_out is None and "unknown" in notes[0]
    # more eval rows than the run held out: said so
    _, _, held_out, notes = ev.plan_rows(dict(args=RUN), "org/hub-dataset", 4, 5, 0, None)
    assert held_out is False and "beyond the first 3" in notes[0]
    # the data runs out: alive over fewer tokens, said so
    _, extra, _, notes = ev.plan_rows(dict(args=RUN), "org/hub-dataset", 4, 3, 4 * 100, None)
    assert extra[:, 0].tolist() == list(range(13, 20)) and "alive counted over 40 tokens" in notes[-1]
    # a local file was wholly in the training pool: no extra rows
    local = tmp_path / "local.txt"
    local.write_text("x")
    _, extra, held_out, notes = ev.plan_rows(dict(args=dict(RUN, dataset=str(local))), str(local), 4, 3, 4 * 6, None)
    assert len(extra) == 0 and held_out is True and "training pool" in notes[-1]


def test_count_firing_matches_evaluate(tiny_model_dir, capsys):
    from sae import SAE
    torch.manual_seed(0)
    model = GPT.from_pretrained(tiny_model_dir)
    sae = SAE(D_TINY, 64)
    idx = torch.randint(0, 50257, (3, 2, 16))
    m, counts = ev.evaluate(model, sae, 1, iter(idx), return_counts=True)
    c2, tokens = ev.count_firing(model, sae, 1, iter(idx))
    assert torch.equal(counts.cpu(), c2) and tokens == m["alive_tokens"] == 96
    assert m["alive"] == int((c2 > 0).sum()) and m["l0"] > 0
    assert m["layer"] == 1 and m["downstream_layers"] == [2] and len(m["downstream_mse"]) == 1
    assert capsys.readouterr().err == ""  # no progress= (as train.py calls them): silent
    ev.evaluate(model, sae, 1, iter(idx), progress=ev.progress_printer("eval.py: metrics", 3))
    ev.count_firing(model, sae, 1, iter(idx), progress=ev.progress_printer("eval.py: alive", 3))
    err = capsys.readouterr().err.splitlines()
    assert [line.split(" |")[0] for line in err] == [f"eval.py: {k} {i}/3 batches" for k in ("metrics", "alive")
                                                     for i in (1, 2, 3)]


def test_progress_printer(monkeypatch, capsys):
    clock = iter([100.0] + [100.0 + 2 * k for k in range(1, 51)] + [400.0])  # 2 s a batch, then a slow one
    monkeypatch.setattr(ev.time, "time", lambda: next(clock))
    tick = ev.progress_printer("eval.py: alive", 51)
    for done in range(1, 52):
        tick(done)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "eval.py: alive 6/51 batches | 12s | eta 1m30s"         # the first tenth: 12 s × 45 / 6
    assert lines[1] == "eval.py: alive 11/51 batches | 22s | eta 1m20s"
    assert len(lines) == 10 and lines[-1] == "eval.py: alive 51/51 batches | 5m00s | eta 0s"
    clock = iter([0.0, 1.0, 31.0, 32.0, 62.0])
    tick = ev.progress_printer("x", 1000)                                     # no tenth reached: every 30 s
    for done in range(1, 5):
        tick(done)
    assert capsys.readouterr().err.splitlines() == ["x 2/1000 batches | 31s | eta 4h17m",
                                                      "x 4/1000 batches | 1m02s | eta 4h17m"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_model_dir):
    """One SAE for the tiny model at layer 1 as an Apollo .pt + .yaml, and the same SAE as a SAELens folder."""
    import interop
    tmp = tmp_path_factory.mktemp("sources")
    pt = str(tmp / "e2e_similar_ce_layer_1.pt")
    torch.manual_seed(0)
    P = "blocks-1-hook_resid_pre"
    W_d = torch.randn(D_TINY, 96) * 0.3
    torch.save({f"{P}.encoder.0.weight": torch.randn(96, D_TINY) * 0.3, f"{P}.encoder.0.bias": torch.zeros(96) - 0.05,
                f"{P}.decoder.weight": W_d, f"{P}.decoder.bias": torch.zeros(D_TINY)}, pt)
    with open(str(tmp / "e2e_similar_ce_layer_1.yaml"), "w") as f:
        f.write("saes:\n  sae_positions:\n  - blocks.1.hook_resid_pre\n  dict_size_to_input_ratio: 3\n"
                "tlens_model_name: gpt2-small\nloss:\n  logits_kl:\n    coeff: 1.0\n  in_to_orig: null\n")
    sae, cfg = interop.read_apollo(pt)
    write_saelens(sae, cfg, str(tmp / "lens"))
    return tmp, pt, str(tmp / "lens")


def test_eval_cli_apollo_and_saelens(sources, tiny_model_dir, text_file):
    tmp, pt, lens = sources
    common = ["--model", tiny_model_dir, "--dataset", text_file, "--ctx", "32", "--eval_samples", "4",
              "--alive_tokens", "400", "--data_dir", str(tmp / "cache"), "--json"]
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "eval.py"), src, *common], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for src in (pt, lens)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "trained elsewhere" in err  # unknown training rows are said so
        # progress on stderr: 4 eval rows in 1 batch of 8, then 9 extra rows for alive in 2 batches
        assert re.search(r"^eval\.py: metrics 1/1 batches \| \d+s \| eta 0s$", err, re.M), err
        assert re.search(r"^eval\.py: alive 1/2 batches \| \d+s \| eta \d+s$", err, re.M), err
        assert re.search(r"^eval\.py: alive 2/2 batches \| \d+s \| eta 0s$", err, re.M), err
    a, s = (json.loads(out) for out, _ in outs)
    assert (a["format"], s["format"]) == ("apollo", "saelens")
    assert a["layer"] == s["layer"] == 1 and a["center"] is s["center"] is True and a["loss"] == "e2e"
    assert a["held_out"] is None and a["eval_tokens"] == 128 and a["alive_tokens"] == 416  # 13 whole rows
    for k in ("l0", "alive", "ce_clean", "ce_spliced", "kl", "mse", "final_mse"):  # the same SAE, two files
        assert a[k] == pytest.approx(s[k], rel=1e-4, abs=1e-6), k
    assert a["l0"] > 0 and a["downstream_layers"] == [2] and len(a["downstream_explained_variance"]) == 1


def test_eval_save_firing_and_errors(sources, tiny_model_dir, text_file, tmp_path, capsys):
    tmp, pt, lens = sources
    import interop
    run = str(tmp_path / "run")
    interop.main(["import-apollo", pt, run])
    capsys.readouterr()
    argv = [run, "--model", tiny_model_dir, "--dataset", text_file, "--ctx", "32", "--eval_samples", "4",
            "--alive_tokens", "256", "--data_dir", str(tmp / "cache"), "--json"]
    ev.main(argv + ["--save_firing"])
    m = json.loads(capsys.readouterr().out)
    f = load_firing(run)
    assert f["tokens"] == m["alive_tokens"] == 256 and int((f["freq"] > 0).sum()) == m["alive"]
    assert torch.all(f["freq"] * 256 == (f["freq"] * 256).round())  # whole counts over 256 tokens
    for extra, words in ((["--alive_tokens", "-1"], ["--alive_tokens", ">= 0"]),
                         (["--model", str(tmp_path / "nope")], ["nope", "does not exist"])):
        with pytest.raises(SystemExit) as e:
            ev.main(argv + extra)
        assert str(e.value.code).startswith("eval.py: error:") and all(w in str(e.value.code) for w in words)
    with pytest.raises(SystemExit, match="not one; import it first"):
        ev.main([pt, "--save_firing"])
