"""Identity and access on a real broker: the fleet's CA, the broker's TLS certificate,
one login per device and per server agent, and ACLs that confine each device to its own
topics. Everything lives in one directory that `edgeqtl broker --secure --dir DIR` serves
with mosquitto and `edgeqtl provision` adds logins to:

    DIR/settings.json        the names in the server certificate, the port, mTLS on or off
    DIR/ca.crt  ca.key       the fleet's CA (ca.key 0600: whoever holds it can mint logins
                             under mTLS)
    DIR/server.crt  .key     the broker's certificate, for the names devices use to reach it
    DIR/passwd               mosquitto's password file (PBKDF2-SHA512, its "$7$" format)
    DIR/acl                  mosquitto's ACL file, rewritten when a server agent is added
    DIR/mosquitto.conf       written at each start of the broker
    DIR/mosquitto.log        the broker's log (connections, refusals; never a password)
    DIR/devices/<id>/        what to copy to a device: edgeqtl-device.json (its login),
                             ca.crt, and with mTLS client.crt + client.key
    DIR/servers/<id>/        the same for a server agent (edgeqtl-server.json)

Each client's MQTT username is its id: the ACL's `pattern` lines use %u, so a device may
publish only its own requests and read only its own replies. Under mTLS the username is
the client certificate's common name (mosquitto's use_identity_as_username) and no
password is used.

Torch-free; `cryptography` is imported only where certificates are made.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import tempfile
from pathlib import Path

from .errors import EdgeqtlError
from .transport import BrokerConfig, reply_topic, request_topic, server_request_topic
from .wire import MAX_DEVICE_ID

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
DEFAULT_PORT = 8883
CA_DAYS = 3650
CERT_DAYS = 730  # the broker's and the clients' certificates
DEVICE_FILE = "edgeqtl-device.json"
SERVER_FILE = "edgeqtl-server.json"
# mosquitto_passwd's default (PW_DEFAULT_ITERATIONS in mosquitto 2.0). Enough here: the
# passwords are 192 random bits, so no number of iterations is what stops a guess.
PBKDF2_ITERATIONS = 101
PBKDF2_SALT_BYTES = 12  # mosquitto refuses a "$7$" line whose salt is not 12 bytes


class SecurityError(EdgeqtlError):
    """A secure-broker directory that cannot be used as asked; the message says the fix."""


class InvalidId(SecurityError, ValueError):
    """A device or server id that cannot be an MQTT username and a topic segment."""


# --------------------------------------------------------------------------- ids


def check_id(client_id: str, what: str = "device id") -> str:
    """The id itself, when it can be a topic segment (no / + # $), a mosquitto username
    (no ':' of the password file, no blank or control character, which would end or
    split a line of the ACL file) and a folder name (not '.' or '..'); else InvalidId."""
    if not client_id:
        raise InvalidId(f"{what} is empty; give a name such as pi-7")
    size = len(client_id.encode("utf-8"))
    if size > MAX_DEVICE_ID:
        raise InvalidId(f"{what} {client_id[:20]!r}... is {size} bytes of UTF-8; at most {MAX_DEVICE_ID} fit a frame")
    bad = sorted({c for c in client_id if c in "/+#$:" or c.isspace() or not c.isprintable()})
    if bad:
        shown = " ".join(repr(c) for c in bad)
        raise InvalidId(f"{what} {client_id!r} contains {shown}; use letters, digits, '-', '_' and '.'")
    if client_id in (".", ".."):
        raise InvalidId(f"{what} {client_id!r} is not a usable name; use letters, digits, '-', '_' and '.'")
    return client_id


# --------------------------------------------------------------------------- passwords


def hash_password(password: str, iterations: int = PBKDF2_ITERATIONS, salt: bytes | None = None) -> str:
    """The hash as mosquitto_passwd writes it: $7$<iterations>$<salt b64>$<hash b64>
    (PBKDF2-HMAC-SHA512, a 12-byte salt, a 64-byte hash, standard base64 with padding).
    Made here rather than by `mosquitto_passwd -b`, which would put the password on a
    command line that every local user can read in the process list."""
    salt = secrets.token_bytes(PBKDF2_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """Whether `password` matches a "$7$" hash (ours or mosquitto_passwd's)."""
    try:
        _, kind, iterations, salt, digest = hashed.split("$")
        if kind != "7":
            return False
        expected = base64.b64decode(digest, validate=True)
        actual = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), base64.b64decode(salt, validate=True),
                                     int(iterations), len(expected))
    except ValueError:  # not five fields, not base64, not a number
        return False
    return hmac.compare_digest(actual, expected)


