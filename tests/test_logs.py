"""The step lines (logs.py): one line per step, a sweep's SAEs on it compactly and the shared numbers once; tokens per
second in a unit that fits; an ETA that knows --local_frac's two phases. Unit tests with made-up numbers, then one
real sweep of 3 tiny SAEs with a local phase."""
import re
from types import SimpleNamespace

import pytest
import torch

from test_train import run, tiny_args

import logs
from logs import Eta, Log, fmt_rate


@pytest.mark.parametrize("x,want", [(0.04, "0.0"), (0.3, "0.3"), (4.5, "4.5"), (9.96, "10"), (348.4, "348"),
                                    (999.4, "999"), (999.6, "1.0k"), (26_240, "26.2k"), (999_900, "999.9k"),
                                    (999_960, "1.00M"), (1_314_000, "1.31M"), (52e6, "52.00M")])
def test_fmt_rate(x, want):
    assert fmt_rate(x) == want


def test_eta_one_phase():
    e = Eta(400, 0, 0)
    e.update(0, 0.5)  # the first line times step 0 alone
    assert e.left(0) == 399 * 0.5 and e.fmt(0) == "eta 3m19s"
    e.update(10, 0.2)  # then steps 1..10
    assert e.left(10) == pytest.approx(389 * 0.2) and e.fmt(399 - 1) == "eta 0m00s"
    assert Eta(10, 10, 0).switch == Eta(10, 0, 0).switch == 0  # --local_frac 1 or 0: one phase


def test_eta_local_phase_then_e2e():
    e = Eta(100, 50, 0)  # --local_frac 0.5: steps 0..49 local, 50..99 e2e
    e.update(9, 0.1)
    assert e.left(9) is None and e.fmt(9) == "eta ? (switch in 0m04s)"  # 40 local steps at 0.1 s; e2e not timed yet
    e.update(49, 0.1)
    assert e.fmt(49) == "eta ? (switch in 0m00s)"
    e.update(59, 2.0)  # the first e2e steps: from now on their speed, not the local one
    assert e.left(59) == pytest.approx(40 * 2.0) and e.fmt(59) == "eta 1m20s"
    e.update(69, 3.0)
    assert e.left(69) == pytest.approx(30 * 3.0)


def test_eta_window_over_the_switch():
    e = Eta(100, 45, 0)
    e.update(39, 0.1)
    e.update(49, (5 * 0.1 + 5 * 2.0) / 10)  # steps 40..44 local, 45..49 e2e at 2 s: the line's mean
    assert e.dt["main"] == pytest.approx(2.0) and e.left(49) == pytest.approx(50 * 2.0)
    r = Eta(100, 45, 42)  # resumed at step 42: its first window spans the switch, no local speed yet
    r.update(49, 1.0)
    assert r.left(49) == pytest.approx(50 * 1.0)


def test_eta_resumed_and_sparse_lines():
    e = Eta(100, 50, 20)  # resumed at 20, a line every 10 steps: the first times 20..29
    e.update(29, 0.5)
    assert e.fmt(29) == "eta ? (switch in 0m10s)"  # steps 30..49
    e = Eta(100, 50, 70)  # resumed after the switch
    e.update(70, 1.0)
    assert e.fmt(70) == "eta 0m29s"


def test_switch_step():  # train.py's; the sweep run below checks they agree
    a = SimpleNamespace(local_frac=0.5, n_samples=96, batch_size=4, grad_accum=2)
    assert logs.switch_step(a) == 6
    assert logs.switch_step(SimpleNamespace(**dict(vars(a), local_frac=0.0))) == 0


def fake_sae(name, n_alive, lr=4.1e-4):
    fired = torch.zeros(64, dtype=torch.float64)
    fired[:n_alive] = 1
    return SimpleNamespace(r=SimpleNamespace(name=name), fired=fired,
                           optimizer=SimpleNamespace(param_groups=[dict(lr=lr)]))


def fake_log(saes, **kw):
    args = SimpleNamespace(**dict(dict(batch_size=8, grad_accum=2, ctx=1024, local_frac=0.0, n_samples=400 * 16,
                                       out_dir="out/x", wandb=False), **kw))
    log = Log(args, saes, None)
    log.eta = Eta(400, logs.switch_step(args), 0)
    return log


