"""TinyStories-1M end to end on a random GPT-Neo of its shape (conftest.write_tiny_gpt_neo): the recipe's
defaults and their precedence, train.py + eval.py for each kind, resume, Apollo import and SAELens export with
TransformerLens's names, and bench.py's GPT-Neo shape. Parity with transformers is in test_model.py."""
import argparse
import json
import os
import re
import signal

import pytest
import torch

from test_train import EVAL_KEYS, run, tiny_args

import config
import train

TS = "roneneldan/TinyStories-1M"


def parsed(*argv):
    args, runs, _, _ = config.resolve(train.parser, [str(a) for a in argv] + ["--out_dir", "unused"])
    return args, [(r.loss, r.layer, r.l1, r.kl_coeff, r.ds_coeff) for r in runs]


def test_recipe_defaults_and_their_precedence(neo_model_dir):
    for model in (TS, neo_model_dir):  # the hub id, or a local folder of its shape
        args, runs = parsed("--model", model, "--loss", "e2e_ds")
        assert (args.dataset, args.ctx, args.dict_ratio, args.layer, args.batch_size, args.grad_accum,
                args.warmup_samples, args.grad_clip, args.lr, args.n_samples) == (
            "apollo-research/roneneldan-TinyStories-tokenizer-gpt2", 512, 50.0, "4", 20, 1, 20_000, 1.0, 1e-3, 250_000)
        assert runs == [("e2e_ds", 4, 50.0, 0.5, 1000.0)]
    args, runs = parsed("--model", TS, "--loss", "local")
    assert (args.lr, args.n_samples, runs) == (1e-2, 400_000, [("local", 4, 0.01, 0.0, 0.0)])
    args, runs = parsed("--model", TS, "--loss", "e2e")
    assert (args.lr, args.n_samples, runs) == (1e-3, 450_000, [("e2e", 4, 3.0, 1.0, 0.0)])
    # a flag given always wins, also when it equals the GPT-2 default
    args, runs = parsed("--model", TS, "--loss", "e2e_ds", "--ctx", 1024, "--layer", 6, "--lr", 5e-4, "--batch_size", 8,
                        "--grad_clip", 10, "--n_samples", 400_000, "--ds_coeff", 2.5, "--l1", 7)
    assert (args.ctx, args.lr, args.batch_size, args.grad_clip, args.n_samples) == (1024, 5e-4, 8, 10.0, 400_000)
    assert runs == [("e2e_ds", 6, 7.0, 0.5, 2.5)]
    # a sweep: kinds without λ get the recipe's; mixed kinds need the flags their recipes disagree on
    args, runs = parsed("--model", TS, "--loss", "e2e,e2e_ds", "--l1", "e2e=1,2", "--n_samples", 1000)
    assert runs == [("e2e", 4, 1.0, 1.0, 0.0), ("e2e", 4, 2.0, 1.0, 0.0), ("e2e_ds", 4, 50.0, 0.5, 1000.0)]
    assert args.lr == 1e-3
    with pytest.raises(ValueError, match=r"recipe's --n_samples differs by kind \(e2e 450000, e2e_ds 250000\)"):
        parsed("--model", TS, "--loss", "e2e,e2e_ds")
    with pytest.raises(ValueError, match=r"recipe's --lr differs by kind \(local 0.01, e2e 0.001\); give --lr"):
        parsed("--model", TS, "--loss", "local,e2e", "--n_samples", 1000)
    _, runs = parsed("--model", TS, "--loss", "local,e2e", "--n_samples", 1000, "--lr", 1e-3, "--l1", "1,2")
    assert [r[2] for r in runs] == [1.0, 2.0, 1.0, 2.0]
    # GPT-2 keeps its defaults; a GPT-Neo of another shape is not TinyStories-1M
    args, runs = parsed("--loss", "e2e")
    assert (args.ctx, args.lr, args.grad_clip, runs) == (1024, 5e-4, 10.0, [("e2e", 6, 3.0, 1.0, 0.0)])
    assert "TinyStories-1M" in train.parser.format_help()


