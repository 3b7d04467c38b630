"""interop.py: Apollo's released layout in, SAELens out and back in, firing frequencies, the CLI."""
import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file

import interop
from interop import hook_layer, load_any, load_firing, read_apollo, read_saelens, write_saelens
from sae import SAE, load_sae, save_firing, save_sae

D, N, LAYER = 16, 48, 2


def random_sae(seed=0, d=D, n=N):
    torch.manual_seed(seed)
    sae = SAE(d, n)
    with torch.no_grad():
        sae.decoder.weight.mul_(torch.rand(n) * 3 + 0.2)  # raw column norms far from 1
        sae.decoder.bias.normal_()
        sae.encoder.bias.normal_(0, 0.3)
    return sae


def write_apollo(path, seed=0, layer=LAYER, conf=True, positions=None):
    """A .pt (+ .yaml) in exactly the layout of Apollo's release; returns the raw tensors."""
    g = torch.Generator().manual_seed(seed)
    W_e, b_e = torch.randn(N, D, generator=g), torch.randn(N, generator=g) * 0.3
    W_d = torch.randn(D, N, generator=g) * (torch.rand(N, generator=g) * 3 + 0.2)
    b_d = torch.randn(D, generator=g)
    P = f"blocks-{layer}-hook_resid_pre"
    torch.save({f"{P}.encoder.0.weight": W_e, f"{P}.encoder.0.bias": b_e, f"{P}.decoder.weight": W_d,
                f"{P}.decoder.bias": b_d}, path)
    if conf:
        c = {"tlens_model_name": "gpt2-small", "seed": 0, "n_samples": 400000,
             "saes": {"sae_positions": positions or [f"blocks.{layer}.hook_resid_pre"], "dict_size_to_input_ratio": N / D},
             "loss": {"sparsity": {"p_norm": 1.0, "coeff": 35}, "in_to_orig": {"hook_positions": ["blocks.3.hook_resid_pre"],
                      "total_coeff": 2.5}, "out_to_orig": None, "out_to_in": {"coeff": 0.0}, "logits_kl": {"coeff": 0.5}},
             "train_data": {"dataset_name": "apollo-research/Skylion007-openwebtext-tokenizer-gpt2", "n_ctx": 1024,
                            "is_tokenized": True, "split": "train"}}
        with open(os.path.splitext(path)[0] + ".yaml", "w") as f:
            yaml.dump(c, f)
    return W_e, b_e, W_d, b_d


def test_hook_layer():
    assert hook_layer("blocks.6.hook_resid_pre") == 6 and hook_layer("blocks-10-hook_resid_pre") == 10
    for bad in ("blocks.6.hook_resid_post", "blocks.6.hook_mlp_out", None):
        with pytest.raises(ValueError, match="hook_resid_pre"):
            hook_layer(bad)


def test_apollo_import_equals_reference_formula(tmp_path):
    path = str(tmp_path / "downstream_similar_ce_layer_2.pt")
    W_e, b_e, W_d, b_d = write_apollo(path)
    assert not torch.allclose(W_d.norm(dim=0), torch.ones(N), atol=0.1)  # raw norms, as released
    sae, cfg = read_apollo(path)
    assert (cfg["layer"], cfg["model"], cfg["center"], cfg["loss"], cfg["l1"]) == (LAYER, "gpt2", True, "e2e_ds", 35)
    assert cfg["args"] == dict(dataset="apollo-research/Skylion007-openwebtext-tokenizer-gpt2", ctx=1024)
    x = torch.randn(3, 5, D)
    c_ref = torch.relu(x @ W_e.T + b_e)
    x_ref = c_ref @ (W_d / W_d.norm(dim=0, keepdim=True)).T + b_d
    x_hat, c = sae(x)
    assert torch.allclose(c, c_ref, atol=1e-5) and torch.allclose(x_hat, x_ref, atol=1e-5)
    assert torch.allclose(sae.decoder.weight.norm(dim=0), torch.ones(N), atol=1e-6)  # normalised on load
    assert (c > 0).any() and (c == 0).any()  # the check means something: some fire, some do not


