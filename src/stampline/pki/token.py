"""PKCS#11 tokens: keys generated inside, non-extractable and sensitive, used only by reference.

python-pkcs11 initialises PKCS#11 without locking and SoftHSM crashes under concurrent calls,
so every PKCS#11 call in the process runs on one owner thread. Callers on any thread queue
work to it and wait for the answer; signing requests from many ports are serialised there.

The same code path takes SoftHSM2 (the embedded default), a YubiKey through ykcs11, a
YubiHSM 2 or any HSM: a token is its module path, its label and where its PIN comes from.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterable, TypeVar

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters
from pkcs11.util.rsa import encode_rsa_public_key

from stampline.errors import StamplineError
from stampline.pki import der
from stampline.pki.pin import PinSource, Secret
from stampline.pki.uri import Pkcs11Uri

T = TypeVar("T")
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


class KeyAlgorithm(str, Enum):
    """Key types a token key can be generated as."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"

    @property
    def is_ec(self) -> bool:
        return self.value.startswith("ec-")


class Scheme(str, Enum):
    """Signature schemes: what is hashed on the host and which mechanism the token runs."""

    ECDSA_SHA256 = "ecdsa-sha256"
    ECDSA_SHA384 = "ecdsa-sha384"
    RSA_PKCS1_SHA256 = "rsa-pkcs1-sha256"
    RSA_PSS_SHA256 = "rsa-pss-sha256"


_CURVES = {KeyAlgorithm.EC_P256: ("secp256r1", ec.SECP256R1()), KeyAlgorithm.EC_P384: ("secp384r1", ec.SECP384R1())}
_RSA_BITS = {KeyAlgorithm.RSA_2048: 2048, KeyAlgorithm.RSA_3072: 3072}


@dataclass(frozen=True)
class TokenSpec:
    """How to reach one token: its module, label, PIN source and the environment the module needs."""

    label: str
    module: str
    pin: PinSource = field(compare=False)
    env: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        return f"token '{self.label}' ({os.path.basename(self.module)})"


class _State:
    """What only the owner thread touches: loaded modules, logged-in sessions, key handles."""

    def __init__(self) -> None:
        self.lib: pkcs11.lib | None = None
        self.module = ""
        self.env: tuple[tuple[str, str], ...] = ()
        self.sessions: dict[TokenSpec, Any] = {}
        self.keys: dict[tuple[TokenSpec, str, ObjectClass], Any] = {}

    def load(self, spec: TokenSpec) -> pkcs11.lib:
        if self.lib is not None and self.module == spec.module and self.env == spec.env:
            return self.lib
        if self.lib is not None:
            # Another module configuration: PKCS#11 allows one per process, so start over.
            self.sessions.clear()
            self.keys.clear()
            try:
                self.lib.finalize()
            except pkcs11.PKCS11Error:
                pass
        os.environ.update(dict(spec.env))
        try:
            lib = pkcs11.lib(spec.module)
            if self.lib is lib:
                lib.initialize()
        except (OSError, RuntimeError, pkcs11.PKCS11Error) as exc:
            raise StamplineError(f"cannot load the PKCS#11 module {spec.module}: {exc}.") from None
        self.lib, self.module, self.env = lib, spec.module, spec.env
        return lib

    def session(self, spec: TokenSpec) -> Any:
        cached = self.sessions.get(spec)
        if cached is not None:
            return cached
        lib = self.load(spec)
        try:
            token = lib.get_token(token_label=spec.label)
        except pkcs11.NoSuchToken:
            raise StamplineError(f"no token labelled '{spec.label}' is present in {spec.module}.") from None
        except pkcs11.MultipleTokensReturned:
            raise StamplineError(f"more than one token is labelled '{spec.label}'; labels must be unique.") from None
        pin: Secret = spec.pin.read(spec.label)
        try:
            session = token.open(rw=True, user_pin=pin.reveal())
        except pkcs11.PinIncorrect:
            raise StamplineError(
                f"the PIN for token '{spec.label}' is wrong; stampline does not retry "
                "(a token locks itself after a few wrong PINs).") from None
        except pkcs11.PinLocked:
            raise StamplineError(f"token '{spec.label}' is locked after too many wrong PINs.") from None
        except pkcs11.PKCS11Error as exc:
            raise StamplineError(f"cannot log in to token '{spec.label}': {type(exc).__name__}.") from None
        finally:
            del pin
        self.sessions[spec] = session
        return session

    def close(self, spec: TokenSpec) -> None:
        session = self.sessions.pop(spec, None)
        self.keys = {k: v for k, v in self.keys.items() if k[0] != spec}
        if session is not None:
            session.close()

    def key(self, spec: TokenSpec, label: str, cls: ObjectClass) -> Any:
        cache_key = (spec, label, cls)
        found = self.keys.get(cache_key)
        if found is None:
            try:
                found = self.session(spec).get_key(object_class=cls, label=label)
            except pkcs11.NoSuchKey:
                kind = "private" if cls == ObjectClass.PRIVATE_KEY else "public"
                raise StamplineError(f"token '{spec.label}' holds no {kind} key '{label}'.") from None
            except pkcs11.MultipleObjectsReturned:
                raise StamplineError(f"token '{spec.label}' holds more than one key '{label}'.") from None
            self.keys[cache_key] = found
        return found


