"""View synthesis: NeRF rays from the real lego and fern scenes, volume rendering, and BP / DFA training on lego."""
from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from dfa_lightning import memory
from dfa_lightning.callbacks import FeedbackAlignmentStrategy
from dfa_lightning.callbacks.feedback_alignment import attached_engines
from dfa_lightning.data import nerf as nd
from dfa_lightning.errors import ConfigError, DatasetError
from dfa_lightning.feedback.engine import FeedbackEngine
from dfa_lightning.memory import free_bytes, leaf_output_bytes
from dfa_lightning.models.nerf import NeRF
from dfa_lightning.module import TaskModule
from dfa_lightning.tasks import volume_rendering as vr
from dfa_lightning.tasks.base import StepOutput
from dfa_lightning.tasks.view_synthesis import ViewSynthesis

LEGO = Path("nerf") / "nerf_synthetic_100px" / "lego"
FERN = Path("nerf") / "nerf_llff_data" / "fern"


@pytest.fixture
def lego(shared_data: Path) -> Path:
    if not (shared_data / LEGO / "transforms_train.json").is_file():
        pytest.skip(f"lego not found at {shared_data / LEGO}")
    return shared_data / LEGO


@pytest.fixture
def fern(shared_data: Path) -> Path:
    if not (shared_data / FERN / "poses_bounds.npy").is_file():
        pytest.skip(f"fern not found at {shared_data / FERN}")
    return shared_data / FERN


# ---------------------------------------------------------------------------------------------- data
def test_blender_lego_loads_with_the_nerf_camera_on_a_white_background(lego):
    views = nd.load_blender(lego, "train")
    assert views.images.shape == (100, 100, 100, 3) and views.poses.shape == (100, 3, 4)
    assert views.focal == pytest.approx(138.8889, abs=1e-3)  # 0.5 W / tan(0.5 camera_angle_x)
    assert (views.near, views.far) == (2.0, 6.0)
    assert 0.0 <= views.images.min() and views.images.max() <= 1.0
    assert torch.all(views.images[:, 0, 0] == 1.0)  # transparent corners composited on white
    camera_distance = views.poses[:, :, 3].norm(dim=-1)
    assert torch.allclose(camera_distance, torch.full_like(camera_distance, 4.0311), atol=1e-3)
    black = nd.load_blender(lego, "val", white_background=False, skip=50)
    assert len(black.poses) == 2 and torch.all(black.images[:, 0, 0] == 0.0)


def test_llff_fern_is_turned_rescaled_and_recentred_as_nerf_loads_it(fern):
    views, bounds = nd.load_llff(fern, factor=8)
    assert views.images.shape == (20, 378, 504, 3)
    assert views.focal == pytest.approx(407.5658, abs=1e-3)  # the reference loader's value for fern at factor 8
    assert views.ndc and (views.near, views.far) == (0.0, 1.0)
    assert bounds.min() == pytest.approx(1 / 0.75)  # the nearest bound is rescaled to 1 / bd_factor
    average = nd._average_pose(views.poses.double().numpy())
    np.testing.assert_allclose(average, np.eye(4)[:3], atol=1e-5)  # recentred: the mean pose is the identity
    rotations = views.poses[:, :, :3]
    np.testing.assert_allclose((rotations @ rotations.transpose(1, 2)).numpy(), np.broadcast_to(np.eye(3), (20, 3, 3)),
                               atol=1e-4)


def test_ndc_rays_start_on_the_near_plane_and_keep_the_centre_ray_on_the_axis():
    c2w = torch.eye(4)[:3]
    origins, directions = nd.camera_rays(4, 6, 5.0, c2w)
    assert torch.equal(directions[2, 3], torch.tensor([0.0, 0.0, -1.0]))  # the pixel at (W/2, H/2) looks down -z
    o, d = nd.ndc_rays(4, 6, 5.0, 1.0, origins, directions)
    assert torch.allclose(o[..., 2], torch.full((4, 6), -1.0))
    assert torch.allclose(o[2, 3], torch.tensor([0.0, 0.0, -1.0])) and torch.allclose(d[2, 3], torch.tensor([0.0, 0.0, 2.0]))


def test_fern_holds_out_every_eighth_view_and_batches_are_rays(shared_data, fern):
    data = nd.NeRFDataModule("llff", "fern", root=str(shared_data), rays_per_batch=4096, steps_per_epoch=3,
                             download=False)
    data.setup()
    assert data.test_indices == [0, 8, 16] and len(data.splits["train"].poses) == 17
    batches = list(data.train_dataloader())
    assert len(batches) == 3 and batches[0]["rays"].shape == (4096, 9) and batches[0]["rgb"].shape == (4096, 3)
    assert (batches[0]["near"], batches[0]["far"]) == (0.0, 1.0)
    view = next(iter(data.test_dataloader()))
    assert view["rays"].shape == (378 * 504, 9) and view["shape"] == (378, 504)
    assert torch.equal(view["rgb"], data.splits["test"].images[0].reshape(-1, 3))
    assert torch.allclose(view["rays"][:, 6:].norm(dim=-1), torch.ones(378 * 504))  # unit view directions


