"""The per-device flow of the Manufacturing Utility: identify, check firmware, allocate the
serial, have the device make its key and CSR, have the issuance desk apply the policy, sign
through the token and commit to the ledger, write and read back the certificate, write the
NVS stamp, finish.

Every step is timed and journaled. The certificate is durable in the ledger before a byte of
it goes to the device, so a crash at any point resumes without a second certificate.

A device that goes away (a reset, a power cut, a USB-Serial-JTAG chip leaving the bus) is waited
for and found again, on its port or by its chip id on another, and its flow starts again from
the ledger's state. A stop request is honoured between steps only, never inside one.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from stampline.errors import StamplineError, shown
from stampline.pki.policy import CsrRefused, check_csr, csr_subject
from stampline.pki.profile import DeviceIssuer, DeviceProfile
from stampline.protocol import messages as m
from stampline.protocol.link import Link, LinkLost, LinkTimeout
from stampline.protocol.wire import ProtocolError
from stampline.firmware.image import compare_versions
from stampline.recipe import Recipe, parse_version
from stampline.station.firmware_set import CheckedImage, FirmwareSet
from stampline.station.issuance import IssuanceDesk
from stampline.station.ledger import DeviceState, Ledger
from stampline.station.ports import PortFinder

KEY_TYPES = {"ec-p256": m.KeyType.EC_P256, "rsa-2048": m.KeyType.RSA_2048, "rsa-3072": m.KeyType.RSA_3072}
# Longest a key generation may take, keep-alives included (the device sends BUSY meanwhile).
KEYGEN_HARD_TIMEOUT = {"ec-p256": 10.0, "rsa-2048": 60.0, "rsa-3072": 240.0}
DONE_STATES = (DeviceState.PROVISIONED.value, DeviceState.LOCKING.value, DeviceState.SECURED.value)
BOOT_TIMEOUT = 30.0  # a reboot into firmware that is already there
FIRST_BOOT_TIMEOUT = 600.0  # the first boot encrypts the flash in place: about a minute on a real chip
MAX_LOSSES = 3  # a device that goes away more often than this within one run fails
SEARCH_INTERVAL = 0.2  # between two looks for a device that left the bus


class DeviceFailed(StamplineError):
    """This device cannot go on; ``step`` is where it stopped."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(message)
        self.step = step


class OtherDevice(StamplineError):
    """Another chip answers where this device was."""


class Stopped(Exception):
    """The station is stopping: the flow stopped before ``step`` (or while waiting in it)."""

    def __init__(self, step: str) -> None:
        super().__init__(f"stopped at {step}")
        self.step = step


