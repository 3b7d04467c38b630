"""Data loss: no CLI destroys what it did not write, overwrites an SAE without --force, or leaves a temp file after
a failure. Each case prepares a folder with files in it, runs the real CLI in a subprocess (with a fault injected
by tests/faults.py where the OS would cause it: a full disk, a read-only folder, Ctrl-C) and asserts exit != 0,
one line on stderr, no traceback, and every file that was there byte-identical afterwards."""
import os
import stat
import subprocess
import sys

import pytest
import torch

import checkpoint
import interop
from conftest import ROOT
from interop import write_saelens
from sae import SAE, load_sae, save_firing, save_sae
from test_interop import write_apollo
from test_train import ENV, tiny_args

FOREIGN_LOG = b'{"step": 3, "note": "my own log"}\nno newline after this line, and it is not a record'
USER_FILES = {"notes.txt": b"mine\n", ".write_test": b"a file of the user, not a probe\n",
              "ckpt.pt.tmp": b"not ours either", "eval.jsonl.tmp": b"nor this"}


def snapshot(folder):
    """{path relative to folder: bytes, or None for a folder} of everything under folder, hidden files included."""
    out = {}
    for d, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = os.path.join(d, name)
            out[os.path.relpath(p, folder)] = None if os.path.isdir(p) else open(p, "rb").read()
    return out


def put(folder, files):
    for rel, data in files.items():
        path = os.path.join(folder, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "wb").write(data)


def cli(*argv, fault=None):
    cmd = [sys.executable, os.path.join(ROOT, "tests", "faults.py"), fault] if fault else [sys.executable]
    cmd += [argv[0] if fault else os.path.join(ROOT, argv[0]), *map(str, argv[1:])]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=120)


def assert_one_line(p, rc, words):
    err = p.stderr.strip()
    assert p.returncode == rc and "Traceback" not in err and len(err.splitlines()) == 1, (p.returncode, err, p.stdout)
    for w in words:
        assert w in err, (w, err)


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model_dir, text_file):
    """Sources for every case: a run folder (an SAE of the tiny model, with firing counts), a SAELens export of
    it and an Apollo .pt; and the train.py arguments of a tiny local run into a given folder."""
    base = tmp_path_factory.mktemp("sources")
    run, lens, apollo = str(base / "run"), str(base / "lens"), str(base / "local_similar_ce_layer_1.pt")
    sae = SAE(32, 128)
    cfg = dict(layer=1, model=tiny_model_dir, center=True, loss="local", args=dict(dataset=text_file, ctx=32))
    save_sae(sae, run, cfg)
    save_firing(run, torch.full((128,), 0.25, dtype=torch.float64), 1000)
    write_saelens(sae, cfg, lens, firing=interop.load_firing(run))
    write_apollo(apollo, layer=1)
    cache = str(base / "cache")

    def train(out, **kw):
        return tiny_args(tiny_model_dir, text_file, out, "local", **dict(dict(n_samples=8, eval_samples=4,
                                                                                 data_dir=cache), **kw))
    return dict(run=run, lens=lens, apollo=apollo, train=train)


EARLIER_EXPORT = {"cfg.json": b'{"d_sae": 512}', "sae_weights.safetensors": b"an earlier SAE of 512 features",
                  "sparsity.safetensors": b"512 entries"}
RUN_FOLDER = {"sae.safetensors": b"an SAE trained elsewhere", "sae.json": b'{"d": 32}', "firing.safetensors": b"f",
              "notes.txt": b"mine\n"}

