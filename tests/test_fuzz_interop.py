"""Property-based fuzzing of the readers of files a user hands in (interop.py): an Apollo .pt with its .yaml, and a
SAELens folder (cfg.json + sae_weights.safetensors). Each example starts from a valid source written the project's
way and mutates it (bytes cut short or overwritten, keys and fields deleted or renamed, values of another type,
NaN, inf, huge, negative, zero, tensors of another dtype or shape). Every example must end in either
  - a ValueError with a one-line message, or
  - a correct load: an SAE of the original shapes whose weights and unit decoder directions are finite, and a
    config whose layer, ctx, model and dataset are of their types;
any other exception fails the test."""
import copy
import datetime
import json
import math
import os
import tempfile

import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save, save_file

from interop import load_any, write_saelens
from sae import SAE
from test_interop import D, LAYER, N, random_sae, write_apollo

SETTINGS = settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", 400)), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
STEM = "downstream_similar_ce_layer_2"
P = f"blocks-{LAYER}-hook_resid_pre"

# values put where a config field or a tensor was: other types, and numbers no field allows
ODD_VALUES = ["x", "", "blocks.2.hook_resid_pre", 7, -5, 0, 1, 2 ** 70, 10.5, 1e300, -1e300, float("nan"), float("inf"),
              -float("inf"), True, False, None, [], [1, 2], ["blocks.2.hook_resid_pre"], {}, {"a": 1}, {"coeff": -1},
              datetime.date(2024, 1, 2), {datetime.date(2024, 1, 2): 1, 3: "x", None: 2.5}]
TENSOR_VALUES = [float("nan"), float("inf"), -float("inf"), 3.4e38, -3e38, 1e30, 1e-45, 0.0, -5.0]
DTYPES = [torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool,
          torch.complex64]


def _valid_sources():
    tmp = tempfile.mkdtemp(prefix="fuzz-interop-")
    write_apollo(os.path.join(tmp, STEM + ".pt"))
    sd = torch.load(os.path.join(tmp, STEM + ".pt"))
    with open(os.path.join(tmp, STEM + ".yaml")) as f:
        conf = yaml.safe_load(f)
    write_saelens(random_sae(), dict(layer=LAYER, model="gpt2", center=True, loss="e2e",
                                     args=dict(dataset="data.txt", ctx=64, eval_samples=4, n_samples=100)),
                  os.path.join(tmp, "lens"))
    with open(os.path.join(tmp, "lens", "cfg.json")) as f:
        cfg = json.load(f)
    w = load_file(os.path.join(tmp, "lens", "sae_weights.safetensors"))
    return sd, conf, cfg, w


APOLLO_SD, APOLLO_CONF, LENS_CFG, LENS_W = _valid_sources()


# ----------------------------------------------------------------------------- mutations

