"""3D patch units (``unit: {kind: patch, size: [d, h, w]}``, nnActive's patch queries): ids, tiling, per-patch
scores (model features, ClaSP PE's class maps, ground truth), the oracle's partial labels, config, and a ClaSP PE run
on patches end to end (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from raylearn.config import ConfigError, parse_config
from raylearn.experiment import ExperimentConfig
from raylearn.scoring.reduce import reduce_map, reduce_regions
from raylearn.strategies import build_strategy
from raylearn.strategies.base import PoolView
from raylearn.units import PatchUnit, UnitGrid, UnitSpace, is_slice_id, is_unit_id, parse_unit, patch_boxes


# -- ids and tiling ------------------------------------------------------------------------------------------------
def test_patch_ids_round_trip_and_index_their_box():
    u = PatchUnit("hippocampus_001", ((0, 12), (12, 25), (4, 8)))
    assert u.id == "hippocampus_001@p:0-12,12-25,4-8"
    assert parse_unit(u.id) == u and u.voxels == 12 * 13 * 4
    assert is_unit_id(u.id) and not is_slice_id(u.id) and is_slice_id("c@2:3") and not is_unit_id("c")
    arr = np.arange(2 * 30 * 30 * 10).reshape(2, 30, 30, 10)
    np.testing.assert_array_equal(arr[u.region(arr.shape)], arr[:, 0:12, 12:25, 4:8])
    with pytest.raises(ValueError, match="outside the case: axis 2 has 6 voxels"):
        u.region((20, 30, 6))


@pytest.mark.parametrize("bad", ["c@p:0-4,0-4", "c@p:4-0,0-4,0-4", "c@p:0-4,0-4,0-x", "c@q:0-4,0-4,0-4"])
def test_bad_patch_ids_are_named(bad):
    with pytest.raises(ValueError, match="not a (slice|patch) unit id"):
        parse_unit(bad)


def test_bad_boxes_and_case_ids_are_refused():
    with pytest.raises(ValueError, match="0 <= start < stop"):
        PatchUnit("c", ((0, 4), (3, 3), (0, 4)))
    with pytest.raises(ValueError, match="cannot name a patch unit"):
        PatchUnit("a@b", ((0, 4), (0, 4), (0, 4)))


def test_patch_boxes_tile_the_grid_with_near_equal_boxes():
    boxes = patch_boxes((36, 50, 16), (16, 16, 16))
    # ceil(36/16)=3, ceil(50/16)=4, ceil(16/16)=1 boxes per axis; edges round(linspace(0, L, n+1))
    assert len(boxes) == 12
    assert sorted({b[0] for b in boxes}) == [(0, 12), (12, 24), (24, 36)]
    assert sorted({b[1] for b in boxes}) == [(0, 12), (12, 25), (25, 38), (38, 50)]
    assert {b[2] for b in boxes} == {(0, 16)}
    cover = np.zeros((36, 50, 16), int)
    for b in boxes:
        cover[tuple(slice(*x) for x in b)] += 1
    assert (cover == 1).all()  # every voxel in exactly one patch
    assert patch_boxes((1, 4, 3), (16, 16, 16)) == [((0, 1), (0, 4), (0, 3))]  # a case smaller than a patch: one
    assert boxes[:2] == [((0, 12), (0, 12), (0, 16)), ((0, 12), (12, 25), (0, 16))]  # C order, z slowest
    with pytest.raises(ValueError, match="sizes must be >= 1"):
        patch_boxes((4, 4, 4), (0, 2, 2))


def test_unit_grid_counts_and_a_ct_sized_case_returns_per_unit_scores():
    from raylearn.pool_support import PoolError, compact_feature

    ct = (300, 512, 512)
    grid = UnitGrid("patch", size=(16, 16, 16))
    assert grid.count(ct) == 19 * 32 * 32 == len(patch_boxes(ct, (16, 16, 16)))
    assert UnitGrid("slice", 0).count((1, *ct)) == 300
    # 19456 patch scores of one case pass (they are per unit), a voxel map of the same case does not
    per_patch = np.zeros((grid.count(ct), 3), np.float64)
    assert compact_feature("class_entropy", per_patch, "ct", grid.count(ct)).dtype == np.float32
    with pytest.raises(PoolError, match="not voxel maps"):
        compact_feature("entropy", np.zeros((300, 512, 512)), "ct", grid.count(ct))
    with pytest.raises(PoolError, match="not voxel maps"):
        compact_feature("class_entropy", per_patch, "ct")  # without units: the per-case allowance


def test_unit_space_of_patches():
    space = UnitSpace(["a", "b"], "patch", shapes={"a": (8, 8, 8), "b": (4, 4, 9)}, patch_size=(4, 4, 4))
    assert space.partial and not space.slices and space.grid == UnitGrid("patch", 2, (4, 4, 4))
    assert space.n_units == {"a": 8, "b": 3} and len(space) == 11
    assert space.ids[0] == "a@p:0-4,0-4,0-4" and space.ids[8] == "b@p:0-4,0-4,0-3"
    assert space.case_of("b@p:0-4,0-4,3-6") == "b"
    b_units = space.units_of("b")
    assert space.complete_cases(b_units) == ["b"] and space.open_cases(b_units[:2]) == ["a", "b"]
    # vector scores per unit ([S, K]) spread and align to [N, K], NaN rows for absent units
    vec = space.spread("b", np.arange(6.0).reshape(3, 2))
    aligned = space.align(vec)
    assert aligned.shape == (11, 2) and aligned[9].tolist() == [2.0, 3.0] and np.isnan(aligned[:8]).all()
    with pytest.raises(ValueError, match="2 unit scores for 3 patches"):
        space.spread("b", np.zeros(2))
    with pytest.raises(ValueError, match="patch units need 3 patch sizes"):
        UnitSpace(["a"], "patch", shapes={"a": (8, 8, 8)}, patch_size=(4, 4))
    with pytest.raises(ValueError, match="grid shape of every case"):
        UnitSpace(["a"], "patch", shapes={}, patch_size=(4, 4, 4))


# -- per-patch scores ----------------------------------------------------------------------------------------------
def test_reduce_regions_is_reduce_map_of_each_patch():
    rng = np.random.default_rng(0)
    vals = rng.random((6, 5, 4))
    labels = (vals > 0.6).astype(np.uint8)
    regions = UnitGrid("patch", size=(3, 3, 4)).regions(vals.shape)
    assert len(regions) == 4
    for red in ("mean", "sum", "topk_mean", "foreground", "class_mean"):
        got = reduce_regions(vals, regions, red, topk=0.2, labels=labels)
        want = [reduce_map(vals[r], red, topk=0.2, labels=labels[r]) for r in regions]
        np.testing.assert_allclose(got, want)
    # hand-computed: the mean of a constant-per-patch map is that constant
    block = np.zeros((4, 2, 2))
    block[2:] = 3.0
    np.testing.assert_allclose(reduce_regions(block, UnitGrid("patch", size=(2, 2, 2)).regions(block.shape)), [0, 3])
    # [C, D, H, W] maps: a mean per channel and region
    multi = np.stack([block, 2 * block])
    np.testing.assert_allclose(reduce_regions(multi, UnitGrid("patch", size=(2, 2, 2)).regions(block.shape)),
                               [[0, 0], [3, 6]])
    with pytest.raises(ValueError, match="reduced by its mean only"):
        reduce_regions(multi, [(slice(0, 2),) * 3], "sum")


class _HalfSure:
    """A fixed two-class segmenter: p(fg) = 0.5 in the first half along D (maximal entropy), 0.99 elsewhere."""

    num_classes = 2
    in_channels = 1

    def predict_proba(self, image):
        d = image.shape[1]
        p = np.full(image.shape[1:], 0.99, np.float32)
        p[: d // 2] = 0.5
        return np.stack([1 - p, p])


def test_compute_features_per_patch_scores_each_box():
    from raylearn.scoring.features import compute_features

    grid = UnitGrid("patch", size=(4, 8, 8))
    image = np.zeros((1, 8, 8, 8), np.float32)
    out = compute_features(_HalfSure(), image, ["entropy", "class_entropy"], unit_grid=grid)
    h_hi = np.log(2.0)
    h_lo = -(0.99 * np.log(0.99) + 0.01 * np.log(0.01))
    np.testing.assert_allclose(out["entropy"], [h_hi, h_lo], rtol=1e-5)
    # class_entropy per patch: [mean H, mean H * p_fg]
    np.testing.assert_allclose(out["class_entropy"], [[h_hi, 0.5 * h_hi], [h_lo, 0.99 * h_lo]], rtol=1e-5)
    with pytest.raises(ValueError, match=r"exist per case only, not per patch"):
        compute_features(_HalfSure(), image, ["fg_volume"], unit_grid=grid)


class _Store:
    """What :func:`label_unit_records` reads: ``num_classes`` and ``get(case).label``."""

    num_classes = 3

    def __init__(self, labels):
        self._labels = labels

    def get(self, cid):
        return type("Case", (), {"label": self._labels[cid]})()


def test_label_unit_records_count_ground_truth_per_patch():
    from raylearn.scoring.features import label_unit_records

    lab = np.zeros((4, 4, 4), np.uint8)
    lab[0, 0, 0] = 1
    lab[3, 3, 3] = 2
    lab[3, 3, 2] = 2
    space = UnitSpace(["a"], "patch", shapes={"a": lab.shape}, patch_size=(2, 4, 4))
    recs = label_unit_records(_Store({"a": lab}), space, ["a"], ["label_class_voxels"])
    assert {u: r["label_class_voxels"].tolist() for u, r in recs.items()} == {
        "a@p:0-2,0-4,0-4": [1.0, 0.0], "a@p:2-4,0-4,0-4": [0.0, 2.0]}
    assert label_unit_records(_Store({"a": lab}), space, ["a"], ["entropy"]) == {}


# -- strategies on patches -----------------------------------------------------------------------------------------
def test_clasp_pe_and_fg_random_select_patches():
    ids = np.array([f"c@p:{4 * i}-{4 * i + 4},0-4,0-4" for i in range(6)])
    labelled = np.zeros(6, bool)
    labelled[0] = True
    # class 1 is certain everywhere but patch 3; the unstratified entropy is highest at patch 5
    ce = np.array([[9, 0, 0], [0.1, 0.01, 0], [0.2, 0.01, 0], [0.3, 0.9, 0], [0.2, 0, 0.8], [2.0, 0, 0]])
    view = PoolView(ids=ids, labeled_mask=labelled, features={"class_entropy": ce}, round_index=2, n_rounds=2)
    clasp = build_strategy("clasp_pe", schedule="none", fg_ratio=0.66)
    assert "patch" in clasp.supported_units() and "patch" in build_strategy("fg_random").supported_units()
    # budget 3: int(3 * 0.66) = 1 foreground pick (class 1 or 2, chosen at random) and 2 unstratified (top H)
    picked = set(clasp.select(view, 3).tolist())
    assert ids[5] in picked and ids[0] not in picked and (ids[3] in picked or ids[4] in picked)
    fg = np.array([[5, 0], [0, 0], [0, 0], [3, 0], [0, 0], [0, 0]], float)
    rnd = build_strategy("fg_random", random_state=1)
    fview = PoolView(ids=ids, labeled_mask=labelled, features={"label_class_voxels": fg})
    chosen = rnd.select(fview, 2).tolist()
    assert ids[0] not in chosen and len(set(chosen)) == 2


# -- the oracle reveals patches ------------------------------------------------------------------------------------
def test_simulated_oracle_reveals_only_the_patches(tmp_path):
    from raylearn.annotation.labels import LabelStore
    from raylearn.data.store import StoredCase
    from raylearn.oracle import SimulatedOracle

    gt = np.random.default_rng(2).integers(0, 3, (8, 8, 8)).astype(np.uint8)

    class Truth:
        path = tmp_path

        def case_ids(self):
            return ["c1"]

        def get(self, cid):
            return StoredCase(cid, np.zeros((1, 8, 8, 8), np.float32), gt, (1.0, 1.0, 1.0), "pool")

    labels = LabelStore(tmp_path / "labels")
    units = ["c1@p:0-4,0-8,0-8", "c1@p:4-8,4-8,0-4"]
    receipt = SimulatedOracle(Truth(), labels).label(units)
    assert receipt.ids == units and receipt.voxels == 4 * 8 * 8 + 4 * 4 * 4
    assert receipt.foreground_voxels == int(np.count_nonzero(gt[0:4])) + int(np.count_nonzero(gt[4:8, 4:8, 0:4]))
    label, mask = labels.read_masked("c1")
    want = np.zeros(gt.shape, bool)
    want[0:4] = True
    want[4:8, 4:8, 0:4] = True
    np.testing.assert_array_equal(mask, want)
    np.testing.assert_array_equal(label, np.where(want, gt, 0))
    assert sorted(labels.labelled_units()) == sorted(units)
    with pytest.raises(ValueError, match="outside the case"):
        SimulatedOracle(Truth(), labels).label(["c1@p:0-4,0-8,0-9"])


# -- config --------------------------------------------------------------------------------------------------------
TINY = {
    "name": "tiny-patches",
    "seed": 5,
    "data": {"dataset": "phantom", "phantom": {"n_cases": 8, "shape": [16, 16, 16], "seed": 1}, "n_test": 2},
    "unit": {"kind": "patch", "size": [8, 8, 16]},
    "cold_start": {"strategy": "fg_random", "size": 6},
    "strategy": {"name": "clasp_pe"},
    "schedule": {"rounds": 2, "batch_size": 4},
    "model": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
    "train": {"first_round_steps": 4, "steps": 2, "batch_size": 2, "checkpoint_every": 50, "log_every": 5,
              "num_workers": 1},
    "pool": {"n_shards": 1, "num_cpus": 0.25, "progress": False},
    "evaluate": {"hd95": False, "surface_dice_tolerance_mm": None},
}


def _cfg(tmp: Path, name: str, **over) -> ExperimentConfig:
    data = json.loads(json.dumps(TINY))
    data["output_dir"] = str(tmp / name)
    data["data"]["store"] = str(tmp / "store")
    data.update(over)
    return parse_config(data, ExperimentConfig, source=name)


def test_patch_config_shapes_and_refusals(tmp_path):
    from raylearn.loop import _config_json

    assert _cfg(tmp_path, "a").unit.size == (8, 8, 16)
    assert _cfg(tmp_path, "b", unit="patch").unit.size == (16, 16, 16)
    assert _cfg(tmp_path, "c", unit={"kind": "patch", "size": 12}).unit.size == (12, 12, 12)
    assert _config_json(_cfg(tmp_path, "a"))["unit"] == {"kind": "patch", "axis": 2, "size": [8, 8, 16]}
    assert "size" not in _config_json(_cfg(tmp_path, "s", unit="slice"))["unit"]  # slice runs hash as before
    for over, match in [
        ({"unit": {"kind": "patch", "size": [8, 8]}}, "unit.size"),
        ({"unit": {"kind": "patch", "size": 0}}, "unit.size: patch sizes must be >= 1"),
        ({"unit": {"kind": "patch", "axis": 1}}, "unit.axis: patch units have no slicing axis"),
        ({"strategy": {"name": "star"}}, "'star' does not support unit: patch"),
        ({"strategy": {"name": "typiclust"}}, "'typiclust' does not support unit: patch"),
        ({"model": {"backend": "nnunet"}}, "unit: patch: model.backend: nnunet"),
        ({"oracle": "human"}, "unit: patch: oracle: human"),
    ]:
        with pytest.raises(ConfigError, match=match):
            _cfg(tmp_path, "bad", **over)


# -- end to end ----------------------------------------------------------------------------------------------------
@pytest.mark.slow  # a whole run: Ray Train's start-up alone is ~20 s
def test_clasp_pe_on_patches_end_to_end_and_resume(ray_session, tmp_path):
    """A foreground-aware random cold start and two ClaSP PE rounds on 8x8x16 patches of 16^3 phantoms: the oracle
    reveals exactly the chosen patches, training reads their partial labels, cost counts patches, and a run resumed
    from its ledger after the last round reproduces it."""
    from raylearn.annotation.labels import LabelStore
    from raylearn.ledger import Ledger
    from raylearn.loop import run_experiment

    cfg = _cfg(tmp_path, "clasp")
    res = run_experiment(cfg, progress=False)
    header = Ledger(res.output_dir / "ledger.jsonl").header()
    n_units = 4 * len(header["pool_ids"])  # 2 x 2 x 1 patches of 8x8x16 per 16^3 case
    rounds = res.rounds
    assert [r["n_labeled"] for r in rounds] == [6, 10, 14]
    assert all(r["unit"] == "patch" and r["n_units"] == n_units for r in rounds)
    chosen = [u for r in rounds for u in r["selected"]]
    assert len(set(chosen)) == 14 and all(isinstance(parse_unit(u), PatchUnit) for u in chosen)
    assert rounds[-1]["fraction_labelled"] == pytest.approx(14 / n_units)
    # the cold start picked patches with ground-truth foreground first (nnActive's Random 66% FG)
    assert rounds[0]["fg_labelled_voxels"] > 0
    labels = LabelStore(res.output_dir / "labels")
    assert sorted(labels.labelled_units()) == sorted(chosen)
    for cid in {parse_unit(u).case for u in chosen}:
        _, mask = labels.read_masked(cid)
        assert mask.sum() == sum(parse_unit(u).voxels for u in chosen if parse_unit(u).case == cid)
    summary = json.loads((res.output_dir / "summary.json").read_text())
    assert summary["unit"] == "patch" and summary["n_labeled"] == 14
    assert 0.0 <= rounds[-1]["metrics"]["dice_mean"] <= 1.0
    again = run_experiment(cfg, resume=True, progress=False)
    assert [r["selected"] for r in again.rounds] == [r["selected"] for r in rounds]


def test_the_example_config_validates():
    """deployments/clasp_patch_hippocampus.yaml: 16^3 patches, FG-aware random cold start of 244 patches (5 % of the
    hippocampus pool's 4880), ClaSP PE rounds of 122."""
    from raylearn.experiment import load_experiment

    cfg = load_experiment(Path(__file__).resolve().parents[1] / "deployments" / "clasp_patch_hippocampus.yaml")
    assert (cfg.unit.kind, cfg.unit.size) == ("patch", (16, 16, 16))
    assert (cfg.cold_start.strategy, cfg.cold_start.size, cfg.strategy.name, cfg.schedule.batch_size) == \
        ("fg_random", 244, "clasp_pe", 122)
