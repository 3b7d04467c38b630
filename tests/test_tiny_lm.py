"""tiny_lm.py: a tiny GPT trained from scratch on a small text lowers its loss, and the folder it writes is a
GPT2LMHeadModel that model.GPT and transformers read to the same logits, with the trained (uncentred) weights.
Bad flags stop it in one line, before anything is written."""
import json
import os
import subprocess
import sys

import pytest
import torch

import tiny_lm
from conftest import ROOT, make_text
from model import GPT

TINY = ["--n_layer", "2", "--n_embd", "32", "--n_head", "2", "--ctx", "32", "--batch_size", "8", "--lr", "1e-2",
        "--warmup", "3", "--val_rows", "8", "--eval_every", "10", "--log_every", "5", "--device", "cpu"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model, log, folder) of a 20-step run on make_text's words; the token cache in a temp folder."""
    tmp = tmp_path_factory.mktemp("tiny_lm")
    text = tmp / "input.txt"
    text.write_text(make_text(3000))
    out = tmp / "lm"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # d 32: one thread is as fast, and several times faster on a machine shared with others
    try:
        model, log = tiny_lm.main([*TINY, "--steps", "20", "--data", str(text), "--data_dir", str(tmp / "cache"),
                                   "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return model, log, str(out)


def test_loss_falls(trained):
    _, log, out = trained
    val = [v["loss"] for v in log["val"]]
    assert [v["step"] for v in log["val"]] == [0, 10, 20]
    assert val[0] > 10.0 and val[-1] < val[0] - 3.0  # from ~ln(50257) towards the ~100 words of make_text
    assert all(b < a for a, b in zip(val, val[1:]))
    train = [t["loss"] for t in log["train"]]
    assert train[-1] < train[0] - 3.0
    with open(os.path.join(out, "lm_log.json")) as f:  # the curve is in the folder too
        saved = json.load(f)
    assert saved["val"] == log["val"] and saved["final_val_loss"] == val[-1]
    assert saved["train_tokens"] > 0 and saved["args"]["n_layer"] == 2


def test_saved_folder_matches_transformers(trained):
    from transformers import GPT2LMHeadModel
    model, _, out = trained
    assert sorted(os.listdir(out)) == ["config.json", "lm_log.json", "model.safetensors"]
    hf, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf.eval()(idx).logits
        trained_logits = model.eval()(idx)
        for center in (True, False):  # centring (train.py's default) leaves the logits as they were
            logits = GPT.from_pretrained(out, center=center)(idx)
            assert (logits - ref).abs().max().item() <= 1e-4
    assert (trained_logits - ref).abs().max().item() <= 1e-4
    plain = GPT.from_pretrained(out, center=False).state_dict()  # the file holds the trained weights, uncentred
    assert all(torch.equal(plain[k], v) for k, v in model.state_dict().items())


def test_default_corpus(tmp_path, monkeypatch):
    for v in ("3.9", "3.11"):
        (tmp_path / f"python{v}" / "html" / "_sources").mkdir(parents=True)
    monkeypatch.setattr(tiny_lm, "DOC_SOURCES", str(tmp_path / "python3*" / "html" / "_sources"))
    assert tiny_lm.default_corpus() == str(tmp_path / "python3.11" / "html" / "_sources")
    monkeypatch.setattr(tiny_lm, "DOC_SOURCES", str(tmp_path / "none*" / "_sources"))
    with pytest.raises(ValueError, match="apt-get install python3-doc"):
        tiny_lm.default_corpus()


@pytest.mark.parametrize("argv, says", [
    (["--n_embd", "0"], "argument --n_embd: must be an integer > 0, got 0"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (["--steps", "-3"], "argument --steps: must be an integer > 0, got -3"),
    (["--min_lr_ratio", "2"], "argument --min_lr_ratio: must be a number in [0, 1], got 2"),
    (["--n_embd", "30", "--n_head", "4"], "--n_embd 30 is not a multiple of --n_head 4"),
    (["--steps", "3", "--warmup", "3"], "--warmup 3 is not below --steps 3"),
    (["--device", "tpu"], "--device 'tpu' is not one of cpu, cuda, cuda:N, auto"),
    (["--data", "MISSING"], "does not exist"),
    (["--data", "SHORT"], "fewer than --val_rows 8 + one batch of 8"),
    (["--out", "FULL"], "is not empty"),
])
def test_bad_flags_one_line(tmp_path, argv, says):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    (tmp_path / "short.txt").write_text(make_text(100))
    paths = dict(MISSING=str(tmp_path / "missing.txt"), SHORT=str(tmp_path / "short.txt"), FULL=str(tmp_path / "full"))
    argv = [paths.get(a, a) for a in argv]
    out = str(tmp_path / "out")
    base = [*TINY, "--data", str(tmp_path / "short.txt"), "--data_dir", str(tmp_path / "cache"), "--out", out]
    with pytest.raises(SystemExit) as e:
        tiny_lm.main([*base, *argv])  # the case's flags last: they override base's
    msg = str(e.value.code)
    assert msg.startswith("tiny_lm.py: error: ") and says in msg and "\n" not in msg
    assert not os.path.exists(out) and os.listdir(tmp_path / "full") == ["keep.txt"]  # nothing written


def test_bad_flag_from_the_shell():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tiny_lm.py"), "--batch_size", "0"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == "tiny_lm.py: error: argument --batch_size: must be an integer > 0, got 0\n"