def test_training_rays_start_in_the_central_crop_and_are_reshuffled_every_epoch(shared_data, lego):
    data = nd.NeRFDataModule(root=str(shared_data), folder="nerf_synthetic_100px", rays_per_batch=256,
                             steps_per_epoch=4, precrop_steps=2, download=False)
    first, second = list(data.train_dataloader()), list(data.train_dataloader())
    rays = data.train_dataloader().dataset.rays  # every training pixel's ray, view by view in pixel order
    for batch in first[:2]:  # precrop: every ray is one of the central 50 x 50 pixels of some view
        rows = torch.cat([torch.nonzero((rays == r).all(-1))[:1, 0] for r in batch["rays"][:32]])
        assert len(rows) == 32  # each batch ray is a training pixel's ray
        pixel = rows % 10000
        assert torch.all((pixel // 100 >= 25) & (pixel // 100 < 75) & (pixel % 100 >= 25) & (pixel % 100 < 75))
    assert not torch.equal(first[3]["rays"], second[3]["rays"])  # a new permutation each pass
    peek = nd.NeRFDataModule(root=str(shared_data), folder="nerf_synthetic_100px", rays_per_batch=256,
                             steps_per_epoch=4, precrop_steps=2, download=False)
    next(iter(peek.train_dataloader()))  # the DFA callback's probe looks at one batch: the order stays BP's
    assert all(torch.equal(a["rays"], b["rays"]) for a, b in zip(first, peek.train_dataloader()))
    again = nd.NeRFDataModule(root=str(shared_data), folder="nerf_synthetic_100px", rays_per_batch=256,
                              steps_per_epoch=4, precrop_steps=2, download=False)
    assert all(torch.equal(a["rays"], b["rays"]) for a, b in zip(first, again.train_dataloader()))  # seeded


def test_a_missing_scene_names_the_file_and_where_to_get_it(tmp_path):
    data = nd.NeRFDataModule("blender", "ship", root=str(tmp_path), download=False)
    with pytest.raises(DatasetError, match=r"scene 'ship': missing .*nerf_synthetic/ship/transforms_train.json .*"
                                           r"Google Drive"):
        data.setup()
    lego = nd.NeRFDataModule("blender", "lego", root=str(tmp_path), download=False, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DatasetError, match="`download: true` fetches it from http"):
        lego.setup()
    with pytest.raises(ConfigError, match="dataset must be one of"):
        nd.NeRFDataModule("shapenet")


def test_an_empty_data_folder_says_it_falls_back_to_the_cache_copy(tmp_path):
    cached = tmp_path / "c" / "nerf" / "nerf_synthetic" / "lego"
    cached.mkdir(parents=True)
    (cached / "transforms_train.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    lego = nd.NeRFDataModule("blender", "lego", root=str(tmp_path / "empty"), download=False,
                             cache_dir=str(tmp_path / "c"))
    with pytest.warns(UserWarning, match=r"NeRF blender scene 'lego': not in .*empty/nerf/nerf_synthetic/lego "
                                         r"\(from `root:`\); using the copy in the download cache .*c/nerf/"):
        assert lego.scene_dir() == cached
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lego.scene_dir() == cached  # said once, not at every call (prepare_data, then setup)


@pytest.mark.parametrize("views", [0, -1])
def test_a_view_count_below_one_is_refused_not_a_silent_end_of_validation(views):
    """`val_views: -1` kept no view (`range(min(-1, n))`): no validation, no best checkpoint, and no word."""
    with pytest.raises(ConfigError, match=rf"val_views must be >= 1 or null \(every view\), got {views}"):
        nd.NeRFDataModule("blender", "lego", val_views=views)
    with pytest.raises(ConfigError, match="test_views must be >= 1"):
        nd.NeRFDataModule("llff", "fern", test_views=views)


def test_an_llff_factor_without_its_folder_names_the_folders_present(fern, tmp_path):
    scene = tmp_path / "fern"
    scene.mkdir()
    shutil.copy(fern / "poses_bounds.npy", scene)
    (scene / "images_8").mkdir()
    with pytest.raises(DatasetError, match=r"images_4 not found \(factor 4\); present: images_8: set `factor:`"):
        nd.load_llff(scene, factor=4)


def test_a_malformed_camera_file_or_image_names_the_file(lego, tmp_path):
    scene = tmp_path / "lego"
    scene.mkdir()
    meta = json.loads((lego / "transforms_val.json").read_text())
    del meta["camera_angle_x"]
    (scene / "transforms_val.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"transforms_val.json: not a NeRF transforms file \(KeyError"):
        nd.load_blender(scene, "val")
    (scene / "transforms_test.json").write_text(json.dumps({"camera_angle_x": 0.69, "frames": meta["frames"][:1]}))
    (scene / "val").mkdir()
    (scene / "val" / "r_0.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"cannot read image .*r_0.png"):
        nd.load_blender(scene, "test")


def _lego_split_with(lego: Path, tmp_path: Path, edit) -> Path:
    """A copy of lego's val split (images and transforms file) with ``edit(meta)`` applied to the transforms."""
    scene = tmp_path / "lego"
    shutil.copytree(lego / "val", scene / "val")
    meta = json.loads((lego / "transforms_val.json").read_text())
    edit(meta)
    (scene / "transforms_val.json").write_text(json.dumps(meta))
    return scene


@pytest.mark.parametrize("edit, message", [
    (lambda meta: meta.update(frames=[]), r"transforms_val.json: no frames"),
    (lambda meta: meta["frames"][2].update(transform_matrix=sum(meta["frames"][2]["transform_matrix"], [])),
     r"transforms_val.json: frame 2: transform_matrix has shape \[16\], expected 4x4"),
    (lambda meta: meta["frames"][1]["transform_matrix"][0].__setitem__(3, float("nan")),
     r"transforms_val.json: frame 1: transform_matrix is not finite"),
    (lambda meta: meta["frames"][3]["transform_matrix"][2].__setitem__(1, float("inf")),
     r"transforms_val.json: frame 3: transform_matrix is not finite"),
    (lambda meta: meta["frames"][2]["transform_matrix"][1].pop(),
     r"transforms_val.json: frame 2: transform_matrix is not a 4x4 matrix of numbers"),
    (lambda meta: meta["frames"][4].pop("transform_matrix"),
     r"transforms_val.json: frame 4: no 'transform_matrix' key"),
    (lambda meta: meta.update(frames={"0": {}}), r"transforms_val.json: `frames` is a dict, expected a list"),
    (lambda meta: meta.update(camera_angle_x=float("nan")), r"transforms_val.json: camera_angle_x is nan"),
    (lambda meta: meta.update(camera_angle_x=0), r"transforms_val.json: camera_angle_x is 0"),
], ids=["no frames", "flat matrix", "nan pose", "inf pose", "ragged matrix", "no matrix", "frames not a list",
        "nan field of view", "zero field of view"])
def test_a_bad_frame_in_a_transforms_file_names_the_file_and_the_frame(lego, tmp_path, edit, message):
    scene = _lego_split_with(lego, tmp_path, edit)
    with pytest.raises(DatasetError, match=message):
        nd.load_blender(scene, "val")


def test_a_view_of_another_size_names_its_image(lego, tmp_path):
    from PIL import Image

    scene = _lego_split_with(lego, tmp_path, lambda meta: None)
    second = scene / (json.loads((scene / "transforms_val.json").read_text())["frames"][1]["file_path"] + ".png")
    Image.open(second).resize((50, 50)).save(second)
    with pytest.raises(DatasetError, match=rf"transforms_val.json: frame 1: .*{second.name} is 50x50 pixels, but "
                                           r"frame 0 \(r_0.png\) is 100x100"):
        nd.load_blender(scene, "val")


def test_a_split_that_skip_and_limit_leave_empty_says_so(lego, tmp_path):
    scene = _lego_split_with(lego, tmp_path, lambda meta: None)
    with pytest.raises(DatasetError, match=r"transforms_val.json: no frames left of 100 \(skip 1, limit 0\)"):
        nd.load_blender(scene, "val", limit=0)


def test_camera_rays_go_through_their_pixels_in_world_axes():
    """OpenGL camera axes (x right, y up, looking down -z), turned into the world by the pose's rotation."""
    _, d = nd.camera_rays(4, 6, 5.0, torch.eye(4)[:3])
    assert d[0, 0, 0] < 0 and d[0, 0, 1] > 0 and d[-1, -1, 0] > 0 and d[-1, -1, 1] < 0  # top left, bottom right
    c2w = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 0.0, 2.0], [-1.0, 0.0, 0.0, 3.0]])  # turned to look down -x
    o, d = nd.camera_rays(4, 6, 5.0, c2w)
    assert torch.equal(d[2, 3], torch.tensor([-1.0, 0.0, 0.0])) and torch.equal(o[1, 2], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.allclose(d[0, 0], torch.tensor([-1.0, 0.4, 0.6]))  # up and to the camera's left (world +z)


def test_ndc_view_rays_keep_the_view_directions_of_the_camera_and_use_the_near_plane_at_one():
    """As NeRF: viewing directions are the unit camera directions taken before NDC, and NDC uses near = 1."""
    pose = torch.tensor([[1.0, 0.0, 0.0, 0.1], [0.0, 1.0, 0.0, -0.2], [0.0, 0.0, 1.0, 0.3]])
    views = nd.Views(torch.zeros(1, 4, 6, 3), pose[None], focal=5.0, near=0.0, far=1.0, ndc=True)
    rays = nd.view_rays(views, 0)
    origins, directions = nd.camera_rays(4, 6, 5.0, pose)
    o_ndc, d_ndc = nd.ndc_rays(4, 6, 5.0, 1.0, origins, directions)
    torch.testing.assert_close(rays[:, 6:], torch.nn.functional.normalize(directions.reshape(-1, 3), dim=-1))
    torch.testing.assert_close(rays[:, :3], o_ndc.reshape(-1, 3))
    torch.testing.assert_close(rays[:, 3:6], d_ndc.reshape(-1, 3))


def test_llff_poses_are_right_handed_rotations(fern):
    """The [down, right, back] -> [right, up, back] turn negates one axis: a sign lost there mirrors the scene."""
    views, _ = nd.load_llff(fern, factor=8)
    np.testing.assert_allclose(np.linalg.det(views.poses[:, :, :3].double().numpy()), np.ones(20), atol=1e-4)


def test_validation_renders_the_validation_views(shared_data, lego, fern):
    """Blender validates on transforms_val.json's views; LLFF on the held-out views (as the test), never on views
    it trains on: the best checkpoint is chosen on validation."""
    lego_data = nd.NeRFDataModule(root=str(shared_data), folder="nerf_synthetic_100px", val_views=2, test_views=1,
                                  download=False)
    lego_data.setup()
    assert torch.equal(lego_data.splits["val"].poses, nd.load_blender(lego, "val", limit=2).poses)
    assert torch.equal(lego_data.splits["test"].poses, nd.load_blender(lego, "test", limit=1).poses)
    fern_data = nd.NeRFDataModule("llff", "fern", root=str(shared_data), download=False)
    fern_data.setup()
    assert torch.equal(fern_data.splits["val"].poses, fern_data.splits["test"].poses)
    views, _ = nd.load_llff(fern, factor=8)
    assert torch.equal(fern_data.splits["val"].poses, views.poses[::8])


# ---------------------------------------------------------------------------------------------- rendering
def test_compositing_takes_the_first_opaque_sample_and_lets_empty_space_show_the_background():
    depths = torch.tensor([[2.0, 3.0, 4.0]])
    direction = torch.tensor([[0.0, 0.0, -1.0]])
    raw = torch.tensor([[[10.0, -10.0, -10.0, 1e4], [-10.0, 10.0, -10.0, 1e4], [0.0, 0.0, 0.0, 0.0]]])
    rgb, weights = vr.composite(raw, depths, direction, white_background=True)
    assert torch.allclose(rgb, torch.sigmoid(torch.tensor([[10.0, -10.0, -10.0]])), atol=1e-4)
    assert torch.allclose(weights, torch.tensor([[1.0, 0.0, 0.0]]), atol=1e-6)
    empty = raw.clone()
    empty[..., 3] = -5.0  # no density anywhere: white on white, black on black
    assert torch.allclose(vr.composite(empty, depths, direction, True)[0], torch.ones(1, 3))
    assert torch.allclose(vr.composite(empty, depths, direction, False)[0], torch.zeros(1, 3))


def test_importance_samples_fall_where_the_coarse_weights_are():
    depths = torch.linspace(2.0, 6.0, 9).expand(3, 9)
    weights = torch.zeros(3, 9)
    weights[:, 4] = 1.0  # all the mass on the sample at depth 4: the bin between the midpoints 3.75 and 4.25
    extra = vr.importance_depths(depths, weights, 64, perturb=True, generator=torch.Generator().manual_seed(0))
    inside = ((extra >= 3.75) & (extra <= 4.25)).float().mean()
    assert inside > 0.95 and not extra.requires_grad
    even = vr.stratified_depths(2, 8, 2.0, 6.0, perturb=True, device=torch.device("cpu"))
    bins = torch.linspace(2.0, 6.0, 8)
    mids = 0.5 * (bins[1:] + bins[:-1])
    lower, upper = torch.cat([bins[:1], mids]), torch.cat([mids, bins[-1:]])
    assert torch.all((even >= lower) & (even <= upper))


class _Slab(nn.Module):
    """Red matter of density ln(2)/4 per world unit at ray depths t < 3.75 (world distance < 7.5 for the rays of
    ``_slab_batch``, whose direction has length 2); empty beyond. Records the samples it is asked about."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, points, viewdirs, network):
        self.seen.append((network, points, viewdirs))
        t = points[..., 2].neg().add(1.0) / 2.0  # the rays start at z = 1 and run down -z, 2 world units per t
        raw = torch.zeros(*points.shape[:2], 4)
        raw[..., 0], raw[..., 1:3] = 30.0, -30.0
        raw[..., 3] = torch.where(t < 3.75, math.log(2.0) / 4.0, 0.0)
        return raw


def _slab_batch(white: bool) -> dict:
    direction = torch.tensor([[0.0, 0.0, -2.0]])  # not unit: NeRF's unnormalised camera direction
    rays = torch.cat([torch.tensor([[0.0, 0.0, 1.0]]), direction, direction / 2.0], -1)
    return {"rays": rays, "rgb": torch.zeros(1, 3), "near": 2.0, "far": 6.0, "white_background": white}


@pytest.mark.parametrize("white", [False, True])
def test_rendering_integrates_density_over_world_distance_between_near_and_far_on_the_scenes_background(white):
    """Samples at depths 2, 2.5, 3, 3.5 (of 2..6) hold the slab: 4 world units of density ln(2)/4 let half the light
    through. Depths along a non-unit direction must be scaled to world distance (else 1 - 2**-0.5 is absorbed), lie
    in [near, far], and the light that passes shows the batch's background (black for LLFF, white for Blender)."""
    model = _Slab()
    out = ViewSynthesis(coarse_samples=9, fine_samples=0).step(model, _slab_batch(white), "val")
    background = 0.5 if white else 0.0  # the half of the light that passes
    torch.testing.assert_close(out.output, torch.tensor([[0.5, 0.0, 0.0]]) + background, atol=1e-4, rtol=0)
    (_, points, viewdirs), = model.seen
    depths = (1.0 - points[0, :, 2]) / 2.0
    torch.testing.assert_close(depths, torch.linspace(2.0, 6.0, 9))
    assert torch.equal(viewdirs, torch.tensor([[[0.0, 0.0, -1.0]]]))  # unit view direction, for the colour branch


def test_the_loss_trains_both_fields_and_the_metric_reads_the_fine_one():
    """NeRF's loss is MSE(coarse) + MSE(fine): a loss of the fine colours alone leaves the coarse field untrained
    (and with it the importance samples); the reported colours (PSNR) are the fine field's."""

    class TwoColours(nn.Module):  # an opaque red coarse field and an opaque green fine field
        def forward(self, points, viewdirs, network):
            raw = torch.full((*points.shape[:2], 4), -30.0)
            raw[..., 0 if network == "coarse" else 1] = 30.0
            raw[..., 3] = 100.0
            return raw

    batch = {**_slab_batch(False), "rgb": torch.tensor([[0.0, 0.0, 1.0]])}  # blue: both fields are off by 2/3
    out = ViewSynthesis(coarse_samples=8, fine_samples=8).step(TwoColours(), batch, "train")
    torch.testing.assert_close(out.loss, torch.tensor(4.0 / 3.0), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.output, torch.tensor([[0.0, 1.0, 0.0]]), atol=1e-5, rtol=0)


def test_the_last_sample_stands_for_the_rest_of_the_ray():
    """NeRF's last interval is infinite: faint matter at the far bound still hides the background."""
    depths, direction = torch.tensor([[2.0, 4.0, 6.0]]), torch.tensor([[0.0, 0.0, -1.0]])
    raw = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [-30.0, -30.0, -30.0, 1e-3]]])
    rgb, weights = vr.composite(raw, depths, direction, white_background=True)
    assert torch.allclose(weights, torch.tensor([[0.0, 0.0, 1.0]])) and torch.allclose(rgb, torch.zeros(1, 3))


