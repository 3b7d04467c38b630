"""
SAEs in and out of other tools' formats, and to / from the Hugging Face hub.

    python interop.py import-apollo e2e_similar_ce_layer_6.pt out/apollo_e2e_L6   # reads the .yaml beside it
    python interop.py export-saelens out/e2e_ds_L6 export/e2e_ds_L6
    python interop.py import-saelens export/e2e_ds_L6 out/e2e_ds_L6_copy
    python interop.py export-saelens out/e2e_ds_L6 export/e2e_ds_L6 --force       # replace an earlier export whole
    python interop.py push export/e2e_ds_L6 USER/REPO --path_in_repo e2e_ds_L6      # needs a hub token
    python interop.py pull USER/REPO out/pulled --path_in_repo e2e_ds_L6

Every format holds the same function (the paper's shapes, W_e (n_dict, d), W_d (d, n_dict)):
    c = ReLU(W_e x + b_e),   x_hat = D c + b_d,   D = W_d / ‖W_d‖_col

ours     a run folder: sae.safetensors + sae.json (see sae.py); optional firing.safetensors: `freq` (n_dict,)
         fp64, the fraction of tokens on which each feature fired, and string metadata tokens / dataset /
         held_out (eval.py --save_firing writes it).
Apollo   FILE.pt, a state dict with P = blocks-L-hook_resid_pre: P.encoder.0.weight (n_dict, d),
         P.encoder.0.bias (n_dict,), P.decoder.weight (d, n_dict) raw, not unit norm, P.decoder.bias (d,);
         FILE.yaml, its training config (saes.sae_positions, tlens_model_name, train_data, loss); without it
         d_model 768 means GPT-2 small and 64 TinyStories-1M. It expects the centred residual (TransformerLens's
         default). Decoder columns are normalised on import.
SAELens  a folder: cfg.json + sae_weights.safetensors, architecture `standard`, row vectors:
         W_enc = W_eᵀ (d, n_dict), b_enc = b_e, W_dec = Dᵀ (n_dict, d), b_dec = b_d, apply_b_dec_to_input false;
         sparsity.safetensors: `sparsity` = log10(freq + 1e-10), SAELens's convention (dead features: -10).
         The centring is metadata.model_from_pretrained_kwargs.center_writing_weights (default true). The model
         and hook names are TransformerLens's: gpt2 or roneneldan/TinyStories-1M, blocks.L.hook_resid_pre.
Every reader refuses in one line, naming the file and the field, key or tensor, what it cannot load exactly: a
file cut short or not UTF-8; a config that is not a mapping, or a field of another type or an invalid value (n_ctx,
context_size, coefficients < 0, d_in / d_sae that disagree with the weights, apply_b_dec_to_input not a boolean);
unexpected keys; tensors of another shape or dtype; NaN, inf or values beyond fp32; a decoder column (SAELens: row)
of zeros, which has no direction. tests/test_fuzz_interop.py mutates valid files to hold the readers to that.
Imports and exports write a new folder, or replace an empty one; a folder with files in it only with --force,
which replaces it whole (written beside it, then swapped in: no file of the old folder remains), but never a run
folder that a running train.py holds (its .train.lock, lock_holder).
A SAELens SAE with W_dec rows of norm n ≠ 1 imports exactly by folding n into the encoder
(ReLU(z) n = ReLU(z n) for n > 0), as SAELens's fold_W_dec_norm=True: the same x_hat, the feature
activations scaled by n; apply_b_dec_to_input true folds into b_e = b_enc − W_encᵀ b_dec.
"""
import argparse
import json
import os
import re
import sys
import warnings

import torch

from cli import first_line, nonempty, one_line_errors, read_json
from files import check_target, lock_holder, replace_dir, write_bytes, write_error
from sae import SAE, load_sae, save_firing, save_sae, save_tensors
from source_checks import BOOL, NONNEG, POS_INT, TEXT, check_columns, check_finite, check_run_args, check_state_values, field, json_safe, kind, mapping, read_text, shown

APOLLO_DATASET = "apollo-research/Skylion007-openwebtext-tokenizer-gpt2"
TLENS_NAMES = {"gpt2-small": "gpt2", "tiny-stories-1M": "roneneldan/TinyStories-1M"}  # TransformerLens aliases -> ours
# an Apollo .pt without its .yaml: the model, data and ctx of the paper's runs, told apart by d_model
APOLLO_BY_D = {768: ("gpt2", APOLLO_DATASET, 1024),
               64: ("roneneldan/TinyStories-1M", "apollo-research/roneneldan-TinyStories-tokenizer-gpt2", 512)}