def set_password(passwd_file: Path, username: str, password: str) -> None:
    """Add `username` to a mosquitto password file, or replace its line; other lines stay."""
    lines = passwd_file.read_text().splitlines() if passwd_file.exists() else []
    kept = [line for line in lines if line.split(":", 1)[0] != username]
    _write_private(passwd_file, "\n".join([*kept, f"{username}:{hash_password(password)}"]) + "\n")


# --------------------------------------------------------------------------- ACLs


def acl_text(server_ids: list[str]) -> str:
    """mosquitto's ACL file: devices by pattern (%u = the username = the device id),
    each server agent by name. Anything not granted is denied."""
    lines = [
        "# Written by edgeqtl (edgeqtl/security.py); rewritten when a server agent is provisioned.",
        "# A client's MQTT username is its id. mosquitto reads this file at start and on SIGHUP.",
        "",
        "# A device publishes its own requests (to the shared topic, and the decode steps to the",
        "# server agent that holds its KV cache) and reads its own replies; nothing else.",
        f"pattern write {request_topic('%u')}",
        f"pattern write {server_request_topic('+', '%u')}",
        f"pattern read {reply_topic('%u')}",
    ]
    for server_id in server_ids:
        # mosquitto checks read access on the message's topic, also for the shared
        # subscription $share/<group>/edgeqtl/v1/req/+, so no $share line is needed.
        lines += ["", f"# server agent {server_id}: every request, its own decode steps, a reply to any device",
                  f"user {server_id}",
                  f"topic read {request_topic('+')}",
                  f"topic read {server_request_topic(server_id, '+')}",
                  f"topic write {reply_topic('+')}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- certificates


def _x509():
    try:
        from cryptography import x509
    except ImportError:
        raise SecurityError("making certificates needs the cryptography package: pip install cryptography") from None
    return x509


def _name(common_name: str):
    x509 = _x509()
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeqtl"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder, days: int):
    now = datetime.datetime.now(datetime.timezone.utc)
    # a few minutes back: a device whose clock runs slightly behind still accepts it
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    return builder.not_valid_before(start).not_valid_after(end)


def create_ca(common_name: str):
    """(certificate, private key) of a new CA: EC P-256, SHA-256, valid CA_DAYS."""
    x509 = _x509()
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    return _validity(builder, CA_DAYS).sign(key, hashes.SHA256()), key


def issue_certificate(ca_cert, ca_key, common_name: str, hosts: tuple[str, ...] = (), client: bool = False):
    """(certificate, private key) signed by the CA: a server certificate for `hosts`
    (its subject alternative names), or with client=True a client certificate whose
    common name is the client's id. EC P-256, SHA-256, valid CERT_DAYS."""
    x509 = _x509()
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                            content_commitment=False, key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False, decipher_only=False),
                              critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_alt_name(h) for h in hosts]), critical=False)
    return _validity(builder, CERT_DAYS).sign(ca_key, hashes.SHA256()), key


def _alt_name(host: str):
    x509 = _x509()
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def certificate_hosts(cert) -> list[str]:
    """The host names and IP addresses in a certificate's subject alternative names."""
    x509 = _x509()
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [*sans.get_values_for_type(x509.DNSName), *(str(ip) for ip in sans.get_values_for_type(x509.IPAddress))]


