"""Bad input files, each refused where it is read with one line naming the file, the line or row, and what was
expected; never a traceback, never a silently wrong run. Three groups:
    tracebacks         inputs that used to end in a Python traceback
    silent acceptance  inputs that used to be taken without a word (token ids that wrap, a cache of random bytes)
    messages           inputs whose error did not name the file or the line
Most cases call the reader directly; a few per group run the real CLI (train.py, eval.py, analysis.py)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, make_text

ENV = dict(os.environ, OMP_NUM_THREADS="1")
IDS = np.random.default_rng(0).integers(0, 50000, size=(12, 16)).tolist()  # 12 distinct rows of 16 token ids


def one_line(msg):
    msg = str(msg)
    lines = [line for line in msg.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in msg, msg
    return lines[0]


def jsonl(*records):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


def ids_file(bad_row, at=3):
    """jsonl of IDS with bad_row as line `at` (after rows that tokenise fine, so the cache has begun)."""
    rows = [{"input_ids": r} for r in IDS]
    rows.insert(at - 1, bad_row)
    return jsonl(*rows)


def parquet(table):
    def write(path):
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table(table), path)
    return write


# ----------------------------------------------------------------------------- datasets (data.load_split)

DATA = [  # (group, case, file name, its content (text, bytes, or a writer of the path), words of the message)
    ("tracebacks", "jsonl line 3 an array", "arr.jsonl", ids_file([1, 2, 3]), ["arr.jsonl line 3", "an array"]),
    ("tracebacks", "jsonl line 3 a number", "num.jsonl", ids_file(7), ["num.jsonl line 3", "a number"]),
    ("tracebacks", "row lacks the first row's column", "miss.jsonl", ids_file({"body": "x"}),
     ["miss.jsonl line 3", "no 'input_ids'", "['body']", "miss.jsonl line 1"]),
    ("tracebacks", "text row among token rows", "mixed.jsonl", ids_file({"text": "hello"}),
     ["mixed.jsonl line 3", "no 'input_ids'", "all text or all token ids"]),
    ("tracebacks", "token row among text rows", "mixed2.jsonl",
     jsonl({"text": make_text(200)}, {"input_ids": IDS[0]}), ["mixed2.jsonl line 2", "no 'text'", "all text or all"]),
    ("tracebacks", "text that is a number", "tnum.jsonl", jsonl({"text": make_text(200)}, {"text": 5}),
     ["tnum.jsonl line 2", "'text' is a number", "expected a string"]),
    ("tracebacks", "input_ids that is a number", "inum.jsonl", ids_file({"input_ids": 5}),
     ["inum.jsonl line 3", "'input_ids' is a number", "list of integer token ids"]),
    ("tracebacks", "parquet scalar input_ids column", "scalar.parquet", parquet({"input_ids": list(range(100))}),
     ["scalar.parquet row 0", "'input_ids' is a number", "list of integer token ids"]),
    ("tracebacks", "parquet integer text column", "itext.parquet", parquet({"text": list(range(100))}),
     ["itext.parquet row 0", "'text' is a number"]),
    ("silent acceptance", "negative token id", "neg.jsonl", ids_file({"input_ids": [5, -1] + IDS[0]}),
     ["neg.jsonl line 3", "token id -1 at position 1", "0..65535"]),
    ("silent acceptance", "float token id", "float.jsonl", ids_file({"input_ids": [5, 1.5] + IDS[0]}),
     ["float.jsonl line 3", "a number (1.5) at position 1", "integer token ids"]),
    ("silent acceptance", "boolean token id", "bool.jsonl", ids_file({"input_ids": [True] + IDS[0]}),
     ["bool.jsonl line 3", "a boolean (True) at position 0"]),
    ("silent acceptance", "string token id", "str.jsonl", ids_file({"input_ids": ["7"] + IDS[0]}),
     ["str.jsonl line 3", "a string ('7') at position 0"]),
    ("silent acceptance", "token id above uint16", "big.jsonl", ids_file({"input_ids": [70000] + IDS[0]}),
     ["big.jsonl line 3", "token id 70000", "0..65535"]),
    ("silent acceptance", "token id above int64", "huge.jsonl", ids_file({"input_ids": [2 ** 70] + IDS[0]}),
     ["huge.jsonl line 3", f"token id {2 ** 70}"]),
    ("silent acceptance", "token id outside the vocabulary", "vocab.jsonl",
     ids_file({"input_ids": IDS[0][:5] + [50300]}, 12),
     ["vocab.jsonl line 12", "token id 50300 at position 5", "vocabulary of 50257"]),
    ("messages", "txt not UTF-8", "latin.txt", make_text(400).encode() + b"\ncaf\xe9 au lait\n",
     ["latin.txt line 2", "not UTF-8", "byte 0xe9", "convert the file to UTF-8"]),
    ("messages", "jsonl not UTF-8", "latin.jsonl", ids_file({"input_ids": IDS[0]}).encode() + b'{"text": "\xff"}\n',
     ["latin.jsonl line 14", "not UTF-8", "byte 0xff"]),
    ("messages", "jsonl syntax error", "syntax.jsonl", ids_file('{"input_ids": [1, 2'),
     ["syntax.jsonl line 3", "not JSON"]),
    ("messages", "not a parquet file", "fake.parquet", b"PAR1 not really",
     ["fake.parquet", "not a readable parquet file"]),
    ("messages", "first row without a text or input_ids column", "nocol.jsonl", jsonl({"body": "x"}),
     ["nocol.jsonl line 1", "need 'input_ids' or 'text'"]),
]


@pytest.mark.parametrize("group,case,name,content,words", DATA, ids=[f"{d[0]}: {d[1]}" for d in DATA])
def test_dataset(tmp_path, group, case, name, content, words):
    from data import load_split
    path = str(tmp_path / name)
    if callable(content):
        content(path)
    else:
        with open(path, "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)
    with pytest.raises(ValueError) as e:
        load_split(path, 8, 2, 8, 50257, cache_dir=str(tmp_path / "cache"))
    msg = one_line(e.value)
    assert all(w in msg for w in words), (words, msg)
    assert not [f for f in os.listdir(tmp_path / "cache") if ".tmp" in f]  # no temp file outlives the failure


@pytest.mark.parametrize("bad,words", [({"text": "x"}, ["row 3", "no 'input_ids'", "all text or all token ids"]),
                                       ({"input_ids": [3, -2]}, ["row 3", "token id -2 at position 1"])],
                         ids=["tracebacks: hub row of text among token rows", "silent acceptance: hub negative id"])
def test_hub_dataset_rows(tmp_path, monkeypatch, bad, words):
    """A hub dataset's rows are checked as a local file's: the message names the dataset and the row."""
    import datasets
    from data import load_rows
    rows = [{"input_ids": r} for r in IDS]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: iter(rows[:3] + [bad] + rows[3:]))
    with pytest.raises(ValueError) as e:
        load_rows("someone/tokens", 8, n_rows=20, cache_dir=str(tmp_path))
    msg = one_line(e.value)
    assert msg.startswith("dataset 'someone/tokens' row 3") and all(w in msg for w in words), msg
    assert [f.name for f in tmp_path.iterdir() if ".tmp" in f.name] == []


def test_dataset_cli_one_line(tmp_path, tiny_model_dir):
    """Dataset errors through train.py: one line on stderr, nothing written, no temp file in the cache."""
    from test_train import tiny_args
    cases = [("silent acceptance", "neg.jsonl", ids_file({"input_ids": [-1] + IDS[0]}), ["neg.jsonl line 3", "-1"]),
             ("messages", "latin.txt", make_text(4000).encode() + b"\ncaf\xe9\n", ["latin.txt line 2", "not UTF-8"])]
    for group, name, content, words in cases:
        (tmp_path / name).write_bytes(content.encode() if isinstance(content, str) else content)
        out = tmp_path / "run"
        p = run_cli("train.py", *tiny_args(tiny_model_dir, str(tmp_path / name), str(out), "e2e", ctx=8))
        msg = one_line(p.stderr)
        assert p.returncode != 0 and msg.startswith("train.py: error: ") and all(w in msg for w in words), (group, msg)
        assert not out.exists() and not [f for f in os.listdir(tmp_path / "cache") if ".tmp" in f], group


def run_cli(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120, env=ENV)


# ----------------------------------------------------------------------------- the token cache

def test_cache_rebuilt_when_it_does_not_match(tmp_path, text_file, capsys):
    """A cache overwritten with random bytes of the right size, one cut short, one whose record is torn: each is
    rebuilt (with a note) and gives the same rows and fingerprint as a fresh cache; an intact one is reused."""
    from data import load_split
    cache = tmp_path / "cache"
    fresh = load_split(text_file, 16, 4, 16, 50257, cache_dir=str(cache))
    fresh = np.array(fresh[1]), fresh[2]  # a copy: the memmap would show the damage done to its file below
    (bin_path,) = cache.glob("*.bin")
    size = bin_path.stat().st_size
    for case, damage, words in (
            ("random bytes, same size", lambda: bin_path.write_bytes(os.urandom(size)),
             "does not match its recorded SHA-1"),
            ("cut short", lambda: os.truncate(bin_path, size // 3), f"is {size // 3} bytes, its record says {size}"),
            ("record torn", lambda: bin_path.with_suffix(".json").write_text('{"rows": 3'), "has no readable record"),
            ("record of an earlier version", lambda: bin_path.with_suffix(".json").write_text(json.dumps(
                dict(source=text_file, ctx=16, rows=size // 32, complete=True))), "has no record of its length")):
        damage()
        capsys.readouterr()
        again = load_split(text_file, 16, 4, 16, 50257, cache_dir=str(cache))
        note = capsys.readouterr().err
        assert f"token cache {bin_path} {words}" in note and "rebuilding it" in note, (case, note)
        assert again[2] == fresh[1] and np.array_equal(again[1], fresh[0]), case  # the same rows, the same run
    load_split(text_file, 16, 4, 16, 50257, cache_dir=str(cache))
    assert capsys.readouterr().err == ""  # whole: reused without a word
    assert sorted(f.name for f in cache.iterdir()) == sorted([bin_path.name, bin_path.with_suffix(".json").name])


def test_no_temp_file_after_an_interrupted_tokenisation(tmp_path):
    from token_cache import write_cache

    def documents():
        yield list(range(64))
        raise KeyboardInterrupt  # Ctrl-C midway

    with pytest.raises(KeyboardInterrupt):
        write_cache(str(tmp_path / "k.bin"), documents(), "src", 8)
    assert os.listdir(tmp_path) == []


def test_random_cache_no_longer_trusted_by_eval(tmp_path, tiny_model_dir, text_file):
    """silent acceptance, through the CLI: a run's token cache overwritten with random bytes is rebuilt, and
    eval.py gives the metrics it gives on a fresh cache."""
    from sae import SAE, save_sae
    torch.manual_seed(0)
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    save_sae(SAE(32, 64), str(run_dir), dict(layer=1, model=tiny_model_dir, center=True, loss="local"))
    argv = ["eval.py", run_dir, "--dataset", text_file, "--ctx", 16, "--eval_samples", 4, "--alive_tokens", 0,
            "--data_dir", cache, "--json"]
    fresh = run_cli(*argv)
    assert fresh.returncode == 0, fresh.stderr
    (bin_path,) = cache.glob("*.bin")
    bin_path.write_bytes(np.random.default_rng(1).integers(0, 50257, bin_path.stat().st_size // 2, dtype=np.uint16))
    again = run_cli(*argv)
    assert again.returncode == 0 and "does not match its recorded SHA-1" in again.stderr, again.stderr
    assert json.loads(again.stdout) == json.loads(fresh.stdout)


# ----------------------------------------------------------------------------- models (GPT.from_pretrained)

def _tensors(change):
    def apply(folder):
        from safetensors.torch import load_file, save_file
        path = os.path.join(folder, "model.safetensors")
        sd = load_file(path)
        change(sd)
        save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata={"format": "pt"})
    return apply


def _json_file(name, change=None, raw=None):
    """An edit of the JSON file name in a folder: change(its dict), or raw text in its place."""
    def apply(folder):
        path = os.path.join(folder, name)
        cfg = json.load(open(path))
        with open(path, "w") as f:
            f.write(raw if raw is not None else json.dumps(change(cfg)))
    return apply


def _config(change=None, raw=None):
    return _json_file("config.json", change, raw)


def _weights_file(name, content):
    def apply(folder):
        data = content(folder) if callable(content) else content
        os.remove(os.path.join(folder, "model.safetensors"))
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    return apply


def _cut(folder):
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        data = f.read()
    return data[:len(data) // 2]


def _set(key, value):
    return _config(lambda c: dict(c, **{key: value}))


MODELS = [  # (group, case, what to break in a copy of the tiny GPT-2 (3 layers, d 32), words of the message)
    ("tracebacks", "c_fc weight of another shape", _tensors(lambda sd: sd.update({"transformer.h.1.mlp.c_fc.weight":
                                                                                  torch.zeros(32, 100)})),
     ["transformer.h.1.mlp.c_fc.weight", "model.safetensors", "shape (32, 100)", "shape (32, 128)"]),
    ("tracebacks", "a 3-d weight",
     _tensors(lambda sd: sd.update({"transformer.h.0.attn.c_attn.weight": torch.zeros(32, 96, 1)})),
     ["transformer.h.0.attn.c_attn.weight", "shape (32, 96, 1)", "shape (32, 96)"]),
    ("tracebacks", "safetensors cut short", _weights_file("model.safetensors", _cut),
     ["model.safetensors", "not a readable weights file", "cut short"]),
    ("tracebacks", "random pytorch_model.bin", _weights_file("pytorch_model.bin", os.urandom(4096)),
     ["pytorch_model.bin", "not a readable weights file"]),
    ("tracebacks", "config without n_embd", _config(lambda c: {k: v for k, v in c.items() if k != "n_embd"}),
     ["config.json has no 'n_embd'"]),
    ("tracebacks", "config a JSON list", _config(raw="[1, 2]"), ["config.json holds an array"]),
    ("tracebacks", "n_head a string", _set("n_head", "4"), ["config.json has n_head '4'", "integer >= 1"]),
    ("tracebacks", "n_head 0", _set("n_head", 0), ["config.json has n_head 0"]),
    ("tracebacks", "n_embd a float", _set("n_embd", 32.0), ["config.json has n_embd 32.0"]),
    ("silent acceptance", "an extra layer in the weights",
     _tensors(lambda sd: sd.update({k.replace(".h.2.", ".h.3."): v.clone() for k, v in list(sd.items())
                                    if ".h.2." in k})),
     ["model.safetensors holds transformer.h.3.", "beyond the 3 of its config.json"]),
    ("silent acceptance", "an integer weight",
     _tensors(lambda sd: sd.update({"transformer.ln_f.bias": torch.zeros(32, dtype=torch.int64)})),
     ["transformer.ln_f.bias", "dtype torch.int64"]),
    ("silent acceptance", "n_layer 0", _set("n_layer", 0), ["config.json has n_layer 0"]),
    ("silent acceptance", "layer_norm_epsilon a string", _set("layer_norm_epsilon", "x"), ["layer_norm_epsilon 'x'"]),
    ("messages", "config.json syntax error", _config(raw='{"model_type": "gpt2",'),
     ["config.json is not valid JSON", "line 1, column 23"]),
    ("messages", "a layer missing from the weights", _tensors(lambda sd: [sd.pop(k) for k in list(sd) if ".h.2." in k]),
     ["model.safetensors lacks h.2.", "3 layers"]),
    ("messages", "n_head does not divide n_embd", _set("n_head", 5), ["d_model 32 is not a multiple of its 5 heads"]),
]


@pytest.mark.parametrize("group,case,damage,words", MODELS, ids=[f"{m[0]}: {m[1]}" for m in MODELS])
def test_model(tmp_path, tiny_model_dir, group, case, damage, words):
    from model import GPT
    folder = str(tmp_path / "gpt")
    shutil.copytree(tiny_model_dir, folder)
    damage(folder)
    with pytest.raises(ValueError) as e:
        GPT.from_pretrained(folder)
    msg = one_line(e.value)
    assert folder in msg and all(w in msg for w in words), (words, msg)


def test_gpt_neo_qkv_of_another_shape(tmp_path, neo_model_dir):
    from model import GPT
    folder = str(tmp_path / "neo")
    shutil.copytree(neo_model_dir, folder)
    _tensors(lambda sd: sd.update({"transformer.h.0.attn.attention.k_proj.weight": torch.zeros(64, 32)}))(folder)
    with pytest.raises(ValueError) as e:  # was torch.cat's "Sizes of tensors must match"
        GPT.from_pretrained(folder)
    assert "h.0.attn.attention.k_proj.weight" in one_line(e.value) and "(64, 32)" in str(e.value), e.value


def test_model_cli_one_line(tmp_path, tiny_model_dir, text_file):
    """tracebacks, through train.py: a weights file cut short, refused before anything is written."""
    from test_train import tiny_args
    folder, out = str(tmp_path / "gpt"), tmp_path / "run"
    shutil.copytree(tiny_model_dir, folder)
    _weights_file("model.safetensors", _cut)(folder)
    p = run_cli("train.py", *tiny_args(folder, text_file, str(out), "e2e"))
    msg = one_line(p.stderr)
    assert p.returncode != 0 and msg.startswith("train.py: error: ") and f"{folder}/model.safetensors" in msg, msg
    assert not out.exists()


# ----------------------------------------------------------------------------- run files

def _run_folder(path, d=32, n_dict=64):
    from sae import SAE, save_sae
    torch.manual_seed(0)
    save_sae(SAE(d, n_dict), str(path), dict(layer=1, model="gpt", center=True, loss="local", args={}))
    return str(path)


def _sae_json(change=None, raw=None):
    return _json_file("sae.json", change, raw)


def _sae_bytes(change):
    def apply(folder):
        path = os.path.join(folder, "sae.safetensors")
        data = open(path, "rb").read()
        open(path, "wb").write(change(data))
    return apply


def _drop(key):
    return _sae_json(lambda c: {k: v for k, v in c.items() if k != key})


def _put(key, value):
    return _sae_json(lambda c: dict(c, **{key: value}))


SAES = [  # (group, case, what to break in a saved SAE (d 32, 64 features), the file named, words)
    ("tracebacks", "sae.json without layer", _drop("layer"), "sae.json", ["has no 'layer'"]),
    ("tracebacks", "sae.json without center", _drop("center"), "sae.json", ["has no 'center'"]),
    ("tracebacks", "sae.json layer a string", _put("layer", "1"), "sae.json", ["has layer '1'", "integer >= 0"]),
    ("tracebacks", "sae.json args a list", _put("args", []), "sae.json", ["has args []", "an object"]),
    ("tracebacks", "firing.safetensors broken",
     lambda f: open(os.path.join(f, "firing.safetensors"), "wb").write(b"\xff" * 64),
     "firing.safetensors", ["not a readable firing file"]),
    ("messages", "sae.json syntax error", _sae_json(raw='{"d": 32,'), "sae.json", ["is not valid JSON", "line 1"]),
    ("messages", "sae.json a list", _sae_json(raw="[]"), "sae.json", ["holds an array"]),
    ("messages", "sae.json without d", _drop("d"), "sae.json", ["has no 'd'"]),
    ("messages", "sae.json d a string", _put("d", "32"), "sae.json", ["has d '32'"]),
    ("messages", "sae.json d not that of the tensors", _put("d", 48), "sae.safetensors",
     ["encoder.weight has shape (64, 32), not (64, 48)"]),
    ("messages", "safetensors header broken", _sae_bytes(lambda b: b"\xff" * 8 + b[8:]), "sae.safetensors",
     ["not a valid SAE file", "header"]),
    ("messages", "safetensors cut short", _sae_bytes(lambda b: b[:len(b) // 2]), "sae.safetensors",
     ["not a valid SAE file"]),
]


@pytest.mark.parametrize("group,case,damage,name,words", SAES, ids=[f"{s[0]}: {s[1]}" for s in SAES])
def test_saved_sae(tmp_path, group, case, damage, name, words):
    from interop import load_any
    folder = _run_folder(tmp_path / "run")
    damage(folder)
    with pytest.raises(ValueError) as e:
        load_any(folder)
    msg = one_line(e.value)
    assert os.path.join(folder, name) in msg and all(w in msg for w in words), (words, msg)


def test_sae_cli_one_line(tmp_path):
    """messages, through eval.py: a sae.json that is not JSON names the file and the line."""
    folder = _run_folder(tmp_path / "run")
    _sae_json(raw='{"d": 32,')(folder)
    p = run_cli("eval.py", folder)
    msg = one_line(p.stderr)
    assert p.returncode != 0 and msg.startswith("eval.py: error: "), msg
    assert f"{folder}/sae.json is not valid JSON" in msg, msg


def _checkpoint(tmp_path, tiny_model_dir, text_file, change):
    """An unfinished ckpt.pt of a tiny run (d 32, 128 features) with change applied to its one SAE's record."""
    import config
    import train
    from checkpoint import PER_SAE, save_checkpoint
    from sae import SAE
    from test_train import tiny_args
    out = str(tmp_path / "run")
    args, runs, _, _ = config.resolve(train.parser, [str(a) for a in tiny_args(tiny_model_dir, text_file, out, "e2e")])
    sae = SAE(32, 128)
    opt = torch.optim.Adam(sae.parameters())
    sae(torch.randn(2, 32))[0].sum().backward()
    opt.step()  # Adam's moments exist
    r = runs[0]
    rec = dict({k: getattr(r, k) for k in PER_SAE}, name=r.name, bad_steps=0, sae=sae.state_dict(),
               optimizer=opt.state_dict(), fired=torch.zeros(128, dtype=torch.float64))
    change(rec)
    os.makedirs(out)
    save_checkpoint(os.path.join(out, "ckpt.pt"), step=1, finished=False, args=vars(args),
                    data=dict(rows=0, fingerprint="-"), runs=[rec])
    return out