EPS = 1e-10  # SAELens's offset inside log10(freq + EPS)


def hook_layer(name):
    """L from 'blocks.L.hook_resid_pre' (TransformerLens) or 'blocks-L-hook_resid_pre' (Apollo's keys)."""
    m = re.fullmatch(r"blocks[.-](\d+)[.-]hook_resid_pre", str(name))
    if m is None:
        raise ValueError(f"SAE position {name!r} is not the residual stream entering a block "
                         "(blocks.L.hook_resid_pre); only those are supported")
    return int(m.group(1))


def sae_from(W_e, b_e, W_d, b_d, where="the SAE"):
    """An SAE holding exactly these tensors (paper shapes), as fp32; ValueError (one line, starting with where)
    unless the shapes agree, every value is finite in fp32 and every decoder column can be normalised."""
    if W_e.dim() != 2 or tuple(b_e.shape) != W_e.shape[:1] or tuple(W_d.shape) != tuple(W_e.shape)[::-1] \
            or tuple(b_d.shape) != W_e.shape[1:] or W_e.numel() == 0:
        raise ValueError(f"{where}: inconsistent SAE shapes: W_e {tuple(W_e.shape)}, b_e {tuple(b_e.shape)}, "
                         f"W_d {tuple(W_d.shape)}, b_d {tuple(b_d.shape)}")
    n_dict, d = W_e.shape
    state = {"encoder.weight": W_e.float(), "encoder.bias": b_e.float(), "decoder.weight": W_d.float(),
             "decoder.bias": b_d.float()}
    check_state_values(state, where)
    sae = SAE(d, n_dict)
    sae.load_state_dict(state)
    return sae


# ----------------------------------------------------------------------------- firing frequencies

def load_firing(path):
    """dict(freq (n_dict,) fp64, tokens int or None, and the other metadata) from a run folder's
    firing.safetensors or a SAELens folder's sparsity.safetensors; None when there is neither."""
    from safetensors import safe_open
    for name, key in (("firing.safetensors", "freq"), ("sparsity.safetensors", "sparsity")):
        f = os.path.join(path, name) if os.path.isdir(path) else None
        if f and os.path.isfile(f):
            try:
                with safe_open(f, "pt") as st:
                    meta, t = dict(st.metadata() or {}), st.get_tensor(key).double()
            except Exception as e:  # SafetensorError (a header cut short), no such tensor
                raise ValueError(f"{f!r} is not a readable firing file ({type(e).__name__}: "
                                 f"{first_line(e)}); move it away to use every feature") from None
            if t.dim() != 1 or not torch.isfinite(t).all():
                raise ValueError(f"{f!r}: tensor {key} is not a finite vector (shape {tuple(t.shape)}); move it away "
                                 "to use every feature, or write a new one with `python eval.py SRC --save_firing`")
            if key == "sparsity":  # log10(freq + EPS); a dead feature reads -10
                t = (10 ** t - EPS).clamp_min(0)
            if (t < 0).any() or (t > 1 + 1e-5).any():
                raise ValueError(f"{f!r}: tensor {key} holds firing frequencies outside [0, 1] (e.g. "
                                 f"{t[(t < 0) | (t > 1 + 1e-5)][0].item():.4g}); move it away, or write a new one with "
                                 "`python eval.py SRC --save_firing`")
            tokens = meta.pop("tokens", None)
            return dict(meta, freq=t, tokens=int(tokens) if tokens and tokens.isdigit() else None, file=f)
    return None


# ----------------------------------------------------------------------------- Apollo's release

APOLLO_PARTS = ("encoder.0.weight", "encoder.0.bias", "decoder.weight", "decoder.bias")
APOLLO_KEY = re.compile(r"(blocks-\d+-hook_resid_pre)\.(" + "|".join(re.escape(p) for p in APOLLO_PARTS) + ")")
APOLLO_LAYOUT = "exactly the 4 tensors blocks-L-hook_resid_pre.{" + ", ".join(APOLLO_PARTS) + "} of one L"


