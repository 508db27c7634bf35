"""Firmware signing, as the product's CI runs it: a Secure Boot V2 key generated in a token of
the signing workspace (never the factory's), images signed through it.

The factory never holds this key: the station only receives signed images and the public key.
"""

from __future__ import annotations

from dataclasses import dataclass

from stampline import ceremony
from stampline.errors import StamplineError, UsageError
from stampline.firmware import secure_boot
from stampline.pki.token import KeyAlgorithm, Scheme, TokenSigner
from stampline.pki.uri import Pkcs11Uri
from stampline.workspace import Workspace

KEY_NAME = "secure_boot"
TOKEN_LABEL = "stampline-fw-signing"
OBJECT_LABEL = "secure-boot-v2"
_ALGORITHMS = {"rsa-3072": KeyAlgorithm.RSA_3072, "ecdsa-p256": KeyAlgorithm.EC_P256}


@dataclass(frozen=True)
class KeyInfo:
    key_type: str
    digest: bytes
    pem: bytes
    created: list[str]


def keygen(workspace: Workspace, chip: str, pin_source: str = "sealed") -> KeyInfo:
    """Generate the secure boot signing key in the signing token (the first key type the chip supports)."""
    schemes = secure_boot.CHIP_SCHEMES.get(chip)
    if schemes is None:
        raise UsageError(f"no Secure Boot V2 scheme is known for chip '{chip}'.")
    created: list[str] = []
    if workspace.has_config():
        config = workspace.config()
        if KEY_NAME not in config.keys:
            raise UsageError(f"{workspace.root} is a workspace without a firmware signing key; "
                             "keep the signing workspace apart from station workspaces.")
    else:
        ceremony.check_pin_source(pin_source)
        config = ceremony.configure_workspace(workspace, "firmware-signing",
                                              {KEY_NAME: Pkcs11Uri(token=TOKEN_LABEL, object=OBJECT_LABEL)},
                                              pin_source, created)
    token, label = config.key_token(KEY_NAME)
    if token.has_key(label):
        raise StamplineError(f"token '{token.label}' already holds the secure boot key '{label}'; "
                             "a key is never replaced (its digest is burnt into every device).")
    public = token.generate_key(label, _ALGORITHMS[schemes[0]])
    created.append(f"secure boot key ({schemes[0]})")
    return KeyInfo(secure_boot.key_type(public), secure_boot.key_digest(public), secure_boot.public_key_pem(public),
                   created)


def signer(workspace: Workspace) -> TokenSigner:
    token, label = workspace.config().key_token(KEY_NAME)
    public = token.public_key(label)
    return token.signer(label, Scheme(secure_boot.signer_scheme(public)))


def key_info(workspace: Workspace) -> KeyInfo:
    public = signer(workspace).public_key
    return KeyInfo(secure_boot.key_type(public), secure_boot.key_digest(public), secure_boot.public_key_pem(public), [])


def sign(workspace: Workspace, image: bytes, chip: str, append: bool = False) -> bytes:
    return secure_boot.sign_image(image, signer(workspace), chip, append=append)
