"""
The loss terms of the paper, as pure functions. "mean" is over batch × position (N = B·T tokens).
Every reduction runs in fp32, also under bf16 autocast.

    sparsity    mean_n ‖c_n‖₁ / d                                  (times λ = --l1)
    mse         mean over elements of (x_hat − x)²                  (local; also explained variance at L)
    KL          mean_n Σ_v p_clean(v) (log p_clean(v) − log p_spliced(v))      KL(clean ‖ spliced)
    downstream  (1/K) Σ_k mean over elements of (a_k − a_k_clean)²,  k = L+1 .. n_layer−1

fused_kl_div computes the KL from the final hidden states and the unembedding W_U in chunks of tokens,
so the full (N, V) logits of neither pass ever exist (at GPT-2's V = 50257 and 8×1024 tokens one fp32
copy is 1.6 GB). Its gradient with respect to the spliced hidden states is computed in the same pass:
    ∂KL/∂h_spliced = (softmax(h_spliced W_Uᵀ) − softmax(h_clean W_Uᵀ)) W_U / N
"""
import torch
import torch.nn.functional as F

# tokens per chunk, by device (bench.py, GPT-2 small shape): on 2 CPU cores 64 keeps peak RSS ~0.1-0.2 GB
# lower than 128 for a few % of time; on an H100 512 is 5% faster than 128 and larger gains nothing
KL_CHUNK = {"cpu": 64, "cuda": 512}


def kl_chunk(device):
    """The default chunk size for a device."""
    return KL_CHUNK.get(torch.device(device).type, 64)


def sparsity_loss(c, d):
    """mean_n ‖c_n‖₁ / d, where d is the SAE's input size. c: (..., n_dict)."""
    return c.float().abs().sum(-1).mean() / d


def mse_loss(x_hat, x):
    """Per-element mean of (x_hat − x)², in fp32."""
    return F.mse_loss(x_hat.float(), x.float())


def downstream_mse(resids, resids_clean):
    """(1/K) Σ_k mse(resids[k], resids_clean[k]) over the K later layers (lists of (B, T, C))."""
    if len(resids) == 0 or len(resids) != len(resids_clean):
        raise ValueError(f"downstream_mse needs matching non-empty lists, got {len(resids)} and {len(resids_clean)}")
    return sum(mse_loss(a, b) for a, b in zip(resids, resids_clean)) / len(resids)


def kl_div(logits, logits_clean):
    """KL(p_clean ‖ p) from full logits (..., V), mean over tokens, fp32. The plain formula, for reference
    and tests: F.kl_div(log_softmax(new), log_softmax(clean), log_target=True, reduction="batchmean")."""
    V = logits.size(-1)
    lp = F.log_softmax(logits.float().reshape(-1, V), dim=-1)
    lp_clean = F.log_softmax(logits_clean.float().reshape(-1, V), dim=-1)
    return F.kl_div(lp, lp_clean, log_target=True, reduction="batchmean")


def _mm_dtype(t):
    """The dtype autocast would run a matmul on t in (fp32 when autocast is off)."""
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


def _logits(h, W, i, j):
    """fp32 logits (j−i, V) of rows i:j; h and W already in the matmul dtype."""
    return (h[i:j] @ W.t()).float()


def _clean_chunk(hc_mm, W_mm, i, j):
    """(log p_clean, p_clean), each (j−i, V) fp32, of rows i:j."""
    lp_clean = torch.log_softmax(_logits(hc_mm, W_mm, i, j), dim=-1)
    return lp_clean, lp_clean.exp()


@torch.no_grad()
def clean_logprobs(h_clean, W, chunk_size=None):
    """The clean side of fused_kl_div, computed once to be shared by several SAEs spliced into the same
    batch (train.py sweeps): log p_clean per chunk, N·V fp32 in all (p_clean = its exp is redone per use:
    one elementwise pass, against a second N·V buffer). Passing it as fused_kl_div(..., clean=) gives
    bitwise the same KL and gradient as recomputing it: the same operations on the same values."""
    C = h_clean.size(-1)
    chunk_size = chunk_size or kl_chunk(h_clean.device)
    dt = _mm_dtype(h_clean)
    hc_mm, W_mm = h_clean.reshape(-1, C).to(dt), W.to(dt)
    return [_clean_chunk(hc_mm, W_mm, i, min(i + chunk_size, hc_mm.size(0)))[0]
            for i in range(0, hc_mm.size(0), chunk_size)]


