"""The README's first two commands, as a new user copies them: each installs the CPU build of torch on a machine
without a GPU and the default (CUDA) build where nvidia-smi finds one, then the requirements, then runs the main
job or the tests; .ci/run runs the README's test command as written."""
import os
import stat
import subprocess

import pytest

from conftest import ROOT

CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def readme_commands():
    lines = [line for line in open(os.path.join(ROOT, "README.md")).read().split("```bash\n", 1)[1].split("```")[0]
             .splitlines() if line.strip()]
    return {line.rsplit("# ", 1)[1]: line.rsplit("  # ", 1)[0] for line in lines}


def fake(bin_dir, name, code=0):
    """A command on PATH that logs its arguments and exits with code."""
    path = os.path.join(bin_dir, name)
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\necho "{name} $*" >> "$LOG"\nexit {code}\n')
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("gpu", [False, True])
@pytest.mark.parametrize("which", ["the main job", "the tests"])
def test_the_first_commands_pick_the_torch_build(tmp_path, gpu, which):
    cmd = readme_commands()[which]
    bin_dir, log = str(tmp_path / "bin"), str(tmp_path / "log")
    os.makedirs(bin_dir)
    for name in ("pip", "python"):
        fake(bin_dir, name)
    if gpu:
        fake(bin_dir, "nvidia-smi")
    env = dict(PATH=bin_dir + os.pathsep + "/usr/bin:/bin", LOG=log)
    subprocess.run(["bash", "-c", cmd], env=env, cwd=ROOT, check=True, timeout=30)
    calls = [c for c in open(log).read().splitlines() if not c.startswith("nvidia-smi")]
    assert calls[0] == ("pip install torch" if gpu else f"pip install torch {CPU_INDEX}")
    assert calls[1].startswith("pip install -r requirements.txt")
    assert calls[2] == ("python train.py --loss e2e_ds --layer 6" if which == "the main job" else
                        "python -m pytest -q tests")


def test_ci_runs_the_readme_test_command():
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "grep -m1 '# the tests$' README.md" in ci and 'eval "$test_command"' in ci
    assert "pip install -r" not in ci  # the requirements are installed once, by the README's command
    for req in ("requirements.txt", "requirements-test.txt"):
        assert req in readme_commands()["the tests"]
