"""The paper's open questions as flags: --init_from (fine-tune any SAE with this run's loss), --local_frac (a
local phase first), --ds_layers (which later residuals the downstream MSE compares), and analysis.py seeds
(cross-seed similarity). Runs are real train.py subprocesses on the tiny GPT-2."""
import argparse
import json
import os
import re
import shutil

import numpy as np
import pytest
import torch

from test_reliability import ckpt, read_until, start
from test_train import run, tiny_args

METRICS = ("l0", "alive", "ce_clean", "ce_spliced", "ce_increase", "kl", "mse", "explained_variance", "downstream_mse")


def evals(out):
    with open(os.path.join(out, "eval.jsonl")) as f:
        return [json.loads(line) for line in f]


def read(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir, text_file):
    """(folder, args builder, a finished local run to start from)."""
    base = tmp_path_factory.mktemp("ablations")

    def args(out, **kw):
        kw = dict(dict(loss="e2e_ds", l1=0.5, dataset=text_file), **kw)
        return tiny_args(tiny_model_dir, kw.pop("dataset"), str(base / out), **kw)
    run("train.py", *args("src", loss="local"))
    return base, args, str(base / "src")


# ----------------------------------------------------------------------------- --init_from

def test_init_from_starts_exactly_at_its_source(env):
    base, args, src = env
    import interop
    sae, cfg, _ = interop.load_any(src)
    interop.write_saelens(sae, cfg, str(base / "lens"))
    for name, source in (("ft_run", src), ("ft_lens", str(base / "lens"))):
        out = str(base / name)
        own = dict(dataset=False, ctx=False, eval_samples=False) if name == "ft_run" else {}  # a run folder's data comes with it
        run("train.py", *args(name, n_samples=16, eval_every=16, layer=False, dict_ratio=False, **own), "--init_from",
            source)
        first, final_src = evals(out)[0], evals(src)[-1]
        assert first["step"] == 0  # evaluated before any step: the source's numbers (a run folder: exactly)
        for k in METRICS:
            assert first[k] == (final_src[k] if name == "ft_run" else pytest.approx(final_src[k], rel=1e-5)), (name, k)
        cfg = json.load(open(os.path.join(out, "sae.json")))
        assert (cfg["init_from"], cfg["loss"], cfg["layer"]) == (source, "e2e_ds", 1)  # layer from the source
        c = ckpt(out)
        assert c["args"]["init_from"] == source and c["step"] == 2 and c["finished"]  # n_samples counts new samples
        assert [c["args"][k] for k in ("dataset", "ctx", "eval_samples")] == [ckpt(src)["args"]["dataset"], 32, 8]
        assert int(c["optimizer"]["state"][0]["step"]) == 2  # a fresh optimizer


INIT_BAD = [
    (dict(layer=0), ["is an SAE of layer 1, not --layer 0"]),
    (dict(dict_ratio=8), ["has 128 features", "--dict_ratio 8 gives 256", "leave --dict_ratio out"]),
    (dict(no_center=True), ["centred residual stream", "leave --no_center out"]),
]


@pytest.mark.parametrize("override,words", INIT_BAD, ids=[str(b[0]) for b in INIT_BAD])
def test_init_from_mismatch_is_one_line(env, override, words):
    base, args, src = env
    p = run("train.py", *args("bad_init", **override), "--init_from", src, check=False)
    err = p.stderr.strip()
    assert p.returncode != 0 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"--init_from {src!r}" in err and all(w in err for w in words), err
    assert not os.path.exists(base / "bad_init")


# ----------------------------------------------------------------------------- --local_frac

def test_local_frac_one_is_a_local_run_and_zero_the_plain_run(env):
    base, args, _ = env
    run("train.py", *args("f1", local_frac=1, local_l1=0.5))
    run("train.py", *args("local", loss="local", l1=0.5))
    assert read(base / "f1" / "sae.safetensors") == read(base / "local" / "sae.safetensors")
    for a, b in zip(evals(base / "f1"), evals(base / "local")):
        assert a["phase"] == "local" and all(a[k] == b[k] for k in METRICS)
    run("train.py", *args("f0", local_frac=0))
    run("train.py", *args("plain"))
    for f in ("sae.safetensors", "eval.jsonl"):
        assert read(base / "f0" / f) == read(base / "plain" / f)


def test_local_frac_switches_once_and_resumes_exactly_across_it(env):
    base, args, _ = env
    kw = dict(n_samples=160, local_frac=0.75, eval_every=32, save_every=40)  # 20 steps, switch at 15, ckpt every 5
    ref = run("train.py", *args("mixed", **kw))
    assert ref.stdout.count("switch at step 15: local -> e2e_ds (after 120 samples") == 1
    log = evals(base / "mixed")
    assert [(r["step"], r["phase"], r.get("switch", False)) for r in log] == [
        (4, "local", False), (8, "local", False), (12, "local", False), (15, "local", True), (16, "e2e_ds", False),
        (20, "e2e_ds", False)]
    lines = {int(line.split("/")[0].split()[1]): line for line in ref.stdout.splitlines() if line.startswith("step ")}
    assert "| mse " in lines[14] and "| kl " not in lines[14] and "| kl " in lines[15] and "| ds " in lines[15]
    p = start(*args("mixed_killed", **kw))
    read_until(p, "step     5/")
    p.kill()
    p.wait()
    assert ckpt(str(base / "mixed_killed"))["step"] in (5, 10)  # before the switch
    run("train.py", "--resume", "--out_dir", str(base / "mixed_killed"))
    for f in ("sae.safetensors", "eval.jsonl"):
        assert read(base / "mixed_killed" / f) == read(base / "mixed" / f)


