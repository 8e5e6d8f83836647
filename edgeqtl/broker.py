"""Start a local MQTT broker: mosquitto from a generated config when it is installed
(MQTT 5, shared subscriptions), else an embedded amqtt broker (MQTT 3.1.1 only) when
that package is installed. Used by `edgeqtl broker`, the demo and the test fixture."""
from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path


class BrokerStartError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_mosquitto() -> str | None:
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")
                                              if Path(p).is_file()), None)


@dataclasses.dataclass
class MosquittoBroker:
    """mosquitto on 127.0.0.1 from a generated config; stop() ends it."""

    port: int = 0
    max_packet_size: int | None = None
    extra_config: str = ""
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None
    workdir: Path | None = None

    def start(self, timeout: float = 10.0) -> "MosquittoBroker":
        exe = find_mosquitto()
        if exe is None:
            raise BrokerStartError("mosquitto is not installed (Debian/Ubuntu: apt-get install mosquitto)")
        self.port = self.port or free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="edgeqtl-mosquitto-"))
        # set_tcp_nodelay: the broker forwards small messages at once too (else ~44 ms each)
        conf = [f"listener {self.port} {self.host}", "allow_anonymous true", "persistence false", "set_tcp_nodelay true",
                "log_dest stderr", "log_type error", "log_type warning"]
        if self.max_packet_size:
            conf.append(f"max_packet_size {self.max_packet_size}")
        conf.append(self.extra_config)
        (self.workdir / "mosquitto.conf").write_text("\n".join(conf) + "\n")
        self.log = open(self.workdir / "mosquitto.log", "wb")
        self.proc = subprocess.Popen([exe, "-c", str(self.workdir / "mosquitto.conf")], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise BrokerStartError(f"mosquitto exited: {(self.workdir / 'mosquitto.log').read_text()[-500:]}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise BrokerStartError(f"mosquitto did not listen on {self.host}:{self.port} within {timeout} s")

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "log", None):
            self.log.close()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def restart(self) -> None:
        """Stop and start again on the same port (for reconnect tests)."""
        port = self.port
        self.stop()
        self.port = port
        self.start()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
