"""Long runs: a run killed at any point (SIGKILL) or stopped by SIGTERM/SIGINT and resumed ends with the
same SAE, optimizer state and eval.jsonl as an uninterrupted run, bitwise; non-finite steps are skipped and
stop the run after --max_bad_steps; a checkpoint survives a crash while saving; a corrupt or foreign file in
--out_dir is a one-line error. Everything runs train.py as a real subprocess on the tiny GPT-2."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from test_train import ENV, run, tiny_args

import checkpoint

# 40 steps of 8 samples; eval every 8 steps, checkpoint every 15 (at 15, 30 and the end)
LONG = dict(loss="local", n_samples=320, eval_every=64, save_every=120, eval_samples=4)


def start(*args):
    return subprocess.Popen([sys.executable, "-u", os.path.join(ROOT, "train.py"), *map(str, args)], cwd=ROOT,
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_until(p, prefix):
    """The stdout lines of p up to and including the first that starts with prefix."""
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith(prefix):
            return lines
    raise AssertionError(f"no line {prefix!r} before exit {p.wait()}:\n{''.join(lines)}{p.stderr.read()}")


def train_in_process(monkeypatch, *args):
    """train.py's main() run in this process with args: the code it exits with. Its signal handlers are undone."""
    import train
    monkeypatch.setattr(sys, "argv", ["train.py", *map(str, args)])
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as e:
            train.main()
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    return e.value.code


def train_error(monkeypatch, *args):
    """The message train.py exits with, run in this process: for inputs refused before training starts."""
    code = train_in_process(monkeypatch, *args)
    assert isinstance(code, str) and len(code.splitlines()) == 1, code
    return code


def step_lines(stdout):
    """The step and eval lines without their timings: what an interrupted run must repeat exactly."""
    return [line.split(" | lr ")[0] for line in stdout.splitlines() if line.startswith(("step", "eval step"))]


def ckpt(out):
    """The checkpoint in out; a one-SAE run's SAE entries (sae, optimizer, bad_steps, ...) also at the top."""
    c = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    return dict(c, **c["runs"][0]) if len(c["runs"]) == 1 else c


