"""
GPT-2 (and GPT-Neo, e.g. TinyStories-1M), written out by hand, with Hugging Face parameter names and two
splice points. Reading a checkpoint (config.json, the weights, the hub) is hf_files.py's.

    model = GPT.from_pretrained("gpt2")              # hub id, or a local save_pretrained folder
    x = model.forward_to_layer(idx, L)               # (B, T, C) residual entering block L
    logits, resids = model.forward_from_layer(x, L)  # run blocks L.. ; resids = inputs of blocks
                                                     # L+1 .. n_layer-1, then the final residual
An SAE is spliced in by handing forward_from_layer its reconstruction instead of x. No hooks.

Residual centring (on by default): TransformerLens's `center_writing_weights`. Every weight that writes into
the residual stream (wte, wpe, each attn/mlp c_proj weight and bias) has its mean over d_model removed, so every
residual vector is mean-zero over d. Every read of the residual goes through a LayerNorm, which removes that
mean anyway, so the logits do not change; the paper's SAEs were trained on (and the released ones expect) this
centred stream. wpe and the c_proj weights are centred once at load; wte is also the (uncentred) unembedding, so
its looked-up rows are centred instead: the same residual, wte stays tied to lm_head, and no V×d copy (154 MB
for GPT-2 small).

GPT-Neo (GPTNeoForCausalLM: roneneldan/TinyStories-1M) is the same network but for three config switches: q, k, v
without bias (its q_proj / k_proj / v_proj load into c_attn, out_proj into c_proj; nn.Linear weights, nothing
transposed), no 1/sqrt(d_head) scaling of the attention scores, and every other layer (attention_types)
attending locally: query i sees keys j with i - window_size < j <= i. Its centring is TransformerLens's for
GPT-Neo: the same weights as GPT-2's (wte, wpe, out_proj, mlp c_proj).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_files import config_from_hf, hf_names, load_weights, read_config, resolve_checkpoint

VOCAB_PAD = 128  # unembedding(): the vocabulary of the KL GEMMs is padded to a multiple of this
# CPU bf16 autocast: attention with a backward runs in fp32 up to this length, where torch's bf16 kernel is
# slower than fp32 (forward + backward; timings in docs/NOTES_model.md)
CPU_BF16_ATTN_FP32_T = 256


class CausalSelfAttention(nn.Module):

    def __init__(self, config, local=False):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)  # q, k, v, all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.scale = None if config.scale_attn else 1.0     # None: SDPA's 1/sqrt(hs); GPT-Neo does not scale
        self.window = config.window_size if local else None  # GPT-Neo's local layers

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if q.requires_grad and q.dtype == torch.bfloat16 and q.device.type == "cpu" and T <= CPU_BF16_ATTN_FP32_T:
            with torch.autocast("cpu", enabled=False):  # with a backward, fp32 is faster here (CPU_BF16_ATTN_FP32_T)
                y = self.attend(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            y = self.attend(q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                 # (B, T, C)
        return self.c_proj(y)

    def attend(self, q, k, v):
        """softmax(q kᵀ · scale + causal mask) v, per head: (B, nh, T, hs) -> (B, nh, T, hs)."""
        T = q.size(2)
        if self.window is not None and T > self.window:  # local: key j visible from i iff i - window < j <= i
            i = torch.arange(T, device=q.device)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - self.window)  # (T, T)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        # GPT-2, GPT-Neo's global layers, and local ones no longer than their window
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)  # flash where it can


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new" is tanh GELU


class Block(nn.Module):

    def __init__(self, config, local=False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, local)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


@dataclass
class GPTConfig:
    n_positions: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    n_inner: int = 3072
    layer_norm_epsilon: float = 1e-5
    # GPT-Neo: qkv_bias False, scale_attn False, attention_layers ("global" | "local" per layer; empty: all global)
    qkv_bias: bool = True
    scale_attn: bool = True
    attention_layers: tuple = ()
    window_size: int = 256


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.centered = False
        self._unembed = {}  # unembedding()'s padded copy
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            h=nn.ModuleList([Block(config, local=t == "local")
                             for t in config.attention_layers or ["global"] * config.n_layer]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)  # GPT-2's init, for random models (tests, benchmarks)
        for n, p in self.named_parameters():
            if n.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward_to_layer(self, idx, layer):
        """Token ids (B, T) -> the residual stream entering block `layer`, (B, T, C)."""
        B, T = idx.size()
        if T > self.config.n_positions:
            raise ValueError(f"sequence length {T} is above the model's context {self.config.n_positions}")
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        tok = self.transformer.wte(idx)                                 # (B, T, C)
        if self.centered:  # the centred wte row, without a centred copy of wte (see the module docstring)
            tok = tok - tok.mean(-1, keepdim=True)
        x = tok + self.transformer.wpe(pos)                             # (B, T, C)
        for block in self.transformer.h[:layer]:
            x = block(x)
        return x

    def forward_from_layer(self, x, layer, logits=True):
        """Run blocks layer.. on x (B, T, C). Returns (logits (B, T, V) or None, resids) where resids is
        the list of residuals entering blocks layer+1 .. n_layer-1 followed by the final residual (the
        input of ln_f): n_layer - layer tensors of (B, T, C). With logits=False the unembedding is left
        to the caller (see losses.fused_kl_div, which never builds the full (B, T, V) logits)."""
        resids = []
        for block in self.transformer.h[layer:]:
            x = block(x)
            resids.append(x)
        out = self.lm_head(self.transformer.ln_f(x)) if logits else None
        return out, resids

    def forward(self, idx):
        """Token ids (B, T) -> logits (B, T, V), at every position."""
        return self.forward_from_layer(self.forward_to_layer(idx, 0), 0)[0]

    @torch.no_grad()
    def unembedding(self, dtype=None):
        """W_U for the KL and eval GEMMs, (V_pad, C) in dtype (default: lm_head's): lm_head's weight with
        zero rows appended up to a multiple of VOCAB_PAD, so the (n, V) operands are aligned (an unaligned V
        falls back to a much slower GEMM kernel on an H100: docs/NOTES_model.md). Pass vocab=config.vocab_size
        to the losses, which mask the padded logits. Made once per (dtype, device) and kept: the model is
        frozen. On CPU in fp32 it is lm_head's weight itself: a copy would cost V×C floats (154 MB for GPT-2
        small) for little gain there."""
        W = self.lm_head.weight
        dtype = dtype or W.dtype
        if W.device.type == "cpu" and dtype == W.dtype:
            return W
        key = (dtype, W.device, W._version)
        if key not in self._unembed:
            V_pad = -(-W.size(0) // VOCAB_PAD) * VOCAB_PAD
            self._unembed = {key: torch.cat([W, W.new_zeros(V_pad - W.size(0), W.size(1))]).to(dtype)}
        return self._unembed[key]

    @torch.no_grad()
    def cast_frozen(self, dtype):
        """Keep the blocks' matmul weights (every nn.Linear) in dtype, made once: under autocast to dtype
        they are then used as they are instead of being cast again at every call, the same arithmetic
        (bitwise). Embeddings, layer norms and the residual stream stay fp32. Only for use under autocast;
        train.py and bench.py call it with --dtype bfloat16."""
        for m in self.transformer.h.modules():
            if isinstance(m, nn.Linear):
                m.to(dtype)
        return self

    @torch.no_grad()
    def center_writing_weights(self):
        """Remove the mean over d_model from every weight and bias that writes into the residual stream
        (wte's rows are centred as they are looked up). nn.Linear weights are (out, in), so the d_model axis
        of a c_proj weight is dim 0."""
        if self.centered:
            return self
        tr = self.transformer
        tr.wpe.weight.sub_(tr.wpe.weight.mean(-1, keepdim=True))
        for block in tr.h:
            for proj in (block.attn.c_proj, block.mlp.c_proj):
                proj.weight.sub_(proj.weight.mean(0, keepdim=True))
                proj.bias.sub_(proj.bias.mean())
        self.centered = True
        return self

    @classmethod
    def from_pretrained(cls, name_or_path, center=True):
        """A GPT-2 or GPT-Neo from a local folder (config.json + model.safetensors or pytorch_model.bin, as
        written by transformers' save_pretrained) or a Hugging Face hub id. Returns the model frozen, in eval mode."""
        config_file, weights_file = resolve_checkpoint(name_or_path)
        hf = read_config(config_file)
        model = cls(GPTConfig(**config_from_hf(hf, name_or_path)))
        neo = hf["model_type"] == "gpt_neo"
        sd = model.state_dict()
        keys = [k for k in sd if k != "lm_head.weight"]  # lm_head is tied to wte
        names = {k: hf_names(k.removeprefix("transformer."), neo) for k in keys}  # GPT-Neo: c_attn <- q, k, v
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        flip = {k: k.endswith(conv1d) and not neo for k in keys}  # GPT-2's Conv1D: (in, out); nn.Linear: (out, in)
        wanted = {k: (names[k], tuple(sd[k].shape[::-1] if flip[k] else sd[k].shape)) for k in keys}  # as in the file
        sd_hf = load_weights(weights_file, wanted, model.config.n_layer, f"model {name_or_path!r}")
        with torch.no_grad():
            for k in keys:
                w = sd_hf[names[k][0]] if len(names[k]) == 1 else torch.cat([sd_hf[n] for n in names[k]])  # (3C, C)
                sd[k].copy_(w.t() if flip[k] else w)
        model.name = name_or_path
        if center:
            model.center_writing_weights()
        model.requires_grad_(False)
        return model.eval()
