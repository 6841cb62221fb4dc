"""The app object and its behaviour: routes, queues, schedule.

Deliberately no broker, backend or reliability setting here: those belong to the
deployment and come from the environment through ``celery_ha_boot``. What stays is what
the app's authors own: which task goes to which queue and what runs periodically.
"""

import os

from celery import Celery
from celery.schedules import crontab

app = Celery(
    "celery_ha_app",
    include=["celery_ha_app.tasks", "celery_ha_app.reports", "celery_ha_app.drill_tasks"],
)

app.conf.update(
    # Named queues instead of celery's implicit "celery", so worker instances can be sized
    # per kind of work (celery-worker@default, celery-worker@reports).
    task_default_queue="default",
    task_routes={"reports.*": {"queue": "reports"}},
    # Results as JSON only: pickle would let anyone who can write to Redis run code.
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    timezone="UTC",
    enable_utc=True,
    beat_schedule={
        "reminder-every-minute": {
            "task": "celery_ha_app.tasks.reminder",
            "schedule": crontab(),  # every minute, on the minute
        },
    },
)

# The beat drill (tests/drills/test_worker_beat_drills.py) turns on a fast periodic task on the
# beat hosts only, through the beat unit's environment; without these variables it is absent.
_DRILL_BEAT_EVERY = os.environ.get("CELERY_HA_DRILL_BEAT_EVERY")
_DRILL_BEAT_RUN = os.environ.get("CELERY_HA_DRILL_BEAT_RUN")
if _DRILL_BEAT_EVERY and _DRILL_BEAT_RUN:
    import time

    from celery.signals import before_task_publish

    app.conf.beat_schedule["drill-beat-tick"] = {
        "task": "drills.beat_tick",
        "schedule": float(_DRILL_BEAT_EVERY),
        "kwargs": {"run_id": _DRILL_BEAT_RUN},
    }

    @before_task_publish.connect(sender="drills.beat_tick", weak=False)
    def _stamp_send_time(headers: dict | None = None, **_: object) -> None:
        # When beat sent the run, not when a worker got to it: a doubled schedule shows as two
        # sends close together even if the workers ran a backlog all at once.
        if headers is not None:
            headers["celery_ha_sent_at"] = f"{time.time():.3f}"
