"""
Token rows for training and evaluation, from a Hugging Face dataset or local files.

    rows = load_rows("apollo-research/Skylion007-openwebtext-tokenizer-gpt2", ctx=1024, n_rows=400_500)
    eval_rows, train_rows = split_rows(rows, n_eval=500)   # disjoint: the first n_eval rows are held out

Sources: a hub dataset (streamed with `datasets`), or a local .txt / .jsonl / .parquet file or a folder
of them. A pre-tokenised source has an `input_ids` column; a text source has a `text` column (a .txt
file is one document) and is tokenised with tiktoken's GPT-2 encoding. Documents are joined with EOS
(no BOS), the stream is cut into rows of ctx tokens and the remainder dropped, as in the paper.
Every record is checked as it is read: an object with the first record's column, text a string, token ids
integers in 0..65535 (and, by load_split, inside the model's vocabulary); anything else is a ValueError
naming the file and its line (.jsonl, from 1) or row (.parquet, from 0), as is a file that is not UTF-8.

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

from token_cache import read_record, write_cache

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


def _not_utf8(path):
    """The ValueError for a file that is not UTF-8: its first bad line and byte, and what to do."""
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return ValueError(f"{path} line {i} is not UTF-8 text (byte 0x{line[e.start]:02x} at column "
                                  f"{e.start + 1}); convert the file to UTF-8, e.g. iconv -f latin1 -t utf-8 F > NEW")
    return ValueError(f"{path} is not UTF-8 text; convert it to UTF-8")


def _records(path):
    """Yield (where, record) from one local file: where names the file and the record's line (.jsonl, from 1)
    or row (.parquet, from 0), for the one-line errors of _documents."""
    if path.endswith(".txt"):
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
        yield path, {"text": text}
    elif path.endswith(".jsonl"):
        try:
            with open(path, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            r = json.loads(line)
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{path} line {i} is not JSON ({e.msg}, column {e.colno})") from None
                        yield f"{path} line {i}", r
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
    else:
        import pyarrow.parquet as pq
        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        except Exception as e:  # pyarrow's ArrowInvalid names no file
            raise ValueError(f"{path} is not a readable parquet file ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0]})") from None
        row = 0
        for batch in batches:
            for r in batch.to_pylist():
                yield f"{path} row {row}", r
                row += 1


def _kind(v):
    """What a value is, in JSON's words (the words a .jsonl file's author knows)."""
    return {dict: "an object", list: "an array", tuple: "an array", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _token_ids(ids, where):
    """ids checked: a list of integer token ids, each inside what the uint16 cache holds (0 <= id < 2^16);
    ValueError naming where and the first bad id otherwise (a float, a negative id or a boolean would be
    truncated or wrapped without a word)."""
    if isinstance(ids, np.ndarray) and ids.ndim == 1 and ids.dtype.kind in "iu":
        arr = ids.astype(np.int64)
    else:
        if not isinstance(ids, (list, tuple)):
            raise ValueError(f"{where}: 'input_ids' is {_kind(ids)}; expected a list of integer token ids")
        bad = next((i for i, t in enumerate(ids) if type(t) is not int), None) \
            if not set(map(type, ids)) <= {int} else None  # the set: one pass in C for the usual all-int row
        if bad is not None:
            raise ValueError(f"{where}: 'input_ids' holds {_kind(ids[bad])} ({ids[bad]!r}) at position {bad}; "
                             f"expected integer token ids")
        try:
            arr = np.asarray(ids, dtype=np.int64)
        except OverflowError:
            arr = np.asarray([min(max(t, -1), 2 ** 16) for t in ids], dtype=np.int64)
    out = np.flatnonzero((arr < 0) | (arr >= 2 ** 16))
    if out.size:
        raise ValueError(f"{where}: token id {ids[out[0]]} at position {out[0]} is outside 0..65535 (token ids are "
                         f"non-negative and the token cache holds them as uint16)")
    return arr.tolist() if isinstance(ids, np.ndarray) else list(ids)


def _documents(records):
    """(where, token list) per document (EOS appended), from (where, record) pairs: every record an object with
    the column the first one has, 'input_ids' (a list of token ids) or 'text' (a string). ValueError naming
    the file and line / row of the first record that is not."""
    enc, column, first = None, None, None
    for where, r in records:
        if not isinstance(r, dict):
            raise ValueError(f"{where} is {_kind(r)}, not an object with a 'text' or 'input_ids' field")
        if column is None:
            column = "input_ids" if "input_ids" in r else "text" if "text" in r else None
            if column is None:
                raise ValueError(f"{where} has columns {sorted(r)}; need 'input_ids' or 'text'")
            first = where
        if column not in r:
            other = "text" if column == "input_ids" else "input_ids"
            raise ValueError(f"{where} has no {column!r} (it has {sorted(r)}), which the first record ({first}) has: "
                             + ("a source is all text or all token ids, not both" if other in r
                                else "every record needs it"))
        if column == "input_ids":
            yield where, _token_ids(r["input_ids"], where)  # pre-tokenised rows already hold the EOS between documents
        else:
            if not isinstance(r["text"], str):
                raise ValueError(f"{where}: 'text' is {_kind(r['text'])}; expected a string")
            enc = enc or _tokenizer()
            yield where, enc.encode_ordinary(r["text"]) + [EOT]


def _source_records(source):
    """(iterator of (where, record), cache key material, local) for a local path or a hub dataset name."""
    if os.path.exists(source):
        files = _local_files(source)
        stamp = [(os.path.abspath(f), os.path.getsize(f), os.path.getmtime(f)) for f in files]
        return ((w, r) for f in files for w, r in _records(f)), json.dumps(stamp), True
    if source.startswith((".", "/", "~")) or source.endswith(EXTS):
        raise ValueError(f"dataset path {source!r} does not exist")
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
