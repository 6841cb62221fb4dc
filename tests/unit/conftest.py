"""Unit tests need no install and no broker: the sources they test are on the path (the venv's
celery-ha-repo.pth, and pytest's pythonpath in pyproject.toml for the hosts' helpers), and the
sample app gets in-memory transports before any test touches its broker or backend."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def sample_app():
    from celery_ha_app.main import app

    # memory:// and the in-process cache backend: apply() runs tasks locally, and
    # reminder's backend.set()/get() work without Redis.
    app.conf.update(broker_url="memory://", result_backend="cache+memory://")
    return app
