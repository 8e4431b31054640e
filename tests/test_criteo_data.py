"""Criteo pipeline: torchfm-exact encoding, cache, splits, malformed rows, missing file."""
from __future__ import annotations

import itertools
import json
import math
import os
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from dfa_lightning.data import criteo
from dfa_lightning.data.criteo import CriteoDataModule
from dfa_lightning.errors import ConfigError, DatasetError

SAMPLE = Path("/work/shared/data/criteo/train_10k.txt")
needs_sample = pytest.mark.skipif(not SAMPLE.is_file(), reason="shared Criteo sample not available")


def torchfm_reference(path: Path, min_threshold: int) -> tuple[list[int], list[list], list[set]]:
    """Transcription of torchfm 0.7 CriteoDataset's rules: (labels, categories per row, kept categories per field)."""

    def convert(val: str) -> str:
        if val == "":
            return "NULL"
        v = int(val)
        return str(int(math.log(v) ** 2)) if v > 2 else str(v - 2)

    counts = defaultdict(lambda: defaultdict(int))
    labels, rows = [], []
    with open(path) as fh:
        for line in fh:
            values = line.rstrip("\n").split("\t")
            if len(values) != 40:
                continue
            feats = [convert(v) for v in values[1:14]] + values[14:]
            labels.append(int(values[0]))
            rows.append(feats)
            for i, feat in enumerate(feats):
                counts[i][feat] += 1
    kept = [{f for f, c in counts[i].items() if c >= min_threshold} for i in range(39)]
    return labels, rows, kept


def assert_same_as_torchfm(cache: Path, source: Path, min_threshold: int) -> None:
    """Equal to torchfm up to the order of ids inside a field: same field_dims, rare bucket last, bijection."""
    labels, rows, kept = torchfm_reference(source, min_threshold)
    meta = json.loads((cache / "meta.json").read_text())
    x, y = np.load(cache / "x.npy"), np.load(cache / "y.npy")
    dims = [len(k) + 1 for k in kept]
    assert meta["field_dims"] == dims
    assert x.shape == (len(rows), 39) and x.dtype == np.int32
    np.testing.assert_array_equal(y, labels)
    local = x - np.concatenate(([0], np.cumsum(dims)[:-1]))
    for f in range(39):
        mapping = {}
        for r, feats in enumerate(rows):
            if feats[f] in kept[f]:
                assert mapping.setdefault(feats[f], local[r, f]) == local[r, f]
            else:
                assert local[r, f] == dims[f] - 1  # the shared rare bucket is the field's last index
        assert sorted(mapping.values()) == list(range(len(kept[f])))


def make_line(label: str, ints: dict[int, str], cats: dict[int, str]) -> str:
    """A 40-field line: defaults I_k = "5", C_k = "abcdef01", overridden by 1-based field numbers."""
    fields = [label] + [ints.get(i, "5") for i in range(1, 14)] + [cats.get(i, "abcdef01") for i in range(1, 27)]
    return "\t".join(fields)


