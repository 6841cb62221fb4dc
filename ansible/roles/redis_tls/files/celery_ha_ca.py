#!/usr/bin/env python3
"""The controller-side certificate authority of a celery-ha cluster.

Run by the redis_tls role on the controller with Ansible's own Python (ansible-core depends on
`cryptography`, so nothing extra is installed). Every sub-command is idempotent and prints one
JSON object, {"changed": bool, "reason": ...}: a second run that finds everything in order
changes nothing, which keeps site.yml's re-runs at changed=0.

  ca   --cert C --key K --name CN --days N [--check]
       Create a self-signed CA (C, K) unless both files exist. Never replaces an existing CA:
       every certificate of the cluster depends on it.
  cert --ca-cert C --ca-key K --cert P --key P --name CN --usage server|client [--usage ...]
       [--san IP:addr|DNS:name ...] --days N --renew-days N [--force] [--check]
       Issue (or re-issue) a certificate signed by the CA when it is missing, does not match its
       key, was not signed by this CA, lacks a wanted name or usage, or expires within
       --renew-days. --force re-issues regardless (rotation on demand). Keys are written 0600;
       a key is kept when it is still usable, so re-issuing only changes the certificate.

  promote --cert C --key K --next-cert N --next-key NK [--check]
       The last step of a CA rotation: the next CA (N, NK) becomes the CA (C, K), and the old
       one is kept beside it as C/K with a ".retired-<UTC time>" suffix (it is no longer
       trusted anywhere, but a file an operator may want to look at). Nothing to do, and no
       change, when N and NK are gone already: a run stopped after it is simply run again.

--check reports what would change without writing anything (Ansible's check mode).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import sys
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

USAGES = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}
# Certificates are back-dated a little so a host whose clock lags the controller's does not
# reject a certificate issued a moment ago as "not yet valid".
BACKDATE = dt.timedelta(hours=1)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def write_private(path: Path, data: bytes) -> None:
    """Write atomically with mode 0600 from the start (never world-readable, not even briefly)."""
    path.parent.mkdir(parents=True, mode=0o700, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key(path: Path):
    return serialization.load_pem_private_key(path.read_bytes(), password=None)


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def parse_san(value: str) -> x509.GeneralName:
    kind, sep, name = value.partition(":")
    if not sep or not name:
        raise SystemExit(f"--san {value!r}: expected IP:address or DNS:name")
    if kind == "IP":
        return x509.IPAddress(ipaddress.ip_address(name))
    if kind == "DNS":
        return x509.DNSName(name)
    raise SystemExit(f"--san {value!r}: expected IP:address or DNS:name")


def cmd_ca(args: argparse.Namespace) -> dict:
    cert_path, key_path = Path(args.cert), Path(args.key)
    if cert_path.exists() and key_path.exists():
        cert, key = load_cert(cert_path), load_key(key_path)
        if cert.public_key().public_numbers() != key.public_key().public_numbers():
            raise SystemExit(f"{cert_path} and {key_path} are not a pair")
        return {
            "changed": False,
            "reason": "present",
            "not_after": cert.not_valid_after_utc.isoformat(),
        }
    if cert_path.exists() or key_path.exists():
        raise SystemExit(f"only one of {cert_path} and {key_path} exists: restore the other")
    if args.check:
        return {"changed": True, "reason": "missing"}
    key = new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, args.name)])
    start = now() - BACKDATE
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=args.days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(key_path, key_pem(key))
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    cert_path.chmod(0o644)
    return {"changed": True, "reason": "created", "not_after": cert.not_valid_after_utc.isoformat()}


def extension_values(cert: x509.Certificate, kind: type) -> set:
    """The entries of a list-like extension (names, usages); empty when it is absent."""
    try:
        return set(cert.extensions.get_extension_for_class(kind).value)
    except x509.ExtensionNotFound:
        return set()


def cert_problem(
    args: argparse.Namespace, ca: x509.Certificate, sans: set, usages: set
) -> str | None:
    """Why the existing certificate must be re-issued, or None when it is fine."""
    cert_path, key_path = Path(args.cert), Path(args.key)
    if args.force:
        return "rotation requested"
    if not cert_path.exists() or not key_path.exists():
        return "missing"
    cert = load_cert(cert_path)
    if cert.public_key().public_numbers() != load_key(key_path).public_key().public_numbers():
        return "certificate does not match its key"
    if cert.issuer != ca.subject:
        return "issued by another CA"
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return "not signed by this CA"
    if sans != extension_values(cert, x509.SubjectAlternativeName):
        return "names changed"
    if usages != extension_values(cert, x509.ExtendedKeyUsage):
        return "usage changed"
    if cert.not_valid_after_utc - now() < dt.timedelta(days=args.renew_days):
        return f"expires {cert.not_valid_after_utc:%Y-%m-%d}, within {args.renew_days} days"
    return None


def cmd_cert(args: argparse.Namespace) -> dict:
    ca = load_cert(Path(args.ca_cert))
    sans = {parse_san(value) for value in args.san}
    usages = {USAGES[usage] for usage in args.usage}
    problem = cert_problem(args, ca, sans, usages)
    if problem is None:
        return {"changed": False, "reason": "valid"}
    if args.check:
        return {"changed": True, "reason": problem}
    key_path = Path(args.key)
    key = None
    if key_path.exists() and problem not in ("missing", "certificate does not match its key"):
        key = load_key(key_path)
    if key is None:
        key = new_key()
        write_private(key_path, key_pem(key))
    ca_key = load_key(Path(args.ca_key))
    start = now() - BACKDATE
    # A certificate never outlives its CA: clients would reject it from that day on anyway.
    end = min(start + dt.timedelta(days=args.days), ca.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, args.name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=True,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(sorted(usages, key=lambda u: u.dotted_string)), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(sorted(sans, key=str)), critical=False
        )
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path = Path(args.cert)
    write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    cert_path.chmod(0o644)
    return {"changed": True, "reason": problem, "not_after": cert.not_valid_after_utc.isoformat()}


def pair(cert: Path, key: Path) -> bool:
    public = load_key(key).public_key().public_numbers()
    return load_cert(cert).public_key().public_numbers() == public


def cmd_promote(args: argparse.Namespace) -> dict:
    cert, key = Path(args.cert), Path(args.key)
    next_cert, next_key = Path(args.next_cert), Path(args.next_key)
    if not next_cert.exists():
        if next_key.exists():
            raise SystemExit(f"{next_key} exists without {next_cert}: restore it")
        return {"changed": False, "reason": "no next CA"}
    # The key moves first: a run killed right after it left the next certificate waiting
    # beside its key, already promoted; only the certificate is left to move.
    half_done = not next_key.exists() and key.exists() and pair(next_cert, key)
    if not next_key.exists() and not half_done:
        raise SystemExit(f"{next_cert} exists without {next_key}: restore it")
    if not half_done and not pair(next_cert, next_key):
        raise SystemExit(f"{next_cert} and {next_key} are not a pair")
    if args.check:
        return {"changed": True, "reason": "promote"}
    suffix = f".retired-{now():%Y%m%dT%H%M%SZ}"
    moves = [(cert, next_cert)] if half_done else [(key, next_key), (cert, next_cert)]
    for current, following in moves:
        if current.exists():
            os.replace(current, current.with_name(current.name + suffix))
        os.replace(following, current)
    not_after = load_cert(cert).not_valid_after_utc.isoformat()
    return {"changed": True, "reason": "promoted", "not_after": not_after}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ca = sub.add_parser("ca")
    ca.add_argument("--cert", required=True)
    ca.add_argument("--key", required=True)
    ca.add_argument("--name", required=True)
    ca.add_argument("--days", type=int, required=True)
    ca.add_argument("--check", action="store_true")
    cert = sub.add_parser("cert")
    cert.add_argument("--ca-cert", required=True)
    cert.add_argument("--ca-key", required=True)
    cert.add_argument("--cert", required=True)
    cert.add_argument("--key", required=True)
    cert.add_argument("--name", required=True)
    cert.add_argument("--usage", action="append", choices=sorted(USAGES), required=True)
    cert.add_argument("--san", action="append", default=[])
    cert.add_argument("--days", type=int, required=True)
    cert.add_argument("--renew-days", type=int, required=True)
    cert.add_argument("--force", action="store_true")
    cert.add_argument("--check", action="store_true")
    promote = sub.add_parser("promote")
    promote.add_argument("--cert", required=True)
    promote.add_argument("--key", required=True)
    promote.add_argument("--next-cert", required=True)
    promote.add_argument("--next-key", required=True)
    promote.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    result = {"ca": cmd_ca, "cert": cmd_cert, "promote": cmd_promote}[args.command](args)
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
