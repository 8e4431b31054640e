"""NeRF view-synthesis data: the Blender synthetic scenes and the LLFF real forward-facing scenes, as camera rays.

Files (``root:``, then ``$DFA_DATA_DIR``, then ``~/.cache/dfa_lightning``; the folder is **never written to**):

* ``blender``: ``<root>/nerf/<folder>/<scene>/transforms_{train,val,test}.json`` and the RGBA PNGs they name
  (``folder`` defaults to ``nerf_synthetic``; the shared 100-pixel copy of lego is ``nerf_synthetic_100px``).
  ``focal = 0.5 W / tan(0.5 camera_angle_x)``, camera-to-world poses in OpenGL axes, near 2, far 6; RGBA is
  composited on white (``rgb a + 1 - a``) as NeRF's ``white_bkgd``.
* ``llff``: ``<root>/nerf/<folder>/<scene>/poses_bounds.npy`` and ``images_<factor>/*.png`` (``folder`` defaults to
  ``nerf_llff_data``). As NeRF's ``load_llff_data``: the ``[down, right, back]`` poses are turned to ``[right, up,
  back]``, scaled so that the nearest bound is 1/0.75, recentred on the average pose; rays are taken to normalised
  device coordinates (near 0, far 1 along the ray); every ``hold_every``-th view (0, 8, 16, … as NeRF's
  ``llffhold 8``) is the test and validation set, the rest trains.

Downloads. The NeRF authors' example archive (:data:`EXAMPLE_ARCHIVE`, from ``bmild/nerf``'s
``download_example_data.sh``) holds ``nerf_synthetic/lego`` and ``nerf_llff_data/fern``; with ``download: true`` and
those scenes missing it is fetched into ``cache_dir`` and its files are checked against the SHA-256 of the
originals (:data:`KNOWN_FILES`: the camera files). The other scenes are in the authors' Google Drive folder, which
has no direct link: download ``nerf_synthetic.zip`` or ``nerf_llff_data.zip`` from there and point ``root:`` at it.

Batches (dicts): ``rays`` ``[R, 9]`` (origin, direction, unit view direction; NDC origin and direction for LLFF),
``rgb`` ``[R, 3]`` in [0, 1], and the scene's ``near``, ``far`` and ``white_background``. Training batches are
``rays_per_batch`` rays drawn at random from every training view (a seeded permutation per epoch: NeRF's
``no_batching: False``); validation and test batches are one whole view each, in order.
"""
from __future__ import annotations

import json
import math
import shutil
import uuid
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from dfa_lightning.data.paths import (DEFAULT_CACHE, ENV_VAR, data_root, download as download_file, sha256sum,
                                      warn_cache_fallback)
from dfa_lightning.data.sharding import eval_sampler
from dfa_lightning.errors import ConfigError, DatasetError

__all__ = ["NeRFDataModule", "Views", "load_blender", "load_llff", "camera_rays", "ndc_rays", "EXAMPLE_ARCHIVE"]

DATASETS = ("blender", "llff")
DEFAULT_FOLDERS = {"blender": "nerf_synthetic", "llff": "nerf_llff_data"}