def assert_same_run(out, ref):
    a, b = ckpt(out), ckpt(ref)
    assert a["finished"] and b["finished"] and a["step"] == b["step"] == 40
    for k in b["sae"]:
        assert torch.equal(a["sae"][k], b["sae"][k]), k
    for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(s[k], t[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    with open(os.path.join(out, "eval.jsonl")) as f, open(os.path.join(ref, "eval.jsonl")) as g:
        assert f.read() == g.read()  # no eval line lost or doubled, same values (alive_train: firing counts)
    with open(os.path.join(out, "sae.safetensors"), "rb") as f, open(os.path.join(ref, "sae.safetensors"), "rb") as g:
        assert f.read() == g.read()


@pytest.fixture(scope="module")
def ref(tmp_path_factory, tiny_model_dir, text_file):
    """An uninterrupted run: (its args builder, its out_dir, its stdout)."""
    base = tmp_path_factory.mktemp("reliability")
    def args(out, dataset=text_file, **kw):
        return tiny_args(tiny_model_dir, dataset, str(base / out), **dict(LONG, **kw))
    p = run("train.py", *args("ref"))
    return args, str(base / "ref"), p.stdout


def test_sigkill_anywhere_then_resume_is_bitwise_exact(ref):
    args, ref_out, ref_stdout = ref
    out = ref_out.replace("ref", "killed")
    p = start(*args("killed"))
    lines = read_until(p, "eval step 16")  # written to eval.jsonl after the checkpoint at 15, before the one at 30
    p.kill()
    p.wait()
    at_kill = ckpt(out)
    with open(os.path.join(out, "eval.jsonl")) as f:
        evals = [json.loads(line)["step"] for line in f]
    assert at_kill["step"] == 15 and not at_kill["finished"]
    assert 16 in evals  # evaluated after the checkpoint: the resumed run must not log it twice
    r = run("train.py", "--resume", "--out_dir", out)  # just --resume: the run's own arguments
    assert r.stdout.startswith(f"resuming {out} at step 15 of 40")
    assert_same_run(out, ref_out)
    resumed = step_lines(r.stdout)
    assert resumed == step_lines(ref_stdout)[-len(resumed):]  # same log and eval cadence, same values
    assert step_lines("".join(lines))[-1] in resumed  # it did redo work the killed run had logged


def test_ctrl_c_finishes_the_step_saves_and_resumes_exactly(ref, monkeypatch):
    """SIGINT here; SIGTERM (same handler) through torchrun in test_ddp."""
    args, ref_out, _ = ref
    sig = signal.SIGINT
    out = ref_out.replace("ref", sig.name)
    p = start(*args(sig.name))
    read_until(p, "step     5/")
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 128 + sig, stderr
    stopped = [line for line in stdout.splitlines() if line.startswith(f"stopped by {sig.name} after step")]
    assert len(stopped) == 1 and "Traceback" not in stderr, stdout + stderr
    after = int(stopped[0].split("after step ")[1].split(";")[0])
    c = ckpt(out)
    assert c["step"] == after + 1 and not c["finished"]  # the step it was in finished, then it saved
    # a changed flag is refused, naming it; the same command again resumes (and says so)
    assert "holds a run with --lr 0.002, not 0.001" in train_error(monkeypatch, *args(sig.name, lr=1e-3))
    assert "holds a run with --l1 0.8, not 0.7" in train_error(monkeypatch, "--resume", "--out_dir", out, "--l1", 0.7)
    r = run("train.py", *args(sig.name))
    assert r.stdout.startswith(f"resuming {out} at step {after + 1} of 40")
    assert_same_run(out, ref_out)
    assert "holds a finished run (40 steps)" in train_error(monkeypatch, "--resume", "--out_dir", out)


def test_nonfinite_steps_are_skipped_then_stop_with_last_good_sae(ref, tmp_path, text_file, monkeypatch):
    """From step 1 on the loss is NaN (a fault: mse_loss returns NaN after step 0's two micro-batches)."""
    from test_data_loss import cli
    args, ref_out, _ = ref
    data = tmp_path / "data.txt"
    data.write_text(open(text_file).read())
    out = str(tmp_path / "diverged")
    p = cli("train.py", *args(out, max_bad_steps=3, dataset=data), fault="nan-mse:2")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "3 non-finite steps in a row (steps 1..3)" in p.stderr
    skipped = [line for line in p.stdout.splitlines() if "skipped" in line]
    assert [s.split("|")[0].split()[1] for s in skipped] == ["1", "2", "3"] and "(3 in a row)" in skipped[-1]
    c = ckpt(out)
    assert c["step"] == 4 and c["bad_steps"] == 3 and not c["finished"]
    assert all(torch.isfinite(v).all() for v in c["sae"].values())
    one = str(tmp_path / "one_step")  # the same run stopped after its only, good, step
    assert cli("train.py", *args(one, n_samples=8, dataset=data), fault="nan-mse:2").returncode == 0
    for k, v in ckpt(one)["sae"].items():
        assert torch.equal(c["sae"][k], v), k
    # a resume must read the same tokens: a changed dataset file is refused
    data.write_text("A new first sentence shifts every row. " + data.read_text())
    assert "is not the one of the run" in train_error(monkeypatch, "--resume", "--out_dir", out, "--max_bad_steps", 5)


def whole_checkpoint(step):
    """A checkpoint with every field train.py writes (load_checkpoint refuses one that lacks any)."""
    run = dict(name="local_L1_l1", loss="local", layer=1, l1=1.0, kl_coeff=0.0, ds_coeff=0.0, bad_steps=0, sae={},
               optimizer={}, fired=torch.zeros(4, dtype=torch.float64))
    return dict(format=checkpoint.FORMAT, step=step, finished=False, args={}, data=dict(rows=1, fingerprint="-"),
                rng=torch.get_rng_state(), cuda_rng=None, runs=[run])


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.atomic_save(whole_checkpoint(3), path)

    def dies_midway(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process dies here
    monkeypatch.setattr(checkpoint.torch, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_save(whole_checkpoint(4), path)
    assert checkpoint.load_checkpoint(path)["step"] == 3


def test_eval_log_keeps_what_came_before_the_checkpoint(tmp_path):
    path = str(tmp_path / "eval.jsonl")
    with open(path, "w") as f:
        f.write("".join(json.dumps(dict(step=s, l0=1.0)) + "\n" for s in (4, 8, 12)) + '{"step": 16, "l0"')
    assert [r["step"] for r in checkpoint.read_eval_log(path)] == [4, 8, 12]  # torn last line dropped
    checkpoint.trim_eval_log(path, 8)
    assert [r["step"] for r in checkpoint.read_eval_log(path)] == [4]
    with open(path, "a") as f:
        f.write("not json\n" + json.dumps(dict(step=8)) + "\n")
    with pytest.raises(ValueError, match="line 2 is not an evaluation record"):
        checkpoint.read_eval_log(path)


def write_foreign(out, kind):
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "ckpt.pt")
    if kind == "garbage":
        open(path, "wb").write(os.urandom(300))
    elif kind == "other_dict":
        torch.save({"model": torch.zeros(2), "step": 3}, path)
    elif kind == "code":  # a pickle that would run code on load
        open(path, "wb").write(b"cos\nsystem\n(S'echo hi'\ntR.")
    elif kind == "sae_only":
        open(os.path.join(out, "sae.safetensors"), "wb").write(b"{}")
    elif kind == "eval_log":
        open(os.path.join(out, "eval.jsonl"), "w").write("a b c\n{}\n")


FOREIGN = [("garbage", ["ckpt.pt", "not a readable nanoSAE checkpoint"]),
           ("other_dict", ["ckpt.pt", "not a readable nanoSAE checkpoint", "not written by train.py"]),
           ("code", ["ckpt.pt", "not a readable nanoSAE checkpoint"]),
           ("sae_only", ["holds sae.safetensors but no checkpoint"]),
           ("eval_log", ["holds eval.jsonl but no checkpoint", "remove them"])]


@pytest.mark.parametrize("kind,words", FOREIGN, ids=[f[0] for f in FOREIGN])
def test_foreign_or_corrupt_out_dir_is_a_one_line_error(ref, tmp_path, monkeypatch, kind, words):
    args, _, _ = ref
    out = str(tmp_path / "run")
    write_foreign(out, kind)
    err = train_error(monkeypatch, *args(out))
    for w in words:
        assert w in err, (w, err)
    assert not os.path.exists(os.path.join(out, "sae.json"))  # nothing was trained or overwritten


def test_corrupt_checkpoint_exits_with_one_line_no_traceback(ref, tmp_path):
    args, _, _ = ref
    out = str(tmp_path / "run")
    write_foreign(out, "garbage")
    p = run("train.py", *args(out), check=False)
    assert p.returncode == 1 and p.stderr.startswith("train.py: error: ") and len(p.stderr.splitlines()) == 1
    assert "not a readable nanoSAE checkpoint" in p.stderr
