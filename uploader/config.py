"""Settings, read once from the environment (prefix ``APP_``) and validated at start-up."""

from __future__ import annotations

import base64
import binascii
import difflib
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "APP_"
MiB = 1024 * 1024

# Azure's rules for container names: 3-63 characters, lowercase letters, digits and
# single hyphens, starting and ending with a letter or digit.
_CONTAINER_NAME = re.compile(r"^(?=.{3,63}$)[a-z0-9]+(-[a-z0-9]+)*$")


class SettingsError(Exception):
    """A setting is missing or wrong; the message is one line that names the variable."""


# ".csv", ".tar.gz": dot-separated parts of characters a file name can end with, none of
# them a wildcard (matching is by plain suffix) or a space (surely a typo in the list).
_EXTENSION = re.compile(r"^(\.[^./\\\s*?\[\]\x00]+)+$")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", frozen=True, allow_inf_nan=False)

    # Azure Blob Storage
    azure_account_url: str | None = None
    azure_container: str
    azure_connection_string: SecretStr | None = None
    azure_account_name: str | None = None
    azure_account_key: SecretStr | None = None
    azure_auth: Literal["auto", "default", "key"] = "auto"
    azure_max_block_size: int = Field(default=8 * MiB, ge=64 * 1024, le=4000 * MiB)
    azure_max_single_put_size: int = Field(default=8 * MiB, ge=0, le=5000 * MiB)
    azure_max_concurrency: int = Field(default=4, ge=1, le=64)
    azure_connect_timeout_s: float = Field(default=10.0, gt=0, le=600)
    azure_read_timeout_s: float = Field(default=60.0, gt=0, le=3600)
    # Quick retries of one request inside the SDK; what survives them is retried per file.
    azure_retry_total: int = Field(default=3, ge=0, le=20)

    # Folders
    nfs_incoming_dir: Path = Path("/mnt/nfs/incoming")
    nfs_processing_root: Path = Path("/mnt/nfs/.processing")
    local_staging_root: Path = Path("/mnt/staging")
    # What staging may hold, where its disk cannot say (an emptyDir's sizeLimit); 0: the disk.
    local_staging_max_bytes: int = Field(default=0, ge=0)

    # Watcher
    # At least 10 ms: a scan of an idle folder a few thousand times a second is a busy loop.
    poll_interval_s: float = Field(default=2.0, ge=0.01, le=3600)
    # Comfortably longer than the NFS attribute cache (actimeo=5 in kubernetes/).
    min_file_age_s: float = Field(default=15.0, ge=0, le=86400)
    file_extensions: Annotated[tuple[str, ...], NoDecode] = ()
    max_queue_size: int = Field(default=1000, ge=1, le=1_000_000)

    # Workers and retries
    worker_concurrency: int = Field(default=4, ge=1, le=256)
    max_attempts: int = Field(default=5, ge=1, le=1000)
    retry_backoff_s: float = Field(default=1.0, gt=0, le=3600)
    retry_backoff_max_s: float = Field(default=60.0, gt=0, le=86400)
    nfs_threads: int = Field(default=16, ge=1, le=1024)
    nfs_call_stuck_s: float = Field(default=10.0, gt=0, le=86400)
    nfs_op_timeout_s: float = Field(default=10.0, gt=0, le=3600)

    # GC
    gc_interval_s: float = Field(default=30.0, gt=0, le=86400)

    # HTTP
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=1, le=65535)

    @field_validator("azure_container")
    @classmethod
    def _container_name(cls, value: str) -> str:
        if not _CONTAINER_NAME.match(value):
            raise ValueError(
                "must be 3-63 lowercase letters, digits or single hyphens, "
                "starting and ending with a letter or digit"
            )
        return value

    @field_validator("azure_account_url")
    @classmethod
    def _account_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        value = value.strip()  # a ConfigMap's or a secret file's newline is not part of it
        if problem := url_problem(value):
            raise ValueError(f"{problem}; give a URL such as https://<account>.blob.core.windows.net")
        return value.rstrip("/")

    @field_validator("azure_connection_string", mode="before")
    @classmethod
    def _connection_string(cls, value: Any) -> Any:
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if not isinstance(value, str):
            return value
        # Blank means not set, as for APP_AZURE_ACCOUNT_URL (an empty variable in a manifest
        # or an env file); surrounding whitespace (a secret file's newline) is not part of it.
        value = value.strip()
        if not value:
            return None
        check_connection_string(value)
        return value

    @field_validator("azure_account_key")
    @classmethod
    def _account_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not _is_key(value.get_secret_value()):
            raise ValueError("must be the storage account's base64 key")
        return value

    @field_validator("file_extensions", mode="before")
    @classmethod
    def _extensions(cls, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            if value.strip() and not value.replace(",", "").strip():
                raise ValueError("names no extension; leave it empty for all files, or give a list such as .csv,.tif")
            value = value.split(",")
        extensions = []
        for raw in value:
            ext = str(raw).strip().lower()
            if not ext:
                continue
            ext = ext if ext.startswith(".") else f".{ext}"
            if not _EXTENSION.match(ext):
                raise ValueError(
                    f"{str(raw).strip()!r} is not a file extension; give a comma-separated list "
                    "such as .csv,.tif (no wildcards, spaces or slashes)"
                )
            extensions.append(ext)
        return tuple(extensions)

    @field_validator("nfs_incoming_dir", "nfs_processing_root", "local_staging_root", mode="before")
    @classmethod
    def _no_surrounding_spaces(cls, value: Any) -> Any:
        if isinstance(value, str) and value != value.strip():
            raise ValueError("must not start or end with a space (a folder name rarely does; a typo often)")
        return value

    @field_validator("nfs_incoming_dir", "nfs_processing_root", "local_staging_root")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        if not value.is_absolute():
            raise ValueError("must be an absolute path")
        return Path(*value.parts)  # drops a trailing slash and duplicate separators

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        if not value:
            raise ValueError("must be an address to listen on, such as 0.0.0.0 or 127.0.0.1")
        if not is_host(value):
            raise ValueError("must be an IP address or a host name, such as 0.0.0.0 or 127.0.0.1")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        # As written, with '..' taken away; symlinks need the file system, which is not read
        # here (a hung share must not hang start-up before /healthz answers): the service
        # compares the resolved folders at start-up too (folders.check_folders).
        overlap = overlapping_folders(self.folders, lambda path: Path(os.path.normpath(path)))
        if overlap:
            raise ValueError(overlap)
        if self.azure_auth == "key" and not self.has_key_credentials:
            raise ValueError(
                "APP_AZURE_AUTH=key needs APP_AZURE_CONNECTION_STRING, or APP_AZURE_ACCOUNT_URL "
                "with APP_AZURE_ACCOUNT_NAME and APP_AZURE_ACCOUNT_KEY"
            )
        fallback = self.fallback_account_url
        if (
            self.azure_auth != "default"
            and self.azure_account_url is not None
            and fallback is not None
            and _same_endpoint(fallback) != _same_endpoint(self.azure_account_url)
        ):
            # auto: the fallback would upload, with only a warning, to another account than
            # the one the token was for. key: it talks to the connection string's endpoint,
            # and the account URL would be a setting the user believes in, ignored.
            consequence = (
                "APP_AZURE_AUTH=auto would fall back to another account; make them the same, or "
                "use APP_AZURE_AUTH=default"
                if self.azure_auth == "auto"
                else "APP_AZURE_AUTH=key uses the connection string's; make them the same, or "
                "leave APP_AZURE_ACCOUNT_URL unset"
            )
            raise ValueError(
                f"APP_AZURE_CONNECTION_STRING names the blob endpoint {fallback}, not "
                f"APP_AZURE_ACCOUNT_URL ({self.azure_account_url}): {consequence}"
            )
        if self.azure_auth != "key" and self.token_account_url is None:
            raise ValueError(
                f"APP_AZURE_AUTH={self.azure_auth} needs APP_AZURE_ACCOUNT_URL "
                "(or a connection string that names the blob endpoint)"
            )
        if 0 < self.local_staging_max_bytes < max(self.azure_max_single_put_size, 4 * self.azure_max_block_size):
            # Files sent in one request are copied whole before they are claimed for good.
            raise ValueError(
                "APP_LOCAL_STAGING_MAX_BYTES must be 0 (the disk's size) or at least "
                "APP_AZURE_MAX_SINGLE_PUT_SIZE and 4 x APP_AZURE_MAX_BLOCK_SIZE "
                f"({max(self.azure_max_single_put_size, 4 * self.azure_max_block_size)} bytes; "
                f"got {self.local_staging_max_bytes})"
            )
        if self.retry_backoff_max_s < self.retry_backoff_s:
            raise ValueError("APP_RETRY_BACKOFF_MAX_S must not be smaller than APP_RETRY_BACKOFF_S")
        return self

    @property
    def folders(self) -> dict[str, Path]:
        """The service's three folders, by the variable that sets each."""
        return {
            "APP_NFS_INCOMING_DIR": self.nfs_incoming_dir,
            "APP_NFS_PROCESSING_ROOT": self.nfs_processing_root,
            "APP_LOCAL_STAGING_ROOT": self.local_staging_root,
        }

    @property
    def token_account_url(self) -> str | None:
        """The account URL a token credential talks to: the setting, else the connection
        string's blob endpoint."""
        if self.azure_account_url is not None:
            return self.azure_account_url
        return self.fallback_account_url

    @property
    def fallback_account_url(self) -> str | None:
        """The blob endpoint of the connection string, which key auth talks to."""
        if self.azure_connection_string is None:
            return None
        return blob_endpoint(self.azure_connection_string.get_secret_value())

    @property
    def has_key_credentials(self) -> bool:
        if self.azure_connection_string is not None:
            return True
        return bool(
            self.azure_account_url and self.azure_account_name and self.azure_account_key
        )


def overlapping_folders(folders: Mapping[str, Path], resolve: Callable[[Path], Path]) -> str | None:
    """One sentence naming two folders that, once resolved, are the same folder or one inside
    the other (the service would watch or clean up its own files); None when all are apart."""
    resolved = {name: resolve(path) for name, path in folders.items()}
    names = list(folders)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            a, b = resolved[first], resolved[second]
            if a == b or a.is_relative_to(b) or b.is_relative_to(a):
                given_a, given_b = folders[first], folders[second]
                how = "" if (a, b) == (given_a, given_b) else f", which are {shown(a)} and {shown(b)},"
                return (
                    f"{first} ({shown(given_a)}) and {second} ({shown(given_b)}){how} must be "
                    "separate folders, neither inside the other"
                )
    return None


def shown(path: Path | str) -> str:
    """``path`` for a message: as it is, but for bytes that are no UTF-8, written ``\\xNN``.
    Python reads them as lone surrogates, which a pydantic error cannot carry (the settings
    failed with a UnicodeEncodeError traceback) and no terminal shows."""
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    return text


def _connection_fields(connection_string: str) -> dict[str, str] | None:
    """Name (upper case) to value, split as azure-storage-blob splits a connection string
    (``parse_connection_str``): None when some part is not ``name=value``."""
    parts = [part.split("=", 1) for part in connection_string.rstrip(";").split(";")]
    if any(len(part) != 2 for part in parts):
        return None
    return {name.upper(): value for name, value in parts}


def check_connection_string(connection_string: str) -> None:
    """Raise ValueError, in words that never repeat any of it, unless the storage SDK can build
    a client from ``connection_string``: a blob endpoint and a key or a SAS."""
    fields = _connection_fields(connection_string)
    if fields is None:
        raise ValueError("must be name=value pairs separated by ';' (AccountName, AccountKey, ...)")
    development = fields.get("USEDEVELOPMENTSTORAGE")
    if development == "true":
        return  # Azurite, with its well-known account and key
    if development is not None and development.lower() == "true":
        raise ValueError("UseDevelopmentStorage must be written 'true', in lower case")
    endpoint = fields.get("BLOBENDPOINT")
    if endpoint is not None:
        if problem := url_problem(endpoint if "://" in endpoint else _with_scheme(endpoint)):
            raise ValueError(f"BlobEndpoint {problem}")
    elif "BLOBSECONDARYENDPOINT" in fields:
        raise ValueError("names only a secondary endpoint: BlobEndpoint is missing")
    elif not fields.get("ACCOUNTNAME"):
        raise ValueError("needs AccountName (or BlobEndpoint)")
    elif (derived := blob_endpoint(connection_string)) and (problem := url_problem(derived)):
        # AccountName and EndpointSuffix make the URL: a placeholder left in either shows here.
        raise ValueError(f"AccountName and EndpointSuffix make an endpoint that {problem}")
    protocol = fields.get("DEFAULTENDPOINTSPROTOCOL")
    if protocol is not None and protocol.lower() not in ("http", "https"):
        raise ValueError("DefaultEndpointsProtocol must be http or https")
    if fields.get("SHAREDACCESSSIGNATURE"):
        return
    if not (fields.get("ACCOUNTNAME") and fields.get("ACCOUNTKEY")):
        raise ValueError("needs AccountName and AccountKey, or SharedAccessSignature")
    if not _is_key(fields["ACCOUNTKEY"]):
        raise ValueError("AccountKey is not a base64 key")


# A host name as DNS has them (underscores too, as container networks name hosts), or an
# IP address; whatever else the SDK would send to a resolver or fail on much later.
_HOST_NAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$")
_LOOKS_NUMERIC = re.compile(r"^[0-9.]+$")


def is_host(host: str) -> bool:
    """Whether ``host`` is an IP address or a well-formed host name."""
    try:
        ipaddress.ip_address(host.removeprefix("[").removesuffix("]"))
        return True
    except ValueError:
        return bool(_HOST_NAME.match(host)) and not _LOOKS_NUMERIC.match(host)


def url_problem(url: str) -> str | None:
    """Why the storage SDK could not send requests to ``url``, in a few words that start
    with a verb ("must be", "has"), or None when it is an http(s) URL with a usable host."""
    if any(c.isspace() for c in url):
        return "must not contain spaces"
    try:
        parts = urlsplit(url)
    except ValueError:  # a bracket left open, say
        return "must be an http(s) URL"
    if parts.scheme.lower() not in ("http", "https"):
        return "must be an http(s) URL"
    if "@" in parts.netloc:  # it would be printed wherever the URL is
        return "must not carry a user name or password (the credential settings are for that)"
    if "//" in parts.path:
        return "must be only scheme, host, port and path (a '//' in the path is a mistyped scheme)"
    if parts.query or parts.fragment:
        return "must be only scheme, host, port and path (no '?' or '#')"
    host, has_port, port = parts.netloc, False, ""
    if not host.endswith("]") and ":" in host:
        host, has_port, port = host.rpartition(":")[0], True, host.rpartition(":")[2]
    if has_port and not (port.isdigit() and 1 <= int(port) <= 65535):
        return "has a port that is not a number in 1-65535"
    if not host:
        return "must be an http(s) URL with a host"
    if host.startswith("[") or host.endswith("]"):  # an IPv6 address, and only that
        usable = host.startswith("[") and host.endswith("]") and _is_ipv6(host[1:-1])
    else:
        usable = is_host(host)
    if not usable:
        return f"has a host, {host!r}, that is neither an IP address nor a host name"
    return None


def _is_ipv6(text: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(text), ipaddress.IPv6Address)
    except ValueError:
        return False


def _same_endpoint(url: str) -> tuple[str, str, int | None, str]:
    """What makes two account URLs one endpoint: scheme, host (any case), port, path."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    return parts.scheme.lower(), (parts.hostname or "").lower(), port, parts.path.rstrip("/")


def _with_scheme(endpoint: str) -> str:
    # As the SDK's clients read an account URL: https unless it says http(s).
    return endpoint if endpoint.lower().startswith("http") else f"https://{endpoint}"


def _is_key(key: str) -> bool:
    """Whether ``key`` is base64 that decodes to a key. The SDK skips characters outside
    base64 and fails only on bad padding ('Incorrect padding' on every request), so it would
    sign with what is left of a mistyped key and be refused much later (403)."""
    try:
        return bool(base64.b64decode("".join(key.split()), validate=True))
    except binascii.Error:
        return False


def blob_endpoint(connection_string: str) -> str | None:
    """The blob endpoint a connection string names, as the storage SDK derives it, or None."""
    fields = _connection_fields(connection_string)
    if fields is None:
        return None
    if fields.get("USEDEVELOPMENTSTORAGE") == "true":
        return "http://127.0.0.1:10000/devstoreaccount1"
    if fields.get("BLOBENDPOINT"):
        return _with_scheme(fields["BLOBENDPOINT"]).rstrip("/")
    account = fields.get("ACCOUNTNAME")
    if not account:
        return None
    suffix = fields.get("ENDPOINTSUFFIX")
    # The SDK uses the protocol only together with the suffix; https otherwise.
    protocol = fields.get("DEFAULTENDPOINTSPROTOCOL", "https") if suffix else "https"
    return f"{protocol}://{account}.blob.{suffix or 'core.windows.net'}"


def load_settings(**overrides: Any) -> Settings:
    """Read the settings, turning pydantic's report into one line that names the variable."""
    if miswritten := _not_in_upper_case(os.environ):
        raise SettingsError("; ".join(miswritten))
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc)) from None
    except Exception as exc:  # a bad setting is one line, never a traceback
        # pydantic passes some failures through as they are, not as a ValidationError: a
        # validator's message it cannot carry (lone surrogates, from bytes that are no UTF-8).
        raise SettingsError(_unexpected_failure(exc, os.environ)) from None