# (id, files in the folder, argv (from env and the folder), fault, exit status, words of the one line)
CASES = [
    ("train: another program's eval.jsonl, a torn last line, a user's .write_test",
     dict(USER_FILES, **{"eval.jsonl": FOREIGN_LOG}), lambda e, d: ["train.py", *e["train"](d)], None, 1,
     ["holds eval.jsonl but no checkpoint", "remove them"]),
    ("train: an SAE of another program",
     RUN_FOLDER, lambda e, d: ["train.py", *e["train"](d)], None, 1,
     ["holds sae.safetensors, sae.json, firing.safetensors but no checkpoint"]),
    ("train sweep: another program's eval.jsonl in one SAE's subfolder",
     {"notes.txt": b"x", "local_L1_l2/eval.jsonl": FOREIGN_LOG},
     lambda e, d: ["train.py", *e["train"](d, l1="1,2")], None, 1, ["local_L1_l2", "eval.jsonl but no checkpoint"]),
    ("train: --ctx 1 (the eval cannot be computed)",
     USER_FILES, lambda e, d: ["train.py", *e["train"](d, ctx=1)], None, 1, ["--ctx must be >= 2, got 1"]),
    ("train: a user's file named like the lock file",
     {".train.lock": b"my lock of something else\n"}, lambda e, d: ["train.py", *e["train"](d)], None, 1,
     [".train.lock", "not a lock file of train.py"]),
    ("train: Ctrl-C during set-up, the lock already taken",
     USER_FILES, lambda e, d: ["train.py", *e["train"](d)], "sigint-setup", 130, ["interrupted during set-up"]),
    ("train: Ctrl-C during set-up of a folder it had to make",
     USER_FILES, lambda e, d: ["train.py", *e["train"](os.path.join(d, "new", "run"))], "sigint-setup", 130,
     ["interrupted during set-up"]),
    ("import-saelens into a run folder", RUN_FOLDER, lambda e, d: ["interop.py", "import-saelens", e["lens"], d],
     None, 1, ["is not empty", "--force"]),
    ("import-apollo into a run folder", RUN_FOLDER, lambda e, d: ["interop.py", "import-apollo", e["apollo"], d],
     None, 1, ["is not empty", "--force"]),
    ("export-saelens over an earlier export", EARLIER_EXPORT,
     lambda e, d: ["interop.py", "export-saelens", e["run"], d], None, 1, ["is not empty", "--force"]),
    ("export-saelens --force, disk full while writing", {"export/" + k: v for k, v in EARLIER_EXPORT.items()},
     lambda e, d: ["interop.py", "export-saelens", e["run"], os.path.join(d, "export"), "--force"],
     "enospc:sae_weights.safetensors:0", 1, ["sae_weights.safetensors", "No space left on device", "nothing was written"]),
    ("import-saelens --force into a folder holding the source", {"notes.txt": b"x"},
     lambda e, d: ["interop.py", "import-saelens", e["lens"], os.path.dirname(e["lens"]), "--force"], None, 1,
     ["holds the source"]),
    ("eval.py --save_firing on a read-only file system", RUN_FOLDER,
     lambda e, d: ["eval.py", d, "--save_firing"], "erofs:{d}", 1, ["not writable", "Read-only file system"]),
    ("eval.py --save_firing into a folder without write permission", RUN_FOLDER,
     lambda e, d: ["eval.py", d, "--save_firing"], "eacces:{d}", 1, ["not writable", "Permission denied"]),
]


