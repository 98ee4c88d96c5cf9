"""Every failure of a file's pipeline is classified here, and only here.

- Benign races (an entry that vanishes while a folder is listed, a file someone else
  claimed first) are not failures at all: ``is_benign_race`` tells them apart.
- RETRYABLE: transient, or possibly so (a network blip, a busy or failing service, a stale
  NFS handle, a permission an NFS server refuses for a while); the file is tried again
  later, in this process, and quarantined only once retries have run out while other files
  succeed (see worker.py).
- PERMANENT: retrying cannot help (what was claimed is not a regular file, the storage
  service refuses the request as malformed); the file is quarantined at once.
"""

from __future__ import annotations

import enum
import errno
import random

import urllib3
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceRequestTimeoutError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)

from uploader.config import redact


class Disposition(enum.Enum):
    RETRYABLE = "retryable"
    PERMANENT = "permanent"


class Fatal(Exception):
    """The service must stop; the message is one clear line for the log and the exit."""

    doing = "stopped"  # what the exit line says the service did


class StartupError(Fatal):
    """Start-up cannot go on."""

    doing = "cannot start"


class SourceChanged(Exception):
    """The file changed after it was found stable: someone is still writing it."""


class IntegrityError(Exception):
    """The blob in storage does not match the staged file."""


class BlocksMissing(Exception):
    """Storage no longer holds every block the commit names (it lost uncommitted blocks:
    an emulator restarted, blocks expired after 7 days): the next attempt sends them again."""


class SourceVanished(Exception):
    """NFS says the claimed file is gone. NFS can say so wrongly for a moment, so this is
    retried; a file still missing when retries run out is dropped (see worker.py)."""


class NotARegularFile(Exception):
    """What was claimed is not a regular file (a symlink, a folder, a device)."""


class BlobNameRefused(Exception):
    """Azure would refuse the file's blob name (too long, too deep): no retry can help."""


_RETRYABLE_ERRNOS = {
    errno.ESTALE,
    errno.EIO,
    errno.ETIMEDOUT,
    errno.EAGAIN,
    errno.EINTR,
    errno.EBUSY,
    errno.ENOSPC,  # staging full: space comes back as other uploads finish
    errno.EDQUOT,
    errno.ENOMEM,
    errno.EMFILE,
    errno.ENFILE,
    errno.ENETDOWN,
    errno.ENETUNREACH,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.EHOSTUNREACH,
    errno.ENOLCK,
    errno.EREMOTEIO,
}
# Structural: the path is not a plain file we can open. EACCES and EPERM are not here:
# an NFS server (or its Kerberos tickets) can refuse for a while and then allow again.
_PERMANENT_ERRNOS = {
    errno.EISDIR,
    errno.ELOOP,
    errno.ENAMETOOLONG,
    errno.EFBIG,
}
# "Not now" (throttling, timeouts, outages, leases) and "not you" (credentials or roles that
# are wrong for every file, a container deleted under us): no reason to give up on one file.
_RETRYABLE_STATUSES = {401, 403, 404, 408, 409, 412, 429}


def classify(exc: BaseException) -> Disposition:
    if isinstance(exc, NotARegularFile | BlobNameRefused):
        return Disposition.PERMANENT
    if isinstance(exc, SourceChanged | IntegrityError | SourceVanished | BlocksMissing):
        return Disposition.RETRYABLE
    if isinstance(exc, ClientAuthenticationError):
        # Expired or rotated credentials are the service's problem, not the file's.
        return Disposition.RETRYABLE
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return Disposition.RETRYABLE
    if isinstance(exc, HttpResponseError):
        status = exc.status_code
        if status is None or status in _RETRYABLE_STATUSES or status >= 500:
            return Disposition.RETRYABLE
        return Disposition.PERMANENT
    if isinstance(exc, OSError):
        if exc.errno in _PERMANENT_ERRNOS:
            return Disposition.PERMANENT
        return Disposition.RETRYABLE
    if isinstance(exc, TimeoutError | ConnectionError):
        return Disposition.RETRYABLE
    # An unknown error is most likely our bug: keep the file and try again later.
    return Disposition.RETRYABLE


def refused_by_storage(exc: BaseException) -> bool:
    """An answer of storage's, permanent or not, that may be about the file (a header it will
    not take for it) or about every file (an account that now requires HTTPS answers 400 to
    every request): a probe of storage tells which."""
    return isinstance(exc, HttpResponseError)