def read_apollo_yaml(yaml_path):
    """The .yaml beside an Apollo .pt as a dict; ValueError naming the file unless it is a YAML mapping."""
    import yaml
    text = read_text(yaml_path, "Apollo's YAML training config")
    try:
        conf = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ValueError(f"{yaml_path!r} is not valid YAML ({getattr(e, 'problem', None) or type(e).__name__}{at})") \
            from None
    except RecursionError:
        raise ValueError(f"{yaml_path!r} is not Apollo's training config (lists or mappings nested too deep)") from None
    except ValueError as e:  # a YAML integer of more digits than Python converts
        raise ValueError(f"{yaml_path!r} is not Apollo's training config ({first_line(e)[:100]})") from None
    if conf is None:
        return {}
    if not isinstance(conf, dict):
        raise ValueError(f"{yaml_path!r} holds {kind(conf)} ({shown(conf)}), not the mapping of Apollo's training "
                         "config")
    return conf


def read_apollo(path):
    """(SAE, cfg) from an Apollo e2e_sae .pt, with its .yaml config when one lies beside it; ValueError (one line,
    naming the file and the key or tensor) for anything else."""
    try:
        with warnings.catch_warnings():  # a damaged file's pickle protocol, ...: the one line below says enough
            warnings.simplefilter("ignore")
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path!r} is not a readable state dict ({type(e).__name__}: {first_line(e)[:120]})") from None
    if not isinstance(sd, dict):
        raise ValueError(f"{path!r} holds {kind(sd)}, not a state dict; expected {APOLLO_LAYOUT}")
    if not sd:
        raise ValueError(f"{path!r} holds an empty state dict; expected {APOLLO_LAYOUT}")
    odd = [k for k in sd if not (isinstance(k, str) and APOLLO_KEY.fullmatch(k))]
    if odd:
        more = f" and {len(odd) - 1} other unexpected key(s)" if len(odd) > 1 else ""
        raise ValueError(f"{path!r} holds key {shown(odd[0])}{more}; expected {APOLLO_LAYOUT} (Apollo e2e_sae's "
                         "layout)")
    prefixes = sorted({APOLLO_KEY.fullmatch(k).group(1) for k in sd})
    if len(prefixes) != 1:
        raise ValueError(f"{path!r} holds SAEs at {prefixes}; expected exactly one position")
    P = prefixes[0]
    need = [f"{P}.{p}" for p in APOLLO_PARTS]
    if any(k not in sd for k in need):
        raise ValueError(f"{path!r} lacks {[k for k in need if k not in sd]}; expected {APOLLO_LAYOUT}")
    odd = next((k for k in need if not isinstance(sd[k], torch.Tensor)), None)
    if odd:
        raise ValueError(f"{path!r}: {odd} is {kind(sd[odd])}, not a tensor")
    W_e, b_e, W_d, b_d = (sd[k] for k in need)
    check_finite(dict(zip(need, (W_e, b_e, W_d, b_d))), repr(path))
    if W_e.dim() != 2 or W_d.dim() != 2 or b_e.dim() != 1 or b_d.dim() != 1:
        raise ValueError(f"{path!r}: tensors of {[tuple(t.shape) for t in (W_e, b_e, W_d, b_d)]} dims; expected "
                         "encoder.0.weight (n_dict, d), encoder.0.bias (n_dict,), decoder.weight (d, n_dict), "
                         "decoder.bias (d,)")
    layer = hook_layer(P)
    yaml_path, conf = os.path.splitext(path)[0] + ".yaml", {}
    if os.path.isfile(yaml_path):
        conf = read_apollo_yaml(yaml_path)
    else:
        print(f"interop.py: note: no {yaml_path}; layer {layer} read from the weight names", file=sys.stderr)
    where = repr(yaml_path)
    saes = mapping(conf.get("saes"), where, "saes")
    pos = saes.get("sae_positions")
    pos = pos[0] if isinstance(pos, list) and len(pos) == 1 else pos
    if pos is not None:
        try:
            if hook_layer(pos) != layer:
                raise ValueError(f"says sae_positions {pos!r}, but the weights are for {P}")
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    model_name = field(conf, "tlens_model_name", where, TEXT)
    loss_conf = mapping(conf.get("loss"), where, "loss")
    data = mapping(conf.get("train_data"), where, "train_data")
    kl_coeff = field(mapping(loss_conf.get("logits_kl"), where, "loss.logits_kl"), "coeff", where, NONNEG,
                      "loss.logits_kl.coeff")
    in_to_orig = mapping(loss_conf.get("in_to_orig"), where, "loss.in_to_orig")
    ds_coeff = field(in_to_orig, "total_coeff", where, NONNEG, "loss.in_to_orig.total_coeff")
    l1 = field(mapping(loss_conf.get("sparsity"), where, "loss.sparsity"), "coeff", where, NONNEG,
                "loss.sparsity.coeff")
    n_ctx = field(data, "n_ctx", where, POS_INT, "train_data.n_ctx")
    dataset_name = field(data, "dataset_name", where, TEXT, "train_data.dataset_name")
    check_columns(W_d, repr(path), f"{P}.decoder.weight", dtype=torch.float64)
    W_d = W_d.double()
    W_d = W_d / W_d.norm(dim=0, keepdim=True)  # the release stores raw columns; the SAE uses unit ones (fp64: exact)
    sae = sae_from(W_e, b_e, W_d, b_d, repr(path))
    if loss_conf:
        ds = in_to_orig and (ds_coeff is None or ds_coeff > 0)  # a downstream term that counts
        loss = ("e2e_ds" if ds else "e2e") if (kl_coeff or 0) > 0 else "local"
    else:  # the release's file names: {local,e2e,downstream}_similar_{ce,l0}_layer_L.pt
        stem = os.path.basename(path)
        loss = next((k for p, k in (("downstream", "e2e_ds"), ("e2e", "e2e"), ("local", "local")) if stem.startswith(p)), "unknown")
    model, dataset, ctx = APOLLO_BY_D.get(sae.d, APOLLO_BY_D[768])
    model = model_name or model
    cfg = dict(layer=layer, model=TLENS_NAMES.get(model, model), center=True, loss=loss, l1=l1,
               args=dict(dataset=dataset_name or dataset, ctx=n_ctx or ctx),
               imported_from=dict(format="apollo", path=os.path.abspath(path), config=json_safe(conf)))
    return sae, cfg


