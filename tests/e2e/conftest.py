"""Fixtures for the end-to-end tests (helpers: tests/support/e2e_lab.py). LAB_DIR picks the
lab."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from celery import Celery
from support.e2e_lab import LAB_DIR, LabInventory, client_settings


@pytest.fixture(scope="session")
def lab() -> LabInventory:
    if not (LAB_DIR / "inventory.ini").exists():
        pytest.fail(
            f"no lab at {LAB_DIR} (LAB_DIR): run tests/lab/lab up and deploy site.yml first"
        )
    return LabInventory(LAB_DIR)


@pytest.fixture(scope="session")
def sample_app(lab: LabInventory) -> Iterator[Celery]:
    """The sample app itself (its routes and task names), configured as a pure client with the
    deployment's settings: every call goes controller -> Sentinel -> Redis master -> worker."""
    from celery_ha_app.main import app

    app.conf.update(client_settings(lab))
    app.conf.update(task_default_queue="default")
    yield app
    app.close()
