"""Refusals and failures of the SAE readers (interop.py) and of the tools that use them (eval.py, features.py,
analysis.py): one line naming the file and what is wrong, nothing written, a previous site left as it was."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import analysis
import eval as ev
import features
import interop
from conftest import ROOT
from files import lock_run, unlock_run
from interop import load_any, read_apollo, read_saelens, write_saelens
from sae import SAE, save_firing, save_sae
from test_interop import D, LAYER, N, random_sae, write_apollo

CPU_ONLY = not torch.cuda.is_available()


def snapshot(folder):
    """Every file under folder, by relative path, with its bytes; and the names beside folder (temp folders)."""
    from test_data_loss import snapshot as files_under
    return files_under(folder), sorted(os.listdir(os.path.dirname(os.path.abspath(folder))))


def one_line(e, tool, *words):
    msg = str(e.value.code)
    assert msg.startswith(f"{tool}: error:") and "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    return msg


def refused(fn, *words):
    """fn() raises ValueError whose message is one line holding every word."""
    with pytest.raises(ValueError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


@pytest.fixture
def tiny_run(tmp_path, tiny_model_dir, text_file):
    """A run folder for the tiny model (d 32, layer 1) and the flags that evaluate it on the local text."""
    torch.manual_seed(0)
    run = str(tmp_path / "run")
    save_sae(SAE(32, 64), run, dict(layer=1, model=tiny_model_dir, center=True, loss="local",
                                    args=dict(dataset=text_file, ctx=32, eval_samples=4)))
    flags = ["--model", tiny_model_dir, "--dataset", text_file, "--ctx", "32", "--data_dir", str(tmp_path / "cache"),
             "--device", "cpu"]
    return run, flags


# ----------------------------------------------------------------------------- 1. features.py keeps a site whole

def test_features_failed_or_interrupted_run_leaves_the_previous_site(tiny_run, tmp_path, monkeypatch, capsys):
    run, flags = tiny_run
    out = str(tmp_path / "site")
    argv = [run, *flags, "--n_tokens", "128", "--k", "3", "--out", out]
    features.main(argv)
    with open(os.path.join(out, "notes.txt"), "w") as f:  # a user's own file in the site folder
        f.write("mine")
    before = snapshot(out)
    assert {"index.html", "site.json", "f", "notes.txt"} <= set(before[0])
    # a bad value found only once the work has begun: the dataset
    with pytest.raises(SystemExit) as e:
        features.main([run, *flags, "--dataset", str(tmp_path / "missing.txt"), "--n_tokens", "128", "--out", out])
    one_line(e, "features.py", "missing.txt")
    assert snapshot(out) == before
    # an error midway through the collection, one while the pages are written, a full disk, and Ctrl-C
    calls = []

    def fails_on_second_page(*a, **k):
        calls.append(a[0])
        if len(calls) == 2:
            raise OSError(28, "No space left on device", a[0])
        return page(*a, **k)
    def interrupt(*a, **k):
        raise KeyboardInterrupt
    page = features.page
    for name, fake, exc in (("add_hist", lambda *a, **k: 1 / 0, ZeroDivisionError),
                            ("page", fails_on_second_page, SystemExit),
                            ("output_effect", interrupt, KeyboardInterrupt)):
        with monkeypatch.context() as m:
            m.setattr(features, name, fake)
            with pytest.raises(exc) as e:
                features.main(argv)
        if exc is SystemExit:
            one_line(e, "features.py", "No space left")
            assert calls and calls[0].startswith(os.path.abspath(out) + ".")  # written beside --out, not into it
        assert snapshot(out) == before, name
    # a run that succeeds replaces the site whole and keeps the user's file
    features.main(argv)
    after = snapshot(out)
    assert after[1] == before[1] and open(os.path.join(out, "notes.txt")).read() == "mine"
    assert after[0]["site.json"] != before[0]["site.json"]  # a new site (its timing differs)


def test_features_new_out_failure_leaves_nothing(tiny_run, tmp_path, monkeypatch):
    run, flags = tiny_run
    out = tmp_path / "new" / "deeper" / "site"
    monkeypatch.setattr(features, "add_hist", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        features.main([run, *flags, "--n_tokens", "64", "--out", str(out)])
    assert not (tmp_path / "new").exists()


# ----------------------------------------------------------------------------- 2. NaN, inf, zero decoder columns

def test_apollo_zero_decoder_column_is_refused(tmp_path, tiny_model_dir, text_file):
    pt = str(tmp_path / "e2e_similar_ce_layer_1.pt")
    write_apollo(pt, layer=1)
    sd = torch.load(pt)
    P = "blocks-1-hook_resid_pre"
    sd[f"{P}.decoder.weight"][:, 7] = 0
    torch.save(sd, pt)
    refused(lambda: read_apollo(pt), pt, f"{P}.decoder.weight", "column 7", "all zero")
    with pytest.raises(SystemExit) as e:  # eval: one line, not NaN metrics with exit 0
        ev.main([pt, "--model", tiny_model_dir, "--dataset", text_file, "--ctx", "16", "--eval_samples", "2",
                 "--alive_tokens", "0", "--device", "cpu", "--data_dir", str(tmp_path / "cache")])
    one_line(e, "eval.py", pt, "column 7")
    with pytest.raises(SystemExit) as e:
        interop.main(["import-apollo", pt, str(tmp_path / "out")])
    one_line(e, "interop.py", "column 7")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused_in_every_source(tmp_path, bad):
    # Apollo
    pt = str(tmp_path / "a.pt")
    write_apollo(pt)
    sd = torch.load(pt)
    P = f"blocks-{LAYER}-hook_resid_pre"
    sd[f"{P}.encoder.0.bias"][3] = bad
    torch.save(sd, pt)
    refused(lambda: load_any(pt), pt, f"{P}.encoder.0.bias", "index [3]")
    # SAELens
    lens = str(tmp_path / "lens")
    write_saelens(random_sae(), dict(layer=LAYER, model="gpt2", center=True), lens)
    wf = os.path.join(lens, "sae_weights.safetensors")
    w = load_file(wf)
    w["W_dec"][5, 2] = bad
    save_file(w, wf)
    refused(lambda: load_any(lens), wf, "W_dec", "index [5, 2]")
    # a run folder of ours
    run = str(tmp_path / "run")
    save_sae(random_sae(), run, dict(layer=LAYER, model="gpt2", center=True))
    sf = os.path.join(run, "sae.safetensors")
    w = load_file(sf)
    w["encoder.weight"][1, 0] = bad
    save_file(w, sf)
    refused(lambda: load_any(run), sf, "encoder.weight")  # sae.load_sae's own check, or load_any's


def test_run_folder_decoder_columns_checked(tmp_path):
    run = str(tmp_path / "run")
    save_sae(random_sae(), run, dict(layer=LAYER, model="gpt2", center=True))
    sf = os.path.join(run, "sae.safetensors")
    w = load_file(sf)
    w["decoder.weight"][:, 11] = 0
    save_file(w, sf)
    refused(lambda: load_any(run), sf, "decoder.weight", "column 11", "all zero")
    w["decoder.weight"][:, 11] = 1e-30  # squares underflow in fp32: dict_elements would divide by 0
    save_file(w, sf)
    refused(lambda: load_any(run), sf, "decoder.weight", "column 11", "cannot normalise")


def test_saelens_zero_row_overflow_and_float64(tmp_path):
    lens = str(tmp_path / "lens")
    write_saelens(random_sae(), dict(layer=LAYER, model="gpt2", center=True), lens)
    wf = os.path.join(lens, "sae_weights.safetensors")
    w0 = load_file(wf)
    w = dict(w0, W_dec=w0["W_dec"].clone())
    w["W_dec"][9] = 0
    save_file(w, wf)
    refused(lambda: read_saelens(lens), wf, "W_dec", "row 9", "all zero")
    w = dict(w0, W_dec=w0["W_dec"] * 1e30, W_enc=w0["W_enc"] * 1e20)  # the fold W_enc * |W_dec row| overflows fp32
    save_file(w, wf)
    refused(lambda: read_saelens(lens), wf, "folding", "encoder.weight")
    w = {k: v.double() for k, v in w0.items()}
    w["b_enc"][4] = 1e300  # finite in fp64, inf in fp32
    save_file(w, wf)
    refused(lambda: read_saelens(lens), wf, "b_enc", "float32's range")
    w = {k: v.double() * 1e-30 for k, v in w0.items() if k == "W_dec"}  # tiny rows: normalised in fp64, exactly
    save_file(dict(w0, **w), wf)
    sae, _ = read_saelens(lens)
    assert torch.isfinite(sae.dict_elements()).all()


def test_firing_file_not_finite_is_refused(tmp_path):
    run = str(tmp_path / "run")
    save_sae(random_sae(), run, dict(layer=LAYER, model="gpt2", center=True))
    save_firing(run, torch.tensor([0.5, float("nan")] + [0.1] * (N - 2)).double(), 100)
    refused(lambda: load_any(run), "firing.safetensors", "finite")
    save_firing(run, torch.tensor([1.5] + [0.1] * (N - 1)).double(), 100)
    refused(lambda: load_any(run), "firing.safetensors", "[0, 1]")


# ----------------------------------------------------------------------------- 3. --device without CUDA

@pytest.mark.skipif(not CPU_ONLY, reason="a machine with CUDA accepts cuda")
@pytest.mark.parametrize("device,words", [("cuda", ["no CUDA GPU"]), ("cuda:7", ["no CUDA GPU"]),
                                          ("cuda:x", ["'cuda:x'", "cpu, cuda, cuda:N, auto"])])
def test_device_without_cuda_is_one_line(tiny_run, tmp_path, device, words):
    run, flags = tiny_run
    flags = flags[:-2] + ["--device", device]
    with pytest.raises(SystemExit) as e:
        ev.main([run, *flags, "--eval_samples", "2"])
    one_line(e, "eval.py", device, *words)
    with pytest.raises(SystemExit) as e:
        features.main([run, *flags, "--out", str(tmp_path / "site")])
    one_line(e, "features.py", device, *words)
    assert not (tmp_path / "site").exists()


@pytest.mark.skipif(not CPU_ONLY, reason="a machine with CUDA accepts cuda")
def test_device_without_cuda_cli_processes(tiny_run, tmp_path):
    """As a user runs them: one line on stderr, exit status 1, no traceback."""
    run, _ = tiny_run
    for tool, extra in (("eval.py", []), ("features.py", ["--out", str(tmp_path / "site")])):
        p = subprocess.run([sys.executable, os.path.join(ROOT, tool), run, "--device", "cuda:7", *extra],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert p.returncode == 1 and p.stdout == "", p.stderr
        assert p.stderr.count("\n") == 1 and p.stderr.startswith(f"{tool}: error: --device 'cuda:7'"), p.stderr


# ----------------------------------------------------------------------------- 4. config files of the wrong shape

@pytest.mark.parametrize("text,words", [("- a\n- b\n", ["a list"]), ("42\n", ["an integer"]),
                                        ("just words\n", ["a string"]), ("a: [1, 2\n", ["not valid YAML", "line"]),
                                        (b"saes: \xff\xfe\n", ["not UTF-8"]),
                                        ("saes: [1, 2]\n", ["saes", "a list", "not a mapping"]),
                                        ("loss: {logits_kl: 3}\n", ["loss.logits_kl", "not a mapping"]),
                                        ("train_data: oops\n", ["train_data", "not a mapping"])])
def test_apollo_yaml_not_a_mapping(tmp_path, text, words):
    pt = str(tmp_path / "e2e_similar_ce_layer_2.pt")
    write_apollo(pt)
    y = str(tmp_path / "e2e_similar_ce_layer_2.yaml")
    with open(y, "wb") as f:
        f.write(text if isinstance(text, bytes) else text.encode())
    refused(lambda: read_apollo(pt), y, *words)


@pytest.mark.parametrize("conf,words", [([1, 2], ["a list", "not the JSON object"]), (7, ["an integer"]),
                                        ("standard", ["a string"]), (None, ["null"]),
                                        ({"metadata": [1]}, ["metadata", "not a mapping"]),
                                        ({"metadata": {"hook_name": "blocks.2.hook_resid_pre",
                                                       "model_from_pretrained_kwargs": "yes"}},
                                         ["model_from_pretrained_kwargs", "not a mapping"]),
                                        ({"metadata": {"hook_name": "blocks.2.hook_resid_pre", "nanosae": [1]}},
                                         ["nanosae", "not a mapping"]),
                                        ({"metadata": {"hook_name": "blocks.2.hook_resid_pre", "model_name": ["x"]}},
                                         ["model_name", "a string"]),
                                        ({"metadata": {"hook_name": "blocks.2.hook_mlp_out"}},
                                         ["hook_name", "hook_resid_pre"])])
def test_saelens_cfg_not_a_mapping(tmp_path, conf, words):
    lens = str(tmp_path / "lens")
    write_saelens(random_sae(), dict(layer=LAYER, model="gpt2", center=True), lens)
    f = os.path.join(lens, "cfg.json")
    with open(f, "w") as fh:
        json.dump(conf, fh)
    refused(lambda: read_saelens(lens), f, *words)
    with open(f, "wb") as fh:
        fh.write(b'{"architecture": "standard\xff"}')
    refused(lambda: read_saelens(lens), f, "not UTF-8")
    with open(f, "w") as fh:
        fh.write('{"architecture": ')
    refused(lambda: read_saelens(lens), f, "not valid JSON", "line 1")


def test_apollo_unexpected_keys_named(tmp_path):
    pt = str(tmp_path / "x.pt")
    W = torch.randn(N, D)
    for sd, words in (({"blocks.2.hook_resid_pre.encoder.0.weight": W}, ["'blocks.2.hook_resid_pre.encoder.0.weight'"]),
                      ({"blocks-2-hook_resid_pre.encoder.0.weight": W, "blocks-2-hook_resid_pre.extra": W},
                       ["'blocks-2-hook_resid_pre.extra'"]),
                      ({"blocks-2-hook_resid_pre.encoder.0.weight": W}, ["lacks", "decoder.weight"]),
                      ({}, ["empty"]), ([W], ["a list", "not a state dict"])):
        torch.save(sd, pt)
        msg = refused(lambda: read_apollo(pt), pt, *words)
        if "lacks" not in words and "empty" not in words and "a list" not in words:
            assert "blocks-L-hook_resid_pre.{encoder.0.weight, encoder.0.bias, decoder.weight, decoder.bias}" in msg


def test_analysis_non_utf8_eval_jsonl(tmp_path):
    run = tmp_path / "run"
    save_sae(random_sae(), str(run), dict(layer=LAYER, model="gpt2", center=True))
    (run / "eval.jsonl").write_bytes(b'{"l0": 1.0, "alive": 3, "ce_increase": 0.1}\n{"l0": \xff\xfe}\n')
    for cmd in ("pareto", "downstream"):
        with pytest.raises(SystemExit) as e:
            analysis.main([cmd, str(run)])
        one_line(e, "analysis.py", str(run / "eval.jsonl"), "not UTF-8")
    (run / "eval.jsonl").write_text('{"l0": "1.0", "alive": 3, "ce_increase": 0.1}\n')
    with pytest.raises(SystemExit) as e:
        analysis.main(["pareto", str(run)])
    one_line(e, "analysis.py", "eval.jsonl", "l0", "a number")
    line = dict(mse=1.0, final_mse=1.0, explained_variance=0.5, final_explained_variance=0.5,
                downstream_mse=[1.0, 2.0], downstream_explained_variance=[0.5], downstream_layers=[3, 4])
    (run / "eval.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(SystemExit) as e:
        analysis.main(["downstream", str(run)])
    one_line(e, "analysis.py", "eval.jsonl", "different lengths")


# ----------------------------------------------------------------------------- 5. values accepted silently before

@pytest.mark.parametrize("key,value,words", [("n_ctx", -5, ["train_data.n_ctx", "-5", "integer > 0"]),
                                             ("n_ctx", 0, ["train_data.n_ctx", "integer > 0"]),
                                             ("n_ctx", "1024", ["train_data.n_ctx", "'1024'"]),
                                             ("n_ctx", 10.5, ["train_data.n_ctx"]),
                                             ("n_ctx", True, ["train_data.n_ctx"]),
                                             ("sparsity", -1, ["loss.sparsity.coeff", "number >= 0"]),
                                             ("sparsity", float("nan"), ["loss.sparsity.coeff"]),
                                             ("logits_kl", "high", ["loss.logits_kl.coeff"]),
                                             ("logits_kl", -0.5, ["loss.logits_kl.coeff"]),
                                             ("in_to_orig", -2.5, ["loss.in_to_orig.total_coeff"])])
def test_apollo_yaml_bad_numbers(tmp_path, key, value, words):
    pt = str(tmp_path / "e2e_similar_ce_layer_2.pt")
    write_apollo(pt)
    y = str(tmp_path / "e2e_similar_ce_layer_2.yaml")
    conf = yaml.safe_load(open(y))
    if key == "n_ctx":
        conf["train_data"]["n_ctx"] = value
    elif key == "in_to_orig":
        conf["loss"][key]["total_coeff"] = value
    else:
        conf["loss"][key]["coeff"] = value
    with open(y, "w") as f:
        yaml.dump(conf, f)
    refused(lambda: read_apollo(pt), y, *words)


@pytest.mark.parametrize("key,value,words", [("d_in", D + 1, ["d_in is 17", "(16, 48)"]),
                                             ("d_sae", N * 2, ["d_sae is 96"]), ("d_in", "16", ["d_in", "'16'"]),
                                             ("apply_b_dec_to_input", "false",
                                              ["apply_b_dec_to_input", "true or false"]),
                                             ("context_size", -5, ["context_size", "integer > 0"]),
                                             ("center_writing_weights", "false", ["center_writing_weights"]),
                                             ("eval_samples", "abc", ["metadata.nanosae.args.eval_samples", "'abc'"])])
def test_saelens_cfg_disagreeing_or_bad_values(tmp_path, key, value, words):
    lens = str(tmp_path / "lens")
    write_saelens(random_sae(), dict(layer=LAYER, model="gpt2", center=True, args=dict(ctx=64)), lens)
    f = os.path.join(lens, "cfg.json")
    conf = json.load(open(f))
    if key == "context_size":
        conf["metadata"][key] = value
    elif key == "center_writing_weights":
        conf["metadata"]["model_from_pretrained_kwargs"][key] = value
    elif key == "eval_samples":
        conf["metadata"]["nanosae"]["args"][key] = value
    else:
        conf[key] = value
    json.dump(conf, open(f, "w"))
    refused(lambda: load_any(lens), f, *words)


def test_save_firing_refused_while_train_holds_the_run(tiny_run, tmp_path, capsys):
    run, flags = tiny_run
    argv = [run, *flags, "--eval_samples", "2", "--alive_tokens", "0", "--save_firing", "--json"]
    lock = lock_run(run)  # as a running train.py holds it (another open file: flock sees a second holder)
    try:
        before = snapshot(run)
        with pytest.raises(SystemExit) as e:
            ev.main(argv)
        one_line(e, "eval.py", run, "in use by train.py pid", "--save_firing")
        assert snapshot(run) == before
        interop.main(["export-saelens", run, run + "_x"])  # reading it is fine
        with pytest.raises(SystemExit) as e:  # replacing it is not, even with --force
            interop.main(["import-saelens", run + "_x", run, "--force"])
        one_line(e, "interop.py", "running train.py pid")
        assert snapshot(run)[0] == before[0]
    finally:
        unlock_run(lock)
    open(os.path.join(run, ".train.lock"), "w").write("train.py pid 1 on gone\n")  # left by a kill -9: not held
    capsys.readouterr()
    ev.main(argv)
    assert "alive" in json.loads(capsys.readouterr().out)
    assert os.path.isfile(os.path.join(run, "firing.safetensors"))


def test_eval_nan_metrics_impossible_from_a_valid_load(tiny_run, tmp_path, capsys):
    """The counterpart of the refusals: a valid run folder evaluates to finite metrics."""
    run, flags = tiny_run
    ev.main([run, *flags, "--eval_samples", "2", "--alive_tokens", "0", "--json"])
    m = json.loads(capsys.readouterr().out)
    assert all(math.isfinite(m[k]) for k in ("ce_spliced", "kl", "mse", "l0"))


# ----------------------------------------------------------------------------- 6. what the fuzz tests found

def test_apollo_yaml_with_a_date_key_loads(tmp_path):
    """A YAML mapping whose key is a date (or a number): the config is kept in sae.json, so as JSON-able strings."""
    pt = str(tmp_path / "e2e_similar_ce_layer_2.pt")
    write_apollo(pt)
    with open(str(tmp_path / "e2e_similar_ce_layer_2.yaml"), "a") as f:
        f.write("2024-01-02: 1\n3: x\nrun_date: 2024-01-02\n")
    sae, cfg = read_apollo(pt)
    conf = json.loads(json.dumps(cfg))["imported_from"]["config"]
    assert conf["2024-01-02"] == 1 and conf["3"] == "x" and conf["run_date"] == "2024-01-02"
    interop.main(["import-apollo", pt, str(tmp_path / "run")])  # and save_sae writes it
    assert load_any(str(tmp_path / "run"))[1]["imported_from"]["config"]["run_date"] == "2024-01-02"


def test_apollo_damaged_pickle_is_one_line_without_warnings(tmp_path):
    import warnings
    pt = str(tmp_path / "a.pt")
    write_apollo(pt)
    blob = open(pt, "rb").read()
    i = blob.index(b"\x80\x02")  # data.pkl's PROTO 2, stored uncompressed in torch's zip
    open(pt, "wb").write(blob[:i + 1] + b"\x41" + blob[i + 2:])  # protocol 65
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            read_apollo(pt)
        except ValueError as e:
            assert pt in str(e) and "\n" not in str(e)
    assert not [w for w in caught if "pickle" in str(w.message)], [str(w.message) for w in caught]


def test_apollo_downstream_term_of_zero_is_e2e(tmp_path):
    """in_to_orig with total_coeff 0 adds nothing: the SAE is e2e, not e2e_ds."""
    pt = str(tmp_path / "e2e_similar_ce_layer_2.pt")
    write_apollo(pt)
    y = str(tmp_path / "e2e_similar_ce_layer_2.yaml")
    conf = yaml.safe_load(open(y))
    assert read_apollo(pt)[1]["loss"] == "e2e_ds"
    conf["loss"]["in_to_orig"]["total_coeff"] = 0
    with open(y, "w") as f:
        yaml.dump(conf, f)
    assert read_apollo(pt)[1]["loss"] == "e2e"
