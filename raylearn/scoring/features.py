"""Per-case features for query strategies, computed from a :class:`~raylearn.models.base.Segmenter`.

:func:`compute_features` computes exactly the requested features with the fewest model calls: one
``predict_proba`` shared by every probability-derived feature (taken from the identity entry of the TTA stack
when ``tta_variance`` is requested too), one ``predict_mc`` shared by the MC-dropout features, one
``predict_tta``, one ``embed`` per embedding kind. Results are compact (never voxel maps):

- scalar scores: ``float32`` 0-d arrays, higher = more uncertain;
- ``embedding`` / ``weighted_embedding``: ``float16 [F]``;
- ``fg_volume``: ``float32 [K-1]`` predicted voxels per foreground class;
- ``class_entropy``: ``float32 [K]`` ClaSP PE's stratum scores (volume means of the maps of
  :func:`raylearn.scoring.uncertainty.class_weighted_entropy`).
- ``sbc_consistency``: ``float32 [3]`` SBC-AL's per-case components from one ``predict_heads`` call
  (:func:`raylearn.scoring.sbc.sbc_case_scores`; only ``model.arch: sbc_unet`` has the heads).

:data:`LABEL_FEATURES` are not computed from a model but read from the ground truth the pool store recorded at
ingest (simulated oracle only): the driver fills them with :func:`label_feature_records`, the shards never see
them. nnActive's foreground-aware random baselines need them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field, field_validator

from raylearn.config import StrictModel
from raylearn.models.base import Segmenter
from raylearn.scoring import uncertainty as unc
from raylearn.scoring.reduce import foreground_volume, reduce_map, reduce_regions, reduce_slices
from raylearn.scoring.sbc import sbc_case_scores

__all__ = [
    "FEATURES",
    "LABEL_FEATURES",
    "PER_UNIT_FEATURES",
    "SLICE_FEATURES",
    "UNIT_FEATURES",
    "FeatureParams",
    "FeatureSpec",
    "compute_features",
    "label_feature_records",
    "label_unit_records",
    "model_calls_for",
    "model_features",
    "validate_feature_names",
]


@dataclass(frozen=True)
class FeatureSpec:
    """What a feature is and which :class:`Segmenter` methods it needs."""

    description: str
    calls: frozenset[str]
    kind: Literal["scalar", "vector"] = "scalar"


_P = frozenset({"predict_proba"})
FEATURES: dict[str, FeatureSpec] = {
    "least_confidence": FeatureSpec("reduced 1 - max_k p (classic least confidence)", _P),
    "entropy": FeatureSpec("reduced voxel entropy of the prediction (nats)", _P),
    "margin": FeatureSpec("reduced 1 - (p_top1 - p_top2)", _P),
    "mc_entropy": FeatureSpec("reduced entropy of the mean MC-dropout prediction", frozenset({"predict_mc"})),
    "bald": FeatureSpec("reduced BALD mutual information over MC-dropout samples", frozenset({"predict_mc"})),
    "mc_variance": FeatureSpec("reduced class-mean variance over MC-dropout samples", frozenset({"predict_mc"})),
    "tta_variance": FeatureSpec("reduced class-mean variance over flip TTA predictions", frozenset({"predict_tta"})),
    "embedding": FeatureSpec("globally pooled encoder features, float16 [F]", frozenset({"embed"}), "vector"),
    "weighted_embedding": FeatureSpec(
        "uncertainty-weighted pooled encoder features (SUGFW PGDR), float16 [F]",
        frozenset({"predict_proba", "embed"}),
        "vector",
    ),
    "fg_volume": FeatureSpec("predicted voxels per foreground class, float32 [K-1]", _P, "vector"),
    "class_entropy": FeatureSpec(
        "ClaSP PE stratum scores, float32 [K]: volume mean of the predictive entropy H ([0]) and of H * p_c ([c])",
        _P,
        "vector",
    ),
    "sbc_consistency": FeatureSpec(
        "SBC-AL components, float32 [3]: Q_cos (1 - cosine of the coarse mask's distance map and the SFP map), "
        "Q_dice (1 - Dice of coarse and refined masks), Hausdorff distance of the two masks (voxels); "
        "needs model.arch: sbc_unet",
        frozenset({"predict_heads"}),
        "vector",
    ),
}

#: features read from the store's ground truth (``class_voxels`` of the manifest), never from a model
LABEL_FEATURES: dict[str, FeatureSpec] = {
    "label_class_voxels": FeatureSpec(
        "ground-truth voxels per foreground class, float32 [K-1] (from the pool store; simulated oracle only)",
        frozenset(),
        "vector",
    ),
}

#: scalar features that also exist per unit below a volume (``compute_features(..., unit_grid=g)``): the voxel map
#: reduced over each slice (:func:`raylearn.scoring.reduce.reduce_slices`) or patch
#: (:func:`raylearn.scoring.reduce.reduce_regions`), ``float32 [S]`` per case
SLICE_FEATURES = frozenset(
    {"least_confidence", "entropy", "margin", "mc_entropy", "bald", "mc_variance", "tta_variance"})

#: every feature that exists per slice or patch unit: the scalar ones, ``class_entropy`` (the region means of
#: ClaSP PE's maps, ``float32 [S, K]`` per case, nnActive's region score) and the ground-truth
#: ``label_class_voxels`` (counted in each unit's region by the driver, :func:`label_unit_records`)
PER_UNIT_FEATURES = SLICE_FEATURES | {"class_entropy", "label_class_voxels"}

#: features the loop supplies per slice unit, never a model or the shards (see :mod:`raylearn.units`)
UNIT_FEATURES: dict[str, FeatureSpec] = {
    "propagation_score": FeatureSpec(
        "the pseudo-labelling stage's score of each slice unit (PropagationResult.unit_scores; higher = ask first), "
        "float [N]; NaN for units it did not score (strategies requiring it must handle NaN)",
        frozenset(),
    ),
}

_PROB = {"least_confidence", "entropy", "margin", "fg_volume", "weighted_embedding", "class_entropy"}
_MC = {"mc_entropy", "bald", "mc_variance"}


class FeatureParams(StrictModel):
    """How features are computed (the ``scoring`` section of an experiment YAML)."""

    reduction: Literal["mean", "sum", "topk_mean", "foreground", "class_mean"] = "mean"
    #: ``topk_mean``: fraction in (0, 1) of voxels, or an integral voxel count >= 1
    topk: float = Field(0.05, gt=0)
    #: MC-dropout forward passes
    mc_samples: int = Field(8, ge=2)
    #: seed of the MC-dropout sampling
    seed: int = 0
    #: flip axes of the image ``[C, D, H, W]`` (1 = D, 2 = H, 3 = W); ``[]`` is the identity
    tta_flips: list[tuple[int, ...]] = Field(default_factory=lambda: [(), (1,), (2,), (3,)], min_length=2)
    #: voxel map used as pooling weights by ``weighted_embedding``
    weight_map: Literal["entropy", "least_confidence", "margin"] = "entropy"

    @field_validator("tta_flips")
    @classmethod
    def _check_flips(cls, flips: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        for axes in flips:
            if any(a not in (1, 2, 3) for a in axes) or len(set(axes)) != len(axes):
                raise ValueError(f"flip axes must be distinct values among 1, 2, 3 (spatial axes), got {list(axes)}")
        return [tuple(a) for a in flips]


def validate_feature_names(names: Iterable[str], allow_label: bool = False) -> list[str]:
    """Return the unique names in order, or raise ``ValueError`` naming unknown ones and listing the known.

    ``allow_label`` also accepts the ground-truth :data:`LABEL_FEATURES` and the loop's :data:`UNIT_FEATURES`
    (strategies may require them; a model never computes them)."""
    out = list(dict.fromkeys(names))
    known = {**FEATURES, **LABEL_FEATURES, **UNIT_FEATURES} if allow_label else FEATURES
    unknown = [n for n in out if n not in known]
    if unknown:
        raise ValueError(f"unknown feature(s) {unknown}; known: {', '.join(sorted(known))}")
    return out


def model_features(names: Iterable[str]) -> list[str]:
    """The names (sorted) a model computes, i.e. without the ground-truth :data:`LABEL_FEATURES` and the loop's
    :data:`UNIT_FEATURES`."""
    return sorted(n for n in validate_feature_names(names, allow_label=True)
                  if n not in LABEL_FEATURES and n not in UNIT_FEATURES)


def label_feature_records(store, ids: Iterable[str], names: Iterable[str]) -> dict[str, dict[str, np.ndarray]]:
    """Ground-truth features of ``ids`` from the store's manifest: ``{case id: {name: array}}``.

    Only ``label_class_voxels`` exists: ``float32 [K-1]``, the case's voxels of each foreground class as counted
    at ingest (manifest column ``class_voxels``, ``[K]`` with the background first).

    Args:
        store: a :class:`raylearn.data.store.PoolStore` (anything with a ``manifest`` DataFrame and ``labels``).
        ids: case ids.
        names: label feature names (others are ignored).

    Raises:
        ValueError: a case has no ground truth recorded (an unlabelled dataset: these features need the
            simulated oracle).
    """
    wanted = [n for n in names if n in LABEL_FEATURES]
    if not wanted:
        return {}
    table = store.manifest.set_index("case_id")
    k = len(getattr(store, "labels", {}) or {}) or None
    out: dict[str, dict[str, np.ndarray]] = {}
    for cid in ids:
        counts = table.at[cid, "class_voxels"] if "class_voxels" in table.columns else None
        if counts is None or (isinstance(counts, float) and np.isnan(counts)):
            raise ValueError(f"feature 'label_class_voxels': case {cid!r} has no ground-truth label in the store "
                             "(foreground-aware random needs the simulated oracle's labels)")
        arr = np.asarray(counts, dtype=np.float64).ravel()
        if k is not None and arr.size < k:
            arr = np.pad(arr, (0, k - arr.size))
        out[cid] = {"label_class_voxels": arr[1:].astype(np.float32)}
    return out


def model_calls_for(names: Iterable[str], params: FeatureParams | None = None) -> dict[str, int]:
    """The segmenter calls :func:`compute_features` makes for ``names`` (method name -> count); ground-truth
    :data:`LABEL_FEATURES` need none."""
    names = set(model_features(names))
    params = params or FeatureParams()
    calls: dict[str, int] = {}
    if names & {"tta_variance"}:
        calls["predict_tta"] = 1
    if names & _PROB and not ("predict_tta" in calls and () in params.tta_flips):
        calls["predict_proba"] = 1
    if names & _MC:
        calls["predict_mc"] = 1
    if "sbc_consistency" in names:
        calls["predict_heads"] = 1
    n_embed = len(names & {"embedding", "weighted_embedding"})
    if n_embed:
        calls["embed"] = n_embed
    return calls


def _call(segmenter: Segmenter, method: str, wanted: set[str], *args, **kwargs):
    """Call a segmenter method, naming the features that needed it when the backend lacks it."""
    try:
        return getattr(segmenter, method)(*args, **kwargs)
    except NotImplementedError as err:
        needing = sorted(n for n in wanted if method in FEATURES[n].calls)
        raise NotImplementedError(f"feature(s) {needing} need {type(segmenter).__name__}.{method}: {err}") from err


def _scalar(x: float) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _check_output(arr: np.ndarray, ndim: int, k: int, spatial: tuple[int, ...], what: str) -> np.ndarray:
    arr = np.asarray(arr)
    if arr.ndim != ndim or arr.shape[ndim - 4] != k or tuple(arr.shape[-3:]) != spatial:
        raise ValueError(f"segmenter {what} returned shape {arr.shape}; expected {ndim}-d with K={k} and {spatial}")
    return arr


def compute_features(
    segmenter: Segmenter,
    image: np.ndarray,
    names: Iterable[str],
    params: FeatureParams | None = None,
    slice_axis: int | None = None,
    unit_grid=None,
) -> dict[str, np.ndarray]:
    """Compute exactly the requested features of one case (or of each of its slices).

    Args:
        segmenter: any :class:`Segmenter` (``predict_proba`` always; ``predict_mc`` / ``predict_tta`` / ``embed``
            only when a requested feature needs it, see :data:`FEATURES`).
        image: ``float32 [C, D, H, W]``.
        names: feature names (keys of :data:`FEATURES`); duplicates are ignored.
        params: :class:`FeatureParams` (defaults when ``None``).
        slice_axis: slice units: every scalar feature is reduced per slice along this axis (0, 1 or 2 of
            ``[D, H, W]``) instead of over the volume; shorthand of ``unit_grid=UnitGrid("slice", axis)``.
        unit_grid: units below a volume (a :class:`raylearn.units.UnitGrid`: slices or patches): every feature is
            reduced per unit; only :data:`PER_UNIT_FEATURES` computed by a model exist per unit.

    Returns:
        ``{name: array}`` with exactly the requested names: scalars as ``float32`` 0-d arrays (``float32 [S]``, one
        per unit with a unit grid; ``class_entropy`` then ``float32 [S, K]``), embeddings ``float16 [F]``,
        ``fg_volume`` ``float32 [K-1]``, ``class_entropy`` ``float32 [K]``.
    """
    wanted = set(validate_feature_names(names))
    if slice_axis is not None and unit_grid is None:
        from raylearn.units import UnitGrid

        unit_grid = UnitGrid("slice", int(slice_axis))
    if unit_grid is not None:
        per_case = sorted(wanted - (PER_UNIT_FEATURES - set(LABEL_FEATURES)))
        if per_case:
            raise ValueError(f"feature(s) {per_case} exist per case only, not per {unit_grid.kind} "
                             f"({unit_grid.kind} units); per-unit features: "
                             f"{', '.join(sorted(PER_UNIT_FEATURES - set(LABEL_FEATURES)))}")
    params = params or FeatureParams()
    image = np.asarray(image)
    if image.ndim != 4:
        raise ValueError(f"compute_features: image must be [C, D, H, W], got shape {image.shape}")
    in_ch = getattr(segmenter, "in_channels", None)
    if in_ch is not None and image.shape[0] != in_ch:
        raise ValueError(f"compute_features: image has {image.shape[0]} channels, segmenter expects {in_ch}")
    k = int(segmenter.num_classes)
    spatial = tuple(image.shape[1:])
    red = {"reduction": params.reduction, "topk": params.topk}
    regions = unit_grid.regions(spatial) if unit_grid is not None else None  # each unit's index, once per case
    out: dict[str, np.ndarray] = {}

    def reduced(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
        if unit_grid is None:
            return _scalar(reduce_map(values, labels=labels, **red))
        if unit_grid.kind == "slice":
            return reduce_slices(values, unit_grid.axis, labels=labels, **red).astype(np.float32)
        return reduce_regions(values, regions, labels=labels, **red).astype(np.float32)

    probs = None
    if "tta_variance" in wanted:
        tta = _check_output(
            _call(segmenter, "predict_tta", wanted, image, params.tta_flips), 5, k, spatial, "predict_tta"
        )
        tta_labels = tta.mean(axis=0).argmax(axis=0)
        out["tta_variance"] = reduced(unc.tta_variance(tta), tta_labels)
        if () in params.tta_flips:
            probs = tta[params.tta_flips.index(())]
    if wanted & _PROB:
        if probs is None:
            probs = _check_output(_call(segmenter, "predict_proba", wanted, image), 4, k, spatial, "predict_proba")
        labels = probs.argmax(axis=0)
        maps: dict[str, np.ndarray] = {}

        def vmap(name: str) -> np.ndarray:
            if name not in maps:
                maps[name] = getattr(unc, name)(probs)
            return maps[name]

        for name in ("least_confidence", "entropy", "margin"):
            if name in wanted:
                out[name] = reduced(vmap(name), labels)
        if "fg_volume" in wanted:
            out["fg_volume"] = foreground_volume(labels, k).astype(np.float32)
        if "class_entropy" in wanted:  # always the plain region mean: nnActive averages over the queried region
            cwe = unc.class_weighted_entropy(probs)
            if unit_grid is None:
                out["class_entropy"] = cwe.mean(axis=(1, 2, 3), dtype=np.float64).astype(np.float32)
            else:
                out["class_entropy"] = reduce_regions(cwe, regions).astype(np.float32)
        if "weighted_embedding" in wanted:
            emb = _call(segmenter, "embed", wanted, image, weights=vmap(params.weight_map))
            out["weighted_embedding"] = np.asarray(emb, dtype=np.float32).ravel().astype(np.float16)
    if wanted & _MC:
        mc = _check_output(
            _call(segmenter, "predict_mc", wanted, image, params.mc_samples, params.seed), 5, k, spatial, "predict_mc"
        )
        mc_labels = mc.mean(axis=0).argmax(axis=0)
        fns = {"mc_entropy": unc.predictive_entropy, "bald": unc.bald, "mc_variance": unc.mc_variance}
        for name in sorted(wanted & _MC):
            out[name] = reduced(fns[name](mc), mc_labels)
    if "sbc_consistency" in wanted:
        coarse, sfp, refined = _call(segmenter, "predict_heads", wanted, image)
        _check_output(coarse, 4, k, spatial, "predict_heads (coarse)")
        _check_output(sfp, 4, k - 1, spatial, "predict_heads (sfp)")
        _check_output(refined, 4, k, spatial, "predict_heads (refined)")
        out["sbc_consistency"] = sbc_case_scores(coarse, sfp, refined)
    if "embedding" in wanted:
        out["embedding"] = (
            np.asarray(_call(segmenter, "embed", wanted, image), dtype=np.float32).ravel().astype(np.float16)
        )
    return {name: out[name] for name in sorted(wanted)}


def label_unit_records(store, units, case_ids: Iterable[str], names: Iterable[str]) -> dict[str, dict[str, np.ndarray]]:
    """Ground-truth features of every unit of ``case_ids`` (slice or patch units): ``{unit id: {name: array}}``.

    ``label_class_voxels`` per unit is ``float32 [K-1]``, the ground-truth voxels of each foreground class inside
    the unit's region, counted from the store's label volume (what the simulated oracle would reveal).

    Args:
        store: a :class:`raylearn.data.store.PoolStore` with ground truth.
        units: the run's :class:`raylearn.units.UnitSpace` (units below a volume).
        case_ids: the cases whose units are wanted.
        names: label feature names (others are ignored).

    Raises:
        ValueError: a case has no ground-truth label (these features need the simulated oracle).
    """
    if not [n for n in names if n in LABEL_FEATURES]:
        return {}
    k = int(getattr(store, "num_classes", 0) or len(getattr(store, "labels", {}) or {}))
    out: dict[str, dict[str, np.ndarray]] = {}
    for cid in case_ids:
        label = store.get(cid).label
        if label is None:
            raise ValueError(f"feature 'label_class_voxels': case {cid!r} has no ground-truth label in the store "
                             "(foreground-aware random needs the simulated oracle's labels)")
        label = np.asarray(label)
        kk = max(k, int(label.max()) + 1)
        for uid, region in zip(units.units_of(cid), units.grid.regions(label.shape), strict=True):
            part = label[region].ravel().astype(np.int64)
            out[uid] = {"label_class_voxels": np.bincount(part, minlength=kk)[1:kk].astype(np.float32)}
    return out
