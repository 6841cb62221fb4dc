"""The broker server's flavor (cluster_redis_flavor: redis or valkey) of a running cluster is
never switched by a re-run: the preflight refuses, naming the hosts, before any host changes."""

from __future__ import annotations

from support.e2e_lab import LAB_DIR, LabInventory
from support.labflavor import lab_flavor


def test_switching_the_flavor_of_a_running_cluster_is_refused_before_any_change(
    lab: LabInventory,
) -> None:
    running = lab_flavor(LAB_DIR)
    other = "redis" if running.name == "valkey" else "valkey"
    proc = lab.site_yml("-e", f"cluster_redis_flavor={other}", timeout=300)
    out = " ".join((proc.stdout + proc.stderr).split())  # the message may be wrapped
    assert proc.returncode != 0, out[-3000:]
    assert f"cluster_redis_flavor is {other}" in out
    # Every host that runs the other server is named, with the files that show it.
    for host in sorted(set(lab.groups["redis"]) | set(lab.groups["sentinel"])):
        assert f"but {host} already runs the other server" in out, host
    assert running.server_conf in out
    # The preflight stopped the run: no play past it started.
    assert "PLAY [Redis servers]" not in out
