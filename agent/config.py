"""The agent's configuration: a TOML file and/or flags, validated with errors that name the field."""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple
from urllib.parse import urlsplit

from edgefleet.agent.core.errors import ConfigError
from edgefleet.agent.core.paths import DEFAULT_BROKER, agent_state_dir
from edgefleet.agent.core.protocol import valid_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # the device side still runs Python 3.9 / 3.10
    import tomli as tomllib

# "auto": MQTT 5, then 3.1.1 on a broker that refuses 5 (aedes, amqtt); see agent/mqtt_session.py.
MQTT_VERSIONS = ("auto", "5", "3.1.1")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class AgentConfig:
    """Everything one agent process needs; build it with `load_config`, which validates every field."""

    device_id: str
    profile: str
    trusted_keys: Tuple[str, ...]
    broker: str = DEFAULT_BROKER
    fleet: str = "default"
    state_dir: str = ""
    tags: Tuple[str, ...] = ()
    # MQTT session
    mqtt_version: str = "auto"
    keepalive_s: int = 30
    username: Optional[str] = None
    password: Optional[str] = None
    password_file: Optional[str] = None
    tls_ca: Optional[str] = None
    tls_cert: Optional[str] = None
    tls_key: Optional[str] = None
    tls_insecure: bool = False
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 60.0
    connect_timeout_s: float = 0.0
    # While on a fallback broker (not the first of `broker`), check this often whether the first is back.
    failback_s: float = 60.0
    # Serving and reporting
    telemetry_interval_s: float = 10.0
    eval_interval_s: float = 0.0
    # Shadow evaluation after a switch (agent/shadow.py): share of requests also run on the replaced
    # model, the CPU share its worker may use, and for how long (0 turns it off).
    shadow_share: float = 0.2
    shadow_cpu: float = 0.25
    shadow_s: float = 900.0
    http_enabled: bool = True
    http_port: int = 8765
    mqtt_infer: bool = False
    emulate: Optional[str] = None
    # Transfers and limits
    max_message_bytes: int = 1 << 20
    max_chunk_bytes: int = 4 << 20
    repair_after_s: float = 2.0
    transfer_timeout_s: float = 600.0
    bitmap_flush_chunks: int = 64
    bitmap_flush_s: float = 1.0
    log_level: str = "info"
    # Federated fine-tuning: a folder of .npz files (x, y) and how many labelled requests to keep.
    train_data: Optional[str] = None
    keep_feedback: int = 0
    # Refuse commands without the fleet's online-key signature (`command-unsigned`, agent/core/
    # command_auth.py). The online key needs nothing provisioned: each command carries its delegation,
    # signed by the root this agent trusts. `false` only for a host that cannot sign yet (no online key):
    # unsigned commands then run; signed ones are still checked.
    require_signed_commands: bool = True

    @property
    def state_path(self) -> Path:
        """The state folder as a Path."""
        return Path(self.state_dir)

    @property
    def brokers(self) -> Tuple[str, ...]:
        """The broker URLs in the order they are tried (`broker` holds them comma-separated)."""
        return split_brokers(self.broker)

    @property
    def broker_host(self) -> str:
        """Host part of the first broker URL."""
        return url_host(self.brokers[0])

    @property
    def broker_port(self) -> int:
        """Port of the first broker URL (1883 for mqtt://, 8883 for mqtts:// when none is given)."""
        return url_port(self.brokers[0])

    @property
    def use_tls(self) -> bool:
        """Whether the session runs over TLS (mqtts:// or any TLS file given)."""
        return urlsplit(self.brokers[0]).scheme == "mqtts" or bool(self.tls_ca or self.tls_cert)

    def resolved_password(self) -> Optional[str]:
        """The password, read from `password_file` when that is set (keeps secrets out of the config)."""
        if self.password_file:
            return Path(self.password_file).read_text().strip()
        return self.password

    def public(self) -> Dict[str, Any]:
        """The settings without secrets, for logs and the `state` message."""
        out = dataclasses.asdict(self)
        for secret in ("password",):
            if out.get(secret):
                out[secret] = "***"
        return out


def split_brokers(value: str) -> Tuple[str, ...]:
    """The URLs of a comma-separated broker list, blanks dropped."""
    return tuple(u.strip() for u in value.split(",") if u.strip())


def url_host(url: str) -> str:
    """Host part of one broker URL."""
    return str(urlsplit(url).hostname)


