"""Sweeps: one train.py run of several SAEs (--loss / --layer / --l1 lists) gives each SAE exactly what its
single run gives (bitwise on CPU), in its own run folder; a killed sweep resumes exactly; analysis reads the
sweep folder; bad lists are one-line errors."""
import json
import os

import pytest
import torch

from test_reliability import read_until, start, train_error
from test_train import run, tiny_args

# 6 SAEs over two layers and two kinds; three of them are also trained alone
SWEEP = dict(loss="local,e2e_ds", layer="0,1", l1=["local=0.5", "e2e_ds=1,2"])
NAMES = ["local_L0_l0.5", "local_L1_l0.5", "e2e_ds_L0_l1", "e2e_ds_L0_l2", "e2e_ds_L1_l1", "e2e_ds_L1_l2"]
ALONE = {"local_L1_l0.5": dict(loss="local", layer=1, l1=0.5), "e2e_ds_L0_l1": dict(loss="e2e_ds", layer=0, l1=1),
         "e2e_ds_L1_l2": dict(loss="e2e_ds", layer=1, l1=2)}


def sweep_args(model, data, out, **kw):
    """tiny_args, with --l1's KIND=LIST tokens as separate arguments."""
    kw = dict(SWEEP, **kw)
    l1 = kw.pop("l1")
    args = tiny_args(model, data, out, **kw)
    return args + (["--l1", *l1] if l1 else [])


def read(path):
    """The bytes of a file; of firing.safetensors its tensor and metadata (the header's key order may vary)."""
    if path.endswith("firing.safetensors"):
        from safetensors import safe_open
        with safe_open(path, "pt") as f:
            return f.get_tensor("freq").numpy().tobytes(), f.metadata()
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_model_dir, text_file):
    base = tmp_path_factory.mktemp("sweep")
    out = str(base / "sweep")
    p = run("train.py", *sweep_args(tiny_model_dir, text_file, out))
    return base, out, p.stdout


def test_sweep_equals_single_runs(sweep, tiny_model_dir, text_file):
    base, out, stdout = sweep
    assert sorted(os.listdir(out)) == sorted(NAMES + ["ckpt.pt"])
    assert f"done: 12 steps in" in stdout and f"next: python analysis.py pareto {out}" in stdout
    for name, flags in ALONE.items():
        alone = str(base / name)
        run("train.py", *tiny_args(tiny_model_dir, text_file, alone, **flags))
        for f in ("sae.safetensors", "eval.jsonl", "firing.safetensors"):  # bitwise: same init, batches, arithmetic
            assert read(os.path.join(out, name, f)) == read(os.path.join(alone, f)), (name, f)
        cfg = json.load(open(os.path.join(out, name, "sae.json")))
        cfg_alone = json.load(open(os.path.join(alone, "sae.json")))
        assert cfg["args"].pop("out_dir") == os.path.join(out, name)
        cfg_alone["args"].pop("out_dir")
        for k in ("loss", "layer", "l1", "kl_coeff", "ds_coeff"):  # the SAE's own flags, as a single run has them
            assert cfg["args"][k] == cfg_alone["args"][k], k


def test_sweep_folders_lambda_and_eval(sweep):
    _, out, stdout = sweep
    want = {"local_L0_l0.5": ("local", 0, 0.5), "e2e_ds_L0_l2": ("e2e_ds", 0, 2.0), "e2e_ds_L1_l1": ("e2e_ds", 1, 1.0)}
    for name, (loss, layer, l1) in want.items():
        cfg = json.load(open(os.path.join(out, name, "sae.json")))
        assert (cfg["loss"], cfg["layer"], cfg["args"]["l1"]) == (loss, layer, l1)
        assert cfg["args"]["ds_coeff"] == (2.5 if loss == "e2e_ds" else 0.0)
    e = run("eval.py", os.path.join(out, "e2e_ds_L1_l1"), "--json", "--alive_tokens", 0)  # an ordinary run folder
    final = json.loads(open(os.path.join(out, "e2e_ds_L1_l1", "eval.jsonl")).read().splitlines()[-1])
    m = json.loads(e.stdout.strip().splitlines()[-1])
    assert m["kl"] == pytest.approx(final["kl"], rel=1e-6) and m["loss"] == "e2e_ds"
    assert sum(line.startswith("eval step 12 | ") for line in stdout.splitlines()) == 6  # one line per SAE


