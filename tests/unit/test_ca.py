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
