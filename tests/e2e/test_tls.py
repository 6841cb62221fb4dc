"""TLS on every Redis and Sentinel link (redis_tls, on by default): what a client without the
right certificate gets, and a certificate rotation by re-running the playbook.

Every other test of the suite already runs over TLS (the lab's clients use the operator
certificate the redis_tls role issues); these tests prove that nothing else gets in.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from celery import Celery
from cryptography import x509
from redis.sentinel import Sentinel
from support.e2e_lab import REPO, LabInventory

REDIS_PORT = 6379
SENTINEL_PORT = 26379
CA_TOOL = REPO / "ansible/roles/redis_tls/files/celery_ha_ca.py"
# How a TLS server's refusal of the client's certificate reaches redis-py: the alert itself, or
# the connection closed under it, depending on when the client next reads or writes. Never
# "Connection refused", which would only mean that nothing listens.
HANDSHAKE_REFUSED = r"(?i)certificate required|unknown ca|alert|violation of protocol|reset by peer"


@pytest.fixture(scope="module")
def tls(lab: LabInventory) -> dict:
    kwargs = lab.tls_kwargs()
    if not kwargs:
        pytest.fail(
            f"no TLS material in {lab.lab_dir / 'secrets' / 'tls'}: redis_tls is on by default"
        )
    return kwargs


def endpoints(lab: LabInventory) -> list[tuple[str, int, dict]]:
    """(address, port, credentials) of every Redis server and every Sentinel."""
    admin = {"username": "admin", "password": lab.secret("redis_admin_password")}
    sentinel = {"password": lab.secret("sentinel_password")}
    return [(lab.addresses[h], REDIS_PORT, admin) for h in lab.groups["redis"]] + [
        (lab.addresses[h], SENTINEL_PORT, sentinel) for h in lab.groups["sentinel"]
    ]


def ping(address: str, port: int, **kwargs) -> bool:
    client = redis.Redis(
        host=address, port=port, socket_timeout=3, socket_connect_timeout=3, **kwargs
    )
    try:
        return bool(client.ping())
    finally:
        client.close()


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A CA that is not the cluster's, and a client certificate it issued."""
    d = tmp_path_factory.mktemp("rogue")

    def tool(*args: str) -> None:
        subprocess.run([sys.executable, str(CA_TOOL), *args], check=True, capture_output=True)

    tool("ca", "--cert", f"{d}/ca.crt", "--key", f"{d}/ca.key", "--name", "rogue CA", "--days", "2")
    tool(
        "cert", "--ca-cert", f"{d}/ca.crt", "--ca-key", f"{d}/ca.key",
        "--cert", f"{d}/client.crt", "--key", f"{d}/client.key", "--name", "rogue",
        "--usage", "client", "--days", "1", "--renew-days", "0",
    )  # fmt: skip
    return {
        "ca": f"{d}/ca.crt",
        "ca_key": f"{d}/ca.key",
        "cert": f"{d}/client.crt",
        "key": f"{d}/client.key",
    }


def test_every_endpoint_answers_over_tls(lab: LabInventory, tls: dict) -> None:
    # The refusals below mean something only if the same endpoints answer a proper client.
    for address, port, creds in endpoints(lab):
        assert ping(address, port, **creds, **tls), f"{address}:{port}"


def test_plaintext_client_is_refused(lab: LabInventory, tls: dict) -> None:
    for address, port, creds in endpoints(lab):
        # The TLS port drops what is not a TLS handshake (a refused connection would mean
        # nothing listens, which is not what this test is about).
        with pytest.raises(redis.ConnectionError, match=r"(?i)reset by peer|closed"):
            ping(address, port, **creds)


def test_client_without_certificate_is_refused(lab: LabInventory, tls: dict) -> None:
    no_cert = dict(tls, ssl_certfile=None, ssl_keyfile=None)
    for address, port, creds in endpoints(lab):
        with pytest.raises(redis.ConnectionError, match=HANDSHAKE_REFUSED):
            ping(address, port, **creds, **no_cert)