def certificate_pem(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def private_key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    # unencrypted: mosquitto and the agents start unattended, so the file's mode (0600) protects it
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


# --------------------------------------------------------------------------- files


def _write_private(path: Path, data: str | bytes) -> None:
    """Write a file only its owner can read (mode 0600 from the start), atomically: a
    broker reading it meanwhile sees the old file or the new one, never half of one."""
    data = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mkstemp makes it 0600
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_public(path: Path, data: str | bytes) -> None:
    _write_private(path, data)
    path.chmod(0o644)


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


@dataclasses.dataclass(frozen=True)
class Settings:
    hosts: tuple[str, ...]  # in the server certificate; the first one goes in the login files
    port: int
    mtls: bool


@dataclasses.dataclass(frozen=True)
class SecureBrokerDir:
    """The files of one secure broker (the layout in this module's docstring)."""

    root: Path

    settings_file = property(lambda self: self.root / "settings.json")
    ca_cert = property(lambda self: self.root / "ca.crt")
    ca_key = property(lambda self: self.root / "ca.key")
    server_cert = property(lambda self: self.root / "server.crt")
    server_key = property(lambda self: self.root / "server.key")
    passwd = property(lambda self: self.root / "passwd")
    acl = property(lambda self: self.root / "acl")
    config = property(lambda self: self.root / "mosquitto.conf")
    log = property(lambda self: self.root / "mosquitto.log")
    devices = property(lambda self: self.root / "devices")
    servers = property(lambda self: self.root / "servers")

    @property
    def settings(self) -> Settings:
        raw = json.loads(self.settings_file.read_text())
        return Settings(hosts=tuple(raw["hosts"]), port=int(raw["port"]), mtls=bool(raw["mtls"]))

    def server_ids(self) -> list[str]:
        return sorted(p.name for p in self.servers.iterdir() if p.is_dir()) if self.servers.is_dir() else []

    def write_acl(self) -> None:
        _write_public(self.acl, acl_text(self.server_ids()))


def open_secure_dir(directory: str | Path) -> SecureBrokerDir:
    """A directory made by init_secure_dir; SecurityError naming the fix otherwise."""
    layout = SecureBrokerDir(Path(directory))
    if not layout.settings_file.is_file():
        raise SecurityError(f"{directory} is not a secure broker directory (no settings.json); create it with "
                            f"`edgeqtl broker --secure --dir {directory}`")
    remake = f"run `edgeqtl broker --secure --dir {directory}` to make it again"
    needed = {layout.ca_cert: "restore it from a backup: every device trusts it",
              layout.server_cert: remake, layout.server_key: remake, layout.acl: remake}
    if not layout.settings.mtls:
        needed[layout.passwd] = ("restore it from a backup, or create it empty and give each client a new login "
                                 "(edgeqtl provision ID --replace)")
    for path, fix in needed.items():
        if not path.is_file():
            raise SecurityError(f"{path} is missing; {fix}")
    return layout


def init_secure_dir(directory: str | Path, hosts: tuple[str, ...] | list[str] | None = None, mtls: bool | None = None,
                    port: int = DEFAULT_PORT, ca_file: str | Path | None = None, ca_key: str | Path | None = None,
                    cert_file: str | Path | None = None, key_file: str | Path | None = None) -> SecureBrokerDir:
    """Create DIR on first use, or check an existing one against what is asked.

    hosts: the names and addresses devices use to reach the broker (default 127.0.0.1
    and localhost, which are always added); the first one goes in the login files.
    mtls: clients log in with certificates instead of passwords; None: as DIR was made
    (a new one: off).
    ca_file/ca_key/cert_file/key_file: your own CA and server certificate instead of new
    ones (first use only; mTLS needs the CA's key, to sign the clients' certificates).
    A missing server certificate is made again from the CA (renewal, or new names), and
    devices keep working: they trust the CA, not the certificate."""
    layout = SecureBrokerDir(Path(directory))
    wanted = tuple(dict.fromkeys([*(hosts or ()), *DEFAULT_HOSTS]))
    if layout.settings_file.is_file():
        return _check_secure_dir(layout, wanted if hosts else None, mtls,
                                 own_files=any(f is not None for f in (ca_file, ca_key, cert_file, key_file)))

    if ca_key is not None and ca_file is None:
        raise SecurityError("--ca-key needs --ca-file: the CA certificate it belongs to")
    if (cert_file is None) != (key_file is None):
        raise SecurityError("give the server certificate and its key together (--cert-file and --key-file)")
    if cert_file is not None and ca_file is None:
        raise SecurityError("with your own server certificate, also give the CA that signed it (--ca-file), "
                            "which the devices will trust")
    if ca_file is not None and ca_key is None and cert_file is None:
        raise SecurityError("with your own CA, give its key (--ca-key) to sign a server certificate, or your own "
                            "server certificate (--cert-file and --key-file)")
    if mtls and ca_file is not None and ca_key is None:
        raise SecurityError("--mtls signs a certificate for each device with the CA's key; give --ca-key, "
                            "or drop --mtls")
    if layout.root.is_dir() and any(layout.root.iterdir()):
        # it is made private (0700) and filled: never do that to a folder that holds other things
        raise SecurityError(f"{directory} exists and is not empty; give a new or empty directory for the broker")
    mtls = bool(mtls)
    _private_dir(layout.root).chmod(0o700)
    if ca_file is None:
        ca, key = create_ca(f"edgeqtl CA {secrets.token_hex(4)}")  # distinct names: one CA per directory
        _write_private(layout.ca_key, private_key_pem(key))
        _write_public(layout.ca_cert, certificate_pem(ca))
    else:
        _import_own_files(layout, Path(ca_file), ca_key and Path(ca_key), cert_file and Path(cert_file),
                          key_file and Path(key_file))
    if cert_file is None:
        _issue_server_certificate(layout, wanted)
    else:
        named = certificate_hosts(_x509().load_pem_x509_certificate(layout.server_cert.read_bytes()))
        missing = [h for h in (hosts or ()) if h not in named]
        if missing:
            raise SecurityError(f"{cert_file} does not name {', '.join(missing)}; give a certificate that does, "
                                "or leave those names out")
        wanted = tuple(dict.fromkeys([*(hosts or ()), *named])) or wanted
    if not mtls and not layout.passwd.exists():
        _write_private(layout.passwd, "")
    layout.write_acl()
    _write_settings(layout, Settings(wanted, port, mtls))  # last: its presence means "complete"
    return layout


def _check_secure_dir(layout: SecureBrokerDir, hosts: tuple[str, ...] | None, mtls: bool | None,
                      own_files: bool) -> SecureBrokerDir:
    """An existing DIR, checked against what is asked, with a server certificate made
    again if it was deleted (to renew it, or to add names)."""
    settings = layout.settings
    where = layout.root
    if own_files:
        raise SecurityError(f"{where} already has its certificates; give your own files only to a new --dir")
    if mtls is not None and mtls != settings.mtls:
        raise SecurityError(f"{where} was made {'with' if settings.mtls else 'without'} --mtls and its logins "
                            f"depend on it; {'add' if settings.mtls else 'drop'} --mtls, or use a new --dir")
    if not layout.ca_cert.is_file():
        raise SecurityError(f"{layout.ca_cert} is missing and every device trusts it; restore it from a backup, "
                            "or start over with a new --dir (and new files on every device)")
    if not layout.server_cert.is_file() or not layout.server_key.is_file():
        renewed = hosts or settings.hosts
        _issue_server_certificate(layout, renewed)
        _write_settings(layout, dataclasses.replace(settings, hosts=renewed))
    elif hosts:
        named = certificate_hosts(_x509().load_pem_x509_certificate(layout.server_cert.read_bytes()))
        missing = [h for h in hosts if h not in named]
        if missing:
            raise SecurityError(f"{layout.server_cert} does not name {', '.join(missing)}; to add it, delete "
                                f"{layout.server_cert} and {layout.server_key} and run again (a new certificate "
                                "from the same CA: devices keep working)")
    if not layout.acl.is_file():
        layout.write_acl()
    return layout


def _write_settings(layout: SecureBrokerDir, settings: Settings) -> None:
    _write_public(layout.settings_file, json.dumps({"hosts": list(settings.hosts), "port": settings.port,
                                                    "mtls": settings.mtls}, indent=2) + "\n")


def _load_ca(layout: SecureBrokerDir):
    from cryptography.hazmat.primitives import serialization

    if not layout.ca_key.is_file():
        raise SecurityError(f"{layout.ca_key} is missing: without the CA's key no certificate can be signed; "
                            "restore it, or give your own server certificate")
    ca = _x509().load_pem_x509_certificate(layout.ca_cert.read_bytes())
    return ca, serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)


