"""Host-side credentials for authenticated links: a fleet CA, operator and agent certificates,
the host's own operator identity, and the agent's operators (trust) file.

One operator identity is one Ed25519 key pair (`NAME.key`, PKCS#8 PEM, readable by
device_agents.signing.load_private_key) and a certificate `NAME.crt` for that same key, signed by
the fleet CA with the clientAuth purpose. The TLS handshake proves the key over TCP; the same key
signs challenges over serial (device_agents.operators). Agents get serverAuth certificates whose
subject alternative names are the agent's name and its addresses, so a host can check that it
reached the robot it meant to.

A host keeps these beside its signing keys, in one folder:

    keys/fleet-ca.crt   the CA certificate (the only file every host and agent needs)
    keys/fleet-ca.key   the CA key: only where certificates are issued
    keys/alice.crt      this host's operator certificate
    keys/alice.key      and its key (mode 0600)
    keys/robonas.key    the artifact signing key (robonas keys generate), unrelated to the above

Private keys are written mode 0600 and folders this module creates mode 0700, whatever the umask;
every file is written atomically (device_agents.atomic). Leans on `cryptography` for keys and
X.509, and on device_agents.tls / device_agents.operators so the host and the agent read these
files with the same code.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agents.atomic import atomic_write
from device_agents.errors import DeviceError
from device_agents.operators import NAME_RE as OPERATOR_NAME_RE
from device_agents.operators import ROLES, Operators, TrustConfigError, load_operator_key
from device_agents.signing import key_id as key_id_of
from device_agents.signing import load_private_key
from robonas.errors import ConfigError

if TYPE_CHECKING:
    import ssl

CA_NAME = "fleet-ca"
CA_DAYS = 3650
LEAF_DAYS = 825  # the longest validity browsers accept for a leaf; a sane default for robots too
DEFAULT_AGENT_HOSTS = ("127.0.0.1", "localhost")
# Robots without a real-time clock may boot a little behind: do not start validity at "now".
BACKDATE = datetime.timedelta(hours=1)
# Agent names match the fleet inventory's rule (robonas.fleet.inventory) and must be DNS-safe.
AGENT_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HOST_LABEL_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
DIR_MODE = 0o700


# --- files and folders --------------------------------------------------------------------------


def make_private_dir(path: Path) -> Path:
    """Create `path` and any missing parents with mode 0700 (chmod, so the umask has no say)."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{p} is a file, expected a folder for keys")
    for d in reversed(missing):
        try:
            d.mkdir(mode=DIR_MODE)
        except FileExistsError:  # made by someone else meanwhile: leave its mode alone
            continue
        except OSError as e:
            raise ConfigError(f"cannot create folder {d}: {e.strerror or e}") from e
        os.chmod(d, DIR_MODE)
    if not path.is_dir():
        raise ConfigError(f"{path} is not a folder")
    return path


def _pem_key(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_pair(
    out_dir: Path, name: str, cert: x509.Certificate, key: Ed25519PrivateKey
) -> tuple[Path, Path]:
    cert_path, key_path = out_dir / f"{name}.crt", out_dir / f"{name}.key"
    # key first: a crash in between leaves a key with no certificate, never a certificate
    # whose key is lost
    atomic_write(key_path, _pem_key(key), PRIVATE_MODE)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), PUBLIC_MODE)
    return cert_path, key_path


def _refuse_overwrite(out_dir: Path, name: str, overwrite: bool, command: str) -> None:
    if overwrite:
        return
    present = [p.name for p in (out_dir / f"{name}.crt", out_dir / f"{name}.key") if p.exists()]
    if present:
        raise ConfigError(
            f"{out_dir} already holds {', '.join(present)}; pass --overwrite to `robonas keys {command}` "
            "(or overwrite=True) to replace them"
        )


def _check_name(name: str, pattern: re.Pattern[str], what: str) -> None:
    if not isinstance(name, str) or not pattern.match(name):
        raise ConfigError(
            f"{what} name {name!r} must be 1-64 letters, digits, '_', '.' or '-'"
            + (" or '@'" if "@" in pattern.pattern else "")
            + ", starting with a letter or digit"
        )


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ConfigError(f"days: {days!r} must be a whole number of days >= 1")


# --- certificates -------------------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _ca_not_after(cert: x509.Certificate) -> datetime.datetime:
    if hasattr(cert, "not_valid_after_utc"):  # cryptography >= 42
        return cert.not_valid_after_utc
    return cert.not_valid_after.replace(tzinfo=datetime.UTC)  # naive UTC before 42