def _unexpected_failure(exc: Exception, environ: Mapping[str, str]) -> str:
    """One line for a failure to read the settings that pydantic did not report as invalid
    values; it names the variables whose values hold bytes that are no UTF-8, the likely cause."""
    undecodable = sorted(
        name for name, value in environ.items()
        if name.upper().startswith(ENV_PREFIX) and shown(value) != value
    )
    problem = redact(f"cannot check the settings ({type(exc).__name__}: {shown(str(exc))})")
    if undecodable:
        return f"{problem}; the values of {', '.join(undecodable)} hold bytes that are no UTF-8"
    return problem


def _setting_names() -> set[str]:
    return {ENV_PREFIX + name.upper() for name in Settings.model_fields}


def _not_in_upper_case(environ: Mapping[str, str]) -> list[str]:
    """A sentence for each variable that names a setting in other than upper case: pydantic
    would read it as that setting (which one wins, when both are set, depends on the
    environment's order), where environment names are case-sensitive everywhere else."""
    names = _setting_names()
    return [
        f"{name}: setting names are upper case; write {name.upper()}"
        for name in environ
        if name != name.upper() and name.upper() in names
    ]


def unknown_settings(environ: Mapping[str, str]) -> list[str]:
    """A sentence for each ``APP_*`` variable that is no setting (a typo, most likely, that
    leaves the setting at its default), with the setting it may stand for."""
    names = _setting_names()
    notes = []
    for name in sorted(environ):
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in names:
            close = difflib.get_close_matches(name.upper(), names, n=1, cutoff=0.8)
            hint = f" (did you mean {close[0]}?)" if close else ""
            notes.append(f"{name} is not a setting of this service and is ignored{hint}")
    return notes


