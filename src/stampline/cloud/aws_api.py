"""How stampline talks to AWS IoT Core: a boto3 client made from the normal credential chain, calls
that back off exponentially while AWS throttles, a pacer for bulk work, and refusals turned into
one sentence.

botocore's own retries are switched off (one attempt per call) so that there is one retry policy,
this one, and it can be tested with a fake clock.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Protocol
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

from stampline.errors import StamplineError, UsageError

#: AWS IoT throttling and transient server errors: worth another try after a pause.
RETRYABLE = frozenset({"ThrottlingException", "Throttling", "TooManyRequestsException", "RequestLimitExceeded",
                       "ServiceUnavailableException", "InternalFailureException"})
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-\d{1,2}")
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


class SystemClock:
    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


SYSTEM_CLOCK = SystemClock()


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: the n-th retry waits base·2ⁿ seconds (capped), times a jitter in [0.5, 1]."""

    retries: int = 8
    base_s: float = 0.25
    cap_s: float = 20.0

    def delay(self, retry: int, jitter: float) -> float:
        return min(self.cap_s, self.base_s * 2 ** retry) * (0.5 + jitter / 2)


class RateLimiter:
    """Spaces calls at least 1/rate seconds apart (no bursts): AWS IoT quotas are per second."""

    def __init__(self, rate: float, clock: Clock = SYSTEM_CLOCK) -> None:
        if not 0 < rate <= 10_000:
            raise UsageError("the rate must be more than 0 and at most 10000 per second.")
        self.interval = 1.0 / rate
        self.clock = clock
        self._next: float | None = None

    def wait(self) -> None:
        now = self.clock.monotonic()
        if self._next is not None and now < self._next:
            self.clock.sleep(self._next - now)
            now = self._next
        self._next = now + self.interval


class AwsRefusal(StamplineError):
    """AWS IoT answered with an error; ``code`` is its error code (ResourceNotFoundException, ...)."""

    def __init__(self, message: str, code: str, details: dict[str, str]) -> None:
        super().__init__(message)
        self.code = code
        self.details = details


def _sentence(text: str, limit: int = 200) -> str:
    text = " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())
    text = text if len(text) <= limit else text[:limit - 3] + "..."
    return text.rstrip(".") + "." if text else "no reason given."


def check_endpoint(url: str) -> str:
    """An endpoint URL for boto3: https anywhere, plain http only on loopback (moto, tunnels)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError("--endpoint-url must be an http(s) URL such as https://iot.eu-west-1.amazonaws.com.")
    if parts.username or parts.password:
        raise UsageError("--endpoint-url must not carry credentials; boto3 reads them from its own chain.")
    if parts.scheme == "http" and parts.hostname not in _LOOPBACK:
        raise UsageError("--endpoint-url may use plain http only on this machine (127.0.0.1, ::1, localhost).")
    return url


def iot_client(region: str | None = None, endpoint_url: str | None = None) -> Any:
    """A boto3 AWS IoT client; credentials come only from boto3's chain (environment, profile, role)."""
    session = boto3.session.Session(region_name=region)
    region = session.region_name
    if not region:
        raise UsageError("no AWS region is configured; pass --region or set AWS_REGION.")
    if not _REGION.fullmatch(region):
        raise UsageError(f"'{region}' is not an AWS region name.")
    if endpoint_url:
        check_endpoint(endpoint_url)
    if session.get_credentials() is None:
        raise StamplineError("no AWS credentials were found; configure them the way boto3 reads them "
                             "(environment, shared profile or instance role), never on the command line.")
    config = Config(retries={"total_max_attempts": 1, "mode": "standard"}, connect_timeout=10, read_timeout=60)
    return session.client("iot", endpoint_url=endpoint_url, config=config)


class IotApi:
    """An AWS IoT client whose calls retry what is retryable and raise `AwsRefusal` otherwise."""

    def __init__(self, client: Any, backoff: Backoff = Backoff(), clock: Clock = SYSTEM_CLOCK,
                 jitter: Callable[[], float] = random.random) -> None:
        self.client = client
        self.backoff = backoff
        self.clock = clock
        self.jitter = jitter
        self.retried = 0

    @property
    def region(self) -> str:
        return str(self.client.meta.region_name)

    def _api_name(self, operation: str) -> str:
        return str(self.client.meta.method_to_api_mapping.get(operation, operation))

    def call(self, operation: str, **params: Any) -> dict[str, Any]:
        method = getattr(self.client, operation)
        retry = 0
        while True:
            try:
                return dict(method(**params))
            except ClientError as exc:
                code = str(exc.response.get("Error", {}).get("Code", "Unknown"))
                if code in RETRYABLE and retry < self.backoff.retries:
                    self.clock.sleep(self.backoff.delay(retry, self.jitter()))
                    retry += 1
                    self.retried += 1
                    continue
                raise self._refusal(operation, code, exc, retry) from None
            except NoCredentialsError:
                raise StamplineError("no AWS credentials were found; configure them for boto3.") from None
            except EndpointConnectionError:
                raise StamplineError(f"AWS IoT could not be reached at {self.client.meta.endpoint_url}.") from None
            except BotoCoreError as exc:
                name = self._api_name(operation)
                raise StamplineError(f"the AWS IoT call {name} failed ({type(exc).__name__}).") from None

    def _refusal(self, operation: str, code: str, exc: ClientError, retries: int) -> AwsRefusal:
        name = self._api_name(operation)
        details = {k: str(exc.response[k]) for k in ("resourceId", "resourceArn") if k in exc.response}
        if code in RETRYABLE:
            message = f"AWS IoT kept refusing {name} ({code}) after {retries} retries; run the command again later."
        else:
            message = f"AWS IoT refused {name} ({code}): {_sentence(exc.response.get('Error', {}).get('Message', ''))}"
        return AwsRefusal(message, code, details)

    def find(self, operation: str, **params: Any) -> dict[str, Any] | None:
        """`call`, but None where AWS says the resource does not exist."""
        try:
            return self.call(operation, **params)
        except AwsRefusal as exc:
            if exc.code == "ResourceNotFoundException":
                return None
            raise

    def all(self, operation: str, key: str, **params: Any) -> Iterator[Any]:
        """Every item of a paginated list (nextToken or marker style)."""
        while True:
            page = self.call(operation, **params)
            yield from page.get(key) or ()
            if page.get("nextToken"):
                params["nextToken"] = page["nextToken"]
            elif page.get("nextMarker"):
                params["marker"] = page["nextMarker"]
            else:
                return
