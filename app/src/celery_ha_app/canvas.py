"""Chain and group examples, as signatures the caller runs with ``.delay()``/``.apply()``."""

from __future__ import annotations

from celery import chain, group

from celery_ha_app.tasks import add, mul


def chain_example() -> chain:
    """add(2, 3) | mul(4): each result feeds the next; ``.get()`` returns 20."""
    return chain(add.s(2, 3), mul.s(4))


def group_example() -> group:
    """add(2, 2) and add(3, 3) in parallel; ``.get()`` returns [4, 6] (in call order)."""
    return group(add.s(2, 2), add.s(3, 3))
