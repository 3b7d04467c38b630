"""End to end: train.py for each loss on a tiny HF-format GPT-2 and a local text file, then eval.py on
the saved run; and the one-line errors for bad input."""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, make_text

EVAL_KEYS = {"l0", "alive", "ce_clean", "ce_spliced", "ce_increase", "kl", "mse", "explained_variance",
             "downstream_mse"}


ENV = dict(os.environ, OMP_NUM_THREADS="1")  # tiny models: more threads only contend on a small machine


def run(script, *args, check=True):
    p = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                       text=True, cwd=ROOT, timeout=300, env=ENV)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def tiny_args(model, dataset, out_dir, loss, **kw):
    a = dict(model=model, dataset=dataset, loss=loss, layer=1, ctx=32, n_samples=96, batch_size=4, grad_accum=2,
             eval_samples=8, eval_every=48, dict_ratio=4, lr=2e-3, warmup_samples=0, log_every=1, out_dir=out_dir,
             data_dir=os.path.join(os.path.dirname(out_dir), "cache"))
    a.update(kw)
    return [x for k, v in a.items() if v is not False for x in ((f"--{k}",) if v is True else (f"--{k}", v))]


@pytest.mark.parametrize("loss", ["local", "e2e", "e2e_ds"])
def test_train_then_eval(tmp_path, tiny_model_dir, text_file, loss):
    out = str(tmp_path / loss)
    p = run("train.py", *tiny_args(tiny_model_dir, text_file, out, loss))
    losses = [float(m) for m in re.findall(r"^step +\d+/12 \| loss ([\d.e+-]+)", p.stdout, re.M)]
    # every log line: steps done / total, elapsed, ETA; then one line: done, how long, where, what next
    assert len(re.findall(r"^step +\d+/12 \| loss .* \| \d+m\d\ds \| eta \d+m\d\ds$", p.stdout, re.M)) == 12, p.stdout
    assert re.search(rf"^done: 12 steps in \d+m\d\ds; SAE in {re.escape(out)}; next: python eval.py {re.escape(out)}$",
                     p.stdout, re.M), p.stdout
    assert len(losses) == 12, p.stdout
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses  # it learns
    part = {"local": "mse", "e2e": "kl", "e2e_ds": "ds"}[loss]
    assert re.search(rf"\| {part} [\d.e+-]+ \|", p.stdout)
    for f in ("sae.safetensors", "sae.json", "ckpt.pt", "eval.jsonl"):
        assert os.path.isfile(os.path.join(out, f)), f
    final = [json.loads(line) for line in open(os.path.join(out, "eval.jsonl"))][-1]
    assert final["step"] == 12
    from interop import load_firing
    firing = load_firing(out)  # the final eval's per-feature firing frequency
    assert int((firing["freq"] > 0).sum()) == final["alive"] and firing["tokens"] == final["alive_tokens"]
    assert abs(firing["freq"].sum().item() - final["l0"]) < 1e-6 * max(1.0, final["l0"])
    e = run("eval.py", out, "--json")
    m = json.loads(e.stdout)
    assert EVAL_KEYS <= set(m)
    assert len(m["downstream_mse"]) == 3 - 1 - 1  # 3-layer model, layer 1: later layer 2 only
    for k in ("l0", "alive", "ce_clean", "ce_spliced", "kl", "mse"):  # reload gives the same metrics
        assert m[k] == pytest.approx(final[k], rel=1e-6, abs=1e-9), k
    assert m["l0"] > 0 and m["ce_clean"] > 0


