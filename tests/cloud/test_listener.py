"""The registration service's listener under abuse: half-open and silent connections time out,
per-source and total limits refuse the excess at once, and a real device gets through a flood.

Sources other than 127.0.0.1 are loopback addresses too (Linux routes all of 127/8 to lo), so a
test can play an attacker on 127.0.0.2 next to the devices on 127.0.0.1."""

from __future__ import annotations

import json
import select
import socket
import ssl
import threading
import time
from typing import Iterator

import pytest

from conftest import run_cli
from stampline.cloud.service import Limits
from stampline.workspace import Workspace
from test_endpoint import Line, _device_context, _mqtt, open_line, wait_for

LIMITS = Limits(handshake_timeout=3.0, idle_timeout=2.0, max_per_source=8, max_connections=48)
REFUSED_WITHIN = 1.0  # a refusal is at once; well under the idle timeout, which would close it too


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory, ca_workspace: Workspace, release) -> Iterator[Line]:  # type: ignore[no-untyped-def]
    """An endpoint up with small limits and one ACTIVE device, online."""
    with open_line(tmp_path_factory.mktemp("listener"), ca_workspace, release, count=1, limits=LIMITS) as line:
        imported = run_cli("endpoint", "import-ledger", "--workdir", str(line.endpoint.workdir),
                           "--station", str(line.station.root), "--json")
        assert imported.returncode == 0, imported.stderr
        device = line.devices[0]
        wait_for(lambda: device.cloud and device.cloud.status.hello_acked, what="the device online")
        yield line


def connect(line: Line, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", line.endpoint.info().port))
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` (end of stream or reset) within ``seconds``; what it sends
    on the way is read and dropped."""
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return False


def still_open(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return True
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except ConnectionResetError:
        return False


def client_hello() -> bytes:
    """The first flight of a TLS 1.2 client, made in memory."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    with pytest.raises(ssl.SSLWantReadError):
        context.wrap_bio(incoming, outgoing, server_hostname="localhost").do_handshake()
    return outgoing.read()


def service_log(line: Line) -> str:
    return line.endpoint.files.path("service.log").read_text()


def test_limits_are_written_for_the_service(guarded: Line) -> None:
    assert json.loads(guarded.endpoint.files.path("limits.json").read_text()) == {
        "handshake_timeout": 3.0, "idle_timeout": 2.0, "max_per_source": 8, "max_connections": 48}
    assert Limits.load(guarded.endpoint.files.path("limits.json")) == LIMITS
    assert "'max_per_source': 8" in service_log(guarded)


def test_a_silent_connection_is_closed_after_the_idle_timeout(guarded: Line) -> None:
    with connect(guarded) as sock:
        assert closed_within(sock, LIMITS.idle_timeout + 3)
    wait_for(lambda: "idle timeout" in service_log(guarded), timeout=5, what="the idle timeout logged")


def test_a_half_open_handshake_is_closed_after_the_handshake_timeout(guarded: Line) -> None:
    with connect(guarded) as sock:
        sock.sendall(client_hello())
        sock.settimeout(5)
        assert sock.recv(5)[:3] == b"\x16\x03\x03"  # Mosquitto's ServerHello came back: relayed
        assert closed_within(sock, LIMITS.handshake_timeout + 3)
    wait_for(lambda: "handshake timeout" in service_log(guarded), timeout=5, what="the handshake timeout logged")


def test_a_handshake_trickled_byte_by_byte_is_closed_at_the_deadline(guarded: Line) -> None:
    """Never silent for long (a byte every 0.25 s), yet never through: the handshake deadline ends it."""
    hello = client_hello()
    assert len(hello) * 0.25 > 3 * LIMITS.handshake_timeout
    with connect(guarded) as sock:
        for byte in hello:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                break
            if closed_within(sock, 0.25):
                break
        else:
            pytest.fail("the trickled handshake was never closed")


def test_garbage_is_closed_at_once_and_the_service_keeps_serving(guarded: Line) -> None:
    for junk in (b"\x18\x03\x03\x00\x03\x01\x00\x00" * 4, b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x03\xff\xff"):
        with connect(guarded) as sock:
            sock.sendall(junk)
            assert closed_within(sock, REFUSED_WITHIN), junk
    wait_for(lambda: "malformed handshake" in service_log(guarded), timeout=5, what="the refusal logged")
    assert guarded.devices[0].cloud.status.connected  # type: ignore[union-attr]


def test_connections_over_the_per_source_limit_are_refused_and_those_under_it_stay(guarded: Line) -> None:
    held = [connect(guarded, "127.0.0.3") for _ in range(LIMITS.max_per_source)]
    try:
        with connect(guarded, "127.0.0.3") as excess:
            assert closed_within(excess, REFUSED_WITHIN)
        with connect(guarded, "127.0.0.4") as neighbour:  # another source is not affected
            assert not closed_within(neighbour, 0.3)
        assert all(still_open(sock) for sock in held)
        # the idle timeout frees the slots; then the source may connect again
        assert all(closed_within(sock, LIMITS.idle_timeout + 3) for sock in held)
        with connect(guarded, "127.0.0.3") as again:
            assert not closed_within(again, 0.3)
    finally:
        for sock in held:
            sock.close()
    log = service_log(guarded)
    assert "closed a connection from 127.0.0.3: per-source limit: 8 handshakes in progress from it" in log


def test_connections_over_the_total_limit_are_refused(guarded: Line) -> None:
    sources = [f"127.0.1.{i}" for i in range(1, LIMITS.max_connections // LIMITS.max_per_source + 2)]
    socks = [connect(guarded, source) for source in sources for _ in range(LIMITS.max_per_source)]
    try:
        time.sleep(0.3)  # refusals are at once
        refused = [s for s in socks if not still_open(s)]
        # the device's own connection counts too
        assert LIMITS.max_per_source <= len(refused) <= LIMITS.max_per_source + 2, len(refused)
        assert all(s not in refused for s in socks[:LIMITS.max_connections - 2])  # the first ones stay
    finally:
        for sock in socks:
            sock.close()
    wait_for(lambda: "connection limit" in service_log(guarded), timeout=5, what="the refusal logged")


def test_a_device_gets_through_a_flood_of_idle_connections_from_one_source(guarded: Line) -> None:
    stop = threading.Event()
    refusals = [0]

    def flood() -> None:
        """Keep twice the per-source limit open from 127.0.0.2, opening a new one for each closed."""
        socks: list[socket.socket] = []
        try:
            while not stop.is_set():
                for sock in [s for s in socks if not still_open(s)]:
                    socks.remove(sock)
                    sock.close()
                    refusals[0] += 1
                while len(socks) < 2 * LIMITS.max_per_source:
                    socks.append(connect(guarded, "127.0.0.2"))
                time.sleep(0.02)
        finally:
            for sock in socks:
                sock.close()

    flooder = threading.Thread(target=flood, daemon=True)
    flooder.start()
    try:
        wait_for(lambda: refusals[0] >= LIMITS.max_per_source, timeout=10, what="the flood refused")
        device = guarded.devices[0]
        client, acks = _mqtt(_device_context(guarded, device), guarded.endpoint.info().port,
                             f"{guarded.serials[0]}-during-flood")
        try:
            sent = client.publish(f"devices/{guarded.serials[0]}/telemetry", b"through", qos=1)
            wait_for(lambda: sent.mid in acks, timeout=10, what="the PUBACK")
            assert not acks[sent.mid].is_failure
        finally:
            client.loop_stop()
            client.disconnect()
        assert device.cloud.status.connected  # type: ignore[union-attr]
    finally:
        stop.set()
        flooder.join(5)
