"""The three contenders, each run once on a fresh Azurite and fresh folders.

A  the service end to end: ``python -m uploader`` as a real process;
B  the raw SDK baseline (benchmarks/baseline.py, a process of its own);
C  ``rclone move`` (Debian's rclone, azureblob backend, container SAS URL).

Each returns a dict of raw numbers for results.json.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.azurite import Azurite, container_sas_url, free_port
from benchmarks.common import (
    CONTAINER,
    MIN_FILE_AGE_S,
    POLL_INTERVAL_S,
    REPO_ROOT,
    SESSION,
    Defaults,
    GiB,
    MiB,
    Workload,
    cpu_seconds,
    median,
    percentile,
)
from benchmarks.probes import FolderEvents, FolderWatch, HealthProbe, LogTail, MemorySampler
from benchmarks.workloads import link_files
from tests.support.service import clean_environment, wait_for
from uploader import layout


@dataclass(frozen=True)
class RunContext:
    workload: Workload
    data_dir: Path  # the generated files
    names: list[str]
    azurite: Azurite
    run_dir: Path  # fresh, empty
    defaults: Defaults
    profile_to: Path | None = None  # A only: record the service with py-spy into this file
    # A only: how to start the service (a script that patches uploader/ first, to try a change).
    service_command: tuple[str, ...] = (sys.executable, "-m", "uploader")
    healthz_interval_s: float = 0.02  # 0: no /healthz probe (to see what probing costs)
    profile_args: tuple[str, ...] = ()  # more py-spy record options, e.g. --gil

    @property
    def date_prefix(self) -> str:
        return layout.date_prefix(datetime.now(UTC))

    def timeout_s(self) -> float:
        return 120.0 + self.workload.total_bytes / (2 * MiB)  # at worst 2 MiB/s


def create_container(azurite: Azurite) -> None:
    from azure.storage.blob import BlobServiceClient

    with BlobServiceClient.from_connection_string(azurite.connection_string()) as client:
        client.create_container(CONTAINER)


def verify_blobs(azurite: Azurite, prefix: str, workload: Workload, names: list[str]) -> dict[str, Any]:
    """Every file is a blob of the right size under ``prefix`` (not timed)."""
    from azure.storage.blob import BlobServiceClient

    with BlobServiceClient.from_connection_string(azurite.connection_string()) as client:
        container = client.get_container_client(CONTAINER)
        sizes = {b.name: b.size for b in container.list_blobs(name_starts_with=prefix)}
    expected = {prefix + name: workload.size for name in names}
    missing = sorted(set(expected) - set(sizes))
    wrong = sorted(n for n in expected if n in sizes and sizes[n] != workload.size)
    ok = not missing and not wrong
    return {"ok": ok, "blobs": len(sizes), "missing": missing[:5], "wrong_size": wrong[:5]}


def throughput(workload: Workload, seconds: float) -> dict[str, float]:
    return {
        "seconds": seconds,
        "files_per_s": workload.count / seconds,
        "mib_per_s": workload.total_bytes / MiB / seconds,
    }


def per_gib(cpu_s: float, workload: Workload) -> float:
    return cpu_s / (workload.total_bytes / GiB)


# ----- A: the service ------------------------------------------------------------------------


def _http(port: int, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        payload = None if body is None else json.dumps(body)
        headers = {} if body is None else {"Content-Type": "application/json"}
        conn.request(method, path, body=payload, headers=headers)
        answer = conn.getresponse()
        raw = answer.read()
        try:
            return answer.status, json.loads(raw)
        except ValueError:
            return answer.status, raw.decode(errors="replace")
    finally:
        conn.close()


def _ready(port: int, proc: subprocess.Popen[bytes], log_path: Path) -> bool:
    if proc.poll() is not None:
        raise RuntimeError(f"the service exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
    try:
        return _http(port, "GET", "/readyz")[0] == 200
    except OSError:
        return False


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL: a service left running would claim the next run's files."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _files_left(nfs: Path, keep: set[Path]) -> list[Path]:
    left = []
    for base, _, names in os.walk(nfs):
        for name in names:
            path = Path(base) / name
            if path not in keep:
                left.append(path)
    return left


def stable_times(events: FolderEvents, mtimes: dict[str, float], min_age_s: float) -> dict[str, float]:
    """When the service's watcher found each file stable, from the scans inotify saw.

    A scan is an open and a close of the incoming folder. A file is stable at the end of
    the first scan that (1) comes after a scan that saw it, i.e. one that opened after the
    file appeared, and (2) ends when the file's mtime is at least min_age_s old. The
    watcher reads the clock just after the listing; 2 ms of slack covers that gap.
    """
    scans: list[tuple[float, float]] = []
    closes = iter(sorted(events.closed))
    for opened in sorted(events.opened):
        for closed in closes:
            if closed >= opened:
                scans.append((opened, closed))
                break
    stable: dict[str, float] = {}
    for name, appeared in events.appeared.items():
        if name not in mtimes:
            continue
        seen = next((i for i, (opened, _) in enumerate(scans) if opened > appeared), None)
        if seen is None:
            continue
        threshold = mtimes[name] + min_age_s - 0.002
        found = next((closed for _, closed in scans[seen + 1 :] if closed >= threshold), None)
        if found is not None:
            stable[name] = found
    return stable


def _spread(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "max": max(values, default=None)}


def run_service(ctx: RunContext) -> dict[str, Any]:
    workload, names = ctx.workload, ctx.names
    nfs = ctx.run_dir / "nfs"
    incoming, processing = nfs / "incoming", nfs / ".processing"
    staging, drop = ctx.run_dir / "staging", ctx.run_dir / "drop"
    for folder in (incoming, processing, staging, drop):
        folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = clean_environment()
    env.update(
        {
            # Plumbing: where storage is and how to reach the API.
            "APP_AZURE_AUTH": "key",
            "APP_AZURE_CONNECTION_STRING": ctx.azurite.connection_string(),
            "APP_AZURE_CONTAINER": CONTAINER,
            "APP_HOST": "127.0.0.1",
            "APP_PORT": str(port),
            # What the benchmark states; every other setting keeps its default.
            "APP_NFS_INCOMING_DIR": str(incoming),
            "APP_NFS_PROCESSING_ROOT": str(processing),
            "APP_LOCAL_STAGING_ROOT": str(staging),
            "APP_POLL_INTERVAL_S": str(POLL_INTERVAL_S),
            "APP_MIN_FILE_AGE_S": str(MIN_FILE_AGE_S),
        }
    )
    log_path = ctx.run_dir / "service.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            list(ctx.service_command), env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT
        )
    spy: subprocess.Popen[bytes] | None = None
    threads: list[FolderWatch | HealthProbe | MemorySampler] = []
    try:
        wait_for(lambda: _ready(port, proc, log_path), timeout=60, what="the service to be ready")
        status, session = _http(port, "POST", "/v1/watch/start", {"session_name": SESSION})
        if status != 200:
            raise RuntimeError(f"cannot start the session: {status} {session}")
        date_prefix = session["date_prefix"]
        session_dir = incoming / SESSION
        wait_for(session_dir.is_dir, timeout=10, what="the session folder")
        link_files(ctx.data_dir, drop, names)
        os.sync()  # the links and the previous run's writes are on disk before the clock starts

        tail = LogTail(log_path)
        tail.poll()
        watch = FolderWatch(session_dir)
        probe = HealthProbe(port, ctx.healthz_interval_s or 0.02)
        memory = MemorySampler(proc.pid)
        for thread in (watch, probe, memory) if ctx.healthz_interval_s else (watch, memory):
            thread.start()
            threads.append(thread)
        if ctx.profile_to is not None:
            spy = subprocess.Popen(
                [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(proc.pid),
                 "--rate", "100", "--format", "raw", "--threads", "--output", str(ctx.profile_to),
                 *ctx.profile_args],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        time.sleep(0.5)  # the probes are running, and at least two scans saw an empty folder
        cpu_before, azurite_before = cpu_seconds(proc.pid), cpu_seconds(ctx.azurite.pid)

        # The drop: each file, complete in a scratch folder on the same filesystem, gets the
        # current time as its mtime (as if its writer had just closed it) and is renamed in.
        mtimes: dict[str, float] = {}
        dropped = time.time()
        for name in names:
            now_ns = time.time_ns()
            os.utime(drop / name, ns=(now_ns, now_ns))
            os.rename(drop / name, session_dir / name)
            mtimes[name] = now_ns / 1e9

        def all_uploaded() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"the service exited with {proc.returncode}")
            return tail.poll() >= len(names)

        wait_for(all_uploaded, timeout=ctx.timeout_s(), interval=0.02, what="every 'uploaded' log line")
        events = watch.stop()  # our own listing below must not count as a scan
        keep = {processing / "session.json", processing / ".uploader.lock"}
        wait_for(lambda: not _files_left(nfs, keep), timeout=60, interval=0.01, what="NFS to be clean")
        ended = time.time()
        cpu_s = cpu_seconds(proc.pid) - cpu_before
        azurite_cpu_s = cpu_seconds(ctx.azurite.pid) - azurite_before
        if probe in threads:
            probe.stop()
        peak_kib = memory.stop()
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
            spy = None
        _, status_after = _http(port, "GET", "/v1/status")
    finally:
        for thread in threads:
            with contextlib.suppress(Exception):
                thread.stop()  # a second stop is harmless
        if spy is not None:
            with contextlib.suppress(Exception):
                spy.kill()
                spy.wait()
        _stop_process(proc)

    prefix = f"{date_prefix}/{SESSION}/"
    stable = stable_times(events, mtimes, MIN_FILE_AGE_S)
    uploaded = {name: tail.uploaded[prefix + name] for name in names if prefix + name in tail.uploaded}
    claimed = {name: t for name, t in events.deleted.items() if name in mtimes}
    stable_to_uploaded = [uploaded[n] - stable[n] for n in names if n in stable and n in uploaded]
    claimed_to_uploaded = [uploaded[n] - claimed[n] for n in names if n in claimed and n in uploaded]
    stable_to_claimed = [claimed[n] - stable[n] for n in names if n in claimed and n in stable]
    drop_to_stable = [stable[n] - mtimes[n] for n in names if n in stable]
    return {
        **throughput(workload, ended - dropped),
        "cpu_s": cpu_s,
        "cpu_s_per_gib": per_gib(cpu_s, workload),
        "peak_rss_mib": peak_kib / 1024,
        "azurite_cpu_s": azurite_cpu_s,
        "healthz": {
            "samples": len(probe.latencies_s),
            "failures": len(probe.failures),
            "failure_examples": probe.failures[:3],
            **{k: (v * 1000 if v is not None else None) for k, v in _spread(probe.latencies_s).items()},
            "unit": "ms",
        },
        "latency": {
            "method": "stable = end of the watcher scan that found the file stable (inotify); "
            "uploaded = the service's 'uploaded' log line",
            "files_with_stable_time": len(stable),
            "files_with_uploaded_line": len(uploaded),
            "stable_to_uploaded_s": _spread(stable_to_uploaded),
            "stable_to_claimed_s": _spread(stable_to_claimed),
            "claimed_to_uploaded_s": _spread(claimed_to_uploaded),
            "drop_to_stable_s_median": median(drop_to_stable),
            "claims_before_stable": sum(1 for d in stable_to_claimed if d < 0),
            "scans_seen": len(events.opened),
            "watch_lost": events.lost_watch,
        },
        "status": {
            k: status_after.get(k)
            for k in ("files_processed", "files_failed", "files_retried", "files_quarantined", "bytes_uploaded")
        }
        if isinstance(status_after, dict)
        else status_after,
        "log_problems": tail.problems[:10],
        "verify": verify_blobs(ctx.azurite, prefix, workload, names),
        "profile": str(ctx.profile_to) if ctx.profile_to else None,
    }


# ----- B: the raw SDK ------------------------------------------------------------------------


def run_baseline(ctx: RunContext) -> dict[str, Any]:
    d = ctx.defaults
    prefix = f"{ctx.date_prefix}/{SESSION}/"
    env = clean_environment()
    env["BENCH_CONNECTION_STRING"] = ctx.azurite.connection_string()
    azurite_before = cpu_seconds(ctx.azurite.pid)
    os.sync()
    answer = subprocess.run(
        [
            sys.executable, "-m", "benchmarks.baseline",
            "--dir", str(ctx.data_dir),
            "--container", CONTAINER,
            "--prefix", prefix,
            "--workers", str(d.worker_concurrency),
            "--block-size", str(d.block_size),
            "--single-put-size", str(d.single_put_size),
            "--max-concurrency", str(d.max_concurrency),
        ],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=ctx.timeout_s(), check=False,
    )
    if answer.returncode != 0:
        raise RuntimeError(f"the baseline failed ({answer.returncode}):\n{answer.stderr[-3000:]}")
    report = json.loads(answer.stdout.strip().splitlines()[-1])
    return {
        **throughput(ctx.workload, report["ended"] - report["started"]),
        "cpu_s": report["cpu_s"],
        "cpu_s_per_gib": per_gib(report["cpu_s"], ctx.workload),
        "peak_rss_mib": report["peak_rss_kib"] / 1024,
        "azurite_cpu_s": cpu_seconds(ctx.azurite.pid) - azurite_before,
        "verify": verify_blobs(ctx.azurite, prefix, ctx.workload, ctx.names),
    }


# ----- C: rclone -----------------------------------------------------------------------------


def rclone_version() -> str:
    try:
        out = subprocess.run(["rclone", "version"], capture_output=True, text=True, check=True).stdout
        return out.splitlines()[0].strip()
    except (OSError, subprocess.CalledProcessError):
        return "not installed"


@functools.cache
def rclone_has_flag(flag: str) -> bool:
    try:
        out = subprocess.run(
            ["rclone", "help", "backend", "azureblob"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return False
    return flag in out


def rclone_command(ctx: RunContext, source: Path, prefix: str) -> list[str]:
    d = ctx.defaults
    command = [
        "rclone", "move", str(source), f"bench:{CONTAINER}/{prefix.rstrip('/')}",
        "--transfers", str(d.worker_concurrency),
        # A bare number would mean KiB to rclone: give the unit.
        "--azureblob-chunk-size", f"{d.block_size}B",
        "--stats", "0",
        "--log-level", "NOTICE",
    ]
    if rclone_has_flag("--azureblob-upload-concurrency"):
        command += ["--azureblob-upload-concurrency", str(d.max_concurrency)]
    return command


def run_rclone(ctx: RunContext) -> dict[str, Any]:
    if shutil.which("rclone") is None:
        raise RuntimeError("rclone is not installed (apt-get install -y rclone)")
    prefix = f"{ctx.date_prefix}/{SESSION}/"
    source = ctx.run_dir / "src"
    link_files(ctx.data_dir, source, ctx.names)
    config = ctx.run_dir / "rclone.conf"
    config.touch()
    env = clean_environment()
    env.update(
        {
            "RCLONE_CONFIG": str(config),
            "RCLONE_CONFIG_BENCH_TYPE": "azureblob",
            "RCLONE_CONFIG_BENCH_SAS_URL": container_sas_url(ctx.azurite, CONTAINER),
        }
    )
    command = rclone_command(ctx, source, prefix)
    os.sync()
    azurite_before = cpu_seconds(ctx.azurite.pid)
    with open(ctx.run_dir / "rclone.log", "wb") as log:
        started = time.time()
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            _, wait_status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        ended = time.time()
    proc.returncode = os.waitstatus_to_exitcode(wait_status)
    if proc.returncode != 0:
        raise RuntimeError(
            f"rclone failed ({proc.returncode}):\n{(ctx.run_dir / 'rclone.log').read_text()[-3000:]}"
        )
    left = [p for p in source.iterdir()]
    cpu_s = usage.ru_utime + usage.ru_stime
    return {
        **throughput(ctx.workload, ended - started),
        "cpu_s": cpu_s,
        "cpu_s_per_gib": per_gib(cpu_s, ctx.workload),
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "azurite_cpu_s": cpu_seconds(ctx.azurite.pid) - azurite_before,
        "source_left": len(left),
        "command": " ".join(c if "?" not in c else "<sas>" for c in command),
        "verify": verify_blobs(ctx.azurite, prefix, ctx.workload, ctx.names),
    }


# A runs twice per repetition: quiet (throughput, CPU, memory, latency) and with the
# /healthz probe (its latency): a probe answer costs the service milliseconds of CPU.
TOOLS = {"A": run_service, "Ah": run_service, "B": run_baseline, "C": run_rclone}
