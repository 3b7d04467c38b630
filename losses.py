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
import functools

import torch
import torch.nn.functional as F

# tokens per chunk, by device (bench.py): on 2 CPU cores a pass over W_U (V·C floats) per 64 rows is the cheapest
# for a narrow model, while at GPT-2 small's C = 768 (154 MB of W_U in fp32) the GEMMs are bound by reading
# W_U and 128 rows per pass is faster; on an H100 512 is 5% faster than 128 and larger gains nothing
KL_CHUNK = {"cpu": 64, "cuda": 512}
KL_CHUNK_WIDE_CPU, WIDE = 128, 512  # the CPU chunk for a model of width C >= WIDE
# under bf16 on CPU the elementwise blocks (KL_BLOCK) keep the fp32 buffers small, so the GEMMs can take more
# rows: at 256 tokens (a 512-row forward GEMM, both sides) config B's step took 0.456 -> 0.420 s (30 interleaved
# pairs) for 41 MB more peak; 512 gained no more for twice that. In fp32, 256 gained <= 3% of the KL for 51 MB.
KL_CHUNK_WIDE_CPU_BF16 = 256
KL_BLOCK = {"cpu": 32}  # rows per elementwise block (_Chunks), by device; on others the whole chunk is one


def kl_chunk_defaults():
    """The default chunks in words, for --help (train.py, bench.py)."""
    return (f"{KL_CHUNK['cpu']} on CPU, {KL_CHUNK_WIDE_CPU} there from width {WIDE} ({KL_CHUNK_WIDE_CPU_BF16} "
            f"under bf16), {KL_CHUNK['cuda']} on CUDA")


def kl_chunk(device, width=0, dtype=torch.float32):
    """The default chunk size for a device, model width C and matmul dtype."""
    kind = torch.device(device).type
    if kind == "cpu" and width >= WIDE:
        return KL_CHUNK_WIDE_CPU if dtype == torch.float32 else KL_CHUNK_WIDE_CPU_BF16
    return KL_CHUNK.get(kind, 64)


def sparsity_loss(c, d):
    """mean_n ‖c_n‖₁ / d, where d is the SAE's input size. c: (..., n_dict)."""
    return c.abs().sum(-1, dtype=torch.float32).mean() / d  # fp32 sum, no fp32 copy of c (bf16: 4.2 -> 2.5 ms)


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


def mm_dtype(t):
    """The dtype autocast would run a matmul on t in (fp32 when autocast is off)."""
    dev = t.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else t.dtype


PAD_LOGIT = -1e30  # a padded vocabulary column's logit: exp() is exactly 0, and log p_clean − log p exactly 0


_KEPT = {}  # CPU, bf16: buffer name -> the last call's buffer, see _Chunks.buf