def test_apollo_yaml_variants(tmp_path, capsys):
    path = str(tmp_path / "e2e_similar_l0_layer_5.pt")
    write_apollo(path, layer=5, positions="blocks.5.hook_resid_pre")  # a plain string also occurs
    assert read_apollo(path)[1]["layer"] == 5
    write_apollo(path, layer=5, positions=["blocks.4.hook_resid_pre"])
    with pytest.raises(ValueError, match="blocks.4.hook_resid_pre"):
        read_apollo(path)
    os.remove(str(tmp_path / "e2e_similar_l0_layer_5.yaml"))
    sae, cfg = read_apollo(path)  # no yaml: layer from the keys, kind from the release's file name
    assert cfg["layer"] == 5 and cfg["loss"] == "e2e" and "no " in capsys.readouterr().err
    torch.save({"something.weight": torch.zeros(2)}, str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="hook_resid_pre|not an Apollo"):
        read_apollo(str(tmp_path / "bad.pt"))


def saelens_forward(folder, x):
    """SAELens's documented `standard` forward, computed from the files alone."""
    w = load_file(os.path.join(folder, "sae_weights.safetensors"))
    with open(os.path.join(folder, "cfg.json")) as f:
        cfg = json.load(f)
    acts = torch.relu((x - w["b_dec"] * cfg["apply_b_dec_to_input"]) @ w["W_enc"] + w["b_enc"])
    return acts @ w["W_dec"] + w["b_dec"], acts


@pytest.mark.parametrize("center", [True, False])
def test_saelens_export_forward_and_round_trip(tmp_path, center):
    sae = random_sae()
    cfg = dict(layer=LAYER, model="gpt2", center=center, loss="e2e", args=dict(dataset="data.txt", ctx=64, l1=1.5))
    out = str(tmp_path / "export")
    write_saelens(sae, cfg, out)
    conf = json.load(open(os.path.join(out, "cfg.json")))
    meta = conf["metadata"]
    assert conf["architecture"] == "standard" and (conf["d_in"], conf["d_sae"]) == (D, N)
    assert meta["hook_name"] == f"blocks.{LAYER}.hook_resid_pre" and meta["context_size"] == 64
    assert meta["model_from_pretrained_kwargs"] == {"center_writing_weights": center}
    assert tuple(int(v) for v in meta["sae_lens_version"].split(".")) >= (6, 0, 0)
    x = torch.randn(4, 6, D) * 2
    ref, acts = saelens_forward(out, x)
    x_hat, c = sae(x)
    assert torch.allclose(acts, c, atol=1e-5) and torch.allclose(ref, x_hat, atol=1e-5)
    back, cfg2 = read_saelens(out)
    for k in ("encoder.weight", "encoder.bias", "decoder.bias"):  # bit for bit
        assert torch.equal(back.state_dict()[k], sae.state_dict()[k]), k
    assert torch.allclose(back.dict_elements(), sae.dict_elements(), atol=1e-6)
    assert torch.allclose(back(x)[0], x_hat, atol=1e-5)
    assert (cfg2["layer"], cfg2["model"], cfg2["center"], cfg2["loss"]) == (LAYER, "gpt2", center, "e2e")
    assert cfg2["args"]["dataset"] == "data.txt" and cfg2["args"]["ctx"] == 64


