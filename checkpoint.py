"""
What a training run keeps in its --out_dir, and how it is written and read back.

    ckpt.pt           next step, RNG states, vars(args), a fingerprint of the token rows, and for every SAE
                      of the run its weights, optimizer, feature-firing counts, bad-step streak and its
                      loss, layer, λ and coefficients; never the frozen GPT
    sae.safetensors   the SAE alone, plus sae.json (sae.save_sae), for eval.py and analysis
    eval.jsonl        one JSON line per evaluation, with its step

Every file is written to a temp file and renamed over the old one (files.atomic_write), so a crash or SIGKILL
at any point leaves the previous version whole. RunFolder (at the end) is a run folder's life in time: the lock,
the save order, resume, signal and bad-step stops, the final evaluation's fallback. A folder is a run's only if it holds our ckpt.pt: a new run
refuses one that holds a run's other files without it (they are someone else's), and leaves every other file
alone; train.py writes ckpt.pt first, so its own files are never without it. A run resumes at the checkpoint's
step and drops eval lines of that step and later (they are evaluated again), so eval.jsonl equals the one of
an uninterrupted run.
"""
import copy
import json
import math
import os
import re
import signal
import sys
import time
import warnings

import torch

import ddp
from cli import first_line
from files import atomic_write, check_writable, file_id, lock_run, unlock_run, write_error
from sae import save_sae

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
    try:
        if ckpt["format"] == "nanosae-checkpoint-1":
            a = ckpt["args"]
            one = dict({k: a[k] for k in PER_SAE}, name=f"{a['loss']}_L{a['layer']}_l{a['l1']:g}",
                       **{k: ckpt.pop(k) for k in ("sae", "optimizer", "fired", "bad_steps")})
            ckpt.update(format=FORMAT, runs=[one])
        why = _bad_field(ckpt)
    except (KeyError, TypeError, ValueError) as e:
        why = f"{type(e).__name__}: {first_line(e)}"
    if why:
        raise ValueError(f"{path!r} is a damaged nanoSAE checkpoint: {why}; move it away or choose another --out_dir")
    ckpt["args"] = _absolute(ckpt["args"])
    return ckpt


def _is_int(v, lo=0):
    return type(v) is int and v >= lo


def _bad_field(ckpt):
    """What is wrong with a checkpoint's fields, in a few words, or None: the types train.py wrote."""
    rng_size = torch.get_rng_state().numel()
    checks = [
        ("step", lambda v: _is_int(v), "an integer >= 0"), ("finished", lambda v: type(v) is bool, "true or false"),
        ("args", lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v), "a dict of flags"),
        ("data", lambda v: isinstance(v, dict) and _is_int(v.get("rows")) and isinstance(v.get("fingerprint"), str),
         "dict(rows, fingerprint)"),
        ("rng", lambda v: isinstance(v, torch.Tensor) and v.dtype == torch.uint8 and v.numel() == rng_size,
         f"torch's RNG state ({rng_size} bytes)"),
        ("cuda_rng", lambda v: v is None or isinstance(v, torch.Tensor) and v.dtype == torch.uint8, "a CUDA RNG state"),
        ("runs", lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(r, dict) for r in v),
         "a non-empty list of SAEs")]
    for key, ok, want in checks:
        if key not in ckpt or not ok(ckpt[key]):
            return f"its {key} is {'missing' if key not in ckpt else repr(ckpt[key])[:60]}, not {want}"
    per_sae = [("name", lambda v: isinstance(v, str)), ("bad_steps", _is_int), ("sae", lambda v: isinstance(v, dict)),
               ("optimizer", lambda v: isinstance(v, dict) and isinstance(v.get("state", {}), dict)),
               ("loss", lambda v: isinstance(v, str)), ("layer", _is_int),
               *((k, lambda v: type(v) in (int, float) and math.isfinite(v) and v >= 0) for k in PER_SAE[2:])]
    for i, r in enumerate(ckpt["runs"]):
        bad = next((k for k, ok in per_sae if k not in r or not ok(r[k])), None)
        if bad:
            return f"SAE {i}'s {bad} is {'missing' if bad not in r else repr(r[bad])[:60]}"
    names = [r["name"] for r in ckpt["runs"]]
    dup = next((n for n in names if names.count(n) > 1), None)
    return f"the SAE {dup} is in it twice" if dup else None