#: The NeRF authors' example data (lego and fern), as ``bmild/nerf/download_example_data.sh`` fetches it. Its
#: archive checksum is not published; the extracted camera files are checked against :data:`KNOWN_FILES`.
EXAMPLE_ARCHIVE = {
    "url": "http://cseweb.ucsd.edu/~viscomp/projects/LF/papers/ECCV20/nerf/nerf_example_data.zip",
    "scenes": {("blender", "lego"): "nerf_synthetic/lego", ("llff", "fern"): "nerf_llff_data/fern"},
}
#: SHA-256 of original files (``shared/data/nerf/PROVENANCE.md``; the JSONs are the same at every resolution).
KNOWN_FILES: dict[tuple[str, str], dict[str, str]] = {
    ("blender", "lego"): {
        "transforms_train.json": "82d46cfbd405d7da8562b6fa75b6fb0631a3f941adf66f0c023acb8bf9ea273a",
        "transforms_val.json": "7100ba06021772ff6a0637246666ebe4dc15175a3d092de628486489d459dde1",
        "transforms_test.json": "b03adb05593756fdeaacc6c82fc2596270e91fe296e79c9a588df098e4758a64",
    },
    ("llff", "fern"): {"poses_bounds.npy": "d2933dbdbec7791d4e9041570e5aff649bf934e99ee22d04d92044afe7d26270"},
}
DRIVE_HINT = ("the other scenes are in the NeRF authors' Google Drive folder "
              "(https://drive.google.com/drive/folders/128yBriW1IG_3NJ5Rp7APSTZsJqdJdfc1): download "
              "nerf_synthetic.zip or nerf_llff_data.zip and point `root:` at the folder that holds `nerf/`")


@dataclass
class Views:
    """Calibrated views of one scene: ``images [n, H, W, 3]`` float32 in [0, 1], ``poses [n, 3, 4]`` camera-to-world."""

    images: torch.Tensor
    poses: torch.Tensor
    focal: float
    near: float
    far: float
    ndc: bool = False  # LLFF: rays in normalised device coordinates
    white_background: bool = False

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])


# ---------------------------------------------------------------------------------------------- images
def read_png(path: Path, channels: int) -> np.ndarray:
    """``[H, W, channels]`` uint8; a missing or unreadable image is a DatasetError naming the file."""
    try:
        from PIL import Image
    except ImportError as err:  # a requirement; say so rather than fail deep inside a loader
        raise DatasetError("NeRF data needs Pillow to read PNGs: pip install pillow") from err
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGBA" if channels == 4 else "RGB"))
    except FileNotFoundError:
        raise DatasetError(f"missing image {path}") from None
    except OSError as err:
        raise DatasetError(f"cannot read image {path}: {err}") from None


# ---------------------------------------------------------------------------------------------- Blender
def load_blender(folder: Path, split: str, white_background: bool = True, skip: int = 1,
                 limit: int | None = None) -> Views:
    """One split of a Blender scene (every ``skip``-th frame, the first ``limit`` of them), RGBA composited on
    white when asked."""
    path = folder / f"transforms_{split}.json"
    try:
        meta = json.loads(path.read_text())
        angle = _camera_angle(path, meta["camera_angle_x"])
        frames = meta["frames"]
        if not isinstance(frames, list):
            raise DatasetError(f"{path}: `frames` is a {type(frames).__name__}, expected a list of frames")
        indices = list(range(len(frames)))[::skip][:limit]
    except DatasetError:  # (a FileNotFoundError too: already says what is wrong)
        raise
    except FileNotFoundError:
        raise DatasetError(f"missing {path}") from None
    except OSError as err:
        raise DatasetError(f"{path}: cannot read ({err.strerror or err})") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise DatasetError(f"{path}: not a NeRF transforms file ({type(err).__name__}: {err})") from None
    if not indices:  # before any stacking: an empty split was an IndexError
        kept = f" left of {len(frames)} (skip {skip}, limit {limit})" if frames else ""
        raise DatasetError(f"{path}: no frames{kept}")
    files, poses = zip(*(_blender_frame(path, i, frames[i]) for i in indices))
    images = [read_png(f, 4) for f in files]
    _check_same_size(path, indices, files, images)
    rgba = np.stack(images).astype(np.float32) / 255.0  # [n, H, W, 4]
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    images = rgb * alpha + (1.0 - alpha) if white_background else rgb
    width = rgba.shape[2]
    return Views(torch.from_numpy(np.ascontiguousarray(images)), torch.stack(poses),
                 0.5 * width / math.tan(0.5 * angle), near=2.0, far=6.0, white_background=white_background)