class _Chunks:
    """The buffers of a chunked pass over the vocabulary, made on first use and reused by every chunk (on CPU
    under bf16, by every call too): a fresh multi-MB tensor per op costs page faults that took about as long
    as the op. W: (V_pad, C) unembedding already in the matmul dtype dt, rows V.. zero (model.unembedding
    pads it); n tokens per chunk (the GEMMs), m per block (the elementwise work).
        z        (2n, V_pad) in dt: the chunk's logits, spliced rows then clean ones (n rows when the clean
                 side is shared); a block's dlogits go back into its spliced rows, which the gradient GEMM reads
        lg       (2m, V_pad) fp32: a block's log p and log p_clean (in dt = fp32, they are z's rows themselves)
        p, d     (m, V_pad) fp32: p_clean, and log p_clean − log p when the clean side is shared (read only)
    On CPU a block of m = 32 rows is 6 MB a side in fp32, so its seven elementwise passes run in cache while
    the GEMMs keep n rows: config B's KL, forward and backward, under bf16 170 -> 152 ms (min of 24 alternated
    runs); in fp32, where the GEMMs write z in fp32 and the blocks work in it, the same time with a smaller p."""

    def __init__(self, W, vocab, n, m=None):
        self.W, self.V, self.n, self.m = W, vocab, n, min(m or n, n)
        self.cpu_bf16 = W.device.type == "cpu" and W.dtype != torch.float32
        self.bufs = {}

    def buf(self, name, rows, dtype):
        """The buffer name, (rows, V_pad) in dtype. On CPU under bf16 it is kept for the next call, where the OS
        hands freed multi-MB memory back and a fresh buffer pays a page fault per 4 KB on first touch, every
        step (config B: 13% of the KL); one per name, so memory stays bounded. In fp32 the GEMMs dominate:
        keeping gained 1-4% of the KL there and, held through the backward, raised a step's peak by 70 MB.
        On CUDA the caching allocator already reuses memory."""
        t = self.bufs.get(name)
        if t is None:
            if not self.cpu_bf16:
                t = torch.empty(rows, self.W.size(0), dtype=dtype, device=self.W.device)
            else:
                t = _KEPT.get(name)
                if t is None or t.shape != (rows, self.W.size(0)) or t.dtype != dtype:
                    _KEPT.pop(name, None)  # the old one is freed before the new one is made
                    t = _KEPT[name] = torch.empty(rows, self.W.size(0), dtype=dtype)
            self.bufs[name] = t
        return t

    def logits(self, h, out):
        """h (r, C) @ W_Uᵀ into out (r, V_pad), the GEMM in dt (through z when out is fp32 and dt is not), the
        padded columns at PAD_LOGIT."""
        if out.dtype == self.W.dtype:
            torch.mm(h, self.W.t(), out=out)
        else:
            out.copy_(torch.mm(h, self.W.t(), out=self.z(both=False)[:h.size(0)]))
        out[:, self.V:] = PAD_LOGIT
        return out

    def z(self, both):
        """The logits buffer z in dt: 2n rows when it holds both sides, and always when kept (one size per name)."""
        return self.buf("z", 2 * self.n if both or self.cpu_bf16 else self.n, self.W.dtype)

    def gemm(self, h, h_clean, i, j):
        """The logits of rows i:j into z: spliced, then clean unless h_clean is None (the clean side shared).
        On CPU under bf16 both sides are one GEMM of 2n rows, one pass over W_U instead of two (config B: the
        KL's forward and backward 251 -> 223 ms); oneDNN gives each row the bits it has alone, so a shared
        clean side (clean_logprobs) still gives the same KL bitwise."""
        n = self.rows = j - i
        z = self.z(both=h_clean is not None)
        if h_clean is None:
            self.logits(h[i:j], z[:n])
        elif self.cpu_bf16:
            self.logits(torch.cat([h[i:j], h_clean[i:j]]), z[:2 * n])
        else:
            self.logits(h[i:j], z[:n]), self.logits(h_clean[i:j], z[n:2 * n])
        return z

    def blocks(self):
        """(s, e): the row ranges of the current chunk's elementwise blocks, m rows each, the last one short."""
        return [(s, min(s + self.m, self.rows)) for s in range(0, self.rows, self.m)]

    def log_probs(self, s, e, clean=None):
        """log p and log p_clean of the chunk's rows s:e, fp32 (e − s, V_pad) views, log-softmaxed in place: in
        z itself in fp32, else in lg (both sides' rows, one call). clean: the chunk's shared log p_clean."""
        z, n, b = self.bufs["z"], self.rows, e - s
        if z.dtype == torch.float32:
            return _log_softmax_(z[s:e]), (clean[s:e] if clean is not None else _log_softmax_(z[n + s:n + e]))
        lg = self.buf("lg", 2 * self.m, torch.float32)
        lg[:b].copy_(z[s:e])
        if clean is not None:
            return _log_softmax_(lg[:b]), clean[s:e]
        lg[b:2 * b].copy_(z[n + s:n + e])
        _log_softmax_(lg[:2 * b])
        return lg[:b], lg[b:2 * b]

    def kl_sum(self, lp, lc, shared=False):
        """(Σ pc (lc − lp) over the block as an fp32 scalar tensor, pc = exp(lc) in p); lc − lp is written into
        lc, or into d when lc is shared (read only)."""
        b = lp.size(0)
        pc = torch.exp(lc, out=self.buf("p", self.m, torch.float32)[:b])
        out = self.buf("d", self.m, torch.float32)[:b] if shared else lc
        return torch.dot(pc.view(-1), torch.sub(lc, lp, out=out).view(-1)), pc

    def dlogits(self, lp, pc, s, e):
        """softmax − softmax_clean = exp(lp) − pc of the chunk's rows s:e (lp is overwritten), into z's spliced
        rows in dt (one rounding, as a cast after), where the gradient GEMM reads them."""
        d = torch.sub(lp.exp_(), pc, out=lp)  # in place: an out= of another dtype would make a temporary
        z = self.bufs["z"]
        if z.dtype != torch.float32:  # in fp32, lp is z[s:e] itself (log_probs)
            z[s:e].copy_(d)

    def grad(self, out):
        """The chunk's dlogits (z's first rows, in dt) @ W -> out (n, C) fp32."""
        dlogits = self.bufs["z"][:self.rows]
        if out.dtype == self.W.dtype:
            return torch.mm(dlogits, self.W, out=out)
        return out.copy_(dlogits @ self.W)


def _log_softmax_(x):
    """log_softmax over the last dimension of x (rows, V), in place: each row is read whole (its max, then
    its sum of exp) before any of it is written, so out may be x."""
    return torch.ops.aten._log_softmax.out(x, 1, False, out=x)


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


def _kl_chunk(z, zc, clean_is_logits):
    """The elementwise part of one chunk as one function, for torch.compile (fused_kl_div(compiled=True)):
    Σ p_clean (log p_clean − log p) over the chunk, and dlogits = softmax(z) − p_clean written into z.
    z, zc: the logits as the GEMM wrote them (bf16 under autocast: the casts fuse in too); zc may be
    log p_clean already (clean_is_logits False). The softmaxes and the sum are fp32. Compiled, it is two
    passes over the chunk (inductor fuses the row reductions, then the rest) instead of eager's nine."""
    lc = torch.log_softmax(zc.float(), -1) if clean_is_logits else zc
    lp = torch.log_softmax(z.float(), -1)
    pc = lc.exp()
    kl = (pc * (lc - lp)).sum()
    z.copy_(lp.exp() - pc)  # in z's dtype: the matmul dtype of the gradient GEMM
    return kl


@functools.cache
def _kl_chunk_compiled():
    """torch.compile(_kl_chunk), made on first use."""
    return torch.compile(_kl_chunk, dynamic=False, fullgraph=True)


class _FusedKL(torch.autograd.Function):
    """Per chunk of n tokens (the buffers: _Chunks):
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
                n = j - i
                z = bufs.gemm(h_mm, hc_mm, i, j)                    # (2n, V_pad) logits; (n, V_pad) if shared
                if compiled:  # the chunk in two fused passes; dlogits end up in z's first n rows
                    total += _kl_chunk_compiled()(z[:n], z[n:2 * n] if clean is None else clean[k], clean is None)
                else:
                    for s, e in bufs.blocks():
                        lp, lc = bufs.log_probs(s, e, clean[k] if clean is not None else None)  # (b, V_pad) each
                        kl, pc = bufs.kl_sum(lp, lc, shared=clean is not None)      # Σ pc (lc − lp), pc = p_clean
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
    CUDA, where it pays, after a compile of some seconds; C++ on CPU, where it did not); equal up to rounding."""
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