def check_resumable(ckpt, args, runs, data):
    """ValueError unless args, the SAEs (runs) and the token rows (data: dict(rows, fingerprint)) are those of
    the checkpoint."""
    where = f"--out_dir {args.out_dir!r}"
    if ckpt["finished"]:
        raise ValueError(f"{where} holds a finished run ({ckpt['step']} steps); choose another --out_dir")
    steps = args.n_samples // (args.batch_size * args.grad_accum)
    if ckpt["step"] > steps:
        raise ValueError(f"{where} holds a checkpoint at step {ckpt['step']}, past the run's {steps} steps; it is "
                         "damaged: move it away or choose another --out_dir")
    for k in RESUME_KEYS:
        if ckpt["args"].get(k) != getattr(args, k):
            raise ValueError(f"{where} holds a run with --{k} {ckpt['args'].get(k)!r}, not {getattr(args, k)!r}; "
                             "resume with the same value (or just --resume) or choose another --out_dir")
    saved, now = [r["name"] for r in ckpt["runs"]], [r.name for r in runs]
    if saved != now and (len(saved) > 1 or len(now) > 1):  # one SAE each: the flag that differs is named below
        raise ValueError(f"{where} holds a run of the SAEs {', '.join(saved)}, not {', '.join(now)}; resume with "
                         "the same --loss, --layer and --l1 lists (or just --resume) or choose another --out_dir")
    for a, r in zip(ckpt["runs"], runs):
        for k in PER_SAE:
            if a[k] != getattr(r, k):
                raise ValueError(f"{where} holds a run with --{k} {a[k]!r}, not {getattr(r, k)!r}"
                                 f"{' for ' + r.name if len(runs) > 1 else ''}; resume with the same value (or just "
                                 "--resume) or choose another --out_dir")
    if saved != now:  # the same flags but another name: never, unless the file was edited
        raise ValueError(f"{where} holds a run of the SAE {', '.join(saved)}, not {', '.join(now)}; resume with "
                         "the same flags (or just --resume) or choose another --out_dir")
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
    group = torch.optim.Adam([torch.zeros(1) for _ in shapes]).state_dict()["param_groups"][0]  # what Adam saves
    for r in ckpt["runs"]:
        where = f"{path!r} (SAE {r['name']}; this run: d {d}, n_dict {n_dict})"
        check_state(r["sae"], d, n_dict, where)
        bad = next((k for k, t in r["sae"].items() if not t.is_floating_point() or not torch.isfinite(t).all()), None)
        if bad:
            raise ValueError(f"{where}: its {bad} holds non-finite values or is not a float tensor")
        fired = r.get("fired")
        if not isinstance(fired, torch.Tensor) or tuple(fired.shape) != (n_dict,) or not fired.is_floating_point() \
                or not (fired >= 0).all() or not torch.isfinite(fired).all():
            raise ValueError(f"{where}: its firing counts are not counts (a tensor of shape ({n_dict},), >= 0)")
        groups, state = r["optimizer"].get("param_groups"), r["optimizer"].get("state")
        if not (isinstance(groups, list) and len(groups) == 1 and isinstance(groups[0], dict)
                and groups[0].get("params") == group["params"] and all(_like(groups[0].get(k), v)
                                                                       for k, v in group.items())):
            raise ValueError(f"{where}: its optimizer's param_groups are not those of the SAE's Adam")
        keys = [sorted(state.get(i, {})) if isinstance(state, dict) and isinstance(state.get(i, {}), dict) else None
                for i in range(len(shapes))]
        if not isinstance(state, dict) or set(state) - set(range(len(shapes))) or \
                any(k != keys[0] for k in keys) or keys[0] not in ([], ["exp_avg", "exp_avg_sq", "step"]):
            raise ValueError(f"{where}: its optimizer's state is not Adam's (step, exp_avg, exp_avg_sq for each of "
                             f"the SAE's {len(shapes)} parameters, or none before the first step)")
        for i, (name, shape) in enumerate(shapes):
            for k, t in state.get(i, {}).items():
                want = () if k == "step" else shape
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
                    got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"{where}: the optimizer's {k} of {name} has shape {got}, not {want}")
                if not t.is_floating_point() or not torch.isfinite(t).all() or (k != "exp_avg" and (t < 0).any()):
                    raise ValueError(f"{where}: the optimizer's {k} of {name} is not a finite float tensor"
                                     f"{'' if k == 'exp_avg' else ' >= 0'}")


