"""Unit tests for uploader/config.py: defaults, parsing, and one-line errors naming the variable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from azure.storage.blob import BlobServiceClient
from pydantic import ValidationError

from uploader import config
from uploader.config import (
    MiB,
    SettingsError,
    blob_endpoint,
    load_settings,
    overlapping_folders,
    redact,
    unknown_settings,
)

ACCOUNT_URL = "https://acct.blob.core.windows.net"
ACCOUNT_KEY = "c2VjcmV0LWFjY291bnQta2V5LXZhbHVl/Zz+Qw=="  # base64, as real keys are
CONNECTION_STRING = (
    "DefaultEndpointsProtocol=https;AccountName=acct;"
    "AccountKey=Q29ubmVjdGlvbi1zdHJpbmctc2VjcmV0;EndpointSuffix=core.windows.net"
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No APP_* variable of the outer environment leaks in (pydantic-settings ignores case)."""
    for name in list(os.environ):
        if name.upper().startswith("APP_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("APP_AZURE_CONTAINER", "uploads")
    monkeypatch.setenv("APP_AZURE_ACCOUNT_URL", ACCOUNT_URL)
    return monkeypatch


def settings_error(**env: str | None) -> str:
    """Apply ``env`` (None deletes), load, and return the SettingsError message."""
    mp = pytest.MonkeyPatch()
    try:
        for name, value in env.items():
            if value is None:
                mp.delenv(name, raising=False)
            else:
                mp.setenv(name, value)
        with pytest.raises(SettingsError) as info:
            load_settings()
    finally:
        mp.undo()
    return str(info.value)


# --- defaults and parsing ----------------------------------------------------------------


def test_defaults_with_only_container_and_account_url() -> None:
    s = load_settings()
    assert s.azure_container == "uploads"
    assert s.azure_account_url == ACCOUNT_URL
    assert s.azure_auth == "auto"
    assert s.azure_connection_string is None
    assert s.azure_account_name is None
    assert s.azure_account_key is None
    assert s.nfs_incoming_dir == Path("/mnt/nfs/incoming")
    assert s.nfs_processing_root == Path("/mnt/nfs/.processing")
    assert s.local_staging_root == Path("/mnt/staging")
    assert s.poll_interval_s == 2.0
    assert s.min_file_age_s == 15.0
    assert s.file_extensions == ()
    assert s.max_queue_size == 1000
    assert s.worker_concurrency == 4
    assert s.azure_max_block_size == 8 * MiB
    assert s.azure_max_single_put_size == 8 * MiB
    assert s.azure_max_concurrency == 4
    assert s.gc_interval_s == 30.0
    assert s.host == "0.0.0.0"
    assert s.port == 8080


def test_default_folders_are_separate() -> None:
    s = load_settings()
    folders = [s.nfs_incoming_dir, s.nfs_processing_root, s.local_staging_root]
    for a in folders:
        for b in folders:
            if a is not b:
                assert not a.is_relative_to(b)


def test_numbers_are_read_from_environment(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("APP_PORT", "9090")
    clean_env.setenv("APP_POLL_INTERVAL_S", "0.5")
    clean_env.setenv("APP_WORKER_CONCURRENCY", "8")
    s = load_settings()
    assert (s.port, s.poll_interval_s, s.worker_concurrency) == (9090, 0.5, 8)


def test_file_extensions_are_normalised(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("APP_FILE_EXTENSIONS", ".csv, TIF,tar.gz")
    assert load_settings().file_extensions == (".csv", ".tif", ".tar.gz")


def test_a_wildcard_extension_is_refused_naming_it() -> None:
    assert settings_error(APP_FILE_EXTENSIONS="csv,*") == (
        "APP_FILE_EXTENSIONS: '*' is not a file extension; give a comma-separated list such as "
        ".csv,.tif (no wildcards, spaces or slashes) (got 'csv,*')"
    )


@pytest.mark.parametrize("raw", ["", " "])
def test_empty_file_extensions_mean_all_files(clean_env: pytest.MonkeyPatch, raw: str) -> None:
    clean_env.setenv("APP_FILE_EXTENSIONS", raw)
    assert load_settings().file_extensions == ()


def test_account_url_trailing_slash_is_dropped(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("APP_AZURE_ACCOUNT_URL", ACCOUNT_URL + "/")
    assert load_settings().azure_account_url == ACCOUNT_URL


def test_folder_paths_are_normalised(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("APP_NFS_INCOMING_DIR", "/data//in/")
    assert load_settings().nfs_incoming_dir == Path("/data/in")


def test_key_auth_with_connection_string_needs_no_account_url(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.delenv("APP_AZURE_ACCOUNT_URL")
    clean_env.setenv("APP_AZURE_AUTH", "key")
    clean_env.setenv("APP_AZURE_CONNECTION_STRING", CONNECTION_STRING)
    s = load_settings()
    assert s.has_key_credentials
    assert s.azure_connection_string is not None
    assert s.azure_connection_string.get_secret_value() == CONNECTION_STRING


def test_key_auth_with_account_name_and_key(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("APP_AZURE_AUTH", "key")
    clean_env.setenv("APP_AZURE_ACCOUNT_NAME", "acct")
    clean_env.setenv("APP_AZURE_ACCOUNT_KEY", ACCOUNT_KEY)
    assert load_settings().has_key_credentials


def test_settings_repr_hides_secrets(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("APP_AZURE_ACCOUNT_NAME", "acct")
    clean_env.setenv("APP_AZURE_ACCOUNT_KEY", ACCOUNT_KEY)
    clean_env.setenv("APP_AZURE_CONNECTION_STRING", CONNECTION_STRING)
    s = load_settings()
    assert ACCOUNT_KEY not in repr(s) and ACCOUNT_KEY not in str(s)
    assert CONNECTION_STRING not in repr(s) and "Q29ubmVjdGlvbi1zdHJpbmctc2VjcmV0" not in repr(s)


def test_settings_are_frozen() -> None:
    s = load_settings()
    with pytest.raises(ValidationError):
        s.port = 1  # type: ignore[misc]


def test_load_settings_accepts_overrides() -> None:
    assert load_settings(port=1234).port == 1234


# --- bad values: one line naming the variable ---------------------------------------------


BAD_VALUES = [
    ("APP_PORT", "0"),
    ("APP_PORT", "-1"),
    ("APP_PORT", "65536"),
    ("APP_PORT", "http"),
    ("APP_POLL_INTERVAL_S", "0"),
    ("APP_POLL_INTERVAL_S", "-2"),
    ("APP_POLL_INTERVAL_S", "soon"),
    ("APP_MIN_FILE_AGE_S", "-1"),
    ("APP_MAX_QUEUE_SIZE", "0"),
    ("APP_MAX_QUEUE_SIZE", "lots"),
    ("APP_WORKER_CONCURRENCY", "0"),
    ("APP_WORKER_CONCURRENCY", "2.5"),
    ("APP_AZURE_MAX_BLOCK_SIZE", "0"),
    ("APP_AZURE_MAX_BLOCK_SIZE", "1024"),
    ("APP_AZURE_MAX_SINGLE_PUT_SIZE", "-1"),
    ("APP_AZURE_MAX_CONCURRENCY", "0"),
    ("APP_GC_INTERVAL_S", "0"),
    ("APP_GC_INTERVAL_S", "never"),
    ("APP_AZURE_CONTAINER", "Bad_Name"),
    ("APP_AZURE_CONTAINER", "ab"),
    ("APP_AZURE_CONTAINER", "a--b"),
    ("APP_AZURE_CONTAINER", "-abc"),
    ("APP_AZURE_CONTAINER", "abc-"),
    ("APP_AZURE_CONTAINER", "a" * 64),
    ("APP_AZURE_AUTH", "magic"),
    ("APP_AZURE_AUTH", "KEY "),
    ("APP_NFS_INCOMING_DIR", "relative/in"),
    ("APP_NFS_PROCESSING_ROOT", "processing"),
    ("APP_LOCAL_STAGING_ROOT", "./staging"),
    ("APP_AZURE_ACCOUNT_URL", "acct.blob.core.windows.net"),
    ("APP_AZURE_ACCOUNT_URL", "ftp://acct.blob.core.windows.net"),
    ("APP_AZURE_ACCOUNT_URL", "https://"),
    ("APP_FILE_EXTENSIONS", "csv,a/b"),
    ("APP_FILE_EXTENSIONS", "."),
    ("APP_FILE_EXTENSIONS", "*"),
    ("APP_FILE_EXTENSIONS", "*.csv"),
    ("APP_FILE_EXTENSIONS", ".c sv"),
    ("APP_FILE_EXTENSIONS", "csv,tif."),
    ("APP_AZURE_ACCOUNT_KEY", "not-base64!"),
    ("APP_AZURE_ACCOUNT_KEY", "!!!!"),
    ("APP_AZURE_ACCOUNT_URL", "https://not a url"),
    ("APP_AZURE_ACCOUNT_URL", "http://127.0.0.1:99999/devstoreaccount1"),
    ("APP_AZURE_ACCOUNT_URL", "https://acct.blob.core.windows.net:/"),
    ("APP_AZURE_ACCOUNT_URL", "https://999.1.1.1"),
    ("APP_AZURE_ACCOUNT_URL", "https://user:hunter2@acct.blob.core.windows.net"),
    ("APP_AZURE_ACCOUNT_URL", "https://acct.blob.core.windows.net/?sv=x"),
    ("APP_HOST", ""),
    ("APP_HOST", " 127.0.0.1 "),
    ("APP_HOST", "999.1.1.1"),
    ("APP_HOST", "not a host"),
    ("APP_NFS_INCOMING_DIR", "/mnt/nfs/in "),
    ("APP_LOCAL_STAGING_ROOT", " /mnt/staging"),
    ("APP_FILE_EXTENSIONS", ","),
    ("APP_FILE_EXTENSIONS", " , "),
    ("APP_POLL_INTERVAL_S", "nan"),
    ("APP_GC_INTERVAL_S", "inf"),
    ("APP_POLL_INTERVAL_S", "0.000000001"),  # a busy loop
]


@pytest.mark.parametrize(("variable", "value"), BAD_VALUES)
def test_bad_value_raises_one_line_naming_variable(variable: str, value: str) -> None:
    message = settings_error(**{variable: value})
    assert "\n" not in message
    assert message.startswith(f"{variable}: ")


def test_bad_value_message_shows_what_was_given() -> None:
    message = settings_error(APP_AZURE_CONTAINER="Bad_Name")
    assert "'Bad_Name'" in message


def test_two_bad_values_are_both_named_on_one_line() -> None:
    message = settings_error(APP_PORT="0", APP_WORKER_CONCURRENCY="0")
    assert "\n" not in message
    assert "APP_PORT" in message
    assert "APP_WORKER_CONCURRENCY" in message


def test_missing_container_is_named() -> None:
    message = settings_error(APP_AZURE_CONTAINER=None)
    assert message == "APP_AZURE_CONTAINER is required but not set"


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("APP_NFS_INCOMING_DIR", "APP_NFS_PROCESSING_ROOT"),
        ("APP_NFS_INCOMING_DIR", "APP_LOCAL_STAGING_ROOT"),
        ("APP_NFS_PROCESSING_ROOT", "APP_LOCAL_STAGING_ROOT"),
    ],
)
@pytest.mark.parametrize("relation", ["same", "inside", "contains"])
def test_overlapping_folders_name_both_variables(first: str, second: str, relation: str) -> None:
    outer = "/srv/data"
    values = {
        "same": (outer, outer),
        "inside": (outer + "/a", outer),
        "contains": (outer, outer + "/a"),
    }[relation]
    # Keep the third folder out of the way.
    env = {
        "APP_NFS_INCOMING_DIR": "/x/in",
        "APP_NFS_PROCESSING_ROOT": "/x/proc",
        "APP_LOCAL_STAGING_ROOT": "/x/stage",
        first: values[0],
        second: values[1],
    }
    message = settings_error(**env)
    assert "\n" not in message
    assert first in message and second in message


def test_folders_that_overlap_through_dot_dot_are_refused() -> None:
    message = settings_error(
        APP_NFS_INCOMING_DIR="/x/nfs", APP_NFS_PROCESSING_ROOT="/x/y/../nfs/.processing"
    )
    assert "\n" not in message
    assert "APP_NFS_INCOMING_DIR" in message and "APP_NFS_PROCESSING_ROOT" in message


def test_folders_that_overlap_through_a_symlink_are_found_once_resolved(tmp_path: Path) -> None:
    (tmp_path / "nfs").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "nfs")
    folders = {"APP_NFS_INCOMING_DIR": tmp_path / "nfs", "APP_NFS_PROCESSING_ROOT": tmp_path / "link" / "p"}
    message = overlapping_folders(folders, lambda path: Path(os.path.realpath(path)))
    assert message is not None
    assert "APP_NFS_INCOMING_DIR" in message and "APP_NFS_PROCESSING_ROOT" in message
    assert f"which are {tmp_path / 'nfs'} and {tmp_path / 'nfs' / 'p'}, must be separate" in message


def test_overlapping_folders_with_bytes_that_are_no_utf8_are_one_line_naming_both() -> None:
    """Python reads those bytes as lone surrogates, which pydantic cannot put in its error:
    the settings failed with a UnicodeEncodeError traceback."""
    message = settings_error(
        APP_NFS_INCOMING_DIR=os.fsdecode(b"/x/in\xff"), APP_LOCAL_STAGING_ROOT=os.fsdecode(b"/x/in\xff/s")
    )
    assert message == (
        "APP_NFS_INCOMING_DIR (/x/in\\xff) and APP_LOCAL_STAGING_ROOT (/x/in\\xff/s) must be "
        "separate folders, neither inside the other"
    )


def test_a_failure_pydantic_does_not_report_as_a_bad_value_is_still_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Whatever escapes pydantic is a SettingsError, naming the variables whose values hold
    bytes that are no UTF-8 (the likely cause), never a traceback."""
    raw_path = os.fsdecode(b"/x/in\xff")

    def message_with_the_raw_path(folders: object, resolve: object) -> str:
        return f"overlap at {raw_path}"

    monkeypatch.setattr(config, "overlapping_folders", message_with_the_raw_path)
    message = settings_error(APP_NFS_INCOMING_DIR=raw_path)
    assert message.startswith("cannot check the settings (UnicodeEncodeError: ")
    assert message.endswith("; the values of APP_NFS_INCOMING_DIR hold bytes that are no UTF-8")
    assert "\n" not in message


def test_sibling_folders_with_common_prefix_do_not_overlap(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("APP_NFS_INCOMING_DIR", "/srv/in")
    clean_env.setenv("APP_NFS_PROCESSING_ROOT", "/srv/in2")
    assert load_settings().nfs_processing_root == Path("/srv/in2")


def test_key_auth_without_credentials_is_refused() -> None:
    message = settings_error(APP_AZURE_AUTH="key")
    assert "\n" not in message
    assert "APP_AZURE_AUTH" in message


def test_key_auth_with_key_but_no_account_name_is_refused() -> None:
    message = settings_error(APP_AZURE_AUTH="key", APP_AZURE_ACCOUNT_KEY=ACCOUNT_KEY)
    assert "APP_AZURE_AUTH" in message
    assert ACCOUNT_KEY not in message


@pytest.mark.parametrize("mode", ["auto", "default"])
def test_token_auth_takes_the_account_url_from_the_connection_string(mode: str) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("APP_AZURE_AUTH", mode)
        mp.delenv("APP_AZURE_ACCOUNT_URL", raising=False)
        mp.setenv("APP_AZURE_CONNECTION_STRING", CONNECTION_STRING)
        assert load_settings().token_account_url == "https://acct.blob.core.windows.net"


@pytest.mark.parametrize(
    ("connection_string", "url"),
    [
        ("BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1/;AccountName=x;AccountKey=eQ==",
         "http://127.0.0.1:10000/devstoreaccount1"),
        ("UseDevelopmentStorage=true", "http://127.0.0.1:10000/devstoreaccount1"),
        ("DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=eQ==;EndpointSuffix=core.chinacloudapi.cn",
         "https://acct.blob.core.chinacloudapi.cn"),
        ("SharedAccessSignature=sv=x", None),
    ],
)
def test_blob_endpoint_of_a_connection_string(connection_string: str, url: str | None) -> None:
    assert blob_endpoint(connection_string) == url


# --- connection strings: what azure-storage-blob can build a client from -------------------

KEY = "eQ=="
GOOD_CONNECTION_STRINGS = [
    CONNECTION_STRING,
    CONNECTION_STRING + ";",
    "UseDevelopmentStorage=true",
    f"AccountName=acct;AccountKey={KEY}",
    f"BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;AccountName=devstoreaccount1;AccountKey={KEY}",
    "BlobEndpoint=https://acct.blob.core.windows.net/;SharedAccessSignature=sv=2022-11-02&sig=abc",
    f"accountname=acct;accountkey={KEY};endpointsuffix=core.chinacloudapi.cn",
    f"DefaultEndpointsProtocol=http;AccountName=acct;AccountKey={KEY}",
    f"BlobEndpoint=acct.blob.core.windows.net;AccountName=acct;AccountKey={KEY}",  # https, as the SDK
]


@pytest.mark.parametrize("connection_string", GOOD_CONNECTION_STRINGS)
def test_a_connection_string_the_sdk_can_use_is_accepted_with_its_blob_endpoint(
    clean_env: pytest.MonkeyPatch, connection_string: str
) -> None:
    clean_env.delenv("APP_AZURE_ACCOUNT_URL")
    clean_env.setenv("APP_AZURE_AUTH", "key")
    clean_env.setenv("APP_AZURE_CONNECTION_STRING", connection_string)
    settings = load_settings()
    client = BlobServiceClient.from_connection_string(connection_string)
    url, _, sas = client.url.partition("?")
    assert client.credential is not None or "sig=" in sas
    assert settings.token_account_url == blob_endpoint(connection_string) == url.rstrip("/")


BAD_CONNECTION_STRINGS = {
    "garbage": "garbage",
    "part-without-equals": f"AccountName=acct;AccountKey={KEY};x",
    "empty-part": f"AccountName=acct;;AccountKey={KEY}",
    "no-credential": "AccountName=acct",
    "no-account": f"AccountKey={KEY}",
    "empty-account": f"AccountName=;AccountKey={KEY}",
    "key-not-base64": "AccountName=acct;AccountKey=abc",
    "endpoint-without-host": f"BlobEndpoint=https://;AccountName=acct;AccountKey={KEY}",
    "only-secondary": f"BlobSecondaryEndpoint=https://x-secondary.blob.core.windows.net;AccountName=acct;AccountKey={KEY}",
    "bad-protocol": f"DefaultEndpointsProtocol=ftp;AccountName=acct;AccountKey={KEY}",
    "dev-storage-capitalised": "UseDevelopmentStorage=True",
    "endpoint-not-http": f"BlobEndpoint=ftp://127.0.0.1:10000/x;AccountName=acct;AccountKey={KEY}",
    "endpoint-with-space": f"BlobEndpoint=not a url;AccountName=acct;AccountKey={KEY}",
    "endpoint-bad-port": f"BlobEndpoint=http://127.0.0.1:99999/x;AccountName=acct;AccountKey={KEY}",
    "key-not-only-base64": "AccountName=acct;AccountKey=!!!!",
    "endpoint-with-password": f"BlobEndpoint=http://user:hunter2@127.0.0.1:10000/x;AccountName=acct;AccountKey={KEY}",
    "endpoint-mistyped-scheme": f"BlobEndpoint=htp//127.0.0.1;AccountName=acct;AccountKey={KEY}",
    "endpoint-bracket-junk": f"BlobEndpoint=http://[::1]x:10000/;AccountName=acct;AccountKey={KEY}",
    "account-placeholder": f"DefaultEndpointsProtocol=https;AccountName=<account>;AccountKey={KEY}",
    "account-with-space": f"AccountName=a c c;AccountKey={KEY}",
    "suffix-with-space": f"AccountName=acct;AccountKey={KEY};EndpointSuffix=core .windows.net",
}


@pytest.mark.parametrize("connection_string", BAD_CONNECTION_STRINGS.values(), ids=BAD_CONNECTION_STRINGS.keys())
def test_a_malformed_connection_string_is_one_line_naming_the_variable(connection_string: str) -> None:
    message = settings_error(APP_AZURE_AUTH="key", APP_AZURE_CONNECTION_STRING=connection_string)
    assert "\n" not in message
    assert message.startswith("APP_AZURE_CONNECTION_STRING: ")
    assert ACCOUNT_KEY not in message


def test_a_password_in_a_url_is_never_shown() -> None:
    message = settings_error(
        APP_AZURE_AUTH="key",
        APP_AZURE_CONNECTION_STRING=f"BlobEndpoint=http://user:hunter2@127.0.0.1:10000/x;AccountName=acct;AccountKey={KEY}",
    )
    assert "hunter2" not in message
    assert "hunter2" not in redact("at http://user:hunter2@127.0.0.1:10000/x/c: refused")


@pytest.mark.parametrize("url", ["http://collector:4318/?token=s3cr3t/v1/logs",
                                 "http://collector:4318/v1/traces?api_key=s3cr3t&region=eu",
                                 "https://otel.example/v1/metrics?code=s3cr3t"])
def test_a_credential_in_a_url_s_query_is_never_shown(url: str) -> None:
    shown = redact(f"Failed to export to {url}: 401")
    assert "s3cr3t" not in shown and shown.endswith(" 401")


def test_a_file_name_that_looks_like_a_query_is_shown() -> None:
    assert redact("uploaded 20240102/s/run-code=5.csv") == "uploaded 20240102/s/run-code=5.csv"


def test_a_malformed_connection_string_is_not_echoed() -> None:
    secret = f"AccountName=acct;AccountKey={ACCOUNT_KEY}x;Oops"
    message = settings_error(APP_AZURE_CONNECTION_STRING=secret)
    assert message.startswith("APP_AZURE_CONNECTION_STRING: ")
    assert ACCOUNT_KEY not in message and "Oops" not in message and "acct" not in message


@pytest.mark.parametrize("blank", ["", "  "])
def test_a_blank_connection_string_means_not_set(clean_env: pytest.MonkeyPatch, blank: str) -> None:
    clean_env.setenv("APP_AZURE_CONNECTION_STRING", blank)
    settings = load_settings()
    assert settings.azure_connection_string is None
    assert not settings.has_key_credentials


def test_key_auth_with_only_a_blank_connection_string_asks_for_credentials() -> None:
    message = settings_error(APP_AZURE_AUTH="key", APP_AZURE_CONNECTION_STRING="")
    assert message.startswith("APP_AZURE_AUTH=key needs APP_AZURE_CONNECTION_STRING")


def test_whitespace_around_a_connection_string_is_dropped(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("APP_AZURE_CONNECTION_STRING", f" {CONNECTION_STRING}\n")
    settings = load_settings()
    assert settings.azure_connection_string is not None
    assert settings.azure_connection_string.get_secret_value() == CONNECTION_STRING


@pytest.mark.parametrize("mode", ["auto", "default"])
def test_token_auth_without_account_url_is_refused(mode: str) -> None:
    message = settings_error(APP_AZURE_AUTH=mode, APP_AZURE_ACCOUNT_URL=None)
    assert "\n" not in message
    assert "APP_AZURE_ACCOUNT_URL" in message


def test_auto_auth_refuses_a_fallback_to_another_account() -> None:
    other = "DefaultEndpointsProtocol=https;AccountName=other;AccountKey=eQ==;EndpointSuffix=core.windows.net"
    message = settings_error(APP_AZURE_AUTH="auto", APP_AZURE_CONNECTION_STRING=other)
    assert message == (
        "APP_AZURE_CONNECTION_STRING names the blob endpoint https://other.blob.core.windows.net, "
        f"not APP_AZURE_ACCOUNT_URL ({ACCOUNT_URL}): APP_AZURE_AUTH=auto would fall back to "
        "another account; make them the same, or use APP_AZURE_AUTH=default"
    )


def test_key_auth_refuses_an_account_url_its_connection_string_would_ignore() -> None:
    other = "DefaultEndpointsProtocol=https;AccountName=other;AccountKey=eQ==;EndpointSuffix=core.windows.net"
    message = settings_error(APP_AZURE_AUTH="key", APP_AZURE_CONNECTION_STRING=other)
    assert message.startswith(
        "APP_AZURE_CONNECTION_STRING names the blob endpoint https://other.blob.core.windows.net, "
        f"not APP_AZURE_ACCOUNT_URL ({ACCOUNT_URL}): APP_AZURE_AUTH=key uses the connection string's"
    )


def test_auto_auth_accepts_a_fallback_to_the_same_account_written_otherwise(
    clean_env: pytest.MonkeyPatch,
) -> None:
    clean_env.setenv("APP_AZURE_ACCOUNT_URL", "https://ACCT.blob.core.windows.net:443/")
    clean_env.setenv("APP_AZURE_CONNECTION_STRING", CONNECTION_STRING)
    assert load_settings().fallback_account_url == ACCOUNT_URL


def test_default_auth_ignores_the_connection_string_s_account(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("APP_AZURE_AUTH", "default")
    clean_env.setenv("APP_AZURE_CONNECTION_STRING", "BlobEndpoint=https://other.example;SharedAccessSignature=sv=x&sig=y")
    assert load_settings().token_account_url == ACCOUNT_URL


def test_whitespace_around_the_account_url_is_dropped(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("APP_AZURE_ACCOUNT_URL", f" {ACCOUNT_URL}\n")
    assert load_settings().azure_account_url == ACCOUNT_URL


@pytest.mark.parametrize("name", ["app_port", "App_Port"])
def test_a_setting_not_in_upper_case_is_refused(clean_env: pytest.MonkeyPatch, name: str) -> None:
    clean_env.setenv("APP_PORT", "9000")
    message = settings_error(**{name: "abc"})
    assert message == f"{name}: setting names are upper case; write APP_PORT"


def test_unknown_app_variables_are_named_with_the_likely_setting() -> None:
    notes = unknown_settings({
        "APP_WORKER_CONCURENCY": "8", "APP_PORT": "1", "APP_XYZZY": "1", "PATH": "/bin",
        "app_poll_intervall_s": "1",
    })
    assert notes == [
        "APP_WORKER_CONCURENCY is not a setting of this service and is ignored "
        "(did you mean APP_WORKER_CONCURRENCY?)",
        "APP_XYZZY is not a setting of this service and is ignored",
        "app_poll_intervall_s is not a setting of this service and is ignored "
        "(did you mean APP_POLL_INTERVAL_S?)",
    ]


def test_backoff_cap_below_base_is_refused() -> None:
    message = settings_error(APP_RETRY_BACKOFF_S="10", APP_RETRY_BACKOFF_MAX_S="5")
    assert "APP_RETRY_BACKOFF_MAX_S" in message


def test_a_staging_budget_too_small_for_one_request_s_file_is_refused() -> None:
    message = settings_error(APP_LOCAL_STAGING_MAX_BYTES=str(MiB))
    assert message.startswith("APP_LOCAL_STAGING_MAX_BYTES must be 0")


# --- secrets never appear in error messages ----------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"APP_PORT": "0"},
        {"APP_AZURE_CONTAINER": "Bad_Name"},
        {"APP_AZURE_CONTAINER": None},
        {"APP_NFS_INCOMING_DIR": "/srv", "APP_NFS_PROCESSING_ROOT": "/srv/p"},
        {"APP_AZURE_AUTH": "magic"},
        {"APP_MAX_QUEUE_SIZE": "-1"},
    ],
    ids=["port", "container", "no-container", "folders", "auth", "queue"],
)
def test_secrets_are_not_in_message_of_unrelated_error(bad: dict[str, str | None]) -> None:
    message = settings_error(
        APP_AZURE_ACCOUNT_NAME="acct",
        APP_AZURE_ACCOUNT_KEY=ACCOUNT_KEY,
        APP_AZURE_CONNECTION_STRING=CONNECTION_STRING,
        **bad,
    )
    assert ACCOUNT_KEY not in message
    assert CONNECTION_STRING not in message
    assert "Q29ubmVjdGlvbi1zdHJpbmctc2VjcmV0" not in message


def test_connection_string_in_wrong_variable_is_not_echoed() -> None:
    message = settings_error(
        APP_AZURE_CONNECTION_STRING=CONNECTION_STRING,
        APP_AZURE_ACCOUNT_URL=CONNECTION_STRING,
    )
    assert message.startswith("APP_AZURE_ACCOUNT_URL: ")
    assert "Q29ubmVjdGlvbi1zdHJpbmctc2VjcmV0" not in message


def test_account_key_in_wrong_variable_is_not_echoed() -> None:
    message = settings_error(
        APP_AZURE_ACCOUNT_KEY=ACCOUNT_KEY,
        APP_AZURE_CONTAINER=ACCOUNT_KEY,
    )
    assert message.startswith("APP_AZURE_CONTAINER: ")
    assert ACCOUNT_KEY not in message