def paths(obj, prefix=()):
    """Every path into a nested dict / list, the root () included."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from paths(v, prefix + (i,))


def mutate_tree(data, obj):
    """obj (a config) with one field deleted or replaced by an odd value, or the whole of it replaced."""
    obj = copy.deepcopy(obj)
    path = data.draw(st.sampled_from(list(paths(obj))), label="path")
    value = data.draw(st.sampled_from(ODD_VALUES), label="value")
    if not path:
        return copy.deepcopy(value)
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if data.draw(st.booleans(), label="delete"):
        del parent[path[-1]]
    else:
        parent[path[-1]] = copy.deepcopy(value)
    return obj


def mutate_tensor(data, t):
    """t with a value, its dtype or its shape changed."""
    hows = ["value", "dtype", "shape", "zero_slice", "scale"] if t.numel() and t.dim() else ["dtype", "shape", "scale"]
    how = data.draw(st.sampled_from(hows), label="tensor_how")
    t = t.clone()
    if how == "value":
        i = data.draw(st.integers(0, t.numel() - 1), label="index")
        v = data.draw(st.sampled_from(TENSOR_VALUES), label="tensor_value")
        try:
            t.view(-1)[i] = v
        except (RuntimeError, OverflowError):  # NaN into an integer tensor (an earlier mutation changed its dtype)
            t.view(-1)[i] = 0
        return t
    if how == "dtype":
        dt = data.draw(st.sampled_from(DTYPES), label="dtype")
        return (t * 1e300 if dt == torch.float64 and data.draw(st.booleans(), label="huge64") else t).to(dt)
    if how == "scale":  # every value huge or tiny, of either sign
        return t * data.draw(st.sampled_from([1e30, -1e30, 1e-30, 1e-45, -1.0, 0.0]), label="scale")
    if how == "zero_slice":  # a decoder column (or row) of zeros, a zero bias entry, ...
        dim = data.draw(st.integers(0, t.dim() - 1), label="dim")
        t.select(dim, data.draw(st.integers(0, t.size(dim) - 1), label="slice"))[...] = 0
        return t
    shape = data.draw(st.sampled_from(["flat", "transpose", "unsqueeze", "scalar", "empty", "drop_last", "double"]),
                      label="shape")
    return {"flat": lambda: t.reshape(-1), "transpose": lambda: t.T.contiguous() if t.dim() == 2 else t[None],
            "unsqueeze": lambda: t[None], "scalar": lambda: t.sum(), "empty": lambda: t[:0],
            "drop_last": lambda: t[..., :-1].contiguous(), "double": lambda: torch.cat([t, t])}[shape]()


def mutate_dict(data, tensors, odd_keys):
    """A state dict with one key deleted, renamed or added, or one tensor mutated or replaced by a non-tensor."""
    tensors = dict(tensors)
    if not tensors:
        return {"x": torch.zeros(3)}
    key = data.draw(st.sampled_from(sorted(tensors, key=str)), label="key")
    how = data.draw(st.sampled_from(["tensor", "tensor", "tensor", "delete", "rename", "add", "non_tensor"]),
                    label="dict_how")
    if how == "tensor" and isinstance(tensors[key], torch.Tensor):
        tensors[key] = mutate_tensor(data, tensors[key])
    elif how == "delete":
        del tensors[key]
    elif how == "rename":
        tensors[data.draw(st.sampled_from(odd_keys(str(key))), label="new_key")] = tensors.pop(key)
    elif how == "add":
        tensors[data.draw(st.sampled_from(odd_keys(str(key))), label="new_key")] = torch.zeros(3)
    else:
        tensors[key] = data.draw(st.sampled_from(ODD_VALUES), label="non_tensor")
    return tensors


def mutate_bytes(data, blob):
    """blob cut short, or a stretch of it overwritten."""
    if not blob:
        return data.draw(st.binary(min_size=1, max_size=16), label="junk")
    if data.draw(st.booleans(), label="truncate"):
        return blob[:data.draw(st.integers(0, len(blob) - 1), label="cut")]
    i = data.draw(st.integers(0, len(blob) - 1), label="at")
    junk = data.draw(st.binary(min_size=1, max_size=16), label="junk")
    return blob[:i] + junk + blob[i + len(junk):]


def apollo_keys(key):
    part = key.split(".", 1)[-1]
    return [key.replace("-", "."), f"blocks-3-hook_resid_pre.{part}", f"blocks-{LAYER}-hook_resid_post.{part}",
            f"{P}.{part}.extra", "x", f"{P}.encoder.1.weight", 5]


def lens_keys(key):
    return [key.lower(), key + "_", "threshold", "W_enc.weight"]


# ----------------------------------------------------------------------------- the property

def _event(name):
    """A count in --hypothesis-show-statistics (none outside a hypothesis test)."""
    from hypothesis.errors import InvalidArgument
    try:
        event(name)
    except InvalidArgument:
        pass


def check_outcome(path):
    """load_any(path) refuses in one line or loads a correct SAE; any other exception propagates (a failure)."""
    try:
        sae, cfg, _ = load_any(path)
    except ValueError as e:
        msg = str(e)
        assert msg.strip() and "\n" not in msg and "\r" not in msg, repr(msg)
        _event("refused")
        return "refused"
    assert isinstance(sae, SAE) and (sae.d, sae.n_dict) == (D, N)
    shapes = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    assert shapes == {"encoder.weight": (N, D), "encoder.bias": (N,), "decoder.weight": (D, N), "decoder.bias": (D,)}
    for k, v in sae.state_dict().items():
        assert v.dtype == torch.float32 and torch.isfinite(v).all(), k
    D_unit = sae.dict_elements()
    assert torch.isfinite(D_unit).all() and torch.allclose(D_unit.norm(dim=0), torch.ones(N), atol=1e-4)
    assert type(cfg["layer"]) is int and cfg["layer"] >= 0 and isinstance(cfg["model"], str)
    assert type(cfg["center"]) is bool
    args = cfg["args"]
    assert type(args["ctx"]) is int and args["ctx"] > 0 and isinstance(args["dataset"], str)
    assert cfg["l1"] is None or (type(cfg["l1"]) in (int, float) and math.isfinite(cfg["l1"]) and cfg["l1"] >= 0)
    json.dumps(cfg)  # what save_sae writes into sae.json
    _event("loaded")
    return "loaded"


def write_apollo_files(folder, sd, conf, data):
    """The .pt (and .yaml) of one example; None when the mutated object is one torch.save cannot write."""
    pt = os.path.join(folder, STEM + ".pt")
    torch.save(sd, pt)
    if conf is not _MISSING:
        text = yaml.safe_dump(conf).encode() if not isinstance(conf, bytes) else conf
        with open(os.path.join(folder, STEM + ".yaml"), "wb") as f:
            f.write(text)
    return pt


_MISSING = object()


@SETTINGS
@given(data=st.data())
def test_fuzz_apollo(data):
    sd, conf = APOLLO_SD, APOLLO_CONF
    pt_bytes = None
    for _ in range(data.draw(st.integers(1, 3), label="n_mutations")):
        target = data.draw(st.sampled_from(["state_dict", "state_dict", "pt_bytes", "yaml", "yaml", "yaml_bytes",
                                            "no_yaml"]), label="target")
        if target == "state_dict":
            sd = mutate_dict(data, sd if isinstance(sd, dict) else APOLLO_SD, apollo_keys)
        elif target == "pt_bytes":
            pt_bytes = True
        elif target == "yaml":
            conf = mutate_tree(data, conf if isinstance(conf, dict) else APOLLO_CONF)
        elif target == "yaml_bytes":
            conf = mutate_bytes(data, conf if isinstance(conf, bytes) else yaml.safe_dump(
                APOLLO_CONF if conf is _MISSING else conf).encode())
        else:
            conf = _MISSING
    with tempfile.TemporaryDirectory() as tmp:
        pt = write_apollo_files(tmp, sd, conf, data)
        if pt_bytes:
            with open(pt, "rb") as f:
                blob = mutate_bytes(data, f.read())
            with open(pt, "wb") as f:
                f.write(blob)
        check_outcome(pt)


@SETTINGS
@given(data=st.data())
def test_fuzz_saelens(data):
    cfg, w, w_bytes, cfg_bytes = LENS_CFG, LENS_W, None, None
    for _ in range(data.draw(st.integers(1, 3), label="n_mutations")):
        target = data.draw(st.sampled_from(["cfg", "cfg", "cfg_bytes", "weights", "weights", "weights_bytes"]),
                           label="target")
        if target == "cfg":
            cfg = mutate_tree(data, cfg)
        elif target == "cfg_bytes":
            cfg_bytes = True
        elif target == "weights":
            w = mutate_dict(data, w, lens_keys)
        else:
            w_bytes = True
    with tempfile.TemporaryDirectory() as tmp:
        if not all(isinstance(v, torch.Tensor) for v in w.values()):
            blob = save({k: v for k, v in w.items() if isinstance(v, torch.Tensor)})  # safetensors holds tensors only
        else:
            try:
                blob = save(w)
            except Exception:  # a dtype safetensors cannot store (complex): not a file anyone can hand in
                blob = save(LENS_W)
        if w_bytes:
            blob = mutate_bytes(data, blob)
        with open(os.path.join(tmp, "sae_weights.safetensors"), "wb") as f:
            f.write(blob)
        text = json.dumps(cfg, default=str, skipkeys=True).encode()  # a date: a string (a date key: left out)
        with open(os.path.join(tmp, "cfg.json"), "wb") as f:
            f.write(mutate_bytes(data, text) if cfg_bytes else text)
        check_outcome(tmp)


def test_fuzz_sources_are_valid_unmutated(tmp_path):
    """The starting points load (so the fuzz tests mutate valid files)."""
    folder = str(tmp_path)
    pt = write_apollo_files(folder, APOLLO_SD, APOLLO_CONF, None)
    assert check_outcome(pt) == "loaded"
    save_file(LENS_W, str(tmp_path / "sae_weights.safetensors"))
    with open(tmp_path / "cfg.json", "w") as f:
        json.dump(LENS_CFG, f)
    assert check_outcome(folder) == "loaded"