def _like(v, want):
    """Is v a value of the kind of want (an Adam hyperparameter as torch saves it)?"""
    if isinstance(want, bool) or want is None:
        return v is None or isinstance(v, bool)
    if isinstance(want, (int, float)):
        return type(v) in (int, float) and math.isfinite(v) and v >= 0
    if isinstance(want, (tuple, list)):
        return isinstance(v, (tuple, list)) and len(v) == len(want) and all(_like(a, b) for a, b in zip(v, want))
    return type(v) is type(want)


def check_out_dir(out_dir, ckpt_exists, run_dirs=()):
    """ValueError unless out_dir is, or can become, a writable folder, and the SAEs' run folders (run_dirs:
    out_dir itself, or its subfolders in a sweep) are this run's to write: with no checkpoint, none may hold a
    file a run writes (RUN_FILES: another program's, or a run whose ckpt.pt is gone); with one, their
    eval.jsonl must read. Nothing is written, and other files are never touched."""
    for d in dict.fromkeys([out_dir, *run_dirs]):
        if os.path.islink(d) and not os.path.exists(d):
            raise ValueError(f"--out_dir {d!r} is a symbolic link to {os.readlink(d)!r}, which does not exist; make "
                             "that folder or choose another --out_dir")
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
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
    except UnicodeDecodeError:
        raise ValueError(f"{path!r} is not UTF-8 text, so not an eval.jsonl of train.py; move the file away or "
                         "choose another --out_dir") from None
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


# ----------------------------------------------------------------------------- a training run's folder, in time

REPORT_GRACE_S = 20  # how long a failed rank > 0 leaves rank 0 to report the same error
LOCKS = []  # rank 0's lock on --out_dir (files.lock_run), held from set-up to exit


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM during set-up (setup_signals)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def setup_signals():
    """Until RunFolder.begin: SIGINT and SIGTERM raise Interrupted, so set-up ends in setup_failed's one line."""
    def stop(signum, frame):
        raise Interrupted(signum)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)


def setup_failed(e):
    """Exit with a set-up error (ValueError, OSError, SIGINT / SIGTERM) as one line; the lock is released and a
    folder made for it removed: nothing was written. Another process than rank 0 waits first: the same check fails
    on rank 0 (same arguments), which reports it and ends the job; exiting at once would let torchrun kill rank 0
    first."""
    for lock in LOCKS:
        unlock_run(lock, tidy=True)
    if isinstance(e, KeyboardInterrupt):
        signum = getattr(e, "signum", signal.SIGINT)
        if ddp.MASTER:
            print(f"train.py: interrupted during set-up ({signal.Signals(signum).name}); nothing was written",
                  file=sys.stderr)
        sys.exit(128 + signum)
    if isinstance(e, OSError):
        e = write_error(e)
    if ddp.MASTER:
        sys.exit(f"train.py: error: {e}")
    time.sleep(REPORT_GRACE_S)
    sys.exit(f"train.py: error (process {ddp.RANK}): {e}")


DIVERGE = 1e6  # a loss or SAE weight norm this many times its reference counts as a bad step


def adam_step_bound(optimizer, n):
    """An upper bound on the norm of one Adam step of n parameters: lr · √n · max |m̂ / √v̂|, where by Cauchy-Schwarz
        |m̂_t / √v̂_t| <= (1 − β1) / (√(1 − β2) · √(1 − β1² / β2))    (7.3 for the default betas; any t, gradients)."""
    g = optimizer.param_groups[0]
    b1, b2 = g["betas"]
    return g["lr"] * math.sqrt(n) * (1 - b1) / math.sqrt((1 - b2) * (1 - b1 ** 2 / b2))


