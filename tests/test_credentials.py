"""`edgefleet credentials`: files and permissions, certificates, CRL, ACL text, config, and bad input."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from typer.testing import CliRunner

from edgefleet.sdk.cli import app
from edgefleet.sdk.trust.credentials import (
    Credentials,
    CredentialsError,
    acl_text,
    mosquitto_password_hash,
    verify_mosquitto_password,
)

FLEET = "plant-7"


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _cn(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _crl_serials(creds: Credentials) -> set[int]:
    crl = x509.load_pem_x509_crl(creds.layout.crl.read_bytes())
    return {r.serial_number for r in crl}


@pytest.fixture
def creds(tmp_path: Path) -> Credentials:
    """Certificate-mode credentials with two devices and two broker host names."""
    made = Credentials.init(tmp_path / "creds", FLEET, broker_hosts=["broker.lan", "10.0.0.5"])
    made.add_devices(["pi-1", "pi-2"])
    return made


def test_init_and_add_write_every_file_with_private_keys_0600(creds: Credentials) -> None:
    lay = creds.layout
    secrets = [
        lay.ca_key,
        lay.server_key,
        creds.host().key,
        creds.device("pi-1").key,
        creds.device("pi-2").key,
    ]
    for key in secrets:
        assert key is not None and _mode(key) == 0o600, key
        assert b"PRIVATE KEY" in key.read_bytes()
    for folder in (lay.ca_key.parent, lay.host_dir, lay.device_dir("pi-1")):
        assert _mode(folder) == 0o700, folder
    for public in (lay.ca_cert, lay.broker_ca, lay.server_cert, lay.crl, lay.acl, creds.device("pi-1").cert):
        assert public is not None and _mode(public) == 0o644, public
    # The state file names identities and serials, never a private key.
    assert _mode(lay.state) == 0o600
    state = lay.state.read_text()
    assert "PRIVATE KEY" not in state
    assert sorted(json.loads(state)["devices"]) == ["pi-1", "pi-2"]
    assert (lay.device_dir("pi-1") / "ca.crt").read_bytes() == lay.ca_cert.read_bytes()


def test_certificates_chain_to_the_ca_with_cn_usage_and_sans(creds: Credentials) -> None:
    ca = _cert(creds.layout.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    device = _cert(creds.device("pi-2").cert)  # type: ignore[arg-type]
    host = _cert(creds.host().cert)  # type: ignore[arg-type]
    server = _cert(creds.layout.server_cert)
    # The host certificate comes from the host CA, so the device listener (fleet CA) refuses it and
    # the host listener (host CA) refuses every device certificate.
    host_ca = _cert(creds.layout.host_ca_cert)
    assert host_ca.subject != ca.subject and _cert(creds.layout.broker_host_ca) == host_ca
    host.verify_directly_issued_by(host_ca)
    with pytest.raises((ValueError, InvalidSignature)):
        device.verify_directly_issued_by(host_ca)
    for leaf, issuer in ((device, ca), (host, host_ca), (server, ca)):
        leaf.verify_directly_issued_by(issuer)  # raises if the signature or issuer is wrong
        assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert leaf.not_valid_after_utc <= ca.not_valid_after_utc
    assert _cn(device) == "pi-2"
    assert _cn(host) == "edgefleet-host"
    eku = device.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"broker.lan", "localhost"}
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"10.0.0.5", "127.0.0.1", "::1"}
    assert _cn(server) == "broker.lan"
    # Every certificate gets its own serial: the CRL revokes by serial.
    serials = {device.serial_number, host.serial_number, server.serial_number, ca.serial_number}
    assert len(serials) == 4


def test_acl_binds_device_topics_to_the_username_and_gives_the_host_the_fleet() -> None:
    text = acl_text(FLEET, "hq")
    rules = [line for line in text.splitlines() if line and not line.startswith("#")]
    p = f"edgefleet/v1/{FLEET}"
    assert rules == [
        f"pattern write {p}/dev/%u/state",
        f"pattern write {p}/dev/%u/evt",
        f"pattern write {p}/dev/%u/telemetry",
        f"pattern read {p}/dev/%u/cmd",
        f"pattern read {p}/dev/%u/chunk/#",
        f"pattern read {p}/artifact/#",
        "user hq",
        f"topic read {p}/#",
        f"topic write {p}/dev/+/cmd",
        f"topic write {p}/dev/+/chunk/#",
        f"topic write {p}/artifact/#",
        f"topic write {p}/host/#",
    ]
    # Devices never get write access to commands, chunks or artifacts, nor any readwrite rule.
    device_rules = [r for r in rules if r.startswith("pattern")]
    assert not any("write" in r and ("/cmd" in r or "chunk" in r or "artifact" in r) for r in device_rules)
    assert "readwrite" not in text


def _allowed(acl: str, user: str, topic: str, access: str) -> bool:
    """Mosquitto's acl_file rules, evaluated: `pattern` lines for everyone, `topic` lines per `user`."""
    from paho.mqtt.client import topic_matches_sub

    current: str | None = None
    for line in acl.splitlines():
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        if parts[0] == "user":
            current = parts[1]
            continue
        if parts[0] == "pattern":
            rule_access, rule = parts[1], parts[2].replace("%u", user)
        elif parts[0] == "topic" and current == user:
            rule_access, rule = parts[1], parts[2]
        else:
            continue
        if rule_access in (access, "readwrite") and topic_matches_sub(rule, topic):
            return True
    return False


