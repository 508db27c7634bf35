"""The product recipe: one YAML file per product that tells the station everything it does.

Validated field by field; an error names the field and says what is wrong in one sentence.
``TEMPLATE`` is the commented example printed by ``stampline recipe template`` and written
into a new demo workspace.
"""

from __future__ import annotations

import hashlib
import os
import re
import reprlib
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from stampline import yamlfile
from stampline.errors import UsageError, shown
from stampline.files import KiB, decode_text, read_bounded

CHIPS = ("esp32c3", "esp32s3", "esp32c6", "esp32")
DEVICE_KEYS = ("ec-p256", "rsa-2048", "rsa-3072")
REGISTRATION = ("jitr", "manifest")
_SERIAL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")
_NVS_KEY_RE = re.compile(r"^[A-Za-z0-9_]{1,15}$")
_VERSION_RE = re.compile(r"^v?([0-9]{1,5})\.([0-9]{1,5})\.([0-9]{1,5})(?:[-+][0-9A-Za-z.-]{1,20})?$")
NVS_STAMP_KEYS = ("serial", "endpoint", "certificate", "ca_certificate", "pop")
#: The template is 3 KiB; a recipe many times longer is not a recipe.
MAX_RECIPE_BYTES = 64 * KiB

TEMPLATE = """\
# stampline product recipe: what the station does for every device of this product.
# Reference: docs/recipe.md. Validate with: stampline recipe check FILE

product:
  name: acme-sensor              # lowercase letters, digits and '-'; names the product everywhere
  organization: Acme Devices     # O= of device certificates

chip: esp32c3                    # esp32c3 (reference), esp32s3, esp32c6, esp32
device_key: ec-p256              # generated ON the device: ec-p256, rsa-2048 (7-12 s) or rsa-3072

serial:
  template: "ACME-{counter:06d}" # fields: {counter} (required), {product}
  start: 1                       # first counter value

subject:                         # device certificate subject; CN must contain {serial}
  common_name: "{serial}"
  organization: "{organization}"
  # organizational_unit: Sensors
  # country: DE

certificate:
  validity_days: 7300            # devices live long; the cloud revokes by CRL, not by expiry

nvs:                             # where the manufacturing firmware keeps the stamp (plaintext
  partition: fctry               # until first boot moves it to encrypted NVS)
  namespace: stamp
  keys:
    serial: serial
    endpoint: endpoint
    certificate: cert
    ca_certificate: ca_cert      # the Sub CA certificate, presented with the device's for JITR
    pop: pop                     # proof-of-possession secret for end-user setup

pop:
  bytes: 16                      # random bytes of the proof-of-possession secret (0 = none)

endpoint:
  url: "mqtts://127.0.0.1:8883"  # the IoT endpoint written into every device
  registration: jitr             # jitr (the cloud trusts the CA) or manifest (bulk registration)

firmware:                        # images are checked (SHA-256, Secure Boot V2 signature) before
  manufacturing:                 # anything is written; paths are relative to this file
    min_version: "1.0.0"
    # image: firmware/mfg.signed.bin       # flashed when the device's is older than min_version
    # sha256: "<64 hex digits>"
  application:
    min_version: "1.0.0"
    # image: firmware/app.signed.bin
    # sha256: "<64 hex digits>"
  # bootloader:                  # the signed secure bootloader: written last, then the device
  #   image: firmware/bootloader.signed.bin  # reboots into the app and locks itself (first boot)
  #   sha256: "<64 hex digits>"
  # secure_boot_key: firmware/secure-boot.pub.pem  # from `stampline firmware pubkey`
"""


@dataclass(frozen=True)
class FirmwareRule:
    min_version: tuple[int, int, int]
    min_version_text: str
    image: Path | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class ImageRef:
    path: Path
    sha256: str