def guarded_step(s, loss, step, fresh, max_bad, tag):
    """SAE s's optimizer step (a train.SAERun): clip, then step unless the loss or gradient is non-finite on any
    process, or the SAE diverges: its loss over DIVERGE x max(1, its first step's), or its weight norm after the step
    over DIVERGE x its first step's (fresh: take that reference again). A bad step changes nothing (one that could
    reach that norm, by adam_step_bound, is undone from a copy) and counts towards --max_bad_steps. tag: the start
    of the SAE's lines (its name in a sweep)."""
    clip = s.r.grad_clip if s.r.grad_clip > 0 else float("inf")
    params = list(s.sae.parameters())
    norm = torch.nn.utils.clip_grad_norm_(params, clip)
    seen = torch.stack([loss.float(), norm.float(), torch.nn.utils.get_total_norm(params)])
    loss, norm, w_norm = ddp.mean_(seen).tolist()  # the gradient and weights are already shared; the loss is not
    nonfinite = not (math.isfinite(loss) and math.isfinite(norm))
    if not nonfinite and (s.ref is None or fresh):
        s.ref = [loss, w_norm]
    diverged = not nonfinite and (loss > DIVERGE * max(1.0, s.ref[0]) or w_norm > DIVERGE * s.ref[1])
    if not nonfinite and not diverged:
        risky = w_norm + adam_step_bound(s.optimizer, sum(p.numel() for p in params)) > DIVERGE * s.ref[1]
        undo = ([p.detach().clone() for p in params], copy.deepcopy(s.optimizer.state_dict())) if risky else None
        s.optimizer.step()
        if risky:  # the same weights on every process: the same verdict
            w_norm = torch.nn.utils.get_total_norm(params).item()
            diverged = not w_norm <= DIVERGE * s.ref[1]
            if diverged:
                torch._foreach_copy_([p.detach() for p in params], undo[0])
                s.optimizer.load_state_dict(undo[1])
    if not nonfinite and not diverged:
        s.bad, s.diverged = 0, False
    else:
        s.bad += 1
        if ddp.MASTER and nonfinite:
            print(f"step {step:5d} | {tag}non-finite loss {loss:.4g} or grad norm {norm:.4g}: skipped "
                  f"({s.bad} in a row)", flush=True)
        elif ddp.MASTER and not s.diverged:  # once a streak
            print(f"step {step:5d} | {tag}warning: diverging (over {DIVERGE:g}x the first step's loss or weight "
                  f"norm): loss {loss:.4g} (first step {s.ref[0]:.4g}), weight norm {w_norm:.4g} (first step "
                  f"{s.ref[1]:.4g}); skipped, {max_bad} such steps in a row stop the run", flush=True)
        s.diverged = s.diverged or diverged
    s.optimizer.zero_grad(set_to_none=True)