class _Owner:
    """The one thread of the process that makes PKCS#11 calls.

    Each caller waits on a reply queue of its own thread (C-implemented SimpleQueue): cheaper
    than a Future per call on the signing hot path.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...], queue.SimpleQueue[Any]]] = \
            queue.SimpleQueue()
        self._state = _State()
        self._local = threading.local()
        self._thread = threading.Thread(target=self._loop, name="pkcs11-owner", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        if threading.current_thread() is self._thread:
            return fn(self._state, *args)
        reply = getattr(self._local, "reply", None)
        if reply is None:
            reply = self._local.reply = queue.SimpleQueue()
        self.post(reply, fn, *args)
        ok, value = reply.get()
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

    def post(self, reply: queue.SimpleQueue[Any], fn: Callable[..., Any], *args: Any) -> None:
        """Queue ``fn(state, *args)`` and return at once; ``(True, value)`` or ``(False, exception)``
        is put on ``reply`` when it has run (in posting order)."""
        self._queue.put((fn, args, reply))

    def _loop(self) -> None:
        while True:
            fn, args, reply = self._queue.get()
            try:
                reply.put((True, fn(self._state, *args)))
            except BaseException as exc:  # handed to the caller, who re-raises it
                reply.put((False, exc))


_owner: _Owner | None = None
_owner_lock = threading.Lock()


def owner() -> _Owner:
    global _owner
    with _owner_lock:
        if _owner is None:
            _owner = _Owner()
        return _owner


class Token:
    """One token, used from any thread through the owner thread."""

    def __init__(self, spec: TokenSpec) -> None:
        self.spec = spec

    @property
    def label(self) -> str:
        return self.spec.label

    def login(self) -> None:
        """Open the session now, so that a wrong PIN is reported before any work starts."""
        owner().call(lambda st: st.session(self.spec) and None)

    def logout(self) -> None:
        """Close this process's session with the token (the next use logs in again)."""
        owner().call(lambda st: st.close(self.spec))

    def has_key(self, label: str) -> bool:
        def probe(st: _State) -> bool:
            return any(True for _ in st.session(self.spec).get_objects(
                {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.LABEL: label}))
        return owner().call(probe)

    def generate_key(self, label: str, algorithm: KeyAlgorithm) -> PublicKey:
        """Generate a key pair inside the token: private half sensitive and never extractable."""
        key_id = hashlib.sha256(label.encode()).digest()[:8]
        private_template = {
            Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False, Attribute.SIGN: True, Attribute.DECRYPT: False,
        }
        public_template = {Attribute.TOKEN: True, Attribute.VERIFY: True}

        def generate(st: _State) -> PublicKey:
            session = st.session(self.spec)
            if any(True for _ in session.get_objects({Attribute.LABEL: label})):
                raise StamplineError(
                    f"token '{self.label}' already holds an object '{label}'; a ceremony never replaces a key.")
            try:
                if algorithm.is_ec:
                    params = session.create_domain_parameters(
                        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(_CURVES[algorithm][0])},
                        local=True)
                    public, _ = params.generate_keypair(
                        store=True, label=label, id=key_id,
                        public_template=public_template, private_template=private_template)
                else:
                    public, _ = session.generate_keypair(
                        KeyType.RSA, _RSA_BITS[algorithm], store=True, label=label, id=key_id,
                        public_template=public_template, private_template=private_template)
            except pkcs11.PKCS11Error as exc:
                raise StamplineError(
                    f"token '{self.label}' could not generate a {algorithm.value} key: {type(exc).__name__}.") from None
            return _to_public_key(public)
        return owner().call(generate)

    def public_key(self, label: str) -> PublicKey:
        """The public half of the private key ``label``: found by the private key's CKA_ID, as
        tokens label the halves differently (a YubiKey's PIV public keys are 'Public key for ...')."""
        def find(st: _State) -> PublicKey:
            private = st.key(self.spec, label, ObjectClass.PRIVATE_KEY)
            try:
                key_id = private[Attribute.ID]
                public = st.session(self.spec).get_key(object_class=ObjectClass.PUBLIC_KEY, id=key_id)
            except (pkcs11.NoSuchKey, pkcs11.MultipleObjectsReturned, pkcs11.AttributeTypeInvalid):
                public = st.key(self.spec, label, ObjectClass.PUBLIC_KEY)
            return _to_public_key(public)
        return owner().call(find)

    def private_key_attributes(self, label: str) -> dict[str, bool]:
        """The protection attributes of a private key, as the token reports them."""
        def read(st: _State) -> dict[str, bool]:
            key = st.key(self.spec, label, ObjectClass.PRIVATE_KEY)
            return {"sensitive": bool(key[Attribute.SENSITIVE]), "extractable": bool(key[Attribute.EXTRACTABLE]),
                    "never_extractable": bool(key[Attribute.NEVER_EXTRACTABLE]),
                    "always_sensitive": bool(key[Attribute.ALWAYS_SENSITIVE]), "local": bool(key[Attribute.LOCAL])}
        return owner().call(read)

    def sign(self, label: str, data: bytes, scheme: Scheme) -> bytes:
        """Sign ``data`` (the whole message, hashed here or in the token) with the named key."""
        return owner().call(_sign, self.spec, label, data, scheme)

    def signer(self, label: str, scheme: Scheme | None = None) -> "TokenSigner":
        return TokenSigner(self, label, scheme)