@pytest.fixture(scope="module")
def neo_runs(tmp_path_factory, neo_model_dir, text_file):
    """train.py for each kind at layer 4 (the recipe's), lr, grad_clip, λ and β left to the recipe: {loss: (out, stdout)}."""
    base = tmp_path_factory.mktemp("neo")
    out = {}
    for loss in ("local", "e2e", "e2e_ds"):
        p = run("train.py", *neo_args(neo_model_dir, text_file, str(base / loss), loss))
        out[loss] = str(base / loss), p.stdout
    return out


def neo_args(model, data, out, loss):
    a = tiny_args(model, data, out, loss, layer=4)
    i = a.index("--lr")
    return a[:i] + a[i + 2:]  # the recipe's lr for the kind


@pytest.mark.parametrize("loss", ["local", "e2e", "e2e_ds"])
def test_train_then_eval(neo_runs, loss):
    out, stdout = neo_runs[loss]
    losses = [float(m) for m in re.findall(r"^step +\d+/12 \| loss ([\d.e+-]+)", stdout, re.M)]
    assert len(losses) == 12 and sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses  # it learns
    cfg = json.load(open(os.path.join(out, "sae.json")))
    lam = {"local": 0.01, "e2e": 3.0, "e2e_ds": 50.0}[loss]
    assert (cfg["layer"], cfg["args"]["l1"], cfg["args"]["grad_clip"], cfg["args"]["lr"]) == \
        (4, lam, 1.0, 1e-2 if loss == "local" else 1e-3)
    assert cfg["args"]["ds_coeff"] == (1000.0 if loss == "e2e_ds" else 0.0)
    final = [json.loads(line) for line in open(os.path.join(out, "eval.jsonl"))][-1]
    m = json.loads(run("eval.py", out, "--json").stdout)
    assert EVAL_KEYS <= set(m) and m["downstream_layers"] == [5, 6, 7]
    for k in ("l0", "alive", "ce_clean", "ce_spliced", "kl", "mse"):  # reload gives the same metrics
        assert m[k] == pytest.approx(final[k], rel=1e-6, abs=1e-9), k
    assert m["l0"] > 0 and m["ce_clean"] > 0 and m["kl"] > 0


def test_sigterm_then_same_command_resumes_exactly(neo_runs, neo_model_dir, text_file, tmp_path):
    from test_reliability import read_until, start
    ref, _ = neo_runs["e2e_ds"]
    out = str(tmp_path / "e2e_ds")
    a = neo_args(neo_model_dir, text_file, out, "e2e_ds")
    p = start(*a)
    read_until(p, "step     2/")
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) == 128 + signal.SIGTERM
    r = run("train.py", *a)
    assert r.stdout.startswith(f"resuming {out} at step ")
    for f in ("sae.safetensors", "eval.jsonl"):
        with open(os.path.join(out, f), "rb") as x, open(os.path.join(ref, f), "rb") as y:
            assert x.read() == y.read(), f


