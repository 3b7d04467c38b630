"""
How the project writes files: whole or not at all, never over a file it did not write, one process per run
folder, and an error that fits on one line and names the file.

    atomic_write(path, fill)          fill(f) writes into a new temp file beside path (a unique name opened
                                      with O_EXCL, so never someone's file), which is fsynced and renamed over
                                      path. On any failure, Ctrl-C included, the temp file is removed and path is
                                      as it was; an OSError (disk full, read-only) names path.
    replace_dir(out_dir, fill, force) a folder written whole: fill(tmp) writes into a new folder beside out_dir,
                                      which then takes its place. Without force out_dir must be missing or empty;
                                      with it, nothing of the old folder remains (no stale file of an earlier
                                      export). On failure the new folder is removed and out_dir is as it was.
    check_target(out_dir, force)      ValueError unless replace_dir may write there (up front, before the work)
    check_writable(folder, what)      ValueError unless a file can be created there (tried, not guessed)
    lock_run(out_dir)                 an flock on out_dir/.train.lock held for the process's life (the kernel
                                      drops it on any exit, kill -9 included); a second process is refused at
                                      once with the holder's pid and host, which the file holds.
"""
import atexit
import contextlib
import errno
import os
import secrets
import shutil
import socket
import time

LOCK = ".train.lock"


class _FdWriter:
    """What fill() writes to: write() goes straight to os.write and keeps the OSError it raised, which
    torch.save would otherwise replace by a RuntimeError without the errno."""

    def __init__(self, fd):
        self.fd, self.error = fd, None

    def write(self, data):
        view = memoryview(data).cast("B")
        try:
            done = 0
            while done < len(view):  # os.write may write less than asked
                done += os.write(self.fd, view[done:])
        except OSError as e:
            self.error = e
            raise
        return len(view)

    def flush(self):
        pass


def _named(e, path):
    """The OSError e, naming path (the file the user knows, not our temp file)."""
    return OSError(e.errno, e.strerror or os.strerror(e.errno or 0), path)


def atomic_write(path, fill):
    """Write path whole by fill(f) (f.write(bytes)), or leave it as it was; see the module docstring."""
    tmp = f"{path}.{secrets.token_hex(4)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666 & ~umask, as open() gives
    except OSError as e:
        raise _named(e, path) from None
    f = _FdWriter(fd)
    try:
        try:
            fill(f)
            os.fsync(fd)  # on disk before the rename, so a power loss cannot leave an empty file
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        err = f.error or e
        if isinstance(err, OSError):
            raise _named(err, path) from None
        raise


def write_bytes(path, data):
    atomic_write(path, lambda f: f.write(data))


def check_writable(folder, what="folder"):
    """ValueError (one line) unless a file can be created in folder: permissions alone do not tell (root,
    read-only mounts). A missing folder is made for the test and removed again."""
    made = _missing_top(folder)
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".write-test.{secrets.token_hex(4)}.tmp")  # O_EXCL: never a user's file
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{what} {folder!r} is not writable ({e.strerror})") from None
    finally:
        remove_made(folder, made)


def _missing_top(folder):
    """The topmost folder of folder's path that does not exist yet (what makedirs would create), or None."""
    top, d = None, os.path.abspath(folder)
    while not os.path.lexists(d):
        top, d = d, os.path.dirname(d)
    return top


def remove_made(folder, top):
    """Remove folder and its parents up to top (made by us), each only if empty."""
    if top is None:
        return
    d, top = os.path.abspath(folder), os.path.abspath(top)
    while d == top or d.startswith(top + os.sep):
        try:
            os.rmdir(d)
        except OSError:
            return
        d = os.path.dirname(d)


def check_target(out_dir, force=False):
    """ValueError (one line) unless replace_dir may write out_dir: a missing or empty folder, or with force any."""
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir!r} is a file, not a folder")
    held = sorted(os.listdir(out_dir)) if os.path.isdir(out_dir) else []
    if held and not force:
        raise ValueError(f"{out_dir!r} is not empty (it holds {', '.join(held[:4])}{', ...' if len(held) > 4 else ''});"
                         " give --force to replace it whole, or choose another folder")


