"""
What a training run prints and records: a line per step and per evaluation on stdout (a sweep's lines name their
SAE), each evaluation appended to its run folder's eval.jsonl, and with --wandb the same numbers in W&B
(train/<term>, eval/<metric>; a sweep's keys hold the SAE's name: train/<name>/<term>).

    step   120/400 | loss 0.1234 | sparsity 0.51 | kl 0.0412 | l0 31.2 | alive 4012 | lr 4.1e-04 | 312ms | 26.2k tok/s | 0m41s | eta 1m27s
    eval step 200 | l0 30.91 | alive 4100 | ce +0.0451 | kl 0.0433 | mse 0.3121 | ev 0.912
"""
import os

import torch

import ddp
from checkpoint import append_eval_log
from cli import fmt_time


class Log:
    """The run's lines on stdout (a sweep's name their SAE) and, with --wandb, W&B."""

    def __init__(self, args, saes, ckpt):
        self.args, self.saes, self.resuming, self.wandb = args, saes, ckpt is not None, None
        self.sweep = len(saes) > 1
        self.wandb_id = ckpt.get("wandb_id") if ckpt else None

    def init_wandb(self):
        """With --wandb: the run's W&B run (rank 0), continued on a resume (its id is kept in ckpt.pt)."""
        if ddp.MASTER and self.args.wandb:
            import wandb
            self.wandb = wandb
            self.wandb_id = wandb.init(project=self.args.wandb_project, config=vars(self.args), id=self.wandb_id,
                                       resume="allow").id

    def start(self, step, steps, device):
        if ddp.MASTER:
            a, names = self.args, ", ".join(s.r.name for s in self.saes)
            what = f"{len(self.saes)} SAEs ({names})" if self.sweep else "1 SAE"
            print(f"{'resuming' if self.resuming else 'starting'} {a.out_dir} at step {step} of {steps}: {what}, "
                  f"{a.batch_size * a.grad_accum} samples per step, {ddp.WORLD} process{'es' * ddp.DDP}, {device}",
                  flush=True)

    def tag(self, s, sep):
        return s.r.name + sep if self.sweep else ""

    def eval(self, s, m):
        append_eval_log(os.path.join(s.r.out_dir, "eval.jsonl"), m)
        print(f"eval step {m['step']} | {self.tag(s, ' | ')}l0 {m['l0']:.2f} | alive {m['alive']} | ce "
              f"+{m['ce_increase']:.4f} | kl {m['kl']:.4f} | mse {m['mse']:.4g} | ev {m['explained_variance']:.3f}",
              flush=True)
        if self.wandb:
            self.wandb.log({f"eval/{self.tag(s, '/')}{k}": v for k, v in m.items() if not isinstance(v, list)},
                           step=m["step"])

    def switch(self, step, runs):
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

    def steps(self, saes, logs, step, steps, dt, elapsed):
        """The step's lines (collective: firing counts summed, loss terms averaged over the processes)."""
        for s, log in zip(saes, logs):
            ddp.sum_to_master_(s.fired)
            self.step(s, log, step, steps, dt, elapsed)

    def step(self, s, logs, step, steps, dt, elapsed):
        """One SAE's step line: its loss terms (the mean over processes), alive, lr, speed and ETA."""
        logs = dict(zip(logs, ddp.mean_(torch.stack(list(logs.values()))).tolist()))
        if not ddp.MASTER:
            return
        terms = " | ".join(f"{k} {v:.4g}" for k, v in logs.items() if k != "loss")
        tok_s = self.args.batch_size * self.args.grad_accum * self.args.ctx / dt
        print(f"step {step:5d}/{steps} | {self.tag(s, ' | ')}loss {logs['loss']:.4f} | {terms} | alive "
              f"{int((s.fired > 0).sum())} | lr {s.optimizer.param_groups[0]['lr']:.2e} | {dt * 1000:.0f}ms | "
              f"{tok_s / 1000:.1f}k tok/s | {fmt_time(elapsed)} | eta {fmt_time(dt * (steps - step - 1))}", flush=True)
        if self.wandb:
            self.wandb.log({f"train/{self.tag(s, '/')}{k}": v for k, v in logs.items()}, step=step)