@pytest.fixture(scope="module")
def bad_env(tmp_path_factory, tiny_model_dir, text_file):
    """A folder of bad inputs (models, datasets, an out_dir), named {tmp}/... in BAD."""
    import numpy as np
    from safetensors.torch import load_file, save_file
    tmp = tmp_path_factory.mktemp("bad")
    (tmp / "llama").mkdir()
    (tmp / "llama" / "config.json").write_text(json.dumps(dict(model_type="llama", hidden_size=32)))
    (tmp / "llama" / "model.safetensors").write_bytes(b"")
    shutil.copytree(tiny_model_dir, tmp / "nan-gpt2")
    sd = load_file(str(tmp / "nan-gpt2" / "model.safetensors"))
    sd["transformer.h.0.mlp.c_fc.weight"][0, 0] = float("nan")
    save_file(sd, str(tmp / "nan-gpt2" / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "empty.txt").write_text("")
    (tmp / "emptydir").mkdir()
    (tmp / "nocol.jsonl").write_text(json.dumps({"body": "no text here"}) + "\n")
    (tmp / "short.txt").write_text(make_text(300))  # about 9 rows of 32 tokens: 8 held out, 1 to train
    ids = np.random.default_rng(0).integers(0, 50000, size=(40, 32)).tolist()
    (tmp / "dup.jsonl").write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in ids + [ids[3]]))
    ids[5][7] = 50300  # fits uint16, outside GPT-2's vocabulary
    (tmp / "bigid.jsonl").write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in ids))
    (tmp / "afile").write_text("not a folder")
    return tmp, tiny_model_dir, text_file


BAD = [  # (override, words the one-line message must contain); {tmp} is the bad_env folder
    (dict(loss="mse"), ["--loss", "'mse'", "local", "e2e_ds"]),
    (dict(layer=3), ["--layer 3", "0..2"]),
    (dict(layer=-1), ["--layer -1", "0..2"]),
    (dict(loss="e2e_ds", layer=2), ["no later layer"]),
    (dict(model="MISSING/dir/model"), ["MISSING/dir/model", "does not exist"]),
    (dict(model="no-such-model"), ["'no-such-model'", "neither a local folder nor a reachable hub repo"]),
    (dict(model="{tmp}/llama"), ["model_type 'llama'", "supported: 'gpt2', 'gpt_neo'"]),
    (dict(model="{tmp}/nan-gpt2"), ["non-finite weights", "h.0.mlp.c_fc.weight"]),
    (dict(dataset="MISSING.txt"), ["MISSING.txt", "does not exist"]),
    (dict(dataset="{tmp}/empty.txt"), ["empty.txt", "fewer than ctx = 32 tokens"]),
    (dict(dataset="{tmp}/emptydir"), ["emptydir", "has no .txt/.jsonl/.parquet files"]),
    (dict(dataset="{tmp}/nocol.jsonl"), ["nocol.jsonl", "['body']", "need 'input_ids' or 'text'"]),
    (dict(dataset="{tmp}/short.txt"), ["short.txt", "training rows", "fewer than one batch of 4"]),
    (dict(dataset="{tmp}/dup.jsonl"), ["dup.jsonl", "eval row 3 is also training row 32", "not be held out"]),
    (dict(dataset="{tmp}/bigid.jsonl"), ["bigid.jsonl", "token id 50300", "vocabulary of 50257"]),
    (dict(ctx=65), ["--ctx 65", "context of 64"]),
    (dict(l1=-1), ["--l1", "-1", ">= 0"]),
    (dict(kl_coeff=-0.5), ["--kl_coeff", "-0.5", ">= 0"]),
    (dict(lr="nan"), ["--lr", "nan", ">= 0"]),
    (dict(lr="inf"), ["--lr", "inf", ">= 0"]),
    (dict(lr=0), ["--lr", "> 0"]),
    (dict(loss="local", kl_coeff=1), ["--kl_coeff 1.0", "no effect with --loss local"]),
    (dict(ds_coeff=2.5), ["--ds_coeff 2.5", "no effect with --loss e2e"]),
    (dict(batch_size=0), ["--batch_size", "> 0"]),
    (dict(grad_accum=0), ["--grad_accum", "> 0"]),
    (dict(n_samples=4), ["--n_samples 4", "one step of 8"]),
    (dict(dict_ratio=0.01), ["--dict_ratio 0.01", "no features"]),
    (dict(min_lr_ratio=2), ["--min_lr_ratio", "[0, 1]"]),
    (dict(dtype="float16"), ["--dtype", "float16", "bfloat16"]),
    (dict(device="tpu"), ["--device 'tpu'", "cpu, cuda"]),
    (dict(eval_samples=100000), ["eval_samples", "leaves none"]),
    (dict(out_dir="{tmp}/afile"), ["afile", "is a file, not a folder"]),
    (dict(out_dir="/proc/nanosae-run"), ["/proc/nanosae-run", "not writable"]),
    (dict(resume=True), ["--resume", "holds no checkpoint"]),
] + ([(dict(wandb=True), ["--wandb", "pip install wandb"])] if importlib.util.find_spec("wandb") is None else [])


