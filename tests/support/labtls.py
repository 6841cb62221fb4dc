"""TLS for clients on the controller (tests, drills, benchmarks).

The redis_tls role issues an operator certificate next to the cluster's secrets
(<cluster_secrets_dir>/tls: ca.crt, operator.crt, operator.key). When it is there the cluster
speaks TLS, and every client of the test suite connects with it, exactly as an operator would.
The CA it trusts is ca-bundle.crt, what the hosts trust too (during a CA rotation: the current
CA and the next one), or ca.crt where the role has not written a bundle yet.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import celery_ha_settings


def tls_env(secrets_dir: Path) -> dict[str, str]:
    """CELERY_HA_TLS_* for a Celery client on the controller ({} when the lab has no TLS)."""
    tls = secrets_dir / "tls"
    if not (tls / "ca.crt").is_file():
        return {}
    bundle = tls / "ca-bundle.crt"
    return {
        "CELERY_HA_TLS_CA": str(bundle if bundle.is_file() else tls / "ca.crt"),
        "CELERY_HA_TLS_CERT": str(tls / "operator.crt"),
        "CELERY_HA_TLS_KEY": str(tls / "operator.key"),
    }


def tls_kwargs(secrets_dir: Path) -> dict[str, Any]:
    """redis-py connection arguments for a direct client ({} when the lab has no TLS)."""
    env = tls_env(secrets_dir)
    if not env:
        return {}
    return celery_ha_settings.redis_tls_kwargs(
        env["CELERY_HA_TLS_CA"], env["CELERY_HA_TLS_CERT"], env["CELERY_HA_TLS_KEY"]
    )
