"""WikiText-2 / WikiText-103 (tokenized v1, with ``<unk>``) for language modelling, batched as the DFA paper (§2.5).

Files. ``<data root>/<name>/{train,valid,test}.txt`` (``root:``, then ``$DFA_DATA_DIR``, then
``~/.cache/dfa_lightning``), i.e. the archive's ``wiki.{train,valid,test}.tokens`` renamed; the original names are
accepted too. The data folder is **never written to**. When files are missing and ``download`` is on, the official
archive (:data:`ARCHIVES`: URL and SHA-256) is downloaded into ``cache_dir``, checked, and its three token files are
extracted to ``<cache_dir>/<name>/``; offline, or with ``download: false``, a
:class:`~dfa_lightning.errors.DatasetError` names the missing files, the folder and the URL.

Tokenizers.

* ``word`` (default): the PyTorch ``word_language_model`` ``Corpus``: ``tokens = line.split() + ['<eos>']`` for every
  line (empty lines included), ids in order of first appearance in the **train** split. Words of valid/test that
  train never saw become ``<unk>`` (none in WikiText-2/103, whose vocabulary is closed). WikiText-2: 2,088,628 /
  217,646 / 245,569 tokens, vocabulary 33,278.
* ``bpe``: a byte-pair-encoding model of ``vocab_size`` tokens trained on the train split with the ``tokenizers``
  library (``pip install tokenizers``), ``<unk>`` and ``<eos>`` kept whole; each line is encoded and followed by
  ``<eos>``. The paper used a 32,000-token ``youtokentome`` BPE on lower-cased WikiText-103 whose model file is not
  shipped; this is the closest reproducible stand-in, not the same segmentation.

Cache. The token ids of each split (``{split}.npy``, int32), the vocabulary (``vocab.json`` or ``tokenizer.json``) and
``meta.json`` are written once to ``<cache_dir>/<name>-<tokenizer>-<key>/``, where ``key`` hashes the format version,
the tokenizer settings and the SHA-256 of the three text files: editing a file or a setting makes a new cache. The
folder is written under a temporary name and renamed, so a crash never leaves a half cache that looks valid.

Batches. As ``batchify`` in ``word_language_model`` (and the paper's 64 streams x 128 tokens = 8192 tokens per
batch): each split's ids are cut to a multiple of ``streams`` and laid out as ``streams`` parallel rows; batch ``i``
is ``x = rows[:, i*seq_len : (i+1)*seq_len]`` and ``y`` the same window shifted by one token (the next token), both
``LongTensor[streams, T]`` with ``T = seq_len`` except maybe a shorter last chunk. Batches go in order (stream
``s`` of batch ``i+1`` continues stream ``s`` of batch ``i``) unless ``shuffle``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
import zipfile
from array import array
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dfa_lightning.data.paths import (DEFAULT_CACHE, ENV_VAR, data_root, download as download_file, make_cache_folder,
                                      sha256sum, warn_cache_fallback)
from dfa_lightning.data.sharding import eval_sampler
from dfa_lightning.errors import ConfigError, DatasetError

__all__ = ["WikiTextDataModule", "StreamChunks", "batchify", "ARCHIVES"]

SPLITS = ("train", "valid", "test")
EOS, UNK = "<eos>", "<unk>"
EOW = "</w>"  # BPE end-of-word suffix
TOKENIZERS = ("word", "bpe")
CACHE_VERSION = 1

#: Official archives (Merity et al. 2016; mirror first, then the original S3 bucket, which serve the same bytes).
#: SHA-256 and sizes as recorded by Hugging Face ``datasets`` (``wikitext/dataset_infos.json``).
ARCHIVES: dict[str, dict] = {
    "wikitext-2": {
        "urls": ["https://wikitext.smerity.com/wikitext-2-v1.zip",
                 "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-v1.zip"],
        "sha256": "92675f1d63015c1c8b51f1656a52d5bdbc33aafa60cc47a218a66e7ee817488c",
        "bytes": 4_475_746,
        "folder": "wikitext-2",
        # the three token files (shared/data/wikitext-2/PROVENANCE.md: byte-identical to the release's)
        "files": {"train": ("9e9fa1ad55b1c2c95b08e37dd8e653f638fac2c6de904b79e813611eefbc985f", 10_797_148),
                  "valid": ("f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8", 1_121_681),
                  "test": ("d790b833ef8cf03a90db7bf1271b7520b83c45ce07ba3c1a9699df81e239eca0", 1_256_449)},
    },
    "wikitext-103": {
        "urls": ["https://wikitext.smerity.com/wikitext-103-v1.zip",
                 "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-103-v1.zip"],
        "sha256": "242ba0f20b329cfdf1ccc61e9e9e5b59becf189db7f7a81cd2a0e2fc31539590",
        "bytes": 190_229_076,
        "folder": "wikitext-103",
    },
}


def _file_names(split: str) -> tuple[str, str]:
    """Accepted names of a split's file: ours first, then the archive's."""
    return f"{split}.txt", f"wiki.{split}.tokens"


# ---------------------------------------------------------------------------------------------------- batching
def batchify(ids: torch.Tensor, streams: int) -> torch.Tensor:
    """``[N]`` -> ``[streams, N // streams]``: the trailing ``N % streams`` tokens are dropped (word_language_model)."""
    n = ids.numel() // streams
    return ids[: n * streams].view(streams, n)


class StreamChunks(Dataset):
    """Item ``i`` = ``(x, y)``, ``LongTensor[streams, T]`` each, ``y`` = ``x`` shifted by one token.

    Args:
        ids: the split's token ids ``[N]`` (any integer dtype; stored as given, returned as int64).
        streams: parallel streams (rows).
        seq_len: tokens per chunk; the last chunk may be shorter (at least one token).
    """

    def __init__(self, ids: torch.Tensor, streams: int, seq_len: int) -> None:
        if streams < 1 or seq_len < 1:
            raise ConfigError(f"WikiTextDataModule: streams ({streams}) and seq_len ({seq_len}) must be >= 1")
        if ids.numel() < 2 * streams:
            raise ConfigError(f"WikiTextDataModule: {ids.numel()} tokens are too few for {streams} streams "
                              "(each stream needs at least 2 tokens)")
        self.rows = batchify(ids, streams)
        self.seq_len = seq_len
        self.length = self.rows.shape[1]  # tokens per stream

    def __len__(self) -> int:
        return (self.length - 1 + self.seq_len - 1) // self.seq_len

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        start = i * self.seq_len
        t = min(self.seq_len, self.length - 1 - start)
        return self.rows[:, start : start + t].long(), self.rows[:, start + 1 : start + 1 + t].long()


# ---------------------------------------------------------------------------------------------------- tokenizers
def _lines(path: Path, lowercase: bool):
    """The file's lines as text; a file that is not UTF-8 text (binary, another encoding) is a DatasetError naming
    the file, line and byte (it was a UnicodeDecodeError traceback, or NUL "words" from a zero-filled file)."""
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if "\0" in line:
                    raise DatasetError(f"{path}:{lineno}: a NUL byte: binary data, not WikiText text (is this the "
                                       "right file, or was it cut short by a crash?)")
                yield line.lower() if lowercase else line
    except UnicodeDecodeError as err:
        lineno, offset = _first_undecodable_byte(path)
        raise DatasetError(f"{path}:{lineno}: not UTF-8 text (byte {offset}: {err.reason}); WikiText files are "
                           "UTF-8: is this the right file?") from None


def _first_undecodable_byte(path: Path) -> tuple[int, int]:
    """The 1-based line and the 0-based file offset of the first byte of ``path`` that is not UTF-8 (for the
    message: the decoder's own position is within its read buffer, not the file)."""
    offset = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return lineno, offset + err.start
            offset += len(raw)
    return 0, offset


def _check_enough_tokens(source: Path | str, count: int, streams: int) -> None:
    """Every split needs 2 tokens per stream: say so at setup, naming the text file, not after a whole fit (an
    empty test.txt) nor as a nameless "0 tokens are too few"."""
    if count < 2 * streams:
        key = "streams" if "train" in Path(str(source)).name else "eval_streams"
        raise DatasetError(f"{source}: {count} tokens, too few for {streams} streams (each needs at least 2 "
                           f"tokens); lower data.init_args.{key} (at most {count // 2} for this file), or check "
                           "that the file is not empty or truncated")


def word_vocab(path: Path, lowercase: bool = False) -> dict[str, int]:
    """Word -> id in order of first appearance (``<eos>`` after each line), as ``Corpus.dictionary``."""
    vocab: dict[str, int] = {}
    for line in _lines(path, lowercase):
        for word in line.split():
            if word not in vocab:
                vocab[word] = len(vocab)
        if EOS not in vocab:
            vocab[EOS] = len(vocab)
    vocab.setdefault(EOS, len(vocab))  # an empty file: 0 tokens (named by the caller), not a KeyError
    return vocab


def word_encode(path: Path, vocab: dict[str, int], lowercase: bool = False) -> np.ndarray:
    """The file's ids, ``line.split() + ['<eos>']`` per line; unknown words -> ``<unk>`` (error if there is none)."""
    out = array("i")
    eos, unk = vocab[EOS], vocab.get(UNK)
    for lineno, line in enumerate(_lines(path, lowercase), 1):
        words = line.split()
        try:
            out.extend([vocab[w] for w in words])
        except KeyError:
            if unk is None:
                bad = next(w for w in words if w not in vocab)
                raise DatasetError(f"{path}:{lineno}: word {bad!r} is not in the train vocabulary, which has no "
                                   f"{UNK} token") from None
            out.extend([vocab.get(w, unk) for w in words])
        out.append(eos)
    return np.frombuffer(out, dtype=np.int32).copy()


def _require_tokenizers():
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise ConfigError("WikiTextDataModule: tokenizer 'bpe' needs the `tokenizers` package "
                          "(pip install tokenizers); or use tokenizer: word") from None
    return tokenizers


def bpe_train(path: Path, vocab_size: int, lowercase: bool = False):
    """A BPE ``tokenizers.Tokenizer`` trained on ``path``: words split on whitespace, ``</w>`` marks a word's last
    piece (so ``decode`` restores the text), ``<unk>`` and ``<eos>`` are special (never split)."""
    tk = _require_tokenizers()
    tokenizer = tk.Tokenizer(tk.models.BPE(unk_token=UNK, end_of_word_suffix=EOW))
    tokenizer.pre_tokenizer = tk.pre_tokenizers.WhitespaceSplit()  # the text is already tokenized: words stay whole
    tokenizer.decoder = tk.decoders.BPEDecoder(suffix=EOW)
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[UNK, EOS], end_of_word_suffix=EOW,
                                     show_progress=False)

    def batches(size: int = 10_000):
        chunk = []
        for line in _lines(path, lowercase):
            chunk.append(line.strip())
            if len(chunk) == size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    tokenizer.train_from_iterator(batches(), trainer=trainer)
    return tokenizer


