"""Property-based fuzz tests (hypothesis) of every reader of a file a user hands in. Each starts from a valid file,
damages it (bytes cut short, flipped or inserted, bad UTF-8, fields dropped, types swapped, NaN / inf, huge and
negative numbers, nested objects, tensors of another dtype or shape) and requires one of two outcomes:
    a ValueError of one line naming the file (or the model folder), or
    a correct load: what the file says (checked against an independent reading of the same bytes).
Any other exception, a hang (SIGALRM after HANG_S), a message of several lines or a wrong load fails.

    test_sae_json / test_sae_tensors      sae.load_sae: sae.json, sae.safetensors (tensors, header, bytes)
    test_gpt2_config / test_neo_config    model.GPT.from_pretrained: config.json (hf_files.read_config,
                                          config_from_hf); a load is checked against transformers' model
    test_model_weights                    model.safetensors / pytorch_model.bin (hf_files.load_weights)
    test_jsonl / test_txt / test_parquet  data.load_rows (token_cache._records, _documents, _token_ids); a load is
                                          checked against the rows the records tokenise to (reference_rows)
    test_*_refusals                       the bugs these found, once each, with the words their messages must hold

The examples are the same on every run (derandomize); NANOSAE_FUZZ=N runs N times as many, from a random seed
(e.g. NANOSAE_FUZZ=25: about 5 minutes on 2 cores). Every token cache is in a temporary folder."""
import contextlib
import copy
import json
import math
import os
import re
import shutil
import signal
import struct
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st

SCALE = int(os.environ.get("NANOSAE_FUZZ", "0") or 0)
HANG_S = 20


def fuzz(n):
    """hypothesis settings for n examples (n * NANOSAE_FUZZ, from a random seed, when that is set)."""
    return settings(max_examples=n * SCALE if SCALE else n, deadline=None, derandomize=not SCALE, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=True)


@contextlib.contextmanager
def time_limit(s=HANG_S):
    def hang(*_):
        raise TimeoutError(f"a reader ran past {s} s")
    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(s)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def outcome(fn, *names):
    """fn()'s result, or None when it raised a ValueError of one line naming one of names. Anything else fails."""
    with time_limit():
        try:
            got = fn()
            event("loaded")
            return got
        except ValueError as e:
            msg = str(e)
            event("refused")
            assert len(msg.splitlines()) == 1 and msg.strip(), f"not one line: {msg!r}"
            assert "Traceback" not in msg, msg
            assert any(n in msg for n in names), f"the message names none of {names}: {msg}"
            return None


# ----------------------------------------------------------------------------- strategies

NAN, INF = float("nan"), float("inf")
EXTREMES = [0, -1, 1, 2, 3, 2 ** 16, 2 ** 31, 2 ** 63, -2 ** 63, 2 ** 64 + 1, 10 ** 30, 10 ** 400, 1e308, 1e-320,
            -0.0, 0.5, 1.0, 2.0, NAN, INF, -INF, True, False, None, "", "1", "2.0", "nan", "\ud800", "\x00",
            [], {}, [1, 2], [[]], {"a": 1}, {"": None}, [NAN], ["global", "local"]]
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=4), c, max_size=3),
                           max_leaves=6)


def near(v):
    """Values derived from a valid value v: its neighbours, its type swapped, wrapped."""
    out = [str(v), [v], {"value": v}, None, [v, v]]
    if type(v) is int:
        out += [v - 1, v + 1, 2 * v, v // 2, -v, float(v) if abs(v) < 1e300 else INF, bool(v), 2 ** 40 * v]
    elif type(v) is float:
        out += [-v, 10 * v, v / 10, int(v) if math.isfinite(v) else 0, NAN, INF, -INF, 0.0, 1.0, 1.5]
    elif type(v) is bool:
        out += [not v, int(v), str(v).lower()]
    elif isinstance(v, str):
        out += [v.upper(), v + "x", v[:-1], "", v.encode("utf-8", "surrogatepass").hex()]
    return out


def value_for(draw, old):
    return draw(st.one_of(st.sampled_from(EXTREMES), st.sampled_from(near(old)), json_values))


@st.composite
def mutated_dict(draw, base, keys, min_ops=1):
    """base (a JSON object) with 1-3 of its keys dropped or set to another value, or the whole replaced."""
    obj = copy.deepcopy(base)
    for _ in range(draw(st.integers(min_ops, 3))):
        key = draw(st.sampled_from(sorted(keys)))
        if draw(st.integers(0, 3)) == 0:
            obj.pop(key, None)
        else:
            obj[key] = value_for(draw, obj.get(key))
    whole = draw(st.integers(0, 15))
    if whole == 0:
        obj = [obj]
    elif whole == 1:
        obj = value_for(draw, None)
    return obj


BAD_BYTES = [b"\xff", b"\xc3", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf", b"\x00", b"\xef\xbb\xbf", b"\xe2\x80\xa8",
             b"\r", b"\n", b"\r\n", b"\x1c", b'"', b"}", b"]", b"NaN", b"-", b"1e999", b"9" * 5000]


@st.composite
def damaged(draw, raw, p_keep=3):
    """raw bytes, often as they are (p_keep in p_keep + 6), else cut short, flipped, with bytes inserted, nested
    deep, with a BOM, or empty."""
    kind = draw(st.integers(0, p_keep + 5))
    n = len(raw)
    if kind < p_keep or n == 0:
        return raw
    kind -= p_keep
    if kind == 0:
        return raw[:draw(st.integers(0, n - 1))]
    if kind == 1:
        i = draw(st.integers(0, n - 1))
        return raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1:]
    if kind == 2:
        i = draw(st.integers(0, n))
        return raw[:i] + draw(st.sampled_from(BAD_BYTES)) + raw[i:]
    if kind == 3:
        return draw(st.sampled_from([b"[" * 5000, b'{"a":' * 5000, b"[" * 5000 + b"]" * 5000]))
    if kind == 4:
        return b"\xef\xbb\xbf" + raw
    return b""