def test_synthetic_file_matches_hand_computed_encoding(tmp_path):
    long_c, long_i = "0123456789abcdef", "123456789012"  # longer than 8 bytes: the slow path
    lines = [
        make_line("1", {1: "20", 2: "-1", 3: long_i, 13: ""}, {1: "68fd1e64", 2: long_c, 26: ""}),
        make_line("0", {1: "19", 2: "-1", 3: long_i, 13: ""}, {1: "68fd1e64", 2: long_c, 26: "abc"}),
        make_line("0", {1: "", 2: "1", 13: ""}, {1: "", 26: ""}),
        make_line("1", {1: "", 2: "2", 13: ""}, {1: "", 26: ""}),
        make_line("0", {1: "3", 2: "-1", 13: ""}, {1: "05db9164", 26: "x"}),
        make_line("0", {1: "7", 2: "2", 13: ""}, {1: "05db9164", 26: ""}),
    ]
    path = tmp_path / "tiny.txt"
    path.write_text("\n".join(lines))  # no final newline; several lines end with an empty (tab-terminated) field
    assert lines[0].endswith("\t")
    meta = criteo.preprocess(path, tmp_path / "out", min_threshold=2, log_every=0)

    # Categories (torchfm): v > 2 -> floor(ln(v)^2): 20 -> 8, 19 -> 8, 3 -> 1, 7 -> 3, 5 -> 2, 123456789012 -> 652;
    # v <= 2 -> v - 2: -1 -> -3, 1 -> -1, 2 -> 0; empty -> NULL. Kept = seen >= 2 times, numbered in sorted order
    # of the category key (I: the integer, NULL last; C: the value's bytes as a little-endian uint64, values longer
    # than 8 bytes first), then one rare bucket.
    expected_local = {
        0: [0, 0, 1, 1, 2, 2],  # I1: {8 -> 0, NULL -> 1}; 1 and 3 seen once -> rare 2
        1: [0, 0, 2, 1, 0, 1],  # I2: {-3 -> 0, 0 -> 1}; -1 seen once -> rare 2
        2: [1, 1, 0, 0, 0, 0],  # I3: {2 -> 0, 652 -> 1}
        12: [0] * 6,  # I13: {NULL -> 0}
        13: [2, 2, 0, 0, 1, 1],  # C1: {"" -> 0, "05db9164" -> 1, "68fd1e64" -> 2}
        14: [0, 0, 1, 1, 1, 1],  # C2: {long -> 0, "abcdef01" -> 1}
        38: [0, 1, 0, 0, 1, 0],  # C26: {"" -> 0}; "abc" and "x" seen once -> rare 1 (trailing empty fields kept)
    }
    dims = [3, 3, 3] + [2] * 10 + [4, 3] + [2] * 24
    assert meta["field_dims"] == dims
    assert meta["rows"] == meta["lines"] == 6 and meta["bad_lines"] == 0
    offsets = np.concatenate(([0], np.cumsum(dims)[:-1]))
    expected = np.zeros((6, 39), dtype=np.int64)  # constant fields: their one value is kept -> index 0
    for f, col in expected_local.items():
        expected[:, f] = col
    x = np.load(tmp_path / "out" / "x.npy")
    np.testing.assert_array_equal(x, expected + offsets)
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "y.npy"), [1, 0, 0, 1, 0, 0])
    assert_same_as_torchfm(tmp_path / "out", path, 2)


@pytest.fixture(scope="module")
def sample_copy(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("criteo") / "train_10k.txt"
    shutil.copyfile(SAMPLE, path)
    return path


@needs_sample
def test_real_sample_datamodule_and_cache(sample_copy, tmp_path):
    dm = CriteoDataModule(path=str(sample_copy), cache_dir=str(tmp_path / "cache"), batch_size=1000)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.built_cache
    assert dm.meta["rows"] == 10_000 and dm.meta["bad_lines"] == 0
    assert len(dm.field_dims) == 39 and dm.model_hints() == {"field_dims": dm.field_dims}
    assert 0.15 < dm.meta["label_mean"] < 0.35  # 21.82% clicks in this sample
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sizes == {"train": 8000, "val": 1000, "test": 1000}
    everything = np.concatenate(list(dm.splits.values()))
    assert np.array_equal(np.sort(everything), np.arange(10_000))  # disjoint and complete

    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.int64 and x.shape == (1000, 39) and y.dtype == torch.float32 and y.shape == (1000,)
    offsets = np.concatenate(([0], np.cumsum(dm.field_dims)))
    assert ((x >= torch.tensor(offsets[:-1])) & (x < torch.tensor(offsets[1:]))).all()  # each field in its range
    assert sum(len(b[1]) for b in dm.train_dataloader()) == 8000
    assert [len(b[1]) for b in dm.val_dataloader()] == [1000]
    assert len(dm.test_dataloader()) == 1

    # Second run: the cache is reused (nothing rebuilt), the split is the same.
    folder = dm.cache
    stamp = (folder / "x.npy").stat().st_mtime_ns
    dm2 = CriteoDataModule(path=str(sample_copy), cache_dir=str(tmp_path / "cache"))
    dm2.setup()
    assert not dm2.built_cache and dm2.cache == folder and (folder / "x.npy").stat().st_mtime_ns == stamp
    assert all(np.array_equal(dm.splits[k], dm2.splits[k]) for k in dm.splits)

    # Another min_threshold is another cache.
    assert criteo.cache_key(sample_copy, 5) != criteo.cache_key(sample_copy, 10)
    dm3 = CriteoDataModule(path=str(sample_copy), cache_dir=str(tmp_path / "cache"), min_threshold=5)
    dm3.setup()
    assert dm3.built_cache and dm3.cache != folder and sum(dm3.field_dims) > sum(dm.field_dims)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([folder.name, dm3.cache.name])


@needs_sample
def test_real_sample_matches_torchfm_rules(sample_copy, tmp_path):
    criteo.preprocess(sample_copy, tmp_path / "out", min_threshold=10, log_every=0)
    assert_same_as_torchfm(tmp_path / "out", sample_copy, 10)


@needs_sample
def test_block_boundaries_do_not_matter(sample_copy, tmp_path):
    head = tmp_path / "head.txt"
    head.write_text("".join(sample_copy.read_text().splitlines(keepends=True)[:300]))
    criteo.preprocess(head, tmp_path / "a", min_threshold=2, log_every=0)
    criteo.preprocess(head, tmp_path / "b", min_threshold=2, log_every=0, block_bytes=100)  # < one line
    criteo.preprocess(head, tmp_path / "c", min_threshold=2, log_every=0, block_bytes=4099)
    x = np.load(tmp_path / "a" / "x.npy")
    assert x.shape == (300, 39)
    for other in "bc":
        np.testing.assert_array_equal(np.load(tmp_path / other / "x.npy"), x)


@needs_sample
def test_crlf_line_ends_encode_like_lf(tmp_path):
    head = SAMPLE.read_text().splitlines()[:300]
    (tmp_path / "lf.txt").write_text("\n".join(head) + "\n")
    (tmp_path / "crlf.txt").write_bytes(("\r\n".join(head) + "\r\n").encode())
    a = criteo.preprocess(tmp_path / "lf.txt", tmp_path / "a", min_threshold=2, log_every=0)
    b = criteo.preprocess(tmp_path / "crlf.txt", tmp_path / "b", min_threshold=2, log_every=0)
    assert a["field_dims"] == b["field_dims"] and b["bad_lines"] == 0
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "x.npy"), np.load(tmp_path / "b" / "x.npy"))