def _sign(st: _State, spec: TokenSpec, label: str, data: bytes, scheme: Scheme) -> bytes:
    key = st.key(spec, label, ObjectClass.PRIVATE_KEY)
    try:
        if scheme in (Scheme.ECDSA_SHA256, Scheme.ECDSA_SHA384):
            # SoftHSM2 has no CKM_ECDSA_SHA256: hash here, sign the digest, DER-encode r||s.
            digest = (hashlib.sha256 if scheme == Scheme.ECDSA_SHA256 else hashlib.sha384)(data).digest()
            raw = key.sign(digest, mechanism=Mechanism.ECDSA)
            half = len(raw) // 2
            return encode_dss_signature(int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big"))
        if scheme == Scheme.RSA_PKCS1_SHA256:
            return key.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS)
        return key.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS_PSS,
                        mechanism_param=(Mechanism.SHA256, pkcs11.MGF.SHA256, 32))
    except pkcs11.PKCS11Error as exc:
        raise StamplineError(f"token '{spec.label}' refused to sign with '{label}': {type(exc).__name__}.") from None


def _as_exception(error: BaseException) -> Exception:
    return error if isinstance(error, Exception) else StamplineError(f"the token failed: {type(error).__name__}.")


def _to_public_key(public: Any) -> PublicKey:
    if public.key_type == KeyType.EC:
        loaded = serialization.load_der_public_key(encode_ec_public_key(public))
    else:
        loaded = serialization.load_der_public_key(_rsa_spki(encode_rsa_public_key(public)))
    assert isinstance(loaded, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey))
    return loaded


def _rsa_spki(pkcs1: bytes) -> bytes:
    algorithm = der.seq(der.oid("1.2.840.113549.1.1.1"), der.null())
    return der.seq(algorithm, der.bit_string(pkcs1))


def default_scheme(public_key: PublicKey) -> Scheme:
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        return Scheme.ECDSA_SHA384 if public_key.curve.key_size >= 384 else Scheme.ECDSA_SHA256
    return Scheme.RSA_PKCS1_SHA256


class TokenSigner:
    """A key in a token seen as an X.509 signer: its public key, algorithm identifier and sign()."""

    def __init__(self, token: Token, label: str, scheme: Scheme | None = None) -> None:
        self.token = token
        self.label = label
        self.public_key = token.public_key(label)
        self.scheme = scheme or default_scheme(self.public_key)

    def uri(self) -> Pkcs11Uri:
        return Pkcs11Uri(token=self.token.label, object=self.label)

    def sign(self, data: bytes) -> bytes:
        return owner().call(_sign, self.token.spec, self.label, data, self.scheme)

    def sign_many(self, items: Iterable[bytes]) -> list[bytes | Exception]:
        """Sign each item; in order, its signature or the token's refusal of that item. Each is
        queued to the owner thread as soon as ``items`` yields it, so that the token signs one
        while the caller prepares the next (a generator doing real work overlaps the token)."""
        reply: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        spec, label, scheme, count = self.token.spec, self.label, self.scheme, 0
        try:
            for item in items:
                owner().post(reply, _sign, spec, label, item, scheme)
                count += 1
        finally:  # what was posted is signed whatever happens: collect it all
            answers = [reply.get() for _ in range(count)]
        return [value if ok else _as_exception(value) for ok, value in answers]