def test_the_acl_allows_exactly_the_protocol_topics() -> None:
    from edgefleet.agent.core.protocol import Topics

    acl = acl_text(FLEET)
    sha = "a" * 64
    mine, other = Topics(FLEET, "pi-1"), Topics(FLEET, "pi-2")
    foreign = Topics("other-fleet", "pi-1")
    for topic in (mine.state, mine.evt, mine.telemetry):
        assert _allowed(acl, "pi-1", topic, "write")
        assert not _allowed(acl, "pi-2", topic, "write")
        assert not _allowed(acl, "pi-1", topic, "read")  # a device never reads its peers' reports
        assert _allowed(acl, "edgefleet-host", topic, "read")
        assert not _allowed(acl, "edgefleet-host", topic, "write")  # the host never speaks for a device
    for topic in (mine.cmd, mine.repair(sha, 7)):
        assert _allowed(acl, "pi-1", topic, "read")
        assert not _allowed(acl, "pi-2", topic, "read")
        assert not _allowed(acl, "pi-1", topic, "write")
        assert _allowed(acl, "edgefleet-host", topic, "write")
    assert _allowed(acl, "pi-1", mine.artifact(sha, 0), "read")
    assert not _allowed(acl, "pi-1", mine.artifact(sha, 0), "write")
    assert _allowed(acl, "edgefleet-host", mine.artifact(sha, 0), "write")
    for topic in (other.cmd, other.repair(sha, 0), other.state):
        assert not _allowed(acl, "pi-1", topic, "read") and not _allowed(acl, "pi-1", topic, "write")
    for topic in (foreign.state, foreign.cmd, foreign.artifact(sha, 0)):
        for user in ("pi-1", "edgefleet-host"):
            assert not _allowed(acl, user, topic, "read") and not _allowed(acl, user, topic, "write")


