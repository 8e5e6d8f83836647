"""Identity and ACLs on a real mosquitto (edgeqtl/security.py): TLS with the directory's
own CA, one login per device and server agent, ACLs by username. 127.0.0.1 only, every
wait bounded.

What mosquitto 2.0 does, as these tests see it:
  - a subscription to a topic the ACL does not let the client read is granted in the
    SUBACK (its acl_file does not check subscriptions), and nothing is ever delivered on
    it: read access is checked per message, on the message's own topic, for shared
    subscriptions too (so the ACL needs no `$share/...` line);
  - a publish the ACL forbids is dropped; MQTT 5 gets PUBACK 0x87 Not authorized, 3.1.1
    a normal PUBACK;
  - a missing or wrong password is CONNACK 0x87 Not authorized (MQTT 5).
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import queue
import re
import signal
import ssl
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from click.testing import CliRunner

from edgeqtl import security
from edgeqtl.broker import MosquittoBroker, find_mosquitto, free_port
from edgeqtl.cli.provision import provision
from edgeqtl.errors import EdgeqtlError
from edgeqtl.transport import (BrokerUnavailable, MqttEndpoint, RequestClient, Responder, reply_topic, request_topic,
                               server_request_topic, shared_request_subscription)
from edgeqtl.wire import FrameKind, json_frame, new_request_id

WAIT = 5.0  # seconds: the most any step waits for the broker
REFUSED = 1.5  # seconds an endpoint waits before it reports a refused connection
GRANTED_QOS_1, NOT_AUTHORIZED = 0x01, 0x87
ROOT = Path(__file__).resolve().parent.parent
PEER_IDS = itertools.count()  # one client id each: a repeated one would close the other's connection


def echo(frames):
    return [json_frame(FrameKind.ANSWER, {"echo": f.json()}, request_id=f.request_id, fingerprint=f.fingerprint)
            for f in frames]


def question(n: int):
    return json_frame(FrameKind.INFER_REQUEST, {"n": n}, request_id=new_request_id(), fingerprint=bytes(16))


@dataclasses.dataclass
class Fleet:
    """A secure broker directory served by mosquitto, with devices dev-a, dev-b and the
    server agent srv-1."""

    root: Path
    broker: MosquittoBroker
    logins: dict[str, security.Credentials]

    def config(self, name: str, **overrides):
        return self.logins[name].broker_config(**overrides)

    def peer(self, name: str, **overrides) -> "Peer":
        return peer_with(self.broker.port, self.logins[name], **overrides)


def peer_with(port: int, login: security.Credentials, **overrides) -> "Peer":
    fields = dict(username=login.username, password=login.password, ca_file=login.ca_file,
                  cert_file=login.cert_file, key_file=login.key_file)
    return Peer(port, **{**fields, **overrides})


def make_fleet(root: Path, mtls: bool = False) -> tuple[Path, dict[str, security.Credentials]]:
    security.init_secure_dir(root, port=free_port(), mtls=mtls)
    logins = {d: security.load_credentials(security.provision_device(root, d)) for d in ("dev-a", "dev-b")}
    logins["srv-1"] = security.load_credentials(security.provision_server(root, "srv-1"))
    return root, logins


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    if find_mosquitto() is None:
        pytest.fail("mosquitto is not installed; .ci/run installs it (apt-get install mosquitto)")
    root, logins = make_fleet(tmp_path_factory.mktemp("secure") / "broker")
    with MosquittoBroker.secure(root) as broker:
        yield Fleet(root, broker, logins)


class Peer:
    """A bare paho client, to see what the broker answers (the reason codes of CONNACK,
    SUBACK and PUBACK), which edgeqtl's endpoint keeps to itself."""

    def __init__(self, port: int, ca_file, username=None, password=None, cert_file=None, key_file=None,
                 protocol: int = 5, client_id: str | None = None):
        self.port = port
        self.events: queue.Queue = queue.Queue()  # CONNACK reason codes, or "disconnected"
        self.acks: queue.Queue = queue.Queue()  # SUBACK / PUBACK reason codes
        self.messages: queue.Queue = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"peer-{next(PEER_IDS)}",
                                  protocol=mqtt.MQTTv5 if protocol == 5 else mqtt.MQTTv311)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.tls_set(ca_certs=str(ca_file), certfile=cert_file and str(cert_file),
                            keyfile=key_file and str(key_file), tls_version=ssl.PROTOCOL_TLS_CLIENT)
        self.client.on_connect = lambda c, u, flags, rc, props: self.events.put(rc)
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.events.put("disconnected")
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.acks.put(codes[0].value)
        self.client.on_publish = lambda c, u, mid, rc, props: self.acks.put(rc.value)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload)))

    def connect(self) -> bool:
        """Whether the broker accepted the login (False: refused or hung up)."""
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        # this thread runs the network loop until the answer: a refused client then has no
        # background thread left retrying
        deadline = time.time() + WAIT
        while self.events.empty() and time.time() < deadline:
            self.client.loop(timeout=0.05)
        event = self.events.get_nowait()  # queue.Empty: no answer within WAIT
        if event == "disconnected" or event.is_failure:
            self.client.disconnect()
            self.refusal = event
            return False
        self.client.loop_start()
        return True

    def subscribe(self, topic: str) -> int:
        self.client.subscribe(topic, qos=1)
        return self.acks.get(timeout=WAIT)

    def publish(self, topic: str, payload: bytes) -> int:
        self.client.publish(topic, payload, qos=1)
        return self.acks.get(timeout=WAIT)

    def next_message(self) -> tuple[str, bytes]:
        return self.messages.get(timeout=WAIT)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self):
        assert self.connect(), f"the broker refused the login: {getattr(self, 'refusal', '?')}"
        return self

    def __exit__(self, *exc):
        self.close()