def _with_bad_lines(sample: Path, dest: Path, bad: dict[int, str], n: int = 2000) -> Path:
    lines = sample.read_text().splitlines()[:n]
    for number, line in bad.items():  # 1-based line numbers
        lines[number - 1] = line
    dest.write_text("\n".join(lines) + "\n")
    return dest


@needs_sample
def test_few_malformed_lines_are_skipped_and_counted_on_every_run(tmp_path, monkeypatch):
    import dfa_lightning.data.criteo as criteo

    said: list[str] = []
    monkeypatch.setattr(criteo, "rank_zero_info", said.append)  # (Lightning's logger may not propagate to caplog)
    path = _with_bad_lines(SAMPLE, tmp_path / "one_bad.txt", {7: "1\t2\t3"})  # 1 of 2000 = 0.05% <= 0.1%
    dm = CriteoDataModule(path=str(path), cache_dir=str(tmp_path / "cache"))
    dm.setup()
    assert dm.meta["rows"] == 1999 and dm.meta["lines"] == 2000 and dm.meta["bad_lines"] == 1
    assert dm.meta["first_bad_line"] == 7 and "3 tab-separated fields" in dm.meta["first_bad_reason"]
    assert [s for s in said if "one_bad.txt: skipped 1 malformed lines of 2,000 (first: line 7" in s]
    said.clear()
    CriteoDataModule(path=str(path), cache_dir=str(tmp_path / "cache")).setup()  # a later run reads the cache
    assert [s for s in said if "skipped 1 malformed lines of 2,000" in s and "counted when the cache" in s], said
    # The cached result is re-checked against a stricter setting.
    with pytest.raises(DatasetError, match="first bad line 7"):
        CriteoDataModule(path=str(path), cache_dir=str(tmp_path / "cache"), max_bad_fraction=0.0).setup()


