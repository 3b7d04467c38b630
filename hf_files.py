"""
A Hugging Face GPT-2 / GPT-Neo checkpoint, from a local folder (config.json + model.safetensors or
pytorch_model.bin, as transformers' save_pretrained writes it) or the hub, with one-line errors: every
failure is a ValueError naming the model, file, key or tensor, and what was expected, before a model is
built or anything is written. model.GPT.from_pretrained uses these; model.py holds the network itself.

    config_file, weights_file = resolve_checkpoint("gpt2")  # a folder, or a hub id (downloads two files)
    hf = read_config(config_file)        # a dict, or: "PATH is not valid JSON (... at line 3, column 5)"
    kw = config_from_hf(hf, name)        # model.GPTConfig's keyword arguments, or: "model 'x' uses activation ..."
    names = hf_names(k, neo)             # the checkpoint's name(s) of our parameter k
    sd_hf = load_weights(path, wanted, n_layer, where)  # the file's tensors, each there, float, of its shape,
                                                        # finite; no layer beyond n_layer
"""
import json
import os
import re
import warnings

import torch

from cli import first_line, read_json

BUFFERS = (".attn.bias", ".attn.masked_bias", ".attention.bias", ".attention.masked_bias")  # masks, not weights

MODEL_TYPES = ("gpt2", "gpt_neo")
TINYSTORIES_1M = "roneneldan/TinyStories-1M"
HUB_ALIASES = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
               "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl"}


def read_config(path):
    """config.json as a dict; ValueError naming the file when it is not a JSON object."""
    hf = read_json(path, "a transformers config.json")
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


MAX_LAYERS = 1024  # GPT-2 XL has 48, the largest GPT-Neo 32


def _big(n):
    """An integer for a message: as it is when short, else its magnitude (10**400 -> '1.00e+400')."""
    s = str(n)
    return s if len(s) <= 12 else f"{s[0]}.{s[1:3]}e+{len(s) - 1}"


GPT2_SWITCHES = dict(scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False)
# transformers' other names of a size (its attribute_map): where config.json has both, the alias is the one it uses
ALIASES = {"gpt2": {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
                    "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"},
           "gpt_neo": {"num_attention_heads": "num_heads", "num_hidden_layers": "num_layers"}}


def attention_layers(hf, name):
    """GPT-Neo's attention type per layer from attention_types ([[["global", "local"], 4]] -> 4 x (global, local),
    as transformers expands it), checked before it is expanded (a count of 10**12 would never end)."""
    types = hf.get("attention_types", [[["global", "local"], 12]])
    ok = isinstance(types, list) and types and all(
        isinstance(t, list) and len(t) == 2 and isinstance(t[0], list) and t[0]
        and all(isinstance(a, str) for a in t[0]) and type(t[1]) is int and t[1] >= 1 for t in types)
    if not ok:
        raise ValueError(f"model {name!r}: its config.json has attention_types {first_line(repr(types))[:200]}; "
                         f"expected pairs such as [[\"global\", \"local\"], 4]")
    n = sum(len(pattern) * k for pattern, k in types)
    bad = next((t for pattern, _ in types for t in pattern if t not in ("global", "local")), None)
    if bad is not None:
        raise ValueError(f"model {name!r} has attention type {bad!r}; only 'global' and 'local' are supported")
    n_layer = count_field(hf, "num_layers", name)
    if n != n_layer:
        raise ValueError(f"model {name!r}: attention_types give {_big(n)} layers, num_layers is {_big(n_layer)}")
    if n_layer > MAX_LAYERS:  # before the list of them is made
        raise ValueError(f"model {name!r}: its config.json has {_big(n_layer)} layers, more than any GPT-2 or GPT-Neo "
                         f"(at most {MAX_LAYERS} here)")
    layers = tuple(t for pattern, k in types for _ in range(k) for t in pattern)
    if "attention_layers" in hf and hf["attention_layers"] != list(layers):  # transformers uses attention_layers
        raise ValueError(f"model {name!r}: its config.json has attention_layers "
                         f"{first_line(repr(hf['attention_layers']))[:200]}, but attention_types give {list(layers)}")
    return layers