class RunFolder:
    """The life of a training run's --out_dir; every process calls each method, rank 0 alone writes.
        RunFolder(args, runs, ckpt)   set-up: check the folder and lock it, one train.py per folder
        resume(saes, device)          the SAEs as the checkpoint holds them, and its step (0: a new run)
        begin(data, wandb_id)         a new run's ckpt.pt, before any other file; from here SIGTERM / SIGINT only
                                      ask the loop to stop
        save(step, finished=False)    ckpt.pt first, then each SAE's sae.safetensors, then ckpt.pt marked finished
        end_step(step, save)          save when due; stop on a signal (any process) or --max_bad_steps bad steps
        final_eval(run_eval, step)    the final evaluation; if it fails, save all the same, then one line, exit 1
    The SAEs (train.SAERun) are read for r, sae, optimizer, fired, bad, ref, diverged and sae_cfg()."""

    def __init__(self, args, runs, ckpt):
        self.args, self.ckpt, self.path, self.sweep = args, ckpt, os.path.join(args.out_dir, "ckpt.pt"), len(runs) > 1
        self.saes, self.signals = [], []
        if ddp.MASTER:
            check_out_dir(args.out_dir, ckpt_exists=ckpt is not None, run_dirs=[r.out_dir for r in runs])
            LOCKS.append(lock_run(args.out_dir))  # one train.py per run folder, until this process ends
            if file_id(self.path) != (ckpt and ckpt["file_id"]):
                raise ValueError(f"another train.py wrote --out_dir {args.out_dir!r} while this one started; run "
                                 "the command again")

    def prepare(self, runs):
        """The run's first writes, once every check has passed: the temp files of its own files that a killed save
        left behind go (files.atomic_write's NAME.XXXXXXXX.tmp), and a resumed run's eval lines of its step and
        later (they are evaluated again)."""
        if not ddp.MASTER:
            return
        own = re.compile("^(" + "|".join(map(re.escape, ("ckpt.pt", *RUN_FILES))) + r")\.[0-9a-f]{8}\.tmp$")
        for d in dict.fromkeys([self.args.out_dir, *(r.out_dir for r in runs)]):
            for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
                if own.match(f) and os.path.isfile(os.path.join(d, f)):
                    os.remove(os.path.join(d, f))
        if self.ckpt is not None:
            for r in runs:
                os.makedirs(r.out_dir, exist_ok=True)
                trim_eval_log(os.path.join(r.out_dir, "eval.jsonl"), self.ckpt["step"])

    def resume(self, saes, device):
        """The step to start at: the checkpoint's, with its SAEs, optimizers, streaks, firing counts and RNG
        restored into saes; 0 for a new run."""
        self.saes = saes
        if self.ckpt is None:
            return 0
        for s, saved in zip(saes, self.ckpt["runs"]):
            s.sae.load_state_dict(saved["sae"])
            s.optimizer.load_state_dict(saved["optimizer"])
            s.bad, s.ref, s.diverged = saved["bad_steps"], saved.get("ref"), saved.get("diverged", False)
            if ddp.MASTER:
                s.fired.copy_(saved["fired"])  # rank 0 holds the sum over the processes
        restore_rng(self.ckpt, device)
        return self.ckpt["step"]

    def begin(self, data, wandb_id):
        """Right before the first step: a new run's ckpt.pt is written, before any other file; from here SIGTERM and
        SIGINT only ask the loop to stop (the step finishes, then it saves and exits)."""
        self.data, self.wandb_id = data, wandb_id
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: self.signals.append(signum))
        if self.ckpt is None:
            self.save(0)

    def save(self, step, finished=False):
        """ckpt.pt (resuming at step), then every sae.safetensors; finished: ckpt.pt again, marked so, last."""
        for s in self.saes:
            ddp.sum_to_master_(s.fired)
        if not ddp.MASTER:
            return
        state = dict(step=step, args=vars(self.args), data=self.data, wandb_id=self.wandb_id, runs=[dict(
            {k: getattr(s.r, k) for k in PER_SAE}, name=s.r.name, bad_steps=s.bad, fired=s.fired.cpu(), ref=s.ref,
            diverged=s.diverged, sae=s.sae.state_dict(), optimizer=s.optimizer.state_dict()) for s in self.saes])
        save_checkpoint(self.path, finished=False, **state)
        for s in self.saes:  # after ckpt.pt: an SAE without a checkpoint is not ours
            save_sae(s.sae, s.r.out_dir, s.sae_cfg())
        if finished:  # only once every sae.safetensors is final too
            save_checkpoint(self.path, finished=True, **state)

    def end_step(self, step, save):
        """After a step (collective): stop on --max_bad_steps bad steps in a row; save if save, or if a signal
        arrived on any process, and then stop."""
        stopping = ddp.any_(self.signals)
        if max(s.bad for s in self.saes) >= self.args.max_bad_steps:
            self.stop_bad(step)
        if save or stopping:
            self.save(step + 1)
        if stopping:
            self.stop_by_signal(step)

    def stop_by_signal(self, step):
        """After the checkpoint: exit 128 + the signal, as a shell does."""
        signum = self.signals[0] if self.signals else signal.SIGTERM
        if ddp.MASTER:
            print(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved in "
                  f"{self.args.out_dir}, resume with --resume (or the same command)", flush=True)
        ddp.leave(128 + signum)

    def stop_bad(self, step):
        """--max_bad_steps bad steps in a row: save (each SAE is that of its last good step: a skipped step changes
        nothing) and stop with one line naming the SAE and the steps."""
        worst = max(self.saes, key=lambda s: s.bad)
        self.save(step + 1)
        what, hint = (f"diverging steps in a row (loss or weight norm over {DIVERGE:g}x the first step's, ",
                      "Start again with a lower --lr") if worst.diverged else \
            ("non-finite steps in a row (", "Resume with --resume --dtype float32 or a larger --max_bad_steps, or "
             "start again with a lower --lr")
        ddp.leave(f"train.py: error: {worst.bad} {what}steps {step - worst.bad + 1}..{step})"
                  f"{' of ' + worst.r.name if self.sweep else ''}; stopped, the SAE of the last good step is saved in "
                  f"{worst.r.out_dir}. {hint}")

    def final_eval(self, run_eval, step):
        """run_eval(True); if it fails, the trained SAEs and checkpoint are saved all the same, then it is reported."""
        try:
            run_eval(True)
        except Exception as e:
            self.save(step, finished=True)
            where = self.args.out_dir + "/NAME" if self.sweep else self.saes[0].r.out_dir
            ddp.leave(f"train.py: error: the final evaluation failed ({type(e).__name__}: {first_line(e)}); the "
                      f"trained SAE{'s are' if self.sweep else ' is'} saved in {self.args.out_dir}: evaluate with "
                      f"python eval.py {where}")
