"""celery-ha: the celery command with the deployment's settings taken from stdin (one JSON
object), run by the celery role with the venv's Python (python -c): its secrets would be
printed at -vvv if they came in the task's environment. The arguments are celery's."""

import json
import os
import sys

# Before celery is imported: it may read the settings at import time.
os.environ.update(json.load(sys.stdin))
from celery.__main__ import main

sys.argv[0] = "celery"
main()
