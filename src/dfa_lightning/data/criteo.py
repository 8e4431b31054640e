"""Criteo Display Advertising Challenge (Kaggle 2014): click-through-rate data for the recommender-system experiments.

The raw file is the challenge's ``train.txt``: tab-separated, no header, 45,840,617 rows of 40 fields
(``label, I1..I13, C1..C26``). ``I*`` are integers (may be empty or negative), ``C*`` 8-hex-digit hashes (may be
empty). Download it from the Criteo AI Lab resources page (https://ailab.criteo.com/ressources/, "Kaggle Display
Advertising Challenge dataset"): :data:`DOWNLOAD_URL` is a 4.3 GB ``.tar.gz`` whose ``train.txt`` is about 11 GB.
It is too large to download automatically, so a missing file is a :class:`~dfa_lightning.errors.DatasetError`.

Preprocessing is exactly torchfm 0.7's ``CriteoDataset`` (the code behind the DFA paper's CTR numbers):

* an integer ``v`` becomes the category ``floor(ln(v)^2)`` when ``v > 2``, else ``v - 2``; empty is its own category;
* every one of the 39 fields is categorical; empty ``C`` values are their own category;
* values seen fewer than ``min_threshold`` times (over the whole file) share one "rare" bucket per field, which is
  the LAST index of the field, so ``field_dims[f] = kept values + 1``.

The only difference is the order of ids inside a field: torchfm numbers kept values in Python ``set`` order (which
changes with ``PYTHONHASHSEED``); here they are numbered in sorted order of their category key, which is
reproducible. The encoding is the same up to that per-field permutation (tests check it against a transcription of
torchfm's rules; the benchmark checks it against torchfm itself). Integers must match ``-?[0-9]+``.

Speed and memory: the file is streamed in 1 MiB blocks of whole lines, parsed with vectorised numpy (separator
search, each value's bytes read as one 64-bit key, digits checked in-register) and every value is mapped to a dense
per-field id by a vectorised open-addressing hash table that also counts it (pass 1, ids written to ``x.npy``).
The ``ln^2`` rule and the ``min_threshold`` cut then run once per distinct value, and pass 2 rewrites ``x.npy`` in
place through one id -> global-index lookup table, without parsing again. Memory grows with the number of distinct
values, not rows: ~90 bytes each, measured (peak RSS 1.4 GB for 13M distinct values, imports included), so ~3 GB
for the ~34M distinct values of the full 45M-row file, well under 8 GiB. Results go to a cache folder (``x.npy``
int32 ``[N, 39]`` global indices, ``y.npy`` uint8 ``[N]``, ``meta.json``) written to a temporary folder and renamed
into place, so a crash never leaves a half cache that looks valid. Progress (rows/s) is logged every
:data:`LOG_EVERY` rows through Lightning's logger (``rank_zero_info``).

Cache key (see :func:`cache_key`): format version, ``min_threshold``, and the input file's fingerprint = size,
mtime (ns) and the SHA-256 of its first and last MiB. Editing or replacing the file therefore rebuilds the cache;
touching it does too (mtime), which is cheap insurance against in-place edits of the middle of the file.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset, Sampler

from dfa_lightning.data.paths import DEFAULT_CACHE, ENV_VAR, data_root, make_cache_folder
from dfa_lightning.data.sharding import eval_sampler
from dfa_lightning.errors import ConfigError, DatasetError

DOWNLOAD_PAGE = "https://ailab.criteo.com/ressources/"
DOWNLOAD_URL = "https://go.criteo.net/criteo-research-kaggle-display-advertising-challenge-dataset.tar.gz"
FULL_ROWS = 45_840_617
NUM_INT, NUM_CAT = 13, 26
NUM_FIELDS = NUM_INT + NUM_CAT  # 39 feature fields (the label is field 0 of each line)
FIELD_NAMES = [f"I{i}" for i in range(1, NUM_INT + 1)] + [f"C{i}" for i in range(1, NUM_CAT + 1)]
CACHE_VERSION = 1

BLOCK_BYTES = 1 << 20  # bytes parsed at a time (~4,400 rows): small enough for the temporaries to stay in cache
BATCH_ROWS = 1 << 15  # parsed rows gathered before the hash-table step (amortises per-call numpy overhead)
LOG_EVERY = 2_000_000  # progress line every this many rows per pass
_PAD = 16  # readable bytes after each block so 8-byte words can be read at any field start
_ALL = np.uint64(0xFFFFFFFFFFFFFFFF)
_SLOW = np.uint64(1 << 63)  # keys with this bit come from the per-field dict of long/odd values
_EMPTY = -1  # free hash-table slot; no key takes this value
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing multiplier
_INT_RE = re.compile(rb"-?[0-9]+")
_NULL_CATEGORY = 1 << 62  # torchfm's 'NULL' category of an empty I field, above every integer's category
_HEADER_BYTES = 128  # x.npy header size (fixed, so the header can be written once the row count is known)


def int_category(text: bytes) -> int:
    """torchfm's category of an I-field value: ``floor(ln(v)^2)`` if ``v > 2`` else ``v - 2``; empty -> NULL.

    Categories of integers never collide (``>= 1`` versus ``<= 0``), so ints stand for torchfm's strings.
    """
    if not text:
        return _NULL_CATEGORY
    v = int(text)
    return int(math.log(v) ** 2) if v > 2 else v - 2


def _valid_int(text: bytes) -> bool:
    return bool(_INT_RE.fullmatch(text)) and -(1 << 62) < int(text) < (1 << 62)


def diagnose_line(fields: list[bytes]) -> str | None:
    """Why a split line is malformed (``None`` if it is fine). Slow, used only to word the error message."""
    if fields in ([b""], [b"\r"]):  # a blank line (often one at the end of a hand-cut sample)
        return "an empty line"
    if len(fields) != NUM_FIELDS + 1:
        return f"{len(fields)} tab-separated fields, expected {NUM_FIELDS + 1}"
    if fields[0] not in (b"0", b"1"):
        return f"label {fields[0][:20]!r} is not 0 or 1"
    for i, value in enumerate(fields[1 : NUM_INT + 1]):
        if value and not _valid_int(value):
            return f"{FIELD_NAMES[i]} = {value[:20]!r} is not an integer"
    if any(re.search(rb"[\x00-\x08]", f) for f in fields):
        return "contains a control character (bytes 0-8)"
    return None


class _Parser:
    """Vectorised parser of blocks of whole lines into ``(labels, keys[39, rows], bad line indices, lines)``.

    A value's key is its raw bytes read as a little-endian uint64 (unique for values of at most 8 bytes, which
    never hold bytes 0-8; empty -> 0). Longer values, or values whose 8th byte is not ASCII, get ids from a
    per-field dict kept across the run (key ``_SLOW | id``). I fields are only validated here (``-?[0-9]+``); their
    torchfm category is computed once per distinct value at the end. Lines with a wrong number of fields, a label
    other than 0/1, a non-integer I field or a control byte (0-8) are bad. A ``\r`` before ``\n`` is dropped (files
    saved with CRLF line ends encode like the original; torchfm would keep it in C26, which only renames values).
    """

    def __init__(self) -> None:
        self.slow_ids: list[dict[bytes, int]] = [{} for _ in range(NUM_FIELDS)]
        self.slow_texts: list[list[bytes]] = [[] for _ in range(NUM_FIELDS)]

    def __call__(self, arr: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        b = arr[:n]
        seps = np.flatnonzero(b <= 10)  # tabs, newlines and stray control bytes (which make their line bad)
        sep_bytes = b[seps]
        ctrl = sep_bytes < 9
        has_ctrl = bool(ctrl.any())
        if has_ctrl:
            bad_pos, seps, sep_bytes = seps[ctrl], seps[~ctrl], sep_bytes[~ctrl]
        nl_at = np.flatnonzero(sep_bytes == 10)  # index in seps of each line end
        n_lines = len(nl_at)
        nl = seps[nl_at]
        per_line = np.diff(nl_at, prepend=-1)
        good = per_line == NUM_FIELDS + 1
        if has_ctrl:
            good[np.searchsorted(nl, bad_pos)] = False
        all_good = bool(good.all())
        if not all_good:
            seps = seps[np.repeat(good, per_line)]
        ends = np.ascontiguousarray(seps.reshape(-1, NUM_FIELDS + 1).T)  # [40, rows], field-major
        starts = np.empty_like(ends)
        starts[1:] = ends[:-1] + 1
        starts[0] = np.concatenate(([0], nl[:-1] + 1))[good]
        length = ends - starts
        length[-1] -= (b[ends[-1] - 1] == 13) & (length[-1] > 0)  # CRLF line ends: drop the \r of the last field

        first = b[starts[0]]
        ok = (length[0] == 1) & ((first | 1) == ord("1"))  # label is exactly "0" or "1"
        labels = first - np.uint8(ord("0"))
        st, ln = starts[1:], length[1:]
        words = np.ndarray((len(arr) - 7,), dtype="<u8", buffer=arr, strides=(1,))
        keys = words[st]
        mask = ~(_ALL << (ln << 3).view(np.uint64))  # low `ln` bytes (all 8 when ln >= 8: numpy shifts out to 0)
        keys &= mask
        slow = (ln > 8) | (keys >= _SLOW)

        # I1..I13 must be -?[0-9]+: map a leading '-' (0x2d) to '0' (0x30), then check every byte is a digit.
        ki, mi = keys[:NUM_INT], mask[:NUM_INT]
        neg = (ki & np.uint64(0xFF)) == ord("-")
        d = np.where(neg, ki + np.uint64(3), ki)
        hi, zero = np.uint64(0xF0F0F0F0F0F0F0F0) & mi, np.uint64(0x3030303030303030) & mi
        digits = ((d & hi) == zero) & (((d + (np.uint64(0x0606060606060606) & mi)) & hi) == zero)
        bad_int = ~digits | (neg & (ln[:NUM_INT] == 1))
        bad_int &= ~slow[:NUM_INT]

        if slow.any():
            for f, r in zip(*np.nonzero(slow)):
                text = bytes(b[st[f, r] : st[f, r] + ln[f, r]])
                if f < NUM_INT and not _valid_int(text):
                    bad_int[f, r] = True
                    continue
                if (i := self.slow_ids[f].get(text)) is None:
                    i = self.slow_ids[f][text] = len(self.slow_texts[f])
                    self.slow_texts[f].append(text)
                keys[f, r] = _SLOW | np.uint64(i)
        ok &= ~bad_int.any(axis=0)
        keys = keys.view(np.int64)
        if all_good and ok.all():
            return labels, keys, np.empty(0, dtype=np.int64), n_lines
        bad = np.sort(np.concatenate((np.flatnonzero(~good), np.flatnonzero(good)[~ok])))
        return labels[ok], keys[:, ok], bad, n_lines

    def text(self, f: int, key: int) -> bytes:
        """The raw value behind ``key`` in field ``f``."""
        if key < 0:  # _SLOW bit set
            return self.slow_texts[f][key & ((1 << 63) - 1)]
        return key.to_bytes(8, "little").rstrip(b"\0")


def _blocks(path: Path, block_bytes: int) -> Iterator[tuple[np.ndarray, int]]:
    """Yield ``(array, n)``: ``array[:n]`` holds whole lines (each ending in ``\n``) and at least ``_PAD`` readable
    bytes follow. A last line without ``\n`` gets one."""
    carry = b""
    with open(path, "rb") as fh:
        while True:
            data = fh.read(block_bytes)
            total = len(carry) + len(data)
            if total == 0:
                return
            if data and (cut := data.rfind(b"\n") + 1) == 0:  # a line longer than the block: keep reading
                carry += data
                continue
            arr = np.empty(total + 1 + _PAD, dtype=np.uint8)
            arr[total:] = 0
            arr[: len(carry)] = np.frombuffer(carry, dtype=np.uint8)
            arr[len(carry) : total] = np.frombuffer(data, dtype=np.uint8)
            if data:
                n, carry = len(carry) + cut, data[cut:]
            else:  # EOF with an unterminated last line
                arr[total] = 10
                n, carry = total + 1, b""
            yield arr, n
            if not data:
                return


class _IdTable:
    """Vectorised open-addressing hash table (linear probing) of one field: int64 key -> dense id ``0..n-1``, plus
    the count of every id. The load factor stays <= 1/2, so a lookup probes ~1.5 slots on average."""

    def __init__(self) -> None:
        self.n = 0
        self.keys = np.empty(1024, dtype=np.int64)  # key of each id
        self.counts = np.zeros(1024, dtype=np.int64)  # rows seen with each id
        self._rebuild(10)

    def _hash(self, keys: np.ndarray) -> np.ndarray:
        return ((keys.view(np.uint64) * _GOLDEN) >> np.uint64(64 - self.bits)).astype(np.intp)

    def _rebuild(self, bits: int) -> None:
        self.bits = bits
        self.slot_key = np.full(1 << bits, _EMPTY, dtype=np.int64)
        self.slot_id = np.zeros(1 << bits, dtype=np.int32)
        keys, ids = self.keys[: self.n], np.arange(self.n, dtype=np.int32)
        slots = self._hash(keys)
        while len(keys):  # distinct keys: claim free slots, losers of a race probe the next slot
            free = self.slot_key[slots] == _EMPTY
            self.slot_key[slots[free]] = keys[free]
            placed = np.zeros(len(keys), dtype=bool)
            placed[free] = self.slot_key[slots[free]] == keys[free]
            self.slot_id[slots[placed]] = ids[placed]
            keys, ids, slots = keys[~placed], ids[~placed], (slots[~placed] + 1) & ((1 << bits) - 1)

    def add(self, keys: np.ndarray) -> np.ndarray:
        """Ids of ``keys`` (new keys get new ids); counts them. Returns int32 ids."""
        if 2 * (self.n + len(keys)) > len(self.slot_key):
            self._rebuild(max(self.bits + 1, int(2 * (self.n + len(keys))).bit_length()))
        slots = self._hash(keys)
        found = self.slot_key[slots]
        hit = found == keys
        if hit.all():  # the common case once a field's frequent values are known
            ids = self.slot_id[slots]
        else:
            ids = np.empty(len(keys), dtype=np.int32)
            todo = np.arange(len(keys))
            mask = len(self.slot_key) - 1
            while True:
                free = found == _EMPTY
                if free.any():  # claim free slots; equal keys write the same value, one of the others wins
                    fs, fk = slots[free], keys[free]
                    self.slot_key[fs] = fk
                    won = self.slot_key[fs] == fk
                    new = np.unique(fs[won])
                    self.slot_id[new] = np.arange(self.n, self.n + len(new), dtype=np.int32)
                    self._grow(self.n + len(new))
                    self.keys[self.n : self.n + len(new)] = self.slot_key[new]
                    self.n += len(new)
                    hit[free] = won
                ids[todo[hit]] = self.slot_id[slots[hit]]
                if hit.all():
                    break
                miss = ~hit
                todo, keys, slots = todo[miss], keys[miss], (slots[miss] + 1) & mask
                found = self.slot_key[slots]
                hit = found == keys
        np.add.at(self.counts, ids, 1)
        return ids

    def _grow(self, size: int) -> None:
        if size > len(self.keys):
            new = max(size, 2 * len(self.keys))
            self.keys = np.resize(self.keys, new)
            self.counts = np.concatenate((self.counts, np.zeros(new - len(self.counts), dtype=np.int64)))


class _Progress:
    """Logs rows and rows/s of one pass every ``every`` rows (0: only at the end)."""

    def __init__(self, phase: str, path: Path, every: int) -> None:
        self.phase, self.path, self.every = phase, path, every
        self.t0, self.rows, self.next = time.perf_counter(), 0, every

    def update(self, rows: int) -> None:
        self.rows += rows
        if self.every and self.rows >= self.next:
            self.next = (self.rows // self.every + 1) * self.every
            self.log()

    def log(self, done: bool = False) -> None:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        state = "done" if done else "..."
        rate = self.rows / dt
        rank_zero_info(f"criteo {self.phase} {self.path.name}: {self.rows:,} rows, {rate:,.0f} rows/s {state}")


def _npy_header(rows: int) -> bytes:
    """A ``.npy`` v1.0 header of exactly ``_HEADER_BYTES`` bytes for an int32 ``[rows, 39]`` array."""
    text = f"{{'descr': '<i4', 'fortran_order': False, 'shape': ({rows}, {NUM_FIELDS}), }}"
    text = text.ljust(_HEADER_BYTES - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(text).to_bytes(2, "little") + text.encode("latin1")


def file_fingerprint(path: str | os.PathLike) -> dict:
    """Cheap identity of a (possibly 11 GB) file: size, mtime (ns) and SHA-256 of its first and last MiB."""
    stat = os.stat(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(1 << 20))
        if stat.st_size > 1 << 20:
            fh.seek(max(stat.st_size - (1 << 20), 1 << 20))
            digest.update(fh.read())
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "head_tail_sha256": digest.hexdigest()}


def cache_key(path: str | os.PathLike, min_threshold: int) -> str:
    """Name of the cache folder of ``path`` preprocessed with ``min_threshold``."""
    payload = {"version": CACHE_VERSION, "min_threshold": min_threshold, **file_fingerprint(path)}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return f"criteo-t{min_threshold}-{digest}"


def _check_bad(path: Path, bad: int, lines: int, first_bad: int | None, reason: str | None, max_bad: float) -> None:
    if bad and bad > max_bad * lines:
        raise DatasetError(
            f"{path}: {bad:,} of {lines:,} lines are malformed ({bad / lines:.3%} > max_bad_fraction="
            f"{max_bad:g}); first bad line {first_bad}: {reason}. Expected the Kaggle Criteo train.txt format: "
            f"40 tab-separated fields (label 0/1, 13 integers, 26 categories)."
        )


def preprocess(
    path: str | os.PathLike,
    out_dir: str | os.PathLike,
    min_threshold: int = 10,
    max_bad_fraction: float = 0.001,
    block_bytes: int = BLOCK_BYTES,
    log_every: int = LOG_EVERY,
) -> dict:
    """Encode a Criteo ``train.txt``-format file into ``out_dir`` (``x.npy``, ``y.npy``, ``meta.json``); return meta.

    Pass 1 parses the file once, maps every value to a dense per-field id with a hash table (counting ids) and
    writes the ids to ``x.npy``. Then the torchfm categories and the ``min_threshold`` cut are applied per distinct
    value, and pass 2 rewrites ``x.npy`` in place through one lookup table (id -> global index), without re-parsing.

    Writes directly into ``out_dir`` (use :func:`ensure_cache` for the atomic, cached version). Raises
    :class:`DatasetError` if more than ``max_bad_fraction`` of the lines are malformed (wrong field count, label not
    0/1, non-integer I field, control byte), naming the first bad line (1-based); fewer bad lines are skipped and
    counted.
    """
    path, out_dir = Path(path), Path(out_dir)
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    parse = _Parser()
    tables = [_IdTable() for _ in range(NUM_FIELDS)]
    lines = bad = rows = 0
    first_bad = reason = None
    labels_parts: list[np.ndarray] = []
    pending: list[np.ndarray] = []
    pending_rows = 0
    progress = _Progress("pass 1/2", path, log_every)
    with open(out_dir / "x.npy", "wb") as fh:
        fh.write(_npy_header(0))

        def flush() -> None:
            nonlocal pending, pending_rows
            keys = np.concatenate(pending, axis=1) if len(pending) > 1 else pending[0]
            ids = np.empty((keys.shape[1], NUM_FIELDS), dtype=np.int32)
            for f in range(NUM_FIELDS):
                ids[:, f] = tables[f].add(keys[f])
            fh.write(ids.tobytes())
            progress.update(pending_rows)
            pending, pending_rows = [], 0

        for arr, n in _blocks(path, block_bytes):
            labels, keys, bad_idx, n_lines = parse(arr, n)
            if len(bad_idx):
                if first_bad is None:
                    first_bad = lines + 1 + int(bad_idx[0])
                    starts = np.concatenate(([0], np.flatnonzero(arr[:n] == 10) + 1))
                    line = bytes(arr[starts[bad_idx[0]] : starts[bad_idx[0] + 1] - 1])
                    reason = diagnose_line(line.split(b"\t")) or "malformed"
                bad += len(bad_idx)
            lines += n_lines
            rows += len(labels)
            labels_parts.append(labels)
            pending.append(keys)
            pending_rows += len(labels)
            if pending_rows >= BATCH_ROWS:
                flush()
        if pending_rows:
            flush()
    progress.log(done=True)
    _check_bad(path, bad, lines, first_bad, reason, max_bad_fraction)
    if rows == 0:
        raise DatasetError(f"{path}: no valid rows (empty file?)")

    # Per field: distinct value -> category (I fields: torchfm's ln^2 rule) -> kept (count >= min_threshold)
    # categories numbered in sorted order, then the rare bucket. `lut` maps (field, id) -> global index.
    field_dims, luts = [], []
    for f, table in enumerate(tables):
        keys, counts = table.keys[: table.n], table.counts[: table.n]
        if f < NUM_INT:
            keys = np.array([int_category(parse.text(f, int(k))) for k in keys], dtype=np.int64)
        cats, inverse = np.unique(keys, return_inverse=True)
        cat_counts = np.bincount(inverse, weights=counts, minlength=len(cats))
        kept = cat_counts >= min_threshold
        local = np.where(kept, np.cumsum(kept) - 1, kept.sum())  # rare categories share the last index
        field_dims.append(int(kept.sum()) + 1)
        luts.append(local[inverse])
    offsets = np.concatenate(([0], np.cumsum(field_dims)[:-1]))
    if sum(field_dims) >= 2**31:
        raise DatasetError(f"{path}: {sum(field_dims):,} categories do not fit int32; raise min_threshold")
    lut = np.concatenate([(lt + off).astype(np.int32) for lt, off in zip(luts, offsets)])
    id_offsets = np.concatenate(([0], np.cumsum([len(lt) for lt in luts])[:-1])).astype(np.int32)
    tables.clear()  # free the hash tables before pass 2
    luts.clear()

    progress = _Progress("pass 2/2", path, log_every)
    chunk = 1 << 16
    with open(out_dir / "x.npy", "r+b") as fh:
        fh.write(_npy_header(rows))
        for start in range(0, rows, chunk):
            block = np.fromfile(fh, dtype=np.int32, count=min(chunk, rows - start) * NUM_FIELDS)
            block = block.reshape(-1, NUM_FIELDS)
            block += id_offsets
            fh.seek(_HEADER_BYTES + start * NUM_FIELDS * 4)
            fh.write(lut[block].tobytes())
            progress.update(len(block))
    progress.log(done=True)
    y = np.concatenate(labels_parts)
    np.save(out_dir / "y.npy", y)
    meta = {
        "version": CACHE_VERSION,
        "source": str(path),
        "fingerprint": file_fingerprint(path),
        "min_threshold": min_threshold,
        "lines": lines,
        "rows": rows,
        "bad_lines": bad,
        "first_bad_line": first_bad,
        "first_bad_reason": reason,
        "label_mean": float(y.mean()),
        "field_names": FIELD_NAMES,
        "field_dims": field_dims,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def ensure_cache(
    path: str | os.PathLike,
    cache_dir: str | os.PathLike,
    min_threshold: int = 10,
    max_bad_fraction: float = 0.001,
    **kwargs,
) -> tuple[Path, dict, bool]:
    """Return ``(folder, meta, built)`` of the cache of ``path``, preprocessing it first if needed (``built``).

    The folder is written as ``cache_dir/.tmp-*`` and renamed when complete; a cache that exists is reused after
    re-checking the bad-line fraction against ``max_bad_fraction``. Extra ``kwargs`` go to :func:`preprocess`.
    """
    path, cache_dir = Path(path), Path(cache_dir).expanduser()
    final = cache_dir / cache_key(path, min_threshold)
    meta_file = final / "meta.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        _check_bad(path, meta["bad_lines"], meta["lines"], meta["first_bad_line"], meta["first_bad_reason"],
                   max_bad_fraction)
        _say_skipped(path, meta, final)
        return final, meta, False
    tmp = make_cache_folder(cache_dir / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}", cache_dir,
                            "Criteo", exist_ok=False)
    try:
        meta = preprocess(path, tmp, min_threshold, max_bad_fraction, **kwargs)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: keep its (identical) cache
            if not meta_file.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _say_skipped(path, meta)
    return final, meta, True


def _say_skipped(path: Path, meta: dict, cache: Path | None = None) -> None:
    """The malformed lines left out of the data, said on every run that reads the cache (said only when it was
    built, a later run trained on fewer rows than the file holds without a word)."""
    if meta["bad_lines"]:
        where = f" (counted when the cache {cache} was built)" if cache is not None else ""
        rank_zero_info(f"criteo {path.name}: skipped {meta['bad_lines']:,} malformed lines of {meta['lines']:,} "
                       f"(first: line {meta['first_bad_line']}, {meta['first_bad_reason']}){where}")


class _RowBatches(Dataset):
    """Rows of the cache as whole batches: ``dataset[array_of_positions] -> (x LongTensor[B, 39], y FloatTensor[B])``.

    Opens the memmaps lazily so the dataset pickles cheaply into DataLoader workers.
    """

    def __init__(self, folder: Path, rows: np.ndarray) -> None:
        self.folder, self.rows = folder, rows
        self._x = self._y = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_x": None, "_y": None}

    def __getitem__(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        if self._x is None:
            self._x = np.load(self.folder / "x.npy", mmap_mode="r")
            self._y = np.load(self.folder / "y.npy", mmap_mode="r")
        rows = np.sort(self.rows[positions])  # sorted reads are sequential on disk; order inside a batch is free
        x = torch.from_numpy(self._x[rows].astype(np.int64))
        y = torch.from_numpy(self._y[rows].astype(np.float32))
        return x, y


class _BatchSampler(Sampler):
    """Yields arrays of positions, one per batch (a per-row sampler + collate is ~50x slower at batch 2048).

    Shuffled order depends only on ``(seed, epoch)``; Lightning calls :meth:`set_epoch` before each epoch. A last
    training batch of a single row is dropped (BatchNorm cannot train on one row).
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, drop_single: bool) -> None:
        self.n, self.batch_size, self.shuffle, self.seed, self.drop_single = n, batch_size, shuffle, seed, drop_single
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (rest > (1 if self.drop_single else 0))

    def __iter__(self) -> Iterator[np.ndarray]:
        if self.shuffle:
            order = np.random.default_rng((self.seed, self.epoch)).permutation(self.n)
            self.epoch += 1  # a fresh order next time even outside Lightning
        else:
            order = np.arange(self.n)
        for i in range(len(self)):
            yield order[i * self.batch_size : (i + 1) * self.batch_size]


