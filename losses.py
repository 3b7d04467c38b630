"""
The loss terms of the paper, as pure functions. "mean" is over batch × position (N = B·T tokens).
Every reduction runs in fp32, also under bf16 autocast.

    sparsity    mean_n ‖c_n‖₁ / d                                  (times λ = --l1)
    mse         mean over elements of (x_hat − x)²                  (local; also explained variance at L)
    KL          mean_n Σ_v p_clean(v) (log p_clean(v) − log p_spliced(v))      KL(clean ‖ spliced)
    downstream  (1/K) Σ_k mean over elements of (a_k − a_k_clean)²,  k = L+1 .. n_layer−1

fused_kl_div computes the same KL from the final hidden states and the unembedding W_U, in chunks of tokens
(kl_chunks.py), so the (N, V) logits never exist; the gradient for the spliced side comes in the same pass:
    ∂KL/∂h_spliced = (softmax(h_spliced W_Uᵀ) − softmax(h_clean W_Uᵀ)) W_U / N
"""
import torch
import torch.nn.functional as F

from kl_chunks import KL_BLOCK, _Chunks, _kl_chunk_compiled, _log_softmax_, kl_chunk, kl_chunk_defaults  # noqa: F401


# ---- the formulas ------------------------------------------------------------------------------------------------
def sparsity_loss(c, d):
    """mean_n ‖c_n‖₁ / d, where d is the SAE's input size. c: (..., n_dict)."""
    return c.abs().sum(-1, dtype=torch.float32).mean() / d  # fp32 sum without an fp32 copy of c


def mse_loss(x_hat, x):
    """Per-element mean of (x_hat − x)², in fp32."""
    return F.mse_loss(x_hat.float(), x.float())


def downstream_mse(resids, resids_clean):
    """(1/K) Σ_k mse(resids[k], resids_clean[k]) over the K later layers (lists of (B, T, C))."""
    if len(resids) == 0 or len(resids) != len(resids_clean):
        raise ValueError(f"downstream_mse needs matching non-empty lists, got {len(resids)} and {len(resids_clean)}")
    return sum(mse_loss(a, b) for a, b in zip(resids, resids_clean)) / len(resids)


# ---- the KL: the spec --------------------------------------------------------------------------------------------
def kl_div(logits, logits_clean):
    """The spec: KL(p_clean ‖ p) from full logits (..., V), mean over tokens, fp32. The plain formula, the
    reference for fused_kl_div and the tests: F.kl_div(log_softmax(new), log_softmax(clean), log_target=True,
    reduction="batchmean")."""
    V = logits.size(-1)
    lp = F.log_softmax(logits.float().reshape(-1, V), dim=-1)
    lp_clean = F.log_softmax(logits_clean.float().reshape(-1, V), dim=-1)
    return F.kl_div(lp, lp_clean, log_target=True, reduction="batchmean")


# ---- the KL, fused: the same value and gradient, chunk by chunk --------------------------------------------------
def mm_dtype(t):
    """The dtype autocast would run a matmul on t in (fp32 when autocast is off)."""
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


@torch.no_grad()
def clean_logprobs(h_clean, W, chunk_size=None, vocab=None):
    """The clean side of fused_kl_div, computed once to be shared by several SAEs spliced into the same
    batch (train.py sweeps): log p_clean per chunk, N·V_pad fp32 in all. Passing it as
    fused_kl_div(..., clean=) gives bitwise the same KL and gradient as recomputing it: the same operations
    on the same values (on CPU under bf16 the recomputed clean rows share a GEMM with the spliced ones, and
    get the same bits as alone where the GEMM computes each row on its own, as oneDNN's does)."""
    C, dt = h_clean.size(-1), mm_dtype(h_clean)
    chunk_size = chunk_size or kl_chunk(h_clean.device, C, dt)
    hc_mm, W_mm = h_clean.reshape(-1, C).to(dt), W.to(dt)
    N = hc_mm.size(0)
    bufs = _Chunks(W_mm, vocab or W.size(0), min(chunk_size, N))
    out = []
    with torch.autocast(h_clean.device.type, enabled=False):
        for i in range(0, N, chunk_size):
            j = min(i + chunk_size, N)
            out.append(_log_softmax_(bufs.logits(hc_mm[i:j], hc_mm.new_empty(j - i, W.size(0), dtype=torch.float32))))
    return out