# ----------------------------------------------------------------------------- SAELens

def write_saelens(sae, cfg, out_dir, firing=None):
    """cfg.json + sae_weights.safetensors (+ sparsity.safetensors when firing = dict(freq, tokens))."""
    os.makedirs(out_dir, exist_ok=True)
    args = {k: v for k, v in cfg.get("args", {}).items() if k not in ("out_dir", "data_dir")}  # paths of this machine
    meta = dict(sae_lens_version="6.0.0", model_name=cfg["model"], hook_name=f"blocks.{cfg['layer']}.hook_resid_pre",
                hook_head_index=None, context_size=args.get("ctx", 1024), prepend_bos=False,
                dataset_path=args.get("dataset"), model_from_pretrained_kwargs=dict(center_writing_weights=cfg["center"]),
                nanosae=json_safe(dict(loss=cfg.get("loss"), l1=cfg.get("l1", args.get("l1")), args=args)))
    out = dict(architecture="standard", d_in=sae.d, d_sae=sae.n_dict, dtype="float32", device="cpu",
               apply_b_dec_to_input=False, normalize_activations="none", reshape_activations="none", metadata=meta)
    with torch.no_grad():
        tensors = {"W_enc": sae.encoder.weight.t(), "b_enc": sae.encoder.bias,       # (d, n_dict), (n_dict,)
                   "W_dec": sae.dict_elements().t(), "b_dec": sae.decoder.bias}      # (n_dict, d), (d,)
        save_tensors({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()},
                     os.path.join(out_dir, "sae_weights.safetensors"))
    write_bytes(os.path.join(out_dir, "cfg.json"), json.dumps(out, indent=2).encode())
    if firing is not None:
        sparsity = torch.log10(firing["freq"].double() + EPS).float()
        save_tensors({"sparsity": sparsity}, os.path.join(out_dir, "sparsity.safetensors"),
                     metadata={"tokens": str(firing.get("tokens"))})


def read_saelens_cfg(path):
    """A SAELens folder's cfg.json as a dict; ValueError naming the file unless it is a JSON object."""
    f = os.path.join(path, "cfg.json")
    conf = read_json(f, "a SAELens config", repr(f))
    if not isinstance(conf, dict):
        raise ValueError(f"{f!r} holds {kind(conf)} ({shown(conf)}), not the JSON object of a SAELens config")
    return conf


