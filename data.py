"""
Token rows for training and evaluation, from a Hugging Face dataset or local files.

    rows = load_rows("apollo-research/Skylion007-openwebtext-tokenizer-gpt2", ctx=1024, n_rows=400_500)
    eval_rows, train_rows = split_rows(rows, n_eval=500)   # disjoint: the first n_eval rows are held out

Sources: a hub dataset (streamed with `datasets`), or a local .txt / .jsonl / .parquet file or a folder
of them. A pre-tokenised source has an `input_ids` column; a text source has a `text` column (a .txt
file is one document) and is tokenised with tiktoken's GPT-2 encoding. Documents are joined with EOS
(no BOS), the stream is cut into rows of ctx tokens and the remainder dropped, as in the paper.
Every record is checked as it is read (token_cache.py): an object with the first record's column, text a
string, token ids integers in 0..65535 (and, by load_split, inside the model's vocabulary); anything else is a
ValueError naming the file and its line (.jsonl, from 1) or row (.parquet, from 0), as is a file not UTF-8.

Tokens are written once to a uint16 file in the cache folder (nanoGPT style) and read back as a
np.memmap (R, ctx); a second run on the same source and ctx reuses it once its length and SHA-1 match
the record written with it (token_cache.py), else rebuilds it.
"""
import functools
import glob
import hashlib
import json
import os

import numpy as np

from hf_files import hub_reachable
from token_cache import EOT, READ, _documents, _records, read_record, write_cache  # noqa: F401 (EOT is data.EOT too)

EXTS = (".txt", ".jsonl", ".parquet")
DEFAULT_CACHE = os.environ.get("NANOSAE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "nanosae")


def _local_files(source):
    if os.path.isdir(source):
        files = sorted(f for f in glob.glob(os.path.join(source, "**", "*"), recursive=True) if f.endswith(EXTS))
        if not files:
            raise ValueError(f"dataset folder {source!r} has no {'/'.join(EXTS)} files")
        return files
    if not source.endswith(EXTS):
        raise ValueError(f"dataset file {source!r} has an unknown type; allowed: {', '.join(EXTS)}")
    return [source]


def _source_records(source):
    """(iterator of (where, record), cache key material, local) for a local path or a hub dataset name."""
    if os.path.exists(source):
        files = _local_files(source)
        stamp = [(os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f)) for f in files]
        READ.update(done=0, total=sum(size for _, size, _ in stamp) or 1)
        return ((w, r) for f in files for w, r in _records(f)), json.dumps(stamp), True
    if source.startswith((".", "/", "~")) or source.endswith(EXTS):
        raise ValueError(f"dataset path {source!r} does not exist")
    offline = any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline and not hub_reachable():  # streaming needs the hub: say so now, not after its retries
        raise ValueError(f"dataset {source!r} is not a local path and the hub cannot be reached (offline or no network); "
                         f"give a local file or folder as --dataset (HF_DATASETS_OFFLINE=1 reads the datasets cache)")
    import datasets
    try:
        ds = datasets.load_dataset(source, split="train", streaming=True)
    except Exception as e:  # offline, unknown name: one line, not a traceback
        raise ValueError(f"dataset {source!r} is neither a local path nor a reachable hub dataset "
                         f"({type(e).__name__})") from None
    return ((f"dataset {source!r} row {i}", r) for i, r in enumerate(ds)), source, False


def load_rows(source, ctx, n_rows=None, cache_dir=DEFAULT_CACHE):
    """np.memmap (R, ctx) of uint16 tokens. A local source is read whole; a hub source gives its first n_rows
    rows (all of it when n_rows is None), streamed once. Cached under cache_dir by source and ctx."""
    records, key_src, local = _source_records(source)
    key = hashlib.sha1(f"{key_src}|{ctx}".encode()).hexdigest()[:16]
    os.makedirs(cache_dir, exist_ok=True)
    bin_path = os.path.join(cache_dir, f"{key}.bin")
    meta = read_record(bin_path, ctx)
    if meta is not None and (meta["complete"] or (n_rows is not None and meta["rows"] >= n_rows)):
        rows = np.memmap(bin_path, dtype=np.uint16, mode="r", shape=(meta["rows"], ctx))
        return rows if local or n_rows is None else rows[:n_rows]  # the same rows, however far it was streamed
    rows = write_cache(bin_path, (tokens for _, tokens in _documents(records)), source, ctx, None if local else n_rows)
    return np.memmap(bin_path, dtype=np.uint16, mode="r", shape=(rows, ctx))


def split_rows(rows, n_eval):
    """(eval rows, train rows): the first n_eval rows are held out for evaluation, never trained on."""
    if n_eval >= len(rows):
        raise ValueError(f"dataset has {len(rows)} rows of tokens; eval_samples = {n_eval} leaves none for training")
    return rows[:n_eval], rows[n_eval:]


