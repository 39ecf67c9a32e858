"""deploy/nginx/cloister.conf passes `nginx -t`, with a throwaway certificate.

Runs when an nginx binary is available (on PATH, or `CLOISTER_NGINX=/path/to/nginx`); skipped
otherwise, saying so. The site is wrapped in a minimal main configuration whose paths all live
in the test's directory.
"""

from __future__ import annotations

import datetime
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "deploy" / "nginx" / "cloister.conf"


def nginx() -> str:
    exe = os.environ.get("CLOISTER_NGINX") or shutil.which("nginx")
    if not exe:
        pytest.skip("nginx is not installed (set CLOISTER_NGINX to an nginx binary to run this)")
    return exe


def certificate(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cloister.example.com")])
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "fullchain.pem", tmp / "privkey.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def check(tmp: Path, site: str) -> subprocess.CompletedProcess[str]:
    exe = nginx()
    cert, key = certificate(tmp)
    site = site.replace("@PUBLIC_HOST@", "cloister.example.com")
    site = site.replace("/etc/cloister/tls/fullchain.pem", str(cert)).replace("/etc/cloister/tls/privkey.pem", str(key))
    (tmp / "cloister.conf").write_text(site)
    temp = " ".join(f"{name}_temp_path {tmp}/{name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (tmp / "nginx.conf").write_text(
        f"pid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  {temp}\n  include {tmp}/cloister.conf;\n}}\n"
    )
    return subprocess.run(
        [exe, "-t", "-p", str(tmp), "-c", str(tmp / "nginx.conf")], capture_output=True, text=True, timeout=60
    )


def test_site_passes_nginx_t(tmp_path: Path) -> None:
    r = check(tmp_path, SITE.read_text())
    assert r.returncode == 0 and "test is successful" in r.stderr, r.stderr


def test_nginx_t_catches_a_broken_site(tmp_path: Path) -> None:
    r = check(tmp_path, SITE.read_text().replace("proxy_buffering off;", "proxy_buffering sometimes;"))
    assert r.returncode != 0 and "proxy_buffering" in r.stderr, r.stderr
