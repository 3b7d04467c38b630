import math

import pytest
import torch

from losses import clean_logprobs, downstream_mse, fused_kl_div, kl_chunk, kl_div, logit_stats, mse_loss, sparsity_loss


def test_kl_equals_hand_sum_and_direction():
    g = torch.Generator().manual_seed(0)
    new, clean = torch.randn(2, 3, 11, generator=g), torch.randn(2, 3, 11, generator=g) * 2
    p_new, p_clean = new.softmax(-1), clean.softmax(-1)
    hand = sum((p_clean[b, t] * (p_clean[b, t].log() - p_new[b, t].log())).sum().item()
               for b in range(2) for t in range(3)) / 6
    reverse = sum((p_new[b, t] * (p_new[b, t].log() - p_clean[b, t].log())).sum().item()
                  for b in range(2) for t in range(3)) / 6
    assert kl_div(new, clean).item() == pytest.approx(hand, rel=1e-5)
    assert abs(hand - reverse) > 1e-2  # so the direction is actually tested
    W = torch.eye(11)
    assert fused_kl_div(new, clean, W, chunk_size=4).item() == pytest.approx(hand, rel=1e-5)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000, None])
def test_fused_kl_value_and_grad_match_plain(chunk):
    g = torch.Generator().manual_seed(1)
    B, T, C, V = 3, 21, 16, 503
    W = torch.randn(V, C, generator=g) * 0.5
    h = torch.randn(B, T, C, generator=g, requires_grad=True)
    h_clean = torch.randn(B, T, C, generator=g)
    ref = kl_div(h @ W.t(), h_clean @ W.t())
    (g_ref,) = torch.autograd.grad(ref, h)
    out = fused_kl_div(h, h_clean, W, chunk_size=chunk)
    (g_out,) = torch.autograd.grad(out * 3.0, h)  # a scaled upstream gradient flows through
    assert out.item() == pytest.approx(ref.item(), abs=1e-5, rel=1e-5)
    assert (g_out - 3.0 * g_ref).abs().max().item() < 1e-5 * max(1.0, g_ref.abs().max().item())
    assert g_out.shape == h.shape


def test_fused_kl_bf16_autocast_close():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(300, 32, generator=g) * 0.3
    h, h_clean = torch.randn(40, 32, generator=g), torch.randn(40, 32, generator=g)
    ref = kl_div(h @ W.t(), h_clean @ W.t()).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_kl_div(h, h_clean, W, chunk_size=16)
    assert out.dtype == torch.float32 and out.item() == pytest.approx(ref, rel=3e-2)


def test_logit_stats_matches_plain_formulas():
    g = torch.Generator().manual_seed(3)
    B, T, C, V = 2, 9, 8, 50
    W = torch.randn(V, C, generator=g)
    h, h_clean = torch.randn(B, T, C, generator=g), torch.randn(B, T, C, generator=g)
    idx = torch.randint(0, V, (B, T), generator=g)
    s = logit_stats(h, h_clean, W, idx, chunk_size=5)
    logits, logits_clean = h @ W.t(), h_clean @ W.t()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), idx[:, 1:].reshape(-1))
    ce_clean = torch.nn.functional.cross_entropy(logits_clean[:, :-1].reshape(-1, V), idx[:, 1:].reshape(-1))
    assert s["n_ce"] == B * (T - 1) and s["n_kl"] == B * T
    assert s["ce"] / s["n_ce"] == pytest.approx(ce.item(), rel=1e-5)
    assert s["ce_clean"] / s["n_ce"] == pytest.approx(ce_clean.item(), rel=1e-5)
    assert s["kl"] / s["n_kl"] == pytest.approx(kl_div(logits, logits_clean).item(), rel=1e-5)


def test_sparsity_mse_downstream_formulas():
    c = torch.tensor([[[1.0, 0.0, -2.0], [0.5, 0.5, 0.0]]])  # (1, 2, 3)
    assert sparsity_loss(c, d=4).item() == pytest.approx(((3.0 + 1.0) / 2) / 4)
    a, b = torch.zeros(2, 3), torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]])
    assert mse_loss(a, b).item() == pytest.approx((1 + 4 + 9) / 6)
    r1, r2 = [a, a], [b, torch.ones(2, 3)]
    assert downstream_mse(r1, r2).item() == pytest.approx(((14 / 6) + 1.0) / 2)
    with pytest.raises(ValueError):
        downstream_mse([], [])
    assert math.isfinite(sparsity_loss(c.bfloat16(), 3).item())