def read_saelens(path):
    """(SAE, cfg) from a SAELens folder of architecture standard on blocks.L.hook_resid_pre; ValueError (one line,
    naming the file and the field or tensor) for anything else."""
    from safetensors.torch import load_file
    conf, where = read_saelens_cfg(path), repr(os.path.join(path, "cfg.json"))
    if "metadata" in conf:
        meta = mapping(conf["metadata"], where, "metadata") or conf
    else:
        meta = conf  # pre-v6 configs keep these fields at the top level
    if conf.get("architecture", "standard") != "standard":
        raise ValueError(f"{path!r} has architecture {shown(conf['architecture'])}; only 'standard' (ReLU) is "
                         "supported")
    if conf.get("normalize_activations", "none") not in ("none", None):
        raise ValueError(f"{path!r} uses normalize_activations {shown(conf['normalize_activations'])}; only 'none' is "
                         "supported")
    try:
        layer = hook_layer(meta.get("hook_name"))
    except ValueError as e:
        raise ValueError(f"{where}: hook_name: {e}") from None
    apply_b_dec = field(conf, "apply_b_dec_to_input", where, BOOL)
    d_in, d_sae = (field(conf, k, where, POS_INT) for k in ("d_in", "d_sae"))
    model = field(meta, "model_name", where, TEXT) or "gpt2"
    dataset = field(meta, "dataset_path", where, TEXT)
    ctx = field(meta, "context_size", where, POS_INT)
    kwargs = mapping(meta.get("model_from_pretrained_kwargs"), where, "model_from_pretrained_kwargs")
    center = field(kwargs, "center_writing_weights", where, BOOL,
                    "model_from_pretrained_kwargs.center_writing_weights")
    ours = mapping(meta.get("nanosae"), where, "nanosae")
    loss = field(ours, "loss", where, TEXT, "nanosae.loss")
    l1 = field(ours, "l1", where, NONNEG, "nanosae.l1")
    args = dict(mapping(ours.get("args"), where, "nanosae.args"))
    wfile = os.path.join(path, "sae_weights.safetensors")
    try:
        w = load_file(wfile)
    except Exception as e:  # missing, a header cut short, a tensor past the end
        raise ValueError(f"{wfile!r} is not a readable safetensors file ({type(e).__name__}: "
                         f"{first_line(e)[:120]})") from None
    names = ("W_enc", "b_enc", "W_dec", "b_dec")
    missing = [k for k in names if k not in w]
    if missing:
        raise ValueError(f"{wfile!r} lacks tensor(s) {missing}; a standard SAELens SAE has W_enc, b_enc, W_dec, b_dec")
    check_finite({k: w[k] for k in names}, repr(wfile))
    W_enc, b_enc, W_dec, b_dec = (w[k].float() for k in names)
    shapes = {k: tuple(w[k].shape) for k in names}
    d, n = W_enc.shape if W_enc.dim() == 2 else (None, None)
    if d is None or d * n == 0 or shapes != dict(W_enc=(d, n), b_enc=(n,), W_dec=(n, d), b_dec=(d,)):
        raise ValueError(f"{wfile!r}: inconsistent shapes {', '.join(f'{k} {v}' for k, v in shapes.items())}; expected "
                         "W_enc (d_in, d_sae), b_enc (d_sae,), W_dec (d_sae, d_in), b_dec (d_in,)")
    for key, want, have in (("d_in", d_in, d), ("d_sae", d_sae, n)):
        if want is not None and want != have:
            raise ValueError(f"{where}: {key} is {want}, but {wfile!r} holds W_enc of shape {shapes['W_enc']} "
                             f"({key} {have})")
    check_columns(W_dec, repr(wfile), "W_dec", dim=1, what="row", dtype=torch.float64)
    if apply_b_dec:
        b_enc = b_enc - b_dec @ W_enc              # relu((x - b_dec) W_enc + b_enc) = relu(x W_enc + b_enc - b_dec W_enc)
    n_ = W_dec.double().norm(dim=1)                # (n_dict,), fp64: no overflow or underflow of a float32 row
    if (n_ - 1).abs().max() > 1e-5:                # not unit norm: move the norms into the encoder, exactly
        W_enc, b_enc, W_dec = W_enc * n_, b_enc * n_, W_dec.double() / n_[:, None]
    folded = [what for what, done in (("b_dec (apply_b_dec_to_input)", apply_b_dec),
                                      ("W_dec's row norms", W_dec.dtype == torch.float64)) if done]
    sae = sae_from(W_enc.t(), b_enc, W_dec.t(), b_dec, repr(wfile) + (
        f" (after folding {' and '.join(folded)} into the encoder)" if folded else ""))
    args.update(dataset=dataset or args.get("dataset") or APOLLO_DATASET, ctx=ctx or args.get("ctx") or 1024)
    cfg = dict(layer=layer, model=TLENS_NAMES.get(model, model), center=center if center is not None else True,
               loss=loss or "unknown", l1=l1, args=args,
               imported_from=dict(format="saelens", path=os.path.abspath(path), config=conf))
    return sae, cfg