def check_vocab(rows, source, vocab_size):
    """ValueError unless every token id in rows (R, ctx) is inside the model's vocabulary, naming the first
    one outside it and where it is: a local source is read again to find its file and line / row (an error
    path only); for a hub dataset, its token row."""
    top = int(rows.max()) if len(rows) else 0
    if top < vocab_size:
        return
    if os.path.exists(source):
        for where, tokens in _documents(_source_records(source)[0]):
            bad = np.flatnonzero(np.asarray(tokens) >= vocab_size)
            if bad.size:
                raise ValueError(f"{where}: token id {tokens[bad[0]]} at position {bad[0]} is outside the model's "
                                 f"vocabulary of {vocab_size}")
    r, c = divmod(int(np.argmax(np.asarray(rows).reshape(-1) >= vocab_size)), rows.shape[1])
    raise ValueError(f"dataset {source!r} has token id {int(rows[r, c])} (token row {r}, position {c}), outside "
                     f"the model's vocabulary of {vocab_size}")


def row_hashes(rows, chunk=4096):
    """A 64-bit hash per row, (R,) uint64: a fixed random linear map of the tokens, mod 2^64. Equal rows hash
    equal; distinct rows collide with probability about 2^-48, so a match is a candidate to compare."""
    mult = np.random.default_rng(0).integers(0, 2 ** 63, size=rows.shape[1], dtype=np.uint64) * 2 + 1
    out = np.empty(len(rows), dtype=np.uint64)
    for i in range(0, len(rows), chunk):
        out[i:i + chunk] = (rows[i:i + chunk].astype(np.uint64) * mult).sum(1, dtype=np.uint64)  # wraps
    return out


def _find_overlap(eval_rows, train_rows, eval_hashes, train_hashes):
    """(i, j) with eval_rows[i] equal to train_rows[j], or None."""
    first = {}
    for i, h in enumerate(eval_hashes.tolist()):
        first.setdefault(h, i)
    for j in np.flatnonzero(np.isin(train_hashes, eval_hashes)):
        i = first[int(train_hashes[j])]
        if np.array_equal(eval_rows[i], train_rows[j]):
            return i, int(j)
    return None


def load_split(source, ctx, n_eval, n_train, vocab_size, cache_dir=DEFAULT_CACHE):
    """(eval rows, train rows, fingerprint) for training: the first n_eval rows held out, the rest to train on
    (a hub source is read to n_eval + n_train rows, a local one whole). Checked: token ids inside the
    vocabulary, and no eval row equal to a training row (a source that repeats itself would leak the eval set).
    The fingerprint, dict(rows, fingerprint), tells a resumed run whether it reads the same tokens."""
    rows = load_rows(source, ctx, n_rows=n_eval + n_train, cache_dir=cache_dir)
    eval_rows, train_rows = split_rows(rows, n_eval)
    check_vocab(rows, source, vocab_size)
    hashes = row_hashes(rows)
    overlap = _find_overlap(eval_rows, train_rows, hashes[:n_eval], hashes[n_eval:])
    if overlap:
        raise ValueError(f"dataset {source!r} repeats itself: eval row {overlap[0]} is also training row "
                         f"{overlap[1]}, so the evaluation would not be held out; deduplicate the source")
    return eval_rows, train_rows, dict(rows=len(rows), fingerprint=hashlib.sha1(hashes.tobytes()).hexdigest()[:16])


@functools.lru_cache(maxsize=2)
def _epoch_order(seed, epoch, n_rows):
    return np.random.default_rng(seed + epoch).permutation(n_rows)  # milliseconds at 400k rows: once per epoch


def sample_rows(seed, n_rows, start, count):
    """Row indices for training positions start .. start+count: epoch e is permutation(seed + e) of all rows,
    so the data order is a pure function of (seed, position) and a resumed run reads what it would have."""
    out, pos = [], start
    while pos < start + count:
        epoch, off = divmod(pos, n_rows)
        take = min(start + count - pos, n_rows - off)
        out.append(_epoch_order(seed, epoch, n_rows)[off:off + take])
        pos += take
    return np.concatenate(out)


def get_batch(rows, indices, device):
    """int64 token ids (len(indices), ctx) on device, for the given row indices."""
    import torch
    x = torch.from_numpy(rows[np.sort(indices)].astype(np.int64))
    return x.pin_memory().to(device, non_blocking=True) if device.startswith("cuda") else x


def eval_batches(rows, batch_size, device):
    """The eval rows in order, batch by batch."""
    for i in range(0, len(rows), batch_size):
        yield get_batch(rows, np.arange(i, min(i + batch_size, len(rows))), device)
