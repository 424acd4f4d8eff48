"""Behaviour pinned across refactors: the fixture runs reproduce their metrics.jsonl bytes.

The fixtures (tests/fixtures/*.metrics.jsonl) were recorded by
tests/fixtures/record_layout_fixtures.py before the layout redesign, and re-recorded once
since, on purpose: the fused optimizer and the torch-drawn augmentation masks of 2026-12-02
changed the numbers (README "Benchmarks"). The wall-clock fields are zeroed, every other
byte (losses, schedules, mining statistics, sample counts) must match. Skipped when
../shared/data is absent.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
sys.path.insert(0, str(FIXTURES))

import record_layout_fixtures as fixtures  # noqa: E402


@pytest.mark.parametrize("name", list(fixtures.RUNS))
def test_fixture_run_reproduces_metrics_bytes(name, tmp_path):
    needed = fixtures.CHEWIE_NPZ if name == "reach_myow" else fixtures.MNIST
    if not needed.exists():
        pytest.skip(f"real data not available: {needed} is absent")
    expected = (FIXTURES / f"{name}.metrics.jsonl").read_text()
    assert fixtures.run_fixture(name, tmp_path) == expected
