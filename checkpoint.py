"""
What a training run keeps in its --out_dir, and how it is written and read back.

    ckpt.pt           next step, RNG states, vars(args), a fingerprint of the token rows, and for every SAE
                      of the run its weights, optimizer, feature-firing counts, bad-step streak and its
                      loss, layer, λ and coefficients; never the frozen GPT
    sae.safetensors   the SAE alone, plus sae.json (sae.save_sae), for eval.py and analysis
    eval.jsonl        one JSON line per evaluation, with its step

Every file is written to a temp file and renamed over the old one (files.atomic_write), so a crash or SIGKILL
at any point leaves the previous version whole. A folder is a run's only if it holds our ckpt.pt: a new run
refuses one that holds a run's other files without it (they are someone else's), and leaves every other file
alone; train.py writes ckpt.pt first, so its own files are never without it. A run resumes at the checkpoint's
step and drops eval lines of that step and later (they are evaluated again), so eval.jsonl equals the one of
an uninterrupted run.
"""
import json
import os
import warnings

import torch

from files import atomic_write, check_writable

FORMAT = "nanosae-checkpoint-2"  # -1: one SAE at the top level (still read: load_checkpoint converts it)
# what must match for a run to resume from its checkpoint (the rest, e.g. --device, --eval_every, may change);
# the SAEs themselves (loss, layer, λ, coefficients) are compared by check_resumable
RESUME_KEYS = ("model", "dataset", "no_center", "dict_ratio", "n_samples", "batch_size", "grad_accum", "ctx", "lr",
               "warmup_samples", "min_lr_ratio", "grad_clip", "eval_samples", "seed", "ds_layers", "init_from",
               "local_frac", "local_l1")
PER_SAE = ("loss", "layer", "l1", "kl_coeff", "ds_coeff")  # what differs between the SAEs of a sweep
RUN_FILES = ("eval.jsonl", "sae.safetensors", "sae.json", "firing.safetensors")  # what a run writes beside ckpt.pt


def atomic_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def save_checkpoint(path, **state):
    """ckpt.pt: state (step, finished, args, data, runs: one dict per SAE with its sae and optimizer state
    dicts, fired, bad_steps and PER_SAE values) and the RNG states."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    atomic_save(dict(format=FORMAT, rng=torch.get_rng_state(), cuda_rng=torch.cuda.get_rng_state() if cuda else None,
                     **state), path)


def restore_rng(ckpt, device):
    """Set the RNG states a checkpoint holds."""
    torch.set_rng_state(ckpt["rng"])
    if ckpt["cuda_rng"] is not None and str(device).startswith("cuda"):
        torch.cuda.set_rng_state(ckpt["cuda_rng"])


NEWER_FLAGS = dict(ds_layers="all", init_from=None, local_frac=0.0, local_l1=None)  # their values before they existed


def _absolute(args):
    """A run stored by an earlier version: its local dataset / model / data_dir, if they exist from here, as
    absolute paths (what parse_args now stores), and the flags added since at the values that mean 'off'."""
    for k, v in NEWER_FLAGS.items():
        args.setdefault(k, v)
    for k in ("dataset", "model", "data_dir"):
        v = args.get(k)
        if isinstance(v, str) and not os.path.isabs(v) and os.path.exists(v):
            args[k] = os.path.abspath(v)
    return args


def load_checkpoint(path):
    """The checkpoint dict at path; ValueError with one line if the file is not one of ours. A checkpoint of
    the first format (one SAE) is returned in this one's form."""
    try:
        with warnings.catch_warnings():  # a foreign pickle warns before it fails; keep the error one line
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location="cpu", weights_only=True)  # never runs code from the file
        ok = isinstance(ckpt, dict) and ckpt.get("format") in (FORMAT, "nanosae-checkpoint-1")
    except Exception as e:
        ok, why = False, type(e).__name__
    else:
        why = "not written by train.py"
    if not ok:
        raise ValueError(f"{path!r} is not a readable nanoSAE checkpoint ({why}); move it away or choose "
                         "another --out_dir")
    if ckpt["format"] == "nanosae-checkpoint-1":
        a = ckpt["args"]
        one = dict({k: a[k] for k in PER_SAE}, name=f"{a['loss']}_L{a['layer']}_l{a['l1']:g}",
                   **{k: ckpt.pop(k) for k in ("sae", "optimizer", "fired", "bad_steps")})
        ckpt.update(format=FORMAT, runs=[one])
    if "args" in ckpt:
        ckpt["args"] = _absolute(ckpt["args"])
    return ckpt


