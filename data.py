"""
Token rows for training and evaluation, from a Hugging Face dataset or local files.

    rows = load_rows("apollo-research/Skylion007-openwebtext-tokenizer-gpt2", ctx=1024, n_rows=400_500)
    eval_rows, train_rows = split_rows(rows, n_eval=500)   # disjoint: the first n_eval rows are held out

Sources: a hub dataset (streamed with `datasets`), or a local .txt / .jsonl / .parquet file or a folder
of them. A pre-tokenised source has an `input_ids` column; a text source has a `text` column (a .txt
file is one document) and is tokenised with tiktoken's GPT-2 encoding. Documents are joined with EOS
(no BOS), the stream is cut into rows of ctx tokens and the remainder dropped, as in the paper.

Tokens are written once to a uint16 file in the cache folder (nanoGPT style) and read back as a
np.memmap (R, ctx); a second run on the same source and ctx reuses it.
"""
import functools
import glob
import hashlib
import json
import os

import numpy as np

EOT = 50256  # GPT-2's <|endoftext|>
EXTS = (".txt", ".jsonl", ".parquet")
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "nanosae")


def _tokenizer():
    """tiktoken's GPT-2 encoding; it downloads two vocabulary files once into TIKTOKEN_CACHE_DIR (else a temp
    folder), so without network it needs a copy of them there: ValueError with one line saying so."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network: requests' HTTPSConnectionPool(...) message, many lines of it
        raise ValueError(f"tiktoken could not load its GPT-2 vocabulary ({type(e).__name__}); set TIKTOKEN_CACHE_DIR "
                         f"to a folder holding a copy of its files (see the README: running without the hub)") from None


def _local_files(source):
    if os.path.isdir(source):
        files = sorted(f for f in glob.glob(os.path.join(source, "**", "*"), recursive=True) if f.endswith(EXTS))
        if not files:
            raise ValueError(f"dataset folder {source!r} has no {'/'.join(EXTS)} files")
        return files
    if not source.endswith(EXTS):
        raise ValueError(f"dataset file {source!r} has an unknown type; allowed: {', '.join(EXTS)}")
    return [source]


def _records(path):
    """Yield dicts with 'text' or 'input_ids' from one local file."""
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            yield {"text": f.read()}
    elif path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        raise ValueError(f"{path}: line {i + 1} is not JSON") from None
    else:
        import pyarrow.parquet as pq
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()


def _documents(records, source):
    """Token lists, one per document (EOS appended), from records with an input_ids or text column."""
    enc, column = None, None
    for r in records:
        if column is None:
            column = "input_ids" if "input_ids" in r else "text" if "text" in r else None
            if column is None:
                raise ValueError(f"dataset {source!r} has columns {sorted(r)}; need 'input_ids' or 'text'")
        if column == "input_ids":
            yield list(r["input_ids"])  # pre-tokenised rows already hold the EOS between documents
        else:
            enc = enc or _tokenizer()
            yield enc.encode_ordinary(r[column]) + [EOT]


def _source_records(source):
    """(records iterator, cache key material) for a local path or a hub dataset name."""
    if os.path.exists(source):
        files = _local_files(source)
        stamp = [(os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f)) for f in files]
        return (r for f in files for r in _records(f)), json.dumps(stamp), True
    if source.startswith((".", "/", "~")) or source.endswith(EXTS):
        raise ValueError(f"dataset path {source!r} does not exist")
    import datasets
    try:
        ds = datasets.load_dataset(source, split="train", streaming=True)
    except Exception as e:  # offline, unknown name: one line, not a traceback
        raise ValueError(f"dataset {source!r} is neither a local path nor a reachable hub dataset "
                         f"({type(e).__name__})") from None
    return iter(ds), source, False


def load_rows(source, ctx, n_rows=None, cache_dir=DEFAULT_CACHE):
    """np.memmap (R, ctx) of uint16 tokens. A local source is read whole; a hub source gives its first n_rows
    rows (all of it when n_rows is None), streamed once. Cached under cache_dir by source and ctx."""
    records, key_src, local = _source_records(source)
    key = hashlib.sha1(f"{key_src}|{ctx}".encode()).hexdigest()[:16]
    os.makedirs(cache_dir, exist_ok=True)
    bin_path, meta_path = os.path.join(cache_dir, f"{key}.bin"), os.path.join(cache_dir, f"{key}.json")
    if os.path.exists(meta_path) and os.path.exists(bin_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta["complete"] or (n_rows is not None and meta["rows"] >= n_rows):
            rows = np.memmap(bin_path, dtype=np.uint16, mode="r", shape=(meta["rows"], ctx))
            return rows if local or n_rows is None else rows[:n_rows]  # the same rows, however far it was streamed
    rows, complete, buf, tmp = 0, True, [], bin_path + f".tmp{os.getpid()}"
    try:  # a failure midway (no tokenizer, a bad token id) leaves no temp file in the cache
        with open(tmp, "wb") as f:
            for tokens in _documents(records, source):
                buf.extend(tokens)
                if len(buf) >= ctx:
                    n = len(buf) // ctx
                    if n_rows is not None and not local:
                        n = min(n, n_rows - rows)
                    arr = np.asarray(buf[:n * ctx], dtype=np.int64)
                    if arr.size and arr.max() >= 2 ** 16:
                        raise ValueError(f"dataset {source!r} has token id {arr.max()}, above what uint16 holds")
                    f.write(arr.astype(np.uint16).tobytes())
                    rows, buf = rows + n, buf[n * ctx:]
                if n_rows is not None and not local and rows >= n_rows:
                    complete = False
                    break
    except BaseException:
        os.remove(tmp)
        raise
    if rows == 0:
        os.remove(tmp)
        raise ValueError(f"dataset {source!r} holds fewer than ctx = {ctx} tokens")
    os.replace(tmp, bin_path)
    with open(meta_path + f".tmp{os.getpid()}", "w") as f:  # whole or absent for a run reading it meanwhile
        json.dump(dict(source=source, ctx=ctx, rows=rows, complete=complete), f)
    os.replace(f.name, meta_path)
    return np.memmap(bin_path, dtype=np.uint16, mode="r", shape=(rows, ctx))


def split_rows(rows, n_eval):
    """(eval rows, train rows): the first n_eval rows are held out for evaluation, never trained on."""
    if n_eval >= len(rows):
        raise ValueError(f"dataset has {len(rows)} rows of tokens; eval_samples = {n_eval} leaves none for training")
    return rows[:n_eval], rows[n_eval:]


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
    if int(rows.max()) >= vocab_size:
        raise ValueError(f"dataset {source!r} has token id {int(rows.max())}, outside the model's vocabulary "
                         f"of {vocab_size}")
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