def test_mosquitto_conf_has_a_device_and_a_host_tls_listener_and_every_file(creds: Credentials) -> None:
    text = creds.mosquitto_conf(port=18883, bind="127.0.0.1")
    lines = text.splitlines()
    assert [line for line in lines if line.startswith("listener")] == [
        "listener 18883 127.0.0.1",
        "listener 18884 127.0.0.1",
    ]
    device_part, host_part = text.split("listener 18884")
    for part in (device_part, host_part):
        for needed in (
            "allow_anonymous false",
            "require_certificate true",
            "use_identity_as_username true",
            "tls_version tlsv1.2",
        ):
            assert needed in part.splitlines()
    # Devices get their CN as client id; the host keeps its own ids, on a listener of the host CA.
    assert "use_username_as_clientid true" in device_part and "use_username_as_clientid" not in host_part
    assert f"cafile {creds.layout.broker_host_ca.resolve()}" in host_part.splitlines()
    assert f"cafile {creds.layout.broker_ca.resolve()}" in device_part.splitlines()
    files = {
        line.split()[0]: Path(line.split(maxsplit=1)[1])
        for line in lines
        if line.split()[:1] and line.split()[0] in ("cafile", "certfile", "keyfile", "crlfile", "acl_file")
    }
    assert set(files) == {"cafile", "certfile", "keyfile", "crlfile", "acl_file"}
    assert all(p.is_absolute() and p.is_file() for p in files.values())
    assert creds.mosquitto_conf(port=18883, host_port=9999).count("listener 9999\n") == 1
    with pytest.raises(CredentialsError, match="--host-port"):
        creds.mosquitto_conf(port=18883, host_port=18883)
    # --base rewrites the paths for a broker machine where the folder lies elsewhere.
    moved = creds.mosquitto_conf(base="/etc/mosquitto/edgefleet")
    assert "cafile /etc/mosquitto/edgefleet/ca.crt" in moved
    assert "crlfile /etc/mosquitto/edgefleet/crl.pem" in moved
    # The broker folder alone is enough: no path leads into ca/ where the CA key lies.
    assert all(p.parent == creds.layout.broker_dir.resolve() for p in files.values())
    assert "listener 8883\n" in moved
    with pytest.raises(CredentialsError, match="--port"):
        creds.mosquitto_conf(port=0)


def test_revoke_puts_the_serial_in_the_crl_and_readding_issues_a_new_certificate(creds: Credentials) -> None:
    old = _cert(creds.device("pi-1").cert).serial_number  # type: ignore[arg-type]
    assert _crl_serials(creds) == set()
    creds.revoke(["pi-1"])
    assert _crl_serials(creds) == {old}
    crl = x509.load_pem_x509_crl(creds.layout.crl.read_bytes())
    assert crl.is_signature_valid(_cert(creds.layout.ca_cert).public_key())  # type: ignore[arg-type]
    assert crl.next_update_utc == _cert(creds.layout.ca_cert).not_valid_after_utc
    assert {d["id"]: d["status"] for d in creds.devices()} == {"pi-1": "revoked", "pi-2": "active"}
    # Rotation: a revoked id may get new credentials; the old serial stays revoked.
    creds.add_devices(["pi-1"])
    new = _cert(creds.device("pi-1").cert).serial_number  # type: ignore[arg-type]
    assert new != old
    creds.revoke(["pi-2"])
    assert old in _crl_serials(creds) and new not in _crl_serials(creds)
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    later = x509.load_pem_x509_crl(creds.layout.crl.read_bytes())
    assert later.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > number


@pytest.mark.parametrize(
    ("ids", "message"),
    [
        (["pi-1"], "already has credentials"),
        (["new-1", "new-1"], "given twice"),
        (["a/b"], "not usable"),
        (["+"], "not usable"),
        (["dev#"], "not usable"),
        (["-lead"], "not usable"),
        ([""], "not usable"),
        (["x" * 129], "not usable"),
        (["edgefleet-host"], "host identity"),
        ([], "at least one"),
    ],
)
def test_bad_device_ids_are_refused_before_anything_is_written(
    creds: Credentials, ids: list[str], message: str
) -> None:
    before = creds.layout.state.read_text()
    with pytest.raises(CredentialsError, match=message):
        creds.add_devices(["fresh-1", *ids] if ids else [])
    assert creds.layout.state.read_text() == before
    assert not creds.layout.device_dir("fresh-1").exists()


