"""What a new user's first hour trips on: a shrunk run keeps a warmup of its size, a warmup that covers the whole
run is refused in one line."""
import config
import train
from test_reliability import train_error
from test_train import tiny_args


def resolved(*argv):
    return config.resolve(train.parser, [str(a) for a in argv] + ["--out_dir", "unused"])[0]


def test_warmup_scales_with_n_samples_unless_given(neo_model_dir):
    assert resolved().warmup_samples == 20_000 and resolved().n_samples == 400_000  # the paper's 5%
    assert resolved("--n_samples", 64).warmup_samples == 3
    assert resolved("--n_samples", 64, "--warmup_samples", 0).warmup_samples == 0
    assert resolved("--n_samples", 10_000, "--warmup_samples", 100).warmup_samples == 100
    assert resolved("--model", neo_model_dir, "--loss", "e2e").warmup_samples == 20_000  # the recipe's own
    assert resolved("--model", neo_model_dir, "--loss", "e2e", "--n_samples", 2000).warmup_samples == 100


def test_a_warmup_over_the_whole_run_is_one_line(monkeypatch, tmp_path, tiny_model_dir, text_file):
    a = tiny_args(tiny_model_dir, text_file, str(tmp_path / "run"), "local", warmup_samples=20_000)
    err = train_error(monkeypatch, *a)
    assert "--warmup_samples 20000 covers the whole run of --n_samples 96" in err and "5% of the run: 5" in err
    assert not (tmp_path / "run").exists()


def test_eval_of_a_folder_that_does_not_exist(tmp_path):
    from test_train import run
    p = run("eval.py", str(tmp_path / "nope"), check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        f"eval.py: error: {str(tmp_path / 'nope')!r} does not exist: give a run folder (sae.json), a SAELens folder "
        "or an Apollo .pt"]


def test_the_tests_never_write_the_users_token_cache():
    import os
    import data
    home = os.path.join(os.path.expanduser("~"), ".cache", "nanosae")
    assert data.DEFAULT_CACHE == os.environ["NANOSAE_CACHE"] != home
    assert train.parser.get_default("data_dir") == data.DEFAULT_CACHE


def test_an_unreachable_hub_is_one_line_at_once(monkeypatch, tmp_path):
    """No network and HF_HUB_OFFLINE unset: the model and dataset lines come within seconds (huggingface_hub alone
    retries for about 40 s first) and say that HF_HUB_OFFLINE=1 skips the check. No connection is tried: the
    probe's socket call is replaced."""
    import socket
    import time
    import pytest
    import hf_files
    from data import load_rows
    calls = []

    def refuse(address, timeout=None, *a, **kw):
        calls.append(address)
        raise OSError("Network is unreachable")
    monkeypatch.setattr(socket, "create_connection", refuse)
    for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    t = time.time()
    with pytest.raises(ValueError) as e:
        hf_files.resolve_checkpoint("gpt2")
    assert "hub cannot be reached" in str(e.value) and "HF_HUB_OFFLINE=1 skips the check" in str(e.value)
    with pytest.raises(ValueError, match="the hub cannot be reached .*HF_DATASETS_OFFLINE=1"):
        load_rows("someone/some-dataset", 16, cache_dir=str(tmp_path / "cache"))
    assert time.time() - t < 10 and calls and all(port == 443 for _, port in calls)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls.clear()
    assert not hf_files.hub_reachable() and not calls  # offline: not even the probe


def test_tokenising_a_long_text_shows_progress_and_the_same_tokens(tmp_path, capsys, monkeypatch):
    """A long .txt is tokenised in pieces (progress lines between them on stderr, with an ETA), and the rows are
    those of tokenising the text whole."""
    import numpy as np
    import token_cache
    from conftest import make_text
    from data import load_rows
    text = "\n".join(make_text(300, seed=i) + ("\n\n  indented" if i % 3 else "") for i in range(400))
    (tmp_path / "long.txt").write_text(text)
    monkeypatch.setattr(token_cache, "PIECE", 5000)  # many pieces
    real = token_cache.write_cache
    monkeypatch.setattr(token_cache, "write_cache", lambda *a, **kw: real(*a, **dict(kw, every_s=0.0)))
    import data
    monkeypatch.setattr(data, "write_cache", token_cache.write_cache)
    rows = load_rows(str(tmp_path / "long.txt"), 64, cache_dir=str(tmp_path / "cache"))
    enc = token_cache._tokenizer()
    whole = enc.encode_ordinary(text) + [token_cache.EOT]
    assert np.array_equal(np.asarray(rows).reshape(-1), np.asarray(whole[:len(rows) * 64], dtype=np.uint16))
    err = capsys.readouterr().err.splitlines()
    assert len(err) > 3 and all(line.startswith("data: tokenising ") and " | eta " in line for line in err), err
    assert "eta ~" in err[-1]


def test_a_full_data_dir_names_the_cache_file(tmp_path):
    import errno
    import os
    import pytest
    import token_cache
    from files import write_error

    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(OSError) as e:
        token_cache._write(Full(), b"x", str(tmp_path / "abc.bin"))
    assert write_error(e.value) == f"cannot write {str(tmp_path / 'abc.bin')!r} (No space left on device); free some space"


def test_config_py_run_as_a_script_prints_the_kinds():
    from test_train import run
    out = run("config.py").stdout
    assert "A flag's value comes from the command line" in out and all(f"  {k} " in out for k in config.KINDS)


def test_a_shrunk_run_is_told_its_evaluations_outweigh_it(tmp_path, tiny_model_dir, text_file):
    from test_train import run
    p = run("train.py", *tiny_args(tiny_model_dir, text_file, str(tmp_path / "run"), "local", n_samples=8,
                                   eval_samples=16))
    assert "train.py: note: every evaluation runs the 16 held-out rows of --eval_samples, more than the 8" in p.stderr
    assert "note" not in run("train.py", *tiny_args(tiny_model_dir, text_file, str(tmp_path / "b"), "local",
                                                    n_samples=16, eval_samples=8)).stderr
