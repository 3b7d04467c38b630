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
