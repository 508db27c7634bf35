"""The registration service: AWS IoT Core's Just-In-Time Registration on a local Mosquitto.

Devices connect to the service's port; it relays every byte to Mosquitto, which terminates
mutual TLS (chains to a registered CA, CRL) and enforces the topic ACL. On the way the service
reads the client certificate from the TLS 1.2 handshake (``tap``) and decides before any MQTT
byte passes:

- an ACTIVE certificate goes on;
- a certificate seen for the first time is recorded PENDING_ACTIVATION, a registration event is
  published on ``$aws/events/certificates/registered/<caCertificateId>`` and handled by the
  activation policy (``jitr``); as at AWS, that first connection is closed and the device retries;
- a pending certificate is handled again (the event repeats); a REVOKED one is closed.

Revocation takes effect at once: the service closes the live connections of a certificate the
moment the registry says REVOKED (and Mosquitto refuses it at the handshake once the CRL has it).

Before a client's handshake is through it is untrusted and cheap to fake, so the service bounds
what it may hold (``Limits``): its first byte within the idle timeout, the clear part of its
handshake within the handshake timeout, so many handshakes in progress per source address, so
many connections in all. Over a limit a connection is accepted and reset at once: the listener
keeps accepting, so a flood from one address never stops a device from another one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509

from stampline.cloud import broker, jitr
from stampline.cloud.registry import ACTIVE, PENDING, REVOKED, Registry, fingerprint
from stampline.cloud.tap import CertificateTap, TapError
from stampline.errors import StamplineError, UsageError
from stampline.pki.x509 import load_certificate

log = logging.getLogger(__name__)
POLL_SECONDS = 0.2
LOG_EVERY = 10.0  # seconds between two log lines about closed connections of one reason
LIMITS_FILE = "limits.json"


@dataclass(frozen=True)
class Limits:
    """What clients may hold of the service before their TLS handshake is through."""

    handshake_timeout: float = 10.0  # seconds from accept to the client's ChangeCipherSpec
    idle_timeout: float = 5.0  # seconds from accept to the client's first byte
    max_per_source: int = 64  # handshakes in progress from one source address
    max_connections: int = 1024  # connections in all, in the handshake or relayed

    def __post_init__(self) -> None:
        for name in ("handshake_timeout", "idle_timeout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value <= 3600:
                raise UsageError(f"--{name.replace('_', '-')} must be more than 0 and at most 3600 seconds.")
        for name in ("max_per_source", "max_connections"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1_000_000:
                raise UsageError(f"--{name.replace('_', '-')} must be a whole number from 1 to 1000000.")

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: Path) -> Limits:
        """The limits in ``path``; the defaults if there is none."""
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError):
            raise StamplineError(f"{path} is not a limits file; run 'stampline endpoint up' again.") from None
        if not isinstance(raw, dict):
            raise StamplineError(f"{path} is not a limits file; run 'stampline endpoint up' again.")
        return cls(**{f.name: raw[f.name] for f in fields(cls) if f.name in raw})


class RegistrationService:
    def __init__(self, workdir: Path, limits: Limits | None = None) -> None:
        self.files = broker.EndpointFiles(workdir)
        self.ports = self.files.ports()
        self.limits = limits if limits is not None else Limits.load(self.files.path(LIMITS_FILE))
        self.registry = Registry(self.files.path("registry.sqlite"))
        self.live: dict[str, set[asyncio.StreamWriter]] = {}
        self.connections = 0  # open client connections
        self.handshaking: Counter[str] = Counter()  # source address -> connections in the handshake
        self.closed: Counter[str] = Counter()  # reason -> connections refused or timed out
        self._logged: dict[str, float] = {}
        self._events: mqtt.Client | None = None
        self._crl_cache: list[x509.CertificateRevocationList] = []
        self._crl_stamp: int | None = None
        self._stop: asyncio.Event | None = None

    # -- decisions (run in a worker thread: they touch SQLite and cryptography) -------------------

    def _decide(self, chain: list[bytes]) -> tuple[bool | None, str]:
        """(go on, certificate id); None: not from a registered CA — the handshake goes on so that
        Mosquitto refuses a foreign chain itself, and the service closes whatever it lets through."""
        try:
            leaf = load_certificate(chain[0], "device certificate")
        except (StamplineError, IndexError):
            return False, ""
        cert_id = fingerprint(leaf)
        state = self.registry.state(cert_id)
        if state == ACTIVE:
            return True, cert_id
        if state == REVOKED:
            return None, cert_id  # Mosquitto refuses it in the handshake once its CRL lists it; closed anyway
        ca_id = self.registry.ca_id_for(leaf)
        if ca_id is None:
            return None, cert_id  # not from a registered CA: let Mosquitto's handshake say no
        with self.registry.transaction():
            event = self.registry.first_connection(leaf, ca_id)
            first = event is not None
            if event is None:
                event = {"certificateId": cert_id, "caCertificateId": ca_id, "certificateStatus": PENDING}
            state = jitr.handle_registration_event(event, self.registry, self._crls())
        self._publish(broker.EVENT_TOPIC.format(ca_id=ca_id), event)
        # AWS closes the first connection of a new certificate; later ones go on once activated
        return (state == ACTIVE and not first), cert_id

    def _crls(self) -> list[x509.CertificateRevocationList]:
        """The CRL file, parsed again only when it changed."""
        path = self.files.path("crl.pem")
        stamp = path.stat().st_mtime_ns if path.exists() else 0
        if self._crl_stamp != stamp:
            self._crl_cache, self._crl_stamp = self.files.crls(), stamp
        return self._crl_cache

    # -- the relay --------------------------------------------------------------------------

    def _refusal(self, source: str) -> tuple[str, str] | None:
        """Why a new connection from ``source`` is over a limit (kind, detail); None if it is not."""
        if self.connections >= self.limits.max_connections:
            return "connection limit", f"{self.connections} connections open"
        if self.handshaking[source] >= self.limits.max_per_source:
            return "per-source limit", f"{self.handshaking[source]} handshakes in progress from it"
        return None

    def _note(self, kind: str, detail: str, source: str) -> None:
        """Count a connection closed by a limit; log at most one line per kind every LOG_EVERY seconds
        (the source address and what happened, never a byte the client sent)."""
        self.closed[kind] += 1
        now = time.monotonic()
        if now - self._logged.get(kind, -LOG_EVERY) >= LOG_EVERY:
            self._logged[kind] = now
            log.warning("closed a connection from %s: %s: %s (%d so far)", source, kind, detail, self.closed[kind])

    def _settle(self, source: str) -> None:
        self.handshaking[source] -= 1
        if self.handshaking[source] <= 0:
            del self.handshaking[source]

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        source = str(peer[0]) if peer else "?"
        refusal = self._refusal(source)
        if refusal is not None:
            self._note(*refusal, source)
            _reset(writer)
            return
        self.connections += 1
        self.handshaking[source] += 1
        handshaking = True
        loop = asyncio.get_running_loop()
        accepted = loop.time()
        up_writer: asyncio.StreamWriter | None = None
        down: asyncio.Task[None] | None = None
        tap = CertificateTap()
        decided = False
        cert_id = ""
        try:
            while not tap.done:  # the clear part of the handshake, against the clock
                idle = up_writer is None  # no byte yet
                limit = min(self.limits.idle_timeout, self.limits.handshake_timeout) if idle \
                    else self.limits.handshake_timeout
                try:
                    async with asyncio.timeout_at(accepted + limit):
                        data = await reader.read(65536)
                except TimeoutError:
                    self._note("idle timeout" if idle else "handshake timeout",
                               f"{'no byte' if idle else 'the handshake not through'} after {limit:g} s", source)
                    return
                if not data:
                    return
                if up_writer is None:  # only a client that speaks costs a connection to Mosquitto
                    up_reader, up_writer = await asyncio.open_unix_connection(self.ports.internal)
                    down = asyncio.create_task(_pump(up_reader, writer))
                try:  # read the certificate on its way to Mosquitto
                    tap.feed(data)
                except TapError as exc:
                    self._note("malformed handshake", str(exc), source)
                    return
                if tap.chain is not None and not decided:
                    decided = True
                    allowed, cert_id = await loop.run_in_executor(None, self._decide, tap.chain)
                    if allowed is None:
                        up_writer.write(data)
                        await up_writer.drain()
                        if down is not None:
                            await asyncio.wait([down], timeout=2.0)  # Mosquitto's alert reaches the client
                        return
                    if not allowed:
                        return
                    self.live.setdefault(cert_id, set()).add(writer)
                elif tap.done and tap.chain is None:
                    return  # no client certificate: Mosquitto would refuse it anyway
                up_writer.write(data)
                await up_writer.drain()
            handshaking = False
            self._settle(source)
            assert up_writer is not None
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()
        except OSError:  # ConnectionError, or Mosquitto's socket gone
            pass
        except Exception:  # never let one connection take the listener down
            log.exception("a connection from %s failed", source)
        finally:
            if handshaking:
                self._settle(source)
            self.connections -= 1
            if cert_id:
                self.live.get(cert_id, set()).discard(writer)
            if down is not None:
                down.cancel()
            writer.close()
            if up_writer is not None:
                up_writer.close()

    async def _watch_revocations(self) -> None:
        known: set[str] = set()
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(POLL_SECONDS)
            revoked = {d.cert_id for d in await loop.run_in_executor(None, self.registry.devices, REVOKED)}
            for cert_id in revoked - known:
                for writer in list(self.live.pop(cert_id, set())):
                    writer.close()  # loses its permissions at once
            known = revoked

    # -- events and hellos on the broker --------------------------------------------------------

    def _events_client(self) -> mqtt.Client:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="stampline-registration-service",
                             protocol=mqtt.MQTTv311, transport="unix")
        context = ssl.create_default_context(cafile=str(self.files.path("server-ca.pem")))
        context.check_hostname = False  # a Unix socket in our own 0700 directory: the path is the identity
        context.load_cert_chain(str(self.files.path("service.pem")), str(self.files.path("service.key")))
        client.tls_set_context(context)

        def on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
            log.info("event connection up: %s", reason)
            c.subscribe("devices/+/hello", qos=1)

        def on_message(c: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
            serial = message.topic.split("/")[1]
            try:
                self.registry.record_hello(serial, message.payload[:512].decode(errors="replace"))
            except Exception:  # never let a database hiccup stop the event loop of this client
                log.exception("could not record the hello of %s", serial)

        client.on_connect = on_connect
        client.on_message = on_message
        client.on_disconnect = lambda c, u, flags, reason, props: log.info("event connection lost: %s", reason)
        client.reconnect_delay_set(min_delay=0.1, max_delay=1)  # the broker restarts when a CA is registered
        return client

    def _connect_events(self) -> None:
        """Connect (a fresh client per attempt: a failed first connect leaves paho's socket unusable),
        then let the client's loop reconnect by itself."""
        deadline = time.monotonic() + 60
        while True:
            # probe with a socket of our own first: a failed paho connect on a Unix socket closes a
            # file descriptor it no longer owns (seen: the event loop's own pipe)
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.settimeout(1)
                    probe.connect(self.ports.admin)
                client = self._events_client()
                client.connect(self.ports.admin)
                break
            except (OSError, ssl.SSLError) as exc:
                if time.monotonic() > deadline:
                    log.error("cannot reach Mosquitto's service listener: %s", exc)
                    return
                time.sleep(0.1)
        client.loop_start()
        self._events = client  # only now: publishing must never wait on a connection being made

    def _publish(self, topic: str, payload: dict[str, Any]) -> None:
        """Best effort: the event is in the registry's journal whether or not it reaches the broker."""
        events = self._events
        if events is not None:
            events.publish(topic, json.dumps(payload), qos=1)

    async def serve(self, ready: threading.Event | None = None) -> None:
        fit = _open_files_for(self.limits.max_connections)
        if fit < self.limits.max_connections:
            log.warning("the limit on open files allows %d connections, not %d", fit, self.limits.max_connections)
            self.limits = Limits(**{**asdict(self.limits), "max_connections": fit})
        log.info("limits: %s", asdict(self.limits))
        server = await asyncio.start_server(self._client, "127.0.0.1", self.ports.public, backlog=1024)
        # events and hellos ride a client of Mosquitto's service listener; devices need not wait for it
        threading.Thread(target=self._connect_events, name="events", daemon=True).start()
        watcher = asyncio.create_task(self._watch_revocations())
        if ready is not None:
            ready.set()
        self._stop = asyncio.Event()
        try:
            async with server:
                await self._stop.wait()
        finally:
            watcher.cancel()
            if self._events is not None:
                self._events.loop_stop()
                self._events.disconnect()

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()


async def _pump(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            target.write(data)
            await target.drain()
    except ConnectionError:
        pass
    finally:
        target.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close at once with a TCP reset: nothing is flushed and no TIME_WAIT is left behind."""
    sock = writer.get_extra_info("socket")
    try:
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    writer.transport.abort()


def _open_files_for(connections: int) -> int:
    """Raise the soft limit on open files so that ``connections`` relayed connections fit (two
    descriptors each, and some to spare); returns how many fit."""
    spare = 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * connections + spare
    if soft != resource.RLIM_INFINITY and soft < want:
        soft = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return connections if soft == resource.RLIM_INFINITY else max(1, min(connections, (soft - spare) // 2))