class _FusedKL(torch.autograd.Function):

    @staticmethod
    def forward(ctx, h, h_clean, W, chunk_size, clean):
        N = h.size(0)
        dt = _mm_dtype(h)
        h_mm, W_mm = h.to(dt), W.to(dt)
        hc_mm = h_clean.to(dt) if clean is None else None
        need_grad = ctx.needs_input_grad[0]
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if need_grad else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for k, i in enumerate(range(0, N, chunk_size)):
            j = min(i + chunk_size, N)
            lp = torch.log_softmax(_logits(h_mm, W_mm, i, j), dim=-1)        # (n, V)
            lp_clean, p_clean = _clean_chunk(hc_mm, W_mm, i, j) if clean is None else (clean[k], clean[k].exp())
            # Σ p_clean (log p_clean − log p) as one dot; in place unless the clean chunk is shared
            diff = lp_clean.sub_(lp) if clean is None else lp_clean - lp
            total += torch.dot(p_clean.view(-1), diff.view(-1))
            if need_grad:
                dlogits = lp.exp_().sub_(p_clean)                             # (n, V) softmax − softmax_clean
                grad_h[i:j] = (dlogits.to(dt) @ W_mm).float()                 # (n, C), divided by N below
            del lp, lp_clean, p_clean, diff
        if need_grad:
            grad_h.div_(N)
        ctx.save_for_backward(grad_h)
        ctx.h_dtype = h.dtype
        return total / N

    @staticmethod
    def backward(ctx, grad_out):
        (grad_h,) = ctx.saved_tensors
        return (grad_out * grad_h).to(ctx.h_dtype), None, None, None, None


def fused_kl_div(h, h_clean, W, chunk_size=None, clean=None):
    """KL(p_clean ‖ p) with p = softmax(h W_Uᵀ), p_clean = softmax(h_clean W_Uᵀ), mean over tokens.
    h, h_clean: (..., C) final hidden states (after ln_f); W: (V, C) unembedding, frozen.
    Equal to kl_div(h @ W.T, h_clean @ W.T); the gradient flows to h only. clean: clean_logprobs(h_clean, W,
    chunk_size) when several SAEs share it (then h_clean is not read)."""
    C = h.size(-1)
    chunk_size = chunk_size or kl_chunk(h.device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    N = h.reshape(-1, C).size(0)
    if clean is not None and [c.size(0) for c in clean] != [min(chunk_size, N - i) for i in range(0, N, chunk_size)]:
        raise ValueError(f"clean's chunks are not those of {N} tokens by {chunk_size}")
    return _FusedKL.apply(h.reshape(-1, C), h_clean.detach().reshape(-1, C), W.detach(), chunk_size, clean)


@torch.no_grad()
def logit_stats(h, h_clean, W, idx, chunk_size=None):
    """Sums for eval from hidden states (B, T, C) and token ids (B, T), chunked like fused_kl_div:
    kl = Σ over all B·T positions of KL(clean ‖ spliced); ce, ce_clean = Σ over positions 0..T−2 of the
    next-token cross-entropy; n_kl, n_ce = the counts. Divide to get means."""
    B, T, C = h.shape
    chunk_size = chunk_size or kl_chunk(h.device)
    dt = _mm_dtype(h)
    W_mm = W.to(dt)
    h_mm, hc_mm = h.reshape(-1, C).to(dt), h_clean.reshape(-1, C).to(dt)
    targets = torch.cat([idx[:, 1:], torch.full_like(idx[:, :1], -100)], dim=1).reshape(-1)  # last pos ignored
    out = dict(kl=0.0, ce=0.0, ce_clean=0.0, n_kl=B * T, n_ce=B * (T - 1))
    for i in range(0, B * T, chunk_size):
        j = min(i + chunk_size, B * T)
        logits, logits_clean = _logits(h_mm, W_mm, i, j), _logits(hc_mm, W_mm, i, j)
        lp, lp_clean = torch.log_softmax(logits, -1), torch.log_softmax(logits_clean, -1)
        out["kl"] += (lp_clean.exp() * (lp_clean - lp)).sum().item()
        out["ce"] += F.nll_loss(lp, targets[i:j], reduction="sum", ignore_index=-100).item()
        out["ce_clean"] += F.nll_loss(lp_clean, targets[i:j], reduction="sum", ignore_index=-100).item()
    return out