def test_revoke_refuses_unknown_and_already_revoked_devices(creds: Credentials) -> None:
    before = creds.layout.crl.read_bytes()
    with pytest.raises(CredentialsError, match="'ghost' has no credentials.*pi-1, pi-2"):
        creds.revoke(["pi-1", "ghost"])
    assert creds.layout.crl.read_bytes() == before  # nothing revoked when one id is wrong
    creds.revoke(["pi-2"])
    with pytest.raises(CredentialsError, match="already revoked"):
        creds.revoke(["pi-2"])
    with pytest.raises(CredentialsError, match="no credentials"):
        creds.device("ghost")


def test_init_refuses_to_overwrite_and_bad_settings(tmp_path: Path, creds: Credentials) -> None:
    ca_before = creds.layout.ca_cert.read_bytes()
    with pytest.raises(CredentialsError, match="already holds credentials"):
        Credentials.init(creds.root, FLEET)
    assert creds.layout.ca_cert.read_bytes() == ca_before
    redone = Credentials.init(creds.root, FLEET, force=True)
    assert redone.layout.ca_cert.read_bytes() != ca_before and redone.devices() == []
    # The old CA's device folders are set aside, not deleted, and not mistaken for current ones.
    assert not redone.layout.device_dir("pi-1").exists()
    (aside,) = creds.root.glob("devices.replaced-*")
    assert (aside / "pi-1" / "client.key").is_file()
    for kwargs, message in (
        ({"fleet": "a/b"}, "--fleet"),
        ({"fleet": FLEET, "auth": "token"}, "--auth"),
        ({"fleet": FLEET, "broker_hosts": ["bad host!"]}, "--broker-host"),
        ({"fleet": FLEET, "host_name": "h#"}, "--host-name"),
        ({"fleet": FLEET, "days": 0}, "--days"),
    ):
        with pytest.raises(CredentialsError, match=message):
            Credentials.init(tmp_path / "other", **kwargs)
    with pytest.raises(CredentialsError, match="credentials init"):
        Credentials.open(tmp_path / "nowhere")


def test_password_mode_writes_a_mosquitto_passwd_file(tmp_path: Path) -> None:
    creds = Credentials.init(tmp_path / "pw", FLEET, auth="password")
    creds.add_devices(["pi-1", "pi-2"])
    # Devices in one file (the device listener's), the host alone in another (the host listener's).
    entries = dict(line.split(":", 1) for line in creds.layout.passwd.read_text().splitlines())
    assert sorted(entries) == ["pi-1", "pi-2"]
    host_entries = dict(line.split(":", 1) for line in creds.layout.host_passwd.read_text().splitlines())
    assert sorted(host_entries) == ["edgefleet-host"]
    entries.update(host_entries)
    assert _mode(creds.layout.passwd) == 0o600 and _mode(creds.layout.host_passwd) == 0o600
    for name, ident in (("pi-1", creds.device("pi-1")), ("edgefleet-host", creds.host())):
        assert ident.cert is None and ident.password_file is not None
        assert _mode(ident.password_file) == 0o600
        password = ident.password_file.read_text().strip()
        assert entries[name].startswith("$7$101$")
        assert verify_mosquitto_password(entries[name], password)
        assert not verify_mosquitto_password(entries[name], password + "x")
        assert password not in creds.layout.state.read_text()
    conf = creds.mosquitto_conf()
    assert f"password_file {creds.layout.passwd.resolve()}" in conf
    assert f"password_file {creds.layout.host_passwd.resolve()}" in conf
    assert "require_certificate false" in conf and "crlfile" not in conf
    creds.revoke(["pi-1"])
    assert "pi-1:" not in creds.layout.passwd.read_text()
    assert "pi-2:" in creds.layout.passwd.read_text()


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd is not installed")
def test_our_hash_check_reads_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    passwd.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "alice", "s3cret"], check=True, timeout=30)
    entry = passwd.read_text().strip().split(":", 1)[1]
    assert verify_mosquitto_password(entry, "s3cret")
    # Same layout both ways: $7$ rounds $ base64(12-byte salt) $ base64(64-byte PBKDF2-SHA512).
    ours = mosquitto_password_hash("s3cret")
    assert [len(p) for p in ours.split("$")] == [len(p) for p in entry.split("$")]


