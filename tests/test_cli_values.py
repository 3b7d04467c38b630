"""Bad flag values in every tool: 0, negative and empty values are refused with one line on stderr naming the
flag and the value, never replaced by a default; a diverging run warns once and stops keeping a finite
checkpoint; an SAE that cannot fit in memory is refused before anything is written."""
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import traceback

import pytest
import torch

from conftest import ROOT
from test_train import run, tiny_args


def cli(tool, *argv):
    """(exit status, stderr) of `python tool argv...`, run in a forked child of this process: the tool's file
    runs as __main__ and an uncaught SystemExit or exception ends it as the interpreter would end a script.
    The child starts with torch already imported, so a case costs milliseconds, not a fresh interpreter's
    seconds; test_fork_matches_the_real_interpreter checks the two agree."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        signal.alarm(60)  # a hung case ends the child (and fails) rather than the test run
        try:
            os.close(r)
            sys.stderr, sys.stdout = os.fdopen(w, "w"), open(os.devnull, "w")
            sys.argv = [tool, *argv]
            runpy.run_path(os.path.join(ROOT, tool), run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), err


# a path no case reaches (every bad value is refused before any file is read), in a fresh folder of this
# session, so nothing left by another program can make the check below fail
T = os.path.join(tempfile.mkdtemp(prefix="nanosae-cli-"), "never")
FEATURES = ["features.py", "RUN", "--out", T + "/site"]
TRAIN = ["train.py", "--out_dir", T + "/run"]
# (command line, the flag the one line must name, the value it must show)
CASES = [
    (["eval.py", "RUN", "--batch_size", "0"], "--batch_size", "0"),
    (["eval.py", "RUN", "--batch_size", "-3"], "--batch_size", "-3"),
    (["eval.py", "RUN", "--eval_samples", "0"], "--eval_samples", "0"),
    (["eval.py", "RUN", "--ctx", "0"], "--ctx", "0"),
    (["eval.py", "RUN", "--alive_tokens", "-1"], "--alive_tokens", "-1"),
    (["eval.py", "RUN", "--model", ""], "--model", "''"),
    (["eval.py", "RUN", "--dataset", ""], "--dataset", "''"),
    (["eval.py", "RUN", "--data_dir", ""], "--data_dir", "''"),
    (["eval.py", ""], "source", "''"),
    (["analysis.py", "geometry", "A", "--match_cap", "0"], "--match_cap", "0"),
    (["analysis.py", "geometry", "A", "--n_boot", "-1"], "--n_boot", "-1"),
    (["analysis.py", "geometry", "A", "--alive_tokens", "-5"], "--alive_tokens", "-5"),
    (["analysis.py", "geometry", "A", "--ctx", "0"], "--ctx", "0"),
    (["analysis.py", "geometry", "A", "--out", ""], "--out", "''"),
    (["analysis.py", "geometry", ""], "run_a", "''"),
    (["analysis.py", "seeds", "A", "B", "--chunk", "0"], "--chunk", "0"),
    (["analysis.py", "pareto", "A", "--out", ""], "--out", "''"),
    (["analysis.py", "downstream", "A", ""], "runs", "''"),
    (["interop.py", "export-saelens", "", "OUT"], "src", "''"),
    (["interop.py", "import-apollo", "A.pt", ""], "out_dir", "''"),
    (["interop.py", "push", "FOLDER", ""], "repo", "''"),
    (["interop.py", "push", "FOLDER", "u/r", "--path_in_repo", ""], "--path_in_repo", "''"),
    (["interop.py", "pull", "u/r", "OUT", "--path_in_repo", ""], "--path_in_repo", "''"),
    (FEATURES[:2] + ["--out", ""], "--out", "''"),
    (FEATURES + ["--compare", ""], "--compare", "''"),
    (FEATURES + ["--n_tokens", "0"], "--n_tokens", "0"),
    (FEATURES + ["--k", "-1"], "--k", "-1"),
    (FEATURES + ["--before", "-1"], "--before", "-1"),
    (FEATURES + ["--batch_size", "0"], "--batch_size", "0"),
    (FEATURES + ["--ctx", "0"], "--ctx", "0"),
    (["bench.py", "--batch_size", "0"], "--batch_size", "0"),
    (["bench.py", "--n_layer", "0"], "--n_layer", "0"),
    (["bench.py", "--steps", "-1"], "--steps", "-1"),
    (["bench.py", "--dict_ratio", "0"], "--dict_ratio", "0"),
    (["bench.py", "--dict_ratio", "-2"], "--dict_ratio", "-2"),
    (["bench.py", "--device", ""], "--device", "''"),
    (["bench.py", "--n_sae", "0"], "--n_sae", "0"),
    (["bench_features.py", "collect", "--n_tokens", "0"], "--n_tokens", "0"),
    (["bench_features.py", "collect", "--ratio", "-1"], "--ratio", "-1"),
    (["bench_features.py", "collect", "--tmp", ""], "--tmp", "''"),
    (["bench_features.py", "page", "--page_rows", "0"], "--page_rows", "0"),
    (TRAIN[:1] + ["--out_dir", ""], "--out_dir", "''"),
    (TRAIN + ["--batch_size", "0"], "--batch_size", "0"),
    (TRAIN + ["--eval_samples", "0"], "--eval_samples", "0"),
    (TRAIN + ["--ctx", "-1"], "--ctx", "-1"),
    (TRAIN + ["--lr", "-1"], "--lr", "-1"),
    (TRAIN + ["--dict_ratio", "0"], "--dict_ratio", "0"),
    (TRAIN + ["--seed", "-1"], "--seed", "-1"),
    (TRAIN + ["--init_from", ""], "--init_from", "''"),
    (TRAIN + ["--data_dir", ""], "--data_dir", "''"),
    (TRAIN + ["--model", ""], "--model", "''"),
    (TRAIN + ["--l1", ""], "--l1", "''"),
]


@pytest.mark.parametrize("argv,flag,value", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_value_is_one_line_naming_the_flag(argv, flag, value):
    status, err = cli(*argv)
    lines = err.strip().splitlines()
    assert status != 0 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"{argv[0]}: error: ") and flag in lines[0] and value in lines[0], lines[0]
    assert not os.path.exists(T)


def test_fork_matches_the_real_interpreter():
    """The fork harness gives what `python tool ...` gives, for a few cases of the table."""
    for argv, _, _ in (CASES[0], CASES[41]):
        p = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT, timeout=60)
        assert (p.returncode, p.stderr) == cli(*argv), argv


def test_impossible_sae_is_refused_before_anything_is_written(tmp_path, tiny_model_dir, text_file):
    out, cache = tmp_path / "run", tmp_path / "cache"
    p = run("train.py", *tiny_args(tiny_model_dir, text_file, str(out), "local", dict_ratio=1e9), check=False)
    err = p.stderr.strip()
    assert p.returncode == 1 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "--dict_ratio 1e+09 gives 32,000,000,000 features at d 32: training needs about 30,994.4 GiB" in err
    assert "GiB of RAM" in err
    assert not out.exists() and not cache.exists()  # no run folder, not even the token cache
    status, err = cli("bench.py", "--dict_ratio", "1e9")
    assert status == 1 and len(err.strip().splitlines()) == 1 and "training needs about" in err, err


def test_allocator_failure_is_one_line():
    from sae import new_sae
    with pytest.raises(ValueError, match=r"^out of memory allocating an SAE of 100,000,000,000 features at d 100000 "
                                         r"on cpu \(RuntimeError: .*can't allocate memory"):
        new_sae(100_000, 100_000_000_000, "cpu")  # 80 PB: the allocator refuses at once
    assert new_sae(4, 8, "cpu").n_dict == 8


def sweep_ckpt(out):
    return torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)


def test_diverging_sweep_warns_once_per_sae_and_stops_with_finite_saes(tmp_path, tiny_model_dir, text_file):
    """--lr 1e10: step 0 would throw the weights to ~1e11, still finite: it is undone. Each SAE warns once, its
    steps are skipped, and after --max_bad_steps the run stops; a resume keeps the reference."""
    out = str(tmp_path / "run")
    a = tiny_args(tiny_model_dir, text_file, out, "local", l1="1,2", lr=1e10, max_bad_steps=3)
    p = run("train.py", *a, check=False)
    err = p.stderr.strip()
    assert p.returncode == 1 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "3 diverging steps in a row (loss or weight norm over 1e+06x the first step's, steps 0..2)" in err
    assert "Start again with a lower --lr" in err
    warned = [line for line in p.stdout.splitlines() if "warning: diverging" in line]
    assert [w.split(" | ")[:2] for w in warned] == [["step     0", "local_L1_l1"], ["step     0", "local_L1_l2"]]
    c = sweep_ckpt(out)
    assert c["step"] == 3 and not c["finished"]
    from sae import load_sae
    for r in c["runs"]:
        assert r["bad_steps"] == 3 and r["diverged"] and r["ref"][0] < 1 and 1 < r["ref"][1] < 100
        assert all(torch.isfinite(v).all() for v in r["sae"].values())
        sae, _ = load_sae(os.path.join(out, r["name"]))  # the saved SAE loads
        assert torch.equal(sae.encoder.weight, r["sae"]["encoder.weight"])
    p = run("train.py", "--resume", "--out_dir", out, "--max_bad_steps", 5, check=False)  # the reference is kept
    assert p.returncode == 1 and "5 diverging steps in a row" in p.stderr and "steps 0..4" in p.stderr, p.stderr
    assert "warning" not in p.stdout  # the streak goes on: warned already


def test_healthy_sweep_never_warns(tmp_path, tiny_model_dir, text_file):
    out = str(tmp_path / "run")
    p = run("train.py", *tiny_args(tiny_model_dir, text_file, out, "local,e2e", eval_every=96))
    assert "diverg" not in p.stdout and "skipped" not in p.stdout and p.stdout.count("\ndone: 12 steps") == 1
    for r in sweep_ckpt(out)["runs"]:
        assert r["bad_steps"] == 0 and not r["diverged"] and r["ref"] is not None
        norm = torch.linalg.vector_norm(torch.stack([v.norm() for v in r["sae"].values()]))
        assert 0.1 < norm / r["ref"][1] < 10  # the norm changed by a small factor, far from 1e6


def test_ctrl_c_is_one_line_and_status_130():
    """cli.run, every tool's entry point but train.py's and interop.py's (their own handlers): a real SIGINT."""
    # Python leaves SIGINT ignored when it starts ignored (a background job): install its usual handler first
    # (raise_signal runs the handler before it returns: no race with the next statement)
    code = ("import signal, cli; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "cli.run(lambda: signal.raise_signal(signal.SIGINT), 'x.py')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert p.returncode == 130 and p.stderr == "x.py: interrupted\n", p.stderr
    for tool in ("eval.py", "analysis.py", "features.py", "bench.py", "bench_features.py"):
        assert f'run(main, "{tool}")' in open(os.path.join(ROOT, tool)).read()