# Values of these are never repeated in an error message, wherever they turn up.
_SECRET_FIELDS = ("azure_connection_string", "azure_account_key")
_NOT_ECHOED = {*_SECRET_FIELDS, "azure_account_url"}
_SECRET_PATTERN = re.compile(r"(AccountKey|SharedAccessSignature|sig)=[^;&\s]+", re.IGNORECASE)
# The usual names of a credential in a URL's query (a collector's endpoint with ?token=...,
# echoed by the exporter's warnings); only after ? or &, so a file named key=1.csv shows.
_QUERY_SECRET = re.compile(
    r"([?&](?:token|access_token|api[-_]?key|key|password|secret|code)=)[^&\s]+", re.IGNORECASE
)
_URL_USER = re.compile(r"(?<=://)[^/@\s]+@")  # user:password@ in a URL


def redact(text: str) -> str:
    """``text`` without the secret settings' values, nor anything that looks like a key."""
    for field in _SECRET_FIELDS:
        for name in (ENV_PREFIX + field.upper(), ENV_PREFIX.lower() + field):
            secret = os.environ.get(name)
            if secret and len(secret) >= 4:
                text = text.replace(secret, "***")
    text = _URL_USER.sub("***@", text)
    text = _QUERY_SECRET.sub(lambda m: f"{m.group(1)}***", text)
    return _SECRET_PATTERN.sub(lambda m: f"{m.group(1)}=***", text)


def describe_validation_error(exc: ValidationError) -> str:
    return redact(_describe(exc))


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        message = str(error["msg"]).removeprefix("Value error, ")
        if error["loc"]:
            variable = ENV_PREFIX + str(error["loc"][0]).upper()
            if error["type"] == "missing":
                problems.append(f"{variable} is required but not set")
                continue
            shown = error.get("input")
            echo = error["loc"][0] not in _NOT_ECHOED and not isinstance(shown, dict)
            got = f" (got {shown!r})" if echo else ""
            problems.append(f"{variable}: {message}{got}")
        else:
            problems.append(message)
    return "; ".join(problems)
