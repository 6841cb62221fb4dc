#!/usr/bin/env python3
"""Search a log (e.g. an `ansible-playbook -vvv` run) for the cluster's secrets.

    tests/support/secret_search.py LOG SECRETS_DIR

Every file in SECRETS_DIR is a secret: the generated passwords (first word of the file, as
Ansible's password lookup writes them) and, under tls/, the private keys (each line of a PEM
body is searched, so a key that was printed re-wrapped or in part is found too). Prints the
NAMES of the secrets found, never their values, and exits 1 if any was found.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Shorter pieces of a PEM body could match by chance in a long log.
MIN_PIECE = 24


def needles(secrets_dir: Path) -> dict[str, list[str]]:
    """Secret name (path under secrets_dir) -> the strings that must not appear."""
    found: dict[str, list[str]] = {}
    for path in sorted(p for p in secrets_dir.rglob("*") if p.is_file()):
        name = str(path.relative_to(secrets_dir))
        text = path.read_text(errors="replace")
        if "-----BEGIN" in text:
            if "PRIVATE KEY" not in text:
                continue  # certificates are public
            pieces = [
                line.strip()
                for line in text.splitlines()
                if line.strip() and not line.startswith("-----") and len(line.strip()) >= MIN_PIECE
            ]
        else:
            words = text.split()
            pieces = [words[0]] if words else []
        if pieces:
            found[name] = pieces
    return found


def search(log_text: str, secrets_dir: Path) -> list[str]:
    """Names of the secrets of secrets_dir that occur in log_text."""
    return [
        name for name, pieces in needles(secrets_dir).items() if any(p in log_text for p in pieces)
    ]


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    log, secrets_dir = Path(argv[1]), Path(argv[2])
    text = log.read_text(errors="replace")
    watched = needles(secrets_dir)
    if not watched:
        print(f"secret search: no secrets in {secrets_dir}: nothing to prove", file=sys.stderr)
        return 2
    leaked = search(text, secrets_dir)
    if leaked:
        print(f"secret search: FAILED, {log} shows: {', '.join(leaked)}", file=sys.stderr)
        return 1
    print(f"secret search: OK, none of {len(watched)} secrets in {log} ({len(text)} characters)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
