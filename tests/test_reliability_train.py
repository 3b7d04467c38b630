"""train.py's run folder under attack: a resume that names other SAEs, a kill inside the final save, the temp files
of a killed save, a diverging first step, damaged checkpoint fields, signals during set-up and inputs that used to
be accepted silently. Each refusal is one line, exit status 1 (or 128 + the signal), and every file already in the
folder is byte-identical afterwards."""
import os

import pytest
import torch

from test_data_loss import USER_FILES, assert_one_line, cli, put
from test_data_loss import snapshot as snapshot_all
from test_train import tiny_args


def snapshot(folder):
    """Every file under folder but the lock file a kill -9 leaves behind, which the next train.py takes over."""
    return {k: v for k, v in snapshot_all(folder).items() if k != ".train.lock"}


def train(model, data, out, loss="local", **kw):
    return ["train.py", *tiny_args(model, data, out, loss, **kw)]


def ckpt(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


def test_a_resume_names_the_same_saes(tmp_path, tiny_model_dir, text_file):
    out = str(tmp_path / "sweep")
    p = cli(*train(tiny_model_dir, text_file, out, l1="1,2,4"), fault="sigkill-save:1")  # after step 0's save
    assert p.returncode == -9 and ckpt(out)["step"] == 0
    before = snapshot(out)
    for argv in (["train.py", "--resume", "--out_dir", out, "--l1", 2], train(tiny_model_dir, text_file, out, l1=2)):
        p = cli(*argv)
        assert_one_line(p, 1, ["holds a run of the SAEs local_L1_l1, local_L1_l2, local_L1_l4, not local_L1_l2"])
        assert snapshot(out) == before
    assert cli("train.py", "--resume", "--out_dir", out).returncode == 0
    assert [r["name"] for r in ckpt(out)["runs"]] == ["local_L1_l1", "local_L1_l2", "local_L1_l4"]


def test_killed_inside_the_final_save_resumes_to_the_same_eval_log(tmp_path, tiny_model_dir, text_file):
    """12 steps, no save between: ckpt.pt is written at step 0, then twice by the final save (the first of them
    after the final eval); a kill right after that first write must not cost the firing counts."""
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    assert cli(*train(tiny_model_dir, text_file, ref)).returncode == 0
    p = cli(*train(tiny_model_dir, text_file, out), fault="sigkill-save:2")
    assert p.returncode == -9 and ckpt(out)["step"] == 12 and not ckpt(out)["finished"]
    assert cli(*train(tiny_model_dir, text_file, out)).returncode == 0
    log, ref_log = (open(os.path.join(d, "eval.jsonl")).read() for d in (out, ref))
    assert '"alive_train": 0' not in ref_log and log == ref_log


def test_temp_files_of_a_killed_save_go_with_the_next_run(tmp_path, tiny_model_dir, text_file):
    out = str(tmp_path / "run")
    assert cli(*train(tiny_model_dir, text_file, out), fault="sigkill-save:1").returncode == -9
    ours = {"ckpt.pt.0123abcd.tmp": b"x" * 1000, "sae.safetensors.deadbeef.tmp": b"y", "eval.jsonl.00ff00ff.tmp": b"z"}
    put(out, dict(USER_FILES, **ours, **{"notes.txt.0123abcd.tmp": b"the user's", "ckpt.pt.1.tmp": b"not ours"}))
    before = snapshot(out)
    assert_one_line(cli(*train(tiny_model_dir, text_file, out, lr=1)), 1, ["--lr"])  # refused: nothing touched
    assert snapshot(out) == before
    assert cli(*train(tiny_model_dir, text_file, out)).returncode == 0
    after = snapshot(out)
    assert not set(ours) & set(after)
    assert {k: after[k] for k in USER_FILES} == USER_FILES and after["ckpt.pt.1.tmp"] == b"not ours"


def test_a_diverging_step_is_undone_and_the_run_is_not_done(tmp_path, tiny_model_dir, text_file):
    """--lr 1e9 throws the SAE out at its first step: that step is undone, so the SAE saved is the initial one."""
    out, init = str(tmp_path / "run"), str(tmp_path / "init")
    p = cli(*train(tiny_model_dir, text_file, out, lr=1e9, max_bad_steps=3))
    assert_one_line(p, 1, ["3 diverging steps in a row", "steps 0..2", "last good step is saved"])
    assert cli(*train(tiny_model_dir, text_file, init), fault="sigkill-save:1").returncode == -9  # its SAE at step 0
    saved, first = ckpt(out)["runs"][0], ckpt(init)["runs"][0]
    assert saved["bad_steps"] == 3 and all(torch.equal(saved["sae"][k], v) for k, v in first["sae"].items())
    assert all(v["step"] == 0 for v in saved["optimizer"]["state"].values())  # Adam's state as before the steps
    short = str(tmp_path / "short")  # 2 steps, fewer than --max_bad_steps: it must not end as done
    p = cli(*train(tiny_model_dir, text_file, short, lr=1e9, n_samples=16, max_bad_steps=5))
    assert_one_line(p, 1, ["2 diverging steps in a row", "steps 0..1"])
    assert "done:" not in p.stdout and not ckpt(short)["finished"]


def damage(c, how):
    if how in ("args", "finished"):
        del c[how]
    elif how == "step -1":
        c["step"] = -1
    elif how == "step string":
        c["step"] = "3"
    elif how == "step past the end":
        c["step"] = 99
    elif how == "ctx string":
        c["args"]["ctx"] = "32"
    elif how == "rng":
        c["rng"] = c["rng"][:100]
    elif how == "no runs":
        c["runs"] = []
    elif how == "runs twice":
        c["runs"] = c["runs"] * 2
    elif how == "l1 nan":
        c["runs"][0]["l1"] = float("nan")


@pytest.mark.parametrize("how, words", [
    ("args", ["damaged nanoSAE checkpoint", "args is missing"]), ("finished", ["finished is missing"]),
    ("step -1", ["its step is -1"]), ("step string", ["its step is '3'"]),
    ("step past the end", ["step 99, past the run's 12 steps"]), ("ctx string", ["holds --ctx '32'"]),
    ("rng", ["its rng is"]), ("no runs", ["its runs is []"]), ("runs twice", ["the SAE local_L1_l0.8 is in it twice"]),
    ("l1 nan", ["SAE 0's l1 is nan"])])
def test_damaged_checkpoint_fields_are_one_line(tmp_path, tiny_model_dir, text_file, how, words):
    out = str(tmp_path / "run")
    assert cli(*train(tiny_model_dir, text_file, out), fault="sigkill-save:1").returncode == -9
    c = ckpt(out)
    damage(c, how)
    torch.save(c, os.path.join(out, "ckpt.pt"))
    before = snapshot(out)
    assert_one_line(cli("train.py", "--resume", "--out_dir", out), 1, words)
    assert snapshot(out) == before


@pytest.mark.parametrize("fault, rc", [("sigint-setup", 130), ("sigterm-setup", 143)])
def test_a_signal_during_set_up_is_one_line_and_leaves_the_folder(tmp_path, tiny_model_dir, text_file, fault, rc):
    out = str(tmp_path / "run")
    put(out, USER_FILES)
    p = cli(*train(tiny_model_dir, text_file, out), fault=fault)
    assert_one_line(p, rc, ["interrupted during set-up", "SIGINT" if rc == 130 else "SIGTERM", "nothing was written"])
    assert snapshot(out) == USER_FILES
    fresh = str(tmp_path / "new" / "run")  # a folder it had to make goes again
    assert_one_line(cli(*train(tiny_model_dir, text_file, fresh), fault=fault), rc, ["interrupted during set-up"])
    assert not os.path.exists(tmp_path / "new")


def test_a_dangling_link_as_out_dir_and_a_binary_eval_log(tmp_path, tiny_model_dir, text_file):
    link = tmp_path / "link"
    os.symlink(tmp_path / "gone", link)
    assert_one_line(cli(*train(tiny_model_dir, text_file, str(link))), 1, [repr(str(link)), "does not exist"])
    out = str(tmp_path / "run")
    assert cli(*train(tiny_model_dir, text_file, out), fault="sigkill-save:1").returncode == -9
    put(out, {"eval.jsonl": b"\xff\xfe not text\n"})
    before = snapshot(out)
    assert_one_line(cli("train.py", "--resume", "--out_dir", out), 1, ["eval.jsonl", "is not UTF-8"])
    assert snapshot(out) == before


@pytest.mark.parametrize("kw, words", [
    (dict(kl_coeff="nan"), ["--kl_coeff must be a number >= 0, got nan"]),
    (dict(ds_coeff="inf", loss="e2e"), ["--ds_coeff must be a number >= 0, got inf"]),
    (dict(loss="e2e", kl_coeff=0), ["leaves the SAE no term", "--kl_coeff 0"])])
def test_coefficients_that_would_be_ignored_or_leave_no_loss(tmp_path, tiny_model_dir, text_file, kw, words):
    out = str(tmp_path / "run")
    assert_one_line(cli(*train(tiny_model_dir, text_file, out, **kw)), 1, words)
    assert not os.path.exists(out)