def check_size(kw, name):
    """ValueError when the model kw describes would not fit in this machine's RAM in float32, or has more than
    MAX_LAYERS layers: it is built before its weights are read, so a config.json with n_embd 2**31 or n_layer 10**6
    must not become an allocation or a loop that never returns."""
    d, i, v, p, n = kw["n_embd"], kw["n_inner"], kw["vocab_size"], kw["n_positions"], kw["n_layer"]
    if n > MAX_LAYERS:
        raise ValueError(f"model {name!r}: its config.json has {_big(n)} layers, more than any GPT-2 or GPT-Neo "
                         f"(at most {MAX_LAYERS} here)")
    params = (v + p) * d + n * (4 * d * d + 2 * d * i + i + 9 * d) + 2 * d
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 4 * params > ram:
        raise ValueError(f"model {name!r}: its config.json (n_embd {_big(d)}, n_layer {n}, vocab_size {_big(v)}, "
                         f"n_positions {_big(p)}, n_inner {_big(i)}) gives {_big(params)} parameters, "
                         f"{_big(4 * params // 2 ** 30)} GiB in float32, more than the {ram / 2 ** 30:,.0f} GiB of "
                         f"RAM here")


def config_from_hf(hf, name):
    """model.GPTConfig's keyword arguments from a transformers config.json (GPT2LMHeadModel or GPTNeoForCausalLM);
    ValueError with one line for a model or an option model.py does not implement, or a value transformers would
    read otherwise than we would."""
    kind = hf.get("model_type")
    if kind not in MODEL_TYPES:
        raise ValueError(f"model {name!r} has model_type {first_line(repr(kind))[:100]}; supported: "
                         f"{', '.join(map(repr, MODEL_TYPES))}")
    if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"model {name!r} uses activation {first_line(repr(hf['activation_function']))[:100]}; only "
                         "the tanh GELU ('gelu_new') is supported")
    tied = hf.get("tie_word_embeddings", True)
    if tied is False:
        raise ValueError(f"model {name!r} has an lm_head untied from wte; only tied ones are supported")
    if tied is not True:  # transformers would read 0, null or "" as untied
        raise ValueError(f"model {name!r}: its config.json has tie_word_embeddings {first_line(repr(tied))[:100]}; "
                         f"expected true (only tied lm_heads are supported)")
    for alias, key in ALIASES[kind].items():
        if alias in hf and key in hf and (hf[alias] != hf[key] or type(hf[alias]) is not type(hf[key])):
            raise ValueError(f"model {name!r}: its config.json has {key} {first_line(repr(hf[key]))[:50]} but "
                             f"{alias} {first_line(repr(hf[alias]))[:50]}, two names of one size (transformers "
                             f"reads {alias})")
    eps = hf.get("layer_norm_epsilon", 1e-5)
    if type(eps) not in (int, float) or not 0 < eps < 1:
        raise ValueError(f"model {name!r}: its config.json has layer_norm_epsilon {eps!r}; expected a number in (0, 1)")
    if kind == "gpt2":
        for key, default in GPT2_SWITCHES.items():  # transformers 5 refuses anything but a boolean here too
            if type(hf.get(key, default)) is not bool:
                raise ValueError(f"model {name!r}: its config.json has {key} {first_line(repr(hf[key]))[:50]}; "
                                 f"expected true or false")
        if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
            raise ValueError(f"model {name!r} uses attention options this GPT-2 does not implement")
        if not hf.get("scale_attn_weights", True):
            raise ValueError(f"model {name!r} has scale_attn_weights false: attention without 1/sqrt(d_head), which "
                             f"this GPT-2 does not implement")
        d = count_field(hf, "n_embd", name)
        kw = dict(n_positions=count_field(hf, "n_positions", name), vocab_size=count_field(hf, "vocab_size", name),
                  n_layer=count_field(hf, "n_layer", name), n_head=count_field(hf, "n_head", name), n_embd=d,
                  n_inner=count_field(hf, "n_inner", name, 4 * d) if hf.get("n_inner") is not None else 4 * d,
                  layer_norm_epsilon=eps)
    else:
        layers = attention_layers(hf, name)
        n_layer, d = len(layers), count_field(hf, "hidden_size", name)
        if "local" in layers and (type(hf.get("window_size", 256)) is not int or hf.get("window_size", 256) < 1):
            raise ValueError(f"model {name!r} has window_size {first_line(repr(hf['window_size']))[:100]}; it must be "
                             f"an integer >= 1")
        kw = dict(n_positions=count_field(hf, "max_position_embeddings", name),
                  vocab_size=count_field(hf, "vocab_size", name), n_layer=n_layer,
                  n_head=count_field(hf, "num_heads", name), n_embd=d,
                  n_inner=count_field(hf, "intermediate_size", name, 4 * d) if hf.get("intermediate_size")
                  is not None else 4 * d,
                  layer_norm_epsilon=eps, qkv_bias=False, scale_attn=False,
                  attention_layers=layers, window_size=hf.get("window_size", 256))
    if kw["n_embd"] % kw["n_head"]:
        raise ValueError(f"model {name!r}: d_model {kw['n_embd']} is not a multiple of its {kw['n_head']} heads")
    check_size(kw, name)
    return kw


