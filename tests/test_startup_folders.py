"""The start-up check of the three folders (folders.check_folders): a folder that cannot be one,
or that this user cannot use, stops start-up with one line; a share failing for now does not."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.azurite import REPO_ROOT, free_port
from tests.support.service import clean_environment
from uploader import folders
from uploader.config import Settings, load_settings
from uploader.errors import StartupError
from uploader.folders import check_folders, make_folders, prepare_folder
from uploader.lanes import ThreadLane

SERVICE_UID = 10001  # the Containerfile's user


def settings_for(incoming: Path, processing: Path, staging: Path, **overrides: Any) -> Settings:
    return load_settings(
        azure_container="abc",
        azure_auth="key",
        azure_connection_string="UseDevelopmentStorage=true",
        nfs_incoming_dir=incoming,
        nfs_processing_root=processing,
        local_staging_root=staging,
        **overrides,
    )


# --- prepare_folder, as this (root) user ----------------------------------------------------


def test_a_missing_folder_is_created_with_its_parents(tmp_path: Path) -> None:
    prepare_folder("APP_LOCAL_STAGING_ROOT", tmp_path / "a" / "b" / "staging")
    assert (tmp_path / "a" / "b" / "staging").is_dir()


def test_a_file_is_not_a_folder(tmp_path: Path) -> None:
    (tmp_path / "passwd").write_text("root:x:0:0")
    with pytest.raises(StartupError) as info:
        prepare_folder("APP_NFS_INCOMING_DIR", tmp_path / "passwd")
    assert str(info.value) == f"APP_NFS_INCOMING_DIR ({tmp_path / 'passwd'}) is not a folder"


def test_a_path_below_a_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "passwd").write_text("root:x:0:0")
    with pytest.raises(StartupError) as info:
        prepare_folder("APP_NFS_INCOMING_DIR", tmp_path / "passwd" / "in")
    assert str(info.value) == (
        f"APP_NFS_INCOMING_DIR ({tmp_path / 'passwd' / 'in'}) cannot be a folder: "
        f"{tmp_path / 'passwd'} is not a folder"
    )


def test_a_symlink_to_nothing_is_refused(tmp_path: Path) -> None:
    (tmp_path / "in").symlink_to(tmp_path / "gone")
    with pytest.raises(StartupError, match=r"^APP_NFS_INCOMING_DIR \(.*\) cannot be created: .* is not a folder$"):
        prepare_folder("APP_NFS_INCOMING_DIR", tmp_path / "in")


def fail_stat_of(monkeypatch: pytest.MonkeyPatch, path: Path, code: int) -> None:
    real_stat = os.stat

    def stat(target: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if Path(target) == path:
            raise OSError(code, os.strerror(code), str(target))
        return real_stat(target, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)


@pytest.mark.parametrize("code", [errno.ESTALE, errno.EIO, errno.ETIMEDOUT])
def test_a_failing_share_is_not_a_startup_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    fail_stat_of(monkeypatch, tmp_path, code)
    with pytest.raises(OSError) as info:
        prepare_folder("APP_NFS_PROCESSING_ROOT", tmp_path)
    assert info.value.errno == code


def test_a_refusal_the_permission_bits_do_not_explain_is_not_a_startup_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An NFS server can answer EACCES for a while (expired tickets, say)."""
    fail_stat_of(monkeypatch, tmp_path, errno.EACCES)
    with pytest.raises(PermissionError):
        prepare_folder("APP_NFS_PROCESSING_ROOT", tmp_path)


# --- prepare_folder, as the service's user ----------------------------------------------------

needs_setpriv = pytest.mark.skipif(
    shutil.which("setpriv") is None or os.geteuid() != 0,
    reason="running as another user needs setpriv (util-linux) and root",
)
AS_SERVICE_USER = ["setpriv", f"--reuid={SERVICE_UID}", f"--regid={SERVICE_UID}", "--clear-groups"]


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A folder the service's user can enter (pytest's tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="uploader-startup-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


