"""Run one of the CLI scripts as a real process with one fault injected where the OS or the user would cause it:

    python tests/faults.py FAULT SCRIPT ARGS...

    enospc:NAME:K   the disk is full for files named NAME (their temp files included) from the K+1-th written on:
                    os.write raises ENOSPC, as a full file system does (the first K such files are written)
    erofs:DIR       the file system under DIR is read-only: opening a file there for writing raises EROFS
    eacces:DIR      DIR is not writable by this user: the same with EACCES (a chmod 0o555 folder; root, as CI
                    runs, ignores permissions, so the OS cannot be asked to refuse)
    eval            the evaluation raises ZeroDivisionError (as --ctx 1 did)
    sigint-setup    a real SIGINT (Ctrl-C) arrives while train.py loads the model, during its set-up
    sigterm-setup   the same with SIGTERM (what a scheduler sends)
    sigkill-save:K  the process is killed (SIGKILL) right after its K-th write of ckpt.pt, as a kill -9 inside
                    a save would leave it (K counts every save's first write and a final save's second)
    nan-mse:K       losses.mse_loss returns NaN from its K+1-th call on (a run whose loss turns non-finite)
"""
import errno
import os
import runpy
import signal
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def disk_full(name, k):
    real, seen = os.write, []

    def write(fd, data):
        f = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if f == name or f.startswith(name + "."):
            if f not in seen:
                seen.append(f)
            if seen.index(f) >= k:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)
    os.write = write


def refuse_writes(folder, err):
    real, folder = os.open, os.path.abspath(folder)

    def open_(path, flags, *a, **kw):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and os.path.abspath(path).startswith(folder + os.sep):
            raise OSError(err, os.strerror(err), path)
        return real(path, flags, *a, **kw)
    os.open = open_


def failing_eval():
    import eval as ev

    def evaluate_many(*a, **kw):
        raise ZeroDivisionError("float division by zero")
    ev.evaluate_many = evaluate_many


def signal_in_setup(sig=signal.SIGINT):
    import model
    load = model.GPT.from_pretrained.__func__

    def from_pretrained(cls, *a, **kw):
        signal.raise_signal(sig)  # its handler runs before this returns
        time.sleep(10)  # not reached
        return load(cls, *a, **kw)
    model.GPT.from_pretrained = classmethod(from_pretrained)


def kill_after_save(k):
    import checkpoint
    real, seen = checkpoint.save_checkpoint, []

    def save_checkpoint(path, **state):
        real(path, **state)
        seen.append(path)
        if len(seen) == k:
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.save_checkpoint = save_checkpoint


def nan_mse(k):
    import losses
    real, calls = losses.mse_loss, []

    def mse_loss(*a):
        calls.append(1)
        out = real(*a)
        return out * float("nan") if len(calls) > k else out
    losses.mse_loss = mse_loss


if __name__ == "__main__":
    fault, script, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    kind, _, rest = fault.partition(":")
    if kind == "enospc":
        name, k = rest.rsplit(":", 1)
        disk_full(name, int(k))
    elif kind in ("erofs", "eacces"):
        refuse_writes(rest, errno.EROFS if kind == "erofs" else errno.EACCES)
    elif kind == "eval":
        failing_eval()
    elif kind == "sigint-setup":
        signal_in_setup(signal.SIGINT)
    elif kind == "sigterm-setup":
        signal_in_setup(signal.SIGTERM)
    elif kind == "sigkill-save":
        kill_after_save(int(rest))
    elif kind == "nan-mse":
        nan_mse(int(rest))
    else:
        sys.exit(f"faults.py: unknown fault {fault!r}")
    sys.argv = [script, *args]
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
