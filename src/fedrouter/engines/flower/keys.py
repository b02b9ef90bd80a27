"""Keys for a secure Flower deployment: a self-signed CA, the SuperLink's TLS certificate, SuperNode keys.

- `ca.crt` (give it to every SuperNode and to `flwr run`: `--root-certificates`, `root-certificates`),
  `ca.key` (keep it private: it signs certificates);
- `server.pem` / `server.key`: the SuperLink's certificate for the given host names and IP addresses
  (`--ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key`);
- `supernode-<i>` / `supernode-<i>.pub`: one EC (P-384) key pair per SuperNode in OpenSSH format, for
  Flower's SuperNode authentication (SuperLink `--enable-supernode-auth`; register each public key with
  `flwr supernode register supernode-<i>.pub <connection>`; start the node with
  `--auth-supernode-private-key supernode-<i>`).

A self-signed CA is for a test federation or a closed network; a real deployment uses certificates
from the organisation's CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import shutil
from pathlib import Path

from fedrouter.atomic import write_bytes
from fedrouter.errors import FedrouterError


def _write(path: Path, data: bytes, private: bool = False) -> None:
    # A private key is readable by its owner only from its first byte (created with mode 0600).
    write_bytes(path, data, mode=0o600 if private else 0o644)


def _san(hosts: list[str]):
    from cryptography import x509  # optional extra: flower (cryptography comes with it)

    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def host_name(host: str) -> str:
    """`host` as a certificate names it: an IP address as given, a DNS name in its ASCII form (IDNA:
    'bücher.example' -> 'xn--bcher-kva.example'); FedrouterError for anything that cannot be a host name
    ('a b', '../x', an empty or over-long label)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        name = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise FedrouterError(f"--hosts: {host!r} is not a host name or IP address") from None
    labels = name.removesuffix(".").split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise FedrouterError(f"--hosts: {host!r} is not a host name or IP address (letters, digits and '-' in dot-separated "
                             "labels of 1 to 63 characters)")
    return ".".join(labels)


def make_keys(out: Path, hosts: list[str], supernodes: int, days: int = 365) -> list[Path]:
    """Write the CA, the SuperLink certificate for `hosts` and `supernodes` SuperNode key pairs into `out`."""
    if not hosts:
        raise FedrouterError("give at least one host name or IP address for the SuperLink certificate")
    hosts = [host_name(h) for h in hosts]  # checked before anything is written
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= 36500:
        raise FedrouterError(f"--days must be a whole number of days from 1 to 36500, got {days!r}")
    if isinstance(supernodes, bool) or not isinstance(supernodes, int) or not 0 <= supernodes <= 10000:
        raise FedrouterError(f"--supernodes must be 0 to 10000, got {supernodes!r}")
    if out.exists() and not out.is_dir():
        raise FedrouterError(f"{out} is a file, not a folder for the keys")
    existing = [p.name for p in (out / "ca.crt", out / "server.pem") if p.exists()]
    if existing:
        raise FedrouterError(f"{out} already holds {', '.join(existing)}; choose an empty folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        return _make(out, hosts, supernodes, days)
    except BaseException as exc:
        if created:  # a folder this call made holds nothing useful after a failure
            shutil.rmtree(out, ignore_errors=True)
        if isinstance(exc, OSError):
            raise FedrouterError(f"cannot write the keys in {out}: {exc.strerror or exc}") from None
        raise


def _make(out: Path, hosts: list[str], supernodes: int, days: int) -> list[Path]:
    from cryptography import x509  # optional extra: flower (cryptography comes with it)
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.timezone.utc)
    pem = serialization.Encoding.PEM

    def private_pem(key) -> bytes:
        return key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedrouter federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    server_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
              .add_extension(_san(hosts), critical=False)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .sign(ca_key, hashes.SHA256()))

    written = []
    for name, data, private in [("ca.key", private_pem(ca_key), True), ("ca.crt", ca.public_bytes(pem), False),
                                ("server.key", private_pem(server_key), True), ("server.pem", server.public_bytes(pem), False)]:
        _write(out / name, data, private)
        written.append(out / name)
    for i in range(supernodes):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(pem, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(out / f"supernode-{i}", private, True)
        _write(out / f"supernode-{i}.pub", public + f" supernode-{i}\n".encode())
        written += [out / f"supernode-{i}", out / f"supernode-{i}.pub"]
    return written