def unanswered(exc: BaseException) -> str | None:
    """Which wait ran out when storage gave no answer in time: "connect" (no connection
    within the connect timeout) or "read" (a request sent, nothing heard back within the
    read timeout, which also bounds each send); None for an answer, or for a connection
    refused or reset. Such a failure says nothing about the file unless others were answered
    while it waited (see worker.py)."""
    if isinstance(exc, ServiceRequestTimeoutError):
        return "connect"
    if isinstance(exc, ServiceResponseTimeoutError):
        return "read"
    if not isinstance(exc, ServiceRequestError | ServiceResponseError):
        return None
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:  # what the SDK wrapped: a socket's timeout
        seen.add(id(cause))
        if isinstance(cause, urllib3.exceptions.NewConnectionError):  # (refused, no such host:
            return None  # a subclass of urllib3's ConnectTimeoutError, for history's sake)
        if isinstance(cause, TimeoutError | urllib3.exceptions.TimeoutError):
            return "connect" if isinstance(cause, urllib3.exceptions.ConnectTimeoutError) else "read"
        inner = getattr(cause, "inner_exception", None)
        nested = [a for a in getattr(cause, "args", ()) if isinstance(a, BaseException)]
        cause = inner or cause.__cause__ or cause.__context__ or (nested[-1] if nested else None)
    return None


def may_have_gone_through(exc: BaseException) -> bool:
    """Whether storage may have carried out a request whose answer never came: it was sent,
    and then the wait for the answer ran out, or the connection was reset or closed. (A
    connection never made, or an answer, says it was not, or says what became of it.)"""
    return isinstance(exc, ServiceResponseError) or unanswered(exc) == "read"


def is_out_of_space(exc: BaseException) -> bool:
    """A full disk or quota: it fails every file until space comes back, so it says nothing
    about the file itself (a probe that lists a folder would still succeed)."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def first_leaf(group: BaseExceptionGroup[Exception]) -> Exception:
    """The first exception inside a (possibly nested) exception group."""
    first = group.exceptions[0]
    return first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def is_benign_race(exc: OSError) -> bool:
    """ENOENT or ESTALE while listing or claiming: the entry went away under us."""
    return exc.errno in (errno.ENOENT, errno.ESTALE)


def describe(exc: BaseException) -> str:
    """One line for status and logs, without secrets: the SDK puts a request's URL, SAS
    signature included, into some of its messages."""
    return redact(_describe(exc))


def _describe(exc: BaseException) -> str:
    def one_line(text: str) -> str:
        return " ".join(text.split())

    if isinstance(exc, ClientAuthenticationError) and exc.response is None:
        # A credential failed to get a token. A chain such as DefaultAzureCredential reports
        #   DefaultAzureCredential failed to retrieve a token from the included credentials.
        #   Attempted credentials:
        #   \tEnvironmentCredential: <reason, maybe on several lines>
        #   \tAzureCliCredential: <reason>
        #   To mitigate this issue, please refer to the troubleshooting guidelines here at <url>.
        # which becomes "DefaultAzureCredential failed to retrieve a token from the included
        # credentials (EnvironmentCredential: <reason>; AzureCliCredential: <reason>)".
        message = str(exc.message or exc)
        advice = "To mitigate this issue, please refer to the troubleshooting guidelines here at "
        while (start := message.find(advice)) >= 0:  # the advice and its link, every time
            end = start + len(advice)
            while end < len(message) and not message[end].isspace():
                end += 1
            message = message[:start] + message[end:]
        head, found, attempts = message.partition("\nAttempted credentials:")
        if not found:
            return one_line(message) or type(exc).__name__
        tried = "; ".join(filter(None, (one_line(a) for a in attempts.split("\n\t"))))
        return f"{one_line(head).removesuffix('.')} ({tried})"
    if isinstance(exc, HttpResponseError):
        code = getattr(exc, "error_code", None)
        code = getattr(code, "value", code)  # the SDK hands over an enum member at times
        status = exc.status_code
        first_line = str(exc.message or exc).splitlines()[0] if (exc.message or str(exc)) else ""
        text = f"Azure answered {status} {code or ''}: {first_line}".replace("  ", " ")
        detail = getattr(exc, "additional_info", None)
        if (
            isinstance(exc, ClientAuthenticationError)
            and isinstance(detail, dict)
            and detail.get("authenticationerrordetail")
        ):
            # Why storage refused the credential ("Invalid token audience.") is not on the
            # first line of the message: the SDK keeps it apart.
            text += f" ({one_line(str(detail['authenticationerrordetail']))})"
        return text
    if isinstance(exc, OSError) and exc.errno is not None:
        name = errno.errorcode.get(exc.errno, str(exc.errno))
        where = f" on {exc.filename!r}" if exc.filename else ""  # repr: one line, whatever the name
        if exc.filename2:  # link, rename: the second name may be the one at fault
            where += f" -> {exc.filename2!r}"
        return f"{name}{where}: {exc.strerror}"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def backoff_delay(
    attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None
) -> float:
    """Capped exponential backoff with jitter: attempt 1 waits about base_s, then doubles.

    The jitter (50-100% of the step) keeps files that failed together from retrying together.
    """
    # The exponent is capped: attempts are unbounded while an outage lasts.
    step = min(cap_s, base_s * 2.0 ** min(max(0, attempt - 1), 64))
    return float(step * (0.5 + 0.5 * (rng or random).random()))