# ----------------------------------------------------------------------------- --ds_layers

def test_ds_layers_losses_by_hand(tiny_model_dir):
    """all: the paper's mean over every later residual; next: the residual entering block L+1 only; and the
    shared passes keep no clean residual that no SAE reads."""
    from model import GPT
    from sae import SAE
    from config import parse_ds_layers
    from train import loss_step, shared_passes
    from losses import downstream_mse, mse_loss
    model = GPT.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    sae = SAE(32, 128)
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        x = model.forward_to_layer(idx, 0)
        _, clean = model.forward_from_layer(x, 0, logits=False)
        _, spliced = model.forward_from_layer(sae(x)[0], 0, logits=False)
    for spec, want in (("all", downstream_mse(spliced[:-1], clean[:-1])), ("next", mse_loss(spliced[0], clean[0])),
                       ("last", mse_loss(spliced[1], clean[1])), ("2", mse_loss(spliced[1], clean[1])),
                       ("next:2", downstream_mse(spliced[:2], clean[:2]))):
        r = argparse.Namespace(loss="e2e_ds", layer=0, l1=1.0, mse_coeff=0.0, kl_coeff=0.5, ds_coeff=2.5, kl_chunk=None,
                               ds=parse_ds_layers(spec, 0, 3))
        shared = shared_passes(model, idx, [r])
        _, parts = loss_step(model, sae, r, shared)
        assert torch.equal(parts["ds"], want), spec  # the same arithmetic: bitwise
        assert set(shared["resid"]) == {0} | set(r.ds), spec


BAD = [
    (dict(local_frac=1.5), ["--local_frac", "[0, 1]", "1.5"]),
    (dict(local_frac=0.5, loss="local"), ["--local_frac 0.5", "no effect with --loss local"]),
    (dict(local_l1=-1, local_frac=0.5), ["--local_l1", ">= 0", "-1"]),
    (dict(local_l1=2), ["--local_l1 2.0", "no effect", "--local_frac 0"]),
    (dict(ds_layers="next", loss="e2e"), ["--ds_layers next", "no effect with --loss e2e"]),
    (dict(ds_layers="next:0"), ["--ds_layers next:0", "1..1"]),
    (dict(ds_layers="1"), ["--ds_layers '1'", "block 1 is not after --layer 1", "blocks 2..2"]),
    (dict(ds_layers="2,2"), ["--ds_layers '2,2'", "give each block once"]),
    (dict(ds_layers="soon"), ["--ds_layers", "'soon' is not an integer"]),
    (dict(init_from="MISSING/run"), ["MISSING/run"]),
]


@pytest.mark.parametrize("override,words", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_ablation_values_one_line(env, override, words):
    base, args, _ = env
    p = run("train.py", *args("bad", **override), check=False)
    err = p.stderr.strip()
    assert p.returncode != 0 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)
    assert not os.path.exists(base / "bad")


# ----------------------------------------------------------------------------- analysis.py seeds

def test_seeds_one_for_identical_runs_below_for_other_seeds(env):
    base, args, src = env
    run("train.py", *args("seed1", loss="local", seed=1))
    shutil.copytree(src, base / "src_copy")
    p = run("analysis.py", "seeds", src, str(base / "src_copy"), str(base / "seed1"), "--json")
    res = json.loads(p.stdout)
    assert len(res["pairs"]) == 3
    same, other = res["pairs"][0], res["pairs"][1:]
    for kind in ("decoder", "encoder"):
        assert all(same[kind][k] == pytest.approx(1, abs=1e-5) for k in ("A_to_B", "B_to_A", "matching"))
        assert all(p[kind][k] < 0.99 for p in other for k in ("A_to_B", "B_to_A", "matching"))
        s = res["summary"][kind]["matching"]
        assert s["n"] == 3 and s["ci95"][0] <= s["mean"] <= s["ci95"][1]
    finals = [evals(r)[-1] for r in (src, src, str(base / "seed1"))]  # the final evals' spread over the seeds
    for k in ("l0", "ce_increase", "final_mse"):
        m, v = res["metrics"][k], [e[k] for e in finals]
        assert m["values"] == v and m["sd"] == pytest.approx(float(np.std(v, ddof=1))) and m["n"] == 3
    table = run("analysis.py", "seeds", src, str(base / "seed1")).stdout
    assert "dec 1:1" in table and f"{res['pairs'][1]['decoder']['matching']:.4f}" in table
    assert re.search(rf"^l0 +{finals[0]['l0']:.4g} +{finals[2]['l0']:.4g} ", table, re.M), table
    run("train.py", *args("other_l1", loss="local", l1=2, n_samples=8, eval_every=8))
    bad = run("analysis.py", "seeds", src, str(base / "other_l1"), check=False)
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "not only in the seed" in bad.stderr
