"""
The token cache and the checks of every record written into it.

The cache: a source's token rows, tokenised once, as a flat uint16 file (nanoGPT's train.bin) plus a small
record of it beside it.

    KEY.bin    rows x ctx uint16 tokens, row after row
    KEY.json   dict(source, ctx, rows, complete, bytes, sha1): bytes is the .bin's length, sha1 its SHA-1

A cache is used only when its .bin has the length and SHA-1 its record holds; anything else (a truncated or
overwritten .bin, a record torn or written by an earlier version without a checksum) is rebuilt from the
source, with a note on stderr. Hashing reads the file once per run (about 1.4 GB/s). Both files are written to
temp files and renamed, and no temp file outlives a failure.

The records: _records reads a local .txt / .jsonl / .parquet file as (where, record) pairs, _documents turns
records into token lists (EOS appended to text; GPT-2's tiktoken encoding), checking each as it goes: an
object with the first record's column, text a string, token ids integers in 0..65535. Anything else, or a
file that is not UTF-8, is a ValueError naming the file and its line (.jsonl, from 1) or row (.parquet, from 0).
"""
import hashlib
import json
import os
import sys
import time

import numpy as np

from cli import first_line, fmt_time

CHUNK = 1 << 24  # bytes hashed at a time when checking
EOT = 50256  # GPT-2's <|endoftext|>


def _sha1_file(path):
    h = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def read_record(bin_path, ctx):
    """The record of the cache at bin_path (dict: rows, complete, ...) when the .bin is whole: the length and
    SHA-1 its record holds. None when there is no cache, or one to rebuild (with a note on stderr saying why)."""
    meta_path = bin_path.removesuffix(".bin") + ".json"
    if not os.path.exists(meta_path) and not os.path.exists(bin_path):
        return None
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        fields = ("rows", int), ("bytes", int), ("sha1", str), ("complete", bool)
        ok = isinstance(meta, dict) and all(isinstance(meta.get(k), t) for k, t in fields)
        why = None if ok else "has no record of its length and checksum (an earlier version wrote it)"
    except (OSError, ValueError, RecursionError) as e:
        why = f"has no readable record {meta_path} ({type(e).__name__})"
    if why is None:
        size = os.path.getsize(bin_path) if os.path.exists(bin_path) else None
        if size is None:
            why = "is missing"
        elif meta["bytes"] != meta["rows"] * ctx * 2 or size != meta["bytes"]:
            why = f"is {size} bytes, its record says {meta['bytes']} ({meta['rows']} rows of {ctx} tokens)"
        elif _sha1_file(bin_path) != meta["sha1"]:
            why = "does not match its recorded SHA-1 (changed since it was written)"
    if why is None:
        return meta
    print(f"data: token cache {bin_path} {why}; rebuilding it", file=sys.stderr, flush=True)
    return None


READ = dict(done=0, total=0)  # how much of a local source has been read (characters and bytes, near enough)


def _progress(source, rows, ctx, n_rows, t0):
    """A line on stderr: rows written, and the ETA from n_rows (a hub source) or from READ (a local one)."""
    elapsed = time.time() - t0
    frac = rows / n_rows if n_rows else READ["done"] / READ["total"] if READ["total"] else 0
    eta = f"eta {'~' * (not n_rows)}{fmt_time(elapsed * max(0.0, 1 - frac) / frac)}" if frac > 0 else "eta ?"
    print(f"data: tokenising {source!r} into the cache: {rows:,} rows of {ctx} tokens | {fmt_time(elapsed)} | {eta}",
          file=sys.stderr, flush=True)


def _write(f, data, path):
    """f.write(data); an OSError (a full --data_dir) names path, the cache file, not the temp file."""
    try:
        f.write(data)
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None


