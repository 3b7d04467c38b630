"""The fast training step (train.loss_step: prefix once, fused KL) and the reference's way
(train.reference_loss_step: two full forwards, full logits, plain KL) give the same loss and gradients."""
import argparse
import copy

import pytest
import torch

from bench import step_flops
from config import KINDS, sae_flags
from model import GPT
from sae import SAE
from train import loss_step, reference_loss_step, shared_passes


@pytest.mark.parametrize("loss", list(KINDS))
def test_fast_and_naive_steps_agree(tiny_model_dir, loss):
    model = GPT.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    sae = SAE(model.config.n_embd, 4 * model.config.n_embd)
    sae_naive = copy.deepcopy(sae)
    args = sae_flags(argparse.Namespace(kl_chunk=7), loss, 1, 0.7)
    idx = torch.randint(0, 50257, (2, 24), generator=torch.Generator().manual_seed(1))
    fast, parts = loss_step(model, sae, args, shared_passes(model, idx, [args]))
    naive, parts_naive = reference_loss_step(model, sae_naive, idx, args)
    fast.backward()
    naive.backward()
    assert fast.item() == pytest.approx(naive.item(), rel=1e-5)
    for k in parts_naive:
        assert parts[k].item() == pytest.approx(parts_naive[k].item(), rel=1e-5, abs=1e-8), k
    for (name, p), q in zip(sae.named_parameters(), sae_naive.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-7), name


def test_step_flops_counts():
    cfg = GPT.__init__.__globals__["GPTConfig"](n_layer=4, n_embd=8, n_head=2, n_inner=32, vocab_size=10)
    a = argparse.Namespace(batch_size=2, ctx=3, layer=1, loss="local")
    block = 2 * (4 * 64 + 2 * 8 * 32) + 4 * 3 * 8
    assert step_flops(cfg, a, 16) == 6 * (block + 2 * 8 * 16 * 2 * 3)
    a.loss = "e2e"
    e2e = 6 * (block + 3 * 3 * block + 3 * 2 * 8 * 10 + 2 * 8 * 16 * 6)
    assert step_flops(cfg, a, 16) == e2e


def test_short_training_fast_equals_naive(tiny_model_dir):
    """Eight Adam steps with each way of computing the step end at the same SAE (fp32, float tolerance)."""
    model = GPT.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    sae = SAE(model.config.n_embd, 4 * model.config.n_embd)
    sae_naive, init = copy.deepcopy(sae), copy.deepcopy(sae)
    args = sae_flags(argparse.Namespace(kl_chunk=None), "e2e_ds", 1, 0.7)
    g = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, 50257, (2, 16), generator=g) for _ in range(8)]
    def fast(model, sae, idx, args):
        return loss_step(model, sae, args, shared_passes(model, idx, [args]))
    for s, fn in ((sae, fast), (sae_naive, reference_loss_step)):
        opt = torch.optim.Adam(s.parameters(), lr=1e-3)
        for idx in batches:
            fn(model, s, idx, args)[0].backward()
            torch.nn.utils.clip_grad_norm_(s.parameters(), 10.0)
            opt.step()
            opt.zero_grad()
    assert (sae.encoder.weight - init.encoder.weight).abs().max() > 1e-3  # training moved it, well past the tolerance
    for (name, p), q in zip(sae.named_parameters(), sae_naive.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), name
