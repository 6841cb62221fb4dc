"""tests/support/secret_search.py finds a secret wherever it shows up, and names it without
printing it."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import secret_search


def _private_key_pem() -> str:
    """A throwaway key made for the test run, so the repository holds no private key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return (
        ec.generate_private_key(ec.SECP256R1())
        .private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        .decode()
    )


KEY = _private_key_pem()
# One line of the key body, as a diff would show it.
KEY_LINE = KEY.splitlines()[2]


@pytest.fixture
def secrets(tmp_path: Path) -> Path:
    tmp_path = tmp_path / "secrets"
    tmp_path.mkdir()
    (tmp_path / "redis_admin_password").write_text("Zq8wLx3vNp5TbR2m")
    (tmp_path / "flower_basic_auth_salt").write_text("s4ltS4ltS4lt1234 salt=abc\n")
    (tmp_path / "tls").mkdir()
    (tmp_path / "tls" / "ca.key").write_text(KEY)
    (tmp_path / "tls" / "ca.crt").write_text("-----BEGIN CERTIFICATE-----\nMIIBpublic\n")
    return tmp_path


def test_clean_log_passes(secrets: Path, tmp_path: Path, capsys) -> None:
    log = tmp_path / "run.log"
    log.write_text("TASK [redis : Apply Redis runtime settings]\nok: [node1]\n")
    assert secret_search.main(["x", str(log), str(secrets)]) == 0


@pytest.mark.parametrize(
    ("leak", "name"),
    [
        ("'stdin': '{\"password\": \"Zq8wLx3vNp5TbR2m\"}'", "redis_admin_password"),
        ("FLOWER_SALT=s4ltS4ltS4lt1234", "flower_basic_auth_salt"),
        ("+" + KEY_LINE, "tls/ca.key"),
    ],
)
def test_a_leak_is_named_not_printed(
    secrets: Path, tmp_path: Path, capsys, leak: str, name: str
) -> None:
    log = tmp_path / "run.log"
    log.write_text(f"ok: [node1] => {leak}\n")
    assert secret_search.main(["x", str(log), str(secrets)]) == 1
    err = capsys.readouterr().err
    assert name in err
    assert "Zq8wLx3vNp5TbR2m" not in err
    assert KEY_LINE not in err


def test_certificates_are_not_secrets(secrets: Path) -> None:
    assert "tls/ca.crt" not in secret_search.needles(secrets)


def test_empty_secrets_dir_proves_nothing(tmp_path: Path) -> None:
    log = tmp_path / "run.log"
    log.write_text("")
    (tmp_path / "s").mkdir()
    assert secret_search.main(["x", str(log), str(tmp_path / "s")]) == 2
