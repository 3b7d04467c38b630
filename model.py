"""
GPT-2 (and GPT-Neo, e.g. TinyStories-1M), written out by hand, with Hugging Face parameter names and two
splice points.

    model = GPT.from_pretrained("gpt2")              # hub id, or a local save_pretrained folder
    x = model.forward_to_layer(idx, L)               # (B, T, C) residual entering block L
    logits, resids = model.forward_from_layer(x, L)  # run blocks L.. ; resids = inputs of blocks
                                                     # L+1 .. n_layer-1, then the final residual
An SAE is spliced in by handing forward_from_layer its reconstruction instead of x. No hooks.

Residual centring (on by default): TransformerLens's `center_writing_weights`. Every weight that writes
into the residual stream (wte, wpe, each attn/mlp c_proj weight and bias) has its mean over the d_model
axis removed, so every residual vector is mean-zero over d. Every read of the residual goes through a
LayerNorm, which removes that mean anyway, so the logits do not change; the SAEs of the paper were
trained on (and the released ones expect) this centred stream. wpe and the c_proj weights are centred
once at load. wte is also the (uncentred) unembedding, so its looked-up rows are centred instead: the
same residual, and wte stays tied to lm_head (a centred copy would cost V×d floats, 154 MB for GPT-2 small).

GPT-Neo (GPTNeoForCausalLM: roneneldan/TinyStories-1M) is the same network but for three config switches:
q, k, v without bias (GPT-Neo's separate q_proj / k_proj / v_proj load into c_attn, out_proj into c_proj;
nn.Linear weights, nothing transposed), no 1/sqrt(d_head) scaling of the attention scores, and every other
layer (config attention_types) attending locally: query i sees keys j with i - window_size < j <= i. The
centring is TransformerLens's for GPT-Neo, the same weights as GPT-2's (wte, wpe, out_proj, mlp c_proj).
"""
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from hf_files import BUFFERS, check_weights, count_field as _count, read_config, read_weights

