"""--wandb for real: train.py with the wandb package in offline mode (no account, no network; every W&B folder in
tmp_path), its run read back from the offline run's .wandb file, decoded with wandb's own protobuf schema
(wandb.proto). The keys are logs.py's: train/<term>, eval/<metric>, in a sweep train/<name>/<term>; --resume
continues the same W&B run (its id kept in ckpt.pt)."""
import glob
import json
import os
import signal
import struct
import subprocess
import sys
import zlib

import pytest
import torch

from conftest import ROOT
from test_train import ENV, tiny_args

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

TRAIN = {"loss", "sparsity", "kl", "ds", "l0", "alive"}  # e2e_ds's terms, and alive
EVAL = {"l0", "alive", "ce_increase", "kl", "mse", "explained_variance", "downstream_mse/L2", "step", "samples"}


def wandb_env(tmp_path):
    w = tmp_path / "wandb_home"
    dirs = dict(WANDB_DIR=w / "runs", WANDB_CACHE_DIR=w / "cache", WANDB_CONFIG_DIR=w / "config", WANDB_DATA_DIR=w / "data")
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in ENV.items() if not k.startswith("WANDB_")}  # no key, no entity, no base URL of the host
    return dict(env, WANDB_MODE="offline", WANDB_SILENT="true", **{k: str(v) for k, v in dirs.items()})


def train(env, *args):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *map(str, args)], capture_output=True,
                       text=True, cwd=ROOT, timeout=300, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def records(path):
    """The protobuf records of a .wandb file: wandb's LevelDB-style log (a ':W&B' header, 32 KiB blocks of records
    with a CRC-32, length and type), each a wandb_internal_pb2.Record."""
    data = open(path, "rb").read()
    assert data[:7] == struct.pack("<4sHB", b":W&B", 0xBEE1, 0), data[:7]
    i, buf, out = 7, b"", []
    while i + 7 <= len(data):
        if 32768 - i % 32768 < 7:  # a block's tail too short for a header is padding
            i += 32768 - i % 32768
            continue
        crc, n, kind = struct.unpack("<IHB", data[i:i + 7])
        if kind == 0 and n == 0:
            break
        chunk, i = data[i + 7:i + 7 + n], i + 7 + n
        assert crc == zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF, f"bad record at {i} in {path}"
        buf = chunk if kind in (1, 2) else buf + chunk  # full / first, then middle / last
        if kind in (1, 4):
            r = wandb_internal_pb2.Record()
            r.ParseFromString(buf)
            out.append(r)
    return out


def key(item):
    return item.key or "/".join(item.nested_key)


class OfflineRun:
    """One offline run folder: its id, project, config, history rows by _step, and the summary."""

    def __init__(self, folder):
        self.folder, self.history, self.summary, self.exit_code = folder, {}, {}, None
        (path,) = glob.glob(os.path.join(folder, "run-*.wandb"))
        for r in records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                self.id, self.project = r.run.run_id, r.run.project
                self.config = {key(u): json.loads(u.value_json) for u in r.run.config.update}
            elif kind == "history":
                row = {key(i): json.loads(i.value_json) for i in r.history.item}
                self.history[row["_step"]] = row
            elif kind == "summary":
                self.summary.update({key(u): json.loads(u.value_json) for u in r.summary.update})
            elif kind == "exit":
                self.exit_code = r.exit.exit_code


def offline_runs(env):
    """The offline runs under WANDB_DIR, oldest first."""
    return [OfflineRun(f) for f in sorted(glob.glob(os.path.join(env["WANDB_DIR"], "wandb", "offline-run-*")))]


def evals(out):
    return [json.loads(line) for line in open(os.path.join(out, "eval.jsonl"))]


def step_losses(stdout):
    return {int(line.split()[1].split("/")[0]): float(line.split(" | loss ")[1].split(" |")[0])
            for line in stdout.splitlines() if line.startswith("step ")}