class StopRequest:
    """The operator's request to stop the line (Ctrl-C, SIGTERM), shared by its flows.

    ``FINISH`` (the first request): no new device starts; a device under way finishes, or stops
    where its flow only waits (a boot, a device that went away). ``NOW`` (the second): every flow
    stops at its next step boundary. No step is cut short: ``issue`` (signature and durable
    ledger record) and every flash write run to their end.
    """

    FINISH = 1
    NOW = 2

    def __init__(self) -> None:
        self.level = 0
        self._requested = threading.Event()

    def request(self, level: int | None = None) -> int:
        """Stop one level further than before (or at ``level``); returns the level now."""
        wanted = self.level + 1 if level is None else level
        self.level = min(self.NOW, max(self.level, wanted))
        self._requested.set()
        return self.level

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking at once when a stop is requested."""
        self._requested.wait(seconds)


@dataclass
class StationContext:
    """What every flow on the line shares: recipe, issuer, ledger, the open batch, the issuance desk."""

    recipe: Recipe
    issuer: DeviceIssuer
    ledger: Ledger
    batch_id: int
    firmware: FirmwareSet
    desk: IssuanceDesk
    rework: bool = False
    boot_timeout: float = BOOT_TIMEOUT
    first_boot_timeout: float = FIRST_BOOT_TIMEOUT

    @property
    def sub_ca_der(self) -> bytes:
        return self.issuer.ca_cert.public_bytes(serialization.Encoding.DER)


@dataclass
class DeviceResult:
    port: str
    chip_id: str = ""
    serial: str = ""
    outcome: str = "failed"  # provisioned | secured | already-provisioned | failed | stopped
    step: str = ""
    reason: str = ""
    steps: dict[str, float] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    elapsed: float = 0.0

    def to_dict(self) -> dict[str, object]:
        return {"port": self.port, "chip_id": self.chip_id, "serial": self.serial, "outcome": self.outcome,
                "step": self.step, "reason": self.reason, "elapsed_s": round(self.elapsed, 4),
                "steps": {k: round(v, 4) for k, v in self.steps.items()}}


Progress = Callable[[str, str, str, str], None]  # (port, chip_id, serial, step)


class Flow:
    """Provision the device on one link.

    ``stop`` is the line's stop request, ``finder`` its port claims and search, ``opener`` opens
    a link on a port name (to reconnect); by default the link's own ``reopen``.
    """

    def __init__(self, context: StationContext, link: Link, port: str, progress: Progress | None = None, *,
                 stop: StopRequest | None = None, finder: PortFinder | None = None,
                 opener: Callable[[str], Link] | None = None) -> None:
        self.ctx = context
        self.recipe = context.recipe
        self.link = link
        self.result = DeviceResult(port)
        self._progress = progress or (lambda *_: None)
        self.stop = stop or StopRequest()
        self.finder = finder or PortFinder()
        self._open = opener or link.reopen
        self.port_now = port  # where the device answers now: another name after USB re-enumeration
        self._attached = True  # False once the link is lost, until the device is found again
        self._lost_why = ""

    # -- step machinery ---------------------------------------------------------------------

    def _step(self, name: str, action: Callable[[], object]) -> object:
        r = self.result
        if self.stop.level >= StopRequest.NOW:  # a step boundary is a safe place to stop
            if r.chip_id:
                self.ctx.ledger.record_step(r.chip_id, self.ctx.batch_id, name, time.time(), 0.0, "skipped",
                                            "the station was stopped before this step")
            raise Stopped(name)
        r.step = name
        self._progress(r.port, r.chip_id, r.serial, name)
        started = time.time()
        begin = time.perf_counter()
        outcome, detail = "ok", ""
        try:
            return action()
        except DeviceFailed:
            outcome = "failed"
            raise
        except Stopped:  # while waiting: the device finishes on its own, the next run picks it up
            outcome, detail = "skipped", "the station was stopped while waiting"
            raise
        except LinkLost as lost:  # the device went away: the flow waits for it and starts again
            outcome, detail = "failed", str(lost)
            raise
        except CsrRefused as refused:
            outcome, detail = "failed", str(refused)
            if not refused.recorded:  # the issuance desk records its own refusals
                self.ctx.ledger.record_refusal(r.chip_id, self.ctx.batch_id, r.serial or None, name, str(refused),
                                               getattr(self, "_csr", None))
            raise DeviceFailed(name, f"the CSR was refused: {refused}") from None
        except StamplineError as exc:
            outcome, detail = "failed", str(exc)
            raise DeviceFailed(name, str(exc)) from None
        except Exception as exc:  # a bug, or input nobody foresaw: this device stops, the line goes on
            outcome, detail = "failed", f"internal error ({type(exc).__name__})"
            raise DeviceFailed(name, f"internal error ({type(exc).__name__}).") from None
        finally:
            duration = time.perf_counter() - begin
            r.steps[name] = r.steps.get(name, 0.0) + duration
            if r.chip_id:
                self.ctx.ledger.record_step(r.chip_id, self.ctx.batch_id, name, started, duration, outcome, detail)

    def run(self) -> DeviceResult:
        r = self.result
        begin = time.perf_counter()
        try:
            try:
                if self.stop.level:  # no new device once the station is stopping
                    raise Stopped("identify")
                self._run_resuming()
            except (DeviceFailed, Stopped):
                raise
            except StamplineError as exc:  # outside any step: charge it to the step the device was at
                raise DeviceFailed(r.step or "start", str(exc)) from None
            except Exception as exc:
                raise DeviceFailed(r.step or "start", f"internal error ({type(exc).__name__}).") from None
        except Stopped as stopped:  # the ledger's state is where the next run resumes
            r.outcome, r.step, r.reason = "stopped", stopped.step, "the station was stopped."
        except DeviceFailed as failed:
            r.outcome, r.step, r.reason = "failed", failed.step, str(failed)
            if r.chip_id and not self._finished_before():
                self.ctx.ledger.set_state(r.chip_id, DeviceState.FAILED, f"{failed.step}: {failed}")
        finally:
            r.elapsed = time.perf_counter() - begin
            self._progress(r.port, r.chip_id, r.serial, r.outcome)
        return r

    def _finished_before(self) -> bool:
        """A device this station provisioned keeps that state when a run fails on it (a refused
        rework, a first boot that outlasts the wait): the failure is in the step journal, and the
        next run picks the device up where it stands."""
        if not self.result.chip_id:
            return False
        current = self.ctx.ledger.device(self.result.chip_id)
        return current is not None and current.state in DONE_STATES

    # -- the flow ---------------------------------------------------------------------------

    def _run_resuming(self) -> None:
        """The flow; when the device goes away mid-step (a reset, a power cut, USB
        re-enumeration) it is waited for, found again, and the flow starts over from identify,
        resuming where the ledger says, as after a station restart."""
        for losses in range(MAX_LOSSES + 1):
            try:
                self._run()
                return
            except LinkLost as lost:
                if losses == MAX_LOSSES:
                    raise DeviceFailed(self.result.step, f"the device went away {losses + 1} times: {lost}") from None
                self._lost_why = str(lost)
                self._detach()
                self._step("reconnect", lambda: self._await_device(self.ctx.boot_timeout, "going away",
                                                                   why=self._lost_why, attached_enough=True))

    def _run(self) -> None:
        ledger, r = self.ctx.ledger, self.result
        hello = self._step("identify", self._identify)
        assert isinstance(hello, m.HelloReply)
        live = ledger.live_certificate(r.chip_id)
        record = self._previous
        if hello.state & m.StateFlag.SECURED and (self.ctx.rework or live is None):
            raise DeviceFailed("identify", "the device is secured: its stamp cannot be reworked or replaced at a station.")
        if live is not None and not self.ctx.rework and record is not None and hello.state & m.StateFlag.STAMP_DONE \
                and (record.state in DONE_STATES or hello.state & m.StateFlag.SECURED):
            r.serial = record.serial or ""
            if hello.state & m.StateFlag.SECURED and record.state != DeviceState.SECURED.value:
                self._step("first_boot", self._await_secured)  # it locked itself after an earlier run gave up
                r.outcome, r.step = "secured", "done"
                return
            if self.ctx.firmware.secure and not hello.state & m.StateFlag.SECURED:
                if hello.mfg_fw_version:  # stamped, but the lock did not happen: do it now
                    self._lock()
                    return
                self._step("first_boot", self._await_secured)  # rebooted already, still in its first boot
                r.outcome, r.step = "secured", "done"
                return
            r.outcome, r.step = "already-provisioned", "done"
            ledger.record_step(r.chip_id, self.ctx.batch_id, "recognise", time.time(), 0.0, "skipped",
                               "already provisioned by this station; not issued again")
            return
        plan = self._step("check_firmware", lambda: self._firmware_plan(hello))
        for part, image in plan:  # type: ignore[attr-defined]
            hello = self._flash_firmware(part, image)
        if self.ctx.firmware.secure:
            self._ensure_application(self.ctx.firmware.images["application"])
        if live is not None and not self.ctx.rework:
            cert_der = self._resume_with(live.der, record.serial if record else None)
        else:
            if live is not None:
                self._step("revoke_previous", lambda: ledger.revoke(live.cert_serial, "rework"))
                ledger.set_state(r.chip_id, DeviceState.REWORKED, f"revoked {live.cert_serial}")
            if hello.state & m.StateFlag.CERT_PRESENT:
                # a certificate this ledger does not hold live: revoked in an interrupted rework,
                # or from another station. Only the operator's --rework may erase it.
                if not self.ctx.rework:
                    raise DeviceFailed("identify", "the device holds a certificate that is not live in this ledger; "
                                                   "run with --rework to erase its stamp and provision it again.")
                self._step("erase_stamp", lambda: self.link.request(m.Erase(), timeout=5.0))
            serial = self._step("allocate_serial", self._allocate_serial)
            assert isinstance(serial, str)
            resume_key = (record is not None and record.state == DeviceState.KEY_GENERATED.value
                          and bool(hello.state & m.StateFlag.KEY_PRESENT) and live is None)
            if not resume_key:
                self._step("keygen", self._keygen)
            csr = self._step("csr", self._get_csr)
            assert isinstance(csr, bytes)
            cert_der = self._step("issue", lambda: self.ctx.desk.issue(  # policy, token, durable in the ledger
                csr, self._profile(), self._csr_subject(), r.chip_id, self.ctx.batch_id, r.serial))
            assert isinstance(cert_der, bytes)
        self._write_certificate(cert_der)
        self._step("write_stamp", self._write_stamp)
        self._step("finish", self._finish)
        r.outcome, r.step = "provisioned", "done"
        if self.ctx.firmware.secure:
            self._lock()

    def _identify(self) -> m.HelloReply:
        try:
            hello = self._hello(timeout=3.0)
        except m.DeviceError as exc:
            if exc.code != m.ErrorCode.BUSY:
                raise
            # still booting, e.g. in its first boot when the station started: wait for it
            found = self._await_device(self.ctx.first_boot_timeout, "its boot", why=str(exc))
            assert found is not None
            hello = found
        r = self.result
        r.chip_id = hello.chip_id.hex()
        self._progress(r.port, r.chip_id, r.serial, "identify")
        self._previous = self.ctx.ledger.device(r.chip_id)  # as the last run left it
        self.ctx.ledger.device_seen(r.chip_id, hello.chip_model, hello.mfg_fw_version, hello.app_fw_version,
                                    r.port, self.ctx.batch_id)
        if hello.chip_model != self.recipe.chip:
            raise StamplineError(f"the device is an {shown(hello.chip_model, 40)}, but the recipe is for {self.recipe.chip}.")
        return hello

    def _firmware_plan(self, hello: m.HelloReply) -> list[tuple[str, CheckedImage]]:
        """Versions against the recipe's minimums: what must be flashed (the recipe's own images)."""
        firmware = self.ctx.firmware
        plan = []
        for part, reported in (("manufacturing", hello.mfg_fw_version), ("application", hello.app_fw_version)):
            rule = self.recipe.firmware[part]
            version = parse_version(reported)
            image = firmware.images.get(part)
            if version is not None and compare_versions(reported, rule.min_version_text) >= 0:
                continue
            described = shown(reported, 40) if reported else "missing"
            if image is None:
                if version is None and reported:
                    raise StamplineError(f"the device reports an unreadable {part} firmware version '{described}'.")
                raise StamplineError(f"the device's {part} firmware {described} is below the recipe's minimum "
                                     f"{rule.min_version_text}, and the recipe names no image to flash.")
            plan.append((part, image))
        return plan

    def _flash_firmware(self, part: str, image: CheckedImage) -> m.HelloReply:
        table = self.ctx.firmware.table
        if part == "application":
            self._flash("flash_application", table.find("ota_0").offset, image)
        else:
            # the running factory app cannot overwrite itself: the new one goes to ota_1 and starts from there
            self._flash("flash_manufacturing", table.find("ota_1").offset, image)

        def restart() -> m.HelloReply:
            if part == "application":
                hello = self._hello()
            else:
                self.link.request(m.SetBoot("ota_1"), timeout=3.0)
                self.link.request(m.Reboot(), timeout=3.0)
                hello = self._await_boot(self.ctx.boot_timeout)
            reported = hello.mfg_fw_version if part == "manufacturing" else hello.app_fw_version
            if reported != image.version:
                raise StamplineError(f"after flashing, the device reports {part} firmware '{shown(reported, 40)}', "
                                     f"not {image.version}.")
            return hello
        hello = self._step(f"check_{part}", restart)
        assert isinstance(hello, m.HelloReply)
        return hello

    def _ensure_application(self, image: CheckedImage) -> None:
        """Before the lock the device must hold exactly the recipe's signed application in ota_0."""
        offset = self.ctx.firmware.table.find("ota_0").offset
        held = self._step("check_application", lambda: self.link.request(m.FlashHash(offset, len(image.data)),
                                                                         timeout=10.0).sha256)
        if held != image.sha256:
            self._flash("flash_application", offset, image)

    def _flash(self, step: str, address: int, image: CheckedImage) -> None:
        def write() -> None:
            for attempt in range(3):
                try:
                    self.link.flash(address, image.data, compressed=image.compressed)
                    return
                except (LinkTimeout, ProtocolError) as exc:
                    if isinstance(exc, (m.DeviceError, LinkLost)) or attempt == 2:
                        raise
                    self._reconnect()  # the transfer resumes where the device says it stopped
        self._step(step, write)

    def _reconnect(self) -> None:
        """A new link on the same port (a transfer that timed out; the port is still there)."""
        self.link.close()
        self.link = self._open(self.port_now)
        self._hello()

    def _hello(self, timeout: float = 3.0) -> m.HelloReply:
        """HELLO, and the same chip as at identify: a device swapped during a reboot is not this one."""
        hello = self.link.request(m.Hello(), timeout=timeout)
        if self.result.chip_id and hello.chip_id.hex() != self.result.chip_id:
            raise OtherDevice(f"another device ({hello.chip_id.hex()}) answers on this port now.")
        return hello

    def _await_boot(self, timeout: float) -> m.HelloReply:
        hello = self._await_device(timeout, "its reboot")
        assert hello is not None
        return hello

    def _await_device(self, timeout: float, what: str, *, why: str = "no answer",
                      attached_enough: bool = False) -> m.HelloReply | None:
        """HELLO until the device answers: it answers BUSY while it boots, and a real chip's ROM
        prints to the line at reset, which is not a frame. If the port goes away (a USB-Serial-JTAG
        chip leaves the bus at every reset) the device is looked for again (``_attach``).
        With ``attached_enough``, returns (None) as soon as a link to the device is open again.
        A wait is a safe place to stop: a stop request ends it."""
        deadline = time.monotonic() + timeout
        last = why
        while True:
            hello: m.HelloReply | None = None
            if not self._attached:
                hello, problem = self._attach()
                last = problem or last
                if attached_enough and self._attached:
                    return None
            else:
                try:
                    hello = self._hello(timeout=1.0)
                except OtherDevice as exc:
                    if not self.finder.searches:
                        raise
                    last = str(exc)
                    self._detach()
                except m.DeviceError as exc:
                    last = str(exc)
                    if exc.code != m.ErrorCode.BUSY:
                        raise StamplineError(f"the device does not come back after {what}: {exc.detail or exc}") from None
                except LinkLost as exc:
                    last = str(exc)
                    self._detach()
                except ProtocolError as exc:  # silence, or the ROM's output at reset
                    last = str(exc)
            if hello is not None:
                return hello
            if time.monotonic() >= deadline:
                raise StamplineError(f"the device did not come back within {timeout:.0f} s of {what} ({last}).")
            self.stop.wait(0.05 if self._attached else SEARCH_INTERVAL)
            if self.stop.level:
                raise Stopped(self.result.step)

    def _detach(self) -> None:
        """The link is lost: close it, and let go of the port for whichever flow's device appears there."""
        self.link.close()
        self._attached = False
        self.finder.release(self.result.port)

    def _attach(self) -> tuple[m.HelloReply | None, str]:
        """Look for the device once: on its own port, then (its chip id known) on the finder's
        candidates, skipping ports other flows hold. Its own port is taken back when it answers
        as this chip, or without saying which chip (booting, not up yet); another port only when
        HELLO answers with this chip id. Returns the HELLO if one answered, and the last problem."""
        own, chip_id = self.result.port, self.result.chip_id
        ports = [own] + [p for p in self.finder.candidates() if p != own and chip_id]
        problem = ""
        for port in ports:
            if not self.finder.claim(port, own):
                continue
            hello: m.HelloReply | None = None
            try:
                link = self._open(port)
            except ProtocolError as exc:
                problem = str(exc)
                self.finder.release(own)
                continue
            try:
                hello = link.request(m.Hello(), timeout=1.0)
            except LinkLost as exc:
                problem = str(exc)
            except ProtocolError as exc:  # BUSY, silence or noise: no chip id said
                problem = str(exc)
                if port == own:
                    self._attach_to(link, port)
                    return None, problem
            if hello is not None:
                if not chip_id or hello.chip_id.hex() == chip_id:
                    self._attach_to(link, port)
                    return hello, ""
                problem = f"another device ({hello.chip_id.hex()}) answers on {port}"
                if port == own and not self.finder.searches:
                    link.close()
                    self.finder.release(own)
                    raise OtherDevice(f"another device ({hello.chip_id.hex()}) answers on this port now.")
            link.close()
            self.finder.release(own)
        return None, problem

    def _attach_to(self, link: Link, port: str) -> None:
        self.link, self._attached = link, True
        if port != self.port_now:
            self.port_now = port
            if self.result.chip_id:
                self.ctx.ledger.record_step(self.result.chip_id, self.ctx.batch_id, "reconnect", time.time(), 0.0,
                                            "ok", f"found again on {shown(port, 200)}")

    def _lock(self) -> None:
        """Swap in the secure bootloader, boot the application, wait until the device reports secured."""
        firmware, ledger, r = self.ctx.firmware, self.ctx.ledger, self.result
        self._step("write_bootloader", lambda: self.link.flash(
            firmware.bootloader_offset, firmware.images["bootloader"].data,
            compressed=firmware.images["bootloader"].compressed))
        self._step("set_boot", lambda: self.link.request(m.SetBoot("ota_0"), timeout=3.0))
        ledger.set_state(r.chip_id, DeviceState.LOCKING)
        self._step("reboot", lambda: self.link.request(m.Reboot(), timeout=3.0))
        self._step("first_boot", self._await_secured)
        r.outcome, r.step = "secured", "done"

    def _await_secured(self) -> None:
        hello = self._await_boot(self.ctx.first_boot_timeout)
        wanted = m.StateFlag.SECURED | m.StateFlag.SECURE_BOOT | m.StateFlag.FLASH_ENCRYPTION | m.StateFlag.STAMP_DONE
        if hello.state & wanted != wanted:
            raise StamplineError(f"after its first boot the device reports state {int(hello.state):#x}, "
                                 "not secured with its stamp.")
        self.ctx.ledger.set_state(self.result.chip_id, DeviceState.SECURED)

    def _allocate_serial(self) -> str:
        r = self.result
        number = self.ctx.ledger.allocate_serial(r.chip_id, self.recipe.product, self.recipe.serial_start)
        r.serial = self.recipe.serial(number)
        self.ctx.ledger.set_device_serial(r.chip_id, r.serial)
        return r.serial

    def _keygen(self) -> None:
        key_type = self.recipe.device_key
        self.link.request(m.Keygen(KEY_TYPES[key_type]), timeout=3.0, hard_timeout=KEYGEN_HARD_TIMEOUT[key_type])
        self.ctx.ledger.set_state(self.result.chip_id, DeviceState.KEY_GENERATED)

    def _profile(self) -> DeviceProfile:
        return DeviceProfile(self.recipe.device_key, self.recipe.validity_days,
                             self.recipe.subject_attributes(self.result.serial))

    def _csr_subject(self) -> x509.Name:
        attrs = self.recipe.subject_attributes(self.result.serial)
        return csr_subject(attrs["common_name"], attrs.get("organization"), self.result.chip_id)

    def _get_csr(self) -> bytes:
        attrs = self.recipe.subject_attributes(self.result.serial)
        built = self.link.request(m.CsrBuild(subject_cn=attrs["common_name"], subject_o=attrs.get("organization"),
                                             subject_serial=self.result.chip_id), timeout=5.0, hard_timeout=30.0)
        csr = self.link.read_object(m.Target.CSR)
        if len(csr) != built.length or hashlib.sha256(csr).digest() != built.sha256:
            raise StamplineError("the CSR read from the device is not the one it announced.")
        self._csr = csr
        return csr

    def _resume_with(self, cert_der: bytes, serial: str | None) -> bytes:
        """The ledger already holds this chip's certificate: write that one, never a second — and
        only to a device that proves, with a CSR the policy accepts, that it holds that key."""
        r = self.result
        r.serial = serial or ""

        def check_key() -> None:
            csr = self._get_csr()
            accepted = check_csr(csr, self._profile(), self._csr_subject(), lambda digest: None)
            cert = x509.load_der_x509_certificate(cert_der)
            spki = serialization.PublicFormat.SubjectPublicKeyInfo
            if accepted.public_key_der != cert.public_key().public_bytes(serialization.Encoding.DER, spki):
                raise StamplineError("the device no longer holds the key of the certificate the ledger issued to it; "
                                     "provision it again with --rework.")
        self._step("resume", check_key)
        return cert_der

    def _write_certificate(self, cert_der: bytes) -> None:
        ns, key = self.recipe.nvs_namespace, self.recipe.nvs_keys["certificate"]
        self._step("write_cert", lambda: self.link.write_object(m.Target.CERT, ns, key, m.NvsType.BLOB, cert_der))

        def read_back() -> None:
            if self.link.read_object(m.Target.CERT, ns, key) != cert_der:
                raise StamplineError("the certificate read back from the device differs from the one written.")
            self.ctx.ledger.set_state(self.result.chip_id, DeviceState.WRITTEN)
        self._step("verify_cert", read_back)

    def _write_stamp(self) -> None:
        recipe, ns = self.recipe, self.recipe.nvs_namespace
        entries: list[tuple[str, m.NvsType, bytes]] = [
            (recipe.nvs_keys["serial"], m.NvsType.STRING, self.result.serial.encode()),
            (recipe.nvs_keys["endpoint"], m.NvsType.STRING, recipe.endpoint.encode()),
        ]
        if "ca_certificate" in recipe.nvs_keys:
            entries.append((recipe.nvs_keys["ca_certificate"], m.NvsType.BLOB, self.ctx.sub_ca_der))
        pop_digest = ""
        if recipe.pop_bytes:
            pop = base64.b32encode(secrets.token_bytes(recipe.pop_bytes)).decode().rstrip("=")
            pop_digest = hashlib.sha256(f"{self.result.chip_id}:{pop}".encode()).hexdigest()  # salted per chip
            entries.append((recipe.nvs_keys["pop"], m.NvsType.STRING, pop.encode()))
            del pop
        for key, nvs_type, data in entries:
            self.link.write_object(m.Target.NVS, ns, key, nvs_type, data)
        self.ctx.ledger.set_state(self.result.chip_id, DeviceState.STAMPED,
                                  f"pop_sha256={pop_digest}" if pop_digest else "")

    def _finish(self) -> None:
        self.link.request(m.Finish(), timeout=3.0)
        self.ctx.ledger.set_state(self.result.chip_id, DeviceState.PROVISIONED)
