"""The device's own TLS certificate: self-signed, made once on the device, pinned by clients.

No CA will ever vouch for an offline appliance on a private LAN, so a client trusts exactly
this certificate (it has the file, or compares its SHA-256 fingerprint). The key never leaves
`identity/`; the certificate is public.

    identity/tls.key    ECDSA P-256, PEM, 0640 (group `appliance`: the service runs unprivileged)
    identity/tls.crt    X.509, PEM, 0644
"""

from __future__ import annotations

import datetime as dt
import grp
import ipaddress
import os
import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.errors import StoreError
from appliance.fsutil import atomic_write

KEY = "tls.key"
CERT = "tls.crt"
GROUP = "appliance"
# Past any device's life: an expired pin would cut every client off an offline appliance.
NOT_AFTER = dt.datetime(2100, 1, 1, tzinfo=dt.UTC)


def ensure(identity: Path, names: list[str]) -> bool:
    """Make `tls.key` and `tls.crt` under `identity` if they are absent; True if it made any.
    `names` are the host names (or addresses) clients use; the first is the subject's CN."""
    key_path, cert_path = identity / KEY, identity / CERT
    if key_path.exists() and cert_path.exists():
        return False
    identity.mkdir(parents=True, exist_ok=True)
    if key_path.exists():  # a crash between the two writes: keep the key, certify it
        key = _read_key(key_path)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        # the key first: a certificate on disk always has its key
        atomic_write(key_path, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()), mode=0o640)
    _give_to_service(key_path)
    atomic_write(cert_path, _certificate(key, names).public_bytes(serialization.Encoding.PEM),
                 mode=0o644)
    return True


def load(identity: Path) -> tuple[Path, Path]:
    """(certificate, key) paths, checked to be a pair; StoreError otherwise."""
    key_path, cert_path = identity / KEY, identity / CERT
    cert = _read_cert(cert_path)
    key = _read_key(key_path)
    raw = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*raw) != key.public_key().public_bytes(*raw):
        raise StoreError(f"{cert_path} does not match the key {key_path}",
                         hint="remove both and run `appliance-ctl init` as root to make new ones")
    return cert_path, key_path


def server_context(identity: Path) -> ssl.SSLContext:
    """The listener's TLS context: the device certificate, TLS 1.2 at least."""
    cert, key = load(identity)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise StoreError(f"cannot load the TLS certificate {cert}: {exc}") from None
    return ctx


def fingerprint(cert: Path) -> str:
    """SHA-256 of the DER certificate as `AB:CD:...`, as `openssl x509 -fingerprint -sha256`
    prints it: what a person compares on the console."""
    digest = _read_cert(cert).fingerprint(hashes.SHA256())
    return ":".join(f"{b:02X}" for b in digest)


def _certificate(key: ec.EllipticCurvePrivateKey, names: list[str]) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (names or ["localhost"])[0])])
    alt: list[x509.GeneralName] = []
    for name in [*names, "localhost", "127.0.0.1", "::1"]:
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            entry = x509.DNSName(name)
        if entry not in alt:
            alt.append(entry)
    public = key.public_key()
    now = dt.datetime.now(dt.UTC)
    # CA=false with key identifiers and explicit usages: what strict X.509 verification
    # (Python 3.13's default, VERIFY_X509_STRICT) asks of a pinned leaf certificate
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))  # a device clock slightly behind
            .not_valid_after(NOT_AFTER)
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public),
                           critical=False)
            .sign(key, hashes.SHA256()))


def _give_to_service(path: Path) -> None:
    """Let the unprivileged service read the key: group `appliance`, when root makes it."""
    if os.geteuid() != 0:
        return
    try:
        gid = grp.getgrnam(GROUP).gr_gid
    except KeyError:
        return
    os.chown(path, 0, gid)


def _read_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise StoreError(f"cannot read the TLS certificate {path}: {exc.strerror}") from None
    except ValueError:
        raise StoreError(f"{path} is not a PEM certificate") from None


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise StoreError(f"cannot read the TLS key {path}: {exc.strerror}") from None
    except (ValueError, TypeError):
        raise StoreError(f"{path} is not an unencrypted PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise StoreError(f"{path} is not an ECDSA key")
    return key