def check_resumable(ckpt, args, runs, data):
    """ValueError unless args, the SAEs (runs) and the token rows (data: dict(rows, fingerprint)) are those of
    the checkpoint."""
    where = f"--out_dir {args.out_dir!r}"
    if ckpt["finished"]:
        raise ValueError(f"{where} holds a finished run ({ckpt['step']} steps); choose another --out_dir")
    for k in RESUME_KEYS:
        if ckpt["args"].get(k) != getattr(args, k):
            raise ValueError(f"{where} holds a run with --{k} {ckpt['args'].get(k)!r}, not {getattr(args, k)!r}; "
                             "resume with the same value (or just --resume) or choose another --out_dir")
    saved, now = [r["name"] for r in ckpt["runs"]], [r.name for r in runs]
    if saved != now and len(runs) > 1:  # one SAE: the flag that differs is named below
        raise ValueError(f"{where} holds a run of the SAEs {', '.join(saved)}, not {', '.join(now)}; resume with "
                         "the same --loss, --layer and --l1 lists (or just --resume) or choose another --out_dir")
    for a, r in zip(ckpt["runs"], runs):
        for k in PER_SAE:
            if a[k] != getattr(r, k):
                raise ValueError(f"{where} holds a run with --{k} {a[k]!r}, not {getattr(r, k)!r}"
                                 f"{' for ' + r.name if len(runs) > 1 else ''}; resume with the same value (or just "
                                 "--resume) or choose another --out_dir")
    if data is not None and ckpt["data"] != data:
        raise ValueError(f"dataset {args.dataset!r} is not the one of the run in {where} ({data['rows']} rows, "
                         f"fingerprint {data['fingerprint']}; the run had {ckpt['data']['rows']} rows, "
                         f"fingerprint {ckpt['data']['fingerprint']})")


def check_tensors(ckpt, path, d, n_dict):
    """ValueError naming the first tensor of the checkpoint at path that does not fit this run's SAEs (width d,
    n_dict features): each SAE's weights, its Adam moments (one per parameter, in SAE.parameters() order) and
    its firing counts. Checked before anything is loaded, so the error is one line, not load_state_dict's."""
    from sae import check_state, sae_shapes
    shapes = list(sae_shapes(d, n_dict).items())  # the order of SAE.parameters(), the optimizer's indices
    for r in ckpt["runs"]:
        where = f"{path!r} (SAE {r['name']}; this run: d {d}, n_dict {n_dict})"
        check_state(r["sae"], d, n_dict, where)
        if not isinstance(r.get("fired"), torch.Tensor) or tuple(r["fired"].shape) != (n_dict,):
            raise ValueError(f"{where}: its firing counts are not a tensor of shape ({n_dict},)")
        state = r["optimizer"].get("state", {})
        for i, (name, shape) in enumerate(shapes):
            for k, t in state.get(i, {}).items():
                if k != "step" and (not isinstance(t, torch.Tensor) or tuple(t.shape) != shape):
                    got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"{where}: the optimizer's {k} of {name} has shape {got}, not {shape}")


def check_out_dir(out_dir, ckpt_exists, run_dirs=()):
    """ValueError unless out_dir is, or can become, a writable folder, and the SAEs' run folders (run_dirs:
    out_dir itself, or its subfolders in a sweep) are this run's to write: with no checkpoint, none may hold a
    file a run writes (RUN_FILES: another program's, or a run whose ckpt.pt is gone); with one, their
    eval.jsonl must read. Nothing is written, and other files are never touched."""
    for d in dict.fromkeys([out_dir, *run_dirs]):
        if os.path.exists(d) and not os.path.isdir(d):
            raise ValueError(f"--out_dir {d!r} is a file, not a folder")
    for d in dict.fromkeys(run_dirs or [out_dir]):
        there = [f for f in RUN_FILES if os.path.lexists(os.path.join(d, f))]
        if there and not ckpt_exists:
            raise ValueError(f"--out_dir {d!r} holds {', '.join(there)} but no checkpoint of train.py (ckpt.pt"
                             f"{' in ' + repr(out_dir) if d != out_dir else ''}), so not this run's; choose another "
                             "--out_dir, or remove them")
        if ckpt_exists:
            read_eval_log(os.path.join(d, "eval.jsonl"))  # the resume trims it: it must read before anything is written
    for d in dict.fromkeys([out_dir, *(d for d in run_dirs if os.path.isdir(d))]):
        check_writable(d, "--out_dir")


def read_eval_log(path):
    """The records of eval.jsonl ([] if absent). A torn last line (killed while writing a record: the start of
    a JSON object, no newline after it) is dropped."""
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
            if i == len(lines) - 1 and line.startswith("{"):  # no newline after it: a write that did not finish
                continue
            raise ValueError(f"{path!r} line {i + 1} is not an evaluation record; move the file away "
                             "or choose another --out_dir") from None
        records.append(r)
    return records


def trim_eval_log(path, step):
    """Keep only the evaluations before step (a resumed run evaluates step and later again)."""
    if os.path.exists(path):
        records = [r for r in read_eval_log(path) if r["step"] < step]
        atomic_write(path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in records).encode()))


def append_eval_log(path, record):
    """One line at the end of eval.jsonl, or none: a failed write (disk full) is cut off again."""
    line = (json.dumps(record) + "\n").encode()
    with open(path, "ab", buffering=0) as f:  # unbuffered: nothing left to write after a failure
        end = f.seek(0, os.SEEK_END)
        try:
            while line:
                line = line[f.write(line):]
        except BaseException as e:
            f.truncate(end)
            if isinstance(e, OSError):
                raise OSError(e.errno, e.strerror, path) from None
            raise