def url_port(url: str) -> int:
    """Port of one broker URL (1883 for mqtt://, 8883 for mqtts:// when none is given)."""
    parts = urlsplit(url)
    return parts.port or (8883 if parts.scheme == "mqtts" else 1883)


_FIELDS = {f.name: f for f in dataclasses.fields(AgentConfig)}
_REQUIRED = ("device_id", "profile", "trusted_keys")


def _type_name(kind: Any) -> str:
    return str(kind).replace("Optional[", "").replace("]", "").replace("Tuple[str, ...", "list of strings")


def _coerce(name: str, value: Any) -> Any:
    """Check one field's type (strings from flags are accepted for numbers and booleans)."""
    kind = str(_FIELDS[name].type)
    if value is None:
        if "Optional" in kind:
            return None
        raise ConfigError(reason=f"field {name!r} must not be empty")
    if "Tuple" in kind:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(reason=f"field {name!r} must be a list of strings")
        return tuple(value)
    if kind == "bool":
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(reason=f"field {name!r} must be true or false, not {value!r}")
        return value
    if kind in ("int", "float"):
        number: Any = value
        if isinstance(value, str):
            try:
                number = int(value) if kind == "int" else float(value)
            except ValueError:
                raise ConfigError(reason=f"field {name!r} must be a number, not {value!r}") from None
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(reason=f"field {name!r} must be a number, not {value!r}")
        if kind == "int" and not float(number).is_integer():
            raise ConfigError(reason=f"field {name!r} must be a whole number, not {value!r}")
        return int(number) if kind == "int" else float(number)
    if not isinstance(value, str):
        raise ConfigError(reason=f"field {name!r} must be a string, not {value!r}")
    return value