@dataclass(frozen=True)
class Recipe:
    product: str
    organization: str
    chip: str
    device_key: str
    serial_template: str
    serial_start: int
    subject: dict[str, str]
    validity_days: int
    nvs_partition: str
    nvs_namespace: str
    nvs_keys: dict[str, str]
    pop_bytes: int
    endpoint: str
    registration: str
    firmware: dict[str, FirmwareRule]
    bootloader: ImageRef | None = None
    secure_boot_key: Path | None = None
    sha256: str = field(default="", compare=False)
    source: str = field(default="", compare=False)

    def serial(self, counter: int) -> str:
        return _render(self.serial_template, counter=counter, product=self.product)

    def subject_attributes(self, serial: str) -> dict[str, str]:
        return {attr: _render(tmpl, serial=serial, product=self.product, organization=self.organization)
                for attr, tmpl in self.subject.items()}


def parse_version(text: str) -> tuple[int, int, int] | None:
    """A firmware version as (major, minor, patch), or None when it is not one."""
    match = _VERSION_RE.match(text)
    return (int(match[1]), int(match[2]), int(match[3])) if match else None


def _render(template: str, **values: Any) -> str:
    return template.format_map(values)


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 40


def _repr(value: Any) -> str:
    """A value from the recipe, bounded (however long or deep) and printable, for a message."""
    return shown(_REPR.repr(value))