def test_agent_toml_loads_into_the_agent_config_with_the_device_files(creds: Credentials) -> None:
    from edgefleet.agent.config import load_config

    ident = creds.device("pi-1")
    key = ident.folder / "fleet.pub"
    key.write_text("placeholder")
    cfg = load_config(str(ident.folder / "agent.toml"), {"profile": "rpi4b", "trusted_keys": [str(key)]})
    assert (cfg.device_id, cfg.fleet, cfg.broker) == ("pi-1", FLEET, "mqtts://broker.lan:8883")
    assert (cfg.tls_ca, cfg.tls_cert, cfg.tls_key) == (str(ident.ca), str(ident.cert), str(ident.key))
    assert cfg.use_tls


def test_cli_init_add_list_revoke_and_conf(tmp_path: Path) -> None:
    runner = CliRunner()
    d = tmp_path / "c"
    result = runner.invoke(app, ["credentials", "init", "--fleet", FLEET, "--out", str(d), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["host"]["tls_cert"] == str(d / "host" / "host.crt")
    result = runner.invoke(app, ["credentials", "add-device", "a1", "a2", "--dir", str(d)])
    assert result.exit_code == 0, result.output
    assert (d / "devices" / "a2" / "client.key").is_file()
    result = runner.invoke(app, ["credentials", "add-device", "a1", "--dir", str(d)])
    assert result.exit_code == 1 and "already has credentials" in result.output
    result = runner.invoke(app, ["credentials", "revoke", "nope", "--dir", str(d)])
    assert result.exit_code == 1 and "nothing to revoke" in result.output
    result = runner.invoke(app, ["credentials", "revoke", "a1", "--dir", str(d)])
    assert result.exit_code == 0 and "kill -HUP" in result.output
    result = runner.invoke(app, ["credentials", "list", "--dir", str(d), "--json"])
    listed = {row["id"]: row["status"] for row in json.loads(result.output)["devices"]}
    assert listed == {"a1": "revoked", "a2": "active"}
    conf = tmp_path / "out" / "mosquitto.conf"
    result = runner.invoke(
        app, ["credentials", "mosquitto-conf", "--dir", str(d), "--port", "9883", "--write", str(conf)]
    )
    assert result.exit_code == 0, result.output
    assert "listener 9883\n" in conf.read_text()
    result = runner.invoke(app, ["credentials", "list", "--dir", str(tmp_path / "missing")])
    assert result.exit_code == 1 and "credentials init" in result.output


def test_device_ids_with_the_host_client_id_prefix_are_refused(creds: Credentials) -> None:
    # The device listener makes a device's id its client id; host connections use edgefleet-* ids.
    with pytest.raises(CredentialsError, match="edgefleet-"):
        creds.add_devices(["edgefleet-ingest-x"])
    assert "edgefleet-ingest-x" not in {d["id"] for d in creds.devices()}


def test_a_folder_made_before_the_host_listener_is_upgraded_by_mosquitto_conf(creds: Credentials) -> None:
    # prepare: what an older version left: no host CA, the host certificate from the fleet CA
    creds.layout.host_ca_cert.unlink()
    creds.layout.broker_host_ca.unlink()
    del creds.state["host_ca"]
    creds._save()
    old = Credentials.open(creds.root)
    # act
    changed = old.upgrade_host_listener()
    conf = old.mosquitto_conf()
    # assert: a new host CA signs a new host certificate; nothing to do the second time
    assert changed and not old.upgrade_host_listener()
    host_ca = _cert(creds.layout.host_ca_cert)
    _cert(old.host().cert).verify_directly_issued_by(host_ca)  # type: ignore[arg-type]
    assert f"cafile {creds.layout.broker_host_ca.resolve()}" in conf