@needs_sample
def test_too_many_malformed_lines_fail_with_file_and_line(tmp_path):
    good = SAMPLE.read_text().splitlines()[0].split("\t")
    bad = {
        5: "\t".join(["2"] + good[1:]),  # label not 0/1
        10: "\t".join(good[:3] + ["abc"] + good[4:]),  # non-integer I3
        20: "\t".join(good[:-1]),  # 39 fields
    }
    path = _with_bad_lines(SAMPLE, tmp_path / "bad.txt", bad)  # 3 of 2000 = 0.15% > 0.1%
    dm = CriteoDataModule(path=str(path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DatasetError) as err:
        dm.setup()
    message = str(err.value)
    assert str(path) in message and "first bad line 5" in message and "label" in message
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # nothing cached
    # A non-integer I field alone is detected as such.
    path2 = _with_bad_lines(SAMPLE, tmp_path / "bad2.txt", {10: bad[10], 11: bad[10], 12: bad[10]})
    with pytest.raises(DatasetError, match=r"first bad line 10: I3 = b'abc' is not an integer"):
        criteo.preprocess(path2, tmp_path / "out", log_every=0)


def test_missing_file_says_where_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("DFA_DATA_DIR", str(tmp_path))
    with pytest.raises(DatasetError) as err:
        CriteoDataModule().prepare_data()
    assert criteo.DOWNLOAD_URL in str(err.value) and str(tmp_path / "criteo" / "train.txt") in str(err.value)
    assert "45,840,617" in str(err.value)
    with pytest.raises(DatasetError, match="go.criteo.net"):
        CriteoDataModule(path=str(tmp_path / "nope.txt")).setup()


@needs_sample
def test_relative_path_is_looked_up_in_the_data_root_and_the_cache_is_not_written_there(tmp_path, monkeypatch):
    """The data root may be read-only or shared: derived files go to the cache folder, as for every dataset."""
    monkeypatch.setattr(criteo, "DEFAULT_CACHE", tmp_path / "home_cache")
    (tmp_path / "criteo").mkdir()
    head = SAMPLE.read_text().splitlines(keepends=True)[:50]
    (tmp_path / "criteo" / "small.txt").write_text("".join(head))
    dm = CriteoDataModule(path="small.txt", root=str(tmp_path), batch_size=16)
    dm.setup()
    assert dm.meta["rows"] == 50 and dm.cache.parent == tmp_path / "home_cache" / "criteo"
    assert sorted(p.name for p in (tmp_path / "criteo").iterdir()) == ["small.txt"]


def test_a_path_that_is_a_folder_is_named_with_the_files_it_holds(tmp_path):
    (tmp_path / "criteo").mkdir()
    (tmp_path / "criteo" / "train_10k.txt").write_text("")
    with pytest.raises(DatasetError, match=r"Criteo path .*criteo is a folder: point `path:` at the file in it "
                                           r"\(it holds train_10k.txt\)"):
        CriteoDataModule(path=str(tmp_path / "criteo")).setup()


@needs_sample
def test_crash_leaves_no_cache(tmp_path, monkeypatch):
    real = criteo.preprocess

    def crash(path, out_dir, *args, **kwargs):
        real(path, out_dir, *args, **kwargs)
        raise KeyboardInterrupt  # after every file was written, before the rename

    monkeypatch.setattr(criteo, "preprocess", crash)
    head = tmp_path / "head.txt"
    head.write_text("".join(SAMPLE.read_text().splitlines(keepends=True)[:100]))
    with pytest.raises(KeyboardInterrupt):
        criteo.ensure_cache(head, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="split"):
        CriteoDataModule(split=(0.8, 0.1))
    with pytest.raises(ConfigError, match="min_threshold"):
        CriteoDataModule(min_threshold=0)
    with pytest.raises(ConfigError, match="field_dims"):
        CriteoDataModule().field_dims
    with pytest.raises(ConfigError, match=r"criteo batch_size must be >= 2 \(the CTR models' BatchNorm needs two "
                                          r"rows; got 1\)"):  # the first step died in BatchNorm
        CriteoDataModule(batch_size=1)


def test_a_validation_or_test_split_with_one_label_is_refused_as_its_auroc_is_undefined(tmp_path):
    """With every label 0, torchmetrics scored AUROC 0.0 (with a warning) and the best checkpoint was chosen on it."""
    path = tmp_path / "all_zero.txt"
    path.write_text("\n".join(make_line("0", {}, {1: f"{i:08x}"}) for i in range(50)) + "\n")
    dm = CriteoDataModule(path=str(path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match=r"all_zero.txt: the val split \(5 rows\) has only label 0: its AUROC is "
                                          r"undefined"):
        dm.setup("fit")
    with pytest.raises(ConfigError, match=r"the test split \(5 rows\) has only label 0"):
        dm.setup("test")


def test_an_empty_split_the_stage_reads_is_refused_and_one_it_does_not_read_is_allowed(tmp_path):
    """split [1, 0, 0] emptied validation (EarlyStopping then crashed after the first epoch) and test (no TEST
    line); a file scored whole with `test` (split [0, 0, 1]) needs no train rows."""
    path = tmp_path / "mixed.txt"
    path.write_text("\n".join(make_line(str(i % 2), {}, {1: f"{i:08x}"}) for i in range(40)) + "\n")
    with pytest.raises(ConfigError, match=r"mixed.txt: the val split is empty \(40 rows, split \[1.0, 0.0, 0.0\]\)"):
        CriteoDataModule(path=str(path), cache_dir=str(tmp_path / "cache"), split=[1.0, 0.0, 0.0]).setup("fit")
    untested = CriteoDataModule(path=str(path), cache_dir=str(tmp_path / "cache"), split=[0.5, 0.5, 0.0])
    untested.setup("fit")  # fine for a fit that does not test; the CLI asks before a fit that tests (it had trained)
    with pytest.raises(ConfigError, match=r"the test split is empty"):
        untested.check_test_split()
    scored_whole = CriteoDataModule(path=str(path), cache_dir=str(tmp_path / "cache"), split=[0.0, 0.0, 1.0])
    scored_whole.setup("test")
    assert len(scored_whole.splits["test"]) == 40


def test_a_bad_label_a_lone_minus_sign_or_a_control_byte_makes_the_line_bad_not_a_row(tmp_path):
    """Lines skipped and named, not read: a label "10" (as 1), an I field "-" or a byte 0-8 inside a value (which
    the 8-byte keys cannot tell from the end of a shorter value) would each be a wrong row."""
    lines = [make_line(str(i % 2), {}, {1: f"{i:08x}"}) for i in range(8)]
    lines[2] = make_line("10", {}, {})
    lines[4] = make_line("1", {4: "-"}, {})
    lines[6] = make_line("0", {}, {5: "ab\x01cd"})
    path = tmp_path / "odd.txt"
    path.write_text("\n".join(lines) + "\n")
    meta = criteo.preprocess(path, tmp_path / "out", min_threshold=1, max_bad_fraction=1.0, log_every=0)
    assert (meta["lines"], meta["rows"], meta["bad_lines"]) == (8, 5, 3)
    assert meta["first_bad_line"] == 3 and meta["first_bad_reason"] == "label b'10' is not 0 or 1"
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "y.npy"), [0, 1, 1, 1, 1])
    assert criteo.diagnose_line(lines[4].encode().split(b"\t")) == "I4 = b'-' is not an integer"
    assert criteo.diagnose_line(lines[6].encode().split(b"\t")) == "contains a control character (bytes 0-8)"
    for only in (4, 6):  # each alone is caught by the parser, not only by the message
        single = tmp_path / f"only{only}.txt"
        single.write_text("\n".join(lines[:2] + [lines[only]]) + "\n")
        assert criteo.preprocess(single, tmp_path / f"o{only}", min_threshold=1, max_bad_fraction=1.0,
                                 log_every=0)["bad_lines"] == 1