class _FusedKL(torch.autograd.Function):
    """Per chunk of n tokens (the buffers: kl_chunks._Chunks):
        z = [h; h_clean] W_Uᵀ                                         the GEMM(s), (2n, V_pad) in the matmul dtype
        per block of m rows, in fp32:  lp, lc = log_softmax of both sides' rows
                                       KL += Σ pc (lc − lp) as one dot,  pc = exp(lc)
                                       z's spliced rows = exp(lp) − pc = dlogits
        grad_h[rows] = dlogits @ W_U / N                              the gradient GEMM, in the forward
    With a shared clean side (clean[k], log p_clean, read only) z holds the spliced rows alone."""

    @staticmethod
    def forward(ctx, h, h_clean, W, chunk_size, clean, vocab, compiled):
        N = h.size(0)
        dt = mm_dtype(h)
        h_mm, W_mm = h.to(dt), W.to(dt)
        hc_mm = h_clean.to(dt) if clean is None else None
        need_grad = ctx.needs_input_grad[0]
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        bufs = _Chunks(W_mm, vocab, min(chunk_size, N), KL_BLOCK.get(h.device.type) if not compiled else None)
        with torch.autocast(h.device.type, enabled=False):  # every op below picks its dtype itself
            for k, i in enumerate(range(0, N, chunk_size)):
                j = min(i + chunk_size, N)
                n, ck = j - i, clean[k] if clean is not None else None  # ck: this chunk's shared log p_clean
                z = bufs.gemm(h_mm, hc_mm, i, j)                    # (2n, V_pad) logits; (n, V_pad) if shared
                if compiled:  # the chunk in two fused passes; dlogits end up in z's first n rows
                    total += _kl_chunk_compiled()(z[:n], z[n:2 * n] if ck is None else ck, ck is None)
                else:
                    for s, e in bufs.blocks():
                        lp, lc = bufs.log_probs(s, e, ck)                           # (b, V_pad) each
                        kl, pc = bufs.kl_sum(lp, lc, shared=ck is not None)         # Σ pc (lc − lp), pc = p_clean
                        total += kl
                        if need_grad:
                            bufs.dlogits(lp, pc, s, e)                               # p − p_clean, into z
                if need_grad:
                    bufs.grad(grad_h[i:j])                                           # (n, C) = dlogits @ W_U
        if need_grad:
            grad_h.div_(N)
        ctx.save_for_backward(grad_h)
        ctx.h_dtype = h.dtype
        return total / N

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return (grad_out * grad_h).to(ctx.h_dtype), None, None, None, None, None, None


def fused_kl_div(h, h_clean, W, chunk_size=None, clean=None, vocab=None, compiled=False):
    """KL(p_clean ‖ p) with p = softmax(h W_Uᵀ), p_clean = softmax(h_clean W_Uᵀ), mean over tokens.
    h, h_clean: (..., C) final hidden states (after ln_f); W: (V, C) unembedding, frozen, or (V_pad, C) with
    zero rows from vocab = V on (model.unembedding: aligned GEMMs; the padded logits are masked out, so the
    KL is that of the V real ones). Equal to kl_div(h @ W[:V].T, h_clean @ W[:V].T); the gradient flows
    to h only. clean: clean_logprobs(h_clean, W, chunk_size, vocab) when several SAEs share it (then
    h_clean is not read). compiled: the elementwise part of each chunk through torch.compile (Triton on
    CUDA, where it pays back its compile; C++ on CPU, where it does not); equal up to rounding."""
    C = h.size(-1)
    chunk_size = chunk_size or kl_chunk(h.device, C, mm_dtype(h))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    vocab = vocab or W.size(0)
    if not 0 < vocab <= W.size(0):
        raise ValueError(f"vocab {vocab} must be in 1..{W.size(0)}, the rows of W")
    N = h.reshape(-1, C).size(0)
    if clean is not None and [c.size(0) for c in clean] != [min(chunk_size, N - i) for i in range(0, N, chunk_size)]:
        raise ValueError(f"clean's chunks are not those of {N} tokens by {chunk_size}")
    return _FusedKL.apply(h.reshape(-1, C), h_clean.detach().reshape(-1, C), W.detach(), chunk_size, clean, vocab,
                          compiled)


@torch.no_grad()
def logit_stats(h, h_clean, W, idx, chunk_size=None, vocab=None):
    """Sums for eval from hidden states (B, T, C) and token ids (B, T), chunked like fused_kl_div (W and
    vocab as there): kl = Σ over all B·T positions of KL(clean ‖ spliced); ce, ce_clean = Σ over positions
    0..T−2 of the next-token cross-entropy; n_kl, n_ce = the counts. Divide to get means."""
    B, T, C = h.shape
    dt = mm_dtype(h)
    chunk_size = chunk_size or kl_chunk(h.device, C, dt)
    W_mm = W.to(dt)
    h_mm, hc_mm = h.reshape(-1, C).to(dt), h_clean.reshape(-1, C).to(dt)
    targets = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -100)], dim=1).reshape(-1)  # last pos ignored
    out = dict(kl=0.0, ce=0.0, ce_clean=0.0, n_kl=B * T, n_ce=B * (T - 1))
    bufs = _Chunks(W_mm, vocab or W.size(0), min(chunk_size, B * T), KL_BLOCK.get(h.device.type))
    with torch.autocast(h.device.type, enabled=False):
        for i in range(0, B * T, chunk_size):
            j = min(i + chunk_size, B * T)
            bufs.gemm(h_mm, hc_mm, i, j)
            for s, e in bufs.blocks():
                lp, lc = bufs.log_probs(s, e)
                t = targets[i + s:i + e]
                out["ce"] += F.nll_loss(lp, t, reduction="sum", ignore_index=-100).item()
                out["ce_clean"] += F.nll_loss(lc, t, reduction="sum", ignore_index=-100).item()
                out["kl"] += bufs.kl_sum(lp, lc)[0].item()
    return out