def terms(**kw):
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in kw.items()}


def test_one_sae_line_layout(capsys):
    s = fake_sae("e2e_L6_l3", 40)
    log = fake_log([s])
    log.steps([s], [terms(sparsity=0.51, kl=0.0412, l0=31.2, loss=0.1234)], 120, 400, 0.312, 41.0)
    assert capsys.readouterr().out == ("step   120/400 | loss 0.1234 | sparsity 0.51 | kl 0.0412 | l0 31.2 | alive 40 | "
                                       "lr 4.10e-04 | 312ms | 52.5k tok/s | 0m41s | eta 1m27s\n")


def test_sweep_is_one_line(capsys):
    saes = [fake_sae("local_L6_l4", 40), fake_sae("e2e_L6_l3", 38)]
    log = fake_log(saes, ctx=128)
    log.steps(saes, [terms(sparsity=0.5, mse=0.01, l0=31.24, loss=0.1234),
                     terms(sparsity=0.4, kl=0.02, l0=28.9, loss=0.0571)], 120, 400, 3.2, 400.0)
    out = capsys.readouterr().out
    assert out == ("step   120/400 | local_L6_l4: loss 0.1234 l0 31.2 alive 40 | e2e_L6_l3: loss 0.0571 l0 28.9 alive 38"
                   " | lr 4.10e-04 | 3200ms | 640 tok/s | 6m40s | eta 14m52s\n")


def test_local_frac_line_says_eta_unknown(capsys):
    s = fake_sae("e2e_ds_L6_l50", 10)
    log = fake_log([s], local_frac=0.5)  # switch at step 200
    log.steps([s], [terms(sparsity=0.5, mse=0.01, l0=3.0, loss=0.1)], 0, 400, 0.05, 1.0)
    assert capsys.readouterr().out.endswith(" | eta ? (switch in 0m09s)\n")  # steps 1..199 at 0.05 s
    log.steps([s], [terms(sparsity=0.5, mse=0.01, l0=3.0, loss=0.1)], 199, 400, 0.05, 10.0)
    assert capsys.readouterr().out.endswith(" | eta ? (switch in 0m00s)\n")
    log.switch(200, [SimpleNamespace(loss="e2e_ds")])
    log.steps([s], [terms(sparsity=0.5, kl=0.01, ds=0.2, l0=3.0, loss=0.1)], 200, 400, 1.0, 20.0)
    assert capsys.readouterr().out.splitlines()[-1].endswith(" | eta 3m19s")


def test_sweep_run_one_line_per_step(tmp_path, tiny_model_dir, text_file):
    """3 SAEs, 4 steps, a local phase of 2: one line per step with every SAE; the part before " | lr " without
    timings (test_reliability's step_lines); the ETA unknown until an e2e step is timed, then in minutes."""
    out = str(tmp_path / "sweep")
    p = run("train.py", *tiny_args(tiny_model_dir, text_file, out, "local,e2e,e2e_ds", n_samples=32, eval_every=32,
                                   local_frac=0.5))
    names = re.search(r"^starting .*: 3 SAEs \((.*)\), ", p.stdout, re.M).group(1).split(", ")
    lines = [line for line in p.stdout.splitlines() if line.startswith("step ")]
    assert [line[:10] for line in lines] == [f"step {i:5d}" for i in range(4)], p.stdout
    part = r"{}: loss \d+\.\d{{4}} l0 \d+\.\d alive \d+"
    head = r"^step +\d/4 \| " + r" \| ".join(part.format(re.escape(n)) for n in names)
    tail = r" \| lr \d\.\d\de-\d\d \| \d+ms \| \d+(\.\d+)?[kM]? tok/s \| \dm\d\ds \| eta "
    for i, line in enumerate(lines):
        eta = r"\? \(switch in 0m0\ds\)" if i < 2 else r"0m0\ds"
        assert re.match(head + tail + eta + "$", line), line
        assert "0.0k" not in line and line.count(" | lr ") == 1
    assert "switch at step 2: local -> e2e, e2e_ds, local" in p.stdout