def _camera_angle(path: Path, value) -> float:
    """``camera_angle_x`` in radians, in (0, pi): a NaN or zero angle gave a NaN focal or a ZeroDivisionError."""
    angle = float(value)
    if not 0.0 < angle < math.pi:
        raise DatasetError(f"{path}: camera_angle_x is {value!r}, expected a field of view in radians in (0, pi)")
    return angle


def _blender_frame(path: Path, index: int, frame) -> tuple[Path, torch.Tensor]:
    """Frame ``index``'s image file and camera-to-world ``[3, 4]``; anything malformed names the file and frame."""
    try:
        name = frame["file_path"]
        file = path.parent / (name + ("" if name.endswith(".png") else ".png"))
        return file, _blender_pose(path, index, frame["transform_matrix"])
    except DatasetError:
        raise
    except KeyError as err:
        raise DatasetError(f"{path}: frame {index}: no {err} key") from None
    except (TypeError, ValueError, AttributeError) as err:
        raise DatasetError(f"{path}: frame {index}: malformed ({type(err).__name__}: {err})") from None


def _blender_pose(path: Path, index: int, matrix) -> torch.Tensor:
    """Frame ``index``'s camera-to-world ``[3, 4]`` from its ``transform_matrix`` (4x4 or 3x4, finite): a NaN pose
    was only caught later as a NaN loss."""
    try:
        pose = torch.tensor(matrix, dtype=torch.float32)
    except (TypeError, ValueError) as err:
        raise DatasetError(f"{path}: frame {index}: transform_matrix is not a 4x4 matrix of numbers "
                           f"({err})") from None
    if pose.shape not in ((4, 4), (3, 4)):
        raise DatasetError(f"{path}: frame {index}: transform_matrix has shape {list(pose.shape)}, expected 4x4 "
                           "(or 3x4)")
    if not torch.isfinite(pose).all():
        raise DatasetError(f"{path}: frame {index}: transform_matrix is not finite (NaN or inf)")
    return pose[:3, :4]


def _check_same_size(path: Path, indices: list[int], files: tuple[Path, ...], images: list[np.ndarray]) -> None:
    """A split's views share one size (rays are stacked per split): name the first view that differs."""
    height, width = images[0].shape[:2]
    for index, file, image in zip(indices, files, images):
        if image.shape[:2] != (height, width):
            raise DatasetError(f"{path}: frame {index}: {file} is {image.shape[1]}x{image.shape[0]} pixels, but "
                               f"frame {indices[0]} ({files[0].name}) is {width}x{height}: a split's views share "
                               "one size")


# ---------------------------------------------------------------------------------------------- LLFF
def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _average_pose(poses: np.ndarray) -> np.ndarray:
    """NeRF's ``poses_avg``: mean centre, summed viewing axis and up vector, as a ``[3, 4]`` camera-to-world."""
    center = poses[:, :3, 3].mean(0)
    z = _normalize(poses[:, :3, 2].sum(0))
    up = poses[:, :3, 1].sum(0)
    x = _normalize(np.cross(up, z))
    y = _normalize(np.cross(z, x))
    return np.stack([x, y, z, center], 1)