# ----------------------------------------------------------------------------- any source

def source_format(path):
    """'run', 'saelens' or 'apollo' for a path, or a ValueError naming what is allowed."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "sae.json")):
        return "run"
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "cfg.json")):
        return "saelens"
    if os.path.isfile(path) and path.endswith(".pt"):
        return "apollo"
    if not os.path.lexists(path):
        raise ValueError(f"{path!r} does not exist: give a run folder (sae.json), a SAELens folder or an Apollo .pt")
    raise ValueError(f"{path!r} holds no saved SAE: expected a run folder (sae.json), a SAELens folder "
                     "(cfg.json + sae_weights.safetensors) or an Apollo .pt file")


def load_any(path, device="cpu"):
    """(SAE, cfg, firing or None) from a run folder, a SAELens folder or an Apollo .pt; cfg as in sae.json
    plus cfg['format']."""
    fmt = source_format(path)
    if fmt == "run":
        sae, cfg = load_sae(path)
        check_state_values(sae.state_dict(), repr(os.path.join(path, "sae.safetensors")))
    else:
        sae, cfg = (read_saelens if fmt == "saelens" else read_apollo)(path)
    check_run_args(cfg.get("args"), path, fmt)
    firing = load_firing(path) if fmt != "apollo" else None
    if firing is not None and len(firing["freq"]) != sae.n_dict:  # a stale file, e.g. of an earlier SAE
        print(f"interop.py: note: {firing['file']} has {len(firing['freq'])} entries, not the SAE's {sae.n_dict} "
              "features; ignored (`python eval.py SRC --save_firing` writes a new one)", file=sys.stderr)
        firing = None
    return sae.to(device), dict(cfg, format=fmt), firing


def save_run(sae, cfg, firing, out_dir):
    """A run folder: sae.safetensors + sae.json, and firing.safetensors if firing is given."""
    save_sae(sae, out_dir, cfg)
    if firing is not None:
        save_firing(out_dir, firing["freq"], firing["tokens"], source=firing["file"])


# ----------------------------------------------------------------------------- hub

def push(folder, repo, path_in_repo=None, private=False):
    """Upload a folder (a SAELens export or a run folder) to a Hugging Face model repo."""
    from huggingface_hub import HfApi
    api = HfApi()
    api.create_repo(repo, exist_ok=True, private=private)
    return api.upload_folder(folder_path=folder, repo_id=repo, path_in_repo=path_in_repo or "",
                             ignore_patterns=["ckpt.pt", "*.tmp", ".train.lock"])


def pull(repo, out_dir, path_in_repo=None):
    """Download a folder of a Hugging Face model repo into out_dir; returns the SAE's folder."""
    from huggingface_hub import snapshot_download
    pattern = [f"{path_in_repo.strip('/')}/*"] if path_in_repo else None
    root = snapshot_download(repo, local_dir=out_dir, allow_patterns=pattern)
    return os.path.join(root, path_in_repo) if path_in_repo else root


