"""Where a fleet's credentials lie: the folder layout (docs/credentials.md) and one client's files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

STATE_FILE = "credentials.json"


@dataclass(frozen=True)
class Layout:
    """Where every file of a credentials folder lies."""

    root: Path

    @property
    def state(self) -> Path:
        """Identities, serials and revocations (no secrets)."""
        return self.root / STATE_FILE

    @property
    def ca_cert(self) -> Path:
        """The CA certificate every party trusts."""
        return self.root / "ca" / "ca.crt"

    @property
    def ca_key(self) -> Path:
        """The CA private key (0600): only `credentials` commands use it."""
        return self.root / "ca" / "ca.key"

    @property
    def host_ca_cert(self) -> Path:
        """The host CA certificate: it signs host identities only, so only they pass the host listener."""
        return self.root / "ca" / "host-ca.crt"

    @property
    def host_ca_key(self) -> Path:
        """The host CA private key (0600)."""
        return self.root / "ca" / "host-ca.key"

    @property
    def broker_host_ca(self) -> Path:
        """The broker's copy of the host CA certificate (the host listener's `cafile`)."""
        return self.broker_dir / "host-ca.crt"

    @property
    def crl(self) -> Path:
        """The certificate revocation list Mosquitto reads (`crlfile`)."""
        return self.broker_dir / "crl.pem"

    @property
    def broker_ca(self) -> Path:
        """The broker's copy of the CA certificate (`cafile`), so `broker/` is complete on its own."""
        return self.broker_dir / "ca.crt"

    @property
    def broker_dir(self) -> Path:
        """Everything the broker reads, and nothing else: copy this folder onto the broker machine."""
        return self.root / "broker"

    @property
    def server_cert(self) -> Path:
        """The broker's TLS certificate."""
        return self.broker_dir / "server.crt"

    @property
    def server_key(self) -> Path:
        """The broker's TLS private key (0600)."""
        return self.broker_dir / "server.key"

    @property
    def acl(self) -> Path:
        """The Mosquitto ACL file."""
        return self.broker_dir / "acl"

    @property
    def passwd(self) -> Path:
        """The device listener's Mosquitto password file (password mode, 0600): devices only."""
        return self.broker_dir / "passwd"

    @property
    def host_passwd(self) -> Path:
        """The host listener's password file (password mode, 0600): the host identity only."""
        return self.broker_dir / "host.passwd"

    @property
    def conf(self) -> Path:
        """Where `mosquitto-conf --write` puts the config by default."""
        return self.broker_dir / "mosquitto.conf"

    @property
    def host_dir(self) -> Path:
        """The host identity's folder (Fleet, `edgefleet deploy`, `edgefleet serve`)."""
        return self.root / "host"

    def device_dir(self, device_id: str) -> Path:
        """One device's folder: copy it onto the device."""
        return self.root / "devices" / device_id


@dataclass(frozen=True)
class Identity:
    """The files one client (a device or the host) connects with."""

    name: str
    folder: Path
    ca: Path
    cert: Path | None
    key: Path | None
    password_file: Path | None

    def as_dict(self) -> dict[str, str | None]:
        """Paths as strings, for `--json`."""
        return {
            "name": self.name,
            "folder": str(self.folder),
            "tls_ca": str(self.ca),
            "tls_cert": str(self.cert) if self.cert else None,
            "tls_key": str(self.key) if self.key else None,
            "password_file": str(self.password_file) if self.password_file else None,
        }