def load_llff(folder: Path, factor: int = 8, bound_factor: float = 0.75) -> tuple[Views, np.ndarray]:
    """Every view of an LLFF scene at ``images_<factor>``, with NeRF's axis change, rescale and recentring.

    Returns the views and the depth bounds ``[n, 2]`` (rescaled)."""
    path = folder / "poses_bounds.npy"
    try:
        arr = np.load(path)
    except FileNotFoundError:
        raise DatasetError(f"missing {path}") from None
    except (OSError, ValueError) as err:
        raise DatasetError(f"{path}: cannot read ({err})") from None
    if arr.ndim != 2 or arr.shape[1] != 17:
        raise DatasetError(f"{path}: expected an [n, 17] array (3x5 pose + 2 bounds per view), got {arr.shape}")
    image_dir = folder / f"images_{factor}"
    if not image_dir.is_dir():
        present = sorted(d.name for d in folder.glob("images_*") if d.is_dir())
        raise DatasetError(f"{image_dir} not found (factor {factor}); "
                           + (f"present: {', '.join(present)}: set `factor:` to match" if present else
                              "no images_<factor> folder in the scene"))
    files = sorted(p for p in image_dir.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    if len(files) != len(arr):
        raise DatasetError(f"{image_dir}: {len(files)} images for {len(arr)} poses in {path}")
    bad = [(row, value) for row, value in enumerate(arr[:, 15:].tolist()) if not all(math.isfinite(v) and v > 0
                                                                                    for v in value)]
    if bad:  # a 0 or NaN bound scales the scene by inf: a NaN loss at the first step, blamed on the learning rate
        row, value = bad[0]
        raise DatasetError(f"{path}: row {row}: depth bounds {value}, expected two finite numbers > 0"
                           + (f" ({len(bad)} such rows)" if len(bad) > 1 else ""))
    _check_llff_cameras(path, arr[:, :15].reshape(-1, 3, 5))
    decoded = [read_png(f, 3) for f in files]
    _check_same_size(path, list(range(len(files))), tuple(files), decoded)
    images = np.stack(decoded).astype(np.float32) / 255.0
    poses = arr[:, :15].reshape(-1, 3, 5).astype(np.float64)
    bounds = arr[:, 15:].astype(np.float64)
    focal = float(poses[0, 2, 4]) * images.shape[1] / float(poses[0, 0, 4])  # full-res focal scaled to the images
    poses = np.concatenate([poses[:, :, 1:2], -poses[:, :, 0:1], poses[:, :, 2:4]], 2)  # [down,right,back] -> [right,up,back]
    scale = 1.0 / (bounds.min() * bound_factor)
    poses[:, :, 3] *= scale
    bounds = bounds * scale
    center = np.concatenate([_average_pose(poses), [[0, 0, 0, 1.0]]], 0)
    homog = np.concatenate([poses, np.tile([[[0, 0, 0, 1.0]]], (len(poses), 1, 1))], 1)
    poses = (np.linalg.inv(center) @ homog)[:, :3, :4]
    views = Views(torch.from_numpy(images), torch.from_numpy(poses).float(), focal, near=0.0, far=1.0, ndc=True)
    return views, bounds


# ---------------------------------------------------------------------------------------------- rays
def _check_llff_cameras(path: Path, poses: np.ndarray) -> None:
    """Each row's 3 x 4 pose finite with a non-degenerate rotation, and its ``[H, W, focal]`` positive: one NaN
    pose made every view's rays NaN (the recentring averages all poses), a 0 height divided by zero, a negative
    focal flipped the rays without a word."""
    for row, pose in enumerate(poses):
        rotation, (h, w, focal) = pose[:, :3], pose[:, 4]
        if not np.isfinite(pose[:, :4]).all() or abs(np.linalg.det(rotation)) < 1e-6:
            raise DatasetError(f"{path}: row {row}: camera pose {pose[:, :4].tolist()} is not finite, or its "
                               "rotation is degenerate")
        if not all(math.isfinite(v) and v > 0 for v in (h, w, focal)):
            raise DatasetError(f"{path}: row {row}: [height, width, focal] = {[float(h), float(w), float(focal)]}, "
                               "expected three finite numbers > 0")


def camera_rays(h: int, w: int, focal: float, c2w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Origins and directions ``[H, W, 3]`` of a pinhole camera (OpenGL axes: x right, y up, looking down -z), one
    ray per pixel corner as in NeRF's ``get_rays``."""
    j, i = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    dirs = torch.stack([(i - 0.5 * w) / focal, -(j - 0.5 * h) / focal, -torch.ones_like(i)], -1)  # [H, W, 3]
    directions = dirs @ c2w[:3, :3].T
    return c2w[:3, 3].expand(directions.shape), directions


def ndc_rays(h: int, w: int, focal: float, near: float, origins: torch.Tensor,
             directions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NeRF's ``ndc_rays``: rays of a forward-facing scene in normalised device coordinates (the z-range
    ``[-near, -inf)`` maps to ``[-1, 1)``), so that samples uniform in ``[0, 1]`` cover the scene to infinity."""
    t = -(near + origins[..., 2]) / directions[..., 2]
    o = origins + t[..., None] * directions
    ox, oy, oz = o.unbind(-1)
    dx, dy, dz = directions.unbind(-1)
    o_ndc = torch.stack([-focal / (0.5 * w) * ox / oz, -focal / (0.5 * h) * oy / oz, 1.0 + 2.0 * near / oz], -1)
    d_ndc = torch.stack([-focal / (0.5 * w) * (dx / dz - ox / oz), -focal / (0.5 * h) * (dy / dz - oy / oz),
                         -2.0 * near / oz], -1)
    return o_ndc, d_ndc


def view_rays(views: Views, index: int) -> torch.Tensor:
    """``[H*W, 9]``: origin, direction and unit view direction of every pixel of view ``index``."""
    h, w = views.hw
    origins, directions = camera_rays(h, w, views.focal, views.poses[index])
    viewdirs = directions / directions.norm(dim=-1, keepdim=True)  # before NDC, as NeRF
    if views.ndc:
        origins, directions = ndc_rays(h, w, views.focal, 1.0, origins, directions)
    return torch.cat([origins, directions, viewdirs], -1).reshape(h * w, 9)


# ---------------------------------------------------------------------------------------------- datasets
class RandomRays(IterableDataset):
    """``steps`` batches of ``rays_per_batch`` rays per pass, from a seeded permutation of all training rays that is
    new at every pass (epoch) and differs between DDP ranks (each rank draws its own rays, as a larger batch).

    The first ``precrop_steps`` batches come from the rays of ``center`` only (the central crop of every view, NeRF's
    ``precrop_iters``): on an object against a white background, batches of mostly background rays at the start
    can drive every density below zero, where the ReLU passes no gradient and the render stays white."""

    def __init__(self, rays: torch.Tensor, rgb: torch.Tensor, rays_per_batch: int, meta: dict, seed: int,
                 steps: int | None = None, center: torch.Tensor | None = None, precrop_steps: int = 0,
                 epoch: Callable[[], int | None] | None = None) -> None:
        if rays_per_batch > len(rays):  # the batch was every ray, silently smaller than asked (and then an OOM)
            raise ConfigError(f"NeRFDataModule: rays_per_batch {rays_per_batch} is more than the {len(rays)} "
                              "training rays of the scene; lower data.init_args.rays_per_batch")
        self.rays, self.rgb, self.rays_per_batch, self.meta, self.seed = rays, rgb, rays_per_batch, meta, seed
        self.steps = len(rays) // rays_per_batch if steps is None else steps
        self.center, self.precrop_steps = center, precrop_steps if center is not None else 0
        self.passes = 0  # passes completed, where no `epoch` tells which one this is
        self.epoch = epoch

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        """The pass is the Trainer's epoch where there is one (``epoch``): Lightning stops at ``len`` batches without
        exhausting the generator, so a count kept after the last batch never moved, and every epoch replayed the
        first one's rays, precrop included. From the epoch, a resumed fit draws the rays the straight one did, and a
        probe's look at the first batch changes nothing."""
        rank = torch.distributed.get_rank() if torch.distributed.is_available() and torch.distributed.is_initialized() else 0
        current = self.epoch() if self.epoch is not None else None
        passes = self.passes if current is None else current
        served = passes * self.steps
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + passes) * 1009 + rank)
        full = len(self.rays) // self.rays_per_batch  # batches in one permutation; its remainder is left out
        for i in range(self.steps):
            if i % full == 0:  # a pass longer than the rays goes on with a fresh permutation, as NeRF reshuffles
                order = torch.randperm(len(self.rays), generator=g)
            if served + i < self.precrop_steps:
                idx = self.center[torch.randint(len(self.center), (self.rays_per_batch,), generator=g)]
            else:
                j = i % full
                idx = order[j * self.rays_per_batch:(j + 1) * self.rays_per_batch]
            yield {"rays": self.rays[idx], "rgb": self.rgb[idx], **self.meta}
        # without an epoch: counted once a pass is read to its end (a look at the first batch changes nothing)
        self.passes += 1