def _issue_server_certificate(layout: SecureBrokerDir, hosts: tuple[str, ...]) -> None:
    ca, ca_key = _load_ca(layout)
    cert, key = issue_certificate(ca, ca_key, hosts[0], hosts)
    _write_private(layout.server_key, private_key_pem(key))
    _write_public(layout.server_cert, certificate_pem(cert))


def _import_own_files(layout: SecureBrokerDir, ca_file: Path, ca_key: Path | None, cert_file: Path | None,
                      key_file: Path | None) -> None:
    """Copy the user's CA (and key) and server certificate into DIR after checking that
    they belong together, so that a mismatch is one clear line now and not a refused
    TLS handshake on every device later."""
    x509 = _x509()
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    def load_key(path: Path):
        try:
            return serialization.load_pem_private_key(path.read_bytes(), password=None)
        except TypeError:
            raise SecurityError(f"{path} is encrypted; mosquitto starts unattended and cannot ask for its "
                                f"passphrase: decrypt it (openssl pkey -in {path} -out plain.key)") from None
        except ValueError as e:
            raise SecurityError(f"{path} is not a PEM private key ({e})") from None

    def load_certs(path: Path):
        try:
            return x509.load_pem_x509_certificates(path.read_bytes())
        except ValueError as e:
            raise SecurityError(f"{path} is not a PEM certificate ({e})") from None

    ca = load_certs(ca_file)[0]
    if ca_key is not None and load_key(ca_key).public_key() != ca.public_key():
        raise SecurityError(f"{ca_key} is not the key of {ca_file}")
    if cert_file is not None:
        chain = load_certs(cert_file)  # the server certificate first, then any intermediates
        if load_key(key_file).public_key() != chain[0].public_key():
            raise SecurityError(f"{key_file} is not the key of {cert_file}")
        for cert, issuer in zip(chain, [*chain[1:], ca]):
            try:
                cert.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature) as e:
                raise SecurityError(f"{cert_file} was not signed by {ca_file} ({type(e).__name__}); put any "
                                    "intermediate certificates after the server's in --cert-file") from None
        _write_private(layout.server_key, key_file.read_bytes())
        _write_public(layout.server_cert, cert_file.read_bytes())
    _write_public(layout.ca_cert, ca_file.read_bytes())
    if ca_key is not None:
        _write_private(layout.ca_key, ca_key.read_bytes())