def parse_json(raw):
    """What a JSON file's bytes say: the value, or None when they are not UTF-8 JSON (the reference reading)."""
    try:
        return ("ok", json.loads(raw.decode("utf-8")))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None


def same_json(a, b):
    return json.dumps(a, sort_keys=True, allow_nan=True) == json.dumps(b, sort_keys=True, allow_nan=True)


FLOAT_DTYPES = [torch.float16, torch.bfloat16, torch.float64]
OTHER_DTYPES = [torch.int32, torch.int64, torch.uint8, torch.bool, torch.int8]


@st.composite
def mutated_tensors(draw, state, names, extra_names, benign=False):
    """state (name -> tensor) with 1-2 of: an element NaN / inf / beyond float32, another dtype, another shape, a
    tensor dropped, renamed, or one added. benign: only changes that leave a file to load (a finite value, a float
    dtype, a tensor added under an unrelated name)."""
    sd = {k: v.clone() for k, v in state.items()}
    for _ in range(draw(st.integers(1, 2))):
        op = draw(st.sampled_from(["value", "dtype", "extra"] if benign else
                                  ["value", "value", "dtype", "shape", "drop", "rename", "extra"]))
        k = draw(st.sampled_from(sorted(set(names) & set(sd)) or sorted(sd)))
        t, v = sd[k], None
        if op == "value" and not t.numel():
            op = "extra"
        if op == "value":
            v = draw(st.sampled_from([1e-45, 0.0, -1.0, 7.5] if benign else
                                     [NAN, INF, -INF, 1e39, -1e300, 3e38, 1e-45, 0.0, -1.0]))
            t = t.double() if (abs(v) > 3.4e38 and math.isfinite(v)) or not t.is_floating_point() else t.clone()
            t.view(-1)[draw(st.integers(0, t.numel() - 1))] = v
        elif op == "dtype":
            t = t.to(draw(st.sampled_from(FLOAT_DTYPES if benign else FLOAT_DTYPES + OTHER_DTYPES)))
        elif op == "shape":
            flat = t.reshape(-1)
            t = draw(st.sampled_from([lambda: t.t() if t.dim() == 2 else t[None], lambda: flat[:-1], lambda: t[None],
                                      lambda: flat, lambda: flat[:1].reshape(()) if flat.numel() else flat[None],
                                      lambda: flat[:0], lambda: torch.cat([flat, flat])]))().contiguous()
        elif op == "drop":
            del sd[k]
            note(f"drop: {k}")
            continue
        elif op == "rename":
            del sd[k]
            k = draw(st.sampled_from(extra_names + [k.upper(), k + ".x", "." + k]))
        else:
            k = draw(st.sampled_from(["unrelated.weight", "score.bias"] if benign else extra_names))
        sd[k] = t.clone()  # never two names for one tensor (safetensors refuses to save those)
        note(f"{op}: {k} {t.dtype} {tuple(t.shape)}" + (f" holds {v}" if v is not None else ""))
    return sd


def safetensors_header(raw):
    (n,) = struct.unpack("<Q", raw[:8])
    return n, raw[8:8 + n]


