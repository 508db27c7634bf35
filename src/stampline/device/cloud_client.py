"""The product application's cloud connection (the stand-in for the device's MQTT client).

After its first boot the application reads its certificate, the Sub CA certificate and its
private key from the encrypted NVS, connects to the endpoint in its stamp with mutual TLS —
presenting its certificate *with* the Sub CA certificate, as Just-In-Time Registration needs the
chain — and publishes a hello on its own topic. It retries with backoff while the endpoint
refuses it (the first connection of a new certificate, a pending activation).

The key never touches a disk: the TLS library reads it from an in-memory file (memfd), the
stand-in for a device's TLS stack reading it from its secure storage.
"""

from __future__ import annotations

import json
import os
import random
import ssl
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import serialization

BACKOFF_FIRST = 0.2
BACKOFF_MAX = 5.0


@dataclass
class CloudStatus:
    attempts: int = 0
    connected: bool = False
    hello_acked: bool = False
    last_error: str = ""
    history: list[str] = field(default_factory=list)


@contextmanager
def _in_memory_file(data: bytes) -> Iterator[str]:
    fd = os.memfd_create("stamp", 0)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def tls_context(certificate: bytes, ca_certificate: bytes, private_key: bytes, trust_pem: bytes) -> ssl.SSLContext:
    """Client TLS with the device's chain (certificate + Sub CA) and its key, trusting the endpoint."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # mbedTLS on the ESP32 speaks TLS 1.2
    context.load_verify_locations(cadata=trust_pem.decode())
    chain = b"".join(x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
                     for der in (certificate, ca_certificate))
    key = serialization.load_der_private_key(private_key, None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    with _in_memory_file(chain) as cert_path, _in_memory_file(key) as key_path:
        context.load_cert_chain(cert_path, key_path)
    del key
    return context


class CloudClient:
    def __init__(self, serial: str, endpoint: str, context: ssl.SSLContext) -> None:
        url = urlparse(endpoint)
        if url.scheme != "mqtts" or not url.hostname:
            raise ValueError(f"not an mqtts endpoint: {endpoint!r}")
        self.serial = serial
        self.host, self.port = url.hostname, url.port or 8883
        self.context = context
        self.status = CloudStatus()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"cloud-{serial}", daemon=True)

    def start(self) -> "CloudClient":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _note(self, text: str) -> None:
        self.status.last_error = text
        self.status.history.append(text)
        del self.status.history[:-20]

    def _run(self) -> None:
        backoff = BACKOFF_FIRST
        while not self._stop.is_set():
            self.status.attempts += 1
            if self._session():
                backoff = BACKOFF_FIRST  # was connected: reconnect soon
            else:
                backoff = min(backoff * 2, BACKOFF_MAX)
            self._stop.wait(backoff * random.uniform(0.5, 1.0))

    def _session(self) -> bool:
        """One connection: connect, say hello, stay until the endpoint or the device ends it."""
        connected = threading.Event()
        closed = threading.Event()
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.serial, protocol=mqtt.MQTTv5)
        client.tls_set_context(self.context)

        def on_connect(c: mqtt.Client, userdata: object, flags: object, reason: mqtt.ReasonCode, props: object) -> None:
            if reason.is_failure:
                self._note(f"connection refused: {reason}")
            else:
                connected.set()

        def on_disconnect(c: mqtt.Client, userdata: object, flags: object, reason: mqtt.ReasonCode, props: object) -> None:
            closed.set()

        acks: dict[int, bool] = {}

        def on_publish(c: mqtt.Client, userdata: object, mid: int, reason: mqtt.ReasonCode, props: object) -> None:
            acks[mid] = not reason.is_failure  # MQTT 5: "not authorized" comes back in the PUBACK

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_publish = on_publish
        try:
            client.connect(self.host, self.port, keepalive=30)
        except (OSError, ssl.SSLError) as exc:
            self._note(f"connect failed: {type(exc).__name__}")
            return False
        client.loop_start()
        try:
            if not connected.wait(5) or closed.is_set():
                self._note("no CONNACK")
                return False
            self.status.connected = True
            info = client.publish(f"devices/{self.serial}/hello", json.dumps(
                {"serial": self.serial, "at": time.time()}), qos=1, retain=True)  # retained: seen by late subscribers
            try:
                info.wait_for_publish(5)
            except (RuntimeError, ValueError):
                pass
            if acks.get(info.mid):
                self.status.hello_acked = True
            else:
                self._note("hello not acknowledged")
            while not closed.is_set() and not self._stop.is_set():
                closed.wait(0.2)
            return True
        finally:
            self.status.connected = False
            client.disconnect()
            client.loop_stop()