# --------------------------------------------------------------------------- provisioning


def provision_device(directory: str | Path, device_id: str, replace: bool = False) -> Path:
    """A login for one device: DIR/devices/<id>/ with edgeqtl-device.json, ca.crt and,
    under mTLS, client.crt and client.key. Returns the JSON file's path; copy the folder
    to the device. A running broker reads the new login on SIGHUP (`edgeqtl broker
    --secure` sends it by itself)."""
    return _provision(open_secure_dir(directory), check_id(device_id, "device id"), "device", replace)


def provision_server(directory: str | Path, server_id: str, replace: bool = False) -> Path:
    """A login for one server agent (DIR/servers/<id>/edgeqtl-server.json, ...), and
    its ACL lines. The agent must use its id as its MQTT client id (Responder's
    client_id), since its decode-step topic is named after it."""
    layout = open_secure_dir(directory)
    path = _provision(layout, check_id(server_id, "server id"), "server", replace)
    layout.write_acl()
    return path


def _provision(layout: SecureBrokerDir, client_id: str, role: str, replace: bool) -> Path:
    folder = (layout.devices if role == "device" else layout.servers) / client_id
    other = (layout.servers if role == "device" else layout.devices) / client_id
    if other.exists():
        # one username, one role: the ACL would give it both sets of rights
        raise SecurityError(f"{client_id} is already a {'server agent' if role == 'device' else 'device'} "
                            f"({other}); pick another id")
    settings = layout.settings
    if folder.exists() and not replace:
        # under mTLS an old certificate stays valid until it expires: there is no revocation list
        old = "the old certificate stays valid until it expires" if settings.mtls else "the old one stops working"
        raise SecurityError(f"{role} {client_id} already has a login ({folder}); pass --replace to issue a new one "
                            f"({old})")
    _private_dir(layout.devices if role == "device" else layout.servers)
    _private_dir(folder)
    login = {"role": role, "id": client_id, "broker": f"mqtts://{_url_host(settings.hosts[0])}:{settings.port}",
             "username": client_id, "ca_file": "ca.crt"}
    _write_public(folder / "ca.crt", layout.ca_cert.read_bytes())
    if settings.mtls:
        ca, ca_key = _load_ca(layout)
        cert, key = issue_certificate(ca, ca_key, client_id, client=True)
        _write_private(folder / "client.key", private_key_pem(key))
        _write_public(folder / "client.crt", certificate_pem(cert))
        login.update(cert_file="client.crt", key_file="client.key")
    else:
        password = secrets.token_urlsafe(24)  # URL-safe: it can go in an mqtts:// URL unquoted
        login["password"] = password
        set_password(layout.passwd, client_id, password)
    path = folder / (DEVICE_FILE if role == "device" else SERVER_FILE)
    _write_private(path, json.dumps(login, indent=2) + "\n")
    return path


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host  # an IPv6 address in a URL


