"""Where device certificates get registered ahead of their first connection (bulk registration):
the local endpoint's registry or AWS IoT Core. Both take the same calls."""

from __future__ import annotations

from typing import Protocol


class Registrar(Protocol):
    """A cloud registry that accepts device certificates in bulk."""

    name: str

    def register_device(self, serial: str, certificate_pem: str, ca_certificate_pem: str | None) -> str:
        """Register (and activate) one device certificate; return the registry's id for it.

        Idempotent: registering the same certificate again returns the same id and changes
        nothing. A certificate the registry holds as revoked is refused (StamplineError).
        """
        ...
