"""
The one-line checks of an SAE source's files (interop.py's readers: a run folder, an Apollo .pt + .yaml, a SAELens
folder): every tensor finite and of floating point, every decoder column of a length that can be normalised, every
config value of the type its reader needs. Each failure is a ValueError naming the file, the key or tensor, and
what was expected.
"""
import json
import math
import os

import torch


def shown(v, n=60):
    """A value as one short line (repr, cut to n characters)."""
    r = repr(v)
    return r if len(r) <= n else r[:n - 3] + "..."


def check_finite(tensors, where):
    """ValueError naming where and the tensor unless every tensor of tensors {name: tensor} is floating point and
    finite once in fp32 (a NaN, an inf, or a value beyond fp32's range, as a float64 1e300)."""
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ValueError(f"{where}: tensor {name} has dtype {str(t.dtype).replace('torch.', '')}; expected "
                             "floating point")
        bad = ~torch.isfinite(t.float()).reshape(-1)
        if bad.any():
            flat = int(bad.nonzero()[0])
            v, index = t.reshape(-1)[flat].item(), []
            for size in reversed(t.shape):  # the flat position as an index of t
                flat, r = divmod(flat, size)
                index.insert(0, r)
            raise ValueError(f"{where}: tensor {name} holds {int(bad.sum())} value(s) that are NaN, inf or beyond "
                             f"float32's range (the first at index {index}: {v}); the SAE is unusable")


def check_columns(W, where, name, dim=0, what="column", dtype=torch.float32):
    """ValueError naming where, the tensor and the first bad one unless every column (dim 0; dim 1: row) of W, a
    decoder, has a length that can be normalised in dtype: its sum of squares neither 0 nor inf (in fp32 as
    SAE.dict_elements computes it, where either gives NaN or a zero feature; in fp64, for a raw decoder
    normalised on import, only an all-zero one fails)."""
    s = W.to(dtype).pow(2).sum(dim)
    bad = (s == 0) | ~torch.isfinite(s)
    if bad.any():
        j = int(bad.nonzero()[0])
        zero = (W.select(1 - dim, j) == 0).all() if W.dim() == 2 else False
        why = "is all zero: that feature has no direction" if zero else \
            f"has a length float32 cannot normalise (sum of squares {s[j].item():.3g})"
        raise ValueError(f"{where}: tensor {name} {what} {j} {why}" +
                         (f" ({int(bad.sum())} {what}s in all)" if bad.sum() > 1 else ""))


def check_state_values(state, where):
    """check_finite and check_columns (the decoder) on an SAE state dict of our names."""
    check_finite(state, where)
    check_columns(state["decoder.weight"], where, "decoder.weight")


def json_safe(obj):
    """obj as JSON can hold it: keys as strings, a value JSON has no type for (a YAML date) as its str."""
    if isinstance(obj, dict):
        return {k if isinstance(k, str) else json.dumps(k, default=str).strip('"'): json_safe(v)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return json.loads(json.dumps(obj, default=str))


def kind(v):
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def mapping(v, where, key):
    """v when it is a mapping, {} when None; else ValueError naming where and key."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError(f"{where}: {key} is {kind(v)} ({shown(v)}), not a mapping")
    return v


POS_INT = ("an integer > 0", lambda v: type(v) is int and v > 0)
NONNEG = ("a finite number >= 0", lambda v: type(v) in (int, float) and math.isfinite(v) and v >= 0)
TEXT = ("a string", lambda v: isinstance(v, str))
BOOL = ("true or false", lambda v: type(v) is bool)


def field(conf, key, where, check, path=None):
    """conf[key] (None when absent or null) if it passes check = (what, ok), else ValueError naming where and the
    key's path."""
    v = conf.get(key)
    if v is not None and not check[1](v):
        raise ValueError(f"{where}: {path or key} is {shown(v)}; expected {check[0]}")
    return v


def read_text(path, what):
    """The text of a config file; ValueError naming it when it is not UTF-8."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path!r} is not UTF-8 text (byte {e.start}); expected {what}") from None


# the training args eval.py and features.py read from a source's record, and the test of each
RUN_ARGS = dict(ctx=POS_INT, eval_samples=POS_INT, n_samples=POS_INT, batch_size=POS_INT, dataset=TEXT, data_dir=TEXT)


def check_run_args(args, path, fmt):
    """ValueError naming the source's record and the key unless each of RUN_ARGS in args (sae.json's args, a SAELens
    cfg.json's metadata.nanosae.args) is absent, null or of its type."""
    where = {"run": os.path.join(path, "sae.json"), "saelens": os.path.join(path, "cfg.json")}.get(fmt, path)
    prefix = {"saelens": "metadata.nanosae.args."}.get(fmt, "args.")
    for key, check in RUN_ARGS.items():
        field(args or {}, key, repr(where), check, prefix + key)
