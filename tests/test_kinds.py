"""The kinds are rows of config.KINDS: loss_step adds each term whose coefficient is not 0, the local phase of
--local_frac is the local row, and a new kind is one added row that trains end to end."""
import argparse
import copy

import pytest
import torch

import config
import train
from losses import downstream_mse, fused_kl_div, mse_loss, sparsity_loss
from model import GPT
from sae import SAE


def step_parts(model, sae, r, idx):
    """loss_step's loss and parts on one batch."""
    return train.loss_step(model, sae, r, train.shared_passes(model, idx, [r]))


def by_formula(model, sae, r, idx):
    """Σ coefficient · term, each term from its formula in losses.py, for an SAE at r.layer."""
    L, n = r.layer, model.config.n_layer
    with torch.no_grad():
        x = model.forward_to_layer(idx, L)
        _, clean = model.forward_from_layer(x, L, logits=False)
    x_hat, c = sae(x)
    _, spliced = model.forward_from_layer(x_hat, L, logits=False)
    ln_f, W = model.transformer.ln_f, model.lm_head.weight
    ds = list(range(L + 1, n))
    return (r.l1 * sparsity_loss(c, x.size(-1)) + r.mse_coeff * mse_loss(x_hat, x)
            + r.kl_coeff * fused_kl_div(ln_f(spliced[-1]), ln_f(clean[-1]), W)
            + r.ds_coeff * downstream_mse([spliced[k - L - 1] for k in ds], [clean[k - L - 1] for k in ds]))


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    model = GPT.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    sae = SAE(model.config.n_embd, 4 * model.config.n_embd)
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(3))
    return model, sae, idx


@pytest.mark.parametrize("kind", list(config.KINDS))
def test_each_row_is_its_loss(setup, kind):
    model, sae, idx = setup
    r = config.sae_flags(argparse.Namespace(kl_chunk=None), kind, 1, 0.7)
    row = config.KINDS[kind]
    assert (r.mse_coeff, r.kl_coeff, r.ds_coeff) == tuple(config.at_layer(row[k], 1) for k in ("mse", "kl", "ds"))
    loss, parts = step_parts(model, sae, r, idx)
    named = {"mse": r.mse_coeff, "kl": r.kl_coeff, "ds": r.ds_coeff}
    assert {k for k in parts if k in named} == {k for k, v in named.items() if v}  # a 0 term is not computed
    assert loss.item() == pytest.approx(by_formula(model, sae, r, idx).item(), rel=1e-5)


def test_flags_override_only_a_nonzero_coefficient():
    a = argparse.Namespace(kl_coeff=2.0, ds_coeff=7.0)
    local, e2e, e2e_ds = (config.sae_flags(a, k, 6) for k in ("local", "e2e", "e2e_ds"))
    assert (local.kl_coeff, local.ds_coeff, local.mse_coeff, local.l1) == (0.0, 0.0, 1.0, 4.0)
    assert (e2e.kl_coeff, e2e.ds_coeff, e2e.l1) == (2.0, 0.0, 3.0)
    assert (e2e_ds.kl_coeff, e2e_ds.ds_coeff, e2e_ds.l1) == (2.0, 7.0, 50.0)
    paper = config.sae_flags(argparse.Namespace(), "e2e_ds", 9)  # nearest paper layer 10
    assert (paper.kl_coeff, paper.ds_coeff, paper.l1, paper.local_l1) == (0.5, 0.05, 1.75, 6.0)


def test_local_phase_is_the_local_row(setup):
    model, sae, idx = setup
    r = config.sae_flags(argparse.Namespace(local_l1=0.3, kl_chunk=None), "e2e_ds", 1, 50.0)
    phase = config.local_phase(r)
    local = config.sae_flags(argparse.Namespace(), "local", 1, 0.3)
    assert (phase.loss, phase.l1, phase.mse_coeff, phase.kl_coeff, phase.ds_coeff) == \
        (local.loss, local.l1, local.mse_coeff, local.kl_coeff, local.ds_coeff)
    assert step_parts(model, sae, phase, idx)[0].item() == step_parts(model, sae, local, idx)[0].item()


def test_a_new_kind_is_one_row(setup, monkeypatch, tmp_path, tiny_model_dir, text_file):
    """e2e plus a tenth of the local MSE: one added row; the loss is its formula, the reference step agrees, and
    train.py trains it to a run folder that eval.py reads."""
    model, sae, idx = setup
    monkeypatch.setitem(config.KINDS, "e2e_mse", dict(mse=0.1, kl=1.0, ds=0.0, l1={2: 0.5, 6: 3.0, 10: 1.5}))
    from test_train import tiny_args
    args, runs, _, _ = config.resolve(train.parser, [str(a) for a in tiny_args(tiny_model_dir, text_file,
                                                                                str(tmp_path / "run"), "e2e_mse")])
    r = runs[0]
    assert (r.loss, r.mse_coeff, r.kl_coeff, r.ds_coeff, r.name) == ("e2e_mse", 0.1, 1.0, 0.0, f"e2e_mse_L1_l{r.l1:g}")
    r.kl_chunk = None
    loss, parts = step_parts(model, sae, r, idx)
    assert set(parts) == {"sparsity", "mse", "kl", "l0"}
    assert loss.item() == pytest.approx((0.1 * parts["mse"] + parts["kl"] + r.l1 * parts["sparsity"]).item(), rel=1e-6)
    ref_sae = copy.deepcopy(sae)
    ref, _ = train.reference_loss_step(model, ref_sae, idx, r)
    assert ref.item() == pytest.approx(loss.item(), rel=1e-5)
    loss.backward()
    ref.backward()
    for p, q in zip(sae.parameters(), ref_sae.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7)
    import json
    import os
    from test_reliability import train_in_process
    argv = tiny_args(tiny_model_dir, text_file, str(tmp_path / "run"), "e2e_mse", n_samples=16, eval_every=16)
    assert train_in_process(monkeypatch, *argv) is None
    cfg = json.load(open(tmp_path / "run" / "sae.json"))
    assert cfg["loss"] == "e2e_mse" and cfg["args"]["mse_coeff"] == 0.1
    evals = [json.loads(line) for line in open(os.path.join(tmp_path, "run", "eval.jsonl"))]
    assert [m["step"] for m in evals] == [2] and evals[0]["kl"] > 0
