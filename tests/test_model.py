import pytest
import torch

from model import GPT
from conftest import write_tiny_gpt2, write_tiny_gpt_neo


@pytest.fixture(scope="module")
def hf_and_idx(tiny_model_dir):
    from transformers import GPT2LMHeadModel
    hf = GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    idx = torch.randint(0, 50257, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(idx).logits
    return ref, idx


@pytest.mark.parametrize("center", [False, True])
def test_logits_match_transformers(tiny_model_dir, hf_and_idx, center):
    ref, idx = hf_and_idx
    model = GPT.from_pretrained(tiny_model_dir, center=center)
    with torch.no_grad():
        logits = model(idx)
    assert logits.shape == ref.shape  # full (B, T, V) logits
    assert (logits - ref).abs().max().item() <= 1e-5


def test_pytorch_model_bin_and_unprefixed_keys(tmp_path, hf_and_idx):
    """The hub's gpt2 stores keys without 'transformer.' and ships pytorch_model.bin; both load."""
    import torch as t
    from safetensors.torch import load_file
    ref, idx = hf_and_idx
    d = tmp_path / "m"
    write_tiny_gpt2(str(d))
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    t.save({k.removeprefix("transformer."): v for k, v in sd.items()}, str(d / "pytorch_model.bin"))
    with torch.no_grad():
        logits = GPT.from_pretrained(str(d))(idx)
    assert (logits - ref).abs().max().item() <= 1e-5


def test_centring_makes_residual_mean_zero(tiny_model_dir, hf_and_idx):
    _, idx = hf_and_idx
    centred, plain = GPT.from_pretrained(tiny_model_dir), GPT.from_pretrained(tiny_model_dir, center=False)
    with torch.no_grad():
        for L in range(centred.config.n_layer + 1):
            x = centred.forward_to_layer(idx, L)
            assert x.mean(-1).abs().max().item() < 1e-6
        assert plain.forward_to_layer(idx, 1).mean(-1).abs().max().item() > 1e-4  # it did something
    # wte stays the uncentred unembedding, tied; its rows are centred as they are looked up
    assert centred.lm_head.weight is centred.transformer.wte.weight
    assert torch.equal(centred.transformer.wte.weight, plain.transformer.wte.weight)
    tok = centred.transformer.wte.weight[idx]
    pos = centred.transformer.wpe.weight[:idx.size(1)]
    assert torch.allclose(centred.forward_to_layer(idx, 0), tok - tok.mean(-1, keepdim=True) + pos, atol=1e-7)


def test_splice_identity_every_layer(tiny_model_dir, hf_and_idx):
    _, idx = hf_and_idx
    model = GPT.from_pretrained(tiny_model_dir)
    n_layer = model.config.n_layer
    with torch.no_grad():
        full = model(idx)
        for L in range(n_layer):
            x = model.forward_to_layer(idx, L)
            logits, resids = model.forward_from_layer(x, L)
            assert torch.equal(logits, full)
            assert len(resids) == n_layer - L
            for k, r in zip(range(L + 1, n_layer), resids):  # resids[i] enters block L+1+i
                assert torch.equal(r, model.forward_to_layer(idx, k))
            none, _ = model.forward_from_layer(x, L, logits=False)
            assert none is None


def test_weights_frozen(tiny_model_dir):
    model = GPT.from_pretrained(tiny_model_dir)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_bad_model_inputs(tmp_path, tiny_model_dir):
    with pytest.raises(ValueError, match="does not exist"):
        GPT.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no config.json"):
        GPT.from_pretrained(str(tmp_path))
    import json, shutil
    bad = tmp_path / "bert"
    shutil.copytree(tiny_model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="bert")))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        GPT.from_pretrained(str(bad))
    model = GPT.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="above the model's context"):
        model.forward_to_layer(torch.zeros(1, 65, dtype=torch.long), 0)


# ----------------------------------------------------------------------------- GPT-Neo (TinyStories-1M's shape)

