"""ckpt.pt fuzzed: a real run's checkpoint with one field deleted, retyped, made NaN, huge, negative or cut short,
then resumed as train.py's set-up does (resolve, check, load the model and data, restore the SAEs). Every case
ends in a one-line ValueError or a resume whose SAEs hold exactly what the file holds."""
import copy
import os
import shutil
import signal
import sys
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_data_loss import cli
from test_train import tiny_args


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, tiny_model_dir, text_file):
    """A sweep of two SAEs stopped (SIGKILL) after its checkpoint at step 6 of 12, and that checkpoint."""
    out = str(tmp_path_factory.mktemp("fuzz") / "run")
    argv = tiny_args(tiny_model_dir, text_file, out, "local,e2e", save_every=48)
    assert cli("train.py", *argv, fault="sigkill-save:2").returncode == -9
    c = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert c["step"] == 6 and len(c["runs"]) == 2
    return out, c


def leaves(obj, path=()):
    """Every (path, value) inside a checkpoint: dict keys and list indices down to tensors and plain values."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, path + (k,))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from leaves(v, path + (i,))


def mutate(c, path, how):
    """c with the value at path changed as how says (in place)."""
    *parent, key = path
    holder = c
    for k in parent:
        holder = holder[k]
    if isinstance(holder, tuple):  # betas: rebuild the tuple in its holder
        return
    v = holder[key]
    if how == "delete":
        holder.pop(key) if isinstance(holder, dict) else holder.pop(key)
        return
    if isinstance(v, torch.Tensor) and v.numel():
        new = {"nan": v.float().clone().fill_(float("nan")), "inf": v.float().clone().fill_(float("inf")),
               "huge": v.float() * 1e38, "negative": -v.float() - 1, "string": "0", "none": None,
               "short": v.reshape(-1)[:-1], "int": v.long()}[how]
    else:
        new = {"nan": float("nan"), "inf": float("inf"), "huge": 10 ** 30, "negative": -3, "string": "3",
               "none": None, "short": [], "int": 7}[how]
    holder[key] = new


HOWS = ["delete", "nan", "inf", "huge", "negative", "string", "none", "short", "int"]


def resume(out):
    """train.py's set-up and restore of the run in out, in this process: its SAERuns, or the ValueError."""
    import checkpoint
    import train
    from files import unlock_run
    old, cwd = sys.argv, os.getcwd()
    sys.argv = ["train.py", "--resume", "--out_dir", out]
    os.chdir(os.path.dirname(out))  # a relative path the damage made (a data_dir '3') stays in the temp folder
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        _, _, _, folder, device, _, _, saes = train.setup()
        folder.resume(saes, device)
        return saes
    finally:
        sys.argv = old
        os.chdir(cwd)
        for s, h in handlers.items():
            signal.signal(s, h)
        for lock in checkpoint.LOCKS:
            unlock_run(lock)
        checkpoint.LOCKS.clear()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_damaged_checkpoint_is_one_line_or_exact(stopped, data):
    out, c = stopped
    paths = [p for p, _ in leaves(c) if p and p[0] not in ("format", "file_id")]
    c = copy.deepcopy(c)
    path, how = data.draw(st.sampled_from(paths), label="path"), data.draw(st.sampled_from(HOWS), label="how")
    mutate(c, path, how)
    with tempfile.TemporaryDirectory() as tmp:
        run = os.path.join(tmp, "run")
        shutil.copytree(out, run, ignore=shutil.ignore_patterns(".train.lock"))
        torch.save(c, os.path.join(run, "ckpt.pt"))
        if data.draw(st.booleans(), label="cut short"):  # a torn file as well
            size = os.path.getsize(os.path.join(run, "ckpt.pt"))
            os.truncate(os.path.join(run, "ckpt.pt"), data.draw(st.integers(0, size - 1), label="bytes"))
        try:
            saes = resume(run)
        except ValueError as e:
            assert "\n" not in str(e) and str(e), repr(e)
            return
        saved = torch.load(os.path.join(run, "ckpt.pt"), weights_only=True)  # a resume: exactly what it holds
        for s, r in zip(saes, saved["runs"]):
            assert s.r.name == r["name"]
            for k, v in s.sae.state_dict().items():
                assert torch.isfinite(v).all() and torch.equal(v, r["sae"][k]), (path, how, k)