class CriteoDataModule(pl.LightningDataModule):
    """Criteo Kaggle CTR data: ``(x LongTensor[B, 39] global category indices, y FloatTensor[B] clicks)``.

    ``x`` indexes ONE embedding table of ``sum(field_dims)`` rows (per-field offsets already added), which is what
    the CTR models expect. ``field_dims`` is only known after preprocessing: read it from :meth:`model_hints` or
    :attr:`field_dims` after :meth:`setup`.

    Args:
        path: the Criteo ``train.txt`` (or any file in its format, e.g. the 10k-row sample ``train_10k.txt``). A
            relative path that does not exist is looked up in ``<data root>/criteo/``. Default
            ``<data root>/criteo/train.txt``; the data root is ``root``, else ``$DFA_DATA_DIR``, else
            ``~/.cache/dfa_lightning``.
        root: data root folder (overrides ``$DFA_DATA_DIR``), so recipes can stay machine-independent.
        cache_dir: where preprocessed caches go (default ``~/.cache/dfa_lightning/criteo``, as every dataset's
            derived files: the data root may be read-only or shared; the full data's cache is about 7 GB, so point
            it at a large disk); must be writable. Caches are keyed by the input file and ``min_threshold`` so
            several variants can live side by side.
        batch_size: training batch size (2048 in the DFA paper's CTR runs).
        eval_batch_size: validation/test batch size (default: ``batch_size``); larger is faster, results are equal.
        num_workers: DataLoader worker processes; batches are memmap slices, so 0 is usually fast enough.
        min_threshold: values seen fewer times share one bucket per field (torchfm/paper default 10); smaller values
            give bigger embedding tables.
        split: train/val/test fractions of the rows (80/10/10 in the paper); sizes are ``int(N*f)`` for train and
            val, the rest for test, as in the reference code (whose ``random_split`` picks other rows: the split
            here is ``numpy.random.default_rng(seed).permutation``, stable across torch versions).
        seed: seed of the random split (and of the shuffling order), so every run sees the same test rows.
        max_bad_fraction: malformed lines allowed before failing (skipped and counted below it); a corrupt or
            wrong-format file fails fast instead of training on garbage.
        shuffle: shuffle training batches each epoch.
    """

    def __init__(
        self,
        path: str | None = None,
        root: str | None = None,
        cache_dir: str | None = None,
        batch_size: int = 2048,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        min_threshold: int = 10,
        split: Sequence[float] = (0.8, 0.1, 0.1),
        seed: int = 42,
        max_bad_fraction: float = 0.001,
        shuffle: bool = True,
    ) -> None:
        super().__init__()
        if len(split) != 3 or any(f < 0 for f in split) or abs(sum(split) - 1) > 1e-6:
            raise ConfigError(f"criteo split must be three non-negative fractions summing to 1, got {list(split)}")
        if batch_size < 2 or (eval_batch_size is not None and eval_batch_size < 1):  # batch 1: BatchNorm's
            raise ConfigError(f"criteo batch_size must be >= 2 (the CTR models' BatchNorm needs two rows; got "
                              f"{batch_size}) and eval_batch_size >= 1 (got {eval_batch_size})")
        if min_threshold < 1:
            raise ConfigError(f"criteo min_threshold must be >= 1, got {min_threshold}")
        self.save_hyperparameters()
        self.path, self.root, self.cache_dir = path, root, cache_dir
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.min_threshold, self.split = num_workers, min_threshold, tuple(split)
        self.seed, self.max_bad_fraction, self.shuffle = seed, max_bad_fraction, shuffle
        self.cache: Path | None = None
        self.meta: dict | None = None
        self.built_cache = False  # True when this instance preprocessed the file (False: an existing cache was used)
        self.splits: dict[str, np.ndarray] = {}

    def source_path(self) -> Path:
        """The input file, or a DatasetError that says where to download it."""
        folder = data_root(self.root) / "criteo"
        path = Path(self.path).expanduser() if self.path else folder / "train.txt"
        if self.path and not path.is_absolute() and not path.exists():
            path = folder / path
        if path.is_dir():
            held = sorted(f.name for f in path.glob("*.txt"))
            raise DatasetError(f"Criteo path {path} is a folder: point `path:` at the file in it"
                               + (f" (it holds {', '.join(held)})" if held else " (it holds no .txt file)"))
        if not path.is_file():
            raise DatasetError(
                f"Criteo file not found: {path}. Download the Kaggle Display Advertising Challenge dataset from "
                f"{DOWNLOAD_URL} (listed on {DOWNLOAD_PAGE}; 4.3 GB .tar.gz, train.txt is ~11 GB uncompressed with "
                f"{FULL_ROWS:,} rows), extract train.txt to {folder} (set {ENV_VAR} or `root:`), or point `path:` "
                f"at a file in the same format."
            )
        return path

    def _cache_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else DEFAULT_CACHE / "criteo"

    def _ensure(self) -> None:
        if self.cache is None:
            self.cache, self.meta, built = ensure_cache(
                self.source_path(), self._cache_dir(), self.min_threshold, self.max_bad_fraction
            )
            self.built_cache = self.built_cache or built

    def prepare_data(self) -> None:
        """Preprocess into the cache once (Lightning runs this on one process per node)."""
        self._ensure()

    def setup(self, stage: str | None = None) -> None:
        """Open the cache (preprocessing first if :meth:`prepare_data` was not called) and draw the split."""
        if not self.splits:
            self._ensure()
            n = self.meta["rows"]
            n_train, n_val = int(n * self.split[0]), int(n * self.split[1])
            perm = np.random.default_rng(self.seed).permutation(n)
            parts = (perm[:n_train], perm[n_train : n_train + n_val], perm[n_train + n_val :])
            self.splits = {name: np.sort(p) for name, p in zip(("train", "val", "test"), parts)}
        used = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}.get(stage or "", ())
        self._check_splits(used)

    def check_test_split(self) -> None:
        """The test split of a fit that tests at its end: an empty one stopped the run after the whole training."""
        self.setup()
        self._check_splits(("test",))

    def _check_splits(self, names: Sequence[str]) -> None:
        """A split the stage reads must have rows, and val/test both labels: with one, AUROC is undefined and
        torchmetrics reports 0 or 1 with only a warning, and the best checkpoint is chosen on that number."""
        y = np.load(self.cache / "y.npy", mmap_mode="r")
        source = self.source_path()
        for name in names:
            rows = self.splits[name]
            if len(rows) == 0:
                raise ConfigError(f"criteo {source}: the {name} split is empty ({self.meta['rows']} rows, split "
                                  f"{list(self.split)}); give it a larger fraction, or use more rows")
            if name != "train":
                labels = y[rows]
                if labels.min() == labels.max():
                    raise ConfigError(f"criteo {source}: the {name} split ({len(rows)} rows) has only label "
                                      f"{int(labels[0])}: its AUROC is undefined (reported as 0 or 1); use more rows "
                                      "or another split")

    @property
    def field_dims(self) -> list[int]:
        """Categories per field (39 ints, each including the rare-value bucket); available after :meth:`setup`."""
        if self.meta is None:
            raise ConfigError("CriteoDataModule.field_dims is known only after prepare_data()/setup()")
        return list(self.meta["field_dims"])

    def model_hints(self) -> dict:
        """Constructor/build arguments the data imposes on the model: ``{"field_dims": list[int]}``."""
        return {"field_dims": self.field_dims}

    def _loader(self, split: str, train: bool) -> DataLoader:
        if not self.splits:
            self.setup()
        rows = self.splits[split]
        bs = self.batch_size if train else self.eval_batch_size
        sampler = _BatchSampler(len(rows), bs, shuffle=train and self.shuffle, seed=self.seed, drop_single=train)
        if not train:  # under DDP each rank scores its own batches, none twice (Lightning's sampler pads)
            sampler = eval_sampler(sampler, self.trainer, "test" if split == "test" else "val")
        return DataLoader(_RowBatches(self.cache, rows), sampler=sampler, batch_size=None,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