@pytest.fixture(scope="module")
def neo_ref(neo_model_dir):
    """transformers' logits at ctx 512 (twice the local window) on the random TinyStories-shaped GPT-Neo."""
    from transformers import GPTNeoForCausalLM
    hf = GPTNeoForCausalLM.from_pretrained(neo_model_dir).eval()
    idx = torch.randint(0, 50257, (1, 512), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(idx).logits
    return ref, idx


@pytest.mark.parametrize("center", [False, True])
def test_gpt_neo_logits_match_transformers(neo_model_dir, neo_ref, center):
    ref, idx = neo_ref
    model = GPT.from_pretrained(neo_model_dir, center=center)
    c = model.config
    assert (c.n_layer, c.n_embd, c.n_head, c.window_size, c.qkv_bias, c.scale_attn) == (8, 64, 16, 256, False, False)
    assert c.attention_layers == ("global", "local") * 4
    assert [b.attn.window for b in model.transformer.h] == [None, 256] * 4
    with torch.no_grad():
        logits = model(idx)
        assert logits.shape == ref.shape
        assert (logits - ref).abs().max().item() <= 1e-4
        for b in model.transformer.h[1::2]:  # the check sees the window: one key more or less is a failure
            b.attn.window = 257
        assert (model(idx) - ref).abs().max().item() > 1e-4


def test_gpt_neo_splice_identity_and_centring(neo_model_dir, neo_ref):
    _, idx = neo_ref
    model = GPT.from_pretrained(neo_model_dir)
    n_layer = model.config.n_layer
    with torch.no_grad():
        full = model(idx)
        logits, _ = model.forward_from_layer(model.forward_to_layer(idx, 4), 4)
        assert torch.equal(logits, full)
        idx = idx[:, :300]  # still past the window; every layer
        clean = [model.forward_to_layer(idx, 0)]
        for block in model.transformer.h:
            clean.append(block(clean[-1]))
        for L in range(n_layer):
            x = model.forward_to_layer(idx, L)
            assert torch.equal(x, clean[L])
            assert x.mean(-1).abs().max().item() < 1e-5  # centred residual (TransformerLens's GPT-Neo processing)
            none, resids = model.forward_from_layer(x, L, logits=False)
            assert none is None and len(resids) == n_layer - L
            for r, c in zip(resids, clean[L + 1:]):
                assert torch.equal(r, c)
    assert model.lm_head.weight is model.transformer.wte.weight and not any(p.requires_grad for p in model.parameters())


def test_gpt_neo_pytorch_model_bin_with_old_buffers(tmp_path):
    """An older GPT-Neo checkpoint: pytorch_model.bin, with the attention mask buffers saved among the weights."""
    from safetensors.torch import load_file
    d = tmp_path / "neo"
    hf = write_tiny_gpt_neo(str(d), seed=1).eval()
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    sd.update({f"transformer.h.{i}.attn.attention.bias": torch.ones(1, 1, 4, 4, dtype=torch.bool) for i in range(8)})
    torch.save(sd, str(d / "pytorch_model.bin"))
    idx = torch.randint(0, 50257, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (GPT.from_pretrained(str(d))(idx) - hf(idx).logits).abs().max().item() <= 1e-4


def test_gpt_neo_bad_configs(tmp_path, neo_model_dir):
    import json, shutil
    cfg = json.loads(open(f"{neo_model_dir}/config.json").read())
    for change, words in ((dict(model_type="llama"), "model_type 'llama'; supported: 'gpt2', 'gpt_neo'"),
                          (dict(attention_types=[[["global", "sparse"], 4]]), "attention type 'sparse'; only 'global' and 'local'"),
                          (dict(attention_types=[[["global", "local"], 3]]), "give 6 layers, num_layers is 8"),
                          (dict(activation_function="relu"), "activation 'relu'; only the tanh GELU"),
                          (dict(tie_word_embeddings=False), "untied"),
                          (dict(num_heads=5), "not a multiple of its 5 heads")):
        bad = tmp_path / "bad"
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(neo_model_dir, bad)
        (bad / "config.json").write_text(json.dumps(dict(cfg, **change)))
        with pytest.raises(ValueError) as e:
            GPT.from_pretrained(str(bad))
        assert words in str(e.value) and len(str(e.value).splitlines()) == 1, e.value


def test_unembedding_is_padded_once_and_cast_frozen_is_bitwise(tiny_model_dir):
    """model.unembedding(bf16): lm_head's weight with zero rows up to a multiple of 128, made once; in fp32 on
    CPU the weight itself. cast_frozen(bf16): under autocast, the same logits bit for bit."""
    import argparse

    from sae import SAE
    from train import loss_step, shared_passes
    model = GPT.from_pretrained(tiny_model_dir)
    V, C = model.config.vocab_size, model.config.n_embd
    assert model.unembedding() is model.lm_head.weight
    W = model.unembedding(torch.bfloat16)
    assert W.dtype == torch.bfloat16 and W.size(0) % 128 == 0 and W.size(0) - V < 128 and W.size(1) == C
    assert torch.equal(W[:V], model.lm_head.weight.bfloat16()) and not W[V:].any()
    assert model.unembedding(torch.bfloat16) is W  # kept
    torch.manual_seed(0)
    sae = SAE(C, 4 * C)
    r = argparse.Namespace(loss="e2e_ds", layer=1, l1=1.0, mse_coeff=0.0, kl_coeff=1.0, ds_coeff=2.5, kl_chunk=16)
    idx = torch.randint(0, V, (2, 24))
    out = []
    for cast in (False, True):
        if cast:
            model.cast_frozen(torch.bfloat16)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(idx)
            loss, _ = loss_step(model, sae, r, shared_passes(model, idx, [r]))
        (grad,) = torch.autograd.grad(loss, sae.encoder.weight)
        out.append((logits, loss, grad))
    assert model.transformer.h[0].mlp.c_fc.weight.dtype == torch.bfloat16
    assert model.transformer.wte.weight.dtype == torch.float32
    for a, b in zip(*out):
        assert torch.equal(a, b)


@pytest.mark.parametrize("T,grad", [(16, True), (300, True), (16, False)])
def test_cpu_bf16_attention_in_fp32_up_to_its_length(tiny_model_dir, monkeypatch, T, grad):
    """Under bf16 autocast on CPU, attention that needs a backward over <= CPU_BF16_ATTN_FP32_T positions is
    computed in fp32 from the bf16 q, k, v (then rounded to bf16); longer sequences, and passes without
    gradients, stay on the bf16 kernel. Gradients flow either way."""
    import torch.nn.functional as F

    import model as model_py
    model = GPT.from_pretrained(tiny_model_dir)
    attn = model.transformer.h[0].attn
    monkeypatch.setattr(model_py, "CPU_BF16_ATTN_FP32_T", 256)
    torch.manual_seed(0)
    x = torch.randn(2, T, model.config.n_embd, requires_grad=grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q, k, v = attn.c_attn(x).split(model.config.n_embd, dim=2)
        heads = [t.view(2, T, attn.n_head, -1).transpose(1, 2) for t in (q, k, v)]
        y = attn(x)
    assert y.dtype == torch.bfloat16
    fp32 = F.scaled_dot_product_attention(*[t.float() for t in heads], is_causal=True).bfloat16()
    bf16 = F.scaled_dot_product_attention(*heads, is_causal=True)
    assert not torch.equal(fp32, bf16)  # the two kernels differ, so the check below tells them apart
    want = (fp32 if T <= 256 and grad else bf16).transpose(1, 2).reshape(2, T, -1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(y, attn.c_proj(want))
    if grad:
        y.float().sum().backward()
        assert torch.isfinite(x.grad).all()
