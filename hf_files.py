"""
Reading a Hugging Face model folder (config.json + model.safetensors or pytorch_model.bin) with one-line errors:
every failure is a ValueError naming the file, the key or tensor, and what was expected, before a model is
built or anything is written. model.GPT.from_pretrained uses these; the names and shapes it expects come from
the config (see model.py).

    hf = read_config(path)               # a dict, or: "PATH is not valid JSON (... at line 3, column 5)"
    sd = read_weights(path)              # {name: tensor}, or: "PATH is not a readable weights file (...)"
    check_weights(sd_hf, want, n_layer, where, path, sd_file)  # every tensor there, float, of its shape;
                                                                # no layer beyond n_layer
"""
import json
import re
import warnings

import torch

BUFFERS = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias")  # masks, not weights


def read_config(path):
    """config.json as a dict; ValueError naming the file when it is not a JSON object."""
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text, so not a config.json") from None
    if not isinstance(hf, dict):
        what = "an array" if isinstance(hf, list) else f"a {type(hf).__name__}"
        raise ValueError(f"{path} holds {what}, not the JSON object of a transformers config.json")
    return hf


def count_field(hf, key, name, default=None):
    """hf[key] (default when absent, if one is given): an integer >= 1, else a one-line ValueError."""
    if key not in hf and default is None:
        raise ValueError(f"model {name!r}: its config.json has no {key!r}")
    v = hf.get(key, default)
    if type(v) is not int or v < 1:
        raise ValueError(f"model {name!r}: its config.json has {key} {v!r}; expected an integer >= 1")
    return v


def read_weights(path):
    """{name: tensor} from model.safetensors or pytorch_model.bin; ValueError naming the file when it cannot be
    read (a truncated download, a file of something else)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(path)
        else:
            with warnings.catch_warnings():  # a foreign pickle warns before it fails; keep the error one line
                warnings.simplefilter("ignore")
                sd = torch.load(path, map_location="cpu", weights_only=True)  # never runs code from the file
    except Exception as e:  # SafetensorError, UnpicklingError, RuntimeError (a zip cut short), EOFError
        why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}" if path.endswith(".safetensors") \
            else type(e).__name__  # torch's weights-only message is a page long
        raise ValueError(f"{path} is not a readable weights file ({why}); it may be cut short or not a model's "
                         f"weights: download or save it again") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a dict of named weights")
    return sd


def check_weights(sd_hf, want, n_layer, where, path, sd_file):
    """ValueError unless sd_hf (the file's tensors, 'transformer.' prefix removed) holds every name of want as
    a float tensor of the shape want gives, and no layer h.N with N >= n_layer. sd_file: the tensors under
    their names in the file, for the message."""
    in_file = {k.removeprefix("transformer."): k for k in sd_file}
    missing = [n for n in want if n not in sd_hf]
    if missing:
        raise ValueError(f"{where}: weights file {path} lacks {missing[0]} (and {len(missing) - 1} more) that its "
                         f"config.json ({n_layer} layers) needs")
    layer = re.compile(r"h\.(\d+)\.")
    extra = next((n for n in sorted(sd_hf) if (m := layer.match(n)) and int(m.group(1)) >= n_layer), None)
    if extra:
        raise ValueError(f"{where}: weights file {path} holds {in_file[extra]}, a layer beyond the {n_layer} of its "
                         f"config.json")
    for n, shape in want.items():
        w = sd_hf[n]
        if not isinstance(w, torch.Tensor):
            what = type(w).__name__
        elif not w.is_floating_point():
            what = f"dtype {w.dtype}"
        elif tuple(w.shape) != shape:
            what = f"shape {tuple(w.shape)}"
        else:
            continue
        raise ValueError(f"{where}: {in_file[n]} in {path} has {what}; its config.json gives a float tensor of "
                         f"shape {shape}")