class _Fields:
    """Reads a mapping field by field, turning every mistake into one sentence naming the field.
    Every piece of the recipe that goes into a message goes through ``shown`` or ``_repr``."""

    def __init__(self, where: str) -> None:
        self.where = shown(where, 160)

    def fail(self, path: str, problem: str) -> UsageError:
        return UsageError(f"{self.where}: {path}: {problem}" if path else f"{self.where}: {problem}")

    def mapping(self, raw: Any, path: str, allowed: tuple[str, ...]) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise self.fail(path, "must be a mapping.")
        for key in raw:
            if key not in allowed:
                raise self.fail(f"{path}.{shown(str(key), 40)}" if path else shown(str(key), 40),
                                f"is not a recipe field (expected one of: {', '.join(allowed)}).")
        return raw

    def get(self, raw: dict[str, Any], path: str, key: str, kind: type, default: Any = ...,
            check: Callable[[Any], str | None] | None = None) -> Any:
        full = f"{path}.{key}" if path else key
        if key not in raw or raw[key] is None:
            if default is ...:
                raise self.fail(full, "is required.")
            return default
        value = raw[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise self.fail(full, f"must be a whole number, not {_repr(value)}.")
        if kind is str and not isinstance(value, str):
            raise self.fail(full, f"must be a string, not {_repr(value)}.")
        if kind is dict and not isinstance(value, dict):
            raise self.fail(full, "must be a mapping.")
        if check is not None and (problem := check(value)):
            raise self.fail(full, problem)
        return value


def _one_of(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else f"'{shown(v)}' is not one of {', '.join(options)}."


def _template_problem(template: str, allowed: set[str], required: str | None) -> str | None:
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError:
        return f"'{shown(template)}' is not a valid template (unbalanced braces)."
    unknown = names - allowed
    if unknown:
        return (f"the template uses unknown field {{{shown(sorted(unknown)[0], 40)}}} "
                f"(allowed: {', '.join(sorted(allowed))}).")
    if required and required not in names:
        return f"the template must contain {{{required}}}."
    return None


def load(path: str | Path) -> Recipe:
    """Read (at most ``MAX_RECIPE_BYTES`` of UTF-8) and validate the recipe file ``path``."""
    path = Path(path)
    if not os.path.lexists(path):
        raise UsageError(f"there is no recipe at {shown(str(path), 160)}.")
    text = decode_text(read_bounded(path, MAX_RECIPE_BYTES, "recipe"), shown(str(path), 160))
    return parse(text, str(path), base=path.parent)


def parse(text: str, where: str = "recipe", base: Path | None = None) -> Recipe:
    """Validate a recipe; relative image paths are taken from ``base`` (the recipe's folder)."""
    raw = yamlfile.parse(text, shown(where, 160))
    f = _Fields(where)
    top = f.mapping(raw, "", ("product", "chip", "device_key", "serial", "subject", "certificate", "nvs", "pop",
                              "endpoint", "firmware"))
    product = f.mapping(f.get(top, "", "product", dict), "product", ("name", "organization"))
    name = f.get(product, "product", "name", str,
                 check=lambda v: None if _NAME_RE.match(v) else f"'{shown(v)}' must be 1-32 lowercase letters, digits or '-'.")
    organization = f.get(product, "product", "organization", str,
                         check=lambda v: None if 0 < len(v) <= 64 and v.isprintable() else "must be 1-64 printable characters.")
    chip = f.get(top, "", "chip", str, check=_one_of(CHIPS))
    device_key = f.get(top, "", "device_key", str, "ec-p256", check=_one_of(DEVICE_KEYS))

    serial = f.mapping(f.get(top, "", "serial", dict), "serial", ("template", "start"))
    serial_template = f.get(serial, "serial", "template", str,
                            check=lambda v: _template_problem(v, {"counter", "product"}, "counter"))
    serial_start = f.get(serial, "serial", "start", int, 1,
                         check=lambda v: None if 0 <= v < 10**12 else "must be between 0 and 999999999999.")
    samples = []
    for counter in (serial_start, serial_start + 999_999):  # a million devices later, still a valid serial
        try:
            sample = _render(serial_template, counter=counter, product=name)
        except (ValueError, KeyError, IndexError):
            raise f.fail("serial.template", f"'{shown(serial_template)}' cannot be formatted with a counter.") from None
        if not _SERIAL_RE.match(sample):
            raise f.fail("serial.template",
                         f"gives '{shown(sample)}', but a serial must be 1-64 letters, digits, '.', '_' or '-'.")
        samples.append(sample)

    subject_raw = f.mapping(f.get(top, "", "subject", dict, {"common_name": "{serial}"}), "subject",
                            ("common_name", "organization", "organizational_unit", "country"))
    subject: dict[str, str] = {}
    for attr in ("common_name", "organization", "organizational_unit", "country"):
        value = f.get(subject_raw, "subject", attr, str, None, check=lambda v, a=attr: _template_problem(
            v, {"serial", "product", "organization"}, "serial" if a == "common_name" else None))
        if value is not None:
            subject[attr] = value
    if "common_name" not in subject:
        raise f.fail("subject.common_name", "is required.")
    if "country" in subject and not re.match(r"^[A-Z]{2}$", subject["country"]):
        raise f.fail("subject.country", "must be a two-letter ISO 3166 code such as DE.")
    for attr, tmpl in subject.items():
        longest = max(len(_render(tmpl, serial=sample, product=name, organization=organization).encode())
                      for sample in samples)
        if longest > 64:
            raise f.fail(f"subject.{attr}", f"renders to {longest} bytes; a certificate name attribute holds 64.")

    cert = f.mapping(f.get(top, "", "certificate", dict, {}), "certificate", ("validity_days",))
    validity = f.get(cert, "certificate", "validity_days", int, 7300,
                     check=lambda v: None if 1 <= v <= 36500 else "must be between 1 and 36500 days.")

    nvs = f.mapping(f.get(top, "", "nvs", dict), "nvs", ("partition", "namespace", "keys"))
    nvs_name_check = (lambda v: None if _NVS_KEY_RE.match(v) else
                      f"'{shown(v)}' must be 1-15 letters, digits or '_' (an NVS limit).")
    partition = f.get(nvs, "nvs", "partition", str, "fctry", check=lambda v: None if v == "fctry" else
                      "the reference manufacturing firmware keeps the stamp in 'fctry' (first boot moves it).")
    namespace = f.get(nvs, "nvs", "namespace", str, check=lambda v: nvs_name_check(v) or (
        "'device' is the manufacturing firmware's own namespace." if v == "device" else None))
    keys_raw = f.mapping(f.get(nvs, "nvs", "keys", dict), "nvs.keys", NVS_STAMP_KEYS)
    nvs_keys = {k: f.get(keys_raw, "nvs.keys", k, str, check=nvs_name_check)
                for k in ("serial", "endpoint", "certificate")}
    for optional in ("ca_certificate", "pop"):
        if optional in keys_raw:
            nvs_keys[optional] = f.get(keys_raw, "nvs.keys", optional, str, check=nvs_name_check)
    if len(set(nvs_keys.values())) != len(nvs_keys):
        raise f.fail("nvs.keys", "two stamp entries use the same NVS key.")

    pop = f.mapping(f.get(top, "", "pop", dict, {}), "pop", ("bytes",))
    pop_bytes = f.get(pop, "pop", "bytes", int, 16, check=lambda v: None if v == 0 or 8 <= v <= 64 else "must be 0 or 8-64.")
    if pop_bytes and "pop" not in nvs_keys:
        raise f.fail("nvs.keys.pop", "is required when pop.bytes is not 0.")

    endpoint = f.mapping(f.get(top, "", "endpoint", dict), "endpoint", ("url", "registration"))
    url = f.get(endpoint, "endpoint", "url", str, check=lambda v: None if re.match(
        r"^mqtts://[A-Za-z0-9.-]{1,253}(:\d{1,5})?$", v) else f"'{shown(v)}' must look like mqtts://host:port.")
    registration = f.get(endpoint, "endpoint", "registration", str, "jitr", check=_one_of(REGISTRATION))

    fw = f.mapping(f.get(top, "", "firmware", dict), "firmware",
                   ("manufacturing", "application", "bootloader", "secure_boot_key"))
    folder = base or Path.cwd()
    sha_check = (lambda v: None if re.fullmatch(r"[0-9a-f]{64}", v) else "must be 64 lowercase hex digits.")
    path_check = (lambda v: None if v and "\0" not in v else "must be a file path.")

    def image_ref(raw: dict[str, Any], path: str) -> tuple[Path | None, str | None]:
        image = f.get(raw, path, "image", str, None, check=path_check)
        digest = f.get(raw, path, "sha256", str, None, check=sha_check)
        if (image is None) != (digest is None):
            raise f.fail(f"{path}.sha256" if digest is None else f"{path}.image",
                         "is required with " + ("image." if digest is None else "sha256."))
        return (folder / image if image else None), digest

    firmware: dict[str, FirmwareRule] = {}
    for part in ("manufacturing", "application"):
        rule = f.mapping(f.get(fw, "firmware", part, dict), f"firmware.{part}", ("min_version", "image", "sha256"))
        text_version = f.get(rule, f"firmware.{part}", "min_version", str,
                             check=lambda v: None if parse_version(v) else f"'{shown(v)}' is not a version like 1.2.3.")
        image_path, digest = image_ref(rule, f"firmware.{part}")
        firmware[part] = FirmwareRule(parse_version(text_version), text_version, image_path, digest)  # type: ignore[arg-type]
    bootloader = None
    if "bootloader" in fw:
        boot_raw = f.mapping(f.get(fw, "firmware", "bootloader", dict), "firmware.bootloader", ("image", "sha256"))
        boot_path, boot_digest = image_ref(boot_raw, "firmware.bootloader")
        if boot_path is None or boot_digest is None:
            raise f.fail("firmware.bootloader.image", "is required.")
        bootloader = ImageRef(boot_path, boot_digest)
    if bootloader is not None and firmware["application"].image is None:
        raise f.fail("firmware.application.image", "is required with a secure bootloader: the station makes sure "
                     "the device holds this signed application before it locks the device.")
    key = f.get(fw, "firmware", "secure_boot_key", str, None, check=path_check)
    secure_boot_key = folder / key if key else None
    if secure_boot_key is None and (bootloader or any(r.image for r in firmware.values())):
        raise f.fail("firmware.secure_boot_key", "is required when the recipe names firmware images.")

    return Recipe(product=name, organization=organization, chip=chip, device_key=device_key,
                  serial_template=serial_template, serial_start=serial_start, subject=subject,
                  validity_days=validity, nvs_partition=partition, nvs_namespace=namespace, nvs_keys=nvs_keys,
                  pop_bytes=pop_bytes, endpoint=url, registration=registration, firmware=firmware,
                  bootloader=bootloader, secure_boot_key=secure_boot_key,
                  sha256=hashlib.sha256(text.encode()).hexdigest(), source=where)