CKPTS = [  # (case, change to the SAE's record, words)
    ("encoder of another width", lambda r: r["sae"].update({"encoder.weight": torch.zeros(128, 16)}),
     ["encoder.weight has shape (128, 16), not (128, 32)"]),
    ("decoder bias missing", lambda r: r["sae"].pop("decoder.bias"), ["has no tensor decoder.bias"]),
    ("an extra tensor", lambda r: r["sae"].update({"scale": torch.ones(1)}), ["holds scale"]),
    ("Adam moment of another shape", lambda r: r["optimizer"]["state"][2].update({"exp_avg": torch.zeros(3)}),
     ["exp_avg of decoder.weight has shape (3,), not (32, 128)"]),
    ("firing counts of another length", lambda r: r.update(fired=torch.zeros(7)), ["firing counts", "(128,)"]),
]


@pytest.mark.parametrize("case,change,words", CKPTS, ids=[f"tracebacks: {c[0]}" for c in CKPTS])
def test_checkpoint(tmp_path, tiny_model_dir, text_file, case, change, words):
    from checkpoint import check_tensors, load_checkpoint
    path = os.path.join(_checkpoint(tmp_path, tiny_model_dir, text_file, change), "ckpt.pt")
    with pytest.raises(ValueError) as e:
        check_tensors(load_checkpoint(path), path, 32, 128)
    msg = one_line(e.value)
    assert path in msg and all(w in msg for w in words), (words, msg)