def test_psnr_is_the_mean_over_views_of_each_views_psnr():
    """20 dB (MSE 1e-2) and 40 dB (MSE 1e-4) views score 30 dB, the paper's mean over test views (the PSNR of the
    pooled MSE would be 23 dB); colours are in [0, 1] (data range 1)."""
    task = ViewSynthesis()
    for error in (0.1, 0.01):
        target = torch.full((6, 3), 0.5)
        out = StepOutput(loss=torch.tensor(0.0), output=target + error, target=target, batch_size=6)
        task.update_metrics(out, None, "test")
    assert task.stage_metrics("test")["psnr"].compute().item() == pytest.approx(30.0, abs=1e-3)


# ---------------------------------------------------------------------------------------------- training
def _rules(method: str) -> list[FeedbackAlignmentStrategy]:
    if method == "bp":
        return [FeedbackAlignmentStrategy(method="bp", verbose=False)]
    return [FeedbackAlignmentStrategy(method=method, name=n, output=n, batch_dims=[0, 1], verbose=False,
                                      feedback_points=[f"{n}.trunk.*", f"{n}.feature", f"{n}.views.0"])
            for n in ("coarse", "fine")]


def _module(lr: float) -> TaskModule:
    return TaskModule(NeRF(num_layers=3, hidden=64, skip=None, num_freqs_xyz=6, num_freqs_dir=2),
                      ViewSynthesis(coarse_samples=16, fine_samples=16, chunk=10_000),
                      optimizer=lambda p: torch.optim.Adam(p, lr=lr))