def make_ca(
    out_dir: str | os.PathLike[str], name: str = CA_NAME, days: int = CA_DAYS, overwrite: bool = False
) -> tuple[Path, Path]:
    """A self-signed Ed25519 fleet CA: `NAME.crt` (give it to every host and agent) and `NAME.key`."""
    _check_name(name, AGENT_NAME_RE, "CA")
    _check_days(days)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out} is a file, expected a folder for keys")
    _refuse_overwrite(out, name, overwrite, "ca")
    key = Ed25519PrivateKey.generate()
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        # path length 0: this CA signs operators and agents, never another CA
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, None)  # Ed25519 signs without a separate digest
    )
    make_private_dir(out)
    return _write_pair(out, name, cert, key)


def _load_ca(ca_dir: str | os.PathLike[str], ca_name: str) -> tuple[x509.Certificate, Ed25519PrivateKey]:
    folder = Path(ca_dir)
    cert_path, key_path = folder / f"{ca_name}.crt", folder / f"{ca_name}.key"
    missing = [p.name for p in (cert_path, key_path) if not p.is_file()]
    if missing:
        raise ConfigError(
            f"CA folder {folder} lacks {', '.join(missing)}; make a CA with `robonas keys ca --out {folder}`"
        )
    cert = _read_cert(cert_path)
    try:
        key = load_private_key(key_path)
    except DeviceError as e:
        raise ConfigError(f"CA key {key_path}: {e}") from e
    if _raw_pub(key.public_key()) != _raw_pub(cert.public_key()):
        raise ConfigError(f"CA key {key_path} does not belong to CA certificate {cert_path}")
    return cert, key


def _read_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as e:
        raise ConfigError(f"cannot read certificate {path}: {e.strerror or e}") from e
    except ValueError as e:
        raise ConfigError(f"{path} is not a PEM certificate: {e}") from e


def _raw_pub(key: object) -> bytes:
    if not isinstance(key, Ed25519PublicKey):
        return b""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _issue(
    cn: str,
    key: Ed25519PrivateKey,
    ca_cert: x509.Certificate,
    ca_key: Ed25519PrivateKey,
    days: int,
    purpose: x509.ObjectIdentifier,
    san: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = _now()
    # a leaf outliving its CA would only fail later, at a worse moment
    not_after = min(now + datetime.timedelta(days=days), _ca_not_after(ca_cert))
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
    )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(ca_key, None)