# --------------------------------------------------------------------------- using a login


@dataclasses.dataclass(frozen=True)
class Credentials:
    """A login file, as a device or a server agent reads it."""

    role: str
    id: str
    broker: str
    username: str
    password: str | None
    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    def broker_config(self, **overrides) -> BrokerConfig:
        """The BrokerConfig to connect with; overrides as BrokerConfig.from_url takes them
        (e.g. protocol=311, or host= when the broker's name differs from the file's)."""
        fields = dict(username=self.username, password=self.password, ca_file=str(self.ca_file),
                      cert_file=self.cert_file and str(self.cert_file), key_file=self.key_file and str(self.key_file))
        return BrokerConfig.from_url(self.broker, **{**fields, **overrides})

    def __repr__(self) -> str:  # never the password, e.g. in a traceback or a log line
        return f"Credentials(role={self.role!r}, id={self.id!r}, broker={self.broker!r})"


def load_credentials(path: str | Path) -> Credentials:
    """Read edgeqtl-device.json or edgeqtl-server.json; its files are found beside it."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        folder = path.parent
        return Credentials(role=raw["role"], id=raw["id"], broker=raw["broker"], username=raw["username"],
                           password=raw.get("password"), ca_file=folder / raw["ca_file"],
                           cert_file=folder / raw["cert_file"] if raw.get("cert_file") else None,
                           key_file=folder / raw["key_file"] if raw.get("key_file") else None)
    except (ValueError, KeyError, TypeError) as e:  # the message names the field, never a value
        raise SecurityError(f"{path} is not an edgeqtl login file ({type(e).__name__}: {e}); copy it again from "
                            "the broker's devices/ or servers/ folder") from None


# --------------------------------------------------------------------------- mosquitto


def mosquitto_config(layout: SecureBrokerDir, host: str, port: int, user: str,
                     max_packet_size: int | None = None) -> str:
    """mosquitto.conf for the directory: one TLS listener, no anonymous clients, the
    password file (or under mTLS the certificate's name as the username), the ACLs."""
    settings = layout.settings
    lines = [
        "# Written by edgeqtl at each start of `edgeqtl broker --secure`; edits here are lost.",
        f"listener {port} {host}",
        f"cafile {layout.ca_cert}",
        f"certfile {layout.server_cert}",
        f"keyfile {layout.server_key}",
        "tls_version tlsv1.2",  # the oldest accepted
    ]
    if settings.mtls:
        # the client certificate is the login: its common name becomes the username (%u)
        lines += ["require_certificate true", "use_identity_as_username true"]
    else:
        lines += ["require_certificate false", f"password_file {layout.passwd}"]
    lines += [
        "allow_anonymous false",
        f"acl_file {layout.acl}",
        "persistence false",
        "set_tcp_nodelay true",  # the broker forwards small messages at once (else ~44 ms each)
        *([f"max_packet_size {max_packet_size}"] if max_packet_size else []),
        "log_dest stderr",
        "log_type error", "log_type warning", "log_type notice", "log_type information",
        "connection_messages true",
        # stay this user: started as root, mosquitto would switch to the 'mosquitto'
        # account, which cannot read the 0600 keys and passwords
        f"user {user}",
    ]
    return "\n".join(lines) + "\n"
