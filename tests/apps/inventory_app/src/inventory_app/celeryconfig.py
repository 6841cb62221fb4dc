"""The app's own configuration, as many real apps ship it.

The broker below is wrong for any celery-ha cluster on purpose: the deployment's settings
must win over an app that configures itself with config_from_object().
"""

broker_url = "redis://127.0.0.1:6379/9"
result_backend = "redis://127.0.0.1:6379/10"
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
# No task_default_queue: this app sends to celery's implicit "celery" queue unless the
# deployment sets CELERY_HA_DEFAULT_QUEUE.