@st.composite
def damaged_safetensors(draw, raw):
    """A safetensors file's bytes with its header's JSON changed (a tensor's dtype, shape or offsets), its length
    field overwritten, or the bytes damaged."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        n, head = safetensors_header(raw)
        h = json.loads(head)
        name = draw(st.sampled_from(sorted(h)))
        entry = h[name] if isinstance(h[name], dict) else {}
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "__metadata__", None]))
        if field is None:
            h[name] = value_for(draw, entry)
        elif field == "__metadata__":
            h["__metadata__"] = value_for(draw, h.get("__metadata__"))
        else:
            old = entry.get(field)
            choices = {"dtype": ["F16", "BF16", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "I8", "C64", "X"],
                       "shape": [[], [0], [2 ** 62, 2 ** 62], [-1], [1, 1, 1],
                                 old[::-1] if isinstance(old, list) else 1],
                       "data_offsets": [[0, 0], [0, 2 ** 63], [-1, 4], [4, 0], [0, 10 ** 12],
                                        [x + 4 for x in old] if isinstance(old, list) else 0]}[field]
            entry[field] = draw(st.one_of(st.sampled_from(choices), st.sampled_from(near(old))))
            h[name] = entry
        new = json.dumps(h).encode()
        new += b" " * (-len(new) % 8)
        return struct.pack("<Q", len(new)) + new + raw[8 + n:]
    if kind == 1:
        v = draw(st.sampled_from([0, 1, 7, 2 ** 32, 2 ** 63, 2 ** 64 - 1, len(raw), len(raw) - 8]))
        return struct.pack("<Q", v) + raw[8:]
    return draw(damaged(raw, p_keep=0))


# ----------------------------------------------------------------------------- SAE folders (sae.load_sae)

D, N_DICT = 8, 16
SAE_CFG = dict(layer=1, model="gpt2", center=True, loss="e2e", args=dict(lr=1e-3, dataset="x.jsonl", ctx=32))
SAE_KEYS = ["d", "n_dict", "layer", "center", "model", "loss", "args", "extra"]
SAE_JSON_RULES = dict(d=lambda v: type(v) is int and v >= 1, n_dict=lambda v: type(v) is int and v >= 1,
                      layer=lambda v: type(v) is int and v >= 0, center=lambda v: type(v) is bool)
SAE_JSON_OPTIONAL = dict(model=lambda v: v is None or isinstance(v, str),
                         loss=lambda v: v is None or isinstance(v, str), args=lambda v: isinstance(v, dict))


@pytest.fixture(scope="module")
def sae_template():
    from sae import SAE, save_sae
    torch.manual_seed(0)
    folder = tempfile.mkdtemp(prefix="fuzz-sae-")
    save_sae(SAE(D, N_DICT), folder, SAE_CFG)
    files = {f: open(os.path.join(folder, f), "rb").read() for f in ("sae.json", "sae.safetensors")}
    shutil.rmtree(folder)
    return files


def check_sae(folder, json_raw, st_raw):
    """load_sae on a folder holding these two files: one line naming one of them, or the SAE they say."""
    from safetensors.torch import load_file
    from sae import load_sae
    with tempfile.TemporaryDirectory(dir=folder) as d:
        for name, raw in (("sae.json", json_raw), ("sae.safetensors", st_raw)):
            with open(os.path.join(d, name), "wb") as f:
                f.write(raw)
        got = outcome(lambda: load_sae(d), os.path.join(d, "sae.json"), os.path.join(d, "sae.safetensors"))
        if got is None:
            return None
        sae, cfg = got
        said = parse_json(json_raw)
        assert said is not None, "a sae.json that is not JSON was loaded"
        assert same_json(cfg, said[1]), (cfg, said[1])
        assert all(k in cfg and ok(cfg[k]) for k, ok in SAE_JSON_RULES.items()), cfg
        assert all(ok(cfg[k]) for k, ok in SAE_JSON_OPTIONAL.items() if k in cfg), cfg
        tensors = load_file(os.path.join(d, "sae.safetensors"))  # raises if the file is not one: then no load
        assert set(tensors) == {"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"}, sorted(tensors)
        assert (sae.d, sae.n_dict) == (cfg["d"], cfg["n_dict"])
        shapes = {"encoder.weight": (cfg["n_dict"], cfg["d"]), "encoder.bias": (cfg["n_dict"],),
                  "decoder.weight": (cfg["d"], cfg["n_dict"]), "decoder.bias": (cfg["d"],)}
        for k, p in sae.state_dict().items():
            assert tuple(p.shape) == shapes[k] and p.dtype == torch.float32, (k, p.shape, p.dtype)
            assert torch.isfinite(p).all(), f"{k} loaded with non-finite values"
            assert tensors[k].is_floating_point() and torch.equal(p, tensors[k].float()), f"{k} is not the file's"
        return sae


@fuzz(100)
@given(st.data())
def test_sae_json(sae_template, tmp_path_factory, data):
    """sae.json: keys dropped, values swapped for other types, NaN, huge and negative numbers, nested objects;
    the bytes cut short, bad UTF-8, deep nesting."""
    base = json.loads(sae_template["sae.json"])
    obj = data.draw(mutated_dict(base, SAE_KEYS))
    raw = data.draw(damaged(json.dumps(obj, allow_nan=True).encode()))
    check_sae(str(tmp_path_factory.getbasetemp()), raw, sae_template["sae.safetensors"])


@fuzz(100)
@given(st.data())
def test_sae_tensors(sae_template, tmp_path_factory, data):
    """sae.safetensors: a tensor NaN / inf / beyond float32, of another dtype or shape, missing, renamed or extra; its
    header's dtype, shape or offsets changed; its bytes damaged. Sometimes sae.json's d / n_dict fit a new shape."""
    from safetensors.torch import load, save
    state = load(sae_template["sae.safetensors"])
    json_raw = sae_template["sae.json"]
    if data.draw(st.booleans()):
        sd = data.draw(mutated_tensors(state, sorted(state), ["encoder.extra", "decoder.scale", "W_enc", ""]))
        raw = save(sd)
        if data.draw(st.integers(0, 3)) == 0:  # sae.json says the shapes a changed tensor now has
            cfg = json.loads(json_raw)
            w = sd.get("encoder.weight")
            if w is not None and w.dim() == 2:
                cfg["n_dict"], cfg["d"] = w.shape
            json_raw = json.dumps(cfg).encode()
    else:
        raw = data.draw(damaged_safetensors(sae_template["sae.safetensors"]))
    check_sae(str(tmp_path_factory.getbasetemp()), json_raw, raw)


def test_sae_refusals_name_the_tensor(tmp_path):
    """The fixed cases, once each: a NaN weight, an integer tensor, a float64 value beyond float32, d x n_dict too
    large to build, a sae.json nested too deep."""
    from safetensors.torch import load_file, save_file
    from sae import SAE, load_sae, save_sae
    cases = [("nan", lambda sd: sd["decoder.weight"].view(-1).__setitem__(3, NAN), None,
              ["decoder.weight", "non-finite"]),
             ("int", lambda sd: sd.__setitem__("encoder.bias", sd["encoder.bias"].long()), None,
              ["encoder.bias", "torch.int64"]),
             ("f64", lambda sd: sd.__setitem__("encoder.bias", sd["encoder.bias"].double().fill_(1e300)), None,
              ["encoder.bias", "float32"]),
             ("huge", None, dict(d=2 ** 40, n_dict=2 ** 40), ["d 1099511627776", "n_dict 1099511627776"]),
             ("huge2", None, dict(d=10 ** 30), ["d 1000000000000000000000000000000"]),
             ("deep", None, "[" * 5000, ["sae.json", "nested"])]
    for case, change, cfg_change, words in cases:
        folder = str(tmp_path / case)
        save_sae(SAE(D, N_DICT), folder, SAE_CFG)
        if change:
            sd = load_file(os.path.join(folder, "sae.safetensors"))
            change(sd)
            save_file(sd, os.path.join(folder, "sae.safetensors"))
        if isinstance(cfg_change, str):
            open(os.path.join(folder, "sae.json"), "w").write(cfg_change)
        elif cfg_change:
            cfg = json.load(open(os.path.join(folder, "sae.json")))
            open(os.path.join(folder, "sae.json"), "w").write(json.dumps(dict(cfg, **cfg_change)))
        with pytest.raises(ValueError) as e:
            load_sae(folder)
        msg = str(e.value)
        assert "\n" not in msg and folder in msg and all(w in msg for w in words), (case, msg)


# ----------------------------------------------------------------------------- model folders (GPT.from_pretrained)

VOCAB = 300
GPT2_KEYS = ["model_type", "n_embd", "n_layer", "n_head", "n_positions", "vocab_size", "n_inner", "layer_norm_epsilon",
             "activation_function", "tie_word_embeddings", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
             "reorder_and_upcast_attn", "hidden_size", "num_attention_heads", "attn_pdrop", "architectures", "dtype"]
GPT2_BENIGN = ["n_head", "layer_norm_epsilon", "n_inner", "activation_function", "scale_attn_weights", "attn_pdrop",
               "architectures", "dtype", "num_attention_heads", "use_cache"]  # often still a model to load
NEO_KEYS = ["model_type", "num_layers", "hidden_size", "num_heads", "max_position_embeddings", "vocab_size",
            "intermediate_size", "layer_norm_epsilon", "activation_function", "attention_types", "window_size",
            "tie_word_embeddings", "num_attention_heads", "num_hidden_layers"]
NEO_BENIGN = ["num_heads", "layer_norm_epsilon", "intermediate_size", "activation_function", "window_size",
              "attention_dropout", "num_attention_heads", "use_cache"]
ATTENTION_TYPES = [[[["global", "local"], 1]], [[["global"], 2]], [[["local"], 2]], [[["global"], 1], [["local"], 1]],
                   [[["global", "local"], 10 ** 12]], [[["global", "local"], 2 ** 63]], [[["global", "local"], -1]],
                   [[["global", "local"], 1.0]], [[["global", "local"], True]], [[["global", "local"]]],
                   [[["global", "local"], 1, 2]], [[["global", "local", "x"], 1]], [[[], 10 ** 9]], [["global", 2]],
                   [[[1, 2], 1]], [[{"global": 1}, 1]], [[["global", "local"], "1"]], [], [[]], [[[["global"]], 2]]]


def write_tiny(path, neo, safe=True):
    """A random tiny GPT-2 (2 layers, d 16, 2 heads, context 16) or GPT-Neo (global then local layer, window 4),
    vocabulary VOCAB, non-trivial LayerNorms and biases, written by transformers' save_pretrained."""
    import transformers
    torch.manual_seed(0)
    if neo:
        cfg = transformers.GPTNeoConfig(num_layers=2, hidden_size=16, num_heads=2, window_size=4, vocab_size=VOCAB,
                                        attention_types=[[["global", "local"], 1]], max_position_embeddings=16)
        m = transformers.GPTNeoForCausalLM(cfg)
    else:
        cfg = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=16, vocab_size=VOCAB)
        m = transformers.GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "ln" in n or "bias" in n:
                p.add_(0.1 * torch.randn_like(p))
    m.save_pretrained(path)
    if not safe:  # pytorch_model.bin, as transformers < 5 wrote it (transformers 5 writes safetensors only)
        from safetensors.torch import load_file
        torch.save(load_file(os.path.join(path, "model.safetensors")), os.path.join(path, "pytorch_model.bin"))
        os.remove(os.path.join(path, "model.safetensors"))


