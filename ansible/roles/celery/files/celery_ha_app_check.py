"""celery-ha: run by the celery role with the venv's Python before any service is restarted
(python -c, so nothing is installed for it): loads the app module given as the argument and
celery_ha_boot with the settings about to be written, which come as one JSON object on
stdin, never on a command line. Prints the queues the app routes to in its own code (JSON);
exits non-zero, naming the module, when either does not load."""

import json
import os
import sys

# Before celery is imported: it may read the settings at import time.
os.environ.update(json.load(sys.stdin))
from celery.app.utils import find_app

try:
    find_app(sys.argv[1])
except Exception as exc:
    sys.exit(f"celery_app_module={sys.argv[1]!r} cannot be loaded from {sys.prefix}: {exc!r}")
app = find_app("celery_ha_boot")
queues = {app.conf.task_default_queue}
routes = app.conf.task_routes or {}
for router in routes if isinstance(routes, (list, tuple)) else [routes]:
    if isinstance(router, dict):
        for route in router.values():
            queue = route.get("queue") if isinstance(route, dict) else route
            if queue:
                queues.add(getattr(queue, "name", queue))
print(json.dumps(sorted(q for q in queues if isinstance(q, str))))