def make_operator(
    out_dir: str | os.PathLike[str],
    name: str,
    ca_dir: str | os.PathLike[str],
    ca_name: str = CA_NAME,
    days: int = LEAF_DAYS,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """An operator identity: Ed25519 key `NAME.key` and certificate `NAME.crt` (CN=name, clientAuth)."""
    _check_name(name, OPERATOR_NAME_RE, "operator")
    _check_days(days)
    out = Path(out_dir)
    if name == ca_name:
        raise ConfigError(f"operator name {name!r} is the CA's name; choose another")
    _refuse_overwrite(out, name, overwrite, "operator")
    ca_cert, ca_key = _load_ca(ca_dir, ca_name)
    key = Ed25519PrivateKey.generate()
    cert = _issue(name, key, ca_cert, ca_key, days, ExtendedKeyUsageOID.CLIENT_AUTH)
    make_private_dir(out)
    return _write_pair(out, name, cert, key)


def _host_names(name: str, hosts: Iterable[str]) -> list[x509.GeneralName]:
    san: list[x509.GeneralName] = [x509.DNSName(name)]
    seen = {("dns", name.lower())}
    for raw in hosts:
        host = raw.strip() if isinstance(raw, str) else raw
        if not isinstance(host, str) or not host:
            raise ConfigError(f"host {raw!r} must be a DNS name or an IP address")
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            labels = host.rstrip(".").split(".")
            if len(host) > 253 or not all(_HOST_LABEL_RE.match(label) for label in labels):
                raise ConfigError(
                    f"host {host!r} is neither an IP address nor a DNS name "
                    "(letters, digits, '-' and '_' in dot-separated labels; no wildcards)"
                ) from None
            if ("dns", host.lower()) not in seen:
                seen.add(("dns", host.lower()))
                san.append(x509.DNSName(host))
        else:
            if ("ip", str(ip)) not in seen:
                seen.add(("ip", str(ip)))
                san.append(x509.IPAddress(ip))
    return san


def make_agent(
    out_dir: str | os.PathLike[str],
    name: str,
    ca_dir: str | os.PathLike[str],
    hosts: Iterable[str] = DEFAULT_AGENT_HOSTS,
    ca_name: str = CA_NAME,
    days: int = LEAF_DAYS,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """An agent's server identity: `NAME.key` and `NAME.crt` (serverAuth; SAN DNS:name + hosts)."""
    _check_name(name, AGENT_NAME_RE, "agent")
    _check_days(days)
    if isinstance(hosts, str):
        hosts = [hosts]
    san = _host_names(name, hosts)
    out = Path(out_dir)
    if name == ca_name:
        raise ConfigError(f"agent name {name!r} is the CA's name; choose another")
    _refuse_overwrite(out, name, overwrite, "agent")
    ca_cert, ca_key = _load_ca(ca_dir, ca_name)
    key = Ed25519PrivateKey.generate()
    cert = _issue(name, key, ca_cert, ca_key, days, ExtendedKeyUsageOID.SERVER_AUTH, san)
    make_private_dir(out)
    return _write_pair(out, name, cert, key)


# --- the host's own identity --------------------------------------------------------------------


@dataclass(frozen=True)
class HostCredentials:
    """The files a host needs to open an authenticated link: the fleet CA and one operator's pair."""

    ca: Path
    cert: Path
    key: Path

    @property
    def name(self) -> str:
        return self.cert.stem

    def client_context(self) -> ssl.SSLContext:
        from device_agents.tls import client_context

        return client_context(self.cert, self.key, self.ca)

    def private_key(self) -> Ed25519PrivateKey:
        return load_private_key(self.key)

    @property
    def key_id(self) -> str:
        return key_id_of(self.private_key().public_key())


def _purposes(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return []


def _is_operator_cert(cert: x509.Certificate) -> bool:
    return ExtendedKeyUsageOID.CLIENT_AUTH in _purposes(cert)


def find_host_credentials(
    folder: str | os.PathLike[str], operator: str | None = None, ca_name: str = CA_NAME
) -> HostCredentials:
    """This host's credentials in a keys folder: `fleet-ca.crt` and one operator's `.crt` + `.key`.

    With `operator` the pair of that name; without, the only certificate there with the
    clientAuth purpose. Anything missing or inconsistent raises ConfigError saying what and the
    `robonas keys ...` command that makes it.
    """
    keys = Path(folder)
    if not keys.is_dir():
        what = "is a file" if keys.exists() else "does not exist"
        raise ConfigError(
            f"keys folder {keys} {what}; make credentials with `robonas keys ca --out {keys}` "
            f"then `robonas keys operator NAME --ca {keys}`"
        )
    ca_path = keys / f"{ca_name}.crt"
    if not ca_path.is_file():
        raise ConfigError(
            f"keys folder {keys} lacks {ca_path.name}; copy the fleet CA certificate there, "
            f"or make a CA with `robonas keys ca --out {keys}`"
        )
    ca_cert = _read_cert(ca_path)
    if operator is not None:
        _check_name(operator, OPERATOR_NAME_RE, "operator")
        cert_path, key_path = keys / f"{operator}.crt", keys / f"{operator}.key"
        missing = [p.name for p in (cert_path, key_path) if not p.is_file()]
        if missing:
            raise ConfigError(
                f"keys folder {keys} lacks {', '.join(missing)}; make them with "
                f"`robonas keys operator {operator} --ca DIR_WITH_{ca_name.upper()}_KEY --out {keys}`"
            )
        cert = _read_cert(cert_path)
        if not _is_operator_cert(cert):
            raise ConfigError(
                f"{cert_path} is not an operator certificate (no clientAuth purpose); "
                f"make one with `robonas keys operator {operator} --ca DIR --out {keys}`"
            )
    else:
        found: list[tuple[Path, x509.Certificate]] = []
        keyless: list[str] = []
        for path in sorted(keys.glob("*.crt")):
            if path.name == ca_path.name or not path.is_file():
                continue
            try:
                candidate = x509.load_pem_x509_certificate(path.read_bytes())
            except (OSError, ValueError):
                continue  # not ours to judge; a named operator would report it
            if not _is_operator_cert(candidate):
                continue
            if path.with_suffix(".key").is_file():
                found.append((path, candidate))
            else:
                keyless.append(path.name)
        if not found:
            extra = f" ({', '.join(keyless)} without its .key)" if keyless else ""
            raise ConfigError(
                f"keys folder {keys} holds no operator certificate with its key (NAME.crt + NAME.key)"
                f"{extra}; make one with `robonas keys operator NAME --ca DIR_WITH_{ca_name.upper()}_KEY "
                f"--out {keys}`"
            )
        if len(found) > 1:
            names = ", ".join(p.stem for p, _ in found)
            raise ConfigError(f"keys folder {keys} holds several operators ({names}); name the one to use")
        cert_path, cert = found[0]
        key_path = cert_path.with_suffix(".key")
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        raise ConfigError(
            f"{cert_path} was not issued by the CA in {ca_path}; re-issue it with "
            f"`robonas keys operator {cert_path.stem} --ca DIR --out {keys} --overwrite`"
        ) from None
    try:
        key = load_private_key(key_path)
    except DeviceError as e:
        raise ConfigError(str(e)) from e
    if _raw_pub(key.public_key()) != _raw_pub(cert.public_key()):
        raise ConfigError(f"key {key_path} does not belong to certificate {cert_path}")
    return HostCredentials(ca=ca_path, cert=cert_path, key=key_path)


# --- the agent's operators file -----------------------------------------------------------------


def _parse_roles(roles: str | Iterable[str]) -> list[str]:
    items = roles.split(",") if isinstance(roles, str) else list(roles)
    wanted = {r.strip() for r in items if isinstance(r, str) and r.strip()}
    bad = sorted(r for r in items if not isinstance(r, str))
    unknown = sorted(wanted - set(ROLES))
    if bad or unknown:
        raise ConfigError(f"unknown role(s) {unknown or bad}; roles are {', '.join(ROLES)}")
    return [r for r in ROLES if r in wanted]  # the canonical order, no duplicates


def add_operator(
    operators_file: str | os.PathLike[str],
    name: str,
    key: str | os.PathLike[str] | bytes | Ed25519PublicKey,
    roles: str | Iterable[str],
    replace: bool = False,
    inline: bool = True,
) -> Path:
    """Trust an operator in an agent's operators JSON (created if absent; written atomically).

    `key` is the operator's certificate, public key file, or key. `roles` come from
    device_agents.operators.ROLES (a list or "deploy,run"); none means status only. With
    `inline` the key is stored as base64 of its 32 raw bytes, so the file is self-contained when
    copied to a robot; otherwise as a path relative to the file's folder. A name already present
    is refused unless `replace`; a key already trusted under another name is always refused.
    """
    _check_name(name, OPERATOR_NAME_RE, "operator")
    wanted_roles = _parse_roles(roles)
    try:
        public_key = load_operator_key(key)
    except TrustConfigError as e:
        raise ConfigError(f"operator key: {e}") from e
    path = Path(operators_file)
    if path.is_dir():
        raise ConfigError(f"operators file {path} is a directory, expected a JSON file")
    if path.exists():
        try:
            current = Operators.from_file(path)
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (TrustConfigError, OSError, ValueError) as e:
            raise ConfigError(f"{e} (fix or remove the file first)") from e
    else:
        current, doc = Operators([]), {"operators": []}
    same_key = current.lookup(public_key)
    if same_key is not None and same_key.name != name:
        raise ConfigError(
            f"{path} already trusts this key (key id {same_key.key_id}) as operator {same_key.name!r}"
        )
    if inline:
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        key_field = base64.b64encode(raw).decode("ascii")
    else:
        if isinstance(key, (bytes, Ed25519PublicKey)) or not Path(key).is_file():
            raise ConfigError(f"storing the key by path needs a key file, got {key!r}")
        key_field = os.path.relpath(os.path.abspath(key), os.path.abspath(path.parent))
    entry = {"name": name, "key": key_field, "roles": wanted_roles}
    entries: list[object] = list(doc["operators"])
    index = next((i for i, e in enumerate(entries) if isinstance(e, dict) and e.get("name") == name), None)
    if index is None:
        entries.append(entry)
    elif not replace:
        raise ConfigError(
            f"{path} already trusts an operator named {name!r}; pass --replace (replace=True) to change it"
        )
    else:
        entries[index] = entry
    doc["operators"] = entries
    try:  # the file must read back exactly as the agent will read it
        Operators.from_document(doc, path.parent, source=str(path))
    except TrustConfigError as e:
        raise ConfigError(str(e)) from e
    make_private_dir(path.parent)
    atomic_write(path, (json.dumps(doc, indent=2) + "\n").encode("utf-8"), PUBLIC_MODE)
    return path
