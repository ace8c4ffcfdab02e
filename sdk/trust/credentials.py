"""Broker credentials for a fleet: a CA, per-device client certificates or passwords, a CRL and the ACL.

`edgefleet credentials` writes everything a Mosquitto broker needs so that each device can publish only
to its own `dev/{id}/state|evt|telemetry` and read only its own `cmd` and `chunk` topics plus the
broadcast artifacts, while the host identity may send commands and chunks and read the whole fleet.
The ACL binds topics to identities with Mosquitto `pattern` lines and `%u`: in certificate mode the
username is the certificate's CN (`use_identity_as_username true`), in password mode the login name.
Keys are EC P-256 (every TLS stack on a Pi or Jetson accepts it; Ed25519 certificates are not universal).
No private key or password goes into `credentials.json` (password hashes do, in password mode);
private keys, password files and the state file are written 0600.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import secrets
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.agent.core.fsutil import atomic_write_json
from edgefleet.agent.core.protocol import valid_name
from edgefleet.sdk.trust.credential_files import STATE_FILE, Identity, Layout
from edgefleet.sdk.trust.errors import CredentialsError
from edgefleet.sdk.trust.mosquitto_auth import (
    DEFAULT_HOST_NAME,
    HOST_CLIENT_ID_PREFIX,
    ListenerFiles,
    acl_text,
    mosquitto_conf_text,
    mosquitto_password_hash,
    verify_mosquitto_password,
)
from edgefleet.sdk.trust.pki import (
    CA_DAYS,
    LEAF_DAYS,
    cert_pem,
    iso_time,
    issue_cert,
    key_pem,
    make_ca,
    make_crl,
    private_dir,
    utc_now,
    write_public,
    write_secret,
)

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

STATE_VERSION = 1
AUTH_MODES = ("cert", "password")
DEFAULT_TLS_PORT = 8883
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9*](?:[A-Za-z0-9\-]{0,62})(?:\.[A-Za-z0-9\-]{1,63})*$")


# ---------------------------------------------------------------------------------------------------
# Checks and locking (certificates: sdk/trust/pki.py; password hashes and the ACL: mosquitto_auth.py).


def _check_broker_host(name: str) -> str:
    """A broker host name for the server certificate's SANs: an IP address or a DNS name."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not _HOSTNAME_RE.match(name):
        raise CredentialsError(
            f"--broker-host {name!r} is neither an IP address nor a DNS name: "
            "give the name devices use in their broker URL, e.g. broker.example.lan or 192.168.1.10"
        )
    return name.lower()


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialize commands on one folder (two `add-device` runs must not lose each other's serials)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; commands there are run one at a time by hand
        yield
        return
    with open(root / ".lock", "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------------
# The credentials folder.


class Credentials:
    """One fleet's credentials folder: create it, add and revoke devices, render the broker config."""

    def __init__(self, root: Path, state: dict[str, Any]) -> None:
        self.layout = Layout(root)
        self.state = state

    # -- reading --------------------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """The folder."""
        return self.layout.root

    @property
    def fleet(self) -> str:
        """The fleet these credentials are for (the ACL's topic prefix)."""
        return str(self.state["fleet"])

    @property
    def auth(self) -> str:
        """`cert` (client certificates) or `password` (usernames and passwords over TLS)."""
        return str(self.state["auth"])

    @property
    def host_name(self) -> str:
        """The host identity's CN / username."""
        return str(self.state["host"]["name"])

    @property
    def broker_hosts(self) -> list[str]:
        """Names and addresses in the broker certificate's SANs."""
        return list(self.state["server"]["names"])

    def devices(self) -> list[dict[str, Any]]:
        """Every device ever added, with status `active` or `revoked`."""
        return [dict(v, id=k) for k, v in sorted(self.state["devices"].items())]

    def device(self, device_id: str) -> Identity:
        """The files of one device; CredentialsError when it is unknown."""
        if device_id not in self.state["devices"]:
            raise CredentialsError(
                f"device {device_id!r} has no credentials in {self.root}: "
                f"add it with `edgefleet credentials add-device {device_id} --dir {self.root}`"
            )
        return self._identity(device_id, self.layout.device_dir(device_id), "client")

    def host(self) -> Identity:
        """The host identity's files (pass them to Fleet, `edgefleet deploy`, `edgefleet serve`)."""
        return self._identity(self.host_name, self.layout.host_dir, "host")

    def _identity(self, name: str, folder: Path, stem: str) -> Identity:
        cert_mode = self.auth == "cert"
        return Identity(
            name=name,
            folder=folder,
            ca=folder / "ca.crt",
            cert=folder / f"{stem}.crt" if cert_mode else None,
            key=folder / f"{stem}.key" if cert_mode else None,
            password_file=None if cert_mode else folder / "password",
        )

    @classmethod
    def open(cls, root: Path | str) -> Credentials:
        """Open a folder made by `init`; CredentialsError when it is missing or not one."""
        path = Path(root).expanduser()
        state_path = path / STATE_FILE
        if not state_path.is_file():
            raise CredentialsError(
                f"{path} holds no edgefleet credentials ({STATE_FILE} is missing): "
                "create them with `edgefleet credentials init --fleet NAME --out DIR`, or pass --dir"
            )
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError) as exc:
            raise CredentialsError(f"{state_path} cannot be read ({exc}): restore it from a backup") from None
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise CredentialsError(
                f"{state_path} is not a version-{STATE_VERSION} credentials file: "
                "it was written by another edgefleet version; use that version or re-run init"
            )
        return cls(path, state)

    # -- creating -------------------------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        root: Path | str,
        fleet: str,
        *,
        auth: str = "cert",
        host_name: str = DEFAULT_HOST_NAME,
        broker_hosts: Sequence[str] = (),
        ca_days: int = CA_DAYS,
        days: int = LEAF_DAYS,
        force: bool = False,
    ) -> Credentials:
        """Create a CA, the broker's server certificate, the host identity, an empty CRL and the ACL."""
        path = Path(root).expanduser()
        if not valid_name(fleet):
            raise CredentialsError(f"--fleet {fleet!r}: use 1-128 letters, digits, '.', '_' or '-'")
        if auth not in AUTH_MODES:
            raise CredentialsError(f"--auth {auth!r}: use 'cert' (client certificates) or 'password'")
        if not valid_name(host_name):
            raise CredentialsError(f"--host-name {host_name!r}: use 1-128 letters, digits, '.', '_' or '-'")
        if ca_days < 1 or days < 1:
            raise CredentialsError("--ca-days and --days must be at least 1")
        if (path / STATE_FILE).exists() and not force:
            raise CredentialsError(
                f"{path} already holds credentials: every device's certificate comes from its CA, so "
                "re-creating it locks all of them out; pass --force only to start over, or choose another --out"
            )
        given = [_check_broker_host(name) for name in broker_hosts]
        # Loopback names always, so the host and tests on the broker machine itself can connect.
        names = list(dict.fromkeys([*given, "localhost", "127.0.0.1", "::1"]))
        primary = given[0] if given else "localhost"
        path.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            layout = Layout(path)
            old_devices = path / "devices"
            if force and old_devices.is_dir() and any(old_devices.iterdir()):
                # Their certificates chain to the CA being replaced: keep them aside, never delete them.
                old_devices.rename(path / f"devices.replaced-{utc_now().strftime('%Y%m%dT%H%M%S')}")
            for folder in (layout.ca_key.parent, layout.broker_dir, layout.host_dir):
                private_dir(folder)
            (path / "devices").mkdir(exist_ok=True)
            ca_key, ca_cert = make_ca(fleet, ca_days)
            write_secret(layout.ca_key, key_pem(ca_key))
            write_public(layout.ca_cert, cert_pem(ca_cert))
            write_public(layout.broker_ca, cert_pem(ca_cert))
            host_ca_key, host_ca_cert = make_ca(fleet, ca_days, label="host CA")
            server_key, server_cert = issue_cert(
                ca_key, ca_cert, primary, fleet, server_names=names, days=days
            )
            write_secret(layout.server_key, key_pem(server_key))
            write_public(layout.server_cert, cert_pem(server_cert))
            state: dict[str, Any] = {
                "version": STATE_VERSION,
                "fleet": fleet,
                "auth": auth,
                "created": iso_time(utc_now()),
                "leaf_days": days,
                "ca": {
                    "not_after": iso_time(ca_cert.not_valid_after_utc),
                    "subject": ca_cert.subject.rfc4514_string(),
                },
                "server": {
                    "primary": primary,
                    "names": names,
                    "serial": format(server_cert.serial_number, "x"),
                },
                "host": {"name": host_name},
                "devices": {},
                "crl_number": 1,
            }
            creds = cls(path, state)
            creds._write_host_ca(host_ca_key, host_ca_cert)
            creds._issue_identity(
                ca_key,
                ca_cert,
                host_name,
                layout.host_dir,
                "host",
                state["host"],
                issuer=(host_ca_key, host_ca_cert),
            )
            write_public(layout.crl, make_crl(ca_key, ca_cert, [], 1))
            write_public(layout.acl, acl_text(fleet, host_name).encode())
            creds._write_passwd()
            creds._save()
        return creds

    def _issue_identity(
        self,
        ca_key: EllipticCurvePrivateKey,
        ca_cert: x509.Certificate,
        name: str,
        folder: Path,
        stem: str,
        record: dict[str, Any],
        issuer: tuple[EllipticCurvePrivateKey, x509.Certificate] | None = None,
    ) -> None:
        """Write one client's files into `folder` and its public facts into `record`.

        `ca.crt` (to check the broker) is always the fleet CA; `issuer` signs the client certificate
        when it is another CA (the host CA for the host identity).
        """
        private_dir(folder)
        write_public(folder / "ca.crt", cert_pem(ca_cert))
        record["issued"] = iso_time(utc_now())
        if self.auth == "cert":
            sign_key, sign_cert = issuer or (ca_key, ca_cert)
            key, cert = issue_cert(sign_key, sign_cert, name, self.fleet, days=int(self.state["leaf_days"]))
            write_secret(folder / f"{stem}.key", key_pem(key))
            write_public(folder / f"{stem}.crt", cert_pem(cert))
            record["serial"] = format(cert.serial_number, "x")
            record["not_after"] = iso_time(cert.not_valid_after_utc)
            record.pop("password_hash", None)
        else:
            password = secrets.token_urlsafe(24)
            write_secret(folder / "password", (password + "\n").encode())
            # The hash (not the password) lives in the state so the passwd file can be rebuilt.
            record["password_hash"] = mosquitto_password_hash(password)
            record.pop("serial", None)
            record.pop("not_after", None)

    def _load_ca(self) -> tuple[EllipticCurvePrivateKey, x509.Certificate]:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

        try:
            key = serialization.load_pem_private_key(self.layout.ca_key.read_bytes(), password=None)
            cert = x509.load_pem_x509_certificate(self.layout.ca_cert.read_bytes())
        except (OSError, ValueError) as exc:
            raise CredentialsError(
                f"the CA in {self.layout.ca_key.parent} cannot be read ({exc}): restore ca.key and ca.crt "
                "from your backup; without them no device can be added or revoked"
            ) from None
        if not isinstance(key, EllipticCurvePrivateKey):
            raise CredentialsError(
                f"{self.layout.ca_key} is not an EC private key: restore the CA from backup"
            )
        return key, cert

    def _write_host_ca(self, key: EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        """Write the host CA (its key beside the fleet CA's, its certificate for the broker too)."""
        write_secret(self.layout.host_ca_key, key_pem(key))
        write_public(self.layout.host_ca_cert, cert_pem(cert))
        write_public(self.layout.broker_host_ca, cert_pem(cert))
        self.state["host_ca"] = {
            "not_after": iso_time(cert.not_valid_after_utc),
            "subject": cert.subject.rfc4514_string(),
        }

    def upgrade_host_listener(self) -> bool:
        """Give a folder made before the host listener what it needs; True when something was written.

        Cert mode: a host CA and a host certificate it signs (the old host certificate, from the fleet
        CA, would be refused by the host listener). Password mode: the host-only password file.
        """
        with _locked(self.root):
            self._reload()
            if self.auth == "password":
                if self.layout.host_passwd.is_file():
                    return False
                self._write_passwd()
                return True
            if "host_ca" in self.state and self.layout.broker_host_ca.is_file():
                return False
            ca_key, ca_cert = self._load_ca()
            host_ca_key, host_ca_cert = make_ca(self.fleet, CA_DAYS, label="host CA")
            self._write_host_ca(host_ca_key, host_ca_cert)
            self._issue_identity(
                ca_key,
                ca_cert,
                self.host_name,
                self.layout.host_dir,
                "host",
                self.state["host"],
                issuer=(host_ca_key, host_ca_cert),
            )
            self._save()
        return True

    def _save(self) -> None:
        # 0600: in password mode it holds the password hashes the passwd file is rebuilt from.
        atomic_write_json(self.layout.state, self.state, mode=0o600)

    def _write_passwd(self) -> None:
        """Rebuild the Mosquitto password files from the state (password mode only): devices, and the host."""
        if self.auth != "password":
            return
        lines = [
            f"{device_id}:{record['password_hash']}"
            for device_id, record in sorted(self.state["devices"].items())
            if record["status"] == "active"
        ]
        # Mosquitto reads an empty file fine; each listener accepts only the logins of its own file.
        write_secret(self.layout.passwd, "".join(line + "\n" for line in lines).encode())
        host_line = f"{self.host_name}:{self.state['host']['password_hash']}\n"
        write_secret(self.layout.host_passwd, host_line.encode())

    def _write_crl(self, ca_key: EllipticCurvePrivateKey, ca_cert: x509.Certificate) -> None:
        revoked = [
            (
                int(r["serial"], 16),
                datetime.strptime(r["revoked"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc),
            )
            for r in self.state["devices"].values()
            if r["status"] == "revoked" and r.get("serial")
        ]
        revoked += [
            (int(s, 16), datetime.strptime(w, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc))
            for s, w in self.state.get("revoked_serials", {}).items()
        ]
        self.state["crl_number"] = int(self.state.get("crl_number", 0)) + 1
        write_public(self.layout.crl, make_crl(ca_key, ca_cert, revoked, self.state["crl_number"]))

    # -- devices --------------------------------------------------------------------------------------

    def check_device_ids(self, device_ids: Sequence[str]) -> None:
        """Refuse bad, repeated, reserved or already active ids, all before anything is written."""
        if not device_ids:
            raise CredentialsError(
                "name at least one device id: edgefleet credentials add-device ID [ID ...]"
            )
        seen: set[str] = set()
        for device_id in device_ids:
            if not valid_name(device_id):
                raise CredentialsError(
                    f"device id {device_id!r} is not usable in a topic or certificate: "
                    "use 1-128 letters, digits, '.', '_' or '-' (starting with a letter or digit)"
                )
            if device_id in seen:
                raise CredentialsError(f"device id {device_id!r} is given twice: name each device once")
            seen.add(device_id)
            if device_id == self.host_name:
                raise CredentialsError(
                    f"device id {device_id!r} is the host identity's name: a device under it would get the "
                    "host's rights; choose another id"
                )
            if device_id.startswith(HOST_CLIENT_ID_PREFIX):
                raise CredentialsError(
                    f"device id {device_id!r} starts with {HOST_CLIENT_ID_PREFIX!r}: the broker gives each "
                    "device its id as client id, and host connections use ids with that prefix, so the two "
                    "could disconnect each other; choose an id without it"
                )
            record = self.state["devices"].get(device_id)
            if record is not None and record["status"] == "active":
                raise CredentialsError(
                    f"device {device_id!r} already has credentials (issued {record['issued']}): to replace "
                    f"them, revoke the old ones first (edgefleet credentials revoke {device_id}), then add it again"
                )

    def add_devices(self, device_ids: Sequence[str]) -> list[Identity]:
        """Issue credentials for new devices (or devices revoked earlier); returns their files."""
        with _locked(self.root):
            self._reload()
            self.check_device_ids(device_ids)
            ca_key, ca_cert = self._load_ca()
            for device_id in device_ids:
                old = self.state["devices"].get(device_id)
                if old is not None and old.get("serial"):
                    # Keep the revoked certificate in the CRL after its record is replaced.
                    self.state.setdefault("revoked_serials", {})[old["serial"]] = old["revoked"]
                record: dict[str, Any] = {"status": "active"}
                self._issue_identity(
                    ca_key, ca_cert, device_id, self.layout.device_dir(device_id), "client", record
                )
                self.state["devices"][device_id] = record
                self._write_agent_toml(device_id)
            self._write_passwd()
            self._save()
        return [self.device(d) for d in device_ids]

    def revoke(self, device_ids: Sequence[str]) -> None:
        """Revoke devices: re-issue the CRL (cert mode) or drop them from the password file."""
        if not device_ids:
            raise CredentialsError("name at least one device id: edgefleet credentials revoke ID [ID ...]")
        with _locked(self.root):
            self._reload()
            for device_id in device_ids:
                record = self.state["devices"].get(device_id)
                if record is None:
                    known = ", ".join(sorted(self.state["devices"])) or "none yet"
                    raise CredentialsError(
                        f"device {device_id!r} has no credentials here, so there is nothing to revoke "
                        f"(devices: {known}); check the id and --dir"
                    )
                if record["status"] == "revoked":
                    raise CredentialsError(
                        f"device {device_id!r} is already revoked (on {record['revoked']})"
                    )
            ca_key, ca_cert = self._load_ca()
            now = iso_time(utc_now())
            for device_id in device_ids:
                self.state["devices"][device_id].update(status="revoked", revoked=now)
            self._write_crl(ca_key, ca_cert)
            self._write_passwd()
            self._save()

    def _reload(self) -> None:
        """Re-read the state under the lock: another command may have changed it since open()."""
        self.state = Credentials.open(self.root).state

    def _write_agent_toml(self, device_id: str) -> None:
        """An agent config fragment beside the device's files (relative paths resolve to its folder)."""
        ident = self.device(device_id)
        host = str(self.state["server"]["primary"])
        lines = [
            f"# Broker identity of device {device_id} in fleet {self.fleet}, by `edgefleet credentials`.",
            "# Copy this folder onto the device and run: edgefleet-agent --config agent.toml",
            "# --profile PROFILE --trusted-key fleet.pub (or add profile and trusted_keys below).",
            f'device_id = "{device_id}"',
            f'fleet = "{self.fleet}"',
            f'broker = "mqtts://{_url_host(host)}:{DEFAULT_TLS_PORT}"',
            'tls_ca = "ca.crt"',
        ]
        if ident.cert is not None:
            lines += ['tls_cert = "client.crt"', 'tls_key = "client.key"']
        else:
            lines += [f'username = "{device_id}"', 'password_file = "password"']
        write_public(ident.folder / "agent.toml", ("\n".join(lines) + "\n").encode())

    # -- broker config --------------------------------------------------------------------------------

    def mosquitto_conf(
        self,
        port: int = DEFAULT_TLS_PORT,
        bind: str | None = None,
        base: str | None = None,
        host_port: int | None = None,
    ) -> str:
        """A Mosquitto 2.0 config: a TLS listener for devices, one for the host, no plaintext one.

        Every file it names lies in `broker/`; `base` is where that folder will lie on the broker
        machine, when that differs from here. `host_port` defaults to `port + 1`. A folder made before
        the host listener is upgraded first (`upgrade_host_listener`).
        """
        if not 0 < port < 65536:
            raise CredentialsError(f"--port {port}: use 1-65535 (8883 is MQTT over TLS)")
        self.upgrade_host_listener()
        root = Path(base) if base else self.layout.broker_dir.resolve()

        def at(path: Path) -> str:
            return str(root / path.relative_to(self.layout.broker_dir))

        lay = self.layout
        cert_mode = self.auth == "cert"
        files = ListenerFiles(
            acl=at(lay.acl),
            server_cert=at(lay.server_cert),
            server_key=at(lay.server_key),
            device_ca=at(lay.broker_ca),
            host_ca=at(lay.broker_host_ca) if cert_mode else None,
            crl=at(lay.crl) if cert_mode else None,
            device_passwd=None if cert_mode else at(lay.passwd),
            host_passwd=None if cert_mode else at(lay.host_passwd),
        )
        return mosquitto_conf_text(
            self.fleet, files, port=port, host_port=port + 1 if host_port is None else host_port, bind=bind
        )


def _url_host(host: str) -> str:
    """A host as it appears in a URL (IPv6 addresses in brackets)."""
    return f"[{host}]" if ":" in host else host


def default_dir() -> Path:
    """`$EDGEFLEET_HOME/credentials`, or `~/.edgefleet/credentials`."""
    from edgefleet.agent.core.paths import edgefleet_home

    return edgefleet_home() / "credentials"


__all__ = [
    "AUTH_MODES",
    "DEFAULT_HOST_NAME",
    "Credentials",
    "CredentialsError",
    "Identity",
    "Layout",
    "acl_text",
    "default_dir",
    "mosquitto_password_hash",
    "verify_mosquitto_password",
]
