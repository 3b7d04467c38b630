"""Every file we write has the mode open() would give it, 0o666 & ~umask: safetensors' own writer makes
0600 files, which other users (a shared results folder, a web server) cannot read."""
import os
import stat

import pytest
import torch

from checkpoint import append_eval_log, atomic_save
from interop import load_firing, write_saelens
from sae import SAE, load_sae, save_firing, save_sae


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    sae = SAE(8, 16)
    run, lens = str(tmp_path / "run"), str(tmp_path / "lens")
    old = os.umask(umask)
    try:
        save_sae(sae, run, dict(layer=1, model="gpt2", center=True))
        save_firing(run, torch.full((16,), 0.5, dtype=torch.float64), 100)
        atomic_save({"step": 1}, os.path.join(run, "ckpt.pt"))
        append_eval_log(os.path.join(run, "eval.jsonl"), {"step": 1})
        write_saelens(sae, dict(layer=1, model="gpt2", center=True), lens, firing=load_firing(run))
    finally:
        os.umask(old)
    files = [os.path.join(d, f) for d in (run, lens) for f in sorted(os.listdir(d))]
    assert [os.path.basename(f) for f in files] == ["ckpt.pt", "eval.jsonl", "firing.safetensors", "sae.json",
                                                    "sae.safetensors", "cfg.json", "sae_weights.safetensors",
                                                    "sparsity.safetensors"]  # and no temp file left behind
    assert {f: oct(stat.S_IMODE(os.stat(f).st_mode)) for f in files} == {f: oct(mode) for f in files}
    assert torch.equal(load_sae(run)[0].encoder.weight, sae.encoder.weight)  # still the same files
