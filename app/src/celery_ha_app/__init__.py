"""Sample Celery app of celery-ha. ``celery -A celery_ha_app`` finds ``app`` here."""

from celery_ha_app.main import app

__all__ = ["app"]