@pytest.fixture(scope="module")
def model_templates():
    """{kind: {file name: bytes}} for 'gpt2', 'neo' (model.safetensors) and 'gpt2-bin' (pytorch_model.bin)."""
    out = {}
    for kind, neo, safe in (("gpt2", False, True), ("neo", True, True), ("gpt2-bin", False, False)):
        folder = tempfile.mkdtemp(prefix=f"fuzz-{kind}-")
        write_tiny(folder, neo, safe)
        out[kind] = {f: open(os.path.join(folder, f), "rb").read() for f in os.listdir(folder)
                     if f in ("config.json", "model.safetensors", "pytorch_model.bin")}
        shutil.rmtree(folder)
    return out


IDS = torch.tensor([[5, 17, 200, 3, 299, 42, 7, 7, 100, 0, 1, 250]])


def reference_logits(folder):
    """transformers' own load of the folder (float32), or None when it does not load it whole."""
    import transformers
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with time_limit(), torch.no_grad():
            m, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True,
                                                                       dtype=torch.float32)
            if info["missing_keys"] or info["mismatched_keys"] or info["error_msgs"]:
                return None
            return m.eval()(IDS).logits
    except Exception:  # transformers refuses it (we may load it: see check_model)
        event("transformers refuses it")
        return None
    finally:
        transformers.logging.set_verbosity(verbosity)


