"""
The token cache: a source's token rows, tokenised once, as a flat uint16 file (nanoGPT's train.bin) plus a small
record of it beside it.

    KEY.bin    rows x ctx uint16 tokens, row after row
    KEY.json   dict(source, ctx, rows, complete, bytes, sha1): bytes is the .bin's length, sha1 its SHA-1

A cache is used only when its .bin has the length and SHA-1 its record holds; anything else (a truncated or
overwritten .bin, a record torn or written by an earlier version without a checksum) is rebuilt from the
source, with a note on stderr. Hashing reads the file once per run (about 1.4 GB/s). Both files are written to
temp files and renamed, and no temp file outlives a failure.
"""
import hashlib
import json
import os
import sys

import numpy as np

CHUNK = 1 << 24  # bytes hashed at a time when checking


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
    except (OSError, ValueError) as e:
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


def write_cache(bin_path, documents, source, ctx, n_rows=None):
    """Write the token rows of documents (token lists, cut into rows of ctx, the remainder dropped) to bin_path
    and its record; with n_rows, stop after that many rows. Returns the number of rows. ValueError when there
    is not one row; temp files removed whatever happens."""
    rows, complete, buf, h = 0, True, [], hashlib.sha1()
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
                    f.write(block)
                    h.update(block)
                    rows, buf = rows + n, buf[n * ctx:]
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