def test_apollo_tinystories_import_eval_and_saelens_export(tmp_path, neo_model_dir, text_file):
    """An SAE of Apollo's TinyStories configs (yaml: tlens_model_name roneneldan/TinyStories-1M, n_ctx 512) imports
    with its model, data and layer; it evaluates on a local copy of the model; SAELens gets TransformerLens's names."""
    import yaml
    import interop
    g = torch.Generator().manual_seed(0)
    P, d, n = "blocks-4-hook_resid_pre", 64, 256
    pt = str(tmp_path / "tinystories_e2e.pt")
    torch.save({f"{P}.encoder.0.weight": torch.randn(n, d, generator=g), f"{P}.encoder.0.bias": torch.zeros(n),
                f"{P}.decoder.weight": torch.randn(d, n, generator=g), f"{P}.decoder.bias": torch.zeros(d)}, pt)
    conf = {"tlens_model_name": TS, "loss": {"sparsity": {"p_norm": 1.0, "coeff": 3.0}, "in_to_orig": None,
            "out_to_in": {"coeff": 0.0}, "logits_kl": {"coeff": 1.0}},
            "train_data": {"dataset_name": "apollo-research/roneneldan-TinyStories-tokenizer-gpt2", "n_ctx": 512},
            "saes": {"sae_positions": "blocks.4.hook_resid_pre", "dict_size_to_input_ratio": 4.0}}
    with open(pt[:-3] + ".yaml", "w") as f:
        yaml.dump(conf, f)
    sae, cfg = interop.read_apollo(pt)
    assert (cfg["model"], cfg["layer"], cfg["loss"], cfg["l1"], cfg["args"]) == \
        (TS, 4, "e2e", 3.0, dict(dataset="apollo-research/roneneldan-TinyStories-tokenizer-gpt2", ctx=512))
    os.remove(pt[:-3] + ".yaml")  # without its yaml, d 64 says TinyStories-1M
    assert interop.read_apollo(pt)[1]["model"] == TS
    m = json.loads(run("eval.py", pt, "--model", neo_model_dir, "--dataset", text_file, "--ctx", 64,
                       "--eval_samples", 4, "--alive_tokens", 0, "--json").stdout)
    assert m["model"] == neo_model_dir and m["layer"] == 4 and m["ce_clean"] > 0 and m["downstream_layers"] == [5, 6, 7]
    lens = str(tmp_path / "lens")
    interop.main(["export-saelens", pt, lens])
    meta = json.load(open(os.path.join(lens, "cfg.json")))["metadata"]
    assert (meta["model_name"], meta["hook_name"], meta["context_size"]) == (TS, "blocks.4.hook_resid_pre", 512)


def test_bench_gpt_neo_shape_fast_equals_naive(neo_model_dir, monkeypatch):
    """bench.py's --arch gpt_neo builds TinyStories-1M's architecture; on the real checkpoint layout the fast step
    and the reference's way agree, at a ctx past the local window."""
    import copy
    from bench import neo_config
    from model import GPT
    from sae import SAE
    cfg = neo_config(argparse.Namespace(n_layer=8, n_head=16, n_embd=64, vocab_size=50257, ctx=512, window_size=256))
    assert GPT.from_pretrained(neo_model_dir).config == cfg
    model = GPT.from_pretrained(neo_model_dir)
    torch.manual_seed(0)
    sae = SAE(64, 128)
    sae_naive = copy.deepcopy(sae)
    args = argparse.Namespace(loss="e2e_ds", layer=4, l1=50.0, mse_coeff=0.0, kl_coeff=0.5, ds_coeff=1000.0, kl_chunk=None)
    idx = torch.randint(0, 50257, (1, 300), generator=torch.Generator().manual_seed(1))
    fast, _ = train.loss_step(model, sae, args, train.shared_passes(model, idx, [args]))
    naive, _ = train.reference_loss_step(model, sae_naive, idx, args)
    fast.backward()
    naive.backward()
    assert fast.item() == pytest.approx(naive.item(), rel=1e-5)
    for p, q in zip(sae.parameters(), sae_naive.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7)
    import bench  # one measurement in this process, the machine's matmul peak left out
    monkeypatch.setattr(bench, "matmul_flops", lambda *a, **k: 1e12)
    a = bench.parser.parse_args(["--arch", "gpt_neo", "--n_layer", "3", "--n_embd", "16", "--n_head", "4", "--window_size",
                                 "8", "--ctx", "24", "--batch_size", "2", "--layer", "1", "--dict_ratio", "2",
                                 "--vocab_size", "500", "--steps", "1", "--warmup", "0", "--device", "cpu"])
    r = bench.measure(a, "e2e_ds", "fast")
    assert r["loss"] == "e2e_ds" and r["arch"] == "gpt_neo" and r["s_per_step"] > 0 and r["step_gflop"] > 0
