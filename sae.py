"""
The sparse autoencoder of the paper (Braun et al. 2024), exactly:

    c     = ReLU(W_e x + b_e)                  W_e: (n_dict, d)   b_e: (n_dict,)
    x_hat = D c + b_d,   D = W_d / ‖W_d‖_col   W_d: (d, n_dict)   b_d: (d,)

D divides each decoder column by its L2 norm in *every* forward pass (a reparametrisation: the stored
weight is never renormalised in place). No pre-encoder bias, no input scaling. Init: nn.Linear defaults
for both biases and the encoder; W_d orthogonal (W_d W_dᵀ = I_d). n_dict = dict_ratio × d.

On disk an SAE is a folder with `sae.safetensors` (encoder.weight, encoder.bias, decoder.weight,
decoder.bias) and `sae.json` (d, n_dict, layer, model, center, and the training args), so it can be
used without its training run:  sae, cfg = load_sae(folder). Beside them, `firing.safetensors` holds each
feature's firing frequency (save_firing).
"""
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import first_line, read_json
from files import write_bytes


class SAE(nn.Module):

    def __init__(self, d, n_dict):
        super().__init__()
        self.d, self.n_dict = d, n_dict
        self.encoder = nn.Linear(d, n_dict)  # weight (n_dict, d)
        self.decoder = nn.Linear(n_dict, d)  # weight (d, n_dict): one column per feature
        nn.init.orthogonal_(self.decoder.weight)

    def dict_elements(self, dtype=None):
        """The unit-norm decoder columns D, (d, n_dict), in dtype (default the weight's)."""
        return _UnitColumns.apply(self.decoder.weight, dtype or self.decoder.weight.dtype)

    def encode(self, x, features=None):
        """c = ReLU(W_e x + b_e), (..., n_dict); or only the features given (a LongTensor of indices), (..., len)."""
        if features is None:
            return F.relu(self.encoder(x))
        return F.relu(F.linear(x, self.encoder.weight[features], self.encoder.bias[features]))

    def decode(self, c):
        return F.linear(c, self.dict_elements(c.dtype), self.decoder.bias)  # (..., d); D made in c's dtype once

    def forward(self, x):
        c = self.encode(x)
        return self.decode(c), c


class _UnitColumns(torch.autograd.Function):
    """D = W s with s = 1/‖W‖_col, (d, n_dict), cast to the matmul's dtype here (one cast, not autocast's).
    Its gradient, with a = Σ_k g_k D_k per column:
        ∂/∂W = s (g − D a) = g s − W (s³ Σ_k g_k W_k)
    two passes over W where autograd through w * s makes six (timings: docs/NOTES_model.md)."""

    @staticmethod
    def forward(ctx, w, dtype):
        s = w.pow(2).sum(0, keepdim=True).rsqrt_()  # (1, n_dict); rsqrt of a sum: faster than w.norm
        ctx.save_for_backward(w, s)
        return (w * s).to(dtype)

    @staticmethod
    def backward(ctx, g):
        w, s = ctx.saved_tensors
        a = (g * w).sum(0, keepdim=True)  # (1, n_dict) Σ_k g_k W_k, in w's dtype (g may be bf16)
        return (g * s).addcmul_(w, a * s.pow(3), value=-1), None


def save_tensors(tensors, path, metadata=None):
    """A safetensors file at path, whole or not at all (files.atomic_write), with the mode open() gives
    (0o666 & ~umask; safetensors' own writer makes 0600 files). Serialised in memory first, so a full disk is
    an OSError naming path, not the writer's own error."""
    from safetensors.torch import save
    write_bytes(path, save(tensors, metadata=metadata))


def save_sae(sae, out_dir, cfg):
    """Write sae.safetensors + sae.json into out_dir, each whole or not at all."""
    os.makedirs(out_dir, exist_ok=True)
    save_tensors({k: v.detach().float().cpu().contiguous() for k, v in sae.state_dict().items()},
                 os.path.join(out_dir, "sae.safetensors"))
    cfg = dict(cfg, d=sae.d, n_dict=sae.n_dict)
    write_bytes(os.path.join(out_dir, "sae.json"), json.dumps(cfg, indent=2).encode())


def save_firing(out_dir, freq, tokens, **meta):
    """firing.safetensors in out_dir, beside the SAE: each feature's firing frequency freq (n_dict,) fp64, and string
    metadata (tokens, the count it is over, plus meta). interop.load_firing reads it."""
    meta = {k: str(v) for k, v in dict(meta, tokens=tokens).items()}
    save_tensors({"freq": freq.detach().double().cpu().contiguous()}, os.path.join(out_dir, "firing.safetensors"), meta)