def test_batches_keep_each_row_with_its_own_label(tmp_path):
    """Rows are read in sorted order within a shuffled batch: the labels must follow the same rows. Here C1 names
    the label, so any mix-up shows."""
    path = tmp_path / "paired.txt"
    path.write_text("\n".join(make_line(str(i % 2), {1: str(i)}, {1: f"label{i % 2}"}) for i in range(200)) + "\n")
    dm = CriteoDataModule(path=str(path), cache_dir=str(tmp_path / "cache"), batch_size=32, min_threshold=1)
    dm.setup("fit")
    c1_of_label: dict[int, set[int]] = {0: set(), 1: set()}
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        for x, y in loader:
            for c1, label in zip(x[:, 13].tolist(), y.long().tolist()):
                c1_of_label[label].add(c1)
    assert len(c1_of_label[0]) == len(c1_of_label[1]) == 1 and c1_of_label[0] != c1_of_label[1]
    assert not np.array_equal(dm.splits["train"], np.arange(160))  # a random split, not the file's (time) order


def test_the_cache_key_follows_an_edit_anywhere_in_a_large_file(tmp_path):
    """Only the first and last MiB are hashed: an edit in the middle is seen by the mtime, one in the last MiB by
    the hash even when the mtime is put back (a copy that keeps times)."""
    path = tmp_path / "big.txt"
    data = bytearray(b"0123456789abcdef" * (3 << 16))  # 3 MiB
    path.write_bytes(bytes(data))
    stat = path.stat()
    keys = {criteo.cache_key(path, 10)}
    for offset in (len(data) // 2, len(data) - 10):
        data[offset] ^= 1
        path.write_bytes(bytes(data))
        if offset == len(data) - 10:
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        else:
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        keys.add(criteo.cache_key(path, 10))
    assert len(keys) == 3


def test_a_last_training_batch_of_one_row_is_dropped_and_evaluation_keeps_every_row():
    """BatchNorm cannot train on one row; validation and test must still score all of them."""
    train = criteo._BatchSampler(9, 4, shuffle=True, seed=0, drop_single=True)
    evaluation = criteo._BatchSampler(9, 4, shuffle=False, seed=0, drop_single=False)
    assert len(train) == 2 and [len(b) for b in train] == [4, 4]
    assert len(evaluation) == 3 and np.array_equal(np.concatenate(list(evaluation)), np.arange(9))
    assert [len(b) for b in criteo._BatchSampler(10, 4, shuffle=True, seed=0, drop_single=True)] == [4, 4, 2]


@needs_sample
def test_a_cache_dir_that_cannot_be_written_is_named_as_the_setting_to_change(sample_copy, tmp_path):
    (tmp_path / "afile").write_text("x")
    dm = CriteoDataModule(path=str(sample_copy), cache_dir=str(tmp_path / "afile"))
    with pytest.raises(DatasetError, match=rf"cannot write the Criteo cache in {tmp_path / 'afile'}: .*; set "
                                           r"`cache_dir:` to a writable folder"):
        dm.setup()


def test_a_trailing_blank_line_is_named_as_an_empty_line(tmp_path):
    """It was "1 tab-separated fields, expected 40": a blank line at the end of a hand-cut sample reads as a row
    with one field."""
    path = tmp_path / "blank_end.txt"
    path.write_text("\n".join(make_line(str(i % 2), {}, {1: f"{i:08x}"}) for i in range(40)) + "\n\n")
    with pytest.raises(DatasetError, match=r"1 of 41 lines are malformed .* first bad line 41: an empty line"):
        criteo.preprocess(path, tmp_path / "out", min_threshold=1, log_every=0)


def test_a_fit_that_would_test_on_an_empty_test_split_is_refused_before_training(tmp_path, capsys):
    """``split: [0.8, 0.2, 0.0]`` trained the whole run, wrote its checkpoint, then stopped at the test."""
    from dfa_lightning.cli import main

    path = tmp_path / "mixed.txt"
    path.write_text("\n".join(make_line(str(i % 2), {}, {1: f"{i:08x}"}) for i in range(40)) + "\n")
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "deepfm_bp.yaml"
    assert main(["fit", "--config", str(recipe), "--data.init_args.path", str(path), "--data.init_args.cache_dir",
                 str(tmp_path / "cache"), "--data.init_args.split", "[0.5, 0.5, 0.0]", "--trainer.logger", "false",
                 "--trainer.default_root_dir", str(tmp_path)]) == 2
    assert "the test split is empty" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.ckpt"))


@needs_sample
def test_under_ddp_each_rank_scores_its_own_test_batches_none_twice(sample_copy, tmp_path, monkeypatch):
    """Lightning's own sampler pads the ranks' shares by repeating batches (2 CPU processes: test AUROC 0.5147
    against 0.5213 in one process); the DataModule hands each rank its share, unpadded."""
    from helpers import shards

    dm = CriteoDataModule(path=str(sample_copy), cache_dir=str(tmp_path / "cache"), batch_size=96)
    dm.setup()
    one = [y for _, y in dm.test_dataloader()]  # 11 batches: ranks get 6 and 5
    rank0, rank1 = shards(monkeypatch, lambda: [y for _, y in dm.test_dataloader()])
    assert len(one) == 11 and (len(rank0), len(rank1)) == (6, 5)
    interleaved = [b for pair in itertools.zip_longest(rank0, rank1) for b in pair if b is not None]
    assert len(interleaved) == 11 and all(torch.equal(a, b) for a, b in zip(one, interleaved))
