"""
A Hugging Face GPT-2 / GPT-Neo checkpoint, from a local folder (config.json + model.safetensors or
pytorch_model.bin, as transformers' save_pretrained writes it) or the hub, with one-line errors: every
failure is a ValueError naming the model, file, key or tensor, and what was expected, before a model is
built or anything is written. model.GPT.from_pretrained uses these; model.py holds the network itself.

    config_file, weights_file = resolve_checkpoint("gpt2")  # a folder, or a hub id (downloads two files)
    hf = read_config(config_file)        # a dict, or: "PATH is not valid JSON (... at line 3, column 5)"
    kw = config_from_hf(hf, name)        # model.GPTConfig's keyword arguments, or: "model 'x' uses activation ..."
    names = hf_names(k, neo)             # the checkpoint's name(s) of our parameter k
    sd_hf = load_weights(path, wanted, n_layer, where)  # the file's tensors, each there, float, of its shape;
                                                        # no layer beyond n_layer
"""
import json
import os
import re
import warnings

import torch

from cli import first_line

BUFFERS = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias")  # masks, not weights

MODEL_TYPES = ("gpt2", "gpt_neo")
TINYSTORIES_1M = "roneneldan/TinyStories-1M"
HUB_ALIASES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
               "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}


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


def config_from_hf(hf, name):
    """model.GPTConfig's keyword arguments from a transformers config.json (GPT2LMHeadModel or GPTNeoForCausalLM);
    ValueError with one line for a model or an option model.py does not implement."""
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
        d = count_field(hf, "n_embd", name)
        kw = dict(n_positions=count_field(hf, "n_positions", name), vocab_size=count_field(hf, "vocab_size", name),
                  n_layer=count_field(hf, "n_layer", name), n_head=count_field(hf, "n_head", name), n_embd=d,
                  n_inner=count_field(hf, "n_inner", name, 4 * d) if hf.get("n_inner") is not None else 4 * d,
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
        n_layer, d = count_field(hf, "num_layers", name), count_field(hf, "hidden_size", name)
        if len(layers) != n_layer:
            raise ValueError(f"model {name!r}: attention_types give {len(layers)} layers, num_layers is {n_layer}")
        if "local" in layers and (type(hf.get("window_size", 256)) is not int or hf.get("window_size", 256) < 1):
            raise ValueError(f"model {name!r} has window_size {hf['window_size']!r}; it must be an integer >= 1")
        kw = dict(n_positions=count_field(hf, "max_position_embeddings", name),
                  vocab_size=count_field(hf, "vocab_size", name), n_layer=n_layer,
                  n_head=count_field(hf, "num_heads", name), n_embd=d,
                  n_inner=count_field(hf, "intermediate_size", name, 4 * d) if hf.get("intermediate_size")
                  is not None else 4 * d,
                  layer_norm_epsilon=eps, qkv_bias=False, scale_attn=False,
                  attention_layers=layers, window_size=hf.get("window_size", 256))
    if kw["n_embd"] % kw["n_head"]:
        raise ValueError(f"model {name!r}: d_model {kw['n_embd']} is not a multiple of its {kw['n_head']} heads")
    return kw


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


def resolve_checkpoint(name_or_path):
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
    return f"model {name!r} is neither a local folder nor a reachable hub repo ({why}: {first_line(e)})"


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
        why = f"{type(e).__name__}: {first_line(e)[:120]}" if path.endswith(".safetensors") \
            else type(e).__name__  # torch's weights-only message is a page long
        raise ValueError(f"{path} is not a readable weights file ({why}); it may be cut short or not a model's "
                         f"weights: download or save it again") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) for k in sd):
        raise ValueError(f"{path} holds a {type(sd).__name__}, not a dict of named weights")
    return sd


def load_weights(path, wanted, n_layer, where):
    """The tensors of weights file path by name, 'transformer.' prefix, attention mask buffers and lm_head
    (tied to wte) dropped. wanted: {our parameter: (its names in the file, its shape as the file holds it)};
    a parameter of several names (GPT-Neo's q, k, v for our c_attn) is split evenly along dim 0. ValueError
    (check_weights) unless each is there, float, of its shape, and no layer is beyond n_layer."""
    sd_file = read_weights(path)
    # the hub's gpt2 has no "transformer." prefix; a save_pretrained of GPT2LMHeadModel has it
    sd_hf = {k.removeprefix("transformer."): v for k, v in sd_file.items()
             if not k.endswith(BUFFERS) and k != "lm_head.weight"}
    want = {n: (shape[0] // len(names), *shape[1:]) for names, shape in wanted.values() for n in names}
    check_weights(sd_hf, want, n_layer, where, path, sd_file)
    return sd_hf


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