# --------------------------------------------------------------------------- ids, passwords, files


@pytest.mark.parametrize("bad", ["", "a/b", "a+b", "a#", "$SYS", "a:b", "a b", "a\nb", "tab\t", "..", ".",
                                 "x" * 65, "é" * 33])
def test_bad_ids_are_one_clear_line(bad):
    with pytest.raises(security.InvalidId) as e:
        security.check_id(bad)
    assert isinstance(e.value, EdgeqtlError) and "\n" not in str(e.value) and str(e.value).startswith("device id")


@pytest.mark.parametrize("good", ["pi-7", "jetson_nano.2", "é" * 32, "x" * 64])
def test_good_ids_pass(good):
    assert security.check_id(good) == good


def test_password_hash_is_mosquitto_passwds_format(tmp_path):
    ours = security.hash_password("correct horse")
    assert re.fullmatch(r"\$7\$101\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}==", ours)
    assert security.verify_password("correct horse", ours) and not security.verify_password("wrong", ours)
    tool = subprocess.run(["mosquitto_passwd", "-c", "-b", str(tmp_path / "p"), "u", "correct horse"],
                          capture_output=True, timeout=10)
    assert tool.returncode == 0, tool.stderr
    theirs = (tmp_path / "p").read_text().strip().split(":", 1)[1]
    assert security.verify_password("correct horse", theirs)  # the same scheme both ways