def _lego_run(shared_data: Path, tmp_path: Path, method: str, steps: int, lr: float, **trainer_args):
    pl.seed_everything(0, verbose=False)
    data = nd.NeRFDataModule(root=str(shared_data), folder="nerf_synthetic_100px", rays_per_batch=512,
                             steps_per_epoch=steps, precrop_steps=50, val_views=1, test_views=1, skip=8,
                             download=False)
    module = _module(lr)
    trainer_args.setdefault("callbacks", _rules(method))
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                         **trainer_args)
    before = trainer.validate(module, datamodule=data, verbose=False)[0]["val/psnr"]
    trainer.fit(module, datamodule=data)
    after = trainer.validate(module, datamodule=data, verbose=False)[0]["val/psnr"]
    return before, after, trainer, module


@pytest.mark.parametrize("method, steps, lr, gain", [("bp", 100, 5e-3, 4.0), ("dfa", 150, 1e-3, 1.0)])
def test_bp_and_dfa_raise_the_psnr_of_a_real_lego_view(shared_data, lego, tmp_path, method, steps, lr, gain):
    """A small coarse/fine NeRF on the real 100-pixel lego: the held-out view's PSNR rises (measured: BP 9.1 -> 14.5
    dB in 100 steps, DFA 9.1 -> 11.1 in 200 at lr 1e-3; the untrained field renders almost white)."""
    before, after, trainer, module = _lego_run(shared_data, tmp_path, method, steps, lr, enable_checkpointing=False)
    assert 8.0 < before < 10.5
    assert after > before + gain, (before, after)
    test = trainer.test(module, datamodule=trainer.datamodule, verbose=False)[0]
    assert math.isfinite(test["test/psnr"]) and test["test/psnr"] > before


