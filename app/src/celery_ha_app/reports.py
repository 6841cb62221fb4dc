"""Work routed to the `reports` queue (task_routes: reports.* -> reports)."""

from __future__ import annotations

from typing import Any

from celery import Task

from celery_ha_app.main import app


@app.task(bind=True, name="reports.generate")
def generate(self: Task, report_id: str) -> dict[str, Any]:
    """Pretend to build a report; says where it ran so a test can check the routing."""
    delivery = self.request.delivery_info or {}
    return {
        "report_id": report_id,
        "hostname": self.request.hostname,
        "routing_key": delivery.get("routing_key"),
    }
