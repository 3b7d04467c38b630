"""
What a training run keeps in its --out_dir, and how it is written and read back.

    ckpt.pt           SAE, optimizer, next step, feature-firing counts, RNG states, bad-step streak,
                      vars(args), a fingerprint of the token rows; never the frozen GPT
    sae.safetensors   the SAE alone, plus sae.json (sae.save_sae), for eval.py and analysis
    eval.jsonl        one JSON line per evaluation, with its step

Every file is written to a temp file and renamed over the old one, so a crash or SIGKILL at any point
leaves the previous version whole. A run resumes at the checkpoint's step and drops eval lines of that
step and later (they are evaluated again), so eval.jsonl equals the one of an uninterrupted run.
"""
import json
import os
import warnings

import torch

FORMAT = "nanosae-checkpoint-1"
# what must match for a run to resume from its checkpoint (the rest, e.g. --device, --eval_every, may change)
RESUME_KEYS = ("model", "dataset", "loss", "layer", "no_center", "dict_ratio", "l1", "kl_coeff", "ds_coeff",
               "n_samples", "batch_size", "grad_accum", "ctx", "lr", "warmup_samples", "min_lr_ratio",
               "grad_clip", "eval_samples", "seed")


def atomic_save(obj, path):
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename, so a power loss cannot leave an empty file
    os.replace(tmp, path)


def save_checkpoint(path, sae, optimizer, **state):
    """ckpt.pt: the SAE and optimizer, the RNG states, and state (step, finished, bad_steps, fired, args, data)."""
    cuda_rng = torch.cuda.get_rng_state() if next(sae.parameters()).is_cuda else None
    atomic_save(dict(format=FORMAT, sae=sae.state_dict(), optimizer=optimizer.state_dict(),
                     rng=torch.get_rng_state(), cuda_rng=cuda_rng, **state), path)


def restore(ckpt, sae, optimizer):
    """Load the SAE, optimizer and RNG states of a checkpoint in place."""
    sae.load_state_dict(ckpt["sae"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng"])
    if ckpt["cuda_rng"] is not None and next(sae.parameters()).is_cuda:
        torch.cuda.set_rng_state(ckpt["cuda_rng"])


def load_checkpoint(path):
    """The checkpoint dict at path; ValueError with one line if the file is not one of ours."""
    try:
        with warnings.catch_warnings():  # a foreign pickle warns before it fails; keep the error one line
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)  # never runs code from the file
        ok = isinstance(ckpt, dict) and ckpt.get("format") == FORMAT
    except Exception as e:
        ok, why = False, type(e).__name__
    else:
        why = "not written by train.py"
    if not ok:
        raise ValueError(f"{path!r} is not a readable nanoSAE checkpoint ({why}); move it away or choose "
                         "another --out_dir")
    return ckpt


def check_resumable(ckpt, args, data):
    """ValueError unless args and the token rows (data: dict(rows, fingerprint)) are those of the checkpoint."""
    where = f"--out_dir {args.out_dir!r}"
    if ckpt["finished"]:
        raise ValueError(f"{where} holds a finished run ({ckpt['step']} steps); choose another --out_dir")
    for k in RESUME_KEYS:
        if ckpt["args"].get(k) != getattr(args, k):
            raise ValueError(f"{where} holds a run with --{k} {ckpt['args'].get(k)!r}, not {getattr(args, k)!r}; "
                             "resume with the same value (or just --resume) or choose another --out_dir")
    if data is not None and ckpt["data"] != data:
        raise ValueError(f"dataset {args.dataset!r} is not the one of the run in {where} ({data['rows']} rows, "
                         f"fingerprint {data['fingerprint']}; the run had {ckpt['data']['rows']} rows, "
                         f"fingerprint {ckpt['data']['fingerprint']})")


def check_out_dir(out_dir, ckpt_exists):
    """ValueError unless out_dir is, or can become, a writable folder that holds nothing of another run."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out_dir {out_dir!r} is a file, not a folder")
    if not ckpt_exists and os.path.exists(os.path.join(out_dir, "sae.safetensors")):
        raise ValueError(f"--out_dir {out_dir!r} holds an SAE (sae.safetensors) but no checkpoint (ckpt.pt); "
                         "choose another --out_dir")
    created, probe = not os.path.exists(out_dir), os.path.join(out_dir, ".write_test")
    try:  # try it: permissions alone do not tell (root, read-only mounts, /proc)
        os.makedirs(out_dir, exist_ok=True)
        with open(probe, "w"):
            pass
        os.remove(probe)
        if created:
            os.rmdir(out_dir)  # made for real once every input is checked
    except OSError as e:
        raise ValueError(f"--out_dir {out_dir!r} is not writable ({e.strerror})") from None


def read_eval_log(path):
    """The records of eval.jsonl ([] if absent). A torn last line (killed mid-write) is dropped."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            assert isinstance(r, dict) and isinstance(r.get("step"), int)
        except (json.JSONDecodeError, AssertionError):
            if i == len(lines) - 1:  # no newline after it: a write that did not finish
                continue
            raise ValueError(f"{path!r} line {i + 1} is not an evaluation record; move the file away "
                             "or choose another --out_dir") from None
        records.append(r)
    return records


def trim_eval_log(path, step):
    """Keep only the evaluations before step (a resumed run evaluates step and later again)."""
    records = [r for r in read_eval_log(path) if r["step"] < step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    os.replace(tmp, path)


def append_eval_log(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
