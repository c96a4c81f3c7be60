"""Error-region click simulation (SAM-Med3D's iterative protocol) and the overall foreground NSD."""

import numpy as np
import pytest

from raylearn.prompts import class_window_start, next_click, overall_symdiff_pct, simulate_clicks


def _ball(shape, centre, r):
    z, y, x = np.indices(shape)
    return ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) <= r * r


def test_first_click_is_positive_inside_the_reference():
    ref = _ball((20, 20, 20), (10, 10, 10), 4)
    rng = np.random.default_rng(0)
    for _ in range(20):
        zyx, pos = next_click(np.zeros_like(ref), ref, rng)
        assert pos and ref[zyx]


def test_extra_voxels_give_negative_clicks_missed_voxels_positive():
    ref = _ball((20, 20, 20), (10, 10, 10), 4)
    pred = _ball((20, 20, 20), (10, 10, 10), 7)  # a superset: only false positives
    rng = np.random.default_rng(1)
    for _ in range(20):
        zyx, pos = next_click(pred, ref, rng)
        assert not pos and pred[zyx] and not ref[zyx]
    small = _ball((20, 20, 20), (10, 10, 10), 2)  # a subset: only misses
    for _ in range(20):
        zyx, pos = next_click(small, ref, rng)
        assert pos and ref[zyx] and not small[zyx]


def test_mixed_errors_draw_both_kinds_and_perfect_mask_clicks_inside():
    shape = (20, 20, 20)
    ref = _ball(shape, (10, 8, 10), 4)
    pred = _ball(shape, (10, 12, 10), 4)
    rng = np.random.default_rng(2)
    kinds = set()
    for _ in range(40):
        zyx, pos = next_click(pred, ref, rng)
        assert (ref & ~pred)[zyx] if pos else (pred & ~ref)[zyx]
        kinds.add(pos)
    assert kinds == {True, False}
    zyx, pos = next_click(ref, ref, rng)  # nothing left to fix: a positive click in the reference
    assert pos and ref[zyx]


def test_center_method_clicks_the_core_of_the_larger_error():
    shape = (30, 30, 30)
    ref = _ball(shape, (15, 15, 15), 9)
    pred = ref & ~_ball(shape, (15, 15, 15), 6)  # a large hole (missed) ...
    pred |= _ball(shape, (2, 2, 2), 1)  # ... and a tiny false positive
    rng = np.random.default_rng(3)
    for _ in range(10):
        zyx, pos = next_click(pred, ref, rng, method="center")
        assert pos and np.linalg.norm(np.subtract(zyx, 15)) <= 3.5


def test_next_click_is_seeded_and_validates():
    ref = _ball((16, 16, 16), (8, 8, 8), 5)
    pred = np.zeros_like(ref)
    a = [next_click(pred, ref, np.random.default_rng(7)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    with pytest.raises(ValueError, match="empty"):
        next_click(pred, np.zeros_like(ref), np.random.default_rng(0))
    with pytest.raises(ValueError, match="one shape"):
        next_click(pred[:-1], ref, np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown click method"):
        next_click(pred, ref, np.random.default_rng(0), method="edge")


class _BallModel:
    """A toy promptable model: the union of balls around positive clicks minus balls around negative ones."""

    def __init__(self, radius=3):
        self.radius, self.calls, self.prev_seen = radius, [], []

    def __call__(self, image, points, labels, prev):
        self.calls.append(len(points))
        self.prev_seen.append(None if prev is None else float(prev[0, 0, 0]))
        mask = np.zeros(image.shape, bool)
        for p, lab in zip(points, labels, strict=True):
            if lab:
                mask |= _ball(image.shape, p, self.radius)
        for p, lab in zip(points, labels, strict=True):
            if not lab:
                mask &= ~_ball(image.shape, p, 1)
        return mask, np.full((4, 4, 4), float(len(points)))


def test_simulate_clicks_accumulates_feeds_back_and_records():
    shape = (24, 24, 24)
    ref = _ball(shape, (12, 12, 12), 6)
    model = _BallModel()
    sim = simulate_clicks(model, np.zeros(shape, np.float32), ref, [1, 5, 10], np.random.default_rng(0))
    assert model.calls == list(range(1, 11))  # all clicks so far, one more each step
    assert model.prev_seen == [None] + [float(n) for n in range(1, 10)]  # previous low-res logits fed back
    assert sorted(sim.masks) == [1, 5, 10] and sim.points.shape == (10, 3) and sim.labels.shape == (10,)
    assert {n: float(v[0, 0, 0]) for n, v in sim.low_res_at.items()} == {1: 1.0, 5: 5.0, 10: 10.0}
    assert sim.labels[0] == 1 and ref[tuple(sim.points[0])]
    err = {n: np.count_nonzero(m ^ ref) for n, m in sim.masks.items()}
    assert err[10] < err[1]  # clicks from the error region reduce the error
    for p, lab in zip(sim.points, sim.labels, strict=True):
        assert ref[tuple(p)] == bool(lab)  # positive clicks in the reference, negative ones outside it
    again = simulate_clicks(_BallModel(), np.zeros(shape, np.float32), ref, [1, 5, 10], np.random.default_rng(0))
    assert np.array_equal(again.points, sim.points)


def test_simulate_clicks_validates():
    ref = _ball((8, 8, 8), (4, 4, 4), 2)
    img = np.zeros((8, 8, 8), np.float32)
    with pytest.raises(ValueError, match=">= 1"):
        simulate_clicks(_BallModel(), img, ref, [0, 5], np.random.default_rng(0))
    with pytest.raises(ValueError, match="shape"):
        simulate_clicks(_BallModel(), img[:4], ref, 1, np.random.default_rng(0))
    with pytest.raises(ValueError, match="predict returned"):
        simulate_clicks(lambda *a: (np.zeros((4, 4, 4), bool), None), img, ref, 1, np.random.default_rng(0))


def test_class_window_start_centres_the_bounding_box():
    ref = np.zeros((40, 50, 60), bool)
    ref[10:21, 30:41, 5:8] = True  # bbox centre (15.5, 35.5, 6.5) -> voxel centre 15/35/6 of a 16^3 window
    start = class_window_start(ref, 16)
    assert start == (8, 28, -1)
    with pytest.raises(ValueError, match="empty"):
        class_window_start(np.zeros((4, 4, 4), bool), 16)


def test_overall_symdiff_pct_known_values():
    gt = np.zeros((1, 1, 10), np.uint8)
    pred = np.zeros((1, 1, 10), np.uint8)
    gt[0, 0, 0:4], pred[0, 0, 1:4] = 1, 1  # one missed voxel
    gt[0, 0, 5:8], pred[0, 0, 5:8] = 2, 1  # three voxels of the wrong class
    # union of foreground = 7, wrong labels = 1 + 3
    assert overall_symdiff_pct(pred, gt) == pytest.approx(400 / 7)
    assert overall_symdiff_pct(gt, gt) == 0.0 and overall_symdiff_pct(pred * 0, gt * 0) == 0.0
    with pytest.raises(ValueError, match="shape"):
        overall_symdiff_pct(pred[..., :3], gt)
