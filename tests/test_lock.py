"""One train.py per run folder: a second process on a folder in use stops at once, naming the first; the first
runs on untouched; the lock goes with its process, however it ends (kill -9 included). Real processes."""
import json
import os
import signal
import subprocess
import sys
import time

import torch

from conftest import ROOT
from files import lock_run, unlock_run
from test_reliability import read_until, start
from test_train import ENV, tiny_args


def test_second_train_on_a_folder_in_use_fails_at_once(tmp_path, tiny_model_dir, text_file):
    out = str(tmp_path / "run")
    args = tiny_args(tiny_model_dir, text_file, out, "local", n_samples=80, eval_every=16, log_every=1000,
                     eval_samples=4)  # 10 steps
    first = start(*args)
    read_until(first, "starting")  # set-up done: it holds the lock
    first.send_signal(signal.SIGSTOP)  # however fast the machine, it is still running while the second one starts
    try:
        t0 = time.time()
        second = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)], capture_output=True,
                                text=True, cwd=ROOT, env=ENV, timeout=60)
        took = time.time() - t0
    finally:
        first.send_signal(signal.SIGCONT)
    err = second.stderr.strip()
    assert second.returncode != 0 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert f"is in use by train.py pid {first.pid} on " in err and "choose another --out_dir" in err, err
    assert took < 20, took  # refused before loading anything, not after a run
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert stdout.count("\ndone: 10 steps") == 1
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "eval.jsonl"))]
    assert steps == [2, 4, 6, 8, 10]  # the first run's evals only, once each
    c = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert c["finished"] and c["step"] == 10
    assert not os.path.exists(os.path.join(out, ".train.lock"))  # removed as the run ended


def test_lock_goes_with_a_killed_process(tmp_path, tiny_model_dir, text_file):
    out = str(tmp_path / "run")
    args = tiny_args(tiny_model_dir, text_file, out, "local", n_samples=40, eval_every=40, log_every=1, eval_samples=4)
    first = start(*args)
    read_until(first, "step     0/")  # past its first checkpoint (step 0, written before the first step)
    first.send_signal(signal.SIGKILL)
    first.wait()
    with open(os.path.join(out, ".train.lock")) as f:
        assert f.read().startswith(f"train.py pid {first.pid} ")  # left behind, but no longer held:
    lock = lock_run(out)  # what the next train.py does first
    with open(os.path.join(out, ".train.lock")) as f:
        assert f.read().startswith(f"train.py pid {os.getpid()} ")
    unlock_run(lock)
    assert sorted(os.listdir(out)) == ["ckpt.pt", "sae.json", "sae.safetensors"]  # its step-0 save, nothing else
