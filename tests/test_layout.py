"""Unit tests for uploader/layout.py: session names, date prefixes, blob names and paths."""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from uploader.layout import (
    COMPLETED_DIR_NAME,
    FAILED_DIR_NAME,
    NAME_MAX,
    STATE_FILE_NAME,
    FileKey,
    InvalidSessionName,
    Layout,
    blob_name,
    blob_name_problem,
    date_prefix,
    is_date_prefix,
    is_session_name,
    name_with_suffix,
    new_session_name,
    printable,
    validate_new_session_name,
    validate_session_name,
)

UNDECODABLE = os.fsdecode(b"x\xff")  # 'x\udcff': how Python hands over a non-UTF-8 byte

LAYOUT = Layout(
    incoming_root=Path("/nfs/incoming"),
    processing_root=Path("/nfs/.processing"),
    staging_root=Path("/staging"),
)
KEY = FileKey("20240102", "run-1", "sub/dir/data.csv")


# --- validate_session_name ---------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["run-1", "A_b.c", "a", ".hidden", "..x", "run.", "a" * 255, "00-session-0190f0a8-1234-7abc-8def-0123456789ab"],
)
def test_validate_session_name_accepts_valid_name(name: str) -> None:
    assert validate_session_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(".", id="dot"),
        pytest.param("..", id="dotdot"),
        pytest.param("a/b", id="slash"),
        pytest.param("a" * 256, id="256-chars"),
        pytest.param("café", id="non-ascii"),
        pytest.param("run\uff11", id="fullwidth-digit"),
        pytest.param("", id="empty"),
        pytest.param("run 1", id="space"),
        pytest.param(" run", id="leading-space"),
        pytest.param("run-1\n", id="trailing-newline"),
        pytest.param("a\\b", id="backslash"),
        pytest.param("a\0b", id="nul"),
        pytest.param(None, id="none"),
        pytest.param(42, id="int"),
        pytest.param(b"run-1", id="bytes"),
        pytest.param(["run-1"], id="list"),
    ],
)
def test_validate_session_name_refuses_with_one_sentence(name: object) -> None:
    with pytest.raises(InvalidSessionName) as info:
        validate_session_name(name)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("session_name ")
    assert message.endswith(".")


@pytest.mark.parametrize("name", ["run.", "..."])
def test_a_new_session_name_must_not_end_with_a_dot(name: str) -> None:
    with pytest.raises(InvalidSessionName, match=r"^session_name must not end with '\.'"):
        validate_new_session_name(name)
    assert validate_session_name(name) == name  # a recorded session of that name still resumes


def test_a_session_name_ending_with_a_dot_is_escaped_in_blob_names() -> None:
    assert blob_name(FileKey("20240102", "run.", "a.csv")) == "20240102/run%2E/a.csv"


def test_invalid_session_name_is_a_value_error() -> None:
    assert issubclass(InvalidSessionName, ValueError)


def test_overlong_name_message_states_length_and_limit() -> None:
    with pytest.raises(InvalidSessionName, match=r"256 characters.*255"):
        validate_session_name("a" * 256)


def test_is_session_name_mirrors_validation() -> None:
    assert is_session_name("run-1")
    assert not is_session_name("..")
    assert not is_session_name("a/b")


# --- new_session_name --------------------------------------------------------------------


def test_new_session_name_is_prefixed_uuid7() -> None:
    name = new_session_name()
    prefix = "00-session-"
    assert name.startswith(prefix)
    parsed = uuid.UUID(name[len(prefix) :])
    assert str(parsed) == name[len(prefix) :]
    assert parsed.version == 7
    assert name[len(prefix) + 14] == "7"  # the version nibble, as printed


def test_new_session_name_is_a_valid_session_name() -> None:
    assert validate_session_name(new_session_name())


def test_new_session_names_are_unique() -> None:
    names = {new_session_name() for _ in range(1000)}
    assert len(names) == 1000


def test_new_session_names_sort_by_creation_time() -> None:
    names = []
    for _ in range(5):
        names.append(new_session_name())
        time.sleep(0.002)  # cross millisecond boundaries, uuid7's timestamp resolution
    names.extend(new_session_name() for _ in range(100))  # and within one millisecond
    assert names == sorted(names)


# --- date_prefix / is_date_prefix --------------------------------------------------------


def test_date_prefix_formats_utc_date() -> None:
    assert date_prefix(datetime(2024, 3, 9, 12, 0, tzinfo=UTC)) == "20240309"


def test_date_prefix_just_before_midnight_utc_plus_2_is_same_day() -> None:
    # 23:59 in UTC+2 is 21:59 UTC on the same day.
    moment = datetime(2024, 3, 1, 23, 59, tzinfo=timezone(timedelta(hours=2)))
    assert date_prefix(moment) == "20240301"


def test_date_prefix_just_after_midnight_utc_plus_2_is_previous_utc_day() -> None:
    # 00:30 on 2 March in UTC+2 is 22:30 UTC on 1 March.
    moment = datetime(2024, 3, 2, 0, 30, tzinfo=timezone(timedelta(hours=2)))
    assert date_prefix(moment) == "20240301"


def test_date_prefix_late_evening_utc_minus_5_is_next_utc_day() -> None:
    # 22:00 on 31 December in UTC-5 is 03:00 UTC on 1 January.
    moment = datetime(2023, 12, 31, 22, 0, tzinfo=timezone(timedelta(hours=-5)))
    assert date_prefix(moment) == "20240101"


def test_date_prefix_refuses_naive_datetime() -> None:
    with pytest.raises(ValueError):
        date_prefix(datetime(2024, 3, 1, 12, 0))


@pytest.mark.parametrize("name", ["20240102", "20240229", "19991231"])
def test_is_date_prefix_accepts_real_dates(name: str) -> None:
    assert is_date_prefix(name)


@pytest.mark.parametrize(
    "name",
    [
        "2024010",  # 7 digits
        "202401020",  # 9 digits
        "2024-01-02",
        "20241301",  # month 13
        "20230229",  # not a leap year
        "20240100",  # day 0
        "\uff12\uff10\uff12\uff14\uff10\uff11\uff10\uff12",  # full-width digits
        "20240102\n",
        "",
        STATE_FILE_NAME,
        COMPLETED_DIR_NAME,
        FAILED_DIR_NAME,
    ],
)
def test_is_date_prefix_refuses_other_names(name: str) -> None:
    assert not is_date_prefix(name)


# --- printable / blob_name ---------------------------------------------------------------


def test_printable_keeps_plain_name() -> None:
    assert printable("data.csv") == "data.csv"


def test_printable_keeps_valid_non_ascii_name() -> None:
    assert printable("café/résumé.txt") == "café/résumé.txt"


def test_printable_keeps_literal_percent_in_valid_name() -> None:
    assert printable("100%.csv") == "100%.csv"
    assert printable("x%41") == "x%41"


def test_printable_escapes_undecodable_byte() -> None:
    assert printable(UNDECODABLE) == "x%FF"


def test_printable_escapes_each_undecodable_byte_in_nested_path() -> None:
    rel = os.fsdecode(b"d\xfe/ok/\xe2\x82.bin")  # a bad byte, and a truncated euro sign
    assert printable(rel) == "d%FE/ok/%E2%82.bin"


def test_printable_result_is_valid_unicode() -> None:
    printable(os.fsdecode(b"\x80\xff\xc3")).encode("utf-8")  # must not raise


def test_blob_name_plain() -> None:
    assert blob_name(FileKey("20240102", "run-1", "data.csv")) == "20240102/run-1/data.csv"


def test_blob_name_nested() -> None:
    assert blob_name(FileKey("20240102", "run-1", "a/b/c")) == "20240102/run-1/a/b/c"


def test_blob_name_escapes_undecodable_byte() -> None:
    assert blob_name(FileKey("20240102", "run-1", UNDECODABLE)) == "20240102/run-1/x%FF"


def test_blob_name_keeps_literal_percent() -> None:
    assert blob_name(FileKey("20240102", "run-1", "50%/x%41")) == "20240102/run-1/50%/x%41"


def test_distinct_file_names_get_distinct_blob_names() -> None:
    literal = FileKey("20240102", "run-1", "x%FF")
    undecodable = FileKey("20240102", "run-1", UNDECODABLE)
    assert blob_name(literal) == "20240102/run-1/x%25FF"
    assert blob_name(undecodable) == "20240102/run-1/x%FF"


def test_printable_escapes_a_valid_name_that_looks_escaped() -> None:
    assert printable("caf%C3%A9.txt") == "caf%25C3%25A9.txt"
    assert printable("x%25FF") == "x%2525FF"


def test_printable_keeps_percent_sequences_that_cannot_be_escapes() -> None:
    assert printable("a%20b%7e%ff.txt") == "a%20b%7e%ff.txt"


@pytest.mark.parametrize(
    ("rel", "shown"),
    [
        ("back\\slash", "back%5Cslash"),  # Azure would store it as the file 'slash' of 'back/'
        ("x.", "x%2E"),  # Azure would drop the dot: the blob of the file 'x'
        ("dir./x.y", "dir%2E/x.y"),  # in a folder's name too; other dots stay
        ("...", "..%2E"),
        ("bell\x07.txt", "bell%07.txt"),
        ("del\x7f", "del%7F"),
        ("c1-\x85", "c1-%C2%85"),
        ("x%2E", "x%252E"),  # looks like an escape of ours: escaped itself
        ("x%5c", "x%5c"),  # lowercase: never one of ours
    ],
)
def test_printable_escapes_what_azure_would_change(rel: str, shown: str) -> None:
    assert printable(rel) == shown


def test_printable_is_one_to_one_over_every_short_name() -> None:
    # Every name of up to 4 bytes from the bytes that matter: '%', hex digits of either
    # range, an undecodable byte, the start of a 2-byte UTF-8 sequence, and what Azure would
    # change: a backslash, a control character, a '.' at the end of a path segment.
    alphabet = [
        b"%", b"2", b"5", b"8", b"C", b"E", b"F", b"x", b"\xff", b"\xc3", b"\xa9", b"\\",
        b"\x01", b".", b"/",
    ]
    names = [b""]
    for _ in range(4):
        names += [name + c for name in names if len(name) == len(names[-1]) for c in alphabet]
    seen: dict[str, bytes] = {}
    for raw in set(names) - {b""}:
        shown = printable(os.fsdecode(raw))
        shown.encode("utf-8")  # valid Unicode, always
        assert seen.setdefault(shown, raw) == raw, f"{raw!r} and {seen[shown]!r} both give {shown!r}"


def test_file_key_str_is_printable_blob_name() -> None:
    assert str(FileKey("20240102", "run-1", UNDECODABLE)) == "20240102/run-1/x%FF"


# --- Layout ------------------------------------------------------------------------------


def test_layout_state_file() -> None:
    assert LAYOUT.state_file == Path("/nfs/.processing/session.json")


def test_layout_completed_root() -> None:
    assert LAYOUT.completed_root == Path("/nfs/.processing/.completed")


def test_layout_failed_roots() -> None:
    assert LAYOUT.failed_files_root == Path("/nfs/.processing/.failed/files")
    assert LAYOUT.failed_reasons_root == Path("/nfs/.processing/.failed/reasons")


def test_layout_incoming_dir_and_path() -> None:
    assert LAYOUT.incoming_dir("run-1") == Path("/nfs/incoming/run-1")
    assert LAYOUT.incoming_path(KEY) == Path("/nfs/incoming/run-1/sub/dir/data.csv")


def test_layout_processing_dir_and_path() -> None:
    assert LAYOUT.processing_dir("20240102", "run-1") == Path("/nfs/.processing/20240102/run-1")
    assert LAYOUT.processing_path(KEY) == Path("/nfs/.processing/20240102/run-1/sub/dir/data.csv")


def test_layout_staging_dir_and_path() -> None:
    assert LAYOUT.staging_dir("20240102", "run-1") == Path("/staging/20240102/run-1")
    assert LAYOUT.staging_path(KEY) == Path("/staging/20240102/run-1/sub/dir/data.csv")


def test_layout_completed_path() -> None:
    assert LAYOUT.completed_path(KEY) == Path(
        "/nfs/.processing/.completed/20240102/run-1/sub/dir/data.csv"
    )


def test_layout_failed_path() -> None:
    assert LAYOUT.failed_path(KEY) == Path(
        "/nfs/.processing/.failed/files/20240102/run-1/sub/dir/data.csv"
    )


def test_layout_failed_reason_path_mirrors_failed_path_with_json_suffix() -> None:
    failed = LAYOUT.failed_path(KEY)
    assert LAYOUT.failed_reason_path(failed) == Path(
        "/nfs/.processing/.failed/reasons/20240102/run-1/sub/dir/data.csv.json"
    )


def test_layout_failed_reason_path_of_numbered_copy() -> None:
    failed = LAYOUT.failed_path(KEY)
    numbered = failed.with_name(failed.name + ".1")
    assert LAYOUT.failed_reason_path(numbered) == Path(
        "/nfs/.processing/.failed/reasons/20240102/run-1/sub/dir/data.csv.1.json"
    )


def test_layout_failed_reason_path_refuses_path_outside_failed_tree() -> None:
    with pytest.raises(ValueError):
        LAYOUT.failed_reason_path(LAYOUT.processing_path(KEY))


@pytest.mark.parametrize(
    "key",
    [
        FileKey("20240102", "run-1", "data.csv"),
        FileKey("20240102", "run-1", "session.json"),
        FileKey("20240102", ".completed", ".failed/files/x"),
        FileKey("20240102", "...", "session.json"),
    ],
)
def test_service_trees_never_collide_with_processing_paths(key: FileKey) -> None:
    own = [
        LAYOUT.state_file,
        LAYOUT.completed_root,
        LAYOUT.failed_files_root.parent,
    ]
    path = LAYOUT.processing_path(key)
    assert path.relative_to(LAYOUT.processing_root).parts[0] == key.date_prefix
    for reserved in own:
        assert path != reserved
        assert not path.is_relative_to(reserved)
        assert not reserved.is_relative_to(LAYOUT.processing_dir(key.date_prefix, key.session))


def test_service_tree_names_are_never_date_prefixes() -> None:
    for reserved in (LAYOUT.state_file, LAYOUT.completed_root, LAYOUT.failed_files_root.parent):
        top = reserved.relative_to(LAYOUT.processing_root).parts[0]
        assert not is_date_prefix(top)


def test_layout_trees_of_one_key_are_all_distinct() -> None:
    paths = {
        LAYOUT.incoming_path(KEY),
        LAYOUT.processing_path(KEY),
        LAYOUT.staging_path(KEY),
        LAYOUT.completed_path(KEY),
        LAYOUT.failed_path(KEY),
        LAYOUT.failed_reason_path(LAYOUT.failed_path(KEY)),
    }
    assert len(paths) == 6


def test_name_with_suffix_fits_and_keeps_names_apart() -> None:
    short = name_with_suffix("a.bin", ".json")
    long_a, long_b = (name_with_suffix(c * 250 + "é", ".json", room=4) for c in "ab")
    assert short == "a.bin.json"
    for name in (long_a, long_b):
        assert len(os.fsencode(name)) + 4 <= NAME_MAX and name.endswith(".json")
    assert long_a != long_b
    assert name_with_suffix("x" * 251 + "1", ".json") != name_with_suffix("x" * 251 + "2", ".json")


# --- blob_name_problem: Azure's limits, which Azurite does not enforce ----------------------


def test_a_blob_name_of_1024_characters_is_taken() -> None:
    assert blob_name_problem("20240102/s/" + "a" * (1024 - 11)) is None


def test_a_blob_name_of_1025_characters_is_refused_saying_so() -> None:
    assert blob_name_problem("20240102/s/" + "a" * (1025 - 11)) == (
        "its blob name would be 1025 characters long, and Azure allows at most 1024"
    )


def test_characters_beyond_the_bmp_count_twice() -> None:
    name = "20240102/s/" + "\N{FACE WITH TEARS OF JOY}" * 507  # 11 + 1014 code units
    assert blob_name_problem(name) is not None
    assert blob_name_problem(name[:-1]) is None


def test_a_blob_name_of_more_than_254_segments_is_refused() -> None:
    assert blob_name_problem("20240102/s/" + "d/" * 251 + "f") is None  # 254 segments
    assert blob_name_problem("20240102/s/" + "d/" * 252 + "f") == (
        "its blob name would have 255 path segments, and Azure allows at most 254"
    )
