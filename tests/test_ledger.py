"""Ledger: durable appends, truncated-last-line repair, corruption detection, config hashing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from raylearn.ledger import Ledger, LedgerError, config_hash


def test_append_and_reload(tmp_path):
    led = Ledger(tmp_path / "l.jsonl")
    led.append("header", config_hash="abc", config={"a": 1})
    led.append("selected", round=0, ids=["c1", "c2"], scores={"x": np.array([0.5, 0.25])})
    led.append("round", round=0, selected=["c1", "c2"], metrics={"dice_mean": np.float32(0.5)})
    again = Ledger(tmp_path / "l.jsonl")
    assert [r["kind"] for r in again.records] == ["header", "selected", "round"]
    assert again.selection(0)["ids"] == ["c1", "c2"]
    assert again.selection(1) is None
    assert again.rounds()[0]["metrics"]["dice_mean"] == pytest.approx(0.5)
    assert again.header()["config_hash"] == "abc"


def test_truncated_last_line_is_dropped_and_appends_continue(tmp_path):
    path = tmp_path / "l.jsonl"
    led = Ledger(path)
    led.append("header", config_hash="h")
    led.append("round", round=0, selected=["a"])
    data = path.read_bytes()
    # simulate a kill in the middle of writing the third record
    path.write_bytes(data + b'{"crc": 123, "payload": {"kind": "round", "rou')
    led2 = Ledger(path)
    assert len(led2) == 2
    assert path.read_bytes() == data  # the partial tail was cut off
    led2.append("round", round=1, selected=["b"])
    assert [r["round"] for r in Ledger(path).rounds()] == [0, 1]


def test_checksum_mismatch_on_last_line_is_dropped(tmp_path):
    path = tmp_path / "l.jsonl"
    led = Ledger(path)
    led.append("header", config_hash="h")
    led.append("round", round=0, selected=["a"])
    lines = path.read_text().splitlines()
    bad = json.loads(lines[1])
    bad["payload"]["selected"] = ["tampered"]
    path.write_text(lines[0] + "\n" + json.dumps(bad) + "\n")
    assert len(Ledger(path)) == 1


def test_corruption_in_the_middle_is_an_error(tmp_path):
    path = tmp_path / "l.jsonl"
    led = Ledger(path)
    for i in range(3):
        led.append("round", round=i, selected=[str(i)])
    lines = path.read_text().splitlines()
    lines[1] = lines[1][:20]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LedgerError, match="record 2 is corrupt"):
        Ledger(path)


def test_repair_off_raises(tmp_path):
    path = tmp_path / "l.jsonl"
    Ledger(path).append("header", config_hash="h")
    path.write_bytes(path.read_bytes() + b'{"crc"')
    with pytest.raises(LedgerError):
        Ledger(path, repair=False)


def test_config_hash_is_order_independent_and_sensitive():
    assert config_hash({"a": 1, "b": {"c": 2}}) == config_hash({"b": {"c": 2}, "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def test_readonly_reader_leaves_a_partial_line_alone(tmp_path):
    path = tmp_path / "l.jsonl"
    Ledger(path).append("header", config_hash="h")
    data = path.read_bytes() + b'{"crc": 1, "pay'
    path.write_bytes(data)
    ro = Ledger(path, readonly=True)
    assert len(ro) == 1 and path.read_bytes() == data
    with pytest.raises(LedgerError, match="read-only"):
        ro.append("round", round=0)