def center_rays(n: int, h: int, w: int, fraction: float) -> torch.Tensor:
    """Indices, into ``n`` views' rays in pixel order, of each view's central ``fraction`` x ``fraction`` crop."""
    dh, dw = int(h // 2 * fraction), int(w // 2 * fraction)
    rows = torch.arange(h // 2 - dh, h // 2 + dh)
    cols = torch.arange(w // 2 - dw, w // 2 + dw)
    pixels = (rows[:, None] * w + cols[None, :]).flatten()
    return (torch.arange(n)[:, None] * (h * w) + pixels[None, :]).flatten()


class WholeViews(Dataset):
    """One batch per view: all its rays, in pixel order (``shape`` says how to fold them back into an image)."""

    def __init__(self, views: Views, indices: list[int], meta: dict) -> None:
        self.views, self.indices, self.meta = views, indices, meta

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        k = self.indices[i]
        h, w = self.views.hw
        return {"rays": view_rays(self.views, k), "rgb": self.views.images[k].reshape(h * w, 3), **self.meta,
                "shape": (h, w)}


def _keep(batch: dict) -> dict:
    """Collate for ``batch_size=None``: the dict as it is (the default would turn ``shape`` into tensors)."""
    return batch


# ---------------------------------------------------------------------------------------------- DataModule
class NeRFDataModule(pl.LightningDataModule):
    """Rays of a NeRF scene (see the module docstring for files, downloads and batches).

    Args:
        dataset: ``blender`` or ``llff``.
        scene: e.g. ``lego`` or ``fern``.
        folder: the dataset folder under ``<root>/nerf/`` (default: ``nerf_synthetic`` / ``nerf_llff_data``).
        root: the data root (default: ``$DFA_DATA_DIR``, then ``~/.cache/dfa_lightning``).
        rays_per_batch: training rays per step (paper: 1024 Blender, 4096 LLFF) (default: ``1024``).
        steps_per_epoch: training batches per epoch; ``None``: one pass over all training rays; more than one pass
            goes on with a fresh permutation of the rays (default: ``None``).
        val_views, test_views: how many views to render for validation / test (the first ones); ``None``: all
            (paper: every test view) (default: ``4`` / ``None``).
        skip: Blender: keep every ``skip``-th validation and test frame (NeRF's ``testskip``) (default: ``1``).
        white_background: Blender: composite RGBA on white (default: ``True``).
        factor: LLFF: the ``images_<factor>`` folder (paper: 4; the shared copy has 8) (default: ``8``).
        hold_every: LLFF: every ``hold_every``-th view is held out for validation and test (default: ``8``).
        precrop_steps: the first training batches draw rays from the central crop of the views only (NeRF's
            ``precrop_iters``: 500 for lego; 0 for LLFF) (default: ``0``).
        precrop_fraction: the crop's side as a fraction of the view's (NeRF: 0.5) (default: ``0.5``).
        download: fetch the NeRF example archive (lego, fern) when the scene is missing (default: ``True``).
        cache_dir: where downloads go (default: ``~/.cache/dfa_lightning``).
        seed: seed of the training rays' order (default: ``0``).
        num_workers: DataLoader workers for validation and test views (training rays are in memory and sliced in
            the main process) (default: ``0``).
    """

    def __init__(self, dataset: str = "blender", scene: str = "lego", folder: str | None = None,
                 root: str | None = None, rays_per_batch: int = 1024, steps_per_epoch: int | None = None,
                 val_views: int | None = 4, test_views: int | None = None, skip: int = 1,
                 white_background: bool = True, factor: int = 8, hold_every: int = 8, precrop_steps: int = 0,
                 precrop_fraction: float = 0.5, download: bool = True,
                 cache_dir: str | None = None, seed: int = 0, num_workers: int = 0) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ConfigError(f"NeRFDataModule: dataset must be one of {DATASETS}, got {dataset!r}")
        if rays_per_batch < 1 or skip < 1 or factor < 1 or hold_every < 2:
            raise ConfigError("NeRFDataModule: rays_per_batch, skip and factor must be >= 1, hold_every >= 2")
        if steps_per_epoch is not None and steps_per_epoch < 1:  # it was silently 1 step per epoch
            raise ConfigError(f"NeRFDataModule: steps_per_epoch must be >= 1 or null (one pass over the training "
                              f"rays), got {steps_per_epoch}")
        for name, views in (("val_views", val_views), ("test_views", test_views)):
            if views is not None and views < 1:  # 0 or -1 left validation (and the best checkpoint) off, unsaid
                raise ConfigError(f"NeRFDataModule: {name} must be >= 1 or null (every view), got {views}")
        self.dataset, self.scene = dataset, scene
        self.folder = folder or DEFAULT_FOLDERS[dataset]
        self.root, self.rays_per_batch, self.steps_per_epoch = root, rays_per_batch, steps_per_epoch
        self.val_views, self.test_views, self.skip = val_views, test_views, skip
        self.white_background, self.factor, self.hold_every = white_background, factor, hold_every
        if not 0.0 < precrop_fraction <= 1.0 or precrop_steps < 0:
            raise ConfigError("NeRFDataModule: precrop_fraction must be in (0, 1] and precrop_steps >= 0")
        self.precrop_steps, self.precrop_fraction = precrop_steps, precrop_fraction
        self.download, self.seed, self.num_workers = download, seed, num_workers
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else DEFAULT_CACHE
        self.splits: dict[str, Views] = {}
        self.test_indices: list[int] = []
        self._train: RandomRays | None = None
        self._said_cache = False

    # ---------------------------------------------------------------- files
    def scene_dir(self) -> Path:
        """The scene folder: under the data root if it is there, else under the download cache (fetched if
        allowed), else a DatasetError naming what is missing and where to get it."""
        marker = "transforms_train.json" if self.dataset == "blender" else "poses_bounds.npy"
        local = data_root(self.root) / "nerf" / self.folder / self.scene
        if (local / marker).is_file():
            return local
        archive_scene = EXAMPLE_ARCHIVE["scenes"].get((self.dataset, self.scene))
        cached = self.cache_dir / "nerf" / self.folder / self.scene
        if archive_scene and self.folder == DEFAULT_FOLDERS[self.dataset]:
            if (cached / marker).is_file():
                if cached.resolve() != local.resolve() and not self._said_cache:
                    warn_cache_fallback(f"NeRF {self.dataset} scene {self.scene!r}", local, cached, self.root)
                    self._said_cache = True  # scene_dir() runs in prepare_data and again in setup
                return cached
            if self.download:
                self._fetch_example(archive_scene, cached)
                return cached
        where = f"set {ENV_VAR} or `root:`"
        hint = (f"`download: true` fetches it from {EXAMPLE_ARCHIVE['url']}" if archive_scene else DRIVE_HINT)
        raise DatasetError(f"NeRF {self.dataset} scene {self.scene!r}: missing {local / marker} ({where}); {hint}")

    def _fetch_example(self, archive_scene: str, dest: Path) -> None:
        zip_path = download_file(EXAMPLE_ARCHIVE["url"], self.cache_dir / "nerf" / "nerf_example_data.zip")
        tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex}"
        try:
            with zipfile.ZipFile(zip_path) as zf:
                members = [m for m in zf.namelist() if f"/{archive_scene}/" in f"/{m}" and not m.endswith("/")]
                if not members:
                    raise DatasetError(f"{zip_path}: no {archive_scene}/ inside")
                for m in members:
                    target = tmp / m[m.index(archive_scene) + len(archive_scene) + 1:]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(m) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out)
            for name, digest in KNOWN_FILES.get((self.dataset, self.scene), {}).items():
                if (got := sha256sum(tmp / name)) != digest:
                    raise DatasetError(f"{zip_path}: {archive_scene}/{name} has sha256 {got}, expected {digest}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp.rename(dest)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)

    def prepare_data(self) -> None:
        """Find or fetch the scene once per node (Lightning calls it on one process before ``setup``)."""
        self.scene_dir()

    # ---------------------------------------------------------------- splits
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        folder = self.scene_dir()
        if self.dataset == "blender":
            self.splits = {"train": load_blender(folder, "train", self.white_background),  # (only the views that
                           "val": load_blender(folder, "val", self.white_background, self.skip, self.val_views),  # run)
                           "test": load_blender(folder, "test", self.white_background, self.skip, self.test_views)}
            self.test_indices = list(range(len(self.splits["test"].poses)))
            return
        views, _ = load_llff(folder, self.factor)
        held = list(range(0, len(views.poses), self.hold_every))
        train = [i for i in range(len(views.poses)) if i not in held]
        if not train:
            raise DatasetError(f"{folder}: {len(views.poses)} views leave none to train with hold_every {self.hold_every}")
        subset = lambda idx: Views(views.images[idx], views.poses[idx], views.focal, views.near, views.far, True)
        self.splits = {"train": subset(train), "val": subset(held), "test": subset(held)}
        self.test_indices = held

    def _meta(self, views: Views) -> dict:
        return {"near": views.near, "far": views.far, "white_background": views.white_background}

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        if self._train is None:  # the rays of every training pixel, once ([n*H*W, 9])
            views = self.splits["train"]
            rays = torch.cat([view_rays(views, k) for k in range(len(views.poses))])
            center = center_rays(len(views.poses), *views.hw, self.precrop_fraction) if self.precrop_steps else None
            if center is not None and len(center) == 0:  # was torch's "random_ expects 'from' to be less than 'to'"
                raise ConfigError(f"NeRFDataModule: precrop_fraction {self.precrop_fraction} leaves no pixel of the "
                                  f"{views.hw[1]}x{views.hw[0]} views in the central crop; raise it, or set "
                                  "precrop_steps: 0")
            self._train = RandomRays(rays, views.images.reshape(-1, 3), self.rays_per_batch, self._meta(views),
                                     self.seed, self.steps_per_epoch, center, self.precrop_steps, self._epoch)
        return DataLoader(self._train, batch_size=None)

    def _epoch(self) -> int | None:
        """The attached Trainer's epoch (the training pass), or None outside one."""
        trainer = self.trainer
        return None if trainer is None else int(trainer.current_epoch)

    def _whole(self, split: str, limit: int | None) -> DataLoader:
        self.setup(split)
        views = self.splits[split]
        n = len(views.poses) if limit is None else min(limit, len(views.poses))
        whole = WholeViews(views, list(range(n)), self._meta(views))
        # under DDP each rank renders its own views, none twice (Lightning's sampler pads)
        return DataLoader(whole, batch_size=None, sampler=eval_sampler(whole, self.trainer, split),
                          num_workers=self.num_workers, collate_fn=_keep)

    def val_dataloader(self) -> DataLoader:
        return self._whole("val", self.val_views)

    def test_dataloader(self) -> DataLoader:
        return self._whole("test", self.test_views)
