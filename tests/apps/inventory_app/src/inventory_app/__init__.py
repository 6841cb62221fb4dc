"""Inventory: a tiny app that knows nothing about celery-ha (run it as
``CELERY_HA_APP=inventory_app.worker:inventory``)."""