@pytest.mark.parametrize("files,argv,fault,rc,words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_refused_or_failed_and_nothing_touched(env, tmp_path, files, argv, fault, rc, words):
    folder, sources = str(tmp_path / "folder"), os.path.dirname(env["lens"])
    put(folder, files)
    before, sources_before = snapshot(str(tmp_path)), snapshot(sources)
    p = cli(*argv(env, folder), fault=fault and fault.format(d=folder))
    assert_one_line(p, rc, words)
    assert snapshot(str(tmp_path)) == before  # byte-identical, and no new file or folder (no temp file, no lock)
    assert snapshot(sources) == sources_before


def test_disk_full_while_saving_the_checkpoint_keeps_the_last_one(env, tmp_path):
    """A run of one step: ckpt.pt (and the SAE) are saved first, at step 0; the final save finds the disk full."""
    folder = str(tmp_path / "run")
    put(folder, USER_FILES)
    p = cli("train.py", *env["train"](folder), fault="enospc:ckpt.pt:1")
    assert_one_line(p, 1, [repr(os.path.join(folder, "ckpt.pt")), "No space left on device", "--resume"])
    after = snapshot(folder)
    assert {k: after[k] for k in USER_FILES} == USER_FILES
    assert sorted(set(after) - set(USER_FILES)) == ["ckpt.pt", "eval.jsonl", "firing.safetensors", "sae.json",
                                                    "sae.safetensors"]  # and no temp file
    c = torch.load(os.path.join(folder, "ckpt.pt"), weights_only=True)
    assert c["step"] == 0 and not c["finished"]  # the last whole checkpoint


def test_failed_final_eval_still_saves_the_sae(env, tmp_path):
    folder = str(tmp_path / "run")
    p = cli("train.py", *env["train"](folder), fault="eval")
    assert_one_line(p, 1, ["final evaluation failed (ZeroDivisionError", f"saved in {folder}"])
    c = torch.load(os.path.join(folder, "ckpt.pt"), weights_only=True)
    assert c["step"] == 1 and c["finished"]
    assert torch.equal(load_sae(folder)[0].encoder.weight, c["runs"][0]["sae"]["encoder.weight"])


@pytest.mark.parametrize("cmd", ["export-saelens", "import-saelens"])
def test_force_replaces_the_target_whole(env, tmp_path, cmd):
    out = str(tmp_path / "out")
    put(out, dict(EARLIER_EXPORT, **RUN_FOLDER, **{"sub/x": b"old"}))
    src = env["run"] if cmd == "export-saelens" else env["lens"]
    interop.main([cmd, src, out, "--force"])
    want = {"export-saelens": ["cfg.json", "sae_weights.safetensors", "sparsity.safetensors"],
            "import-saelens": ["firing.safetensors", "sae.json", "sae.safetensors"]}[cmd]
    assert sorted(os.listdir(out)) == want  # nothing of the old folder remains
    assert len(interop.load_firing(out)["freq"]) == 128  # the new SAE's, not the 512 of the earlier export
    assert [f for f in os.listdir(tmp_path) if f != "out"] == []  # no temp or old folder beside it
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o777 & ~current_umask()


def current_umask():
    u = os.umask(0)
    os.umask(u)
    return u


@pytest.mark.parametrize("last, kept", [('{"step": 8, "l0": 1.', [4]), ("my own notes", None)])
def test_only_a_torn_record_is_dropped_from_eval_log(tmp_path, last, kept):
    """A resume trims eval.jsonl; a last line without a newline is dropped only if it is the start of a record
    (a write of ours cut short), never a line someone added."""
    path = str(tmp_path / "eval.jsonl")
    open(path, "w").write('{"step": 4}\n' + last)
    if kept is None:
        with pytest.raises(ValueError, match="line 2 is not an evaluation record"):
            checkpoint.check_out_dir(str(tmp_path), ckpt_exists=True)
    else:
        assert [r["step"] for r in checkpoint.read_eval_log(path)] == kept


def test_a_stale_firing_file_of_another_size_is_ignored_with_a_note(tmp_path, capsys):
    """An export folder written over by hand before --force existed: sparsity.safetensors of an earlier, larger
    SAE. Loading it must not hand analysis 512 frequencies for 256 features."""
    lens = str(tmp_path / "lens")
    write_saelens(SAE(32, 256), dict(layer=1, model="gpt2", center=True), lens)
    interop.save_tensors({"sparsity": torch.zeros(512)}, os.path.join(lens, "sparsity.safetensors"))
    sae, _, firing = interop.load_any(lens)
    assert sae.n_dict == 256 and firing is None
    assert "has 512 entries, not the SAE's 256 features; ignored" in capsys.readouterr().err
