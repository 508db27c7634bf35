"""PKCS#11 URIs (RFC 7512) naming a key in a token: ``pkcs11:token=line-1;object=sub-ca``.

Only the path attributes that select a token and an object are accepted. A URI that carries a
PIN (``pin-value``) is refused: a PIN must never travel on a command line.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote

from stampline.errors import UsageError, shown

_PATH_ATTRS = {"token", "object", "type"}  # the token's module comes from configuration, never the URI
_SAFE = "-._~:[]@!$'()*+,="  # pk11-pchar of RFC 7512 section 2.3


@dataclass(frozen=True)
class Pkcs11Uri:
    token: str
    object: str
    type: str = "private"

    @classmethod
    def parse(cls, text: str) -> "Pkcs11Uri":
        if not text.startswith("pkcs11:"):
            raise UsageError(f"'{shown(text)}' is not a PKCS#11 URI (it must start with 'pkcs11:').")
        path, _, query = text[len("pkcs11:"):].partition("?")
        if "pin-value" in query or "pin-source" in query:
            raise UsageError("a PKCS#11 URI must not carry a PIN; configure the PIN source instead.")
        attrs: dict[str, str] = {}
        for part in filter(None, path.split(";")):
            name, eq, value = part.partition("=")
            if not eq or name not in _PATH_ATTRS:
                raise UsageError(f"the PKCS#11 URI attribute '{shown(name)}' is not supported "
                                 "(stampline names keys by token and object).")
            if name in attrs:
                raise UsageError(f"the PKCS#11 URI names '{name}' twice.")
            try:
                attrs[name] = unquote(value, errors="strict")
            except UnicodeDecodeError:
                raise UsageError(f"the PKCS#11 URI attribute '{name}' is not UTF-8 once %-decoded.") from None
        if "token" not in attrs or "object" not in attrs:
            raise UsageError("a key URI must name both the token and the object (pkcs11:token=...;object=...).")
        kind = attrs.get("type", "private")
        if kind not in ("private", "public", "cert", "secret-key"):
            raise UsageError(f"the PKCS#11 URI type '{shown(kind)}' is not supported.")
        return cls(token=attrs["token"], object=attrs["object"], type=kind)

    def __str__(self) -> str:
        text = f"pkcs11:token={quote(self.token, safe=_SAFE)};object={quote(self.object, safe=_SAFE)}"
        return text if self.type == "private" else f"{text};type={self.type}"