def test_directory_layout_and_certificates(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

    root = tmp_path / "broker"
    layout = security.init_secure_dir(root, hosts=["broker.lan", "10.0.0.5"], port=9883)
    login_file = security.provision_device(root, "pi-7")
    modes = {p.relative_to(root).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}
    assert modes == {"settings.json": 0o644, "ca.crt": 0o644, "ca.key": 0o600, "server.crt": 0o644,
                     "server.key": 0o600, "passwd": 0o600, "acl": 0o644, "devices": 0o700, "devices/pi-7": 0o700,
                     "devices/pi-7/ca.crt": 0o644, "devices/pi-7/edgeqtl-device.json": 0o600}
    assert stat.S_IMODE(root.stat().st_mode) == 0o700

    ca = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    assert security.certificate_hosts(cert) == ["broker.lan", "localhost", "10.0.0.5", "127.0.0.1"]
    cert.verify_directly_issued_by(ca)
    for c, years in ((ca, 10), (cert, 2)):
        assert isinstance(c.public_key().curve, ec.SECP256R1) and c.signature_hash_algorithm.name == "sha256"
        assert abs((c.not_valid_after_utc - c.not_valid_before_utc).days - 365 * years) < 5

    login = json.loads(login_file.read_text())
    assert login == {"role": "device", "id": "pi-7", "broker": "mqtts://broker.lan:9883", "username": "pi-7",
                     "ca_file": "ca.crt", "password": login["password"]}
    assert len(login["password"]) >= 32
    passwd = layout.passwd.read_text()
    assert passwd.startswith("pi-7:$7$101$") and login["password"] not in passwd

    # Asked again: nothing changes; what cannot be changed in place is one line naming the fix.
    assert security.init_secure_dir(root).settings == layout.settings
    with pytest.raises(security.SecurityError, match="without --mtls"):
        security.init_secure_dir(root, mtls=True)
    with pytest.raises(security.SecurityError, match="does not name other.lan.*delete"):
        security.init_secure_dir(root, hosts=["other.lan"])
    with pytest.raises(security.SecurityError, match="already has a login.*--replace"):
        security.provision_device(root, "pi-7")
    with pytest.raises(security.SecurityError, match="already a device"):
        security.provision_server(root, "pi-7")
    # A deleted server certificate is made again from the same CA, with the new names.
    layout.server_cert.unlink()
    layout.server_key.unlink()
    security.init_secure_dir(root, hosts=["other.lan"])
    renewed = x509.load_pem_x509_certificate(layout.server_cert.read_bytes())
    renewed.verify_directly_issued_by(ca)
    assert "other.lan" in security.certificate_hosts(renewed) and layout.settings.hosts[0] == "other.lan"


def test_own_ca_and_server_certificate_are_checked_and_copied(tmp_path):
    ca, ca_key = security.create_ca("our own CA")
    cert, key = security.issue_certificate(ca, ca_key, "mqtt.example.org", ("mqtt.example.org",))
    files = {"ca.crt": security.certificate_pem(ca), "ca.key": security.private_key_pem(ca_key),
             "server.crt": security.certificate_pem(cert), "server.key": security.private_key_pem(key),
             "other.key": security.private_key_pem(security.create_ca("x")[1])}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    own = {"ca_file": tmp_path / "ca.crt", "cert_file": tmp_path / "server.crt", "key_file": tmp_path / "server.key"}

    with pytest.raises(security.SecurityError, match="other.key is not the key of .*server.crt"):
        security.init_secure_dir(tmp_path / "a", **{**own, "key_file": tmp_path / "other.key"})
    with pytest.raises(security.SecurityError, match="--mtls .* give --ca-key"):
        security.init_secure_dir(tmp_path / "b", mtls=True, **own)
    with pytest.raises(security.SecurityError, match="does not name broker.lan"):
        security.init_secure_dir(tmp_path / "c", hosts=["broker.lan"], **own)
    layout = security.init_secure_dir(tmp_path / "d", **own)
    assert layout.server_cert.read_bytes() == files["server.crt"] and layout.ca_cert.read_bytes() == files["ca.crt"]
    assert not layout.ca_key.exists() and layout.settings.hosts[0] == "mqtt.example.org"
    assert stat.S_IMODE(layout.server_key.stat().st_mode) == 0o600
    assert json.loads(security.provision_device(layout.root, "pi-7").read_text())["broker"] == \
        "mqtts://mqtt.example.org:8883"


def test_a_folder_that_is_not_a_secure_dir_is_one_clear_line(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(security.SecurityError, match=r"not a secure broker directory.*edgeqtl broker --secure"):
        security.provision_device(tmp_path, "pi-7")
    with pytest.raises(security.SecurityError, match="exists and is not empty"):
        security.init_secure_dir(tmp_path)  # never made private and filled
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# --------------------------------------------------------------------------- on the broker


def test_mosquitto_accepts_the_password_hashes_written_here(fleet):
    assert fleet.root.joinpath("passwd").read_text().startswith("dev-a:$7$101$")
    with fleet.peer("dev-a"):
        pass  # connected: mosquitto verified the pure-Python PBKDF2 hash


@pytest.mark.parametrize("protocol", [5, 311], ids=["mqtt5", "mqtt311"])
def test_device_and_server_round_trip_through_the_shared_subscription(fleet, protocol):
    server = Responder(fleet.config("srv-1", protocol=protocol), echo, client_id="srv-1")
    with server, RequestClient(fleet.config("dev-a", protocol=protocol), "dev-a") as device:
        assert device.request(question(1), timeout=WAIT).json() == {"echo": {"n": 1}}
        # the decode steps' topic, named after the server agent
        assert device.request(question(2), timeout=WAIT, server_id="srv-1").json() == {"echo": {"n": 2}}
    assert server.served == 2


def test_device_cannot_read_another_devices_replies(fleet):
    with fleet.peer("dev-a") as a, fleet.peer("dev-b") as b, fleet.peer("srv-1") as srv:
        # mosquitto 2.0 grants the subscription and then delivers nothing on it
        assert a.subscribe(reply_topic("dev-b")) in (GRANTED_QOS_1, NOT_AUTHORIZED)
        assert a.subscribe(reply_topic("dev-a")) == GRANTED_QOS_1
        assert b.subscribe(reply_topic("dev-b")) == GRANTED_QOS_1
        srv.publish(reply_topic("dev-b"), b"for b")
        srv.publish(reply_topic("dev-a"), b"for a")
        assert b.next_message() == (reply_topic("dev-b"), b"for b")
        # one client's messages arrive in order: had "for b" reached A, it would be first
        assert a.next_message() == (reply_topic("dev-a"), b"for a")
        assert a.messages.empty()


@pytest.mark.parametrize("protocol", [5, 311], ids=["mqtt5", "mqtt311"])
def test_device_cannot_publish_as_another_device(fleet, protocol):
    with fleet.peer("dev-a", protocol=protocol) as a, fleet.peer("srv-1") as srv:
        srv.subscribe(request_topic("+"))
        srv.subscribe(server_request_topic("srv-1", "+"))
        forbidden = a.publish(request_topic("dev-b"), b"forged"), a.publish(server_request_topic("srv-1", "dev-b"),
                                                                           b"forged")
        # MQTT 5 is told; 3.1.1 has no way to say it, and the message is dropped all the same
        assert forbidden == ((NOT_AUTHORIZED, NOT_AUTHORIZED) if protocol == 5 else (0, 0))
        assert a.publish(request_topic("dev-a"), b"own") == 0
        assert srv.next_message() == (request_topic("dev-a"), b"own")
        assert srv.messages.empty()


def test_device_cannot_read_requests_even_through_the_servers_group(fleet):
    with fleet.peer("dev-a") as a, fleet.peer("dev-b") as b, fleet.peer("srv-1") as srv:
        a.subscribe(request_topic("+"))
        a.subscribe(shared_request_subscription())
        srv.subscribe(request_topic("+"))
        for n in range(3):
            assert b.publish(request_topic("dev-b"), b"q%d" % n) == 0
        assert [srv.next_message()[1] for _ in range(3)] == [b"q0", b"q1", b"q2"]
        time.sleep(0.2)  # A's copies, were any sent, would have left the broker with the server's
        assert a.messages.empty()


def test_no_or_wrong_credentials_are_refused(fleet):
    login = fleet.logins["dev-a"]
    for overrides in ({"username": None}, {"password": login.password[::-1]}, {"username": "nobody"}):
        peer = fleet.peer("dev-a", **overrides)
        assert not peer.connect(), overrides
        assert peer.refusal == "disconnected" or peer.refusal.value == NOT_AUTHORIZED
    with pytest.raises(BrokerUnavailable, match="refused the login .*check the username and password") as e:
        MqttEndpoint(fleet.config("dev-a", password="not-it"), "wrong-password").start(timeout=REFUSED)
    assert "\n" not in str(e.value) and "not-it" not in str(e.value)


@pytest.fixture
def wrong_ca(tmp_path):
    from cryptography.hazmat.primitives import serialization

    other, _ = security.create_ca("someone else's CA")
    (tmp_path / "other-ca.crt").write_bytes(other.public_bytes(serialization.Encoding.PEM))
    return tmp_path / "other-ca.crt"


def test_a_broker_certificate_from_another_ca_is_refused(fleet, wrong_ca):
    with pytest.raises(ssl.SSLCertVerificationError, match="certificate verify failed"):
        fleet.peer("dev-a", ca_file=wrong_ca).connect()
    with pytest.raises(BrokerUnavailable) as e:
        MqttEndpoint(fleet.config("dev-a", ca_file=str(wrong_ca)), "wrong-ca").start(timeout=REFUSED)
    assert "\n" not in str(e.value)


def test_a_wrong_ca_is_named_in_the_error(fleet, wrong_ca):
    with pytest.raises(BrokerUnavailable, match=r"certificate.*verif|verif.*certificate"):
        MqttEndpoint(fleet.config("dev-a", ca_file=str(wrong_ca)), "wrong-ca").start(timeout=REFUSED)


def test_mutual_tls_logs_in_by_certificate(tmp_path):
    root, logins = make_fleet(tmp_path / "mtls", mtls=True)
    assert not (root / "passwd").exists() and logins["dev-a"].password is None
    with MosquittoBroker.secure(root) as broker:
        fleet = Fleet(root, broker, logins)
        with Responder(fleet.config("srv-1"), echo, client_id="srv-1"), \
                RequestClient(fleet.config("dev-a"), "dev-a") as device:
            assert device.request(question(3), timeout=WAIT).json() == {"echo": {"n": 3}}
        # the certificate is the login: a username claimed beside it changes nothing
        with fleet.peer("dev-a", username="dev-b") as a, fleet.peer("srv-1") as srv:
            a.subscribe(reply_topic("dev-b"))
            a.subscribe(reply_topic("dev-a"))
            srv.publish(reply_topic("dev-b"), b"for b")
            srv.publish(reply_topic("dev-a"), b"for a")
            assert a.next_message() == (reply_topic("dev-a"), b"for a") and a.messages.empty()
        # no certificate: the TLS handshake is refused (the password alone counts for nothing)
        assert not fleet.peer("dev-a", cert_file=None, key_file=None, username="dev-a", password="x").connect()


# --------------------------------------------------------------------------- command line, logs


def test_provision_command_prints_no_password_and_the_broker_reloads(fleet):
    runner = CliRunner()
    result = runner.invoke(provision, ["dev-c", "--dir", str(fleet.root)])
    assert result.exit_code == 0, result.output
    login = security.load_credentials(fleet.root / "devices" / "dev-c" / security.DEVICE_FILE)
    assert login.password not in result.output and "edgeqtl-device.json holds its password" in result.output

    fleet.broker.reload()
    assert _connects_within(fleet.broker.port, login, WAIT)

    again = runner.invoke(provision, ["dev-c", "--dir", str(fleet.root)])
    assert again.exit_code == 1 and again.output.count("\n") == 1 and "--replace" in again.output
    bad = runner.invoke(provision, ["dev/c", "--dir", str(fleet.root)])
    assert bad.exit_code == 1 and bad.output.startswith("error: device id 'dev/c' contains '/'")

    replaced = runner.invoke(provision, ["dev-c", "--replace", "--dir", str(fleet.root)])
    assert replaced.exit_code == 0
    fleet.broker.reload()
    assert not _connects_within(fleet.broker.port, login, WAIT, want=False)  # the old password stops working
    new = security.load_credentials(fleet.root / "devices" / "dev-c" / security.DEVICE_FILE)
    assert new.password not in replaced.output and _connects_within(fleet.broker.port, new, WAIT)


def _connects_within(port: int, login: security.Credentials, seconds: float, want: bool = True) -> bool:
    """Try to log in until it works (want=True) or is refused (want=False): mosquitto
    reloads its files a moment after SIGHUP."""
    deadline = time.time() + seconds
    while True:
        peer = peer_with(port, login)
        ok = peer.connect()
        if ok:
            peer.close()
        if ok == want or time.time() > deadline:
            return ok
        time.sleep(0.1)


def test_broker_command_makes_the_directory_and_picks_up_new_logins(tmp_path):
    root, port = tmp_path / "broker", free_port()
    proc = subprocess.Popen([sys.executable, "-m", "edgeqtl.cli", "broker", "--secure", "--dir", str(root),
                             "--port", str(port)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    output = []

    def wait_for(text: str) -> None:
        while not any(text in line for line in output):
            output.append(lines.get(timeout=WAIT))

    try:
        wait_for(f"mosquitto listening on 127.0.0.1:{port}: TLS, passwords")
        assert (root / "settings.json").exists() and (root / "mosquitto.conf").exists()
        login = security.load_credentials(security.provision_device(root, "pi-7"))
        wait_for("reloaded the logins")
        assert _connects_within(port, login, WAIT)
    finally:
        proc.send_signal(signal.SIGTERM)  # stops mosquitto too
        proc.wait(WAIT)
    assert proc.returncode == 0, "".join(output)
    assert not _listening(port)
    assert login.password not in "".join(output)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_no_password_reaches_edgeqtls_own_log_lines_or_reprs(fleet, caplog):
    import logging

    caplog.set_level(logging.DEBUG)
    login = fleet.logins["dev-a"]
    with pytest.raises(BrokerUnavailable) as e:
        MqttEndpoint(fleet.config("dev-a", password="not-it-42"), "wrong-password-log").start(timeout=REFUSED)
    cfg = fleet.config("dev-a")
    with RequestClient(cfg, "dev-a") as dev:
        pass
    text = caplog.text + str(e.value) + repr(cfg) + cfg.describe()
    assert "connected to" in caplog.text and "CONNECT" in caplog.text  # ours and paho's packet log, at DEBUG
    assert login.password not in text and "not-it-42" not in text


def test_no_password_reaches_the_broker_log(fleet):
    """Last in the file: the log then holds every login, refusal and reload above."""
    log = fleet.root / "mosquitto.log"
    refusals = log.read_text().count("not authorised")
    wrong = fleet.logins["dev-a"].password[::-1]
    assert not fleet.peer("dev-a", password=wrong).connect()
    deadline = time.time() + WAIT
    while log.read_text().count("not authorised") == refusals and time.time() < deadline:
        time.sleep(0.05)  # mosquitto writes the line just after it answers
    text = log.read_text()
    assert "u'dev-a'" in text and "not authorised" in text  # the log is live and names clients
    passwords = [security.load_credentials(p).password for p in fleet.root.glob("*/*/edgeqtl-*.json")]
    assert len(passwords) >= 4
    for secret in [*passwords, wrong]:
        assert secret not in text
