"""Planetoid citation graphs (Cora, CiteSeer, PubMed) as a full-batch LightningDataModule.

Where the files are read and written:

* The original files ``<Name>/raw/ind.<name>.{x,tx,allx,y,ty,ally,graph,test.index}`` are looked up in
  ``data_root(root)/"planetoid"`` (``root:``, then ``$DFA_DATA_DIR``, then ``~/.cache/dfa_lightning``).
* That folder is **never written to** (it may be a read-only shared copy). The files are copied to a work folder,
  ``cache_dir`` (default ``~/.cache/dfa_lightning/planetoid``), where PyG writes ``<Name>/processed/``. A file is
  copied again only when its size or modification time changed, and then ``processed/`` is rebuilt. When the data
  folder *is* the work folder (the default setup) nothing is copied.
* Missing files are downloaded (when ``download`` is on) from the original planetoid repository into the work
  folder. Offline, or with ``download: false``, a :class:`~dfa_lightning.errors.DatasetError` names the dataset,
  the folder searched and each missing file.
* Every file, local or downloaded, is checked against its known git blob id at each setup (a few MB of hashing);
  one that differs (truncated, modified) is a DatasetError naming it, both ids and the fix.

Every dataloader yields the same :class:`torch_geometric.data.Data` object once per epoch (full batch). Lightning
moves it to the device through ``Data.to``, which works in place: the graph is copied to the GPU once and stays
there for the following epochs. With ``link_split: true`` the edges are split by
:class:`torch_geometric.transforms.RandomLinkSplit` for link prediction (GAE, paper §2.4) and the train / val / test
loaders yield the train / val / test split graphs (``pos_edge_label_index``, plus ``neg_edge_label_index`` for val
and test).
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from dfa_lightning.data.paths import (DEFAULT_CACHE, ENV_VAR, data_root, download as download_file, make_cache_folder,
                                      warn_cache_fallback)
from dfa_lightning.errors import ConfigError, DatasetError

__all__ = ["PlanetoidDataModule", "stratified_kfold"]

NAMES = {"cora": "Cora", "citeseer": "CiteSeer", "pubmed": "PubMed"}
PARTS = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")
URL = "https://github.com/kimiyoung/planetoid/raw/master/data"
TRANSFORMS = ("normalize_features", "target_indegree", "none")
SPLITS = ("public", "full", "dna_kfold")

# git blob ids (``git hash-object``) of the original files, from shared/data/planetoid/PROVENANCE.md.
GIT_BLOB_IDS = {
    "ind.citeseer.allx": "592091071ac35b78599c722d0e60b1c655711728",
    "ind.citeseer.ally": "7503f81a0b6ac1cc21cb5a97073542a6b1dfe99c",
    "ind.citeseer.graph": "a01dca663d0103c130f525017a4a9c313037e286",
    "ind.citeseer.test.index": "62d9e3d5ed53c66b069125af98529d76c70d9b3e",
    "ind.citeseer.tx": "b2aff18aa1fc6f4f5e8c64db7643b59b24e42584",
    "ind.citeseer.ty": "3795f79df0cd1123f4478b77c148a5fbacc4cefb",
    "ind.citeseer.x": "f094104a66f2689ffbd01085fe6a856689e9db9e",
    "ind.citeseer.y": "e857ac49b611da98e101a068cf4855350274f68a",
    "ind.cora.allx": "44d53b1fece343538e45592caac521d73c6f98d6",
    "ind.cora.ally": "04fbd0b083d09341fcf16b395c642329637f0542",
    "ind.cora.graph": "4d3bf85dfc8b1c105a2c995597a1b3eed6947925",
    "ind.cora.test.index": "ded8092db4cd767a367eebe09003b954a5316f24",
    "ind.cora.tx": "6e856d777401ee15dc8619db76c97d0a40ba2d60",
    "ind.cora.ty": "da1734ab670b5c8ecee78a9c30b35566df916f4b",
    "ind.cora.x": "c4a91d008245403e7f26aa616b437191509793c0",
    "ind.cora.y": "58e30ef120d3553cfaac33ff28c6b5436dbef661",
    "ind.pubmed.allx": "3b86bccf08111c37c632a9dd8ab63db25ea76361",
    "ind.pubmed.ally": "4c8bcdc80882dd225fe4dd4fafd723baa616ac97",
    "ind.pubmed.graph": "76eb87e628a6b9d43fc31ea42c8c6c8f3e52b404",
    "ind.pubmed.test.index": "41f6befcb7750cc4858cb852f2b349a9598cb2f4",
    "ind.pubmed.tx": "eee4f3c988fde0da87a9ec7b01ca5e7863c1b1f1",
    "ind.pubmed.ty": "225a0bb9bb6430e3925d04688daf6a0da964c07a",
    "ind.pubmed.x": "16c0eca8d2b3297014ff80327416f9332eda10d7",
    "ind.pubmed.y": "e86670576c85340eeb2271b3c918bfa89322b2cf",
}


def git_blob_id(path: str | os.PathLike) -> str:
    """What ``git hash-object <path>`` prints."""
    data = Path(path).read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def stratified_kfold(y: torch.Tensor, k: int = 5, seed: int = 0) -> list[torch.Tensor]:
    """Split ``range(len(y))`` into ``k`` disjoint index folds with (to ±1 node) the same class mix each.

    Shuffles with ``seed``, groups nodes by class, and deals them out round-robin: fold sizes differ by at most one,
    and so do the per-fold counts of every class. (Same proportions as scikit-learn's
    ``StratifiedKFold(k, shuffle=True)``, not the same node ids.)
    """
    n = y.numel()
    if k < 2 or n < k:
        raise ConfigError(f"stratified_kfold: need 2 <= k <= number of nodes, got k={k} for {n} nodes")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen)
    grouped = perm[torch.sort(y.view(-1)[perm].cpu(), stable=True).indices]
    fold_of = torch.empty(n, dtype=torch.long)
    fold_of[grouped] = torch.arange(n) % k
    return [(fold_of == f).nonzero().view(-1) for f in range(k)]


def _index_to_mask(index: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[index] = True
    return mask


def _first(batch):
    return batch[0]


class PlanetoidDataModule(pl.LightningDataModule):
    """Cora / CiteSeer / PubMed, full batch (see the module docstring for where files are read and written).

    Args:
        name: ``Cora``, ``CiteSeer`` or ``PubMed`` (case-insensitive) (default: ``Cora``).
        root: data folder holding ``planetoid/<Name>/raw``; None: ``$DFA_DATA_DIR``, then
            ``~/.cache/dfa_lightning`` (default: None).
        transform: ``normalize_features`` (GCN, Cheb, GAT, GAE), ``target_indegree`` (Spline: TargetIndegree edge
            pseudo-coordinates in ``edge_attr``) or ``none`` (DNA) (default: ``normalize_features``).
        split: ``public`` (Planetoid masks: 20 per class / 500 / 1000), ``full`` (PyG's ``split="full"``: the
            public validation and test nodes, and every other node for training: 1,208 on Cora) or ``dna_kfold`` (the
            paper's DNA split: 5 stratified folds shuffled with ``seed``; train = fold 0, val = fold 1, test = folds
            2-4) (default: ``public``).
        seed: seed of the ``dna_kfold`` and ``link_split`` splits (default: 0).
        download: download missing files from the original planetoid repository (default: True).
        cache_dir: work folder where the files are copied and PyG writes ``processed/``
            (default: ``~/.cache/dfa_lightning/planetoid``).
        link_split: split the edges for link prediction (GAE) with ``RandomLinkSplit(is_undirected=True,
            split_labels=True, add_negative_train_samples=False)`` (default: False).
        link_val, link_test: fraction of edges held out for validation / test when ``link_split`` (default: 0.05,
            0.1, as ``train_test_split_edges`` in the paper).
    """

    def __init__(
        self,
        name: str = "Cora",
        root: str | None = None,
        transform: Literal["normalize_features", "target_indegree", "none"] | None = "normalize_features",
        split: Literal["public", "full", "dna_kfold"] = "public",
        seed: int = 0,
        download: bool = True,
        cache_dir: str | None = None,
        link_split: bool = False,
        link_val: float = 0.05,
        link_test: float = 0.1,
    ) -> None:
        super().__init__()
        key = str(name).lower()
        if key not in NAMES:
            raise ConfigError(f"PlanetoidDataModule: unknown name {name!r}; choose one of {', '.join(NAMES.values())}")
        transform = "none" if transform is None else str(transform).lower()
        if transform not in TRANSFORMS:
            raise ConfigError(f"PlanetoidDataModule: unknown transform {transform!r}; choose one of {TRANSFORMS}")
        if split not in SPLITS:
            raise ConfigError(f"PlanetoidDataModule: unknown split {split!r}; choose one of {SPLITS}")
        if link_split and not (0 < link_val < 1 and 0 < link_test < 1 and link_val + link_test < 1):
            raise ConfigError(f"PlanetoidDataModule: link_val={link_val} and link_test={link_test} must be in "
                              "(0, 1) and sum to less than 1 (validation and test each need edges)")
        self.name = NAMES[key]
        self.root = root
        self.transform = transform
        self.split = split
        self.seed = seed
        self.download = download
        self.cache_dir = cache_dir
        self.link_split = link_split
        self.link_val = link_val
        self.link_test = link_test
        self.data = None  # the whole graph, after transform and split masks
        self._splits: dict[str, object] = {}
        self.num_features: int | None = None
        self.num_classes: int | None = None

    # ----------------------------------------------------------------------------------------------- files
    @property
    def raw_names(self) -> list[str]:
        return [f"ind.{self.name.lower()}.{part}" for part in PARTS]

    @property
    def source_dir(self) -> Path:
        """Where the original files are searched (never written)."""
        return data_root(self.root) / "planetoid" / self.name / "raw"

    @property
    def work_root(self) -> Path:
        """The ``root`` handed to PyG's Planetoid: it reads ``<Name>/raw`` and writes ``<Name>/processed`` there."""
        return Path(self.cache_dir).expanduser() if self.cache_dir is not None else DEFAULT_CACHE / "planetoid"

    def _sync_raw_files(self) -> None:
        """Copy the original files into the work folder and download the missing ones (see module docstring)."""
        src, dst = self.source_dir, self.work_root / self.name / "raw"
        if self.root is not None and not Path(self.root).expanduser().is_dir():
            raise DatasetError(f"Planetoid {self.name}: the data folder {self.root} (`root:`) does not exist")
        same = src.exists() and dst.exists() and os.path.samefile(src, dst)
        changed, missing, from_cache = False, [], []
        for fname in self.raw_names:
            s, d = src / fname, dst / fname
            if s.is_file():
                self._check_original(s)  # every time, not only when first copied: see _check_original
                if same:
                    continue
                st = s.stat()
                if d.is_file():
                    dt = d.stat()
                    if dt.st_size == st.st_size and int(dt.st_mtime) == int(st.st_mtime):
                        continue
                dst.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=dst, prefix=f".{fname}.", suffix=".part")
                os.close(fd)
                try:
                    shutil.copy2(s, tmp)
                    os.replace(tmp, d)
                finally:
                    if os.path.exists(tmp):
                        os.remove(tmp)
                changed = True
            elif d.is_file():
                self._check_original(d)  # a cache copy (downloaded earlier) can be cut short too
                from_cache.append(fname)
            else:
                missing.append(fname)
        if from_cache and not same:
            files = "the files" if len(from_cache) == len(self.raw_names) else ", ".join(from_cache)
            warn_cache_fallback(f"Planetoid {self.name}: {files}", src, dst, self.root)
        if missing:
            searched = str(src) if same else f"{src} (nor in the cache {dst})"
            what = f"Planetoid {self.name}: missing {', '.join(missing)} in {searched}"
            fix = (f"Place the original file(s) there (set {ENV_VAR} or `root:` to the folder holding "
                   f"planetoid/{self.name}/raw)")
            if not self.download:
                raise DatasetError(f"{what}. Downloading is off (download: false). {fix}, or allow download.")
            for fname in missing:
                try:
                    download_file(f"{URL}/{fname}", dst / fname)
                except DatasetError as err:
                    raise DatasetError(f"{what}, and downloading from {URL} failed: {err}. {fix}.") from None
                expected, got = GIT_BLOB_IDS.get(fname), git_blob_id(dst / fname)
                if expected is not None and got != expected:
                    (dst / fname).unlink()
                    raise DatasetError(f"{what}; the downloaded {fname} has git blob id {got}, expected {expected} "
                                       f"(file removed). {fix}.")
            changed = True
        if changed:
            shutil.rmtree(self.work_root / self.name / "processed", ignore_errors=True)

    def _check_original(self, path: Path) -> None:
        """A local file must be the original (its git blob id): a truncated ``test.index`` would otherwise shrink
        the test set without a word. Checked at every sync, not only on the first copy: a ``processed/`` folder
        built from a bad file by an earlier version, or a file edited in place, would keep being used. (Cheap: the
        largest file, PubMed's ``allx``, is 7 MB.)"""
        expected = GIT_BLOB_IDS.get(path.name)
        if expected is None:  # a name without a known id: nothing to compare with
            return
        got = git_blob_id(path)
        if got != expected:
            raise DatasetError(f"Planetoid {self.name}: {path} is not the original file (git blob id {got}, expected "
                               f"{expected}; truncated or modified?). Replace it with the original from "
                               f"{URL}/{path.name}, or delete it to download it again.")

    def prepare_data(self) -> None:
        """Copy / download the files and let PyG process them (runs on one process per node)."""
        self._prepared_dataset()

    def _prepared_dataset(self):
        """Sync the raw files and load (processing once) under a file lock on the work folder: independent runs
        sharing one cache (a seed sweep, two recipes at once) must not read a ``processed/`` file another is writing."""
        from filelock import FileLock

        lock_dir = make_cache_folder(self.work_root / self.name, self.work_root, f"Planetoid {self.name}")
        with FileLock(str(lock_dir / ".lock")):
            self._sync_raw_files()
            return self._planetoid()

    def _planetoid(self):
        from torch_geometric.datasets import Planetoid

        try:
            return Planetoid(str(self.work_root), self.name)
        except Exception as err:  # unreadable / corrupt pickles, missing scipy, a stale processed/, ...
            raise DatasetError(f"Planetoid {self.name}: {self._unreadable(err)}") from err

    def _unreadable(self, err: Exception) -> str:
        """What could not be read, for the message: the first raw file that PyG's reader fails on, named in the
        user's data folder when it came from there (not only "the files in <cache copy folder>"); else the
        ``processed/`` folder, which is rebuilt when deleted."""
        from torch_geometric.io.planetoid import read_file

        raw = self.work_root / self.name / "raw"
        for part in PARTS:
            try:
                read_file(str(raw), self.name, part)
            except ImportError as file_err:  # the file is fine: the reader lacks a module (scipy)
                return f"reading the raw files needs a missing module ({file_err}); pip install {file_err.name}"
            except Exception as file_err:  # noqa: BLE001 (any reader error is the message)
                fname = f"ind.{self.name.lower()}.{part}"
                path = self.source_dir / fname if (self.source_dir / fname).is_file() else raw / fname
                return (f"cannot read {path} ({type(file_err).__name__}: {file_err}); replace it with the original "
                        f"from {URL}/{fname}, or delete it to download it again")
        processed = self.work_root / self.name / "processed"
        return f"could not load {processed} ({type(err).__name__}: {err}); delete that folder to rebuild it"

    # ----------------------------------------------------------------------------------------------- setup
    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        import torch_geometric.transforms as T

        dataset = self._prepared_dataset()
        data = dataset[0]
        if self.transform == "normalize_features":
            data = T.NormalizeFeatures()(data)
        elif self.transform == "target_indegree":
            data = T.TargetIndegree()(data)
        if self.split == "full":
            data.train_mask = ~(data.val_mask | data.test_mask)
        elif self.split == "dna_kfold":
            folds = stratified_kfold(data.y, 5, self.seed)
            n = data.num_nodes
            data.train_mask = _index_to_mask(folds[0], n)
            data.val_mask = _index_to_mask(folds[1], n)
            data.test_mask = _index_to_mask(torch.cat(folds[2:]), n)
        self.num_features = dataset.num_features
        self.num_classes = dataset.num_classes
        self.data = data
        if self.link_split:
            splitter = T.RandomLinkSplit(num_val=self.link_val, num_test=self.link_test, is_undirected=True,
                                         split_labels=True, add_negative_train_samples=False)
            python_state = random.getstate()  # PyG's negative sampling draws from Python's `random`: seeded too,
            try:  # or the val/test negatives (the scores) followed seed_everything, not the split's `seed`
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.seed)
                    random.seed(self.seed)
                    train, val, test = splitter(data.clone())
            finally:
                random.setstate(python_state)
            for stage, split in (("val", val), ("test", test)):
                if split.pos_edge_label_index.size(1) == 0:
                    raise ConfigError(f"PlanetoidDataModule: link_{stage}={getattr(self, f'link_{stage}')} leaves "
                                      f"no {stage} edges of {self.name}'s {data.num_edges // 2}; give a larger "
                                      "fraction")
            self._splits = {"train": train, "val": val, "test": test}
        else:
            self._splits = {"train": data, "val": data, "test": data}

    def model_hints(self) -> dict[str, int]:
        """``in_channels`` (features), ``out_channels`` (classes) and ``num_nodes``; sets the module up if needed."""
        self.setup()
        return {"in_channels": int(self.num_features), "out_channels": int(self.num_classes),
                "num_nodes": int(self.data.num_nodes)}

    # ----------------------------------------------------------------------------------------------- loaders
    def _loader(self, stage: str) -> DataLoader:
        if self.data is None:
            self.setup()
        return DataLoader([self._splits[stage]], batch_size=1, shuffle=False, collate_fn=_first)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