def check_model(files, parent):
    """GPT.from_pretrained on a folder of these files: one line naming the folder, or the model they say, whose
    logits are finite and those of transformers' load of the same folder."""
    from model import GPT
    with tempfile.TemporaryDirectory(dir=parent) as d:
        for name, raw in files.items():
            with open(os.path.join(d, name), "wb") as f:
                f.write(raw)
        model = outcome(lambda: GPT.from_pretrained(d), d)
        if model is None:
            return None
        said = parse_json(files["config.json"])
        assert said is not None and isinstance(said[1], dict), "a config.json that is not a JSON object was loaded"
        hf, c = said[1], model.config
        neo = hf["model_type"] == "gpt_neo"
        names = dict(n_layer="num_layers", n_embd="hidden_size", n_head="num_heads",
                     n_positions="max_position_embeddings") if neo else {}
        for ours in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size"):
            assert getattr(c, ours) == hf[names.get(ours, ours)], (ours, getattr(c, ours), hf)
        assert c.layer_norm_epsilon == hf.get("layer_norm_epsilon", 1e-5)
        with torch.no_grad():
            logits = model(IDS[:, :min(IDS.shape[1], c.n_positions)] % c.vocab_size)
        if max(p.abs().max().item() for p in model.parameters()) > 1e9:
            return model  # weights near float32's limit may overflow, each implementation its own way
        assert torch.isfinite(logits).all(), "finite weights gave non-finite logits"
        if c.vocab_size == VOCAB and c.n_positions >= IDS.shape[1]:
            ref = reference_logits(d)
            if ref is not None:
                assert torch.allclose(logits, ref, atol=1e-4, rtol=1e-4), (logits - ref).abs().max()
        return model


@fuzz(80)
@given(st.data())
def test_gpt2_config(model_templates, tmp_path_factory, data):
    """A GPT-2's config.json: sizes dropped, swapped, huge, negative, NaN, booleans, strings; the options this GPT-2
    does not implement; aliases (hidden_size for n_embd); the bytes cut short, bad UTF-8, deep nesting."""
    files = dict(model_templates["gpt2"])
    keys = data.draw(st.sampled_from([GPT2_KEYS, GPT2_KEYS, GPT2_BENIGN]))
    obj = data.draw(mutated_dict(json.loads(files["config.json"]), keys))
    files["config.json"] = data.draw(damaged(json.dumps(obj, allow_nan=True).encode(), p_keep=5))
    check_model(files, str(tmp_path_factory.getbasetemp()))