@pytest.mark.parametrize("chunk,block", [(5, None), (16, None), (37, None), (16, 3), (37, 8)])
def test_shared_clean_side_is_bitwise_the_same(chunk, block, monkeypatch):
    """Several SAEs of a sweep share clean_logprobs: the KL and its gradient are those of recomputing it, also
    with several elementwise blocks per chunk (block rows, the last one short)."""
    import kl_chunks
    if block:
        monkeypatch.setitem(kl_chunks.KL_BLOCK, "cpu", block)
    g = torch.Generator().manual_seed(3)
    h, hc, W = torch.randn(2, 19, 12, generator=g), torch.randn(2, 19, 12, generator=g), torch.randn(300, 12, generator=g)
    out = []
    for clean in (None, clean_logprobs(hc, W, chunk)):
        x = h.clone().requires_grad_(True)
        kl = fused_kl_div(x, hc, W, chunk, clean=clean)
        kl.backward()
        out.append((kl, x.grad))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert out[0][0].item() == pytest.approx(kl_div(h @ W.T, hc @ W.T).item(), rel=1e-5)
    with pytest.raises(ValueError, match="chunks"):
        fused_kl_div(h, hc, W, chunk + 1, clean=clean_logprobs(hc, W, chunk))  # 38 tokens: other chunks


def _pad(W, multiple=128):
    """W with zero rows up to a multiple of `multiple`, as model.unembedding makes it."""
    V_pad = -(-W.size(0) // multiple) * multiple
    return torch.cat([W, W.new_zeros(V_pad - W.size(0), W.size(1))])


@pytest.mark.parametrize("shared,block", [(False, None), (True, None), (False, 3), (True, 3)])
def test_padded_vocabulary_gives_the_plain_kl_and_grad(shared, block, monkeypatch):
    """Zero rows appended to W_U (aligned GEMMs) change nothing: the padded logits are masked out. fp32 value
    and gradient against the plain formula on the V real logits, to 1e-6 relative; also with elementwise
    blocks of 3 rows in chunks of 8 (and logit_stats)."""
    import kl_chunks
    if block:
        monkeypatch.setitem(kl_chunks.KL_BLOCK, "cpu", block)
    g = torch.Generator().manual_seed(4)
    B, T, C, V = 2, 13, 16, 1001  # V odd, padded to 1024
    W = torch.randn(V, C, generator=g) * 0.5
    h, hc = torch.randn(B, T, C, generator=g, requires_grad=True), torch.randn(B, T, C, generator=g)
    ref = kl_div(h @ W.t(), hc @ W.t())
    (g_ref,) = torch.autograd.grad(ref, h)
    Wp = _pad(W)
    clean = clean_logprobs(hc, Wp, 8, vocab=V) if shared else None
    out = fused_kl_div(h, hc, Wp, 8, clean=clean, vocab=V)
    (g_out,) = torch.autograd.grad(out, h)
    assert Wp.shape == (1024, C)
    assert abs(out.item() - ref.item()) <= 1e-6 * ref.item()
    assert (g_out - g_ref).abs().max().item() <= 1e-6 * g_ref.abs().max().item()
    unpadded = fused_kl_div(h, hc, W, 8)
    assert abs(out.item() - unpadded.item()) <= 1e-6 * unpadded.item()
    idx = torch.randint(0, V, (B, T), generator=g)
    a, b = logit_stats(h.detach(), hc, Wp, idx, 8, vocab=V), logit_stats(h.detach(), hc, W, idx, 8)
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-6)
    with pytest.raises(ValueError, match="vocab"):
        fused_kl_div(h, hc, Wp, 8, vocab=1025)


def test_compiled_chunk_matches_eager():
    """fused_kl_div(compiled=True): the elementwise work of a chunk through torch.compile, fp32, the same KL
    and gradient up to rounding, with the clean side computed or shared, and a partial last chunk."""
    g = torch.Generator().manual_seed(5)
    C, V = 16, 1001
    Wp = _pad(torch.randn(V, C, generator=g) * 0.5)
    h, hc = torch.randn(37, C, generator=g), torch.randn(37, C, generator=g)
    for bf16 in (False, True):  # bf16: the GEMMs in bf16, the casts to and from fp32 inside the compiled part
        res = []
        for compiled, shared in [(False, False), (True, False), (True, True)]:
            x = h.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                clean = clean_logprobs(hc, Wp, 16, vocab=V) if shared else None
                kl = fused_kl_div(x, hc, Wp, 16, clean=clean, vocab=V, compiled=compiled)
            kl.backward()
            res.append((kl.item(), x.grad))
        for kl, grad in res[1:]:
            assert kl == pytest.approx(res[0][0], rel=1e-6)
            torch.testing.assert_close(grad, res[0][1], rtol=1e-5, atol=1e-7)


