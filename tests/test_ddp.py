"""DDP on CPU: `torchrun --nproc_per_node=2 train.py` with the gloo backend gives the SAE of one process with
the same global batch; SIGTERM to torchrun stops both ranks after the same step with one checkpoint, and
the run resumes exactly; a bad-step stop ends both ranks without a hang."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from test_reliability import ckpt, read_until
from test_train import ENV, run, tiny_args

# 40 steps of 8 samples (2 ranks x micro-batch 4 x 1, or 1 process x 4 x 2); eval every 8 steps and a
# checkpoint every 3, so rank 0 evaluates and saves while rank 1 waits at the next collective
DDP = dict(loss="local", n_samples=320, eval_every=64, save_every=24, eval_samples=4)
TIMEOUT = 180  # a deadlock fails the test instead of hanging it


def torchrun(*args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), *map(str, args)]
    return subprocess.Popen(cmd, cwd=ROOT, env=dict(ENV, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, text_file):
    """(args builder, out_dir of one process, out_dir of two, stdout of two): the same run both ways."""
    base = tmp_path_factory.mktemp("ddp")

    def args(out, **kw):
        return tiny_args(tiny_model_dir, text_file, str(base / out), **dict(DDP, **kw))
    run("train.py", *args("one"))
    p = torchrun(*args("two"))
    stdout, stderr = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0, stdout + stderr
    return args, str(base / "one"), str(base / "two"), stdout


def test_two_processes_match_one(runs):
    _, one, two, stdout = runs
    a, b = ckpt(one), ckpt(two)
    assert a["step"] == b["step"] == 40 and a["finished"] and b["finished"]
    for k in a["sae"]:
        torch.testing.assert_close(b["sae"][k], a["sae"][k], rtol=1e-5, atol=1e-6)
    evals = [[json.loads(line) for line in open(os.path.join(out, "eval.jsonl"))] for out in (one, two)]
    assert [e["step"] for e in evals[1]] == [8, 16, 24, 32, 40]
    for e1, e2 in zip(*evals):
        assert e1["alive_train"] == e2["alive_train"]  # features fired on either rank, counted once
        assert e1["l0"] == pytest.approx(e2["l0"], rel=1e-4) and e1["mse"] == pytest.approx(e2["mse"], rel=1e-4)
    assert len([line for line in stdout.splitlines() if line.startswith("step ")]) == 40  # rank 0 logs, once
    assert stdout.count("eval step") == 5 and "2 processes" in stdout


def test_sigterm_to_torchrun_stops_both_ranks_then_resumes_exactly(runs):
    args, _, two, _ = runs
    out = two.replace("two", "stopped")
    p = torchrun(*args("stopped"))
    read_until(p, "step     4/")
    p.send_signal(signal.SIGTERM)  # what a cluster scheduler sends; torchrun passes it to every rank
    stdout, stderr = p.communicate(timeout=TIMEOUT)
    assert p.returncode != 0
    assert stdout.count("stopped by SIGTERM") == 1, stdout + stderr
    after = int(stdout.split("stopped by SIGTERM after step ")[1].split(";")[0])
    c = ckpt(out)
    assert c["step"] == after + 1 < 40 and not c["finished"]
    p = torchrun("--resume", "--out_dir", out)
    stdout, stderr = p.communicate(timeout=TIMEOUT)
    assert p.returncode == 0 and f"resuming {out} at step {after + 1} of 40" in stdout, stdout + stderr
    a, b = ckpt(out), ckpt(two)
    for k in a["sae"]:
        assert torch.equal(a["sae"][k], b["sae"][k]), k
    assert open(os.path.join(out, "eval.jsonl")).read() == open(os.path.join(two, "eval.jsonl")).read()


def test_bad_step_stop_ends_both_ranks(runs):
    """--lr 1e30: every step would throw the SAE out; each is undone on both ranks, then the run stops."""
    args, _, two, _ = runs
    out = two.replace("two", "diverged")
    p = torchrun(*args("diverged", lr=1e30, max_bad_steps=2))
    stdout, stderr = p.communicate(timeout=TIMEOUT)
    assert p.returncode != 0
    assert "2 diverging steps in a row" in stderr and "steps 0..1" in stderr, stdout + stderr
    assert stdout.count("warning: diverging") == 1  # rank 0 reports, once a streak
    c = ckpt(out)
    assert c["step"] == 2 and c["bad_steps"] == 2
    assert all(torch.isfinite(v).all() for v in c["sae"].values())


def test_bad_input_under_torchrun_is_reported_once_without_a_hang(runs):
    args, _, two, _ = runs
    p = torchrun(*args("odd", grad_accum=3))
    stdout, stderr = p.communicate(timeout=TIMEOUT)
    assert p.returncode != 0
    assert (stdout + stderr).count("train.py: error: --grad_accum 3 must be a multiple of the 2 processes") == 1
    assert not os.path.exists(two.replace("two", "odd"))