@fuzz(50)
@given(st.data())
def test_neo_config(model_templates, tmp_path_factory, data):
    """A GPT-Neo's config.json: attention_types of every wrong shape (huge counts included), other patterns with and
    without an attention_layers that agrees, window_size, sizes, aliases (num_attention_heads)."""
    files = dict(model_templates["neo"])
    base = json.loads(files["config.json"])
    if data.draw(st.booleans()):
        base["attention_types"] = data.draw(st.sampled_from(ATTENTION_TYPES))
        if data.draw(st.booleans()):  # else attention_layers (which transformers reads) may disagree with it
            del base["attention_layers"]
    keys = data.draw(st.sampled_from([NEO_KEYS, NEO_KEYS, NEO_BENIGN]))
    obj = data.draw(mutated_dict(base, keys, min_ops=0))
    files["config.json"] = json.dumps(obj, allow_nan=True).encode()
    check_model(files, str(tmp_path_factory.getbasetemp()))


@fuzz(80)
@given(st.data())
def test_model_weights(model_templates, tmp_path_factory, data):
    """model.safetensors / pytorch_model.bin: a weight NaN / inf / beyond float32, of another dtype or shape,
    missing, renamed, a layer beyond n_layer, values that are not tensors (.bin); header and bytes damaged."""
    from safetensors.torch import load, save
    import io
    kind = data.draw(st.sampled_from(["gpt2", "gpt2", "neo", "gpt2-bin"]))
    files = dict(model_templates[kind])
    wname = "pytorch_model.bin" if kind == "gpt2-bin" else "model.safetensors"
    raw = files[wname]
    how = data.draw(st.integers(0, 2))
    if how == 2:
        files[wname] = data.draw(damaged_safetensors(raw) if wname.endswith("safetensors") else damaged(raw, p_keep=0))
    else:
        sd = load(raw) if wname.endswith("safetensors") else torch.load(io.BytesIO(raw), weights_only=True)
        names = [k for k in sd if not k.endswith("attn.bias")]
        extra = ["transformer.h.2.ln_1.weight", "transformer.h.9.attn.c_proj.bias", "lm_head.weight", "foo",
                 "transformer.wte", "h.0.ln_1.weight"]
        sd = data.draw(mutated_tensors(sd, names, extra, benign=data.draw(st.integers(0, 2)) == 0))
        if wname.endswith("safetensors"):
            files[wname] = save(sd)
        else:
            if data.draw(st.booleans()):  # values that are not tensors: a .bin may hold any pickled data
                k = data.draw(st.sampled_from(names))
                sd[k] = data.draw(st.sampled_from([1, 2.5, "x", None, [1, 2], {"a": torch.zeros(2)}, (1,)]))
            buf = io.BytesIO()
            torch.save(sd, buf)
            files[wname] = buf.getvalue()
    check_model(files, str(tmp_path_factory.getbasetemp()))


def test_model_refusals(tmp_path):
    """The fixed cases, once each: a NaN weight and a float64 weight beyond float32 (the file and the tensor named),
    attention_types with a huge count (no hang), an untied or unscaled GPT-2, a config.json of a list."""
    from safetensors.torch import load_file, save_file
    from model import GPT

    def nan(f):
        sd = load_file(f)
        sd["transformer.h.1.mlp.c_fc.weight"][0, 3] = NAN
        save_file(sd, f)

    def f64(f):
        sd = load_file(f)
        sd["transformer.ln_f.bias"] = sd["transformer.ln_f.bias"].double().fill_(1e39)
        save_file(sd, f)

    def cfg(**kw):
        def change(f):
            c = json.load(open(f))
            open(f, "w").write(json.dumps(dict(c, **kw)))
        return change
    cases = [("nan", False, "model.safetensors", nan, ["model.safetensors", "transformer.h.1.mlp.c_fc.weight",
                                                        "non-finite weights"]),
             ("f64", False, "model.safetensors", f64, ["model.safetensors", "transformer.ln_f.bias", "float32"]),
             ("types", True, "config.json", cfg(attention_types=[[["global", "local"], 10 ** 12]]),
              ["attention_types"]),
             ("untied", False, "config.json", cfg(tie_word_embeddings=0), ["tie_word_embeddings"]),
             ("unscaled", False, "config.json", cfg(scale_attn_weights=False), ["scale_attn_weights"]),
             ("alias", False, "config.json", cfg(num_attention_heads=4), ["num_attention_heads", "n_head"]),
             ("huge", False, "config.json", cfg(n_embd=2 ** 31, n_head=1), ["n_embd", "parameters"]),
             ("list", False, "config.json", lambda f: open(f, "w").write("[]"), ["config.json", "an array"])]
    for case, neo, name, change, words in cases:
        folder = str(tmp_path / case)
        write_tiny(folder, neo)
        change(os.path.join(folder, name))
        with pytest.raises(ValueError) as e, time_limit():
            GPT.from_pretrained(folder)
        msg = str(e.value)
        assert "\n" not in msg and folder in msg and all(w in msg for w in words), (case, msg)


# ----------------------------------------------------------------------------- datasets (data.load_rows)

CTX = 8
EOT = 50256
_enc = None