def prepare_as_service_user(variable: str, path: Path) -> subprocess.CompletedProcess[str]:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from uploader.errors import StartupError\n"
        "from uploader.folders import prepare_folder\n"
        "try:\n"
        "    prepare_folder(sys.argv[1], Path(sys.argv[2]))\n"
        "except StartupError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(3)\n"
    )
    return subprocess.run(
        [*AS_SERVICE_USER, sys.executable, "-c", code, variable, str(path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )


@needs_setpriv
@pytest.mark.parametrize(("owner", "mode"), [(0, 0o755), (SERVICE_UID, 0o555)], ids=["root-755", "own-555"])
def test_a_folder_this_user_cannot_write_is_refused(shared_tmp: Path, owner: int, mode: int) -> None:
    folder = shared_tmp / "staging"
    folder.mkdir()
    os.chown(folder, owner, owner)
    folder.chmod(mode)
    result = prepare_as_service_user("APP_LOCAL_STAGING_ROOT", folder)
    assert result.returncode == 3, result.stderr
    assert result.stdout.strip() == (
        f"APP_LOCAL_STAGING_ROOT ({folder}) is not writable by this user (uid {SERVICE_UID})"
    )


@needs_setpriv
def test_an_incoming_root_this_user_can_only_read_passes_with_a_warning(shared_tmp: Path) -> None:
    """Session folders made by an administrator, under a root the service may not write."""
    folder = shared_tmp / "incoming"
    folder.mkdir()
    folder.chmod(0o755)  # root's
    result = prepare_as_service_user("APP_NFS_INCOMING_DIR", folder)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "a session starts only where its folder exists already" in result.stderr


@needs_setpriv
def test_a_folder_this_user_cannot_create_is_refused(shared_tmp: Path) -> None:
    result = prepare_as_service_user("APP_LOCAL_STAGING_ROOT", shared_tmp / "staging")
    assert result.returncode == 3, result.stderr
    assert result.stdout.strip() == (
        f"APP_LOCAL_STAGING_ROOT ({shared_tmp / 'staging'}) cannot be created: "
        f"{shared_tmp} is not writable by this user (uid {SERVICE_UID})"
    )


@needs_setpriv
def test_a_folder_this_user_cannot_reach_is_refused(shared_tmp: Path) -> None:
    (shared_tmp / "private" / "staging").mkdir(parents=True)
    (shared_tmp / "private").chmod(0o700)
    result = prepare_as_service_user("APP_LOCAL_STAGING_ROOT", shared_tmp / "private" / "staging")
    assert result.returncode == 3, result.stderr
    assert result.stdout.strip() == (
        f"APP_LOCAL_STAGING_ROOT ({shared_tmp / 'private' / 'staging'}) cannot be reached: "
        f"{shared_tmp / 'private'} is not searchable by this user (uid {SERVICE_UID})"
    )


@needs_setpriv
def test_a_folder_this_user_owns_passes_and_a_missing_one_is_created(shared_tmp: Path) -> None:
    os.chown(shared_tmp, SERVICE_UID, SERVICE_UID)
    result = prepare_as_service_user("APP_LOCAL_STAGING_ROOT", shared_tmp / "staging")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (shared_tmp / "staging").stat().st_uid == SERVICE_UID


# --- check_folders: the start-up step -------------------------------------------------------


async def test_folders_that_meet_through_a_symlink_stop_start_up(tmp_path: Path) -> None:
    (tmp_path / "nfs").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "nfs")
    settings = settings_for(tmp_path / "nfs", tmp_path / "link" / ".processing", tmp_path / "staging")
    with pytest.raises(StartupError) as info:
        await check_folders(settings, ThreadLane("nfs", 4))
    assert "APP_NFS_INCOMING_DIR" in str(info.value) and "APP_NFS_PROCESSING_ROOT" in str(info.value)


async def test_a_file_where_a_folder_should_be_stops_start_up(tmp_path: Path) -> None:
    (tmp_path / "in").write_text("")
    settings = settings_for(tmp_path / "in", tmp_path / "proc", tmp_path / "staging")
    with pytest.raises(StartupError, match=r"^APP_NFS_INCOMING_DIR \(.*\) is not a folder$"):
        await check_folders(settings, ThreadLane("nfs", 4))


@pytest.fixture
def other_file_system(tmp_path: Path) -> Iterator[Path]:
    """A folder on another file system than ``tmp_path`` (tmpfs at /dev/shm)."""
    if not os.path.isdir("/dev/shm") or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system than the test's folders")
    folder = Path(tempfile.mkdtemp(prefix="uploader-test-", dir="/dev/shm"))
    yield folder
    shutil.rmtree(folder)


async def test_nfs_folders_on_two_file_systems_stop_start_up(tmp_path: Path, other_file_system: Path) -> None:
    settings = settings_for(other_file_system / "in", tmp_path / "proc", tmp_path / "staging")
    with pytest.raises(StartupError, match=r"^APP_NFS_INCOMING_DIR \(.*\) and APP_NFS_PROCESSING_ROOT \(.*\) are on different file systems"):
        await check_folders(settings, ThreadLane("nfs", 4))
    assert not (other_file_system / "in").exists() and not (tmp_path / "proc").exists()


async def test_a_symlink_loop_stops_start_up(tmp_path: Path) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    settings = settings_for(tmp_path / "loop" / "in", tmp_path / "proc", tmp_path / "staging")
    with pytest.raises(StartupError, match=r"^APP_NFS_INCOMING_DIR \(.*\) cannot be used: ELOOP"):
        await check_folders(settings, ThreadLane("nfs", 4))


async def test_a_share_that_does_not_answer_does_not_stop_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    released = threading.Event()

    def hangs_on_incoming(variable: str, path: Path) -> bool:
        if variable == "APP_NFS_INCOMING_DIR":
            released.wait(30)
        return real_inspect(variable, path)

    real_inspect = folders.inspect_folder
    monkeypatch.setattr(folders, "inspect_folder", hangs_on_incoming)
    settings = settings_for(tmp_path / "in", tmp_path / "proc", tmp_path / "staging", nfs_op_timeout_s=0.2)
    started = time.monotonic()
    lane = ThreadLane("nfs", 4)
    try:
        with caplog.at_level(logging.WARNING, logger="uploader.service"):
            missing = await check_folders(settings, lane)
            await make_folders(settings, lane, missing)
    finally:
        released.set()
    assert time.monotonic() - started < 5
    assert (tmp_path / "staging").is_dir()  # the others were still checked, and made
    assert any(
        "cannot check APP_NFS_INCOMING_DIR" in r.getMessage() and "no answer within 0.2 s" in r.getMessage()
        for r in caplog.records
    )


async def test_a_share_that_does_not_answer_is_noted_for_the_status_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only logged: /v1/status's last_error said nothing of it for some 30 s."""
    released = threading.Event()
    real_inspect = folders.inspect_folder

    def hangs_on_incoming(variable: str, path: Path) -> bool:
        if variable == "APP_NFS_INCOMING_DIR":
            released.wait(30)
        return real_inspect(variable, path)

    monkeypatch.setattr(folders, "inspect_folder", hangs_on_incoming)
    settings = settings_for(tmp_path / "in", tmp_path / "proc", tmp_path / "staging", nfs_op_timeout_s=0.2)
    noted: list[str] = []
    try:
        await check_folders(settings, ThreadLane("nfs", 4), note_error=noted.append)
    finally:
        released.set()
    assert noted == [f"cannot check APP_NFS_INCOMING_DIR ({tmp_path / 'in'}) now: no answer within 0.2 s; starting anyway"]


async def test_a_failing_share_does_not_stop_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def stale(variable: str, path: Path) -> None:
        raise OSError(errno.ESTALE, "Stale file handle", str(path))

    monkeypatch.setattr(folders, "inspect_folder", stale)
    settings = settings_for(tmp_path / "in", tmp_path / "proc", tmp_path / "staging")
    with caplog.at_level(logging.WARNING, logger="uploader.service"):
        await check_folders(settings, ThreadLane("nfs", 4))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert all("ESTALE" in w for w in warnings)


async def test_a_bad_folder_setting_makes_none_of_the_folders(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    settings = settings_for(tmp_path / "nfs" / "in", tmp_path / "nfs" / "proc", tmp_path / "file" / "staging")
    with pytest.raises(StartupError, match=r"^APP_LOCAL_STAGING_ROOT \(.*\) cannot be a folder"):
        await check_folders(settings, ThreadLane("nfs", 4))
    assert not (tmp_path / "nfs").exists()


async def test_missing_folders_are_made_only_by_make_folders(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "in", tmp_path / "proc", tmp_path / "staging")
    lane = ThreadLane("nfs", 4)
    missing = await check_folders(settings, lane)
    assert [variable for variable, _ in missing] == list(settings.folders)
    assert not any(path.exists() for path in settings.folders.values())
    await make_folders(settings, lane, missing)
    assert all(path.is_dir() for path in settings.folders.values())


# --- the real process ----------------------------------------------------------------------


def run_service(env: dict[str, str], prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    base = clean_environment() | {
        "APP_AZURE_AUTH": "key",
        "APP_AZURE_CONTAINER": "ok-container",
        "APP_AZURE_CONNECTION_STRING": "UseDevelopmentStorage=true",
        "APP_HOST": "127.0.0.1",
        "APP_PORT": str(free_port()),
    }
    return subprocess.run(
        [*(prefix or []), sys.executable, "-m", "uploader"], env=base | env,
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
    )


def test_a_file_given_as_the_incoming_folder_stops_the_service(tmp_path: Path) -> None:
    (tmp_path / "passwd").write_text("root:x:0:0")
    result = run_service({
        "APP_NFS_INCOMING_DIR": str(tmp_path / "passwd"),
        "APP_NFS_PROCESSING_ROOT": str(tmp_path / "proc"),
        "APP_LOCAL_STAGING_ROOT": str(tmp_path / "staging"),
    })
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"uploader: cannot start: APP_NFS_INCOMING_DIR ({tmp_path / 'passwd'}) is not a folder"
    )


@needs_setpriv
def test_a_staging_root_the_service_user_cannot_write_stops_the_service(shared_tmp: Path) -> None:
    for name in ("in", "proc", "staging"):
        (shared_tmp / name).mkdir()
    for name in ("in", "proc"):
        os.chown(shared_tmp / name, SERVICE_UID, SERVICE_UID)
    result = run_service(
        {
            "APP_NFS_INCOMING_DIR": str(shared_tmp / "in"),
            "APP_NFS_PROCESSING_ROOT": str(shared_tmp / "proc"),
            "APP_LOCAL_STAGING_ROOT": str(shared_tmp / "staging"),
        },
        prefix=AS_SERVICE_USER,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"uploader: cannot start: APP_LOCAL_STAGING_ROOT ({shared_tmp / 'staging'}) "
        f"is not writable by this user (uid {SERVICE_UID})"
    )


@needs_setpriv
@pytest.mark.parametrize("mode", [0o700, 0o733, 0o766], ids=["another user's", "no read", "no search"])
def test_a_session_folder_there_already_that_this_user_cannot_list_is_refused(
    shared_tmp: Path, mode: int
) -> None:
    """Made by an administrator or another user: a session on it would read nothing."""
    folder = shared_tmp / "incoming" / "s"
    folder.mkdir(parents=True)
    folder.chmod(mode)  # root's
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from uploader.fileops import check_listable\n"
        "try:\n"
        "    check_listable(Path(sys.argv[1]))\n"
        "except PermissionError:\n"
        "    sys.exit(3)\n"
    )
    result = subprocess.run(
        [*AS_SERVICE_USER, sys.executable, "-c", code, str(folder)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 3, result.stdout + result.stderr
