import json

import numpy as np
import pytest

from data import EOT, load_rows, split_rows
from conftest import make_text


def expected_rows(docs, ctx):
    import tiktoken
    enc = tiktoken.get_encoding("gpt2")
    stream = [t for d in docs for t in enc.encode_ordinary(d) + [EOT]]
    n = len(stream) // ctx
    return np.array(stream[:n * ctx], dtype=np.uint16).reshape(n, ctx)


@pytest.fixture
def docs():
    return [make_text(300, seed=s) + " Ünïcode — 😀 text" for s in range(6)]


def test_txt_matches_tiktoken(tmp_path, docs):
    (tmp_path / "a.txt").write_text(docs[0], encoding="utf-8")
    rows = load_rows(str(tmp_path / "a.txt"), 32, cache_dir=str(tmp_path / "cache"))
    assert rows.dtype == np.uint16 and np.array_equal(rows, expected_rows(docs[:1], 32))


def test_jsonl_and_parquet_match_tiktoken(tmp_path, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)))
    pq.write_table(pa.table({"text": docs}), str(tmp_path / "d.parquet"))
    want = expected_rows(docs, 50)
    for name in ("d.jsonl", "d.parquet"):
        assert np.array_equal(load_rows(str(tmp_path / name), 50, cache_dir=str(tmp_path / "c")), want)


def test_pretokenised_input_ids_and_folder(tmp_path):
    (tmp_path / "f").mkdir()
    ids = np.arange(1000) % 50257
    with open(tmp_path / "f" / "0.jsonl", "w") as f:
        for i in range(0, 1000, 100):
            f.write(json.dumps({"input_ids": ids[i:i + 100].tolist()}) + "\n")
    rows = load_rows(str(tmp_path / "f"), 64, cache_dir=str(tmp_path / "c"))
    assert np.array_equal(rows, ids[:15 * 64].reshape(15, 64))


def test_cache_reused(tmp_path, docs):
    p = tmp_path / "a.txt"
    p.write_text(docs[1])
    cache = tmp_path / "cache"
    load_rows(str(p), 16, cache_dir=str(cache))
    bins = list(cache.glob("*.bin"))
    assert len(bins) == 1
    mtime = bins[0].stat().st_mtime_ns
    again = load_rows(str(p), 16, cache_dir=str(cache))
    assert bins[0].stat().st_mtime_ns == mtime and isinstance(again, np.memmap)
    load_rows(str(p), 8, cache_dir=str(cache))  # another ctx is another cache file
    assert len(list(cache.glob("*.bin"))) == 2


def test_split_is_disjoint(tmp_path, docs):
    p = tmp_path / "a.txt"
    p.write_text(" ".join(docs))
    rows = load_rows(str(p), 16, cache_dir=str(tmp_path / "c"))
    ev, tr = split_rows(rows, 5)
    assert len(ev) == 5 and len(tr) == len(rows) - 5 and np.array_equal(tr[0], rows[5])
    with pytest.raises(ValueError, match="leaves none for training"):
        split_rows(rows, len(rows))


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_rows(str(tmp_path / "missing.txt"), 16, cache_dir=str(tmp_path))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unknown type"):
        load_rows(str(tmp_path / "x.csv"), 16, cache_dir=str(tmp_path))
    (tmp_path / "e.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(ValueError, match="need 'input_ids' or 'text'"):
        load_rows(str(tmp_path / "e.jsonl"), 16, cache_dir=str(tmp_path))
    (tmp_path / "short.txt").write_text("hi")
    with pytest.raises(ValueError, match="fewer than ctx"):
        load_rows(str(tmp_path / "short.txt"), 16, cache_dir=str(tmp_path))