def encode(text):
    global _enc
    if _enc is None:
        import tiktoken
        _enc = tiktoken.get_encoding("gpt2")
    return _enc.encode_ordinary(text) + [EOT]


def reference_rows(records):
    """What valid records say, (rows, CTX) int64, or None when one is not valid (or there is not one row): every
    record an object with the first one's column, 'input_ids' a list of integers in 0..65535 or 'text' a string."""
    column, tokens = None, []
    for r in records:
        if not isinstance(r, dict):
            return None
        if column is None:
            column = "input_ids" if "input_ids" in r else "text" if "text" in r else None
        if column is None or column not in r:
            return None
        v = r[column]
        if column == "input_ids":
            if not isinstance(v, list) or not all(type(t) is int and 0 <= t < 2 ** 16 for t in v):
                return None
            tokens += v
        else:
            if not isinstance(v, str):
                return None
            tokens += encode(v)
    n = len(tokens) // CTX
    return np.asarray(tokens[:n * CTX], dtype=np.int64).reshape(n, CTX) if n else None


def jsonl_records(raw):
    """The records of a .jsonl file's bytes as the reference reads them (universal newlines, blank lines
    skipped), or None when the bytes are not UTF-8 JSON lines."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    out = []
    for line in re.split(r"\r\n|\r|\n", text):
        if line.strip():
            try:
                out.append(json.loads(line))
            except (ValueError, RecursionError):
                return None
    return out


def check_rows(path, records):
    """data.load_rows on the file at path (a fresh cache folder): one line naming the file, or the rows records say
    (None: the records are not valid)."""
    import data
    want = None if records is None else reference_rows(records)
    cache = os.path.join(os.path.dirname(path), "cache")
    rows = outcome(lambda: np.array(data.load_rows(path, CTX, cache_dir=cache)), path)
    if rows is None:
        assert want is None, f"valid records ({len(want)} rows) were refused"
        return
    assert want is not None, "invalid records were loaded"
    assert rows.shape == want.shape and (rows.astype(np.int64) == want).all(), "the rows are not the records'"


TEXTS = st.text(max_size=40) | st.sampled_from(["The cat sat. " * 5, "\ud800 lone", "a\r\nb\rc\u2028d\x00e " * 3, ""])
ID_LISTS = st.lists(st.integers(0, 2 ** 16 - 1), min_size=0, max_size=12)


@st.composite
def records_of(draw, column):
    """2-6 valid records of the column, then 0-2 of them damaged (field dropped or renamed, the value swapped for
    another type, one id or the whole list NaN / huge / negative / a boolean / nested), or a record not an object."""
    valid = draw(st.lists(TEXTS if column == "text" else ID_LISTS, min_size=2, max_size=6))
    recs = [{column: v, "meta": i} for i, v in enumerate(valid)]
    if column == "text":  # enough tokens for a row most of the time
        recs[0][column] = recs[0][column] + " the quick brown fox jumps"
    for _ in range(draw(st.integers(0, 2))):
        i = draw(st.integers(0, len(recs) - 1))
        op = draw(st.integers(0, 5))
        if not isinstance(recs[i], dict) or column not in recs[i]:
            continue
        if op == 0:
            recs[i] = {k: v for k, v in recs[i].items() if k != column}
        elif op == 1:
            other = ("input_ids" if column == "text" else "text") if draw(st.booleans()) else "body"
            recs[i] = {other: recs[i][column]}
        elif op == 2:
            recs[i] = value_for(draw, recs[i])
        elif op == 3 and isinstance(recs[i][column], list) and recs[i][column]:
            j = draw(st.integers(0, len(recs[i][column]) - 1))
            recs[i][column][j] = value_for(draw, recs[i][column][j])
        else:
            recs[i][column] = value_for(draw, recs[i][column])
    return recs


@fuzz(100)
@given(st.data())
def test_jsonl(data):
    """A .jsonl of token ids or text: records damaged (records_of), then the bytes: cut short, bad UTF-8, bytes
    flipped or inserted, CRLF, blank lines, a line nested too deep."""
    recs = data.draw(records_of(data.draw(st.sampled_from(["input_ids", "text"]))))
    eol = data.draw(st.sampled_from(["\n", "\r\n", "\n\n", "\n \t\n"]))
    raw = "".join(json.dumps(r, allow_nan=True) + eol for r in recs).encode()
    raw = data.draw(damaged(raw))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "rows.jsonl")
        open(path, "wb").write(raw)
        check_rows(path, jsonl_records(raw))


@fuzz(40)
@given(st.data())
def test_txt(data):
    """A .txt (one document): any text, bytes cut short (mid-character too), bad UTF-8 inserted."""
    text = data.draw(TEXTS) + " the quick brown fox" * data.draw(st.integers(0, 2))
    raw = data.draw(damaged(text.encode("utf-8", "surrogatepass"), p_keep=2))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "doc.txt")
        open(path, "wb").write(raw)
        try:
            records = [{"text": raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")}]  # universal newlines
        except UnicodeDecodeError:
            records = None
        check_rows(path, records)


IDS_ELEMENTS = {"int64": st.integers(-2 ** 63, 2 ** 63 - 1), "int32": st.integers(-2 ** 31, 2 ** 31 - 1),
                "uint16": st.integers(0, 2 ** 16 - 1), "uint64": st.integers(0, 2 ** 64 - 1), "float64": st.floats(),
                "float32": st.floats(width=32), "string": st.text(max_size=4), "bool_": st.booleans()}
TEXT_VALUES = {"string": TEXTS.filter(lambda t: "\ud800" not in t), "large_string": st.text(max_size=30),
               "binary": st.binary(max_size=30), "int64": st.integers(-2 ** 63, 2 ** 63 - 1), "float64": st.floats(),
               "bool_": st.booleans()}


@st.composite
def parquet_column(draw, column):
    """(name, pyarrow array) of 1-6 rows: input_ids as lists of an element type (mostly valid ids when integers, null
    elements or lists now and then), or text of a type (strings mostly), nulls among them."""
    def maybe_null(s, p=8):
        return st.one_of(*[s] * p, st.none())
    if column == "input_ids":
        t = draw(st.sampled_from(sorted(IDS_ELEMENTS)))
        elem = IDS_ELEMENTS[t]
        if t.startswith(("int", "uint")):
            elem = st.one_of(*[st.integers(0, 2 ** 16 - 1)] * 6, elem.filter(lambda v: v >= 0), elem)
        rows = draw(st.lists(maybe_null(st.lists(maybe_null(elem, 30), max_size=12)), min_size=1, max_size=6))
        typ = draw(st.sampled_from([pa_type("list_", t), pa_type("large_list", t)]))
    else:
        t = draw(st.sampled_from(["string", "string", "string"] + sorted(TEXT_VALUES)))
        rows = draw(st.lists(maybe_null(TEXT_VALUES[t]), min_size=1, max_size=6))
        typ = pa_type(None, t)
    import pyarrow as pa
    return column, pa.array(rows, type=typ)


def pa_type(outer, t):
    import pyarrow as pa
    inner = getattr(pa, t)()
    return getattr(pa, outer)(inner) if outer else inner


@fuzz(60)
@given(st.data())
def test_parquet(data):
    """A .parquet: input_ids lists of every element type (negative, beyond uint16 or int64, float with NaN, strings,
    booleans), nulls among them; text as binary, numbers, booleans or null; records as .jsonl's (records_of, mixed
    types, nested objects); then the bytes cut short, flipped or with bytes inserted."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    column = data.draw(st.sampled_from(["input_ids", "text"]))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "rows.parquet")
        if data.draw(st.booleans()):
            name, arr = data.draw(parquet_column(column))
            table = pa.table({name: arr, "meta": pa.array(range(len(arr)))})
        else:
            recs = data.draw(records_of(column))
            try:
                table = pa.Table.from_pylist([r if isinstance(r, dict) else {"value": r} for r in recs])
                pq.write_table(table, path)
            except (pa.ArrowException, TypeError, ValueError, OverflowError):
                assume(False)  # mixed types in a column, an empty struct: pyarrow cannot write these records
        if not os.path.exists(path):
            pq.write_table(table, path)
        raw = open(path, "rb").read()
        bad = data.draw(damaged(raw, p_keep=4))
        open(path, "wb").write(bad)
        try:
            with time_limit():
                records = pq.read_table(path).to_pylist()  # the reference reading of the same bytes
        except Exception:
            records = None
        check_rows(path, records)


