"""Where datasets live: one setting (``DFA_DATA_DIR``) for every DataModule, plus checked downloads.

Resolution order for a dataset folder: an explicit ``root`` argument, then ``$DFA_DATA_DIR``, then the user cache
``~/.cache/dfa_lightning``. DataModules read the original files from there and download them (with a SHA-256 check)
only when they are missing and downloading is allowed.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

from pytorch_lightning.utilities import rank_zero_warn

from dfa_lightning.errors import DatasetError

ENV_VAR = "DFA_DATA_DIR"
DEFAULT_CACHE = Path("~/.cache/dfa_lightning").expanduser()


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The base folder that holds every dataset (see module docstring for the order)."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else DEFAULT_CACHE


def warn_cache_fallback(what: str, searched: Path, used: Path, root: str | os.PathLike | None) -> None:
    """Say that the dataset was not in the folder the user named and an earlier copy in the download cache is used:
    an empty or mistyped ``root:`` / ``$DFA_DATA_DIR`` would otherwise train on whatever the cache holds, unsaid."""
    setting = "`root:`" if root is not None else f"${ENV_VAR}" if os.environ.get(ENV_VAR) else "the default folder"
    rank_zero_warn(f"{what}: not in {searched} (from {setting}); using the copy in the download cache {used}")


def make_cache_folder(folder: Path, cache_dir: Path, what: str, exist_ok: bool = True) -> Path:
    """``folder`` (inside ``cache_dir``) made, or a :class:`DatasetError` naming ``cache_dir:`` where it cannot be
    (a read-only ``~/.cache``, a file in the way): torch's ``PermissionError`` named neither the setting nor the fix."""
    try:
        folder.mkdir(parents=True, exist_ok=exist_ok)
    except FileExistsError:
        raise
    except OSError as err:
        raise DatasetError(f"cannot write the {what} cache in {cache_dir}: {err}; set `cache_dir:` to a writable "
                           "folder") from None
    return folder


def sha256sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, dest: str | os.PathLike, sha256: str | None = None) -> Path:
    """Download ``url`` to ``dest`` atomically; verify ``sha256`` when given. Never leaves a partial file behind."""
    dest = Path(dest)
    if dest.exists() and (sha256 is None or sha256sum(dest) == sha256):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            shutil.copyfileobj(response, out)
        if sha256 is not None and (got := sha256sum(tmp)) != sha256:
            raise DatasetError(f"checksum mismatch for {url}: expected sha256 {sha256}, got {got}")
        os.replace(tmp, dest)
    except DatasetError:
        raise
    except OSError as err:
        raise DatasetError(f"could not download {url} to {dest}: {err}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest

