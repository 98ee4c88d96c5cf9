"""Unit tests for uploader/errors.py: classification, one-line descriptions, backoff."""

from __future__ import annotations

import base64
import errno
import random
import socket

import pytest
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import BlobServiceClient

from uploader.errors import (
    BlobNameRefused,
    Disposition,
    IntegrityError,
    NotARegularFile,
    SourceChanged,
    SourceVanished,
    backoff_delay,
    classify,
    describe,
    is_benign_race,
    may_have_gone_through,
    unanswered,
)

RETRYABLE, PERMANENT = Disposition.RETRYABLE, Disposition.PERMANENT


def http_error(status: int | None, message: str = "The server said no.") -> HttpResponseError:
    exc = HttpResponseError(message=message, response=None)
    exc.status_code = status
    return exc


def os_error(code: int, filename: str | None = None) -> OSError:
    return (
        OSError(code, errno.errorcode[code], filename)
        if filename
        else OSError(code, errno.errorcode[code])
    )


# --- classify ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        pytest.param(os_error(errno.ESTALE), RETRYABLE, id="ESTALE"),
        pytest.param(os_error(errno.EIO), RETRYABLE, id="EIO"),
        pytest.param(os_error(errno.ENOSPC), RETRYABLE, id="ENOSPC"),
        pytest.param(os_error(errno.ETIMEDOUT), RETRYABLE, id="ETIMEDOUT"),
        # An NFS server can refuse for a while (tickets, exports being changed): not for good.
        pytest.param(os_error(errno.EACCES), RETRYABLE, id="EACCES"),
        pytest.param(os_error(errno.EPERM), RETRYABLE, id="EPERM"),
        pytest.param(
            PermissionError(errno.EACCES, "Permission denied"), RETRYABLE, id="PermissionError"
        ),
        pytest.param(os_error(errno.EISDIR), PERMANENT, id="EISDIR"),
        pytest.param(os_error(errno.ELOOP), PERMANENT, id="ELOOP"),
        pytest.param(
            IsADirectoryError(errno.EISDIR, "Is a directory"), PERMANENT, id="IsADirectoryError"
        ),
    ],
)
def test_classify_os_error(exc: OSError, expected: Disposition) -> None:
    assert classify(exc) is expected


@pytest.mark.parametrize("status", [500, 502, 503, 429, 403, 404, 401, 408, 409, 412, None])
def test_classify_http_status_retryable(status: int | None) -> None:
    assert classify(http_error(status)) is RETRYABLE


@pytest.mark.parametrize("status", [400, 413, 411, 416])
def test_classify_http_status_permanent(status: int) -> None:
    assert classify(http_error(status)) is PERMANENT


def test_classify_client_authentication_error_is_retryable() -> None:
    exc = ClientAuthenticationError(message="token expired", response=None)
    exc.status_code = 401
    assert classify(exc) is RETRYABLE


@pytest.mark.parametrize("cls", [ServiceRequestError, ServiceResponseError])
def test_classify_transport_errors_are_retryable(cls: type[Exception]) -> None:
    assert classify(cls("connection reset")) is RETRYABLE


def test_classify_source_vanished_is_retryable() -> None:
    """NFS can say 'gone' wrongly for a moment; the worker drops a file only once it is sure."""
    assert classify(SourceVanished("gone")) is RETRYABLE


@pytest.mark.parametrize("exc", [SourceChanged("still written"), IntegrityError("md5 differs")])
def test_classify_change_and_integrity_are_retryable(exc: Exception) -> None:
    assert classify(exc) is RETRYABLE


def test_classify_not_a_regular_file_is_permanent() -> None:
    assert classify(NotARegularFile("a symlink")) is PERMANENT
    assert classify(BlobNameRefused("a blob name of 1025 characters")) is PERMANENT


@pytest.mark.parametrize("exc", [TimeoutError(), ConnectionResetError(), RuntimeError("bug")])
def test_classify_other_errors_are_retryable(exc: Exception) -> None:
    assert classify(exc) is RETRYABLE


@pytest.mark.parametrize("code", [errno.ENOENT, errno.ESTALE])
def test_is_benign_race_for_vanished_entries(code: int) -> None:
    assert is_benign_race(os_error(code))


@pytest.mark.parametrize("code", [errno.EIO, errno.EACCES])
def test_is_benign_race_not_for_real_failures(code: int) -> None:
    assert not is_benign_race(os_error(code))


# --- describe ----------------------------------------------------------------------------


def test_describe_http_error_gives_status_and_first_line() -> None:
    text = describe(http_error(503, "Server busy.\nRequestId:abc\nTime:2024"))
    assert text == "Azure answered 503 : Server busy."


def test_describe_http_error_with_error_code() -> None:
    exc = http_error(403, "Forbidden.\nmore")
    exc.error_code = "AuthorizationFailure"
    assert describe(exc) == "Azure answered 403 AuthorizationFailure: Forbidden."


def test_describe_os_error_names_errno_and_file() -> None:
    assert describe(OSError(errno.EIO, "Input/output error", "/nfs/a.csv")) == (
        "EIO on '/nfs/a.csv': Input/output error"
    )


def test_describe_os_error_names_both_files_of_a_link() -> None:
    exc = OSError(errno.ENOTDIR, "Not a directory", "/nfs/in/s/a/b", None, "/nfs/proc/s/a/b")
    assert describe(exc) == "ENOTDIR on '/nfs/in/s/a/b' -> '/nfs/proc/s/a/b': Not a directory"


def test_describe_os_error_without_file() -> None:
    assert describe(OSError(errno.ENOSPC, "No space left on device")) == (
        "ENOSPC: No space left on device"
    )


