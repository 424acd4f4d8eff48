"""preprocess.allocator: glibc thresholds for this process and the workers it spawns."""

from __future__ import annotations

import os
import subprocess
import sys

from preprocess import allocator


def test_user_variables_are_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    assert allocator.keep_freed_memory() is False
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "12345"
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ


def test_spawned_workers_inherit_the_thresholds(monkeypatch):
    for name in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"):
        monkeypatch.delenv(name, raising=False)
    changed = allocator.keep_freed_memory()
    assert changed is sys.platform.startswith("linux")  # glibc here; a no-op (False) elsewhere
    out = subprocess.run([sys.executable, "-c", "import os; print(os.environ['MALLOC_MMAP_THRESHOLD_'])"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(allocator.KEEP_BYTES)