def test_default_chunk_by_device_width_and_dtype():
    """64 tokens on CPU, 128 there from width 512 (W_U-read-bound GEMMs) and 256 under bf16, 512 on CUDA;
    fused_kl_div and clean_logprobs use it, with the dtype autocast gives."""
    assert [kl_chunk("cpu", 128), kl_chunk("cpu", 511), kl_chunk("cpu", 768), kl_chunk("cuda", 768)] == [64, 64, 128, 512]
    assert [kl_chunk("cpu", 128, torch.bfloat16), kl_chunk("cpu", 768, torch.bfloat16)] == [64, 256]
    g = torch.Generator().manual_seed(6)
    h, hc, W = torch.randn(300, 512, generator=g), torch.randn(300, 512, generator=g), torch.randn(50, 512, generator=g)
    with pytest.raises(ValueError, match="chunks are not those of 300 tokens by 128"):
        fused_kl_div(h, hc, W, clean=clean_logprobs(hc, W, 64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert [c.size(0) for c in clean_logprobs(hc, W)] == [256, 44]
        with pytest.raises(ValueError, match="chunks are not those of 300 tokens by 256"):
            fused_kl_div(h, hc, W, clean=clean_logprobs(hc, W, 128))
        fused_kl_div(h, hc, W, clean=clean_logprobs(hc, W))  # the same default on both sides


def test_help_states_the_default_chunks(monkeypatch):
    """train.py and bench.py --help say the defaults losses uses, derived from kl_chunks' constants (and
    re-exported by losses, where train.py and bench.py import them)."""
    import kl_chunks
    import losses
    assert losses.kl_chunk_defaults() == "64 on CPU, 128 there from width 512 (256 under bf16), 512 on CUDA"
    monkeypatch.setattr(kl_chunks, "KL_CHUNK_WIDE_CPU_BF16", 384)  # looked up there
    assert losses.kl_chunk("cpu", 768, torch.bfloat16) == 384 and "(384 under bf16)" in losses.kl_chunk_defaults()


@pytest.mark.parametrize("block", [None, 6])
def test_cpu_bf16_both_sides_in_one_gemm(block, monkeypatch):
    """On CPU under bf16 a chunk's spliced and clean logits come from one GEMM over both sides' rows. The KL and
    gradient are those of the clean side computed on its own (clean_logprobs): bitwise where this machine's bf16
    GEMM gives a row the bits it has alone (checked here on the same rows), else to rounding; and the plain
    formula's to bf16 accuracy. logit_stats, which shares the code, gives the same KL. Also with elementwise
    blocks of 6 rows in chunks of 16."""
    import kl_chunks
    if block:
        monkeypatch.setitem(kl_chunks.KL_BLOCK, "cpu", block)
    g = torch.Generator().manual_seed(8)
    V, C, chunk = 1001, 32, 16
    Wp = _pad(torch.randn(V, C, generator=g) * 0.3).bfloat16()
    h, hc = torch.randn(37, C, generator=g), torch.randn(37, C, generator=g)  # the last chunk has 5 rows
    hb, hcb = h.bfloat16(), hc.bfloat16()
    kl_chunks._KEPT.clear()
    rows_alone = True
    for i in range(0, 37, chunk):
        a, b = hb[i:i + chunk], hcb[i:i + chunk]
        both = torch.mm(torch.cat([a, b]), Wp.t())
        rows_alone &= torch.equal(both[:len(a)], a @ Wp.t()) and torch.equal(both[len(a):], b @ Wp.t())
    res = []
    for shared in (False, True):
        x = h.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            kl = fused_kl_div(x, hc, Wp, chunk, clean=clean_logprobs(hc, Wp, chunk, vocab=V) if shared else None, vocab=V)
        kl.backward()
        res.append((kl.detach(), x.grad))
    assert kl_chunks._KEPT["z"].shape == (2 * chunk, Wp.size(0))  # the GEMM's output: both sides' rows
    if rows_alone:
        assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])
    else:
        torch.testing.assert_close(res[0], res[1], rtol=1e-5, atol=1e-7)
    ref = kl_div(hb.float() @ Wp[:V].float().t(), hcb.float() @ Wp[:V].float().t())  # bf16 operands, fp32 math
    assert res[0][0].item() == pytest.approx(ref.item(), rel=2e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = logit_stats(h.view(1, 37, C), hc.view(1, 37, C), Wp, torch.zeros(1, 37, dtype=torch.long), chunk, vocab=V)
    assert stats["kl"] / 37 == pytest.approx(res[0][0].item(), rel=1e-6)


def test_cpu_bf16_buffers_are_kept_between_calls_and_change_nothing():
    """Under bf16 on CPU the KL's chunk buffers outlive the call (no page faults next step): a second call, and
    a call after one of another shape, give bitwise the first call's value and gradient; in fp32 nothing is kept."""
    import kl_chunks
    torch.manual_seed(0)
    V, C = 300, 16
    W = torch.randn(V, C).bfloat16()
    h, h_clean = torch.randn(40, C), torch.randn(40, C)

    def kl(n=40, chunk=16):
        x = h[:n].clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fused_kl_div(x, h_clean[:n], W, chunk)
        loss.backward()
        return loss.detach(), x.grad

    kl_chunks._KEPT.clear()
    first = kl()
    kept = {k: t.data_ptr() for k, t in kl_chunks._KEPT.items()}
    assert set(kept) == {"z", "lg", "p"}
    second = kl()
    assert {k: t.data_ptr() for k, t in kl_chunks._KEPT.items()} == kept  # the same memory, reused
    kl(n=12, chunk=5)  # another shape replaces them
    third = kl()
    for a, b, c in zip(first, second, third):
        assert torch.equal(a, b) and torch.equal(a, c)
    kl_chunks._KEPT.clear()
    x = h.clone().requires_grad_(True)
    fused_kl_div(x, h_clean, W.float(), 16).backward()
    assert not kl_chunks._KEPT
