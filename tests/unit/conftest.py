"""Unit tests need no install and no broker: the projects' sources go on sys.path, and the
sample app gets in-memory transports before any test touches its broker or backend."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Also the controller-side code tested here: the CA tool, the secret search and the drills'
# ledger (host-free accounting, so its tests run here and not with the drills); and the
# hosts' Redis/Sentinel helper, against fake servers.
for src in (
    "app/boot/src",
    "app/src",
    "tests/apps/inventory_app/src",
    "ansible/roles/redis_tls/files",
    "sentinel",
    "tests",
    "tests/drills",
):
    path = str(REPO / src)
    if path not in sys.path:
        sys.path.insert(0, path)


@pytest.fixture(scope="session")
def sample_app():
    from celery_ha_app.main import app

    # memory:// and the in-process cache backend: apply() runs tasks locally, and
    # reminder's backend.set()/get() work without Redis.
    app.conf.update(broker_url="memory://", result_backend="cache+memory://")
    return app