MODEL_TYPES = ("gpt2", "gpt_neo")
TINYSTORIES_1M = "roneneldan/TinyStories-1M"
VOCAB_PAD = 128  # unembedding(): the vocabulary of the KL GEMMs is padded to a multiple of this
# on CPU under bf16 autocast, attention that needs a backward runs in fp32 over at most this many positions:
# forward + backward, torch's bf16 flash kernel took 2.3x as long as fp32 at ctx 128 (AMX), as long at 256, and
# 0.65x as long at 1024; forward only, bf16 is 2.3-2.6x faster at every length, so no-grad passes keep it
CPU_BF16_ATTN_FP32_T = 256
HUB_ALIASES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
               "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}


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
        zero rows appended up to a multiple of VOCAB_PAD, so the (n, V) operands are aligned (on an H100,
        GPT-2's V = 50,257 gets an sm75 fallback kernel at 95 TFLOP/s in bf16; padded, 600+). Pass
        vocab=config.vocab_size to the losses, which mask the padded logits. Made once per (dtype, device)
        and kept: the model is frozen. On CPU in fp32 it is lm_head's weight itself: a copy would cost V×C
        floats (154 MB for GPT-2 small) for a few % there."""
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
        config_file, weights_file = _resolve_checkpoint(name_or_path)
        hf = read_config(config_file)
        config = config_from_hf(hf, name_or_path)
        neo = hf["model_type"] == "gpt_neo"
        model = cls(config)
        sd_file = read_weights(weights_file)
        # the hub's gpt2 has no "transformer." prefix; a save_pretrained of GPT2LMHeadModel has it
        sd_hf = {k.removeprefix("transformer."): v for k, v in sd_file.items()
                 if not k.endswith(BUFFERS) and k != "lm_head.weight"}
        sd = model.state_dict()
        keys = [k for k in sd if k != "lm_head.weight"]  # lm_head is tied to wte
        names = {k: hf_names(k.removeprefix("transformer."), neo) for k in keys}
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        flip = {k: k.endswith(conv1d) and not neo for k in keys}  # GPT-2's Conv1D: (in, out); nn.Linear: (out, in)
        shape = {k: tuple(sd[k].shape[::-1] if flip[k] else sd[k].shape) for k in keys}  # as the file holds it
        want = {n: (shape[k][0] // len(names[k]), *shape[k][1:])  # GPT-Neo's q, k, v: (C, C) each of our (3C, C)
                for k in keys for n in names[k]}
        check_weights(sd_hf, want, config.n_layer, f"model {name_or_path!r}", weights_file, sd_file)
        with torch.no_grad():
            for k in keys:
                w = sd_hf[names[k][0]] if len(names[k]) == 1 else torch.cat([sd_hf[n] for n in names[k]])  # (3C, C)
                sd[k].copy_(w.t() if flip[k] else w)
        model.name = name_or_path
        if center:
            model.center_writing_weights()
        model.requires_grad_(False)
        return model.eval()


def config_from_hf(hf, name):
    """GPTConfig from a transformers config.json (GPT2LMHeadModel or GPTNeoForCausalLM); ValueError with one line
    for a model or an option this file does not implement."""
    kind = hf.get("model_type")
    if kind not in MODEL_TYPES:
        raise ValueError(f"model {name!r} has model_type {kind!r}; supported: {', '.join(map(repr, MODEL_TYPES))}")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"model {name!r} uses activation {hf['activation_function']!r}; only the tanh GELU "
                         "('gelu_new') is supported")
    if hf.get("tie_word_embeddings") is False:
        raise ValueError(f"model {name!r} has an lm_head untied from wte; only tied ones are supported")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if type(eps) not in (int, float) or not 0 < eps < 1:
        raise ValueError(f"model {name!r}: its config.json has layer_norm_epsilon {eps!r}; expected a number in (0, 1)")
    if kind == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise ValueError(f"model {name!r} uses attention options this GPT-2 does not implement")
        d = _count(hf, "n_embd", name)
        config = GPTConfig(n_positions=_count(hf, "n_positions", name), vocab_size=_count(hf, "vocab_size", name),
                           n_layer=_count(hf, "n_layer", name), n_head=_count(hf, "n_head", name), n_embd=d,
                           n_inner=_count(hf, "n_inner", name, 4 * d) if hf.get("n_inner") is not None else 4 * d,
                           layer_norm_epsilon=eps)
    else:  # attention_types [[["global", "local"], 4]] -> 4 x (global, local), as transformers expands it
        types = hf.get("attention_types") or [[["global", "local"], 12]]
        try:
            layers = tuple(t for pattern, n in types for _ in range(n) for t in pattern)
        except (TypeError, ValueError):
            raise ValueError(f"model {name!r}: its config.json has attention_types {types!r}; expected pairs such "
                             f"as [[\"global\", \"local\"], 4]") from None
        bad = next((t for t in layers if t not in ("global", "local")), None)
        if bad is not None:
            raise ValueError(f"model {name!r} has attention type {bad!r}; only 'global' and 'local' are supported")
        n_layer, d = _count(hf, "num_layers", name), _count(hf, "hidden_size", name)
        if len(layers) != n_layer:
            raise ValueError(f"model {name!r}: attention_types give {len(layers)} layers, num_layers is {n_layer}")
        if "local" in layers and (type(hf.get("window_size", 256)) is not int or hf.get("window_size", 256) < 1):
            raise ValueError(f"model {name!r} has window_size {hf['window_size']!r}; it must be an integer >= 1")
        config = GPTConfig(n_positions=_count(hf, "max_position_embeddings", name),
                           vocab_size=_count(hf, "vocab_size", name), n_layer=n_layer,
                           n_head=_count(hf, "num_heads", name), n_embd=d,
                           n_inner=_count(hf, "intermediate_size", name, 4 * d) if hf.get("intermediate_size")
                           is not None else 4 * d,
                           layer_norm_epsilon=eps, qkv_bias=False, scale_attn=False,
                           attention_layers=layers, window_size=hf.get("window_size", 256))
    if config.n_embd % config.n_head:
        raise ValueError(f"model {name!r}: d_model {config.n_embd} is not a multiple of its {config.n_head} heads")
    return config


def is_tinystories_1m(name_or_path):
    """TinyStories-1M: its hub id, or a local folder whose config.json is a GPT-Neo of 8 layers with d_model 64.
    (train.py gives these the paper's TinyStories recipe.) Reads no weights and never goes to the hub."""
    if name_or_path == TINYSTORIES_1M:
        return True
    try:
        with open(os.path.join(name_or_path, "config.json")) as f:
            hf = json.load(f)
    except (OSError, ValueError):
        return False
    return hf.get("model_type") == "gpt_neo" and hf.get("num_layers") == 8 and hf.get("hidden_size") == 64


def hf_names(k, neo):
    """The checkpoint's name(s) of our parameter k (no 'transformer.' prefix). GPT-2: k itself. GPT-Neo: its
    q_proj, k_proj, v_proj make our c_attn, its out_proj is our c_proj; every other name is the same."""
    if neo and k.endswith("attn.c_attn.weight"):
        return [k.replace("c_attn", f"attention.{p}_proj") for p in "qkv"]
    if neo and ".attn.c_proj." in k:
        return [k.replace("attn.c_proj", "attn.attention.out_proj")]
    return [k]


def _resolve_checkpoint(name_or_path):
    """(config.json path, weights path) for a local folder or a hub id; downloads only those two files."""
    if os.path.isdir(name_or_path):
        files = [os.path.join(name_or_path, f) for f in ("config.json", "model.safetensors", "pytorch_model.bin")]
        if not os.path.isfile(files[0]):
            raise ValueError(f"model folder {name_or_path!r} has no config.json")
        weights = next((f for f in files[1:] if os.path.isfile(f)), None)
        if weights is None:
            raise ValueError(f"model folder {name_or_path!r} has neither model.safetensors nor pytorch_model.bin")
        return files[0], weights
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:  # a path, not a hub id
        raise ValueError(f"model folder {name_or_path!r} does not exist; give a local folder or a hub id such as 'gpt2'")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError
    repo = HUB_ALIASES.get(name_or_path, name_or_path)
    try:
        config_file = hf_hub_download(repo, "config.json")
        try:
            weights = hf_hub_download(repo, "model.safetensors")
        except EntryNotFoundError:
            weights = hf_hub_download(repo, "pytorch_model.bin")
    except Exception as e:  # offline, unknown repo, gated repo: one line, not a traceback
        raise ValueError(_hub_error(name_or_path, repo, e)) from None
    return config_file, weights


def _hub_error(name, repo, e):
    """The one line for a failed hub download of model name (hub repo repo), naming the fix."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)
    why = type(e).__name__
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline or isinstance(e, (LocalEntryNotFoundError, ConnectionError, TimeoutError)) or "Connect" in why:
        return (f"model {name!r} is neither a local folder nor a reachable hub repo: the hub cannot be reached "
                f"({'HF_HUB_OFFLINE is set' if offline else 'offline or no network'}; {why}) and {repo!r} is not in "
                f"the local cache; pass a local folder as --model instead, made where the hub can be reached with "
                f"GPT2LMHeadModel.from_pretrained({name!r}).save_pretrained('gpt2-local') (see the README)")
    if isinstance(e, GatedRepoError):
        return f"model {name!r}: hub repo {repo!r} is gated; accept its terms on the hub and log in (hf auth login)"
    if isinstance(e, RepositoryNotFoundError):
        return (f"model {name!r} is not a local folder and hub repo {repo!r} was not found on the hub ({why}); "
                f"check the name (e.g. 'gpt2', 'gpt2-medium') or log in if it is private")
    if isinstance(e, EntryNotFoundError):
        return f"model {name!r}: hub repo {repo!r} has no config.json or GPT-2 weights ({why})"
    return f"model {name!r} is neither a local folder nor a reachable hub repo ({why}: {(str(e).splitlines() or [''])[0]})"