def test_each_nerf_field_has_its_own_feedback_matrix_in_the_checkpoint(shared_data, lego, tmp_path):
    _, _, trainer, _ = _lego_run(shared_data, tmp_path, "dfa", 4, 1e-3, enable_checkpointing=False)
    coarse, fine = (cb for cb in trainer.callbacks if isinstance(cb, FeedbackAlignmentStrategy))
    assert coarse.state_key != fine.state_key and coarse.engine.seed != fine.engine.seed
    assert coarse.engine.output_name == "coarse" and [p.name for p in fine.engine.points][:1] == ["fine.trunk.0"]
    assert coarse.engine.matrix.shape == fine.engine.matrix.shape == (4, 3 * 64 + 64 + 32)
    assert not torch.equal(coarse.engine.matrix, fine.engine.matrix)
    path = tmp_path / "nerf.ckpt"
    trainer.save_checkpoint(path)
    states = torch.load(path, weights_only=False)["callbacks"]
    for cb in (coarse, fine):
        assert torch.equal(states[cb.state_key]["feedback"]["matrix"], cb.engine.matrix)
    pl.seed_everything(0, verbose=False)  # resume: each rule finds its own B under its own key
    resumed = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                         enable_checkpointing=False, default_root_dir=tmp_path, callbacks=_rules("dfa"))
    resumed.fit(_module(1e-3), datamodule=trainer.datamodule, ckpt_path=path)  # a fresh model, as a new process
    again = [cb for cb in resumed.callbacks if isinstance(cb, FeedbackAlignmentStrategy)]
    assert [cb.name for cb in again] == ["coarse", "fine"] and resumed.global_step == 8
    assert all(torch.equal(cb.engine.matrix, old.engine.matrix) for cb, old in zip(again, (coarse, fine)))
    assert "outside this rule" in fine.engine.report()  # the coarse field is the other rule's


def test_a_coarse_only_task_with_fine_samples_asks_for_the_fine_field():
    model = NeRF(num_layers=2, hidden=8, skip=None, hierarchical=False)
    assert model.fine is None and torch.all(model.coarse.sigma_head.bias == 0)  # no dead density at init
    rays = torch.cat([torch.zeros(4, 3), torch.tensor([[0.0, 0.0, -1.0]]).expand(4, 3),
                      torch.tensor([[0.0, 0.0, -1.0]]).expand(4, 3)], -1)
    batch = {"rays": rays, "rgb": torch.rand(4, 3), "near": 2.0, "far": 6.0, "white_background": True}
    assert ViewSynthesis(8, 0).step(model, batch, "train").output.shape == (4, 3)
    with pytest.raises(ConfigError, match="no 'fine' field"):
        ViewSynthesis(8, 8).step(model, batch, "train")
    with pytest.raises(ConfigError, match=r"expected rays \[R, 9\]"):
        ViewSynthesis(8, 0).step(model, {**batch, "rays": rays[:, :6]}, "train")


