"""Day-2 operation 5 (issue 14): rotate the CA while the cluster serves, with no connection
refused at any point.

ansible/rotate_ca.yml under load (a producer on the controller, one on a worker host): a new
CA trusted beside the old one, every certificate issued again by it, the old CA dropped.

Asserted:
- lost = 0, failed = 0; the longest gap with no task completing is printed and recorded
  (test-artifacts/soak.json);
- no refused TLS connection on the servers' side: no "Error accepting a client connection"
  in any Redis or Sentinel journal during the run. Every link of the cluster ends at a Redis
  or a Sentinel, and a handshake that either end refuses fails on the server too, which logs
  that line (Redis 7.0's INFO has no counter of failed handshakes: rejected_connections is
  maxclients only). That the line does count refusals is shown at the end, by a deliberate
  connection with the old operator certificate that must add one to it;
- afterwards every ca.crt on every host is the new CA alone, every certificate (hosts' and
  operator's) verifies against the new CA and not the old one, a client certificate of the
  old CA is refused by Redis and by Sentinel, and a client trusting only the old CA refuses
  the servers.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from opskit import OpsDrill
from support.cluster import Cluster
from support.drillkit import say, wait_healthy
from support.ledger import wait_until

REFUSED = "Error accepting a client connection"


def refusals(c: Cluster, since: float) -> dict[str, int]:
    """Lines of REFUSED per host and unit (Redis and Sentinel) since the epoch time `since`."""
    counts: dict[str, int] = {}
    units = {c.flavor.server_unit: c.redis_hosts, c.flavor.sentinel_unit: c.sentinel_hosts}
    for unit, hosts in units.items():
        for host in hosts:
            log = f"journalctl -q -o cat -u {unit} --since @{int(since)}"
            out = c.lab.ssh(host, f"{log} | grep -cF '{REFUSED}'", check=False)
            counts[f"{host}/{unit}"] = int(out.strip() or 0)
    return counts


def certs_in(pem: str) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(pem.encode())


def signed_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def tls_client(c: Cluster, host: str, port: int, ca: Path, cert: Path, key: Path) -> redis.Redis:
    return redis.Redis(
        host=c.addresses[host], port=port, socket_timeout=3, socket_connect_timeout=3,
        ssl=True, ssl_ca_certs=str(ca), ssl_certfile=str(cert), ssl_keyfile=str(key),
        ssl_cert_reqs="required", ssl_check_hostname=True,
    )  # fmt: skip


def refused(client: redis.Redis) -> str | None:
    """The error of a PING over a fresh connection, or None when it was answered."""
    try:
        client.ping()
    except (redis.AuthenticationError, redis.ResponseError):
        return None  # an answer about the password (NOAUTH): the handshake was accepted
    except (redis.ConnectionError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        client.close()
    return None


def test_ops5_rotate_ca(
    drill_cluster: Cluster,
    workers: list[str],
    drill_figures: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    c = drill_cluster
    tls = c.lab.lab_dir / "secrets" / "tls"
    if not (tls / "ca.crt").is_file():
        pytest.skip("the lab runs without TLS (redis_tls: false)")
    master = wait_healthy(c, workers)
    old_ca = x509.load_pem_x509_certificate((tls / "ca.crt").read_bytes())
    # The old operator credentials, kept to prove at the end that the old CA is refused.
    for name in ("ca.crt", "operator.crt", "operator.key"):
        shutil.copy2(tls / name, tmp_path / f"old-{name}")
    t0 = time.time() - 1
    with OpsDrill(c, "ops5-rotate-ca", c.worker_hosts[0]) as drill:
        # Three rounds over every host: more than one playbook's usual time on a busy machine.
        rc, _, tail = drill.operate("rotate_ca.yml", timeout=2400)
        assert rc == 0, tail
        new_master = wait_healthy(c, workers)
        during = refusals(c, t0)
        drill.finish(
            drill_figures,
            "ops 5: rotate the CA (rotate_ca.yml)",
            master_before=master,
            master_after=new_master,
            tls_refusals_on_servers=sum(during.values()),
        )
    say(f"ops 5: refused TLS connections logged by the servers during the run: {during}")
    assert not any(during.values()), f"servers refused TLS connections: {during}"

    # The end state, read from every host: the new CA alone, every certificate from it.
    new_ca = x509.load_pem_x509_certificate((tls / "ca.crt").read_bytes())
    assert new_ca.public_key() != old_ca.public_key(), "ca.crt is still the old CA"
    assert not (tls / "ca-next.crt").exists(), "the next CA was not promoted"
    assert certs_in((tls / "ca-bundle.crt").read_text()) == [new_ca]
    checked = 0
    for host in sorted(set(c.redis_hosts + c.sentinel_hosts + c.worker_hosts)):
        dirs = c.lab.ssh(host, "find /etc -name cert.crt -path '*tls*' -printf '%h\\n'").split()
        assert dirs, f"{host}: no TLS folder found"
        for d in dirs:
            trusted = certs_in(c.lab.ssh(host, f"cat {d}/ca.crt"))
            assert trusted == [new_ca], f"{host}:{d}/ca.crt trusts {[t.subject for t in trusted]}"
            leaf = certs_in(c.lab.ssh(host, f"cat {d}/cert.crt"))[0]
            assert signed_by(leaf, new_ca) and not signed_by(leaf, old_ca), f"{host}:{d}"
            checked += 1
    operator = x509.load_pem_x509_certificate((tls / "operator.crt").read_bytes())
    assert signed_by(operator, new_ca) and not signed_by(operator, old_ca)
    say(f"ops 5: {checked} host certificates and the operator's from the new CA only")

    # The old CA is trusted nowhere: refused by Redis and by Sentinel, each logging it (which
    # shows that the count above counts refused handshakes), and refused by a client.
    host = c.redis_hosts[0]
    ports = {
        c.flavor.server_unit: int(c.env.get("CELERY_HA_REDIS_PORT") or 6379),
        c.flavor.sentinel_unit: dict(c.sentinels)[c.addresses[host]],
    }
    new_files = (tls / "ca-bundle.crt", tls / "operator.crt", tls / "operator.key")
    old_client = (
        tmp_path / "old-ca.crt",
        tmp_path / "old-operator.crt",
        tmp_path / "old-operator.key",
    )
    for unit, port in ports.items():
        assert refused(tls_client(c, host, port, *new_files)) is None, f"{unit}: new cert refused"
        t_bad = time.time() - 1
        before = refusals(c, t_bad)[f"{host}/{unit}"]
        error = refused(tls_client(c, host, port, new_files[0], *old_client[1:]))
        assert error, f"{host} {unit} accepted a client certificate of the old CA"

        def logged(unit: str = unit, t_bad: float = t_bad, before: int = before) -> int | None:
            now = refusals(c, t_bad)[f"{host}/{unit}"]
            return now if now > before else None

        wait_until(logged, timeout=15, what=f"{host} {unit} logging the refused handshake")
        say(f"ops 5: {host} {unit} refused the old client certificate ({error[:90]})")
        error = refused(tls_client(c, host, port, old_client[0], *new_files[1:]))
        assert error, f"a client trusting only the old CA accepted {host} {unit}"
