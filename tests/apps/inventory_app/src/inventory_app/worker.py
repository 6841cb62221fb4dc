"""The app object is called `inventory`, not `app`: `-A` must name it explicitly."""

from __future__ import annotations

from collections import Counter

from celery import Celery

inventory = Celery("inventory")
inventory.config_from_object("inventory_app.celeryconfig")


@inventory.task(name="inventory.count_items")
def count_items(items: list[str]) -> dict[str, int]:
    """How many of each item: ["a", "b", "a"] -> {"a": 2, "b": 1}."""
    return dict(Counter(items))


@inventory.task(name="inventory.total")
def total(items: list[str]) -> int:
    return len(items)
