"""Flashing through the manufacturing protocol: compressed, verified by read-back hash,
resumable after a dropped link, confined to the regions the station may write."""

from __future__ import annotations

import hashlib
import zlib
from pathlib import Path
from typing import Iterator

import pytest

from stampline.device.emulator import DeviceOptions, Emulator, EmulatedDevice
from stampline.device.timing import TimingModel
from stampline.firmware import image, otadata
from stampline.protocol import messages as m
from stampline.protocol.link import Link
from stampline.protocol.wire import ProtocolError


@pytest.fixture
def device(tmp_path: Path) -> Iterator[EmulatedDevice]:
    with Emulator(tmp_path / "devices", TimingModel(0)) as emulator:
        yield emulator.add_new(1, DeviceOptions())[0]


def test_flash_new_application_and_select_it(device: EmulatedDevice) -> None:
    new_app = image.build_app_image("esp32c3", "product-app", "2.1.0", payload_size=200 * 1024)
    ota_0 = device.firmware.table.find("ota_0")
    with Link.open(device.port) as link:
        assert link.request(m.Hello()).app_fw_version == "1.0.0"
        sent = link.flash(ota_0.offset, new_app)
        assert sent < len(new_app)  # compressed on the wire
        assert link.request(m.Hello()).app_fw_version == "2.1.0"
        assert link.request(m.FlashHash(ota_0.offset, len(new_app))).sha256 == hashlib.sha256(new_app).digest()
        link.request(m.SetBoot("ota_0"))
    ota = device.firmware.table.find("otadata")
    assert otadata.selected_ota_index(device.flash.read(ota.offset, ota.size), 2) == 0
    assert device.flash.read(ota_0.offset, len(new_app)) == new_app


def test_interrupted_transfer_resumes_where_it_stopped(device: EmulatedDevice) -> None:
    new_app = image.build_app_image("esp32c3", "product-app", "3.0.0", payload_size=300 * 1024, seed=b"x")
    packed = zlib.compress(new_app, 9)
    ota_0 = device.firmware.table.find("ota_0")
    with Link.open(device.port) as link:
        link.request(m.Hello())
        begin = link.request(m.FlashBegin(ota_0.offset, len(new_app), len(packed), hashlib.sha256(new_app).digest()))
        assert begin.next_offset == 0
        size = link.max_payload - m.CHUNK_OVERHEAD
        for offset in range(0, 20 * size, size):  # the cable is pulled after 20 chunks
            link.request(m.FlashData(offset, packed[offset:offset + size]))
    with Link.open(device.port) as link:  # plugged in again
        link.request(m.Hello())
        sent = link.flash(ota_0.offset, new_app, compressed=packed)
        assert sent == len(packed) - 20 * size
    assert device.flash.read(ota_0.offset, len(new_app)) == new_app


def test_flashing_is_confined_and_bounded(device: EmulatedDevice) -> None:
    table = device.firmware.table
    small = b"\x00" * 4096
    with Link.open(device.port) as link:
        link.request(m.Hello())
        for label in ("factory", "nvs", "fctry", "nvs_keys"):
            with pytest.raises(m.DeviceError) as refused:
                link.flash(table.find(label).offset, small)
            assert refused.value.code == m.ErrorCode.BAD_STATE
        bomb = zlib.compress(b"\x00" * (1 << 20))
        ota_1 = table.find("ota_1")
        link.request(m.FlashBegin(ota_1.offset, 4096, len(bomb), hashlib.sha256(small).digest()))
        with pytest.raises(m.DeviceError) as refused:
            link.request(m.FlashData(0, bomb[:900]))
        assert refused.value.code == m.ErrorCode.TOO_LARGE
        with pytest.raises(ProtocolError):
            link.request(m.SetBoot("nvs"))
