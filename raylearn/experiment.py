"""The experiment YAML schema (``raylearn run experiment.yaml``).

Example (the "From Prediction to Prompt" schedule: 5 % random cold start, then 10 rounds x 5 volumes)::

    name: p2p-least-confidence
    seed: 0
    output_dir: runs/p2p
    data: {dataset: ../shared/data/msd_hippocampus, n_test: 40}
    cold_start: {strategy: random, fraction: 0.05}
    strategy: {name: least_confidence}
    schedule: {rounds: 10, batch_size: 5}
    model: {backend: monai_unet}
    train: {epochs: 10, iterations_per_epoch: 20}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from raylearn.config import ConfigError, StrictModel, load_yaml, parse_config
from raylearn.data.preprocess import PreprocessConfig
from raylearn.models.config import ModelConfig, TrainConfig
from raylearn.models.promptable import PromptableConfig
from raylearn.scoring.features import FeatureParams, model_calls_for
from raylearn.tracking import TrackingConfig

__all__ = [
    "BACKEND_CALLS", "ClusterConfig", "DataConfig", "ExperimentConfig", "PoolConfig", "ScheduleConfig",
    "StrategyConfig", "UnitConfig", "load_experiment",
]

#: the :class:`~raylearn.models.base.Segmenter` calls each ``model.backend`` implements. The MONAI U-Net samples MC
#: dropout at ``model.mc_dropout`` (> 0 by :class:`ModelConfig`), whatever its training ``model.dropout``;
#: nnU-Net's networks have no dropout, so its segmenter cannot sample (``predict_mc`` raises).
BACKEND_CALLS: dict[str, frozenset[str]] = {
    "monai_unet": frozenset({"predict_proba", "predict_mc", "predict_tta", "embed", "predict_heads"}),
    "nnunet": frozenset({"predict_proba", "predict_tta", "embed"}),
}


class PoolConfig(StrictModel):
    """How the unlabeled pool is sharded over Ray actors (the ``pool:`` section; see :mod:`raylearn.pool`).

    Attributes:
        n_shards: number of ``PoolShard`` actors; ``None`` = GPUs in the cluster, else CPUs.
        num_cpus: logical CPUs reserved per shard (a Ray scheduling hint; may be fractional).
        num_gpus: GPUs per shard; ``None`` = ``cluster.gpus_per_shard`` on a cluster with GPUs, else 0.
        torch_threads: intra-op threads of torch inside a shard; ``None`` = ``max(1, floor(num_cpus))``.
        max_restarts: Ray ``max_restarts`` of each shard actor (-1 = unlimited).
        max_task_retries: Ray ``max_task_retries`` of each shard actor (-1 = unlimited).
        max_redistributions: per scoring round, how many permanently dead shards may have their
            cases moved to the surviving shards (or to a replacement actor) before giving up.
        node_check_s: while waiting on shards, check every this many seconds that their nodes are alive; the
            cases of a shard whose node left the cluster are moved to live shards instead of waiting for a
            restart that may never find room.
        prefault: touch every held case once at load so its pages are resident before scoring.
        progress: show a tqdm progress bar (cases scored) on the driver.
    """

    n_shards: int | None = Field(default=None, ge=1)
    num_cpus: float = Field(default=0.25, ge=0)
    num_gpus: float | None = Field(default=None, ge=0)
    torch_threads: int | None = Field(default=None, ge=1)
    max_restarts: int = Field(default=3, ge=-1)
    max_task_retries: int = Field(default=3, ge=-1)
    max_redistributions: int = Field(default=4, ge=0)
    node_check_s: float = Field(default=10.0, gt=0)
    prefault: bool = True
    progress: bool = True


class ClusterConfig(StrictModel):
    """How the phases share the cluster's GPUs and where every node finds what it reads (``cluster:``).

    The plan (:func:`raylearn.resource_plan.plan_resources`, checked against the live cluster before round 0):
    with G GPUs, ``pool.n_shards`` (default G) shards each hold ``gpus_per_shard`` of a GPU for the whole run
    (their cases stay resident; they score and evaluate on it), and ``train_workers`` (default G) Ray Train
    workers each hold the rest of a GPU (``1 - gpus_per_shard``). Scoring, evaluation and training take turns
    on the same devices, so nothing waits for a GPU that another phase holds idle.

    Attributes:
        gpus: GPUs the run plans for: ``auto`` = every GPU of the cluster, 0 = CPU only. More than the cluster
            has is refused at start.
        gpus_per_shard: share of one GPU each pool shard holds (0 < x < 1).
        train_workers: Ray Train workers (DDP): ``auto`` = one per planned GPU, else ``train.num_workers``
            on a CPU-only run.
        min_train_workers: when training cannot restart after a node is lost, the driver re-plans it on the GPUs
            left (down to this many workers) and resumes the round from its last checkpoint; None = the run fails.
        storage: Ray Train's ``storage_path`` as a URI every node resolves (an NFS/EFS path mounted at the same
            place on every node, ``s3://...``, ``gs://...``); None = ``<output_dir>/ray_train``, which only works
            when all nodes share that filesystem (checked at start).
        label_store: folder of the run's versioned label store, which training workers read; None =
            ``<output_dir>/labels``, which only works when all nodes share that filesystem (checked at start).
        check_nodes: before round 0, run one probe task per node that reads the pool store, the storage and the
            label store.
    """

    gpus: Literal["auto"] | int = "auto"
    gpus_per_shard: float = Field(default=0.5, gt=0, lt=1)
    train_workers: Literal["auto"] | int = "auto"
    min_train_workers: int | None = Field(default=None, ge=1)
    storage: str | None = None
    label_store: str | None = None
    check_nodes: bool = True

    @model_validator(mode="after")
    def _counts(self) -> ClusterConfig:
        if isinstance(self.gpus, int) and self.gpus < 0:
            raise ValueError(f"gpus: must be 'auto' or >= 0, got {self.gpus}")
        if isinstance(self.train_workers, int) and self.train_workers < 1:
            raise ValueError(f"train_workers: must be 'auto' or >= 1, got {self.train_workers}")
        if (self.min_train_workers is not None and isinstance(self.train_workers, int)
                and self.min_train_workers > self.train_workers):
            raise ValueError(f"min_train_workers ({self.min_train_workers}) exceeds train_workers "
                             f"({self.train_workers})")
        return self


class PhantomConfig(StrictModel):
    """The embedded default data: generated phantoms (see ``raylearn.data.phantom``)."""

    n_cases: int = Field(60, ge=4)
    shape: tuple[int, int, int] = (48, 48, 48)
    seed: int = 0


class DataConfig(StrictModel):
    """Where the cases come from and how they are split.

    ``dataset`` is a dataset folder (MSD / nnU-Net raw / image-label folder) or ``phantom`` for the
    generated default. The pool store is written to ``store`` (default ``<output_dir>/store``) on
    first use and re-used afterwards.
    """

    dataset: str = "phantom"
    store: str | None = None
    phantom: PhantomConfig = PhantomConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    n_test: int | None = Field(None, ge=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    split_seed: int = 0


class StrategyConfig(StrictModel):
    """A registered query strategy and its keyword hyperparameters (``random_state`` is set per round)."""

    name: str = "random"
    params: dict[str, Any] = {}


class ColdStartConfig(StrictModel):
    """Round 0: ``size`` cases, or ``fraction`` of the pool (at least 1), chosen by ``strategy``."""

    strategy: str = "random"
    params: dict[str, Any] = {}
    size: int | None = Field(None, ge=1)
    fraction: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _one_of(self) -> ColdStartConfig:
        if self.size is None and self.fraction is None:
            self.__dict__["size"] = 5
        if self.size is not None and self.fraction is not None:
            raise ValueError("give either size or fraction, not both")
        return self


class ScheduleConfig(StrictModel):
    """How long the run lasts: ``rounds`` query rounds of ``batch_size`` cases after the cold start,
    stopping early when ``max_labeled`` cases or ``max_fraction`` of the pool are labelled.

    ``mode`` (see :mod:`raylearn.annotation.schedule`): ``sync`` labels each round's selection, then trains (the
    papers' protocol); ``async`` lets people label while the model trains: a round starts when
    ``labels_per_round`` new labels arrived (default ``batch_size``) or ``round_timer_s`` passed with at least
    one, the trainer takes labels arriving mid-round, and suggestions (``batch_size + lookahead`` ranked cases)
    skip cases someone holds a lease on. ``simulated_annotators`` / ``simulated_delay_s``: with
    ``oracle: simulated`` in async mode, that many in-process annotators label each case after a delay drawn
    uniformly from the range (seconds). ``label_timeout_s``: how long a round waits for labels (None: for ever).
    ``train_while_waiting`` (async, MONAI backend): a round that has trained its steps keeps training on the
    labels it has until its labels are in (or ``round_timer_s``), and the next round starts at once, instead of
    the trainer idling while people label; needs ``train.schedule: constant`` (a decaying LR schedule spans a
    fixed step budget). In async mode every label that has arrived joins the current round (up to
    ``max_labeled``), and once the budget is spent the remaining rounds train on the labels there are.
    """

    rounds: int = Field(5, ge=0)
    batch_size: int = Field(5, ge=1)
    max_labeled: int | None = Field(None, ge=1)
    max_fraction: float | None = Field(None, gt=0, le=1)
    mode: Literal["sync", "async"] = "sync"
    labels_per_round: int | None = Field(None, ge=1)
    round_timer_s: float = Field(120.0, gt=0)
    lookahead: int = Field(4, ge=0)
    lease_s: float = Field(900.0, gt=0)
    label_timeout_s: float | None = Field(None, gt=0)
    simulated_annotators: int = Field(2, ge=1, le=64)
    simulated_delay_s: tuple[float, float] = (0.0, 0.0)
    train_while_waiting: bool = True


class UnitConfig(StrictModel):
    """What one annotation is (``unit:``; see :mod:`raylearn.units`): a whole volume, one slice along ``axis``, or
    one 3D patch of at most ``size`` voxels (nnActive's patch queries).

    ``unit: volume`` (the default), ``unit: slice`` and ``unit: patch`` are shorthands for ``{kind: volume}``,
    ``{kind: slice, axis: 2}`` and ``{kind: patch, size: [16, 16, 16]}``. With slices or patches, the pool, the
    strategies' features, the selections, the ledger and the cost (``fraction_labelled``: the share of the pool's
    units labelled; ``cold_start.size``, ``schedule.batch_size`` and ``schedule.max_labeled`` count units) are per
    unit; training masks the loss on voxels nobody annotated; evaluation stays on whole test volumes.

    Attributes:
        kind: ``volume``, ``slice`` or ``patch``.
        axis: the slicing axis of the stored ``[D, H, W]`` grid (0, 1 or 2); slice units only.
        size: the largest patch ``[d, h, w]`` in voxels of the stored grid (one number: a cube); each case is tiled
            by ``ceil(L / s)`` near-equal boxes per axis (:func:`raylearn.units.patch_boxes`); patch units only.
    """

    kind: Literal["volume", "slice", "patch"] = "volume"
    axis: int = Field(2, ge=0, le=2)
    size: tuple[int, int, int] | None = None

    @field_validator("size", mode="before")
    @classmethod
    def _cube(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            return (v, v, v)
        return v

    @model_validator(mode="after")
    def _check_kind(self) -> UnitConfig:
        if self.size is not None and min(self.size) < 1:
            raise ValueError(f"unit.size: patch sizes must be >= 1, got {list(self.size)}")
        if self.kind == "patch":
            if self.size is None:
                self.__dict__["size"] = (16, 16, 16)
            if "axis" in self.model_fields_set:
                raise ValueError("unit.axis: patch units have no slicing axis; give unit.size")
        elif self.size is not None:
            raise ValueError(f"unit.size: only patch units have a size (unit.kind is {self.kind})")
        return self


class EvaluateConfig(StrictModel):
    """Evaluation on the test split after every round (metrics: :func:`raylearn.metrics.evaluate_case`)."""

    hd95: bool = True
    #: tolerance of the normalised surface Dice in mm (``null`` = no surface Dice)
    surface_dice_tolerance_mm: float | None = Field(1.0, ge=0)
    full_data_reference: bool = False
    max_test_cases: int | None = Field(None, ge=1)


class ExperimentConfig(StrictModel):
    name: str = "experiment"
    seed: int = 0
    output_dir: str = "runs/experiment"
    data: DataConfig = DataConfig()
    cold_start: ColdStartConfig = ColdStartConfig()
    strategy: StrategyConfig = StrategyConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    features: FeatureParams = FeatureParams()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    pool: PoolConfig = PoolConfig()
    cluster: ClusterConfig = ClusterConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    oracle: Literal["simulated", "human"] = "simulated"
    #: the promptable model (SAM-Med3D) fine-tuned after every round by the training service
    promptable: PromptableConfig = PromptableConfig()
    #: MLflow / TensorBoard (:mod:`raylearn.tracking`); left out of the config hash: it does not shape results
    tracking: TrackingConfig = TrackingConfig()
    #: annotation units (volume or slice); left out of the config hash when it is the default (whole volumes)
    unit: UnitConfig = UnitConfig()

    @field_validator("unit", mode="before")
    @classmethod
    def _unit_shorthand(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v not in ("volume", "slice", "patch"):
                raise ValueError(f"unit: must be 'volume', 'slice', 'patch', {{kind: slice, axis: 0|1|2}} or "
                                 f"{{kind: patch, size: [d, h, w]}}, got {v!r}")
            return {"kind": v}
        return v

    @model_validator(mode="after")
    def _check_units(self) -> ExperimentConfig:
        """``unit: slice`` needs what labels, trains and scores slices: refuse the rest here, naming the key; and
        every strategy must select the configured unit."""
        from raylearn.strategies import build_strategy

        kind = self.unit.kind
        for where, name, params in (("strategy.name", self.strategy.name, self.strategy.params),
                                    ("cold_start.strategy", self.cold_start.strategy, self.cold_start.params)):
            try:
                strategy = build_strategy(name, **params).for_round(0 if where.startswith("cold") else 1)
            except (ValueError, TypeError, KeyError):
                continue  # _check_strategies names the bad parameter
            if kind not in strategy.supported_units():
                why = (f"it needs case-level features {sorted(strategy.required_features())}"
                       if kind != "volume" and strategy.supported_units() == {"volume"}
                       else f"it selects {'/'.join(sorted(strategy.supported_units()))} units only")
                raise ValueError(
                    f"{where}: {name!r} does not support unit: {kind} ({why}); slice and patch units work with "
                    "random, the uncertainty strategies (least_confidence, entropy, margin, mc_entropy, bald, "
                    "mc_variance, tta_variance, power), clasp_pe, fg_random / fg_random33 (nnActive variants) and "
                    "strategies that declare the unit")
        if kind == "volume":
            return self
        refuse = [
            (self.model.backend != "monai_unet", f"model.backend: {self.model.backend} trains on whole labelled "
             f"volumes only; {kind} units need the masked loss of model.backend: monai_unet"),
            (self.model.arch == "sbc_unet", "model.arch: sbc_unet's joint loss has no masked version; use "
             "model.arch: unet"),
            (self.oracle != "simulated", f"oracle: {self.oracle} (the annotation API labels whole volumes); {kind} "
             "units need oracle: simulated"),
            (self.schedule.mode != "sync", f"schedule.mode: async (label-driven rounds count whole volumes); {kind} "
             "units need schedule.mode: sync"),
            (self.promptable.enabled, "promptable.enabled: the promptable model fine-tunes on whole labelled volumes"),
            (self.train.val_fraction > 0 or self.train.val_ids is not None, "train.val_fraction / train.val_ids: "
             "validation scores whole labelled cases, which partial labels are not; leave them unset"),
        ]
        for bad, why in refuse:
            if bad:
                raise ValueError(f"unit: {kind}: {why}")
        return self

    @model_validator(mode="after")
    def _check_async_training(self) -> ExperimentConfig:
        s = self.schedule
        if s.mode == "async" and s.train_while_waiting and self.train.schedule != "constant":
            raise ValueError(f"schedule.train_while_waiting: async rounds that train while they wait for labels "
                             f"run past any fixed step budget, which train.schedule: {self.train.schedule} decays "
                             "over; use train.schedule: constant, or set schedule.train_while_waiting: false")
        return self

    @model_validator(mode="after")
    def _check_promptable(self) -> ExperimentConfig:
        p = self.promptable
        if not p.enabled:
            return self
        if self.model.backend != "monai_unet":
            raise ValueError("promptable.enabled: the promptable model is fine-tuned by the MONAI training service; "
                             f"model.backend {self.model.backend} has none (use model.backend: monai_unet)")
        if p.variant == "full" and not p.frozen and self.cluster.gpus == 0:
            raise ValueError("promptable.freeze_image_encoder: fine-tuning the full model's image encoder needs GPUs "
                             "(cluster.gpus is 0); set it to true (prompt encoder + mask decoder only) or use "
                             "promptable.variant: small")
        return self

    @model_validator(mode="after")
    def _check_strategies(self) -> ExperimentConfig:
        from raylearn.strategies import build_strategy

        for where, name, params in (("strategy", self.strategy.name, self.strategy.params),
                                    ("cold_start", self.cold_start.strategy, self.cold_start.params)):
            try:
                strategy = build_strategy(name, **params)
            except (ValueError, TypeError, KeyError) as err:
                raise ValueError(f"{where}: {err}") from None
            if where == "strategy":
                from raylearn.extract import split_features  # extractor features need no segmenter call

                self._check_backend_can_score(name, frozenset(split_features(strategy.required_features())[0]))
        return self

    def _check_backend_can_score(self, name: str, features: frozenset[str]) -> None:
        """Refuse, before round 0 trains, a strategy whose features ``model.backend`` cannot compute."""
        backend = self.model.backend
        if "predict_heads" in model_calls_for(features, self.features) and not (
                backend == "monai_unet" and self.model.arch == "sbc_unet"):
            raise ValueError(
                f"strategy.name: {name!r} needs a model with SBC-AL's SFP and ASR heads, but model.arch is "
                f"{self.model.arch!r} (model.backend {backend!r}); set model: {{backend: monai_unet, arch: sbc_unet}}")
        missing = sorted(set(model_calls_for(features, self.features)) - BACKEND_CALLS[backend])
        if not missing:
            return
        needs = sorted(f for f in features if set(model_calls_for([f], self.features)) & set(missing))
        raise ValueError(
            f"strategy.name: {name!r} needs feature(s) {needs}, which model.backend: {backend} cannot compute "
            f"(it has no {' / '.join(missing)}"
            + ("; nnU-Net has no dropout to sample" if "predict_mc" in missing else "")
            + "). Use model.backend: monai_unet, or a strategy on features it can compute (e.g. least_confidence, "
            "entropy, margin, tta_variance)"
        )


def load_experiment(path: str | Path, overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Read and validate an experiment YAML; ``overrides`` maps dotted keys to values."""
    data = load_yaml(path) or {}
    if overrides:
        data = apply_overrides(data, overrides)
    return parse_config(data, ExperimentConfig, source=str(path))


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """Return a deep copy of ``data`` with ``{"a.b.c": v}`` set (creating mappings on the way)."""
    import copy

    out = copy.deepcopy(data)
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"{dotted}: {part} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return out