def is_tinystories_1m(name_or_path):
    """TinyStories-1M: its hub id, or a local folder whose config.json is a GPT-Neo of 8 layers with d_model 64.
    (train.py gives these the paper's TinyStories recipe.) Reads no weights and never goes to the hub."""
    if name_or_path == TINYSTORIES_1M:
        return True
    try:
        with open(os.path.join(name_or_path, "config.json")) as f:
            hf = json.load(f)
    except (OSError, ValueError, RecursionError):
        return False
    return (isinstance(hf, dict) and hf.get("model_type") == "gpt_neo" and hf.get("num_layers") == 8
            and hf.get("hidden_size") == 64)


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
    local = not hub_reachable()  # unreachable: the local cache alone, not half a minute of retries first
    try:
        config_file = hf_hub_download(repo, "config.json", local_files_only=local)
        try:
            weights = hf_hub_download(repo, "model.safetensors", local_files_only=local)
        except EntryNotFoundError:
            weights = hf_hub_download(repo, "pytorch_model.bin", local_files_only=local)
    except Exception as e:  # offline, unknown repo, gated repo: one line, not a traceback
        raise ValueError(_hub_error(name_or_path, repo, e)) from None
    return config_file, weights


def hub_reachable(timeout=3.0):
    """Can the Hugging Face hub be reached (a TCP connection to its endpoint within timeout seconds)? False at
    once with HF_HUB_OFFLINE set. Without network huggingface_hub retries each download for about 40 s before it
    falls back to the local cache; asking first takes a few seconds at most."""
    import socket
    from urllib.parse import urlparse
    if os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return False
    from huggingface_hub import constants
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _hub_error(name, repo, e):
    """The one line for a failed hub download of model name (hub repo repo), naming the fix."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)
    why = type(e).__name__
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline or isinstance(e, (LocalEntryNotFoundError, ConnectionError, TimeoutError)) or "Connect" in why:
        return (f"model {name!r} is neither a local folder nor a reachable hub repo: the hub cannot be reached "
                f"({'HF_HUB_OFFLINE is set' if offline else 'offline or no network; HF_HUB_OFFLINE=1 skips the check'}"
                f"; {why}) and {repo!r} is not in "
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
    (check_weights) unless each is there, float, of its shape, finite, and no layer is beyond n_layer; also when a
    name is there with and without the prefix, or an lm_head.weight is not wte's (an untied lm_head)."""
    sd_file = read_weights(path)
    # the hub's gpt2 has no "transformer." prefix; a save_pretrained of GPT2LMHeadModel has it
    sd_hf = {k.removeprefix("transformer."): v for k, v in sd_file.items()
             if not k.endswith(BUFFERS) and k != "lm_head.weight"}
    both = next((k for k in sd_file if k.startswith("transformer.") and not k.endswith(BUFFERS)
                 and k.removeprefix("transformer.") in sd_file), None)
    if both:  # which of the two would be loaded is a matter of order: refuse the file
        raise ValueError(f"{where}: weights file {path} holds both {both} and {both.removeprefix('transformer.')}; "
                         f"expected one of the two names")
    want = {n: (shape[0] // len(names), *shape[1:]) for names, shape in wanted.values() for n in names}
    check_weights(sd_hf, want, n_layer, where, path, sd_file)
    lm, wte = sd_file.get("lm_head.weight"), sd_hf.get("wte.weight")
    if lm is not None and wte is not None and not (isinstance(lm, torch.Tensor) and lm.shape == wte.shape
                                                   and torch.equal(lm.to(wte.dtype), wte)):
        raise ValueError(f"{where}: weights file {path} holds an lm_head.weight that is not its wte.weight: an lm_head "
                         f"untied from wte, which is not supported")
    return sd_hf


def check_weights(sd_hf, want, n_layer, where, path, sd_file):
    """ValueError unless sd_hf (the file's tensors, 'transformer.' prefix removed) holds every name of want as
    a float tensor of the shape want gives, finite in float32, and no layer h.N with N >= n_layer. sd_file: the
    tensors under their names in the file, for the message."""
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
        elif not torch.isfinite(w.float()).all():  # float(): a float64 beyond float32's range is inf once loaded
            if torch.isfinite(w).all():
                raise ValueError(f"{where}: weights file {path} has {w.dtype} values beyond float32's range in "
                                 f"{in_file[n]} (inf once loaded)")
            raise ValueError(f"{where}: weights file {path} has non-finite weights (nan or inf) in {in_file[n]}; "
                             f"it is broken: download or save it again")
        else:
            continue
        raise ValueError(f"{where}: {in_file[n]} in {path} has {what}; its config.json gives a float tensor of "
                         f"shape {shape}")