def test_client_certificate_from_another_ca_is_refused(
    lab: LabInventory, tls: dict, rogue: dict[str, str]
) -> None:
    # Trusts the real servers (so the handshake fails on the server's side, not ours).
    stranger = dict(tls, ssl_certfile=rogue["cert"], ssl_keyfile=rogue["key"])
    for address, port, creds in endpoints(lab):
        with pytest.raises(redis.ConnectionError, match=HANDSHAKE_REFUSED):
            ping(address, port, **creds, **stranger)


def test_clients_do_not_trust_a_server_outside_the_cluster_ca(
    lab: LabInventory, tls: dict, rogue: dict[str, str]
) -> None:
    # The other direction: a client that trusts only another CA refuses our servers, which is
    # what stops a client from talking to an impostor.
    other_trust = dict(tls, ssl_ca_certs=rogue["ca"])
    address, port, creds = endpoints(lab)[0]
    with pytest.raises(redis.ConnectionError, match=r"(?i)certificate verify failed"):
        ping(address, port, **creds, **other_trust)


def served_serial(address: str, port: int, secrets: Path) -> int:
    """Serial number of the certificate the server at address:port shows right now."""
    tls_dir = secrets / "tls"
    context = ssl.create_default_context(cafile=str(tls_dir / "ca.crt"))
    context.load_cert_chain(str(tls_dir / "operator.crt"), str(tls_dir / "operator.key"))
    with (
        socket.create_connection((address, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=address) as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def master_address(lab: LabInventory, tls: dict) -> str:
    sentinel = Sentinel(
        [(lab.addresses[h], SENTINEL_PORT) for h in lab.groups["sentinel"]],
        sentinel_kwargs={"password": lab.secret("sentinel_password"), "socket_timeout": 3, **tls},
    )
    return sentinel.discover_master("celery")[0]


@pytest.mark.slow
def test_rotation_by_rerun_keeps_the_master_and_the_work_going(
    lab: LabInventory, tls: dict, sample_app: Celery
) -> None:
    from celery_ha_app.tasks import add

    secrets = lab.lab_dir / "secrets"
    before = {(a, p): served_serial(a, p, secrets) for a, p, _ in endpoints(lab)}
    master = master_address(lab, tls)

    # Every play but Celery's: the servers are what must reload without losing the master; a
    # client's new certificate is only a file its next connection reads (kept short for CI).
    proc = lab.site_yml("-e", "redis_tls_rotate=true", "--skip-tags", "celery", timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]

    after = {(a, p): served_serial(a, p, secrets) for a, p, _ in endpoints(lab)}
    unchanged = [f"{a}:{p}" for (a, p), serial in after.items() if serial == before[(a, p)]]
    assert not unchanged, f"still serving the old certificate: {unchanged}"
    # Redis reloaded in place and Sentinels restarted one at a time: no failover.
    assert master_address(lab, tls) == master
    assert add.delay(20, 22).get(timeout=60) == 42


def test_switching_tls_off_on_a_running_cluster_is_refused_before_any_change(
    lab: LabInventory,
) -> None:
    proc = lab.site_yml("-e", "redis_tls=false", timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "already run with TLS" in " ".join(out.split())  # the message may be wrapped
    # The preflight stopped the run: no play past it started.
    assert "PLAY [Redis servers]" not in out


def test_a_ca_the_cluster_does_not_trust_is_refused_before_any_change(
    lab: LabInventory, rogue: dict[str, str]
) -> None:
    # Naming another CA in the inventory would re-issue every certificate in one run, and the
    # servers would refuse each other until all had moved: only rotate_ca.yml changes the CA.
    proc = lab.site_yml(
        "-e", f"redis_tls_ca_cert={rogue['ca']}", "-e", f"redis_tls_ca_key={rogue['ca_key']}",
        timeout=300,
    )  # fmt: skip
    out = " ".join((proc.stdout + proc.stderr).split())  # the message may be wrapped
    assert proc.returncode != 0, out[-3000:]
    assert f"redis_tls_ca_cert is '{rogue['ca']}'" in out, out[-3000:]
    assert "rotate_ca.yml" in out
    assert "PLAY [Redis servers]" not in out