def test_run_and_resume_continue_one_wandb_run(tmp_path, tiny_model_dir, text_file):
    """A 16-step e2e_ds run stopped by SIGINT after step 5 and resumed: two offline segments of one W&B run (the id
    in ckpt.pt), with every train term at each step and every eval metric at steps 8 and 16."""
    env, out = wandb_env(tmp_path), str(tmp_path / "run")
    args = tiny_args(tiny_model_dir, text_file, out, "e2e_ds", n_samples=128, eval_every=64, save_every=32,
                     wandb=True, wandb_project="nanosae-test")
    p = subprocess.Popen([sys.executable, "-u", os.path.join(ROOT, "train.py"), *map(str, args)], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = []
    for line in p.stdout:
        first.append(line)
        if line.startswith("step     5/"):
            p.send_signal(signal.SIGINT)  # the step in progress finishes, ckpt.pt is saved, W&B finishes, exit 130
            break
    rest, err = p.communicate(timeout=120)
    assert p.returncode == 130, "".join(first) + rest + err
    stopped = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert stopped["wandb_id"] and not stopped["finished"]
    resumed = train(env, "--resume", "--out_dir", out)
    assert resumed.startswith(f"resuming {out} at step {stopped['step']} of 16")
    assert torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["wandb_id"] == stopped["wandb_id"]

    a, b = offline_runs(env)
    assert a.id == b.id == stopped["wandb_id"] and a.project == b.project == "nanosae-test"
    assert a.exit_code == 130 and b.exit_code == 0
    assert b.config["resume"] is True and b.config["loss"] == "e2e_ds" and b.config["out_dir"] == out
    assert sorted(a.history) == list(range(stopped["step"]))  # steps 0..5, then 6..15 and the final eval at 16
    assert sorted(b.history) == list(range(stopped["step"], 17))
    losses = step_losses("".join(first) + rest) | step_losses(resumed)
    for run in (a, b):
        for step, row in run.history.items():
            if step < 16:
                assert {f"train/{k}" for k in TRAIN | {"lr", "tok_per_s"}} <= set(row), (step, sorted(row))
                assert round(row["train/loss"], 4) == losses[step]  # what the step line printed
    for m in evals(out):  # eval.jsonl's lines, in W&B at their steps
        row = b.history[m["step"]]
        assert {f"eval/{k}" for k in EVAL} <= set(row), sorted(row)
        assert row["eval/ce_increase"] == m["ce_increase"] and row["eval/downstream_mse/L2"] == m["downstream_mse"][0]
    final = evals(out)[-1]
    assert final["step"] == 16 and b.summary["eval/kl"] == final["kl"] and b.summary["eval/alive"] == final["alive"]
    assert b.summary["_step"] == 16 and b.summary["train/loss"] == b.history[15]["train/loss"]


def test_sweep_keys_name_each_sae(tmp_path, tiny_model_dir, text_file):
    """3 SAEs, one W&B run: each SAE's numbers under its name (train/<name>/<term>, eval/<name>/<metric>), each equal
    to its own run folder's eval.jsonl; lr and tokens per second once."""
    env, out = wandb_env(tmp_path), str(tmp_path / "sweep")
    stdout = train(env, *tiny_args(tiny_model_dir, text_file, out, "local,e2e,e2e_ds", n_samples=24, eval_every=24,
                                   wandb=True))
    names = stdout.split(": 3 SAEs (")[1].split(")")[0].split(", ")
    (run,) = offline_runs(env)
    assert run.id == torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)["wandb_id"]
    assert run.project == "nanosae" and run.exit_code == 0 and sorted(run.history) == [0, 1, 2, 3]
    terms = {"local": {"mse"}, "e2e": {"kl"}, "e2e_ds": {"kl", "ds"}}
    for step in (0, 1, 2):
        row = run.history[step]
        assert {"train/lr", "train/tok_per_s"} <= set(row) and "train/loss" not in row
        for name in names:
            want = {"loss", "sparsity", "l0", "alive"} | terms[name.rsplit("_L", 1)[0]]
            assert {k.split("/", 2)[2] for k in row if k.startswith(f"train/{name}/")} == want, (name, sorted(row))
        assert len({row[f"train/{name}/loss"] for name in names}) == 3  # three SAEs, three losses
    for name in names:
        (m,) = evals(os.path.join(out, name))
        for k in ("l0", "alive", "ce_increase", "kl", "mse", "explained_variance"):
            assert run.summary[f"eval/{name}/{k}"] == run.history[3][f"eval/{name}/{k}"] == m[k], (name, k)
