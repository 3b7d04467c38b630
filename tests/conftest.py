"""Shared fixtures: a tiny random GPT-2 written by transformers' save_pretrained (a true HF checkpoint) and a
small local text corpus. Nothing here touches the network."""
import atexit
import os
import random
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
_cache = os.path.join(os.path.dirname(ROOT), "shared", "tiktoken_cache")
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(_cache):
    os.environ["TIKTOKEN_CACHE_DIR"] = _cache
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# every token cache the tests make goes to a folder of this session, never the user's ~/.cache/nanosae
os.environ["NANOSAE_CACHE"] = tempfile.mkdtemp(prefix="nanosae-tests-")
atexit.register(shutil.rmtree, os.environ["NANOSAE_CACHE"], True)

WORDS = ("the of and to in is was for on that with as by at from it his an were are which this be or "
         "had not but first one their its new after who they have her she two been other when there all "
         "during into school time may years more most only over city some world would where later up such "
         "used many can state about national out known university united then made").split()


def make_text(n_words, seed=0):
    rng = random.Random(seed)
    sents = []
    while n_words > 0:
        k = rng.randint(5, 15)
        sents.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
        n_words -= k
    return " ".join(sents)


def write_tiny_gpt2(path, n_layer=3, n_embd=32, n_head=4, n_positions=64, seed=0, safe=True):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions, vocab_size=50257)
    m = GPT2LMHeadModel(cfg)
    with torch.no_grad():  # non-trivial LayerNorms and biases, so a wrong transpose or centring shows
        for n, p in m.named_parameters():
            if "ln" in n or "bias" in n:
                p.add_(0.1 * torch.randn_like(p))
    m.save_pretrained(path, safe_serialization=safe)
    return m


def write_tiny_gpt_neo(path, seed=0, safe=True, **kw):
    """A random GPTNeoForCausalLM of TinyStories-1M's shape (8 layers, d 64, 16 heads, global / local attention
    with window 256, context 2048), written by save_pretrained; kw overrides the config."""
    import torch
    from transformers import GPTNeoConfig, GPTNeoForCausalLM
    torch.manual_seed(seed)
    cfg = GPTNeoConfig(**dict(dict(num_layers=8, hidden_size=64, num_heads=16, window_size=256, vocab_size=50257,
                                   attention_types=[[["global", "local"], 4]], max_position_embeddings=2048), **kw))
    m = GPTNeoForCausalLM(cfg)
    with torch.no_grad():  # non-trivial LayerNorms and biases; sharp attention, so the window and scale show
        for n, p in m.named_parameters():
            if "ln" in n or "bias" in n:
                p.add_(0.1 * torch.randn_like(p))
            if n.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(10.0)
    m.save_pretrained(path, safe_serialization=safe)
    return m


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """A test that would open a connection to anywhere but this machine fails instead (in this process)."""
    import socket
    real = socket.create_connection

    def local_only(address, *a, **kw):
        if address[0] not in ("localhost", "127.0.0.1", "::1"):
            raise OSError(f"the tests never use the network (a connection to {address[0]} was tried)")
        return real(address, *a, **kw)
    monkeypatch.setattr(socket, "create_connection", local_only)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny-gpt2"))
    write_tiny_gpt2(path)
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "input.txt"
    path.write_text(make_text(12000))
    return str(path)


@pytest.fixture(scope="session")
def neo_model_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny-gpt-neo"))
    write_tiny_gpt_neo(path)
    return path


def pytest_sessionstart(session):
    """The versions the suite runs with, at the top of its output (CI's log), also under -q."""
    import importlib.metadata as md
    import platform
    have = []
    for p in ("torch", "transformers", "datasets", "numpy", "tiktoken", "safetensors", "hypothesis", "wandb"):
        try:
            have.append(f"{p} {md.version(p)}")
        except md.PackageNotFoundError:
            have.append(f"{p} missing")
    print("versions: python " + platform.python_version() + " | " + " | ".join(have), flush=True)