def main(argv=None):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(description="Convert SAEs between this project's run folders, Apollo's "
                                     "release and SAELens, and move them to / from the Hugging Face hub.", formatter_class=fmt)
    one_line_errors(parser, "interop.py")
    sub = parser.add_subparsers(dest="cmd", required=True)
    for cmd, what, src, out in (("import-apollo", "an Apollo .pt (+ .yaml) -> a run folder",
                                 "an Apollo .pt (its .yaml beside it is read too)", "the run folder to write"),
                                ("import-saelens", "a SAELens folder -> a run folder",
                                 "a SAELens folder (cfg.json + sae_weights.safetensors)", "the run folder to write"),
                                ("export-saelens", "a run folder (or any source) -> a SAELens folder",
                                 "a run folder, a SAELens folder or an Apollo .pt", "the SAELens folder to write")):
        p = sub.add_parser(cmd, help=what, formatter_class=fmt)
        p.add_argument("src", type=nonempty, help=src)
        p.add_argument("out_dir", type=nonempty, help=out + " (missing or empty)")
        p.add_argument("--force", action="store_true", help="replace a non-empty out_dir whole (nothing of it remains)")
    p = sub.add_parser("push", help="upload a folder to a hub model repo", formatter_class=fmt)
    p.add_argument("folder", type=nonempty, help="the folder to upload (ckpt.pt and temp files are left out)")
    p.add_argument("repo", type=nonempty, help="hub model repo, USER/NAME (created if missing)")
    p.add_argument("--path_in_repo", type=nonempty, default=None,
                   help="put the files in this folder of the repo; if unset, its root")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p = sub.add_parser("pull", help="download a hub repo (or one folder of it)", formatter_class=fmt)
    p.add_argument("repo", type=nonempty, help="hub model repo, USER/NAME")
    p.add_argument("out_dir", type=nonempty, help="where to download it")
    p.add_argument("--path_in_repo", type=nonempty, default=None,
                   help="download only this folder of the repo; if unset, all of it")
    for p in sub.choices.values():
        p.error = parser.error
    args = parser.parse_args(argv)
    try:
        if args.cmd in ("import-apollo", "import-saelens", "export-saelens"):
            if not os.path.exists(args.src):
                raise ValueError(f"{args.src!r} does not exist")
            want = {"import-apollo": "apollo", "import-saelens": "saelens"}.get(args.cmd)
            if want and source_format(args.src) != want:
                raise ValueError(f"{args.src!r} is a {source_format(args.src)} source, not {want}")
            out, src = os.path.realpath(args.out_dir), os.path.realpath(args.src)
            if out == src or src.startswith(out + os.sep):
                raise ValueError(f"{args.out_dir!r} holds the source {args.src!r}; write to another folder")
            holder = lock_holder(args.out_dir) if os.path.isdir(args.out_dir) else None
            if holder:
                raise ValueError(f"{args.out_dir!r} is the run folder of a running {holder}; wait for it to end (or "
                                 "stop it), or choose another folder")
            check_target(args.out_dir, args.force)  # before the work: refused at once
            sae, cfg, firing = load_any(args.src)
            cfg.pop("format")
            if args.cmd == "export-saelens":
                replace_dir(args.out_dir, lambda tmp: write_saelens(sae, cfg, tmp, firing if firing and "freq" in firing
                                                                    else None), force=args.force)
                note = "" if firing else " (no firing.safetensors in the source: no sparsity.safetensors; " \
                                         "write one with `python eval.py SRC --save_firing`)"
                print(f"wrote SAELens folder {args.out_dir}{note}")
            else:
                replace_dir(args.out_dir, lambda tmp: save_run(sae, cfg, firing, tmp), force=args.force)
                print(f"wrote run folder {args.out_dir} (layer {cfg['layer']}, loss {cfg['loss']}, center {cfg['center']})")
        elif args.cmd == "push":
            if not os.path.isdir(args.folder):
                raise ValueError(f"folder {args.folder!r} does not exist")
            print(push(args.folder, args.repo, args.path_in_repo, args.private))
        else:
            print(pull(args.repo, args.out_dir, args.path_in_repo))
    except ValueError as e:
        sys.exit(f"interop.py: error: {e}")
    except KeyboardInterrupt:  # replace_dir has removed what it wrote
        sys.exit(f"interop.py: {args.cmd} interrupted; nothing was written")
    except OSError as e:
        if args.cmd not in ("push", "pull"):
            sys.exit(f"interop.py: error: {write_error(e)}; nothing was written")
        sys.exit(f"interop.py: error: {args.cmd} failed ({type(e).__name__}: {first_line(e)})")
    except Exception as e:  # files, hub (offline, no token, unknown repo): one line, not a traceback
        sys.exit(f"interop.py: error: {args.cmd} failed ({type(e).__name__}: {first_line(e)})")


if __name__ == "__main__":
    main()