def test_data_refusals(tmp_path):
    """The fixed cases, once each: a .jsonl line nested too deep, one with an integer of 5000 digits, a .parquet whose
    footer reads but whose first page does not; each a one-line ValueError naming the file."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import data
    ok = json.dumps({"input_ids": list(range(20))}) + "\n"
    (tmp_path / "deep.jsonl").write_text(ok + "[" * 5000 + "\n")
    (tmp_path / "digits.jsonl").write_text(ok + '{"input_ids": [' + "9" * 5000 + "]}\n")
    pq.write_table(pa.table({"input_ids": [list(range(20))] * 3}), tmp_path / "page.parquet")
    raw = bytearray((tmp_path / "page.parquet").read_bytes())
    raw[4:12] = b"\xff" * 8  # the first page's header, just after the magic
    (tmp_path / "page.parquet").write_bytes(bytes(raw))
    for name, words in (("deep.jsonl", ["line 2", "nested too deep"]), ("digits.jsonl", ["line 2", "4300"]),
                        ("page.parquet", ["not a readable parquet file"])):
        path = str(tmp_path / name)
        with pytest.raises(ValueError) as e:
            data.load_rows(path, 8, cache_dir=str(tmp_path / "cache"))
        msg = str(e.value)
        assert len(msg.splitlines()) == 1 and path in msg and all(w in msg for w in words), (name, msg)
