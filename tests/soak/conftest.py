"""Fixtures of the soak drills (make soak): the fault drills' own (tests/drills/conftest.py),
loaded from there rather than copied, so both sets see the lab the same way.

The figures go to test-artifacts/soak.json (DRILLS_RESULTS), beside make test's drills.json.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DRILLS = Path(__file__).resolve().parents[1] / "drills"
os.environ.setdefault("DRILLS_RESULTS", str(DRILLS.parents[1] / "test-artifacts" / "soak.json"))

_spec = importlib.util.spec_from_file_location("drill_fixtures", DRILLS / "conftest.py")
assert _spec and _spec.loader
drill_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(drill_fixtures)

drill_lab = drill_fixtures.drill_lab
drill_cluster = drill_fixtures.drill_cluster
drill_figures = drill_fixtures.drill_figures
workers = drill_fixtures.workers