def test_describe_other_exception_gives_type_and_first_line() -> None:
    assert describe(SourceChanged("a.csv changed\nsecond line")) == "SourceChanged: a.csv changed"


def test_describe_exception_without_message_gives_type() -> None:
    assert describe(ValueError()) == "ValueError"


@pytest.mark.parametrize(
    "exc",
    [
        http_error(500, "line one\nline two\r\nline three"),
        http_error(None, ""),
        ServiceRequestError("a\nb"),
        SourceVanished("/x/y\nz is gone"),
        OSError(errno.EIO, "Input/output error"),
        RuntimeError(""),
    ],
)
def test_describe_is_one_line(exc: BaseException) -> None:
    text = describe(exc)
    assert text
    assert len(text.splitlines()) == 1


def test_describe_os_error_with_newline_in_file_name_is_one_line() -> None:
    text = describe(OSError(errno.EACCES, "Permission denied", "/nfs/in/s/evil\nname.csv"))
    assert len(text.splitlines()) == 1


def test_describe_never_shows_a_sas_signature() -> None:
    # The SDK puts the request's URL, query string and all, into some transport errors.
    exc = ServiceResponseError(
        "Failed to parse: http://127.0.0.1:99999/x/c?restype=container&sv=2020-10-02&sig=SECRETsig%3D"
    )
    text = describe(exc)
    assert "SECRETsig" not in text
    assert "sig=***" in text


# --- backoff_delay -----------------------------------------------------------------------


@pytest.mark.parametrize(("base", "cap"), [(1.0, 60.0), (0.25, 5.0), (2.0, 2.0), (10.0, 3600.0)])
def test_backoff_delay_within_half_to_full_step(base: float, cap: float) -> None:
    rng = random.Random(1234)
    for attempt in range(1, 1001):
        step = min(cap, base * 2 ** (attempt - 1))
        for _ in range(5):
            delay = backoff_delay(attempt, base, cap, rng)
            assert 0.5 * step <= delay <= step
            assert delay <= cap


def test_backoff_delay_first_attempt_is_about_base() -> None:
    rng = random.Random(7)
    delays = [backoff_delay(1, 1.0, 60.0, rng) for _ in range(200)]
    assert all(0.5 <= d <= 1.0 for d in delays)


def test_backoff_delay_doubles_per_attempt_until_cap() -> None:
    class Top(random.Random):
        def random(self) -> float:
            return 1.0  # no jitter: the full step

    rng = Top()
    assert [backoff_delay(n, 1.0, 10.0, rng) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]


def test_backoff_delay_is_jittered() -> None:
    rng = random.Random(99)
    delays = {backoff_delay(5, 1.0, 60.0, rng) for _ in range(50)}
    assert len(delays) > 40


def test_backoff_delay_is_reproducible_with_seeded_rng() -> None:
    first = [backoff_delay(n, 1.0, 60.0, random.Random(5)) for n in range(1, 20)]
    second = [backoff_delay(n, 1.0, 60.0, random.Random(5)) for n in range(1, 20)]
    assert first == second


def test_backoff_delay_attempt_zero_is_base() -> None:
    assert 0.5 <= backoff_delay(0, 1.0, 60.0, random.Random(3)) <= 1.0


def test_backoff_delay_without_rng_uses_module_random() -> None:
    assert 30.0 <= backoff_delay(100, 1.0, 60.0) <= 60.0


def test_backoff_delay_stays_capped_for_very_many_attempts() -> None:
    rng = random.Random(42)
    for attempt in (1025, 5000, 100_000):
        assert 30.0 <= backoff_delay(attempt, 1.0, 60.0, rng) <= 60.0


def _sdk_failure(endpoint: str) -> Exception:
    """What one upload through the real SDK raises against ``endpoint``."""
    client = BlobServiceClient.from_connection_string(
        f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={base64.b64encode(b'k').decode()};"
        f"BlobEndpoint={endpoint}/devstoreaccount1;",
        retry_total=0, connection_timeout=0.5, read_timeout=0.5,
    )
    with client, pytest.raises(Exception) as caught:
        client.get_blob_client("c", "b").upload_blob(b"x" * 1000, overwrite=True)
    return caught.value


def test_a_request_storage_never_answers_went_unanswered_for_the_read_timeout() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:  # takes connections, says nothing
        exc = _sdk_failure(f"http://127.0.0.1:{silent.getsockname()[1]}")
    assert unanswered(exc) == "read"


def test_a_refused_connection_is_an_answer_not_a_silence() -> None:
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    assert unanswered(_sdk_failure(f"http://127.0.0.1:{port}")) is None


def test_a_connection_reset_and_an_error_answer_are_no_silence() -> None:
    reset = ServiceResponseError("Connection aborted.", error=ConnectionResetError(104, "reset by peer"))
    assert unanswered(reset) is None
    assert unanswered(http_error(503)) is None
    assert unanswered(OSError(errno.ETIMEDOUT, "timed out")) is None  # NFS, not storage


def test_a_request_sent_and_never_answered_or_reset_may_have_gone_through() -> None:
    with socket.create_server(("127.0.0.1", 0)) as silent:
        assert may_have_gone_through(_sdk_failure(f"http://127.0.0.1:{silent.getsockname()[1]}"))
    assert may_have_gone_through(ServiceResponseError("Connection aborted.", error=ConnectionResetError(104, "reset")))
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port = closed.getsockname()[1]
    assert not may_have_gone_through(_sdk_failure(f"http://127.0.0.1:{port}"))  # never connected
    assert not may_have_gone_through(http_error(500))  # answered
