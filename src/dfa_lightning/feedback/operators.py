"""Feedback operators: how ``e [N, d_out]`` becomes all projections ``[N, K]`` in one step.

The operator is the DFA step's main cost when the output is wide (a 32k vocabulary): ``dense`` costs
``N·d_out·K`` multiply-adds, ``lowrank`` ``N·r·(d_out + K)``, ``sparse`` ``N·K·nnz``. Every operator is drawn from
the engine's seeded generator and checkpointed as plain tensors.

* ``dense``: ``B = M`` (the paper).
* ``lowrank``: ``B = U V / sqrt(r)``, ``U [d_out, r]``, ``V [r, K]``: two thin matmuls.
* ``sparse``: each feedback column (one hidden unit) listens to ``nnz`` output units:
  ``B[:, j]`` has ``nnz`` non-zeros, scaled by ``sqrt(d_out / nnz)`` to keep the signal's norm.

Error transforms (what an optical or low-precision co-processor would see): ``exact``; ``sign``: ``sign(e)·m``;
``ternary``: ``sign(e)·[|e| > m/2]·m``, with ``m`` the mean of ``|e|`` over its non-zero entries. The single scalar
keeps the update's scale so that learning rates transfer; averaging over non-zero entries only keeps unlabeled rows
(masked graph nodes, padding) from shrinking it. ``centered``: ``e`` minus its mean over the batch rows.

Only ``exact`` is linear in ``e``. The others read statistics of the batch at hand (``m``, the batch mean), so
under gradient accumulation or DDP they are taken per micro-batch and per rank: two accumulated half-batches then
differ slightly from one full batch (about 1 % for sign/ternary, 10 % for centered, in a small MLP).
"""
from __future__ import annotations

import math
import warnings

import torch

from dfa_lightning.errors import ConfigError
from dfa_lightning.feedback import matrices

OPERATORS = ("dense", "lowrank", "sparse")
ERRORS = ("exact", "sign", "ternary", "centered")


