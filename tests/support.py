"""Paths and small settings the tests share."""

from pathlib import Path

#: the repository root
REPO = Path(__file__).resolve().parents[1]
#: the shared data sets beside the repository (read-only; tests that need one skip without it)
SHARED = REPO.parent / "shared" / "data"