def test_dual_render_averages_both_fields_raw_outputs_at_the_fine_samples_in_evaluation_only():
    """The paper's NeRF-Dual: evaluation renders 0.5 (fine + coarse) raw at the fine samples; training is unchanged."""
    torch.manual_seed(0)
    model = NeRF(num_layers=2, hidden=16, skip=None, num_freqs_xyz=4, num_freqs_dir=2)
    with torch.no_grad():  # some density in both fields (a fresh field starts empty), unequal between them
        model.coarse.sigma_head.bias.fill_(0.5)
        model.fine.sigma_head.bias.fill_(2.0)

    class Averaged(nn.Module):  # the same two fields, with the fine one replaced by the 0.5/0.5 mix
        def forward(self, points, viewdirs, network):
            raw = model(points, viewdirs, "coarse")
            return raw if network == "coarse" else 0.5 * (raw + model(points, viewdirs, "fine"))

    rays = torch.cat([torch.randn(6, 3) * 0.1, torch.tensor([[0.0, 0.0, -1.0]]).expand(6, 3),
                      torch.tensor([[0.0, 0.0, -1.0]]).expand(6, 3)], -1)
    batch = {"rays": rays, "rgb": torch.rand(6, 3), "near": 2.0, "far": 6.0, "white_background": False}
    with torch.no_grad():
        dual = ViewSynthesis(8, 8, dual=True).step(model, batch, "test").output
        plain = ViewSynthesis(8, 8).step(model, batch, "test").output
        mixed = ViewSynthesis(8, 8).step(Averaged(), batch, "test").output
        torch.testing.assert_close(dual, mixed)
        assert not torch.allclose(dual, plain)
        torch.manual_seed(1)
        train_dual = ViewSynthesis(8, 8, dual=True).step(model, batch, "train").output
        torch.manual_seed(1)
        assert torch.equal(train_dual, ViewSynthesis(8, 8).step(model, batch, "train").output)
    with pytest.raises(ConfigError, match="needs fine_samples > 0"):
        ViewSynthesis(8, 0, dual=True)


def test_the_example_archive_is_unpacked_into_the_cache_and_checked(shared_data, lego, tmp_path, monkeypatch):
    """Offline stand-in for the NeRF authors' example archive: a zip laid out as theirs, holding the real lego files.
    The scene lands in the cache, never in the data root; a camera file that fails its SHA-256 leaves nothing."""
    import zipfile

    def archive(name: str, corrupt: bool = False) -> Path:
        path = tmp_path / name
        with zipfile.ZipFile(path, "w") as zf:
            for f in sorted(lego.rglob("*")):
                if f.is_file() and (f.suffix == ".json" or "r_0.png" in f.name or f.parent.name == "train"):
                    data = f.read_bytes()
                    if corrupt and f.name == "transforms_val.json":
                        data = data.replace(b"camera_angle_x", b"camera_angle_y")
                    zf.writestr(f"nerf_synthetic/lego/{f.relative_to(lego)}", data)
        return path

    cache, root = tmp_path / "cache", tmp_path / "empty"
    monkeypatch.setattr(nd, "download_file", lambda url, dest: archive("bad.zip", corrupt=True))
    bad = nd.NeRFDataModule(root=str(root), cache_dir=str(cache), val_views=1, test_views=1)
    with pytest.raises(DatasetError, match="transforms_val.json has sha256"):
        bad.setup()
    assert not (cache / "nerf" / "nerf_synthetic" / "lego").exists() and not list((cache / "nerf" / "nerf_synthetic").iterdir())
    monkeypatch.setattr(nd, "download_file", lambda url, dest: archive("good.zip"))
    data = nd.NeRFDataModule(root=str(root), cache_dir=str(cache), val_views=1, test_views=1)
    assert data.scene_dir() == cache / "nerf" / "nerf_synthetic" / "lego"
    data.setup()
    assert len(data.splits["train"].poses) == 100 and not root.exists()


def test_alignment_is_measured_at_the_points_of_both_fields(shared_data, lego, tmp_path):
    from dfa_lightning.callbacks import AlignmentMonitor

    monitor = AlignmentMonitor(every_n_steps=1)
    _lego_run(shared_data, tmp_path, "dfa", 2, 1e-3, enable_checkpointing=False, callbacks=[*_rules("dfa"), monitor])
    for field in ("coarse", "fine"):
        for point in (f"{field}.trunk.0", f"{field}.views.0"):
            assert -1.0 <= monitor.last[f"align/signal_cos/{point}"] <= 1.0
            assert monitor.last[f"align/update_ratio/{point}"] > 0


