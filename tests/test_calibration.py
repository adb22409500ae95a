"""Calibrations: a model's measured honest divergence per profile, the threshold and honest
floor set from it, and their file (written atomically, checked against the model)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from corolla.errors import InvalidInput
from corolla.verify.tolerance import (
    CALIBRATION_FILE,
    Calibration,
    compare,
    load_calibrations,
    save_calibrations,
)

MODEL = bytes(range(32))


def _calibration(**changes: object) -> Calibration:
    fields: dict[str, object] = dict(
        model_digest=MODEL,
        profile="fp32",
        checked_steps=10_000,
        honest_max=2.2e-6,
        honest_p999=1.9e-6,
        threshold_margin=4.0,
        floor_margin=1.5,
        command="python benchmarks/tolerance_calibration.py --model DIR",
    )
    fields.update(changes)
    return Calibration(**fields)  # type: ignore[arg-type]


def test_threshold_and_floor_follow_the_measured_maximum():
    calibration = _calibration()
    assert calibration.threshold == pytest.approx(8.8e-6)
    assert calibration.honest_floor == pytest.approx(3.3e-6)


def test_a_calibrated_threshold_decides_the_comparison():
    recomputed = torch.ones(1, 3, 8)
    claimed = recomputed.clone()
    claimed[0, 1] *= 1 + 5e-5  # well under the default 1e-3, over a calibrated 8.8e-6
    assert compare(claimed, recomputed, "fp32").passed
    verdict = compare(claimed, recomputed, "fp32", threshold=_calibration().threshold)
    assert not verdict.passed and verdict.threshold == pytest.approx(8.8e-6)


def test_calibrations_round_trip_and_are_checked_against_the_model(tmp_path):
    path = tmp_path / CALIBRATION_FILE
    save_calibrations(path, [_calibration(), _calibration(profile="nf4")])
    assert set(load_calibrations(path, MODEL)) == {"fp32", "nf4"}
    with pytest.raises(InvalidInput, match="another model"):
        load_calibrations(path, bytes(32))
    assert [p.name for p in tmp_path.iterdir()] == [CALIBRATION_FILE]  # no temporary left


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: data.update(format="other"),
        lambda data: data["calibrations"][0].update(honest_max=-1),
        lambda data: data["calibrations"][0].update(profile="fp16"),
        lambda data: data["calibrations"][0].update(floor_margin=100),
        lambda data: data["calibrations"].append(dict(data["calibrations"][0])),
        lambda data: data["calibrations"][0].pop("command"),
    ],
)
def test_a_damaged_calibration_file_is_refused(tmp_path, damage):
    path = tmp_path / CALIBRATION_FILE
    save_calibrations(path, [_calibration()])
    data = json.loads(path.read_text())
    damage(data)
    path.write_text(json.dumps(data))
    with pytest.raises(InvalidInput):
        load_calibrations(path)


def test_garbage_is_refused_with_a_clear_error(tmp_path):
    path = tmp_path / CALIBRATION_FILE
    path.write_bytes(b"\xff\x00not json")
    with pytest.raises(InvalidInput, match="not a calibration file"):
        load_calibrations(path)
    with pytest.raises(InvalidInput, match="no such"):
        load_calibrations(tmp_path / "missing.json")
    with pytest.raises(InvalidInput):
        dataclasses.replace(_calibration(), threshold_margin=float("nan"))
