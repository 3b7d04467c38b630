"""End to end: train.py for each loss on a tiny HF-format GPT-2 and a local text file, then eval.py on
the saved run; and the one-line errors for bad input."""
import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

EVAL_KEYS = {"l0", "alive", "ce_clean", "ce_spliced", "ce_increase", "kl", "mse", "explained_variance",
             "downstream_mse"}


def run(script, *args, check=True):
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                       text=True, cwd=ROOT, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def tiny_args(model, dataset, out_dir, loss, **kw):
    a = dict(model=model, dataset=dataset, loss=loss, layer=1, ctx=32, n_samples=96, batch_size=4, grad_accum=2,
             eval_samples=8, eval_every=48, dict_ratio=4, lr=2e-3, warmup_samples=0, log_every=1, out_dir=out_dir,
             data_dir=os.path.join(os.path.dirname(out_dir), "cache"))
    a.update(kw)
    return [x for k, v in a.items() for x in (f"--{k}", v)]


@pytest.mark.parametrize("loss", ["local", "e2e", "e2e_ds"])
def test_train_then_eval(tmp_path, tiny_model_dir, text_file, loss):
    out = str(tmp_path / loss)
    p = run("train.py", *tiny_args(tiny_model_dir, text_file, out, loss))
    losses = [float(m) for m in re.findall(r"^step +\d+ \| loss ([\d.e+-]+)", p.stdout, re.M)]
    assert len(losses) == 12, p.stdout
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses  # it learns
    part = {"local": "mse", "e2e": "kl", "e2e_ds": "ds"}[loss]
    assert re.search(rf"\| {part} [\d.e+-]+ \|", p.stdout)
    for f in ("sae.safetensors", "sae.json", "ckpt.pt", "eval.jsonl"):
        assert os.path.isfile(os.path.join(out, f)), f
    final = [json.loads(line) for line in open(os.path.join(out, "eval.jsonl"))][-1]
    assert final["step"] == 12
    e = run("eval.py", out, "--json")
    m = json.loads(e.stdout)
    assert EVAL_KEYS <= set(m)
    assert len(m["downstream_mse"]) == 3 - 1 - 1  # 3-layer model, layer 1: later layer 2 only
    for k in ("l0", "alive", "ce_clean", "ce_spliced", "kl", "mse"):  # reload gives the same metrics
        assert m[k] == pytest.approx(final[k], rel=1e-6, abs=1e-9), k
    assert m["l0"] > 0 and m["ce_clean"] > 0


@pytest.fixture(scope="module")
def bad_env(tmp_path_factory, tiny_model_dir, text_file):
    return tmp_path_factory.mktemp("bad"), tiny_model_dir, text_file


BAD = [  # (override, words the one-line message must contain)
    (dict(loss="mse"), ["--loss", "'mse'", "local", "e2e_ds"]),
    (dict(layer=3), ["--layer 3", "0..2"]),
    (dict(layer=-1), ["--layer -1", "0..2"]),
    (dict(loss="e2e_ds", layer=2), ["no later layer"]),
    (dict(model="MISSING/dir/model"), ["MISSING/dir/model", "does not exist"]),
    (dict(dataset="MISSING.txt"), ["MISSING.txt", "does not exist"]),
    (dict(ctx=65), ["--ctx 65", "context of 64"]),
    (dict(l1=-1), ["--l1", "-1", ">= 0"]),
    (dict(batch_size=0), ["--batch_size", "> 0"]),
    (dict(dtype="float16"), ["--dtype", "float16", "bfloat16"]),
    (dict(eval_samples=100000), ["eval_samples", "leaves none"]),
]


@pytest.mark.parametrize("override,words", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_input_one_line_error(bad_env, override, words):
    tmp, model, data = bad_env
    base = dict(model=model, dataset=data, out_dir=str(tmp / "run"), loss="e2e")
    p = run("train.py", *tiny_args(**dict(base, **override)), check=False)
    err = p.stderr.strip()
    assert p.returncode != 0 and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)


def test_eval_bad_dir_one_line(tmp_path):
    p = run("eval.py", str(tmp_path), "--json", check=False)
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and "no saved SAE" in p.stderr
