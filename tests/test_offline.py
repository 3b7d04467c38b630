"""Without the hub or network: the model and tokenizer errors say what failed and name the fix. The hub and
tiktoken downloads are replaced by functions that raise what they raise offline; nothing here touches the network."""
import importlib
import os

import huggingface_hub
import pytest
import requests

import data
import hf_files
import token_cache
from hf_files import resolve_checkpoint
from model import GPT


def http_error(cls, status):
    """cls (an HTTP error of huggingface_hub) constructed as this version allows: with a response object of
    the HTTP library it is built on (requests before 1.0, httpx or its successor after)."""
    from huggingface_hub import errors
    Response = errors.Response
    if Response.__module__.startswith("requests"):
        r = Response()
        r.status_code = status
    else:
        lib = importlib.import_module(Response.__module__.split(".")[0])
        r = Response(status, request=lib.Request("GET", "https://huggingface.co/no-such/model/resolve/main/config.json"))
    return cls(f"{status} Client Error: Repository Not Found", response=r)


@pytest.fixture(autouse=True)
def hub_looks_reachable(monkeypatch):
    """With HF_HUB_OFFLINE unset resolve_checkpoint first asks whether the hub can be reached: here it can (the
    downloads below raise what they raise online), and no connection is tried."""
    monkeypatch.setattr(hf_files, "hub_reachable", lambda timeout=3.0: True)


def raising(e):
    def f(*args, **kwargs):
        raise e
    return f


def test_offline_hub_id_names_the_local_folder_fix(monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the real download, refused before any network
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError) as e:
        GPT.from_pretrained("nanosae-tests/not-cached-gpt2")
    msg = str(e.value)
    assert "\n" not in msg and "'nanosae-tests/not-cached-gpt2'" in msg
    for words in ("neither a local folder nor a reachable hub repo", "cannot be reached", "HF_HUB_OFFLINE is set",
                  "LocalEntryNotFoundError", "pass a local folder", "save_pretrained"):
        assert words in msg, (words, msg)
    assert "give e.g. 'gpt2'" not in msg  # not suggesting the hub id that cannot be reached


def test_unreachable_hub_without_offline_flag(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", raising(LocalEntryNotFoundError(
        "An error happened while trying to locate the file on the Hub and we cannot find the requested files")))
    with pytest.raises(ValueError, match=r"'gpt2' is neither .* cannot be reached \(offline or no network; "
                                         r"HF_HUB_OFFLINE=1 skips the check; LocalEntryNotFoundError\) and "
                                         r"'openai-community/gpt2' .*save_pretrained"):
        resolve_checkpoint("gpt2")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", raising(requests.exceptions.ConnectionError("Max retries")))
    with pytest.raises(ValueError, match="cannot be reached .*ConnectionError"):
        resolve_checkpoint("gpt2")


def test_repo_not_found(monkeypatch):
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", raising(http_error(RepositoryNotFoundError, 404)))
    with pytest.raises(ValueError) as e:
        resolve_checkpoint("someone/no-such-model")
    msg = str(e.value)
    assert "'someone/no-such-model'" in msg and "was not found on the hub" in msg and "RepositoryNotFoundError" in msg
    assert "cannot be reached" not in msg and "\n" not in msg
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", raising(http_error(GatedRepoError, 403)))
    with pytest.raises(ValueError, match="'someone/gated' is gated"):
        resolve_checkpoint("someone/gated")


def test_local_paths_never_reach_the_hub(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", raising(AssertionError("the hub was asked")))
    with pytest.raises(ValueError, match="does not exist"):
        resolve_checkpoint(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no config.json"):
        resolve_checkpoint(str(tmp_path))
    assert hf_files.HUB_ALIASES["gpt2"] == "openai-community/gpt2"


def test_tiktoken_without_network_names_tiktoken_cache_dir(monkeypatch, tmp_path):
    import tiktoken
    monkeypatch.setattr(tiktoken, "get_encoding", raising(requests.exceptions.ConnectionError(
        "HTTPSConnectionPool(host='openaipublic.blob.core.windows.net', port=443): Max retries exceeded with url: "
        "/gpt-2/encodings/main/vocab.bpe (Caused by NameResolutionError(...))")))
    with pytest.raises(ValueError) as e:
        token_cache._tokenizer()
    msg = str(e.value)
    assert "\n" not in msg and "HTTPSConnectionPool" not in msg
    assert "GPT-2 vocabulary" in msg and "ConnectionError" in msg and "TIKTOKEN_CACHE_DIR" in msg
    text = tmp_path / "input.txt"  # and through the data loading every CLI calls
    text.write_text("some text " * 100)
    with pytest.raises(ValueError, match="TIKTOKEN_CACHE_DIR"):
        data.load_rows(str(text), 16, cache_dir=str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == []  # no temp file of the half-made token cache left behind


def test_eval_cli_reports_the_tokenizer_error_in_one_line(monkeypatch, tmp_path, tiny_model_dir, text_file):
    import tiktoken

    import eval as ev
    from sae import SAE, save_sae
    save_sae(SAE(32, 64), str(tmp_path / "run"), dict(layer=1, model=tiny_model_dir, center=True))
    monkeypatch.setattr(tiktoken, "get_encoding", raising(requests.exceptions.ConnectionError("HTTPSConnectionPool")))
    with pytest.raises(SystemExit) as e:
        ev.main([str(tmp_path / "run"), "--dataset", text_file, "--ctx", "16", "--data_dir", str(tmp_path / "cache")])
    msg = str(e.value.code)
    assert msg.startswith("eval.py: error: tiktoken could not load") and "TIKTOKEN_CACHE_DIR" in msg and "\n" not in msg