def _fern_copy(fern: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "fern"
    copy.mkdir()
    shutil.copy(fern / "poses_bounds.npy", copy / "poses_bounds.npy")
    shutil.copytree(fern / "images_8", copy / "images_8")
    return copy


@pytest.mark.parametrize("bound", [0.0, float("nan")])
def test_a_zero_or_nan_llff_depth_bound_is_named_with_its_row(bound, fern, tmp_path):
    """It scaled the scene by inf: a NaN loss at the first step, blamed on the learning rate."""
    copy = _fern_copy(fern, tmp_path)
    arr = np.load(copy / "poses_bounds.npy")
    arr[3, 15] = bound
    np.save(copy / "poses_bounds.npy", arr)
    with pytest.raises(nd.DatasetError, match=r"poses_bounds.npy: row 3: depth bounds \[(0.0|nan), .*\], expected two "
                                              r"finite numbers > 0"):
        nd.load_llff(copy, factor=8)


@pytest.mark.parametrize("column, value, expected", [
    (3, float("nan"), r"row 5: camera pose .* is not finite, or its rotation is degenerate"),
    (4, 0.0, r"row 5: \[height, width, focal\] = \[0.0, .*expected three finite numbers > 0"),
    (14, -1.0, r"row 5: \[height, width, focal\] = \[.*, -1.0\], expected three finite numbers > 0"),
], ids=["nan pose", "zero height", "negative focal"])
def test_a_bad_llff_camera_is_named_with_its_row(column, value, expected, fern, tmp_path):
    """A NaN pose made every view's rays NaN (the recentring averages them all), a 0 height divided by zero and a
    negative focal flipped the rays silently."""
    copy = _fern_copy(fern, tmp_path)
    arr = np.load(copy / "poses_bounds.npy")
    arr[5, column] = value
    np.save(copy / "poses_bounds.npy", arr)
    with pytest.raises(nd.DatasetError, match=expected):
        nd.load_llff(copy, factor=8)


def test_llff_images_of_different_sizes_are_named(fern, tmp_path):
    """A bare `ValueError: all input arrays must have the same shape` from np.stack (Blender already named it)."""
    from PIL import Image

    copy = _fern_copy(fern, tmp_path)
    first = sorted((copy / "images_8").iterdir())[2]
    Image.open(first).resize((50, 37)).save(first)
    with pytest.raises(nd.DatasetError, match=rf"frame 2: .*{first.name} is 50x37 pixels, but frame 0 .* is 504x378"):
        nd.load_llff(copy, factor=8)


def test_a_pass_longer_than_the_rays_reshuffles_and_steps_below_one_are_refused():
    """`steps_per_epoch` above one pass was cut to one pass without a word (the LLFF recipe's 5,000 steps were 790
    on fern), and 0 or -1 silently became 1 step per epoch."""
    rays = torch.arange(10.0)[:, None].expand(10, 9).contiguous()
    data = nd.RandomRays(rays, torch.zeros(10, 3), 4, {}, seed=0, steps=5)
    batches = [b["rays"][:, 0].long().tolist() for b in data]
    assert len(batches) == 5 and all(len(set(b)) == 4 for b in batches)  # no ray twice in a batch
    assert not set(batches[0]) & set(batches[1]) and not set(batches[2]) & set(batches[3])  # one permutation each
    assert batches[:2] != batches[2:4]  # the second permutation is a fresh one
    with pytest.raises(ConfigError, match="rays_per_batch 11 is more than the 10 training rays"):
        nd.RandomRays(rays, torch.zeros(10, 3), 11, {}, seed=0)
    for steps in (0, -1):
        with pytest.raises(ConfigError, match=rf"steps_per_epoch must be >= 1 or null .*got {steps}"):
            nd.NeRFDataModule(steps_per_epoch=steps)


def _rays_from_the_origin(n: int) -> dict:
    """A training batch of ``n`` rays from the origin along (1, 1, 1), as NeRFDataModule yields them."""
    rays = torch.cat([torch.zeros(n, 3), torch.nn.functional.normalize(torch.ones(n, 3)).repeat(1, 2)], -1)
    return {"rays": rays, "rgb": torch.rand(n, 3), "near": 2.0, "far": 6.0, "white_background": True}


def test_the_memory_check_scales_a_probe_of_the_batch_and_leaves_the_random_state_alone(monkeypatch):
    import dfa_lightning.tasks.view_synthesis as vs

    model, task = NeRF(num_layers=2, hidden=16, skip=None), ViewSynthesis(coarse_samples=8, fine_samples=8)
    batch = _rays_from_the_origin(4096)
    per_ray = vs.leaf_output_bytes(model, lambda: task.render(model, batch["rays"][:256], batch, train=True)) / 256
    assert per_ray > 16 * 16 * 4  # at least one 16-wide layer output per sample
    monkeypatch.setattr(vs, "free_bytes", lambda device: int(per_ray * 4096 * 2))
    state = torch.get_rng_state()
    task.check_step_memory(model, batch, torch.device("cpu"))  # fits twice over: no word
    assert torch.equal(torch.get_rng_state(), state)
    monkeypatch.setattr(vs, "free_bytes", lambda device: int(per_ray * 1000))
    with pytest.raises(ConfigError, match=r"rays_per_batch 4096: one training step needs at least .* free on cpu; "
                                          r"lower data.init_args.rays_per_batch \(below 1000\)"):
        task.check_step_memory(model, batch, torch.device("cpu"))
    assert not any(m._forward_hooks for m in model.modules())  # the counting hooks are gone


def _mem_available() -> int:
    line = next(row for row in Path("/proc/meminfo").read_text().splitlines() if row.startswith("MemAvailable:"))
    return int(line.split()[1]) * 1024


def test_free_cpu_bytes_is_memavailable_in_bytes_capped_by_the_cgroup_headroom(tmp_path, monkeypatch):
    if not Path("/proc/meminfo").is_file():
        pytest.skip("no /proc/meminfo")
    monkeypatch.setattr(memory, "CGROUP_FILES", ())
    assert free_bytes(torch.device("cpu")) == pytest.approx(_mem_available(), rel=0.2)
    (tmp_path / "max").write_text("max\n")
    (tmp_path / "limit").write_text("1000000\n")
    (tmp_path / "usage").write_text("400000\n")
    monkeypatch.setattr(memory, "CGROUP_FILES", ((str(tmp_path / "max"), str(tmp_path / "usage")),))
    assert free_bytes(torch.device("cpu")) == pytest.approx(_mem_available(), rel=0.2)  # "max": no limit
    monkeypatch.setattr(memory, "CGROUP_FILES", ((str(tmp_path / "limit"), str(tmp_path / "usage")),))
    assert free_bytes(torch.device("cpu")) == 600000


def test_leaf_output_bytes_counts_each_leaf_modules_output_once():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    assert leaf_output_bytes(model, lambda: model(x)) == (3 * 8 + 3 * 8 + 3 * 2) * 4
    assert not any(m._forward_hooks for m in model.modules())


def test_free_cuda_bytes_counts_the_cache_torch_holds_but_does_not_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (1000, 8000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 500)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 200)
    assert free_bytes(torch.device("cuda", 0)) == 1000 + 500 - 200


