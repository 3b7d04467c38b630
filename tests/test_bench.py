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


def fake_row(loss, path):
    return dict(loss=loss, path=path, n_sae=1, arch="gpt2", device="cpu", dtype="float32", compile=False,
                s_per_step=0.5 if path == "naive" else 0.25, tokens_per_s=64.0, peak_mem_mb=100.0, step_gflop=1.0,
                matmul_gflops=10.0, mfu=0.4, threads=2)


@pytest.mark.parametrize("json_flag", [False, True])
def test_table_or_json_lines_never_both(monkeypatch, capsys, json_flag):
    """bench.py prints the table (stdout), or with --json only one JSON line per measurement; progress on stderr."""
    import json

    import bench
    monkeypatch.setattr(bench, "run_worker", lambda argv, loss, path, device: fake_row(loss, path))
    argv = ["--n_layer", "2", "--n_head", "2", "--n_embd", "16", "--vocab_size", "64", "--layer", "0", "--loss", "e2e",
            "--naive", "--device", "cpu"] + ["--json"] * json_flag
    bench.main(argv)
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    def is_json(line):
        try:
            return isinstance(json.loads(line), dict)
        except ValueError:
            return False
    if json_flag:
        assert [json.loads(x) for x in lines] == [fake_row("e2e", "fast"), fake_row("e2e", "naive")]
    else:
        assert not any(map(is_json, lines)) and lines[1].split()[:3] == ["loss", "path", "s/step"], out
        assert lines[2].split()[:3] == ["e2e", "fast", "0.250"] and "2.00x" in lines[2] and len(lines) == 4
    assert len(err.strip().splitlines()) == 2 and err.startswith("bench.py: e2e fast 0.250 s/step (1/2)"), err