def write_cache(bin_path, documents, source, ctx, n_rows=None, every_s=10.0):
    """Write the token rows of documents (token lists, cut into rows of ctx, the remainder dropped) to bin_path
    and its record; with n_rows, stop after that many rows. Returns the number of rows. ValueError when there
    is not one row (OSError naming bin_path when the disk is full); temp files removed whatever happens. Past
    every_s seconds, a progress line on stderr every every_s seconds."""
    rows, complete, buf, h = 0, True, [], hashlib.sha1()
    t0 = last = time.time()
    tmp, meta_path = bin_path + f".tmp{os.getpid()}", bin_path.removesuffix(".bin") + ".json"
    meta_tmp = meta_path + f".tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            for tokens in documents:
                buf.extend(tokens)
                if len(buf) >= ctx:
                    n = len(buf) // ctx
                    if n_rows is not None:
                        n = min(n, n_rows - rows)
                    block = np.asarray(buf[:n * ctx], dtype=np.uint16).tobytes()
                    _write(f, block, bin_path)
                    h.update(block)
                    rows, buf = rows + n, buf[n * ctx:]
                if time.time() - last >= every_s:
                    last = time.time()
                    _progress(source, rows, ctx, n_rows, t0)
                if n_rows is not None and rows >= n_rows:
                    complete = False
                    break
        if rows == 0:
            raise ValueError(f"dataset {source!r} holds fewer than ctx = {ctx} tokens")
        os.replace(tmp, bin_path)
        with open(meta_tmp, "w") as f:  # whole or absent for a run reading it meanwhile
            json.dump(dict(source=source, ctx=ctx, rows=rows, complete=complete, bytes=rows * ctx * 2,
                           sha1=h.hexdigest()), f)
        os.replace(meta_tmp, meta_path)
    finally:  # a failure midway (no tokenizer, a bad row, a full disk, Ctrl-C) leaves no temp file in the cache
        for p in (tmp, meta_tmp):
            if os.path.exists(p):
                os.remove(p)
    return rows


def _tokenizer():
    """tiktoken's GPT-2 encoding; it downloads two vocabulary files once into TIKTOKEN_CACHE_DIR (else a temp
    folder), so without network it needs a copy of them there: ValueError with one line saying so."""
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network: requests' HTTPSConnectionPool(...) message, many lines of it
        raise ValueError(f"tiktoken could not load its GPT-2 vocabulary ({type(e).__name__}); set TIKTOKEN_CACHE_DIR "
                         f"to a folder holding a copy of its files (see the README: running without the hub)") from None


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
                        except RecursionError:
                            raise ValueError(f"{path} line {i} is not a record (arrays or objects nested too "
                                             f"deep)") from None
                        except ValueError as e:  # an integer of more than 4300 digits
                            raise ValueError(f"{path} line {i} is not a record ({first_line(e)[:100]})") from None
                        yield f"{path} line {i}", r
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
    else:
        import pyarrow.parquet as pq
        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        except Exception as e:  # pyarrow's ArrowInvalid names no file
            raise ValueError(f"{path} is not a readable parquet file ({type(e).__name__}: "
                             f"{first_line(e)})") from None
        row = 0
        while True:
            try:  # a page or footer damaged past the header: pyarrow's OSError / ArrowInvalid name no file
                batch = next(batches, None)
                records = None if batch is None else batch.to_pylist()
            except Exception as e:
                raise ValueError(f"{path} is not a readable parquet file after row {row} ({type(e).__name__}: "
                                 f"{first_line(e)[:150]})") from None
            if records is None:
                break
            for r in records:
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
            ids = _token_ids(r["input_ids"], where)
            READ["done"] += ID_BYTES * len(ids)
            yield where, ids  # pre-tokenised rows already hold the EOS between documents
        else:
            if not isinstance(r["text"], str):
                raise ValueError(f"{where}: 'text' is {_kind(r['text'])}; expected a string")
            enc = enc or _tokenizer()
            pieces = list(_pieces(r["text"]))
            for i, piece in enumerate(pieces):  # a long text in pieces: the same tokens, and progress between them
                READ["done"] += len(piece)
                yield where, enc.encode_ordinary(piece) + ([EOT] if i == len(pieces) - 1 else [])


PIECE = 1 << 20  # characters tokenised at a time
ID_BYTES = 6  # about what a token id takes in a .jsonl file ("50256, "): progress through a pre-tokenised source


def _pieces(text):
    """text cut into pieces of about PIECE characters, each ending with a newline that a non-space follows. GPT-2's
    pre-tokeniser makes such a newline a token of its own, so the pieces' tokens are the text's tokens."""
    start = 0
    while len(text) - start > PIECE:
        cut = start + PIECE
        while cut < len(text) and not (text[cut - 1] == "\n" and not text[cut].isspace()):
            cut += 1
        yield text[start:cut]
        start = cut
    yield text[start:]
