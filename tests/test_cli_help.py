"""--help of every tool and subcommand: every argument is described and every option shows its default."""
import os
import subprocess
import sys

import pytest

import analysis
import eval as ev
import interop
from conftest import ROOT

MAINS = {"eval.py": ev.main, "analysis.py": analysis.main, "interop.py": interop.main}
COMMANDS = [("eval.py",), ("analysis.py",), ("analysis.py", "geometry"), ("analysis.py", "pareto"),
            ("analysis.py", "downstream"), ("interop.py",), ("interop.py", "import-apollo"),
            ("interop.py", "import-saelens"), ("interop.py", "export-saelens"), ("interop.py", "push"),
            ("interop.py", "pull"), ("bench.py",)]


def help_text(tool, *sub, capsys=None):
    if tool == "bench.py":  # its parser is read at import; run the real command line
        p = subprocess.run([sys.executable, os.path.join(ROOT, tool), "--help"], capture_output=True, text=True,
                           cwd=ROOT, timeout=60)
        assert p.returncode == 0, p.stderr
        return p.stdout
    with pytest.raises(SystemExit) as e:
        MAINS[tool]([*sub, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def entries(text):
    """{name: its whole entry on one line} for the arguments listed under 'positional arguments:' and 'options:'."""
    out, name, section = {}, None, None
    for line in text.splitlines():
        if line and not line.startswith(" "):
            section, name = line, None
        elif section in ("positional arguments:", "options:") and line.strip():
            if not line.startswith("   "):  # a new entry starts at an indent of two
                name = line.split()[0].rstrip(",")
                out[name] = line.strip()
            else:
                out[name] += " " + line.strip()
    return out


@pytest.mark.parametrize("cmd", COMMANDS, ids=" ".join)
def test_every_argument_described_and_every_default_shown(cmd, capsys):
    text = help_text(*cmd, capsys=capsys)
    e = entries(text)
    assert "-h" in e and len(e) >= 2, text
    for name, entry in e.items():
        if name == "-h" or name.startswith("{"):  # help itself; the list of subcommands
            continue
        words = entry.split()
        described = words[2:] if name.startswith("--") and len(words) > 1 and words[1].isupper() else words[1:]
        assert described, f"{' '.join(cmd)}: {name} has no help"
        if name.startswith("--"):
            assert "(default: " in entry, f"{' '.join(cmd)}: {entry}"


@pytest.mark.parametrize("cmd, name, words", [
    (("eval.py",), "--alive_tokens", ["(default: 500000)"]),
    (("eval.py",), "--eval_samples", ["the run's, else 500", "(default: None)"]),
    (("eval.py",), "--dtype", ["autocast", "(default: float32)"]),
    (("analysis.py", "geometry"), "run_a", ["run folder", "SAELens", "Apollo"]),
    (("analysis.py", "geometry"), "run_b", ["A→B", "B→A", "within A only"]),
    (("analysis.py", "geometry"), "--alive_from", ["saved =", "eval =", "all =", "(default: saved)"]),
    (("analysis.py", "geometry"), "--n_boot", ["bootstrap", "95% CI", "(default: 1000)"]),
    (("analysis.py", "geometry"), "--match_cap", ["(default: 4096)"]),
    (("analysis.py", "pareto"), "--json", ["(default: False)"]),
    (("interop.py", "push"), "--private", ["(default: False)"]),
    (("interop.py", "pull"), "--path_in_repo", ["(default: None)"]),
    (("bench.py",), "--n_layer", ["(default: 12)"]),
    (("bench.py",), "--dict_ratio", ["(default: 8.0)"]),
])
def test_named_defaults(cmd, name, words, capsys):
    entry = entries(help_text(*cmd, capsys=capsys))[name]
    assert all(w in entry for w in words), entry
