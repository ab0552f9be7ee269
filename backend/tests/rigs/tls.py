"""Test certificates (openssl CLI) and a PostgreSQL server that accepts TCP only over TLS."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from backend.tests.rigs.cluster import (
    SERVER_USER,
    Cluster,
    RigError,
    chown,
    format_url,
    ipv6_loopback,
    postgres_bindir,
    postgres_has_ssl,
    rig_dir,
)

# The server certificate names only this host: verify-full to 127.0.0.1 must fail.
SERVER_NAME = "localhost"
DAYS = "2"

OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:{server_name}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""


@dataclass(frozen=True)
class Certificates:
    """PEM files for one TLS setup; ``cert_user`` is the client certificate's CN (a role name)."""

    directory: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_cert: Path
    cert_user: str
    server_name: str = SERVER_NAME


def openssl_bin() -> str:
    """Path of the openssl CLI."""
    found = shutil.which("openssl")
    if found is None:
        raise RigError("the openssl CLI is not installed")
    return found


def _openssl(*args: str | Path, cwd: Path) -> None:
    result = subprocess.run(
        [openssl_bin(), *map(str, args)], cwd=cwd, capture_output=True, text=True, check=False, timeout=60
    )
    if result.returncode != 0:
        raise RigError(f"openssl {' '.join(map(str, args))} failed:\n{result.stdout}{result.stderr}")


def _key_args(key: Path) -> list[str | Path]:
    # EC keys: generating them is instant, unlike RSA.
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key]


def _make_ca(d: Path, config: Path, name: str) -> tuple[Path, Path]:
    cert, key = d / f"{name}.crt", d / f"{name}.key"
    _openssl("req", "-x509", *_key_args(key), "-out", cert, "-days", DAYS, "-subj", f"/CN=kraken rig {name}",
             "-config", config, "-extensions", "ca", cwd=d)  # fmt: skip
    return cert, key


def _make_leaf(d: Path, config: Path, name: str, cn: str, section: str, ca: tuple[Path, Path]) -> tuple[Path, Path]:
    cert, key, csr = d / f"{name}.crt", d / f"{name}.key", d / f"{name}.csr"
    _openssl("req", "-new", *_key_args(key), "-out", csr, "-subj", f"/CN={cn}", "-config", config, cwd=d)
    _openssl("x509", "-req", "-in", csr, "-CA", ca[0], "-CAkey", ca[1], "-set_serial", str(secrets.randbits(63)),
             "-out", cert, "-days", DAYS, "-extfile", config, "-extensions", section, cwd=d)  # fmt: skip
    csr.unlink()
    return cert, key


def make_certificates(
    directory: Path,
    *,
    cert_user: str = "kraken_cert",
    server_name: str = SERVER_NAME,
    server_user: str | None = SERVER_USER,
) -> Certificates:
    """A CA, a server certificate (SAN ``DNS:<server_name>`` only), a client certificate with
    CN ``cert_user``, and an unrelated second CA, all under ``directory``.

    The server key is ``server_user``'s with mode 0600 (PostgreSQL insists); the client key stays
    the caller's, also 0600.
    """
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    config = directory / "openssl.cnf"
    config.write_text(OPENSSL_CONFIG.format(server_name=server_name))
    ca = _make_ca(directory, config, "ca")
    other_ca_cert, _ = _make_ca(directory, config, "other-ca")
    server_cert, server_key = _make_leaf(directory, config, "server", server_name, "server", ca)
    client_cert, client_key = _make_leaf(directory, config, "client", cert_user, "client", ca)
    for pem in directory.glob("*.crt"):
        pem.chmod(0o644)
    for key in directory.glob("*.key"):
        key.chmod(0o600)
    chown(server_key, server_user)
    return Certificates(
        directory=directory,
        ca_cert=ca[0],
        server_cert=server_cert,
        server_key=server_key,
        client_cert=client_cert,
        client_key=client_key,
        other_ca_cert=other_ca_cert,
        cert_user=cert_user,
        server_name=server_name,
    )


@dataclass(frozen=True)
class TlsServer:
    """A running TLS-only cluster and what clients need to reach it."""

    cluster: Cluster
    certs: Certificates
    password_user: str
    password: str

    @property
    def port(self) -> int:
        return self.cluster.port

    def url(
        self,
        sslmode: str = "verify-full",
        *,
        user: str = "postgres",
        database: str = "postgres",
        host: str = SERVER_NAME,
        password: str | None = None,
        client_cert: bool = False,
        root_cert: Path | None = None,
        **query: str | Path,
    ) -> str:
        """libpq URL with ``sslmode``; the right CA unless ``root_cert`` says otherwise, and the
        client certificate and key when ``client_cert``."""
        if sslmode in ("verify-ca", "verify-full"):
            query["sslrootcert"] = root_cert or self.certs.ca_cert
        if client_cert:
            query["sslcert"] = self.certs.client_cert
            query["sslkey"] = self.certs.client_key
        return format_url(
            [(host, self.port)], user=user, database=database, password=password, query={"sslmode": sslmode, **query}
        )


def tls_hba(cert_user: str, password_user: str, addresses: tuple[str, ...]) -> list[str]:
    """pg_hba.conf lines: the Unix socket for admin, and TCP only as ``hostssl``."""
    lines = ["local all all trust"]
    for address in addresses:
        cidr = f"{address}/128" if ":" in address else f"{address}/32"
        lines += [
            f"hostssl all {cert_user} {cidr} cert",
            f"hostssl all {password_user} {cidr} scram-sha-256",
            f"hostssl all all {cidr} trust",
        ]
    return lines


@contextmanager
def tls_cluster(
    *,
    cert_user: str = "kraken_cert",
    password_user: str = "kraken_password",
    password: str | None = None,
    directory: Path | None = None,
) -> Iterator[TlsServer]:
    """A started cluster that takes TCP clients over TLS only (no ``host`` lines), listening on
    127.0.0.1 and, when the machine has it, ::1; stopped (temporary directory removed) on exit.

    Roles: ``postgres`` (trust over TLS), ``cert_user`` (client certificate auth) and
    ``password_user`` (SCRAM with ``password``).
    """
    if not postgres_has_ssl():
        raise RigError(f"the PostgreSQL server in {postgres_bindir()} was built without SSL support")
    password = password or secrets.token_urlsafe(16)
    with rig_dir("kraken-tls-") if directory is None else nullcontext(directory) as base:
        certs = make_certificates(base / "certs", cert_user=cert_user)
        addresses = ("127.0.0.1", "::1") if ipv6_loopback() else ("127.0.0.1",)
        cluster = Cluster(base / "tls", listen=addresses)
        try:
            settings = {
                "ssl": "on",
                "ssl_cert_file": str(certs.server_cert),
                "ssl_key_file": str(certs.server_key),
                "ssl_ca_file": str(certs.ca_cert),
                "password_encryption": "scram-sha-256",
            }
            cluster.init(settings, tls_hba(cert_user, password_user, addresses))
            cluster.start()
            cluster.execute_sync(f'CREATE ROLE "{cert_user}" LOGIN')
            quoted = password.replace("'", "''")
            cluster.execute_sync(f"CREATE ROLE \"{password_user}\" LOGIN PASSWORD '{quoted}'")
            yield TlsServer(cluster=cluster, certs=certs, password_user=password_user, password=password)
        finally:
            cluster.ensure_stopped()