def _validate(cfg: AgentConfig) -> None:
    """Cross-field and range checks; each error names the field and a valid value."""
    if not valid_name(cfg.device_id):
        raise ConfigError(
            reason=f"field 'device_id' {cfg.device_id!r}: use 1-128 letters, digits, '.', '_' or '-'"
        )
    if not valid_name(cfg.fleet):
        raise ConfigError(reason=f"field 'fleet' {cfg.fleet!r}: use 1-128 letters, digits, '.', '_' or '-'")
    urls = cfg.brokers
    if not urls:
        raise ConfigError(reason="field 'broker' is empty: use mqtt://host:port or mqtts://host:port")
    for url in urls:
        parts = urlsplit(url)
        try:
            port_ok = parts.port is None or 0 < parts.port < 65536
        except ValueError:
            port_ok = False
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or not port_ok:
            raise ConfigError(reason=f"field 'broker' {url!r}: use mqtt://host:port or mqtts://host:port")
    if len({urlsplit(u).scheme for u in urls}) > 1:
        # One paho client serves every URL, and its TLS settings are set once.
        raise ConfigError(reason="field 'broker': the URLs mix mqtt:// and mqtts://; use one scheme for all")
    if not cfg.trusted_keys:
        raise ConfigError(reason="field 'trusted_keys' must name at least one .pub file (--trusted-key)")
    if cfg.mqtt_version not in MQTT_VERSIONS:
        raise ConfigError(
            reason=f"field 'mqtt_version' {cfg.mqtt_version!r}: use 'auto' (5, then 3.1.1), '5' or '3.1.1'"
        )
    if cfg.log_level not in LOG_LEVELS:
        raise ConfigError(reason=f"field 'log_level' {cfg.log_level!r}: use one of {', '.join(LOG_LEVELS)}")
    if bool(cfg.tls_cert) != bool(cfg.tls_key):
        raise ConfigError(reason="fields 'tls_cert' and 'tls_key' go together: give both or neither")
    for name in ("tls_ca", "tls_cert", "tls_key", "password_file"):
        path = getattr(cfg, name)
        if path and not Path(path).is_file():
            raise ConfigError(reason=f"field {name!r}: file {path!r} does not exist")
    if cfg.password and cfg.password_file:
        raise ConfigError(reason="fields 'password' and 'password_file' exclude each other: keep one")
    if (cfg.password or cfg.password_file) and not cfg.username:
        raise ConfigError(reason="field 'username' is required when a password is given")
    for t in cfg.tags:
        if not t or len(t) > 64 or "," in t:
            raise ConfigError(reason=f"field 'tags': tag {t!r} must be 1-64 characters without commas")
    positive = {
        "keepalive_s": (5, 3600),
        "reconnect_min_s": (0.01, 3600),
        "reconnect_max_s": (0.01, 86400),
        "telemetry_interval_s": (0.1, 86400),
        "max_message_bytes": (1024, 1 << 30),
        "max_chunk_bytes": (64, 1 << 30),
        "repair_after_s": (0.05, 3600),
        "transfer_timeout_s": (1, 7 * 86400),
        "bitmap_flush_chunks": (1, 1 << 20),
        "bitmap_flush_s": (0.01, 3600),
    }
    for name, (low, high) in positive.items():
        value = getattr(cfg, name)
        if not low <= value <= high:
            raise ConfigError(reason=f"field {name!r} = {value} is out of range [{low}, {high}]")
    if cfg.reconnect_max_s < cfg.reconnect_min_s:
        raise ConfigError(reason="field 'reconnect_max_s' must be >= 'reconnect_min_s'")
    for name in ("shadow_share", "shadow_cpu"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ConfigError(
                reason=f"field {name!r} = {getattr(cfg, name)} must be a share in [0, 1] (0: off)"
            )
    for name in ("connect_timeout_s", "eval_interval_s", "failback_s", "shadow_s"):
        if getattr(cfg, name) < 0:
            raise ConfigError(reason=f"field {name!r} must be >= 0 (0 turns it off)")
    if not 0 <= cfg.http_port < 65536:
        raise ConfigError(reason=f"field 'http_port' = {cfg.http_port}: use 0 (any free port) to 65535")


def read_config_file(path: str) -> Dict[str, Any]:
    """Read a TOML config; keys may sit at the top level or in an `[agent]` table."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(reason=f"config file {path!r} does not exist") from None
    except OSError as exc:
        raise ConfigError(reason=f"config file {path!r} cannot be read: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(reason=f"config file {path!r} is not valid TOML: {exc}") from None
    agent = data.pop("agent", None)
    if isinstance(agent, dict):
        data.update(agent)
    return data


def load_config(path: Optional[str] = None, overrides: Optional[Mapping[str, Any]] = None) -> AgentConfig:
    """Merge the config file (if any) with flag overrides (non-None win) and validate every field."""
    values: Dict[str, Any] = read_config_file(path) if path else {}
    # A relative path in a config file means relative to that file, so units can ship beside it.
    base = Path(path).resolve().parent if path else Path.cwd()
    for key in ("trusted_keys", "trusted_key"):
        if key in values:
            raw = values.pop(key)
            raw_list: List[Any] = raw if isinstance(raw, list) else [raw]
            values["trusted_keys"] = [str(base / p) if isinstance(p, str) else p for p in raw_list]
    for key in ("state_dir", "tls_ca", "tls_cert", "tls_key", "password_file"):
        if isinstance(values.get(key), str):
            values[key] = str(base / os.path.expanduser(values[key]))
    for key, value in (overrides or {}).items():
        if value is not None and value != ():
            values[key] = value
    if isinstance(values.get("broker"), (list, tuple)):
        # `broker = ["mqtt://a", "mqtt://b"]` in TOML, or `--broker` given several times.
        values["broker"] = ",".join(str(u) for u in values["broker"])
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(reason=f"unknown field {unknown[0]!r}; known fields: {', '.join(sorted(_FIELDS))}")
    if values.get("emulate") and not values.get("profile"):
        # `--emulate rpi4b` alone means: behave like that profile on this machine.
        values["profile"] = values["emulate"]
    missing = [k for k in _REQUIRED if values.get(k) in (None, "", [], ())]
    if missing:
        flag = {"device_id": "--device-id", "profile": "--profile", "trusted_keys": "--trusted-key"}
        raise ConfigError(
            reason=f"field {missing[0]!r} is required: set it in the config file or pass {flag[missing[0]]}"
        )
    clean = {k: _coerce(k, v) for k, v in values.items()}
    if not clean.get("state_dir"):
        clean["state_dir"] = str(agent_state_dir(str(clean["device_id"])))
    clean["state_dir"] = os.path.expanduser(clean["state_dir"])
    cfg = AgentConfig(**clean)
    _validate(cfg)
    return cfg


def config_fields() -> List[Tuple[str, str, Any]]:
    """(name, type, default) of every field, for the docs' config reference."""
    out = []
    for f in dataclasses.fields(AgentConfig):
        default = None if f.default is dataclasses.MISSING else f.default
        out.append((f.name, _type_name(f.type), default))
    return out


__all__ = [
    "AgentConfig",
    "ConfigError",
    "config_fields",
    "load_config",
    "read_config_file",
    "split_brokers",
    "url_host",
    "url_port",
]