class FeedbackOperator:
    """Holds CPU fp32 tensors (the checkpointed truth) and caches copies per device and dtype."""

    kind = "dense"
    _scaled_key = "matrix"  # the tensor that carries the operator's magnitude (see `scaled`)
    _block_key = "matrix"  # the tensor whose column blocks turn prepare(e) into one point's projection

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        self._cache: dict[tuple, dict[str, torch.Tensor]] = {}

    def on(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            self._cache = {key: {k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
                                 for k, v in self.tensors.items()}}
        return self._cache[key]

    def warm(self, device: torch.device, dtype: torch.dtype, slices: tuple[tuple[int, int], ...]) -> None:
        """Make every device copy the projections will read (called from the forward, so that no backward
        creates state: ``torch.compile`` traces a backward that only reads)."""
        self.on(device, dtype)

    def project(self, e: torch.Tensor) -> torch.Tensor:
        t = self.on(e.device, e.dtype)
        return e @ t["matrix"]

    # per-point projection (engine ``projection="per_point"``): ``prepare`` once per step, then one slice per point
    def prepare(self, e: torch.Tensor) -> torch.Tensor:
        """What every column slice is computed from (``e`` itself; ``e U`` for the low-rank operator)."""
        return e

    @property
    def prepared_width(self) -> int:
        """Columns of ``prepare(e)``: ``d_out`` (``r`` for the low-rank operator)."""
        return self.tensors["matrix"].shape[0]

    def project_slice(self, prepared: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Columns ``start:stop`` of ``project(e)`` from ``prepare(e)``: ``[N, stop - start]``."""
        return prepared @ self.block(prepared.device, prepared.dtype, start, stop)

    def block(self, device: torch.device, dtype: torch.dtype, start: int, stop: int) -> torch.Tensor:
        """What ``prepare(e)`` is multiplied by for columns ``start:stop``: ``[prepared_width, stop - start]``
        (a view of the device copy)."""
        return self.on(device, dtype)[self._block_key][:, start:stop]

    def dense(self) -> torch.Tensor:
        """The equivalent ``[d_out, K]`` matrix (for tests, alignment and reports)."""
        return self.tensors["matrix"]

    def scaled(self, factor: float) -> "FeedbackOperator":
        """The same operator times ``factor`` (a shared-column layout's one scale, folded in once)."""
        return type(self)({k: v * factor if k == self._scaled_key else v for k, v in self.tensors.items()})

    def flops(self, n: int) -> int:
        d_out, k = self.dense().shape
        return 2 * n * d_out * k


class LowRankFeedback(FeedbackOperator):
    kind = "lowrank"
    _scaled_key = "v"
    _block_key = "v"

    def project(self, e: torch.Tensor) -> torch.Tensor:
        t = self.on(e.device, e.dtype)
        return (e @ t["u"]) @ t["v"]

    def prepare(self, e: torch.Tensor) -> torch.Tensor:
        return e @ self.on(e.device, e.dtype)["u"]  # [N, r]

    @property
    def prepared_width(self) -> int:
        return self.tensors["u"].shape[1]

    def dense(self) -> torch.Tensor:
        return self.tensors["u"] @ self.tensors["v"]

    def flops(self, n: int) -> int:
        (d_out, r), (_, k) = self.tensors["u"].shape, self.tensors["v"].shape
        return 2 * n * r * (d_out + k)


def _no_half_csr(e: torch.Tensor) -> bool:
    """The CPU has no bf16/fp16 sparse CSR matmul (torch: "addmm_out_sparse_csr_impl_mkl" not implemented): the
    sparse product of a half-precision error (``projection_dtype: gradient`` under AMP) runs in fp32 there."""
    return e.device.type == "cpu" and e.dtype in (torch.bfloat16, torch.float16)


class SparseFeedback(FeedbackOperator):
    kind = "sparse"
    _scaled_key = "values"

    def on(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            rows, vals = self.tensors["rows"], self.tensors["values"]  # [K, nnz] each
            k, nnz = rows.shape
            d_out = int(self.tensors["d_out"])
            crow = torch.arange(0, k * nnz + 1, nnz)
            with warnings.catch_warnings():  # "beta state" / "invariant checks" notices, once per process is enough
                warnings.simplefilter("ignore", UserWarning)
                mt = torch.sparse_csr_tensor(crow, rows.reshape(-1), vals.reshape(-1), size=(k, d_out))
            self._cache = {key: {"mt": mt.to(device=device, dtype=dtype)}}
        return self._cache[key]

    @property
    def prepared_width(self) -> int:
        return int(self.tensors["d_out"])

    def project(self, e: torch.Tensor) -> torch.Tensor:
        if _no_half_csr(e):
            return self.project(e.float()).to(e.dtype)
        mt = self.on(e.device, e.dtype)["mt"]  # [K, d_out], CSR
        return (mt @ e.t()).t()  # [N, K]

    def warm(self, device: torch.device, dtype: torch.dtype, slices: tuple[tuple[int, int], ...]) -> None:
        for start, stop in slices:
            self._rows_slice(device, dtype, start, stop)

    def _rows_slice(self, device: torch.device, dtype: torch.dtype, start: int, stop: int) -> torch.Tensor:
        cache = self.on(device, dtype)
        key = ("rows", start, stop)
        if key not in cache:  # the CSR rows start:stop (feedback columns of one point), built once per device
            rows, vals = self.tensors["rows"][start:stop], self.tensors["values"][start:stop]
            k, nnz = rows.shape
            crow = torch.arange(0, k * nnz + 1, nnz)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                mt = torch.sparse_csr_tensor(crow, rows.reshape(-1), vals.reshape(-1),
                                             size=(k, int(self.tensors["d_out"])))
            cache[key] = mt.to(device=device, dtype=dtype)
        return cache[key]

    def project_slice(self, prepared: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if _no_half_csr(prepared):
            return self.project_slice(prepared.float(), start, stop).to(prepared.dtype)
        return (self._rows_slice(prepared.device, prepared.dtype, start, stop) @ prepared.t()).t()

    def block(self, device: torch.device, dtype: torch.dtype, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError("the sparse operator has no dense blocks (its points receive through tokens)")

    def dense(self) -> torch.Tensor:
        rows, vals = self.tensors["rows"], self.tensors["values"]
        k = rows.shape[0]
        out = torch.zeros(int(self.tensors["d_out"]), k, dtype=vals.dtype)
        out[rows, torch.arange(k).unsqueeze(1).expand_as(rows)] = vals
        return out

    def flops(self, n: int) -> int:
        return 2 * n * self.tensors["rows"].numel()


KINDS = {"dense": FeedbackOperator, "lowrank": LowRankFeedback, "sparse": SparseFeedback}


def draw_operator(kind: str, d_out: int, lay: matrices.FeedbackLayout, init: str, seed: int, shared_slices: bool,
                  rank: int, nnz: int) -> FeedbackOperator:
    """Draw an operator deterministically from ``seed``; per-point scales are folded in (independent columns)."""
    if kind not in KINDS:
        raise ConfigError(f"operator must be one of {OPERATORS}, got {kind!r}")
    if kind == "dense":
        return FeedbackOperator({"matrix": matrices.feedback_matrix(d_out, lay, init, seed, shared_slices)})
    generator = torch.Generator().manual_seed(seed)
    if shared_slices:  # columns shared by several points: their factors are applied by the engine (see `scaled`)
        col_scale = torch.ones(lay.total, dtype=torch.float32)
    else:
        col_scale = torch.cat([torch.full((stop - start,), s, dtype=torch.float32)
                               for (start, stop), s in zip(lay.slices, lay.scales)])
    if kind == "lowrank":
        if not 0 < rank:
            raise ConfigError(f"lowrank operator needs rank > 0, got {rank}")
        u = matrices.draw((d_out, rank), init, generator)
        v = matrices.draw((rank, lay.total), init, generator) * col_scale / math.sqrt(rank)
        return LowRankFeedback({"u": u, "v": v})
    nnz = min(nnz, d_out)
    if nnz <= 0:
        raise ConfigError(f"sparse operator needs nnz > 0, got {nnz}")
    scores = torch.rand((lay.total, d_out), generator=generator)
    rows = scores.topk(nnz, dim=1).indices.sort(dim=1).values  # nnz distinct output units per column
    values = matrices.draw((lay.total, nnz), init, generator) * col_scale.unsqueeze(1) * math.sqrt(d_out / nnz)
    return SparseFeedback({"rows": rows, "values": values, "d_out": torch.tensor(d_out)})


def from_state(state: dict[str, torch.Tensor], kind: str) -> FeedbackOperator:
    return KINDS[kind](state)


def transform_error(e: torch.Tensor, error: str) -> torch.Tensor:
    """``e`` ([N, d_out]) as the feedback sends it: exact; its sign or ternarisation at the mean magnitude (what a
    low-precision or optical co-processor sends); or centred: minus its mean over the rows that carry error, so that
    a component shared by the whole batch (which every step would add to each point along one fixed direction
    ``B_i ē``) is not fed back."""
    if error == "exact":
        return e
    if error == "centered":
        carries = (e != 0).any(dim=1, keepdim=True)  # rows without a label (masked nodes, padding) stay zero
        mean = e.sum(dim=0, keepdim=True) / carries.sum().clamp_min(1)
        return torch.where(carries, e - mean, e)
    magnitude = e.abs()
    nonzero = magnitude > 0
    # mean over the entries that carry error: rows without a label (masked nodes, padding) must not dilute it
    scale = magnitude.sum() / nonzero.sum().clamp_min(1)
    if error == "sign":
        return torch.sign(e) * scale
    if error == "ternary":
        return torch.sign(e) * (e.abs() > scale / 2) * scale
    raise ConfigError(f"error must be one of {ERRORS}, got {error!r}")
