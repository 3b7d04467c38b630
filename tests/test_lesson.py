"""The lesson (README "The paper on a CPU", docs/LESSON.md) end to end at toy sizes: the README's commands run as
written, in a bash where `python SCRIPT` appends flags that shrink each run (a 6-layer d-32 LM on a small text,
SAEs of 64 features on 32 samples). The README's commands are the lesson's: each is in docs/LESSON.md too."""
import glob
import json
import os
import re
import subprocess
import sys

from conftest import ROOT, make_text

TOY = {  # appended: argparse keeps a flag's last value, so these win over the lesson's sizes
    "tiny_lm.py": "--data {text} --n_layer 6 --n_embd 32 --n_head 2 --ctx 32 --batch_size 4 --val_rows 4 --steps 6 "
                  "--warmup 1 --eval_every 3 --data_dir {cache}",
    "train.py": "--dataset {text} --ctx 16 --dict_ratio 2 --n_samples 32 --eval_samples 4 --batch_size 4 "
                "--grad_accum 1 --data_dir {cache}",
    "analysis.py": "",
}


def readme_lesson():
    """The bash block of the README's "The paper on a CPU" section."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = re.search(r"^## The paper on a CPU\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no section '## The paper on a CPU'"
    block = re.search(r"```bash\n(.*?)```", section.group(1), re.S)
    assert block, "the README's lesson section has no bash block"
    return block.group(1)


def commands(block):
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_commands_are_the_lessons():
    lesson = open(os.path.join(ROOT, "docs", "LESSON.md"), encoding="utf-8").read()
    cmds = commands(readme_lesson())
    assert len(cmds) >= 10
    for c in cmds:
        assert c in lesson, f"docs/LESSON.md lacks the README's command {c!r}"


def test_lesson_runs_end_to_end(tmp_path):
    (tmp_path / "input.txt").write_text(make_text(6000))
    (tmp_path / "docs").mkdir()
    toy = {k: v.format(text=tmp_path / "input.txt", cache=tmp_path / "cache") for k, v in TOY.items()}
    prelude = "\n".join([
        "set -euo pipefail",
        "declare -A TOY=(" + " ".join(f"[{k}]={json.dumps(v)}" for k, v in toy.items()) + ")",
        f'python() {{ local s=$1; shift; {sys.executable} "{ROOT}/$s" "$@" ${{TOY[$s]}}; }}',
        "apt-get() { :; }  # the default corpus: the toy runs bring their own text",
    ])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(["bash", "-c", prelude + "\n" + readme_lesson()], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "out"
    assert json.load(open(out / "tiny_lm" / "config.json"))["n_layer"] == 6
    sweep = sorted(os.path.basename(os.path.dirname(f)) for f in glob.glob(str(out / "lesson/sweep/*/sae.json")))
    assert sweep == sorted(["local_L3_l0.5", "local_L3_l1", "local_L3_l2", "local_L3_l4", "e2e_L3_l1", "e2e_L3_l4",
                            "e2e_ds_L3_l5", "e2e_ds_L3_l10", "e2e_ds_L3_l20"])
    pngs = sorted(glob.glob(str(tmp_path / "docs" / "*.png")))
    assert [os.path.basename(f) for f in pngs] == ["lesson_downstream.png", "lesson_pareto.png"]  # Fig. 2, Fig. 1
    for png in pngs:
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    ft = [json.loads(line) for line in open(out / "lesson" / "finetune" / "eval.jsonl")]
    assert ft[0]["step"] == 0 and ft[-1]["step"] > 0  # the source's numbers, then the fine-tune's
    assert p.stdout.count("final eval") == 3 and "(from local_L3_l2)" in p.stdout  # 3 seeds tables; the fine-tune's series
