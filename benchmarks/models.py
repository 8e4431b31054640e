"""Models, synthetic batches and the BP / DFA / shallow variants timed by :mod:`benchmarks.run`.

A :class:`Case` is one task model at one size with one synthetic batch and its loss; its :class:`Variant` s are the
training methods compared on it (``bp`` first: every ratio is taken against it). Every variant trains its own copy
of the model, built from the same seed, with the :class:`~dfa_lightning.feedback.engine.FeedbackEngine` attached
directly (no Lightning loop: the step is forward, loss, backward, Adam step, exactly what the Lightning module
runs, without logging overhead).

Presets (sizes): ``cpu`` (``make bench``, 2 cores, < 5 min), ``gpu`` (``make bench-gpu``, one H100/H200, < 6 min),
``tiny`` (the test suite). The flag ``default`` marks the DFA variant a recipe would use; the targets of issue #5
(DFA step time <= BP, MLP <= 0.8 x BP, peak memory <= 1.1 x BP) are checked on it.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dfa_lightning.models.graph import GCN
from dfa_lightning.models.mlp import MLP
from dfa_lightning.models.nerf import FEEDBACK_POINTS as NERF_POINTS
from dfa_lightning.models.nerf import NeRFMLP
from dfa_lightning.models.recsys import DeepFM
from dfa_lightning.models.transformer import ERROR_AT, FEEDBACK_POINTS as LM_POINTS
from dfa_lightning.models.transformer import TransformerLM


@dataclass
class Variant:
    """One training method on a case: ``engine`` are FeedbackEngine kwargs (besides model and method)."""

    name: str
    method: str  # bp | dfa | shallow
    engine: dict = field(default_factory=dict)
    default: bool = False  # the DFA variant a recipe uses: the targets are checked on it
    note: str = ""


@dataclass
class Case:
    name: str
    description: str
    build: Callable[[], nn.Module]
    batch: Callable[[torch.device, torch.Generator], tuple[tuple, torch.Tensor]]  # (model inputs, target)
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    variants: list[Variant]
    amp: str = "fp32"  # fp32 | bf16 (autocast on the forward; the projection itself stays fp32)
    lr: float = 1e-4
    mlp_target: bool = False  # the "DFA <= 0.8 x BP" target applies
    cuda_graph: bool = False  # the whole step captured once in a CUDA graph and replayed (see `graphed`)
    compile: str | None = None  # torch.compile mode of the model (forward and backward) (see `compiled`)


# ---------------------------------------------------------------------------------------------- sizes per preset
SIZES = {
    "tiny": dict(mlp=dict(layers=2, width=32, batch=16), gcn=dict(nodes=60, feats=20, edges=200, hidden=8, classes=4),
                 deepfm=dict(fields=5, per_field=10, embed=4, mlp=(16, 16), batch=8),
                 nerf=dict(layers=3, hidden=16, skip=1, batch=32),
                 lm=dict(vocab=50, d=16, heads=2, d_ff=32, layers=2, batch=2, seq=8), amp=("fp32",)),
    "cpu": dict(mlp=dict(layers=8, width=1024, batch=256),  # the GPU preset's depth; width / 4, batch / 16
                gcn=dict(nodes=2708, feats=1433, edges=10556, hidden=16, classes=7),  # Cora's sizes
                deepfm=dict(fields=39, per_field=1000, embed=10, mlp=(400, 400, 400), batch=2048),
                nerf=dict(layers=8, hidden=256, skip=4, batch=2048),
                lm=dict(vocab=8192, d=256, heads=4, d_ff=1024, layers=4, batch=4, seq=64), amp=("fp32",)),
    "gpu": dict(mlp=dict(layers=8, width=4096, batch=4096),
                gcn=dict(nodes=169_343, feats=128, edges=1_166_243, hidden=256, classes=40),  # ogbn-arxiv's sizes
                deepfm=dict(fields=39, per_field=25_000, embed=10, mlp=(400, 400, 400), batch=16_384),
                nerf=dict(layers=8, hidden=256, skip=4, batch=65_536),  # 1024 rays x 64 samples
                lm=dict(vocab=32_000, d=512, heads=8, d_ff=2048, layers=6, batch=16, seq=512), amp=("bf16", "fp32")),
}


def _dfa_variants(points: list[str], amp: str = "fp32", **engine) -> list[Variant]:
    variants = [Variant("bp", "bp"),
                Variant("dfa", "dfa", dict(feedback_points=points, **engine), default=True),
                Variant("dfa fused", "dfa", dict(feedback_points=points, projection="fused", **engine),
                        note="all B_i e from one matmul"),
                Variant("dfa per-point", "dfa", dict(feedback_points=points, projection="per_point", **engine),
                        note="B_i e computed when autograd reaches point i"),
                Variant("dfa per-point, token receivers", "dfa",
                        dict(feedback_points=points, projection="per_point", receiver="token", **engine),
                        note="an autograd Function per point, as before the matmul receivers")]
    if amp != "fp32":  # under AMP: the projection in the signal's own dtype (no fp32 copy of every B_i e to cast)
        variants += [Variant("dfa fused, bf16 projection", "dfa",
                             dict(feedback_points=points, projection="fused", projection_dtype="gradient", **engine)),
                     Variant("dfa per-point, bf16 projection", "dfa",
                             dict(feedback_points=points, projection="per_point", projection_dtype="gradient", **engine))]
    return variants + [Variant("shallow", "shallow", dict(feedback_points=points, **engine))]


def mlp_case(s: dict, amp: str) -> Case:
    w, n = s["width"], s["batch"]

    def batch(device, g):
        return (torch.randn(n, w, generator=g).to(device),), torch.randint(0, 10, (n,), generator=g).to(device)

    return Case(f"mlp_{amp}", f"MLP {s['layers']}x{w}, batch {n}, feedback on every layer (blocks.*), {amp}",
                lambda: MLP(w, 10, hidden=[w] * s["layers"]), batch, F.cross_entropy,
                _dfa_variants(["blocks.*"], amp), amp=amp, mlp_target=True)


def gcn_case(s: dict, amp: str) -> Case:
    nodes = s["nodes"]

    def batch(device, g):
        x = (torch.rand(nodes, s["feats"], generator=g) < 0.05).float()  # sparse bag-of-words like Cora
        edge_index = torch.randint(0, nodes, (2, s["edges"]), generator=g)
        y = torch.randint(0, s["classes"], (nodes,), generator=g)
        y[max(nodes // 20, 1):] = -100  # the loss sees a training mask (Cora: 140 of 2708 nodes)
        return (x.to(device), edge_index.to(device)), y.to(device)

    return Case(f"gcn_{amp}", f"GCN {s['feats']}->{s['hidden']}->{s['classes']}, {nodes} nodes, {s['edges']} edges "
                f"(full batch, point `hidden`), {amp}",
                lambda: GCN(s["feats"], s["classes"], hidden=s["hidden"], dropout=0.1), batch,
                lambda out, y: F.cross_entropy(out, y, ignore_index=-100), _dfa_variants(["hidden"], amp), amp=amp)


def deepfm_case(s: dict, amp: str) -> Case:
    fields, per = s["fields"], s["per_field"]

    def batch(device, g):
        x = torch.randint(0, per, (s["batch"], fields), generator=g) + torch.arange(fields) * per
        return (x.to(device),), (torch.rand(s["batch"], generator=g) < 0.25).float().to(device)

    return Case(f"deepfm_{amp}", f"DeepFM {fields} fields x {per} ids, embed {s['embed']}, MLP {list(s['mlp'])}, "
                f"batch {s['batch']} (points mlp.*), {amp}",
                lambda: DeepFM([per] * fields, embed_dim=s["embed"], mlp_dims=s["mlp"]), batch,
                F.binary_cross_entropy_with_logits, _dfa_variants(["mlp.*"], amp), amp=amp)


def nerf_case(s: dict, amp: str) -> Case:
    n = s["batch"]

    def batch(device, g):
        pts = torch.randn(n, 3, generator=g)
        dirs = F.normalize(torch.randn(n, 3, generator=g), dim=-1)
        return (pts.to(device), dirs.to(device)), torch.rand(n, 4, generator=g).to(device)

    return Case(f"nerf_{amp}", f"NeRF MLP {s['layers']}x{s['hidden']} (skip {s['skip']}), {n} samples, "
                f"points {NERF_POINTS['paper']}, {amp}",
                lambda: NeRFMLP(num_layers=s["layers"], hidden=s["hidden"], skip=s["skip"]), batch, F.mse_loss,
                _dfa_variants(NERF_POINTS["paper"], amp), amp=amp)


#: The default feedback operator when the LM's error is taken after the vocabulary (see README, performance): a
#: rank-64 B = UV in TinyDFA's shared layout (every block receives the same (e U) V). Cheaper than BP's gradient
#: through the decoder; on the WikiText-2 proxy as accurate as independent dense B_i
#: (benchmarks/results/lm_operators.md).
LM_AFTER_VOCAB_DEFAULT = dict(operator="lowrank", rank=64, shared_slices=True, scale="max_width",
                              projection_dtype="gradient")  # bf16 under AMP (no perplexity cost on the proxy)
#: The error before the vocabulary: one dense d x d_max B in TinyDFA's shared layout (recipes/lm_dfa_macro.yaml,
#: lm_dfa_micro.yaml), more accurate than independent B_i on the proxy; its product is d_max wide, not L x that.
LM_BEFORE_VOCAB_DEFAULT = dict(shared_slices=True, scale="max_width")


def lm_case(s: dict, amp: str) -> Case:
    b, t, v = s["batch"], s["seq"], s["vocab"]

    def batch(device, g):
        idx = torch.randint(0, v, (b, t + 1), generator=g)
        return (idx[:, :-1].to(device),), idx[:, 1:].to(device)

    def loss(logits, y):
        return F.cross_entropy(logits.reshape(-1, v), y.reshape(-1))

    tok = dict(batch_dims=[0, 1])
    macro, micro = LM_POINTS["macro"], LM_POINTS["micro"]
    before, after = dict(output=ERROR_AT["before_vocab"], **tok), dict(output=ERROR_AT["after_vocab"], **tok)
    variants = [
        Variant("bp", "bp"),
        Variant("dfa macro, e before vocab, shared", "dfa",
                dict(feedback_points=macro, **before, **LM_BEFORE_VOCAB_DEFAULT), default=True),
        Variant("dfa micro, e before vocab, shared", "dfa",
                dict(feedback_points=micro, **before, **LM_BEFORE_VOCAB_DEFAULT), default=True),
        Variant("dfa macro, e before vocab", "dfa", dict(feedback_points=macro, **before), note="independent B_i"),
        Variant("dfa micro, e before vocab", "dfa", dict(feedback_points=micro, **before), note="independent B_i"),
        Variant("dfa macro, e after vocab, lowrank r64 shared", "dfa",
                dict(feedback_points=macro, **after, **LM_AFTER_VOCAB_DEFAULT), default=True),
        Variant("dfa micro, e after vocab, lowrank r64 shared", "dfa",
                dict(feedback_points=micro, **after, **LM_AFTER_VOCAB_DEFAULT), default=True),
        Variant("dfa macro, e after vocab, lowrank r64 shared, fused", "dfa",
                dict(feedback_points=macro, **after, **LM_AFTER_VOCAB_DEFAULT, projection="fused")),
        Variant("dfa micro, e after vocab, lowrank r64 shared, per-point", "dfa",
                dict(feedback_points=micro, **after, **LM_AFTER_VOCAB_DEFAULT, projection="per_point")),
        Variant("dfa macro, e after vocab, lowrank r64", "dfa",
                dict(feedback_points=macro, operator="lowrank", rank=64, **after), note="independent B_i"),
        Variant("dfa macro, e after vocab, dense", "dfa", dict(feedback_points=macro, **after),
                note="independent B_i"),
        Variant("dfa macro, e after vocab, dense shared", "dfa",
                dict(feedback_points=macro, shared_slices=True, scale="max_width", **after), note="TinyDFA layout"),
        Variant("dfa macro, e after vocab, sparse nnz16", "dfa",
                dict(feedback_points=macro, operator="sparse", nnz=16, **after)),
        Variant("dfa macro, e after vocab, dense, sign e", "dfa", dict(feedback_points=macro, error="sign", **after)),
        Variant("dfa micro, e after vocab, dense", "dfa", dict(feedback_points=micro, **after)),
        Variant("shallow macro", "shallow", dict(feedback_points=macro, **before)),
    ]
    if amp != "fp32":  # under AMP the default projects in bf16: the fp32 projection beside it, and the dense shared B
        variants[-1:-1] = [
            Variant("dfa macro, e after vocab, lowrank r64 shared, fp32 projection", "dfa",
                    dict(feedback_points=macro, **after, **{**LM_AFTER_VOCAB_DEFAULT, "projection_dtype": "float32"})),
            Variant("dfa macro, e after vocab, dense shared, bf16 projection", "dfa",
                    dict(feedback_points=macro, shared_slices=True, scale="max_width", **after,
                         projection_dtype="gradient"), note="TinyDFA layout"),
        ]
    return Case(f"lm_{amp}", f"TransformerLM {s['layers']}x{s['d']} (d_ff {s['d_ff']}, {s['heads']} heads), "
                f"vocab {v}, batch {b}x{t} tokens, {amp}",
                lambda: TransformerLM(v, d_model=s["d"], n_heads=s["heads"], d_ff=s["d_ff"], n_layers=s["layers"],
                                      max_len=t), batch, loss, variants, amp=amp)


#: Cases that also run with the whole step in one CUDA graph (GPU only), or compiled: the host-bound ones on an H200
#: (and the MLP, whose target is ≤ 0.8 x BP). Not the GCN: PyG's normalisation builds its self-loops with
#: data-dependent shapes, which a graph cannot capture.
GRAPHED = ("mlp", "deepfm", "nerf", "lm")
GRAPHED_VARIANTS = ("dfa fused", "dfa per-point")  # besides bp, the default DFA variants and shallow
#: the MLP's bf16 target (DFA <= 0.8 x BP) also with the projection in bf16: in a graph the fp32 projection's copies
#: of every B_i e (written in fp32, then cast) are what is left between DFA and the target (README, "On one H200")
GRAPHED_MLP_VARIANTS = ("dfa fused, bf16 projection", "dfa per-point, bf16 projection")


def _graph_variants(case: Case, mlp_extra: bool = True) -> list[Variant]:
    """BP, the default DFA ones, fused and per point, shallow; for the MLP's target also the bf16 projections
    (``mlp_extra``)."""
    extra = GRAPHED_MLP_VARIANTS if case.mlp_target and mlp_extra else ()
    return [v for v in case.variants if v.method != "dfa" or v.default or v.name in GRAPHED_VARIANTS + extra]


def graphed(case: Case) -> Case:
    """``case`` with every step replayed from one CUDA graph: no Python, hooks or kernel launches on the host per
    step, for BP and DFA alike, so the ratio is the device-time ratio that a host-bound step hides (README, "On one
    H200"). The variants: see :func:`_graph_variants`."""
    return Case(f"{case.name}_graph", f"{case.description}; whole step in one CUDA graph", case.build, case.batch,
                case.loss, _graph_variants(case), amp=case.amp, lr=case.lr, mlp_target=case.mlp_target,
                cuda_graph=True)


def compiled(case: Case, mode: str) -> Case:
    """``case`` with the model run through ``torch.compile(mode=mode)``, as a recipe's ``compile:`` does: the
    feedback hooks and Functions are traced into the graph, so DFA's host work per point is compiled away with BP's
    launches (``reduce-overhead`` adds CUDA graphs). The variants of :func:`graphed`, without the MLP's extra ones
    (each compiled variant is a compilation: the stage's time)."""
    keep = _graph_variants(case, mlp_extra=False)
    return Case(f"{case.name}_compiled", f"{case.description}; torch.compile mode {mode}", case.build, case.batch,
                case.loss, keep, amp=case.amp, lr=case.lr, mlp_target=case.mlp_target, compile=mode)


BUILDERS = {"mlp": mlp_case, "gcn": gcn_case, "deepfm": deepfm_case, "nerf": nerf_case, "lm": lm_case}


def cases(preset: str, only: list[str] | None = None, amps: list[str] | None = None,
          cuda_graphs: bool = False, compile_mode: str | None = None) -> list[Case]:
    """Every case of a preset: each model in each precision of the preset (the MLP first, the LM last).

    ``amps`` replaces the preset's precisions, e.g. ``["bf16"]`` to run the GPU preset's autocast path on a CPU.
    ``cuda_graphs`` appends the :data:`GRAPHED` models in the first precision, replayed from a CUDA graph, after
    every eager case (a capture that fails cannot cost the eager results). ``compile_mode`` returns instead the
    :data:`GRAPHED` models in the first precision under ``torch.compile`` (their eager twins are the plain run).
    """
    sizes = SIZES[preset]
    precisions = tuple(amps or sizes["amp"])
    out = []
    for amp in precisions:
        for key, builder in BUILDERS.items():
            if only and key not in only:
                continue
            if amp != precisions[0] and key != "mlp":
                continue  # the second precision (fp32 on GPU) is run for the MLP target only
            out.append(builder(sizes[key], amp))
    if compile_mode:
        return [compiled(c, compile_mode) for c in out if c.amp == precisions[0] and c.name.split("_")[0] in GRAPHED]
    if cuda_graphs:
        out += [graphed(c) for c in out if c.amp == precisions[0] and c.name.split("_")[0] in GRAPHED]
    return out
