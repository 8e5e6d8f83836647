"""Start a local MQTT broker: mosquitto from a generated config when it is installed
(MQTT 5, shared subscriptions), else an embedded amqtt broker (MQTT 3.1.1 only) when
that package is installed. Used by `edgeqtl broker`, the demo and the test fixture.

`MosquittoBroker.secure(DIR)` serves a secure-broker directory instead (TLS, a login per
device, ACLs: edgeqtl/security.py)."""
from __future__ import annotations

import dataclasses
import getpass
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .errors import EdgeqtlError


class BrokerStartError(EdgeqtlError, RuntimeError):
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
    """mosquitto on 127.0.0.1 from a generated config; stop() ends it. With secure_dir
    (see `secure`) the config and the log live in that directory and stay there."""

    shared_subscriptions = True
    protocol = 5
    port: int = 0
    max_packet_size: int | None = None
    extra_config: str = ""  # lines for the listener: certfile, password_file, ...
    allow_anonymous: bool = True
    host: str = "127.0.0.1"
    proc: subprocess.Popen | None = None
    workdir: Path | None = None  # the temporary folder of a plain broker, removed by stop()
    secure_dir: Path | None = None

    @classmethod
    def secure(cls, directory: str | Path, port: int | None = None, host: str = "127.0.0.1",
               max_packet_size: int | None = None) -> "MosquittoBroker":
        """mosquitto serving a directory made by edgeqtl.security.init_secure_dir: its
        TLS listener on `port` (default: the directory's, which its login files name)."""
        from .security import open_secure_dir

        layout = open_secure_dir(directory)
        return cls(port=port or layout.settings.port, host=host, max_packet_size=max_packet_size,
                   allow_anonymous=False, secure_dir=layout.root)

    def _plain_config(self) -> tuple[Path, Path]:
        self.workdir = Path(tempfile.mkdtemp(prefix="edgeqtl-mosquitto-"))
        # set_tcp_nodelay: the broker forwards small messages at once too (else ~44 ms each)
        conf = [f"listener {self.port} {self.host}", f"allow_anonymous {'true' if self.allow_anonymous else 'false'}", "persistence false", "set_tcp_nodelay true",
                "log_dest stderr", "log_type error", "log_type warning"]
        if self.max_packet_size:
            conf.append(f"max_packet_size {self.max_packet_size}")
        # Stay the current user: started as root, mosquitto would switch to the
        # 'mosquitto' account, which cannot read our private temp files.
        conf.append(f"user {getpass.getuser()}")
        conf.append(self.extra_config)
        (self.workdir / "mosquitto.conf").write_text("\n".join(conf) + "\n")
        return self.workdir / "mosquitto.conf", self.workdir / "mosquitto.log"

    def _secure_config(self) -> tuple[Path, Path]:
        from .security import mosquitto_config, open_secure_dir

        layout = open_secure_dir(self.secure_dir)
        text = mosquitto_config(layout, self.host, self.port, getpass.getuser(), self.max_packet_size)
        layout.config.write_text(text + (self.extra_config + "\n" if self.extra_config else ""))
        return layout.config, layout.log

    def start(self, timeout: float = 10.0) -> "MosquittoBroker":
        exe = find_mosquitto()
        if exe is None:
            raise BrokerStartError("mosquitto is not installed (Debian/Ubuntu: apt-get install mosquitto)")
        self.port = self.port or free_port()
        config, self.log_file = self._secure_config() if self.secure_dir is not None else self._plain_config()
        log_start = self.log_file.stat().st_size if self.log_file.exists() else 0  # a secure log is appended to
        self.log = open(self.log_file, "ab")
        self.proc = subprocess.Popen([exe, "-c", str(config)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.log.close()
                tail = self.log_file.read_bytes()[log_start:].decode(errors="replace").strip()
                raise BrokerStartError(f"mosquitto exited: {' | '.join(tail.splitlines()[-3:])[-500:]}")
            if self._listening(log_start):
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerStartError(f"mosquitto did not listen on {self.host}:{self.port} within {timeout} s")

    def _listening(self, log_start: int) -> bool:
        if self.secure_dir is not None:
            # its log says so (notice level): a probe connection would log a failed TLS handshake
            return b" running" in self.log_file.read_bytes()[log_start:]
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.secure_dir is not None else 'mqtt'}://{self.host}:{self.port}"

    def reload(self) -> None:
        """Make mosquitto read its password and ACL files again (SIGHUP): a login that
        was just provisioned works without a restart."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGHUP)

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
            self.workdir = None

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


@dataclasses.dataclass
class AmqttBroker:
    """The embedded fallback: amqtt (pure Python, MQTT 3.1.1, no shared subscriptions)
    in a thread with its own event loop. For demos where mosquitto is not installed."""

    port: int = 0
    host: str = "127.0.0.1"
    shared_subscriptions = False
    protocol = 311

    def start(self, timeout: float = 10.0) -> "AmqttBroker":
        import asyncio
        import threading

        try:
            import amqtt  # noqa: F401
        except ImportError:
            raise BrokerStartError("neither mosquitto nor amqtt is installed: apt-get install mosquitto, "
                                   "or pip install 'edgeqtl[demo]'") from None
        self.port = self.port or free_port()
        self._loop = None
        self._stop_event = None
        self._error: BaseException | None = None
        ready = threading.Event()

        async def serve():
            import logging

            from amqtt.broker import Broker

            # amqtt logs every client that disconnects abruptly at ERROR; a demo's devices come and go
            logging.getLogger("amqtt").setLevel(logging.CRITICAL)
            self._stop_event = asyncio.Event()
            # Anonymous auth only: the default plugin set adds $SYS topics (BrokerSysPlugin),
            # which nothing here reads and which warns that its psutil dependency is moving.
            broker = Broker({"listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                             "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}},
                            loop=asyncio.get_running_loop())
            await broker.start()
            ready.set()  # listening; no probe connection (amqtt would log it as a broken client)
            await self._stop_event.wait()
            await broker.shutdown()

        def run():
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(serve())
            except BaseException as e:  # reported by start()
                self._error = e
                ready.set()
            finally:
                # As asyncio.run does: cancel and finish what amqtt left running (the sessions
                # of clients that just left), so that no transport outlives the loop.
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                asyncio.set_event_loop(None)
                loop.close()

        self._thread = threading.Thread(target=run, name="edgeqtl-amqtt", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or self._error is not None:
            self.stop()
            raise BrokerStartError(f"amqtt did not listen on {self.host}:{self.port}: {self._error or 'timeout'}")
        return self

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}?protocol=3.1.1"

    def stop(self) -> None:
        if self._stop_event is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._stop_event.set)
        self._thread.join(5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def start_broker(port: int = 0, host: str = "127.0.0.1", max_packet_size: int | None = None):
    """mosquitto when installed, else the embedded amqtt broker."""
    if find_mosquitto() is not None:
        return MosquittoBroker(port=port, host=host, max_packet_size=max_packet_size).start()
    return AmqttBroker(port=port, host=host).start()