def test_default_lambda_for_a_kind_left_out(tmp_path, tiny_model_dir, text_file):
    out = str(tmp_path / "mixed")
    run("train.py", *sweep_args(tiny_model_dir, text_file, out, loss="local,e2e", layer="1", l1=["e2e=0.25,0.75"],
                                n_samples=8, eval_every=8))
    # local at layer 1 gets the paper's value for the nearest paper layer (2): 0.8
    assert sorted(d for d in os.listdir(out) if d != "ckpt.pt") == ["e2e_L1_l0.25", "e2e_L1_l0.75", "local_L1_l0.8"]


def test_analysis_pareto_expands_a_sweep_folder(sweep, tmp_path):
    _, out, _ = sweep
    p = run("analysis.py", "pareto", out, "--json", "--out", str(tmp_path / "p.png"))
    res = json.loads(p.stdout)
    assert sorted(os.path.basename(q["run"]) for q in res["points"]) == sorted(NAMES)
    assert set(res["series"]) == {"local", "e2e_ds"} and os.path.getsize(tmp_path / "p.png") > 0


def test_killed_sweep_resumes_exactly(tmp_path, tiny_model_dir, text_file, monkeypatch):
    kw = dict(loss="local,e2e", layer="1", l1=["local=0.5", "e2e=1,2"], n_samples=160, eval_every=32,
              save_every=56, eval_samples=4)
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    run("train.py", *sweep_args(tiny_model_dir, text_file, ref, **kw))
    p = start(*sweep_args(tiny_model_dir, text_file, out, **kw))
    read_until(p, "eval step 8 | e2e_L1_l2")  # after the checkpoint at step 7, before the one at 14
    p.kill()
    p.wait()
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["step"] == 7
    err = train_error(monkeypatch, "--resume", "--out_dir", out, "--l1", "local=0.5", "e2e=1,3")
    assert "holds a run of the SAEs local_L1_l0.5, e2e_L1_l1, e2e_L1_l2, not" in err and "e2e_L1_l3" in err
    r = run("train.py", "--resume", "--out_dir", out)
    assert r.stdout.startswith(f"resuming {out} at step 7 of 20: 3 SAEs")
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (out, ref))
    assert a["finished"] and b["finished"]
    for x, y in zip(a["runs"], b["runs"]):
        assert x["name"] == y["name"] and all(torch.equal(x["sae"][k], y["sae"][k]) for k in y["sae"])
    for name in ("local_L1_l0.5", "e2e_L1_l1", "e2e_L1_l2"):
        for f in ("sae.safetensors", "eval.jsonl", "firing.safetensors"):
            assert read(os.path.join(out, name, f)) == read(os.path.join(ref, name, f)), (name, f)


BAD = [
    (dict(loss="e2e,e2e"), ["e2e_L1_l0.5", "asked for twice"]),
    (dict(l1=["1,1"]), ["e2e_L1_l1", "asked for twice"]),
    (dict(loss="local,e2e", l1=["local=1", "e2e_ds=2"]), ["--l1 'e2e_ds=2'", "kind 'e2e_ds'", "not in --loss local,e2e"]),
    (dict(l1=["1,two,3"]), ["--l1", "'two' is not a number"]),
    (dict(loss="local,e2e", l1=["local=1", "0.5"]), ["mixes plain lists and KIND=LIST"]),
    (dict(layer="1,x"), ["--layer", "'x' is not an integer"]),
    (dict(layer="1,5"), ["--layer 5", "0..2"]),
    (dict(loss="local,mse"), ["--loss 'mse'", "local, e2e, e2e_ds"]),
]


@pytest.mark.parametrize("override,words", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_sweep_lists_one_line(tmp_path, tiny_model_dir, text_file, override, words):
    out = tmp_path / "run"
    kw = dict(dict(loss="e2e", layer="1", l1=None), **override)
    p = run("train.py", *sweep_args(tiny_model_dir, text_file, str(out), **kw), check=False)
    err = p.stderr.strip()
    assert p.returncode != 0 and "Traceback" not in err and len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)
    assert not out.exists()