def sae_shapes(d, n_dict):
    """The shape of every tensor of an SAE of width d with n_dict features, in SAE.parameters() order: the
    module's own, built on the meta device (no memory)."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in SAE(d, n_dict).named_parameters()}


MAX_ELEMENTS = 2 ** 48  # d x n_dict of an SAE, at most: 1 PiB of fp32 encoder weights


def check_state(state, d, n_dict, where):
    """ValueError naming the first tensor of state (an SAE state dict) that is missing, extra or not of the
    shape of an SAE of width d with n_dict features, or not floating-point; where says whose state it is (and its d
    and n_dict)."""
    if d * n_dict > MAX_ELEMENTS:  # no file holds it, and torch cannot even give its shapes (an overflow)
        raise ValueError(f"{where}: d {d} x n_dict {n_dict} is more weights than any SAE has (at most 2^48)")
    want = sae_shapes(d, n_dict)
    for k, shape in want.items():
        t = state.get(k)
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{where} has no tensor {k}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{where}: {k} has shape {tuple(t.shape)}, not {shape}")
        if not t.is_floating_point():  # load_state_dict would cast integers or booleans without a word
            raise ValueError(f"{where}: {k} has dtype {t.dtype}, not a floating-point one")
    extra = sorted(set(state) - set(want))
    if extra:
        raise ValueError(f"{where} holds {extra[0]}, not a tensor of an SAE")


# sae.json: what every reader relies on, and the test of each value
SAE_JSON = dict(d=("an integer >= 1", lambda v: type(v) is int and v >= 1),
                n_dict=("an integer >= 1", lambda v: type(v) is int and v >= 1),
                layer=("an integer >= 0", lambda v: type(v) is int and v >= 0),
                center=("true or false", lambda v: type(v) is bool))
SAE_JSON_OPTIONAL = dict(model=("a string", lambda v: v is None or isinstance(v, str)),
                         loss=("a string", lambda v: v is None or isinstance(v, str)),
                         args=("an object", lambda v: isinstance(v, dict)))


def read_sae_json(path, required=tuple(SAE_JSON)):
    """sae.json as a dict, with the keys required and every key of SAE_JSON / SAE_JSON_OPTIONAL it has of the
    right type; ValueError naming the file and the key otherwise."""
    cfg = read_json(path, "the JSON object save_sae writes")
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} holds {'an array' if isinstance(cfg, list) else type(cfg).__name__}, not the JSON "
                         f"object save_sae writes")
    for key in required:
        if key not in cfg:
            raise ValueError(f"{path} has no {key!r}; expected {SAE_JSON[key][0]}")
    for key, (what, ok) in dict(SAE_JSON, **SAE_JSON_OPTIONAL).items():
        if key in cfg and not ok(cfg[key]):
            raise ValueError(f"{path} has {key} {cfg[key]!r}; expected {what}")
    return cfg


def load_sae(out_dir, device="cpu"):
    """(SAE, cfg dict) from a folder written by save_sae; ValueError naming the file and what is wrong with it."""
    from safetensors.torch import load_file
    path = os.path.join(out_dir, "sae.safetensors")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(out_dir, "sae.json")):
        raise ValueError(f"{out_dir!r} holds no saved SAE (sae.safetensors + sae.json)")
    cfg = read_sae_json(os.path.join(out_dir, "sae.json"))
    try:
        state = load_file(path)
    except Exception as e:  # SafetensorError: a header cut short or overwritten
        raise ValueError(f"{path!r} is not a valid SAE file ({type(e).__name__}: {first_line(e)})") from None
    check_state(state, cfg["d"], cfg["n_dict"], f"{path!r} (sae.json: d {cfg['d']}, n_dict {cfg['n_dict']})")
    for k, t in state.items():  # NaN or inf (also a float64 beyond float32, once loaded) would run without a word
        if not torch.isfinite(t).all():
            raise ValueError(f"{path!r}: {k} holds non-finite values (nan or inf); the SAE is broken, not one to use")
        if not torch.isfinite(t.float()).all():
            raise ValueError(f"{path!r}: {k} holds {t.dtype} values beyond float32's range (inf once loaded)")
    sae = SAE(cfg["d"], cfg["n_dict"])
    sae.load_state_dict(state)
    return sae.to(device), cfg


def train_bytes(d, n_dict):
    """Bytes one SAE needs to train, in fp32: its parameters (2·d·n_dict + n_dict + d), their gradients and
    Adam's two moments, 4 × 4 bytes a parameter. Activations come on top (they grow with the batch)."""
    return 16 * (2 * d * n_dict + n_dict + d)


def device_bytes(device):
    """The memory of device in bytes: a GPU's total (torch.cuda.mem_get_info), else the machine's RAM."""
    if str(device).startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[1]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(d, n_dict, device, k=1, what="--dict_ratio"):
    """ValueError (one line: the estimate and the limit) when k SAEs of d × n_dict cannot train on device even
    without activations: train_bytes × k above the device's whole memory. Called before anything is written."""
    need, have = k * train_bytes(d, n_dict), device_bytes(device)
    if need > have:
        sweep = f" x {k} SAEs" if k > 1 else ""
        where = f"memory on {device}" if str(device).startswith("cuda") else "RAM"
        raise ValueError(f"{what} gives {n_dict:,} features at d {d}: training needs about {need / 2 ** 30:,.1f} GiB "
                         f"(parameters, gradients and Adam state in fp32{sweep}), more than the "
                         f"{have / 2 ** 30:,.1f} GiB of {where}")


def new_sae(d, n_dict, device):
    """SAE(d, n_dict) on device; an allocator failure (torch.OutOfMemoryError, or the CPU allocator's
    RuntimeError) becomes a one-line ValueError, any other error stays as it is."""
    try:
        return SAE(d, n_dict).to(device)
    except RuntimeError as e:
        if not (isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e)):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"out of memory allocating an SAE of {n_dict:,} features at d {d} on {device} "
                         f"({type(e).__name__}: {first})") from None
