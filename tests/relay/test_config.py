"""The relay config's credentials and body settings (cloister.relay.config)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, x25519
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from cloister.relay.config import ConfigError, load_relay_config

BASE = '[relay]\nenclave = "unix:/x"\n'


def write(tmp: Path, extra: str, files: dict[str, str | bytes] | None = None) -> Path:
    for name, content in (files or {}).items():
        (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    path = tmp / "relay.toml"
    path.write_text(BASE + extra)
    return path


def pem(key: x25519.X25519PrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)


def test_defaults_are_closed(tmp_path: Path) -> None:
    c = load_relay_config(write(tmp_path, ""))
    assert c.admin_token is None and c.auditor_token is None  # both endpoints disabled
    assert c.body_public_key is None and c.keep_denied_arguments is False


def test_tokens_keys_and_retention_load(tmp_path: Path) -> None:
    key = x25519.X25519PrivateKey.generate()
    c = load_relay_config(
        write(
            tmp_path,
            'admin_token_file = "a"\nauditor_token_file = "b"\nbody_encryption_public_key = "k.pub"\n'
            "keep_denied_arguments = true\n",
            {"a": "admin-secret-0123456789\n", "b": "auditor-secret-0123456789\n", "k.pub": pem(key)},
        )
    )
    assert (c.admin_token, c.auditor_token, c.keep_denied_arguments) == (
        "admin-secret-0123456789",
        "auditor-secret-0123456789",
        True,
    )
    assert c.body_public_key is not None and c.body_public_key.public_bytes_raw() == key.public_key().public_bytes_raw()


@pytest.mark.parametrize(
    ("extra", "files", "message"),
    [
        (
            'admin_token_file = "a"\nauditor_token_file = "b"\n',
            {"a": "same-secret-0123456789", "b": "same-secret-0123456789\n"},
            "hold the same token",
        ),
        ('auditor_token_file = "b"\n', {"b": "short"}, "at least 16 printable characters"),
        ('auditor_token_file = "b"\n', {"b": "has a space 0123456789"}, "without spaces"),
        ('auditor_token_file = "missing"\n', {}, "auditor_token_file: cannot read missing"),
        ('body_encryption_public_key = "k.pub"\n', {"k.pub": "not a key"}, "not a PEM public key"),
        (
            'body_encryption_public_key = "k.pub"\n',
            {"k.pub": pem(ed25519.Ed25519PrivateKey.generate())},
            "not an X25519 public key",
        ),
        ('keep_denied_arguments = "yes"\n', {}, "'keep_denied_arguments' has the wrong type"),
        (
            '[[upstreams]]\nname = "u"\nurl = "http://x/mcp"\nreproof_min_interval_s = 0\n',
            {},
            "reproof_min_interval_s must be in [1, 3600]",
        ),
    ],
)
def test_unusable_settings_are_refused_at_start(
    tmp_path: Path, extra: str, files: dict[str, str | bytes], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_relay_config(write(tmp_path, extra, files))