@pytest.mark.parametrize("override,words", BAD, ids=[str(b[0]) for b in BAD])
def test_bad_input_one_line_error(bad_env, override, words):
    tmp, model, data = bad_env
    base = dict(model=model, dataset=data, out_dir=str(tmp / "run"), loss="e2e")
    override = {k: v.format(tmp=tmp) if isinstance(v, str) else v for k, v in override.items()}
    p = run("train.py", *tiny_args(**dict(base, **override)), check=False)
    err = p.stderr.strip()
    assert p.returncode != 0 and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)
    assert not os.path.exists(tmp / "run")  # nothing written, not even an empty --out_dir


def test_eval_bad_dir_one_line(tmp_path):
    p = run("eval.py", str(tmp_path), "--json", check=False)
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and "no saved SAE" in p.stderr


def test_help_shows_every_default():
    import train
    text = train.parser.format_help()
    flags = [a for a in train.parser._actions if a.help and a.help != "==SUPPRESS==" and a.dest != "help"]
    shown = [a for a in flags if a.default is not None]  # None: the help says what it defaults to
    assert text.count("(default:") == len(shown) and "(default: None)" not in text
    for a in flags:
        assert a.default is not None or "default" in a.help or "if unset" in a.help, a.dest
    flat = " ".join(text.split())
    for flag, default in (("--model", "gpt2"), ("--layer", "6"), ("--loss", "e2e_ds"), ("--ctx", "1024"),
                          ("--n_samples", "400000"), ("--dict_ratio", "60.0"), ("--batch_size", "8"), ("--lr", "0.0005")):
        block = flat.split(f" {flag} ")[1].split(" --")[0]
        assert f"(default: {default})" in block, (flag, block)
    p = run("train.py", "--help")
    assert p.stdout.count("(default:") == len(shown)
    groups = [g.title for g in train.parser._action_groups]
    assert all(g in groups for g in ("model", "data", "optimisation", "evaluation and logging", "system")), groups


def test_local_paths_stored_absolute_and_eval_from_elsewhere(tmp_path, tiny_model_dir, text_file):
    """A run started with relative --dataset / --model works from any directory; a run stored the old way
    (relative paths) still resumes."""
    import torch
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(text_file, work / "input.txt")
    shutil.copytree(tiny_model_dir, work / "gpt")
    a = tiny_args("gpt", "input.txt", "run", "e2e", n_samples=16, eval_every=16)
    a[a.index("--data_dir") + 1] = "cache"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *map(str, a)], cwd=work, capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert p.returncode == 0, p.stderr
    cfg = json.load(open(work / "run" / "sae.json"))
    assert cfg["args"]["dataset"] == str(work / "input.txt") and cfg["model"] == str(work / "gpt")
    assert cfg["args"]["data_dir"] == str(work / "cache")  # made by the run: absolute too
    m = json.loads(run("eval.py", str(work / "run"), "--json", "--alive_tokens", 0).stdout)  # cwd is the repo
    assert m["dataset"] == str(work / "input.txt") and m["ce_clean"] > 0
    ckpt = torch.load(work / "run" / "ckpt.pt", weights_only=True)  # as an older version stored it, unfinished
    ckpt["args"].update(dataset="input.txt", model="gpt", data_dir="cache")
    ckpt.update(finished=False, step=1)
    torch.save(ckpt, work / "run" / "ckpt.pt")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--resume", "--out_dir", "run"], cwd=work,
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 0 and p.stdout.startswith("resuming run at step 1 of 2"), p.stdout + p.stderr
