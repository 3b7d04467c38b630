"""
What a training run prints and records: a line per step and per evaluation on stdout, each evaluation appended to
its run folder's eval.jsonl, and with --wandb the same numbers in one W&B run.

One SAE's step line: its loss terms, alive features, then what the step shares (lr, time per step, tokens per
second, elapsed, time left). A sweep's step is one line too: each SAE's loss, l0 and alive, named, then the same
shared numbers once. Everything before " | lr " depends only on the data and the SAEs (an interrupted run repeats
it exactly); the timings come after it.

    step   120/400 | loss 0.1234 | sparsity 0.51 | kl 0.0412 | l0 31.2 | alive 4012 | lr 4.10e-04 | 312ms | 26.2k tok/s | 0m41s | eta 1m27s
    step   120/400 | local_L6_l4: loss 0.1234 l0 31.2 alive 4012 | e2e_L6_l3: loss 0.0571 l0 28.9 alive 3990 | lr 4.10e-04 | 312ms | 26.2k tok/s | 0m41s | eta 1m27s
    eval step 200 | l0 30.91 | alive 4100 | ce +0.0451 | kl 0.0433 | mse 0.3121 | ev 0.912

Tokens per second in a unit that fits (812, 26.2k, 1.31M). The ETA is the steps left times the seconds per step of
their phase: with --local_frac the steps before the switch at the local phase's speed, those after it at the speed
timed after it. Until a step after the switch has been timed that speed is unknown (an e2e step also runs the rest of
the model forward and back; how much slower that is depends on the model, layer and device: 100x on the tests' tiny
model, so no fixed factor would do), and the line says so, with the time to the switch: `eta ? (switch in 0m42s)`.
Evaluations and checkpoints are not in the ETA.

W&B (rank 0, one run for the whole sweep, its id kept in ckpt.pt so --resume continues it), at step s:
    train/<term>            each loss term of the step (loss, sparsity, mse, kl, ds, l0) and alive
    train/lr, train/tok_per_s
    eval/<metric>           every number of an evaluation (eval.jsonl's line); a list as eval/<metric>/L<layer>
In a sweep the SAE's name comes first: train/<name>/<term>, eval/<name>/<metric> (train/lr is shared).
"""
import os
import sys

import torch

import ddp
from checkpoint import append_eval_log
from cli import fmt_time


def fmt_rate(x):
    """A rate per second in a unit that fits: 4.5, 812, 26.2k, 1.31M (never 0.0k)."""
    if x < 9.95:
        return f"{x:.1f}"
    if x < 999.5:
        return f"{x:.0f}"
    if x < 999_950:
        return f"{x / 1e3:.1f}k"
    return f"{x / 1e6:.2f}M"


def switch_step(args):
    """The --local_frac switch as train.py computes it: the first step of --loss (0: no local phase)."""
    return int(args.local_frac * args.n_samples) // (args.batch_size * args.grad_accum)


class Eta:
    """The time left, by phase. steps: the run's steps; switch: the first step after --local_frac's local phase (0 or
    >= steps: one phase); start: the first step this process trains. update() takes each step line's mean seconds per
    step over the steps since the last line; left() the time of the steps after the one just logged."""

    def __init__(self, steps, switch, start):
        self.steps, self.switch = steps, switch if 0 < switch < steps else 0
        self.last = start - 1  # the last step a line has timed
        self.dt = {}  # seconds per step: "local" before the switch, "main" from it on

    def update(self, step, dt):
        """dt: the mean over steps last+1 .. step. A window over the switch gives the main phase's share of it."""
        first, self.last = self.last + 1, step
        n_local = max(0, min(step + 1, self.switch) - first)
        n_main = step + 1 - first - n_local
        if n_main <= 0:
            self.dt["local"] = dt
        elif n_local == 0 or "local" not in self.dt:
            self.dt["main"] = dt
        else:
            main = (dt * (n_local + n_main) - n_local * self.dt["local"]) / n_main
            self.dt["main"] = main if main > 0 else dt

    def to_switch(self, step):
        """Seconds for the local steps after step (0 from the switch on)."""
        return max(0, self.switch - step - 1) * self.dt.get("local", 0.0)

    def left(self, step):
        """Seconds for steps step+1 .. steps-1; None while steps after the switch remain and none has been timed."""
        n_main = self.steps - max(step + 1, self.switch)
        if n_main > 0 and "main" not in self.dt:
            return None
        return self.to_switch(step) + max(0, n_main) * self.dt.get("main", 0.0)

    def fmt(self, step):
        t = self.left(step)
        return f"eta ? (switch in {fmt_time(self.to_switch(step))})" if t is None else f"eta {fmt_time(t)}"


def sae_part(name, logs, alive):
    """A sweep's compact numbers of one SAE: `e2e_L6_l3: loss 0.0571 l0 28.9 alive 3990`; W&B has every term."""
    return f"{name}: loss {logs['loss']:.4f} l0 {logs['l0']:.1f} alive {alive}"


def step_line(step, steps, parts, lr, dt, tok_s, elapsed, eta):
    """A step's line: parts (the SAEs' numbers, already joined), then the shared ones."""
    return (f"step {step:5d}/{steps} | {parts} | lr {lr:.2e} | {dt * 1000:.0f}ms | {fmt_rate(tok_s)} tok/s | "
            f"{fmt_time(elapsed)} | {eta}")