def test_saelens_import_of_a_foreign_sae(tmp_path):
    """Non-unit W_dec rows and apply_b_dec_to_input true: folded into our parametrisation exactly."""
    from safetensors.torch import save_file
    torch.manual_seed(1)
    w = dict(W_enc=torch.randn(D, N), b_enc=torch.randn(N) * 0.3, W_dec=torch.randn(N, D) * 3, b_dec=torch.randn(D))
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    meta = dict(sae_lens_version="6.1.0", model_name="gpt2-small", hook_name="blocks.3.hook_resid_pre", context_size=128,
                dataset_path="some/dataset")
    json.dump(dict(architecture="standard", d_in=D, d_sae=N, apply_b_dec_to_input=True, normalize_activations="none",
                   metadata=meta), open(tmp_path / "cfg.json", "w"))
    sae, cfg = read_saelens(str(tmp_path))
    x = torch.randn(5, D)
    assert torch.allclose(sae(x)[0], saelens_forward(str(tmp_path), x)[0], atol=1e-4)
    assert (cfg["layer"], cfg["model"], cfg["center"], cfg["args"]["ctx"]) == (3, "gpt2", True, 128)
    json.dump(dict(architecture="topk", d_in=D, d_sae=N, metadata=meta), open(tmp_path / "cfg.json", "w"))
    with pytest.raises(ValueError, match="'topk'.*standard"):
        read_saelens(str(tmp_path))


def test_firing_through_sparsity_file(tmp_path):
    freq = torch.tensor([0.0, 1e-6, 0.5, 1.0, 0.0, 3e-3]).double()
    save_firing(str(tmp_path), freq, 500_000, dataset="x")
    f = load_firing(str(tmp_path))
    assert torch.equal(f["freq"], freq) and f["tokens"] == 500_000 and f["dataset"] == "x"
    sae = random_sae(n=6)
    out = str(tmp_path / "export")
    write_saelens(sae, dict(layer=1, model="gpt2", center=True), out, firing=f)
    s = load_file(os.path.join(out, "sparsity.safetensors"))["sparsity"]
    assert s[0] == pytest.approx(-10) and s[2] == pytest.approx(-0.30103, abs=1e-5)  # log10(freq + 1e-10)
    back = load_firing(out)
    assert back["tokens"] == 500_000
    assert torch.equal(back["freq"] > 0, freq > 0)  # dead stay dead, alive stay alive
    assert torch.allclose(back["freq"], freq, rtol=1e-5, atol=0)
    assert load_firing(str(tmp_path / "nothing")) is None


def test_load_any_dispatch(tmp_path):
    sae = random_sae()
    save_sae(sae, str(tmp_path / "run"), dict(layer=LAYER, model="gpt2", center=True, loss="local"))
    write_saelens(sae, dict(layer=LAYER, model="gpt2", center=True), str(tmp_path / "lens"))
    write_apollo(str(tmp_path / "a.pt"))
    x = torch.randn(7, D)
    for name, fmt in (("run", "run"), ("lens", "saelens"), ("a.pt", "apollo")):
        s, cfg, _ = load_any(str(tmp_path / name))
        assert cfg["format"] == fmt and cfg["layer"] == LAYER
        if fmt != "apollo":
            assert torch.allclose(s(x)[0], sae(x)[0], atol=1e-5)
    with pytest.raises(ValueError, match="no saved SAE"):
        load_any(str(tmp_path))


def test_cli_import_export(tmp_path, capsys):
    src = str(tmp_path / "local_similar_ce_layer_2.pt")
    W_e, b_e, W_d, b_d = write_apollo(src)
    run = str(tmp_path / "run")
    interop.main(["import-apollo", src, run])
    sae, cfg = load_sae(run)  # a plain run folder eval.py / analysis.py read
    assert cfg["imported_from"]["format"] == "apollo" and cfg["loss"] == "e2e_ds" and torch.equal(sae.encoder.weight, W_e)
    interop.main(["export-saelens", run, str(tmp_path / "lens")])
    assert "no sparsity.safetensors" in capsys.readouterr().out
    interop.main(["import-saelens", str(tmp_path / "lens"), str(tmp_path / "run2")])
    assert torch.equal(load_sae(str(tmp_path / "run2"))[0].encoder.weight, W_e)
    for argv, words in ((["import-saelens", src, run], ["apollo", "not saelens"]),
                        (["export-saelens", str(tmp_path / "missing"), run], ["missing", "does not exist"]),
                        (["convert", src, run], ["convert", "import-apollo"])):
        with pytest.raises(SystemExit) as e:
            interop.main(argv)
        msg = str(e.value.code)
        assert msg.startswith("interop.py: error:") and "\n" not in msg and all(w in msg for w in words), msg
