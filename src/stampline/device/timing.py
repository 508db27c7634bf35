"""How long things take on a real device, scaled by ``--time-scale`` (0 = instant, 1 = real).

Figures: RSA key generation with mbedTLS on an ESP32-C3 takes 7-12 s for 2048 bits (the seed
article), several times that for 3072 bits; EC P-256 takes a fraction of a second. Bytes on the
line cost 10 bit times each at the configured baud rate (8N1).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

KEYGEN_SECONDS = {1: (0.2, 0.4), 2: (7.0, 12.0), 3: (25.0, 45.0)}  # protocol KeyType -> (min, max)
CSR_SIGN_SECONDS = {1: 0.05, 2: 0.25, 3: 0.6}
NVS_WRITE_SECONDS = 0.004  # one NVS entry commit
FLASH_ERASE_SECONDS_PER_SECTOR = 0.025  # 4 KiB sector erase, typical SPI NOR
BOOT_SECONDS = 0.3


@dataclass(frozen=True)
class TimingModel:
    scale: float = 0.0
    baud: int = 115200
    boot_scale: float | None = None  # the boot's own scale if not ``scale`` (benchmarks model it without waiting)

    def keygen_seconds(self, key_type: int, chip_id: bytes, attempt: int) -> float:
        """A duration within the key type's range, the same for a given chip and attempt."""
        low, high = KEYGEN_SECONDS[key_type]
        draw = hashlib.sha256(chip_id + attempt.to_bytes(4, "little")).digest()[0] / 255
        return low + (high - low) * draw

    def line_seconds(self, nbytes: int) -> float:
        return nbytes * 10 / self.baud

    def sleep(self, seconds: float) -> None:
        if self.scale > 0 and seconds > 0:
            time.sleep(seconds * self.scale)

    def sleep_boot(self, seconds: float) -> None:
        scale = self.scale if self.boot_scale is None else self.boot_scale
        if scale > 0 and seconds > 0:
            time.sleep(seconds * scale)