class Log:
    """The run's lines on stdout (a sweep's name their SAE) and, with --wandb, W&B."""

    def __init__(self, args, saes, ckpt):
        self.args, self.saes, self.resuming, self.wandb = args, saes, ckpt is not None, None
        self.sweep = len(saes) > 1
        self.wandb_id = ckpt.get("wandb_id") if ckpt else None
        self.eta = None

    def init_wandb(self):
        """With --wandb: the run's W&B run (rank 0), continued on a resume (its id is kept in ckpt.pt)."""
        if ddp.MASTER and self.args.wandb:
            import wandb
            self.wandb = wandb
            name = os.path.basename(os.path.normpath(self.args.out_dir))
            self.wandb_id = wandb.init(project=self.args.wandb_project, config=vars(self.args), id=self.wandb_id,
                                       name=name, resume="allow").id

    def start(self, step, steps, device):
        self.eta = Eta(steps, switch_step(self.args), step)
        if ddp.MASTER:
            a, names = self.args, ", ".join(s.r.name for s in self.saes)
            what = f"{len(self.saes)} SAEs ({names})" if self.sweep else "1 SAE"
            print(f"{'resuming' if self.resuming else 'starting'} {a.out_dir} at step {step} of {steps}: {what}, "
                  f"{a.batch_size * a.grad_accum} samples per step, {ddp.WORLD} process{'es' * ddp.DDP}, {device}",
                  flush=True)
            if not self.resuming and a.eval_samples > a.n_samples:  # a shrunk run that kept the eval default
                print(f"train.py: note: every evaluation runs the {a.eval_samples} held-out rows of --eval_samples, more "
                      f"than the {a.n_samples} samples of --n_samples: a quick run wants a smaller --eval_samples",
                      file=sys.stderr, flush=True)

    def tag(self, s, sep):
        return s.r.name + sep if self.sweep else ""

    def eval(self, s, m):
        append_eval_log(os.path.join(s.r.out_dir, "eval.jsonl"), m)
        print(f"eval step {m['step']} | {self.tag(s, ' | ')}l0 {m['l0']:.2f} | alive {m['alive']} | ce "
              f"{m['ce_increase']:+.4f} | kl {m['kl']:.4f} | mse {m['mse']:.4g} | ev {m['explained_variance']:.3f}",
              flush=True)
        if self.wandb:
            pre, row = f"eval/{self.tag(s, '/')}", {}
            for k, v in m.items():
                if not isinstance(v, list):
                    row[pre + k] = v
                elif k != "downstream_layers" and len(v) == len(m.get("downstream_layers", ())):
                    row.update({f"{pre}{k}/L{l}": x for l, x in zip(m["downstream_layers"], v)})
            self.wandb.log(row, step=m["step"])

    def switch(self, step, runs):
        if self.eta is not None:
            self.eta.switch = step  # what train.py switched at (switch_step(args) computes the same)
        if ddp.MASTER:
            a = self.args
            print(f"switch at step {step}: local -> {', '.join(sorted({r.loss for r in runs}))} (after "
                  f"{step * a.batch_size * a.grad_accum} samples, --local_frac {a.local_frac:g})", flush=True)

    def done(self, steps, elapsed, runs):
        if ddp.MASTER:
            out, names = self.args.out_dir, ",".join(r.name for r in runs)
            where = f"{len(runs)} SAEs in {out}/{{{names}}}" if self.sweep else f"SAE in {out}"
            nxt = f"python analysis.py pareto {out}" if self.sweep else f"python eval.py {out}"
            print(f"done: {steps} steps in {fmt_time(elapsed)}; {where}; next: {nxt}", flush=True)
            if self.wandb:
                self.wandb.finish()

    def steps(self, saes, logs, step, steps, dt, elapsed):
        """The step's line (collective: firing counts summed, loss terms averaged over the processes). dt: the mean
        seconds per step since the last line; elapsed: since the run (this process) started."""
        means = []
        for s, log in zip(saes, logs):
            ddp.sum_to_master_(s.fired)
            means.append(dict(zip(log, ddp.mean_(torch.stack(list(log.values()))).tolist())))
        if self.eta is None:  # start() not called: the ETA from this line on
            self.eta = Eta(steps, switch_step(self.args), step)
        self.eta.update(step, dt)
        if not ddp.MASTER:
            return
        a = self.args
        alive = [int((s.fired > 0).sum()) for s in saes]
        lr, tok_s = saes[0].optimizer.param_groups[0]["lr"], a.batch_size * a.grad_accum * a.ctx / dt
        if self.sweep:
            parts = " | ".join(sae_part(s.r.name, m, n) for s, m, n in zip(saes, means, alive))
        else:
            m = means[0]
            parts = " | ".join([f"loss {m['loss']:.4f}", *(f"{k} {v:.4g}" for k, v in m.items() if k != "loss"),
                                f"alive {alive[0]}"])
        print(step_line(step, steps, parts, lr, dt, tok_s, elapsed, self.eta.fmt(step)), flush=True)
        if self.wandb:
            row = {"train/lr": lr, "train/tok_per_s": tok_s}
            for s, m, n in zip(saes, means, alive):
                row.update({f"train/{self.tag(s, '/')}{k}": v for k, v in dict(m, alive=n).items()})
            self.wandb.log(row, step=step)
