"""
The fused KL's chunk buffers and CPU tuning (losses.fused_kl_div): a file a reader of the loss can skip.
Chunk sizes by device, width and dtype; _Chunks, the buffers one chunk's GEMMs and elementwise blocks reuse;
and the chunk's elementwise work as one function for torch.compile. The measurements behind every choice
here are in docs/NOTES_kl.md.
"""
import functools

import torch

# tokens per chunk (the GEMMs), by device: on CPU a wide model's GEMMs are bound by reading W_U, so take more rows
KL_CHUNK = {"cpu": 64, "cuda": 512}
KL_CHUNK_WIDE_CPU, WIDE = 128, 512  # the CPU chunk for a model of width C >= WIDE
KL_CHUNK_WIDE_CPU_BF16 = 256  # under bf16 the elementwise blocks keep the fp32 buffers small, so the GEMMs take more
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


PAD_LOGIT = -1e30  # a padded vocabulary column's logit: exp() is exactly 0, and log p_clean − log p exactly 0


_KEPT = {}  # CPU, bf16: buffer name -> the last call's buffer, see _Chunks.buf


class _Chunks:
    """The buffers of a chunked pass over the vocabulary, made on first use and reused by every chunk (on CPU
    under bf16, by every call too): a fresh multi-MB tensor per op pays page faults on first touch.
    W: (V_pad, C) unembedding already in the matmul dtype dt, rows V.. zero (model.unembedding pads it);
    n tokens per chunk (the GEMMs), m per block (the elementwise work, small enough to run in cache).
        z        (2n, V_pad) in dt: the chunk's logits, spliced rows then clean ones (n rows when the clean
                 side is shared); a block's dlogits go back into its spliced rows, which the gradient GEMM reads
        lg       (2m, V_pad) fp32: a block's log p and log p_clean (in dt = fp32, they are z's rows themselves)
        p, d     (m, V_pad) fp32: p_clean, and log p_clean − log p when the clean side is shared (read only)"""

    def __init__(self, W, vocab, n, m=None):
        self.W, self.V, self.n, self.m = W, vocab, n, min(m or n, n)
        self.cpu_bf16 = W.device.type == "cpu" and W.dtype != torch.float32
        self.bufs = {}

    def buf(self, name, rows, dtype):
        """The buffer name, (rows, V_pad) in dtype. On CPU under bf16 it is kept for the next call (one per
        name, so memory stays bounded), where a fresh one would pay its page faults again every step; in fp32
        the GEMMs dominate and keeping would raise the peak. On CUDA the caching allocator already reuses memory."""
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
        On CPU under bf16 both sides are one GEMM of 2n rows, one pass over W_U instead of two; oneDNN gives
        each row the bits it has alone, so a shared clean side (clean_logprobs) still gives the same KL bitwise."""
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
