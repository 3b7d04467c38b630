import torch

from sae import SAE, load_sae, save_sae


def test_orthogonal_init_and_shapes():
    torch.manual_seed(0)
    sae = SAE(16, 64)
    W = sae.decoder.weight  # (d, n_dict)
    assert W.shape == (16, 64) and sae.encoder.weight.shape == (64, 16)
    assert torch.allclose(W @ W.t(), torch.eye(16), atol=1e-5)
    norms = W.norm(dim=0)
    assert not torch.allclose(norms, torch.ones(64))  # raw columns are not unit norm at init


def test_forward_uses_unit_norm_columns():
    torch.manual_seed(0)
    sae = SAE(16, 64)
    with torch.no_grad():
        sae.decoder.weight.mul_(torch.rand(64) * 3 + 0.1)  # arbitrary column norms
    raw = sae.decoder.weight.clone()
    x = torch.randn(5, 7, 16)
    x_hat, c = sae(x)
    assert x_hat.shape == x.shape and c.shape == (5, 7, 64) and (c >= 0).all()
    W_e, b_e, b_d = sae.encoder.weight, sae.encoder.bias, sae.decoder.bias
    D = raw / raw.norm(dim=0, keepdim=True)
    c_ref = torch.relu(x @ W_e.t() + b_e)
    assert torch.allclose(c, c_ref, atol=1e-6)
    assert torch.allclose(x_hat, c_ref @ D.t() + b_d, atol=1e-5)
    assert torch.allclose(sae.dict_elements().norm(dim=0), torch.ones(64), atol=1e-6)
    assert torch.equal(sae.decoder.weight, raw)  # never renormalised in place


def test_unit_norm_gradient_is_that_of_the_plain_formula():
    """dict_elements computes 1/‖W_d‖ as rsqrt of a column sum of squares, its gradient by the closed form; its value and
    the gradient through it are those of W_d / W_d.norm(dim=0), to fp32 rounding."""
    torch.manual_seed(1)
    sae = SAE(32, 96)
    with torch.no_grad():
        sae.decoder.weight.mul_(torch.rand(96) * 3 + 0.1)
    g = torch.randn(32, 96)
    (sae.dict_elements() * g).sum().backward()
    w = sae.decoder.weight.detach().clone().requires_grad_(True)
    ref = w / w.norm(dim=0, keepdim=True)
    (ref * g).sum().backward()
    torch.testing.assert_close(sae.dict_elements(), ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sae.decoder.weight.grad, w.grad, rtol=1e-5, atol=1e-6)
    assert sae.decoder.weight.grad.abs().max() > 0.1  # a gradient that is not rounding noise
    sae.decoder.weight.grad = None  # in bf16: D is the fp32 one rounded, the gradient from a bf16 g is fp32
    gb = g.bfloat16()
    D = sae.dict_elements(torch.bfloat16)
    (D.float() * gb.float()).sum().backward()
    w.grad = None
    (w / w.norm(dim=0, keepdim=True) * gb.float()).sum().backward()
    assert D.dtype == torch.bfloat16 and torch.equal(D, sae.dict_elements().detach().bfloat16())
    assert sae.decoder.weight.grad.dtype == torch.float32
    torch.testing.assert_close(sae.decoder.weight.grad, w.grad, rtol=1e-5, atol=1e-6)


def test_save_load_same_outputs(tmp_path):
    torch.manual_seed(0)
    sae = SAE(16, 48)
    with torch.no_grad():
        sae.encoder.bias.normal_()
    save_sae(sae, str(tmp_path), dict(layer=1, model="m", center=True, args={"loss": "e2e"}))
    sae2, cfg = load_sae(str(tmp_path))
    assert cfg["d"] == 16 and cfg["n_dict"] == 48 and cfg["layer"] == 1 and cfg["args"]["loss"] == "e2e"
    x = torch.randn(4, 16)
    for a, b in zip(sae(x), sae2(x)):
        assert torch.equal(a, b)


def test_fused_adam_is_the_per_tensor_update():
    """train.adam (fused on CPU) takes the same steps as torch's per-tensor Adam, to fp32 rounding."""
    from train import adam
    torch.manual_seed(0)
    sae = SAE(8, 32)
    ref, init = SAE(8, 32), {k: v.clone() for k, v in sae.state_dict().items()}
    ref.load_state_dict(init)
    opt, ref_opt = adam(sae, 1e-2), torch.optim.Adam(ref.parameters(), lr=1e-2, foreach=False)
    assert opt.defaults["fused"]
    for _ in range(5):
        x = torch.randn(16, 8)
        for m, o in ((sae, opt), (ref, ref_opt)):
            x_hat, c = m(x)
            ((x_hat - x).pow(2).mean() + c.abs().mean()).backward()
            o.step()
            o.zero_grad()
    for (k, a), b in zip(sae.state_dict().items(), ref.state_dict().values()):
        assert (a - init[k]).abs().max() > 1e-3  # it moved
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_encode_a_feature_subset_and_shapes_from_the_module():
    from sae import sae_shapes
    torch.manual_seed(0)
    sae = SAE(16, 48)
    x = torch.randn(3, 5, 16)
    f = torch.tensor([47, 0, 7, 7, 30])
    assert torch.allclose(sae.encode(x, f), sae.encode(x)[..., f], rtol=1e-6, atol=1e-6)
    assert sae.encode(x, f).shape == (3, 5, 5)
    assert sae_shapes(16, 48) == {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    assert list(sae_shapes(16, 48)) == [n for n, _ in sae.named_parameters()]  # the optimizer's order
