"""Per-slice shard results (one vector per case, lengths varying) merge like any feature column."""

from __future__ import annotations

import numpy as np

from raylearn.pool_support import merge_results, ragged


def test_ragged_columns_merge_and_reorder_by_case():
    a = {"ids": ["c3", "c1"], "features": {"entropy": ragged([np.arange(3.0), np.arange(2.0)])}}
    b = {"ids": ["c2"], "features": {"entropy": ragged([np.arange(4.0)])}}
    out = merge_results([a, b], ["c1", "c2", "c3"])
    assert out["ids"].tolist() == ["c1", "c2", "c3"]
    col = out["features"]["entropy"]
    assert col.dtype == object and [len(v) for v in col] == [2, 4, 3]
    np.testing.assert_array_equal(col[1], np.arange(4.0))
    same = ragged([np.zeros(2), np.ones(2)])  # equal lengths stay one vector per case (not a 2-d array)
    assert same.shape == (2,) and same[1].tolist() == [1.0, 1.0]