def test_checkpoint_cli_one_line(tmp_path, tiny_model_dir, text_file):
    """tracebacks, through train.py --resume: a checkpoint whose encoder has another shape (was load_state_dict's
    traceback after 'starting')."""
    out = _checkpoint(tmp_path, tiny_model_dir, text_file,
                      lambda r: r["sae"].update({"encoder.weight": torch.zeros(128, 16)}))
    p = run_cli("train.py", "--resume", "--out_dir", out)
    msg = one_line(p.stderr)
    assert p.returncode != 0 and msg.startswith("train.py: error: ") and f"{out}/ckpt.pt" in msg, msg
    assert "encoder.weight has shape (128, 16)" in msg and "starting" not in p.stdout


def test_geometry_of_two_widths_cli_one_line(tmp_path):
    """tracebacks, through analysis.py: geometry of SAEs of d 32 and d 48 (was a matmul's RuntimeError)."""
    a, b = _run_folder(tmp_path / "a"), _run_folder(tmp_path / "b", d=48, n_dict=96)
    p = run_cli("analysis.py", "geometry", a, b, "--alive_from", "all")
    msg = one_line(p.stderr)
    assert p.returncode != 0 and msg.startswith("analysis.py: error: ") and a in msg and b in msg, msg
    assert "d 32" in msg and "d 48" in msg


def test_eval_log_without_the_numbers_of_a_plot(tmp_path):
    import analysis
    folder = _run_folder(tmp_path / "run")
    with open(os.path.join(folder, "eval.jsonl"), "w") as f:
        f.write(json.dumps(dict(step=1, l0=3.0)) + "\n")
    with pytest.raises(ValueError) as e:
        analysis.pareto([folder])
    msg = one_line(e.value)
    assert "eval.jsonl" in msg and "line 1" in msg and "'alive'" in msg, msg