@pytest.mark.parametrize("method", ["bp", "dfa"])
def test_a_python_api_fit_checks_the_batch_memory_before_the_dfa_probe(method, tmp_path, monkeypatch):
    """The check ran from the CLI only: a Trainer built in code met the DFA callback's setup probe first, which runs
    the whole first batch (the kernel's out-of-memory kill on the CPU)."""
    import dfa_lightning.tasks.view_synthesis as vs

    loader = torch.utils.data.DataLoader([_rays_from_the_origin(4096)], batch_size=None)
    module = TaskModule(NeRF(num_layers=2, hidden=16, skip=None, num_freqs_xyz=2, num_freqs_dir=1),
                        ViewSynthesis(coarse_samples=4, fine_samples=4))
    checked, check = [], vs.ViewSynthesis.check_step_memory
    monkeypatch.setattr(vs.ViewSynthesis, "check_step_memory",
                        lambda self, *args, **kw: (checked.append(args[2]), check(self, *args, **kw)))
    calibrated, calibrate = [], FeedbackEngine.calibrate
    monkeypatch.setattr(FeedbackEngine, "calibrate",
                        lambda self, *a, **kw: (calibrated.append(1), calibrate(self, *a, **kw))[1])

    def fit() -> None:
        pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                   enable_model_summary=False, default_root_dir=tmp_path, callbacks=_rules(method)
                   ).fit(module, train_dataloaders=loader)

    monkeypatch.setattr(vs, "free_bytes", lambda device: 2**20)  # 1 MiB free
    with pytest.raises(ConfigError, match=r"rays_per_batch 4096: one training step needs at least .* free on cpu"):
        fit()
    assert not calibrated and not attached_engines(module.model)  # refused before the probe, no hook left behind
    assert checked == [torch.device("cpu")]
    monkeypatch.setattr(vs, "free_bytes", lambda device: 2**40)
    fit()  # it fits: trained, and checked by each rule (coarse, fine) before its probe and by the module's setup
    assert checked == [torch.device("cpu")] * (4 if method == "dfa" else 2) and len(calibrated) == (method == "dfa") * 2


@pytest.mark.gpu
def test_the_setup_probes_of_a_nerf_put_on_the_gpu_leave_the_cuda_random_state_alone(tmp_path, monkeypatch):
    """NeRF draws its samples along the rays on the rays' device: a probe on a CUDA model moved the CUDA state."""
    module = TaskModule(NeRF(num_layers=2, hidden=16, skip=None, num_freqs_xyz=2, num_freqs_dir=1),
                        ViewSynthesis(coarse_samples=4, fine_samples=4)).cuda()
    unchanged = []
    for owner, name in [(FeedbackAlignmentStrategy, "_probe"), (TaskModule, "check_step_memory")]:
        def kept(*args, _run=getattr(owner, name), **kwargs):
            state = torch.cuda.get_rng_state()
            _run(*args, **kwargs)
            unchanged.append(torch.equal(torch.cuda.get_rng_state(), state))
        monkeypatch.setattr(owner, name, kept)
    pl.Trainer(accelerator="gpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
               enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
               callbacks=_rules("dfa")).fit(module, train_dataloaders=torch.utils.data.DataLoader(
                   [_rays_from_the_origin(512)], batch_size=None))
    assert len(unchanged) == 5 and all(unchanged)  # a probe per field; the check asked by each and by setup



def test_fine_samples_need_three_coarse_samples_to_draw_from():
    """With 2 coarse samples the weights between the ray's ends are empty: the first step died in ``gather``."""
    with pytest.raises(ConfigError, match=r"fine_samples > 0 .* needs coarse_samples >= 3, got 2"):
        ViewSynthesis(coarse_samples=2, fine_samples=8)
    ViewSynthesis(coarse_samples=2, fine_samples=0)
    ViewSynthesis(coarse_samples=3, fine_samples=8)


def test_a_central_crop_with_no_pixel_is_refused(shared_data, lego):
    """``precrop_fraction: 0.01`` of a 100-pixel view is no pixel: torch's "random_ expects 'from' < 'to'"."""
    data = nd.NeRFDataModule(root=str(shared_data), folder="nerf_synthetic_100px", rays_per_batch=64,
                             precrop_steps=2, precrop_fraction=0.01, download=False)
    with pytest.raises(ConfigError, match="precrop_fraction 0.01 leaves no pixel of the 100x100 views"):
        data.train_dataloader()


def test_each_epoch_of_a_fit_draws_fresh_rays_and_the_precrop_is_only_the_runs_first_steps(lego, shared_data,
                                                                                           tmp_path):
    """Lightning stops at ``len`` batches without exhausting the ray generator, whose pass count moved only after its
    last batch: every epoch replayed the first one's rays, precrop included (half of lego's rays were never drawn)."""
    import pytorch_lightning as pl

    class Seen(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w, self.rays = torch.nn.Parameter(torch.zeros(())), []

        def training_step(self, batch, batch_idx):
            self.rays.append(batch["rays"].clone())
            return self.w * 0 + batch["rays"].sum() * 0 + self.w ** 2

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = nd.NeRFDataModule(root=str(shared_data), folder="nerf_synthetic_100px", rays_per_batch=64,
                             steps_per_epoch=3, precrop_steps=2, val_views=1, download=False)
    seen = Seen()
    pl.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path).fit(seen, data)
    first, second = seen.rays[:3], seen.rays[3:]
    assert len(second) == 3 and not any(torch.equal(a, b) for a, b in zip(first, second))
    rays = data._train
    for epoch, batches in ((0, first), (1, second)):  # each epoch is its own pass: the crop only in epoch 0's
        rays.epoch = lambda: epoch
        assert all(torch.equal(b, expected["rays"]) for b, expected in zip(batches, rays)), epoch


def test_under_ddp_each_rank_renders_its_own_test_views_none_twice(shared_data, lego, monkeypatch):
    """Lightning's own sampler pads the ranks' shares by repeating views; the DataModule hands each its own."""
    from helpers import shards

    data = nd.NeRFDataModule(root=str(shared_data), folder="nerf_synthetic_100px", test_views=5, skip=8,
                             download=False)
    one = [view["rgb"] for view in data.test_dataloader()]
    rank0, rank1 = shards(monkeypatch, lambda: [view["rgb"] for view in data.test_dataloader()])
    assert (len(one), len(rank0), len(rank1)) == (5, 3, 2)
    assert all(torch.equal(a, b) for a, b in zip(one[0::2], rank0)) and all(
        torch.equal(a, b) for a, b in zip(one[1::2], rank1))