def bpe_encode(path: Path, tokenizer, lowercase: bool = False, batch: int = 10_000) -> np.ndarray:
    out = array("i")
    eos = tokenizer.token_to_id(EOS)
    lines = [line.strip() for line in _lines(path, lowercase)]
    for i in range(0, len(lines), batch):
        for enc in tokenizer.encode_batch(lines[i : i + batch], add_special_tokens=False):
            out.extend(enc.ids)
            out.append(eos)
    return np.frombuffer(out, dtype=np.int32).copy()


# ---------------------------------------------------------------------------------------------------- module
def _model_vocab(model: nn.Module) -> tuple[int | None, str]:
    """The vocabulary a token model accepts: ``model.vocab_size``, else its first ``nn.Embedding`` (token ids)."""
    size = getattr(model, "vocab_size", None)
    if isinstance(size, int):
        return size, "vocab_size"
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            return module.num_embeddings, f"{name} (nn.Embedding)"
    return None, ""


class WikiTextDataModule(pl.LightningDataModule):
    """WikiText-2/103 as ``streams`` parallel token streams cut in ``seq_len`` chunks (see the module docstring).

    Args:
        name: ``wikitext-2`` or ``wikitext-103`` (default: ``"wikitext-2"``).
        root: data folder holding ``<name>/{train,valid,test}.txt``; None: ``$DFA_DATA_DIR``, then
            ``~/.cache/dfa_lightning`` (default: None).
        tokenizer: ``word`` (word_language_model ``Corpus``) or ``bpe`` (``tokenizers`` BPE trained on train)
            (default: ``"word"``).
        vocab_size: BPE vocabulary size; ignored by ``word`` (default: 32000, the paper's BPE size).
        lowercase: lower-case the text first (the paper lower-cased WikiText-103) (default: False).
        streams: parallel streams = batch rows B (paper: 64) (default: 64).
        seq_len: tokens per chunk T (paper: 128) (default: 128).
        eval_streams: streams for validation and test; None: ``streams`` (default: None).
        shuffle: visit training chunks in random order instead of stream order (default: False).
        download: download the official archive when files are missing (default: True).
        verify: check the three files against the official WikiText-2 release (SHA-256; not known here for
            WikiText-103): a truncated or edited copy was read without a word, and its perplexity looked like the
            paper's; ``false`` to use other text on purpose (default: True).
        cache_dir: where archives and token-id caches are written (default: ``~/.cache/dfa_lightning/wikitext``).
        num_workers: DataLoader workers (chunks are slices of one tensor: 0 is fine) (default: 0).

    After ``setup``: ``vocab_size`` (the data's vocabulary V, what ``model_hints()`` returns), ``vocab`` (id ->
    token), ``ids`` (split -> int32 ids) and ``cache_path``. ``setup`` raises a ConfigError when the trainer's model
    accepts fewer tokens than V (``model.vocab_size``, else its first ``nn.Embedding``).
    """

    def __init__(
        self,
        name: str = "wikitext-2",
        root: str | None = None,
        tokenizer: str = "word",
        vocab_size: int = 32000,
        lowercase: bool = False,
        streams: int = 64,
        seq_len: int = 128,
        eval_streams: int | None = None,
        shuffle: bool = False,
        download: bool = True,
        verify: bool = True,
        cache_dir: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        key = str(name).lower()
        if key in ("wikitext2", "wt2", "2"):
            key = "wikitext-2"
        if key in ("wikitext103", "wt103", "103"):
            key = "wikitext-103"
        if key not in ARCHIVES:
            raise ConfigError(f"WikiTextDataModule: unknown name {name!r}; choose one of {', '.join(ARCHIVES)}")
        if tokenizer not in TOKENIZERS:
            raise ConfigError(f"WikiTextDataModule: unknown tokenizer {tokenizer!r}; choose one of {TOKENIZERS}")
        if tokenizer == "bpe" and vocab_size < 3:
            raise ConfigError(f"WikiTextDataModule: vocab_size must be at least 3 for bpe, got {vocab_size}")
        given_eval = 1 if eval_streams is None else eval_streams  # 0 is refused: `or 1` had let it through
        for arg, value in (("streams", streams), ("seq_len", seq_len), ("eval_streams", given_eval)):
            if int(value) < 1:
                raise ConfigError(f"WikiTextDataModule: {arg} must be >= 1, got {value}")
        self.name, self.root, self.tokenizer = key, root, tokenizer
        self.bpe_vocab_size, self.lowercase = int(vocab_size), bool(lowercase)
        self.streams, self.seq_len = int(streams), int(seq_len)
        self.eval_streams = int(eval_streams) if eval_streams is not None else self.streams
        self.shuffle, self.download, self.num_workers = shuffle, download, num_workers
        self.verify = bool(verify)
        self.cache_dir = cache_dir
        self.ids: dict[str, torch.Tensor] = {}
        self.vocab: list[str] | None = None  # id -> token (word: words; bpe: BPE pieces)
        self.cache_path: Path | None = None

    # ----------------------------------------------------------------------------------------------- files
    @property
    def source_dir(self) -> Path:
        """Where the text files are searched first (never written)."""
        return data_root(self.root) / self.name

    @property
    def work_dir(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir is not None else DEFAULT_CACHE / "wikitext"

    def _find(self, folder: Path, split: str) -> Path | None:
        for fname in _file_names(split):
            if (folder / fname).is_file():
                return folder / fname
        return None

    def text_files(self) -> dict[str, Path]:
        """The three text files, downloading the archive into ``cache_dir`` when allowed and needed."""
        if self.root is not None and not Path(self.root).expanduser().is_dir():
            raise DatasetError(f"{self.name}: the data folder {self.root} (`root:`) does not exist")
        folders = [self.source_dir, self.work_dir / self.name]
        for folder in folders:
            found = {s: self._find(folder, s) for s in SPLITS}
            if all(found.values()):
                if folder != folders[0] and folder.resolve() != folders[0].resolve():
                    warn_cache_fallback(self.name, folders[0], folder, self.root)
                return found  # type: ignore[return-value]
        found = {s: self._find(self.source_dir, s) for s in SPLITS}
        missing = [_file_names(s)[0] for s, path in found.items() if path is None]
        archive = ARCHIVES[self.name]
        if len(missing) < len(SPLITS):  # some of the user's files: a download would silently train on others
            present = ", ".join(path.name for path in found.values() if path is not None)
            raise DatasetError(f"{self.name}: missing {', '.join(missing)} in {self.source_dir}, which holds "
                               f"{present}: the three splits are read from one folder (the release: "
                               f"{archive['urls'][0]}, sha256 {archive['sha256']}); add the missing file(s), or give "
                               "a `root:` without this dataset to use the cache or the download")
        what = (f"{self.name}: missing {', '.join(missing)} in {self.source_dir} (nor in the cache {folders[1]}; "
                f"set {ENV_VAR} or `root:`)")
        if not self.download:
            raise DatasetError(f"{what}. Download {archive['urls'][0]} (sha256 {archive['sha256']}) and unzip "
                               f"wiki.{{train,valid,test}}.tokens there as train.txt, valid.txt, test.txt, or set "
                               "`download: true`")
        self._download_archive(folders[1], what)
        return {s: self._find(folders[1], s) for s in SPLITS}  # type: ignore[misc]

    def _download_archive(self, dest: Path, what: str) -> None:
        archive = ARCHIVES[self.name]
        zip_path = make_cache_folder(self.work_dir, self.work_dir, self.name) / Path(archive["urls"][0]).name
        errors = []
        for url in archive["urls"]:
            try:
                rank_zero_info(f"{self.name}: downloading {url} ({archive['bytes'] / 1e6:.0f} MB) to {zip_path}")
                download_file(url, zip_path, archive["sha256"])
                break
            except DatasetError as err:
                errors.append(str(err))
        else:
            raise DatasetError(f"{what}; the download failed: {' | '.join(errors)}")
        tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}.part"
        try:
            tmp.mkdir(parents=True)
            with zipfile.ZipFile(zip_path) as zf:
                for split in SPLITS:
                    member = f"{archive['folder']}/wiki.{split}.tokens"
                    with zf.open(member) as src, open(tmp / f"{split}.txt", "wb") as out:
                        shutil.copyfileobj(src, out)
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        except (KeyError, zipfile.BadZipFile) as err:
            raise DatasetError(f"{zip_path}: not the expected WikiText archive ({err})") from None
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)

    def cache_key(self, files: dict[str, Path]) -> str:
        digest = hashlib.sha256()
        settings = {"version": CACHE_VERSION, "tokenizer": self.tokenizer, "lowercase": self.lowercase,
                    "vocab_size": self.bpe_vocab_size if self.tokenizer == "bpe" else None}
        digest.update(json.dumps(settings, sort_keys=True).encode())
        known = ARCHIVES[self.name].get("files", {}) if self.verify else {}
        for split in SPLITS:
            file_digest = sha256sum(files[split])
            if split in known and file_digest != known[split][0]:
                size = files[split].stat().st_size
                raise DatasetError(f"{files[split]}: not the official {self.name} {split} split ({size:,} bytes, "
                                   f"sha256 {file_digest[:12]}…; the release's is {known[split][1]:,} bytes, "
                                   f"{known[split][0][:12]}…): truncated or edited? Fetch it again, or set "
                                   "data.init_args.verify: false to use this text on purpose")
            digest.update(f"{split}:{file_digest}".encode())
        return digest.hexdigest()[:16]

    # ----------------------------------------------------------------------------------------------- encoding
    def prepare_data(self) -> None:
        """Download (if needed) and encode once into the cache (rank 0 only under DDP)."""
        self._cache_folder(build=True)

    def _cache_folder(self, build: bool) -> tuple[Path, dict[str, Path]]:
        """The cache folder (built if asked and missing) and the text files it was made from."""
        files = self.text_files()
        folder = self.work_dir / f"{self.name}-{self.tokenizer}-{self.cache_key(files)}"
        if (folder / "meta.json").is_file() or not build:
            return folder, files
        rank_zero_info(f"{self.name}: encoding with the {self.tokenizer} tokenizer into {folder}")
        tmp = make_cache_folder(folder.parent / f".{folder.name}.{uuid.uuid4().hex}.part", self.work_dir, self.name,
                                exist_ok=False)
        try:
            if self.tokenizer == "word":
                vocab = word_vocab(files["train"], self.lowercase)
                encoded = self._encode_splits(files, lambda path: word_encode(path, vocab, self.lowercase))
                (tmp / "vocab.json").write_text(json.dumps(list(vocab), ensure_ascii=False), encoding="utf-8")
                size = len(vocab)
            else:
                tokenizer = bpe_train(files["train"], self.bpe_vocab_size, self.lowercase)
                encoded = self._encode_splits(files, lambda path: bpe_encode(path, tokenizer, self.lowercase))
                tokenizer.save(str(tmp / "tokenizer.json"))
                size = tokenizer.get_vocab_size()
            for split, ids in encoded.items():
                np.save(tmp / f"{split}.npy", ids)
            meta = {"name": self.name, "tokenizer": self.tokenizer, "lowercase": self.lowercase, "vocab_size": size,
                    "tokens": {s: int(len(ids)) for s, ids in encoded.items()},
                    "files": {s: str(files[s]) for s in SPLITS}, "version": CACHE_VERSION}
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
            try:
                os.replace(tmp, folder)
            except OSError:
                if not (folder / "meta.json").is_file():  # not another process finishing first: a real error
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return folder, files

    def _encode_splits(self, files: dict[str, Path], encode) -> dict[str, np.ndarray]:
        """Each split's ids, train first, each checked for size as soon as encoded: a near-empty train.txt is
        named as such, not as the first valid.txt word it lacks."""
        encoded = {}
        for split in SPLITS:
            encoded[split] = encode(files[split])
            _check_enough_tokens(files[split], len(encoded[split]), self._streams(split))
        return encoded

    def _streams(self, split: str) -> int:
        return self.streams if split == "train" else self.eval_streams

    def load(self) -> None:
        """Read the cached ids and vocabulary (building the cache if needed); idempotent."""
        if self.ids:
            return
        folder, files = self._cache_folder(build=True)
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        for split in SPLITS:
            arr = np.load(folder / f"{split}.npy")
            if len(arr) != meta["tokens"][split]:
                raise DatasetError(f"{folder / f'{split}.npy'}: {len(arr)} ids, meta.json says {meta['tokens'][split]}"
                                   "; delete the folder to rebuild it")
            # again for a cache built with fewer streams (named by this run's file: the cache is keyed by content)
            _check_enough_tokens(files[split], len(arr), self._streams(split))
            self.ids[split] = torch.from_numpy(arr)
        if self.tokenizer == "word":
            self.vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        else:
            tk = _require_tokenizers()
            tokenizer = tk.Tokenizer.from_file(str(folder / "tokenizer.json"))
            self.vocab = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
        self.cache_path = folder

    @property
    def vocab_size(self) -> int:
        self.load()
        return len(self.vocab)

    def model_hints(self) -> dict[str, int]:
        """What a data-sized model needs: ``{"vocab_size": V}``."""
        return {"vocab_size": self.vocab_size}

    def setup(self, stage: str | None = None) -> None:
        self.load()
        self._check_model_vocab()

    def _check_model_vocab(self) -> None:
        """A model whose token vocabulary is smaller than the data's would index out of range: say so now."""
        trainer = getattr(self, "trainer", None)
        module = getattr(trainer, "lightning_module", None) if trainer is not None else None
        model = getattr(module, "model", module)
        if not isinstance(model, nn.Module):
            return
        size, where = _model_vocab(model)
        if size is None:
            return
        if size < self.vocab_size:
            raise ConfigError(f"{type(model).__name__}: vocabulary {size} ({where}) is smaller than the "
                              f"{self.name} {self.tokenizer} vocabulary {self.vocab_size}; set the model's "
                              f"vocab_size to {self.vocab_size}")
        max_len = getattr(model, "max_len", None)
        if isinstance(max_len, int) and self.seq_len > max_len:
            raise ConfigError(f"{type(model).__name__}: max_len {max_len} is shorter than the data's seq_len "
                              f"{self.seq_len}; set model.model.init_args.max_len to at least {self.seq_len} (or "
                              f"data.init_args.seq_len to at most {max_len})")
        if size > self.vocab_size:
            rank_zero_warn(f"{type(model).__name__}: vocabulary {size} ({where}) is larger than the data's "
                           f"{self.vocab_size}; the extra rows are never used")

    # ----------------------------------------------------------------------------------------------- loaders
    def dataset(self, split: str) -> StreamChunks:
        self.load()
        return StreamChunks(self.ids[split], self._streams(split), self.seq_len)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        data = self.dataset(split)
        # evaluation under DDP: each rank scores its own chunks, none twice (Lightning's sampler pads)
        sampler = None if split == "train" else eval_sampler(data, self.trainer, "test" if split == "test" else "val")
        return DataLoader(data, batch_size=None, shuffle=shuffle if sampler is None else None, sampler=sampler,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.shuffle)

    def val_dataloader(self) -> DataLoader:
        return self._loader("valid", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