def replace_dir(out_dir, fill, force=False):
    """Write the folder out_dir whole by fill(tmp); see the module docstring."""
    check_target(out_dir, force)
    base = os.path.abspath(out_dir).rstrip(os.sep)
    os.makedirs(os.path.dirname(base), exist_ok=True)
    tmp, old = (f"{base}.{secrets.token_hex(4)}.{s}" for s in ("tmp", "old"))
    try:
        os.mkdir(tmp)  # exclusive: never a folder that is there
        fill(tmp)
        if os.path.isdir(base):
            os.rename(base, old)
            try:
                os.rename(tmp, base)
            except BaseException:
                os.rename(old, base)
                raise
            os.remove(old) if os.path.islink(old) else shutil.rmtree(old, ignore_errors=True)  # a link: not its target
        else:
            os.rename(tmp, base)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.filename and str(e.filename).startswith(tmp):  # name out_dir, not tmp
            raise _named(e, os.path.normpath(os.path.join(out_dir, os.path.relpath(e.filename, tmp)))) from None
        raise


def file_id(path):
    """(inode, size, mtime) of path, or None: every atomic_write makes a new file, so a changed id means a new one."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def write_error(e):
    """An OSError of a write as one line: the file and why."""
    hint = {errno.ENOSPC: "; free some space", errno.EDQUOT: "; free some space"}.get(e.errno, "")
    return f"cannot write {e.filename!r} ({e.strerror}){hint}" if e.filename else f"{e.strerror or e}{hint}"


# ----------------------------------------------------------------------------- one process per run folder

def lock_run(out_dir):
    """Lock out_dir (made if missing) for this process: dict(fd, path, made) for unlock_run; ValueError with the
    holder's pid and host if another process holds it. The file is removed at exit (atexit), while still held,
    so no process can lock a file that is about to vanish; one that opened it just before checks, after its
    flock, that it still locks the file at the path."""
    import fcntl
    made = _missing_top(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 300, 0).decode(errors="replace").strip()
            os.close(fd)
            raise ValueError(f"--out_dir {out_dir!r} is in use by {holder or 'another train.py'}; wait for it to "
                             "end (or stop it), or choose another --out_dir") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)  # its last holder removed it meanwhile: lock the file now at path
    text = os.pread(fd, 300, 0)
    lock = dict(fd=fd, path=path, made=made)
    if text and not text.startswith(b"train.py pid "):  # a file of that name we did not write: keep it
        os.close(fd)
        remove_made(out_dir, made)
        raise ValueError(f"{path!r} is not a lock file of train.py; move it away or choose another --out_dir")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"train.py pid {os.getpid()} on {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
    atexit.register(unlock_run, lock)
    return lock


def unlock_run(lock, tidy=False):
    """Remove the lock file, then release the lock; tidy: also the folders lock_run made (a run that wrote
    nothing leaves nothing)."""
    if lock.get("fd") is None:
        return
    with contextlib.suppress(OSError):
        os.remove(lock["path"])
    os.close(lock.pop("fd"))
    lock["fd"] = None
    if tidy:
        remove_made(os.path.dirname(lock["path"]), lock["made"])


def lock_holder(folder):
    """Who holds folder's .train.lock (files.lock_run): the line the holder wrote there (or 'another train.py')
    while a running train.py holds it, else None. A non-blocking shared flock, let go at once: it never waits,
    never creates the file, and cannot take the lock from its holder."""
    import fcntl
    try:
        fd = os.open(os.path.join(folder, LOCK), os.O_RDONLY)
    except OSError:  # missing: no train.py holds the folder (an unreadable one: lock_run cannot use it either)
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 300, 0).decode(errors="replace").strip() or "another train.py"
        fcntl.flock(fd, fcntl.LOCK_UN)  # a file left by a process that ended: not held
        return None
    finally:
        os.close(fd)
