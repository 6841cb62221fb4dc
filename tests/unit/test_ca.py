"""celery_ha_ca.py, the controller-side CA of the redis_tls role: idempotent, renews what must
be renewed, never replaces a CA, and keeps keys private."""

from __future__ import annotations

import datetime as dt
import ssl
import stat
from pathlib import Path

import celery_ha_ca as ca_tool
import pytest
from cryptography import x509


def run(*argv: str) -> dict:
    import contextlib
    import io
    import json

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert ca_tool.main(list(argv)) == 0
    return json.loads(out.getvalue())


def make_ca(d: Path, name: str = "ca") -> tuple[Path, Path]:
    cert, key = d / f"{name}.crt", d / f"{name}.key"
    run("ca", "--cert", str(cert), "--key", str(key), "--name", "test CA", "--days", "100")
    return cert, key


def issue(d: Path, ca: tuple[Path, Path], *extra: str, days: str = "30", renew: str = "5") -> dict:
    return run(
        "cert", "--ca-cert", str(ca[0]), "--ca-key", str(ca[1]),
        "--cert", str(d / "s.crt"), "--key", str(d / "s.key"), "--name", "redis@node1",
        "--usage", "server", "--usage", "client", "--san", "IP:10.0.0.1", "--san", "DNS:node1",
        "--days", days, "--renew-days", renew, *extra,
    )  # fmt: skip


def test_ca_is_created_once_and_never_replaced(tmp_path: Path) -> None:
    cert, key = make_ca(tmp_path)
    before = cert.read_bytes()
    again = run("ca", "--cert", str(cert), "--key", str(key), "--name", "x", "--days", "1")
    assert again["changed"] is False
    assert cert.read_bytes() == before
    assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_ca_refuses_half_a_pair(tmp_path: Path) -> None:
    cert, key = make_ca(tmp_path)
    key.unlink()
    with pytest.raises(SystemExit, match="only one of"):
        run("ca", "--cert", str(cert), "--key", str(key), "--name", "x", "--days", "1")


def test_certificate_is_issued_once_and_verifies(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    first = issue(tmp_path, ca)
    assert (first["changed"], first["reason"]) == (True, "missing")
    assert issue(tmp_path, ca)["changed"] is False
    assert stat.S_IMODE((tmp_path / "s.key").stat().st_mode) == 0o600
    # A real TLS library accepts the pair and the chain.
    context = ssl.create_default_context(cafile=str(ca[0]))
    context.load_cert_chain(str(tmp_path / "s.crt"), str(tmp_path / "s.key"))
    cert = x509.load_pem_x509_certificate((tmp_path / "s.crt").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(ca[0].read_bytes()))


@pytest.mark.parametrize(
    ("extra", "renew", "reason"),
    [
        (("--force",), "5", "rotation requested"),
        ((), "31", "within 31 days"),
        (("--san", "IP:10.0.0.9"), "5", "names changed"),
    ],
)
def test_certificate_is_renewed_when_it_must_be(
    tmp_path: Path, extra: tuple[str, ...], renew: str, reason: str
) -> None:
    ca = make_ca(tmp_path)
    issue(tmp_path, ca)
    old_cert, old_key = (tmp_path / "s.crt").read_bytes(), (tmp_path / "s.key").read_bytes()
    result = issue(tmp_path, ca, *extra, days="40" if renew == "31" else "30", renew=renew)
    assert result["changed"] is True
    assert reason in result["reason"]
    assert (tmp_path / "s.crt").read_bytes() != old_cert
    # The key stays: only the certificate is new.
    assert (tmp_path / "s.key").read_bytes() == old_key


def test_certificate_from_another_ca_is_replaced(tmp_path: Path) -> None:
    issue(tmp_path, make_ca(tmp_path, "old"))
    new_ca = make_ca(tmp_path, "new")
    assert issue(tmp_path, new_ca)["reason"] in ("issued by another CA", "not signed by this CA")
    cert = x509.load_pem_x509_certificate((tmp_path / "s.crt").read_bytes())
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(new_ca[0].read_bytes()))


