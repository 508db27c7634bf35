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
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography import x509

from stampline.cloud import broker, jitr
from stampline.cloud.registry import ACTIVE, PENDING, REVOKED, Registry, fingerprint
from stampline.cloud.tap import CertificateTap, TapError

log = logging.getLogger(__name__)
POLL_SECONDS = 0.2


class RegistrationService:
    def __init__(self, workdir: Path) -> None:
        self.files = broker.EndpointFiles(workdir)
        self.ports = self.files.ports()
        self.registry = Registry(self.files.path("registry.sqlite"))
        self.live: dict[str, set[asyncio.StreamWriter]] = {}
        self._events: mqtt.Client | None = None
        self._crl_cache: list[x509.CertificateRevocationList] = []
        self._crl_stamp: int | None = None
        self._stop: asyncio.Event | None = None

    # -- decisions (run in a worker thread: they touch SQLite and cryptography) -------------------

    def _decide(self, chain: list[bytes]) -> tuple[bool | None, str]:
        """(go on, certificate id); None: not from a registered CA — the handshake goes on so that
        Mosquitto refuses a foreign chain itself, and the service closes whatever it lets through."""
        try:
            leaf = x509.load_der_x509_certificate(chain[0])
        except (ValueError, IndexError):
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

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(self.ports.internal)
        except OSError:
            writer.close()
            return
        down = asyncio.create_task(_pump(up_reader, writer))
        tap = CertificateTap()
        cert_id = ""
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(65536):
                if not tap.done:  # the handshake: read the certificate on its way to Mosquitto
                    try:
                        tap.feed(data)
                    except TapError:
                        return
                    if tap.chain is not None:
                        allowed, cert_id = await loop.run_in_executor(None, self._decide, tap.chain)
                        if allowed is None:
                            up_writer.write(data)
                            await up_writer.drain()
                            await asyncio.wait([down], timeout=2.0)  # Mosquitto's alert reaches the client
                            return
                        if not allowed:
                            return
                        self.live.setdefault(cert_id, set()).add(writer)
                    elif tap.done:
                        return  # no client certificate: Mosquitto would refuse it anyway
                up_writer.write(data)
                await up_writer.drain()
        except ConnectionError:
            pass
        finally:
            if cert_id:
                self.live.get(cert_id, set()).discard(writer)
            down.cancel()
            for w in (writer, up_writer):
                w.close()

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
