"""
Several processes (torchrun) training the same SAEs on different micro-batches. On one process every helper
here does nothing (or returns its input), so train.py reads the same with or without DDP.

    device = ddp.init(device, ckpt_step)   # the process group; one GPU per process
    ddp.mean_(t); ddp.sum_to_master_(t)    # collectives, in place
    ddp.any_(flag)                         # one verdict for all processes
    module = ddp.wrap(sae, device)         # DistributedDataParallel (the gradients are averaged)
    ddp.leave(status)                      # every process exits at once, after rank 0 has saved

torchrun sets RANK and WORLD_SIZE; rank 0 (MASTER) alone writes files and prints.
"""
import atexit
import contextlib
import os
import sys

import torch

RANK, WORLD = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
DDP, MASTER = WORLD > 1, RANK == 0
DEVICE = "cpu"  # where the collectives' own tensors live (init sets it: nccl needs them on the GPU)


def init(device, at, out_dir):
    """Start the process group and give each process its GPU: the device this process trains on. at: the step the
    checkpoint this process sees in out_dir resumes at (-1 for none), which must be the same on every process."""
    global DEVICE
    if not DDP:
        return device
    import torch.distributed as dist
    if device.startswith("cuda"):
        per_node, n_gpu = int(os.environ.get("LOCAL_WORLD_SIZE", 1)), torch.cuda.device_count()
        if per_node > n_gpu:
            raise ValueError(f"{per_node} processes on this node but {n_gpu} GPU(s); one GPU per process")
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    from datetime import timedelta  # long enough for rank 0 to tokenise a dataset while the others wait
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", timeout=timedelta(hours=1))
    DEVICE = device
    seen = torch.tensor([at, -at], device=device)  # (max, -min) over processes of the step they resume at
    dist.all_reduce(seen, dist.ReduceOp.MAX)
    if seen[0] != -seen[1]:
        raise ValueError(f"the processes see different checkpoints in --out_dir {out_dir!r}; with several "
                         "machines it must be a folder they share")
    return device


def mean_(t):
    """t averaged over the processes, in place."""
    if DDP:
        torch.distributed.all_reduce(t)
        t /= WORLD
    return t


def sum_to_master_(t):
    """Rank 0's t becomes the sum over the processes, the others' 0 (counts that add up, e.g. feature firing)."""
    if DDP:
        torch.distributed.all_reduce(t)
        if not MASTER:
            t.zero_()
    return t


def any_(flag):
    """True on every process if flag is true on any."""
    if not DDP:
        return bool(flag)
    t = torch.tensor(float(bool(flag)), device=DEVICE)
    torch.distributed.all_reduce(t)
    return t.item() > 0


def barrier():
    if DDP:
        torch.distributed.barrier()


@contextlib.contextmanager
def master_first():
    """Rank 0 runs the block first (e.g. tokenising into the cache), then the others (reading it)."""
    if not MASTER:
        barrier()
    yield
    if MASTER:
        barrier()


def wrap(sae, device):
    """What the step calls: the SAE, or its DDP wrapper, which averages the gradients over the processes."""
    if not DDP:
        return sae
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(sae, device_ids=[int(device.split(":")[1])] if ":" in device else None)


def no_sync(module, sync):
    """The backward of a micro-batch that is not the step's last: no gradient exchange until the last one."""
    return module.no_sync() if DDP and not sync else contextlib.nullcontext()


def leave(status=None):
    """Exit every process, after the others reach here: rank 0's status (a str: printed, exit status 1); another
    process's str (the error rank 0 reports) becomes exit status 1. With DDP the process ends without Python's
    teardown: the DDP wrappers still hold the gloo process group, and destroying it there, while its worker threads
    run, could abort a finished run ("terminate called without an active exception", exit status 1)."""
    if not DDP:
        sys.exit(status)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
    if isinstance(status, str) and MASTER:
        print(status, file=sys.stderr)
    code = 1 if isinstance(status, str) else status or 0
    atexit._run_exitfuncs()  # what Python would run at exit (the run folder's lock file goes, W&B finishes)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