def test_check_mode_writes_nothing(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    assert issue(tmp_path, ca, "--check") == {"changed": True, "reason": "missing"}
    assert not (tmp_path / "s.crt").exists()
    issue(tmp_path, ca)
    before = (tmp_path / "s.crt").read_bytes()
    assert issue(tmp_path, ca, "--force", "--check")["changed"] is True
    assert (tmp_path / "s.crt").read_bytes() == before


def test_certificate_never_outlives_its_ca(tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    issue(tmp_path, ca, days="1000")
    cert = x509.load_pem_x509_certificate((tmp_path / "s.crt").read_bytes())
    ca_cert = x509.load_pem_x509_certificate(ca[0].read_bytes())
    assert cert.not_valid_after_utc <= ca_cert.not_valid_after_utc
    assert cert.not_valid_after_utc - dt.datetime.now(dt.UTC) < dt.timedelta(days=101)


def test_promote_swaps_in_the_next_ca_keeps_the_old_and_resumes(tmp_path: Path) -> None:
    cur, nxt = make_ca(tmp_path), make_ca(tmp_path, "ca-next")
    old, new = cur[0].read_bytes(), nxt[0].read_bytes()
    argv = ["--cert", str(cur[0]), "--key", str(cur[1])]
    argv += ["--next-cert", str(nxt[0]), "--next-key", str(nxt[1])]
    assert run("promote", *argv, "--check")["changed"] is True
    assert cur[0].read_bytes() == old, "--check moved a file"
    assert run("promote", *argv)["changed"] is True
    assert cur[0].read_bytes() == new and not nxt[0].exists() and not nxt[1].exists()
    assert ca_tool.pair(cur[0], cur[1])
    retired = sorted(p.name for p in tmp_path.glob("ca.*.retired-*"))
    assert [n.split(".retired-")[0] for n in retired] == ["ca.crt", "ca.key"]
    assert (tmp_path / retired[0]).read_bytes() == old
    assert stat.S_IMODE((tmp_path / retired[1]).stat().st_mode) == 0o600
    assert run("promote", *argv)["changed"] is False  # nothing left to do: a re-run is a no-op


def test_promote_finishes_a_run_killed_between_key_and_certificate(tmp_path: Path) -> None:
    cur, nxt = make_ca(tmp_path), make_ca(tmp_path, "ca-next")
    new = nxt[0].read_bytes()
    cur[1].rename(tmp_path / "ca.key.retired-x")
    nxt[1].rename(cur[1])  # the key moved, the certificate not yet
    argv = ["--cert", str(cur[0]), "--key", str(cur[1])]
    assert run("promote", *argv, "--next-cert", str(nxt[0]), "--next-key", str(nxt[1]))["changed"]
    assert cur[0].read_bytes() == new and ca_tool.pair(cur[0], cur[1])


def handshake(server: tuple[str, str, str], client: tuple[str, str, str]) -> None:
    """One TLS handshake on loopback, both ends verifying (as Redis with tls-auth-clients
    and the bundle's clients do); raises ssl.SSLError when either end refuses."""
    import socket
    import threading

    def context(purpose: ssl.Purpose, files: tuple[str, str, str]) -> ssl.SSLContext:
        ctx = ssl.create_default_context(purpose, cafile=files[0])
        ctx.load_cert_chain(files[1], files[2])
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    server_ctx = context(ssl.Purpose.CLIENT_AUTH, server)
    client_ctx = context(ssl.Purpose.SERVER_AUTH, client)
    listener = socket.create_server(("127.0.0.1", 0))
    errors: list[Exception] = []

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with (
            socket.create_connection(listener.getsockname()) as raw,
            client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            assert tls.recv(2) == b"ok"
    finally:
        thread.join(5)
        listener.close()
    if errors:
        raise errors[0]


def test_a_bundle_of_two_cas_of_the_same_name_lets_either_side_rotate(tmp_path: Path) -> None:
    """The CA rotation's overlap (rotate_ca.yml): a bundle of old and new CA verifies a
    certificate of either, even when both CAs have the same subject (OpenSSL picks the issuer
    by its key identifier); the new CA alone refuses a certificate of the old one."""
    old, new = make_ca(tmp_path, "old"), make_ca(tmp_path, "new")
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(old[0].read_bytes() + new[0].read_bytes())

    def leaf(ca: tuple[Path, Path], name: str) -> tuple[str, str]:
        d = tmp_path / name
        d.mkdir()
        run(
            "cert", "--ca-cert", str(ca[0]), "--ca-key", str(ca[1]),
            "--cert", str(d / "c.crt"), "--key", str(d / "c.key"), "--name", name,
            "--usage", "server", "--usage", "client", "--san", "IP:127.0.0.1",
            "--days", "30", "--renew-days", "5",
        )  # fmt: skip
        return str(d / "c.crt"), str(d / "c.key")

    old_leaf, new_leaf = leaf(old, "old-leaf"), leaf(new, "new-leaf")
    trust_old, trust_both, trust_new = str(old[0]), str(bundle), str(new[0])
    # Every pairing of the overlap: old and new leaves, each end trusting old, both or new as
    # the steps reach it (step 1: old -> both; step 2: old leaf -> new leaf; step 4: new).
    for server_trust, client_trust in ((trust_old, trust_both), (trust_both, trust_both)):
        handshake((server_trust, *old_leaf), (client_trust, *old_leaf))
    for s_leaf, c_leaf in ((old_leaf, new_leaf), (new_leaf, old_leaf), (new_leaf, new_leaf)):
        handshake((trust_both, *s_leaf), (trust_both, *c_leaf))
    handshake((trust_new, *new_leaf), (trust_both, *new_leaf))
    handshake((trust_new, *new_leaf), (trust_new, *new_leaf))
    # The end state refuses the old CA from both sides: the test can fail.
    with pytest.raises(ssl.SSLError):
        handshake((trust_new, *new_leaf), (trust_new, *old_leaf))  # old client certificate
    with pytest.raises(ssl.SSLError):
        handshake((trust_new, *old_leaf), (trust_new, *new_leaf))  # old server certificate
