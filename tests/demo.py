"""The end of `make demo`: run the sample tasks through the deployed lab and show the way to
Flower. Every call goes controller -> Sentinel -> current Redis master -> a worker."""

from __future__ import annotations

import sys

from support.e2e_lab import LAB_DIR, LabInventory, client_settings

TIMEOUT = 60


def main() -> int:
    lab = LabInventory(LAB_DIR)
    from celery_ha_app.canvas import chain_example, group_example
    from celery_ha_app.main import app
    from celery_ha_app.reports import generate
    from celery_ha_app.tasks import add

    app.conf.update(client_settings(lab))
    runs = [
        ("add(5, 7)", lambda: add.delay(5, 7)),
        ("chain add(2, 3) | mul(4)", lambda: chain_example().delay()),
        ("group add(2, 2), add(3, 3)", lambda: group_example().delay()),
        ("reports.generate('demo') on the reports queue", lambda: generate.delay("demo")),
    ]
    print("Sample tasks through the Sentinels:")
    for label, send in runs:
        result = send().get(timeout=TIMEOUT)
        print(f"  {label:48} -> {result}")
    app.close()

    flower_host = lab.groups["flower"][0]
    print(
        f"\nFlower: http://{lab.addresses[flower_host]}:5555/  (user 'flower', password in "
        f"{LAB_DIR / 'secrets' / 'flower_basic_auth_password'}). It lists the workers; its "
        "Tasks tab stays empty with the default celery_task_events: false (make deploy "
        "DEPLOY_ARGS='-e celery_task_events=true' fills it)\n"
        f"The lab stays up: tests/lab/lab status | ssh node1 | down  (make lab-down removes it)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
