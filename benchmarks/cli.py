"""``python -m benchmarks``: run everything, write results.json, RESULTS.md and the chart."""

from __future__ import annotations

import argparse
import fcntl
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.azurite import azurite_version, run_azurite
from benchmarks.common import (
    BENCH_DIR,
    FULL_WORKLOADS,
    MIN_FILE_AGE_S,
    POLL_INTERVAL_S,
    QUICK_WORKLOADS,
    REPO_ROOT,
    WORK_DIR,
    Defaults,
    load_average,
)
from benchmarks.profile import summarize_profile
from benchmarks.scan import run_scan_benchmark
from benchmarks.tools import TOOLS, RunContext, create_container, rclone_command, rclone_version
from benchmarks.workloads import ensure_data, file_names


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) / 1024 / 1024, 1)
    return 0.0


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def machine_info() -> dict[str, Any]:
    node = shutil.which("node")
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": _mem_total_gib(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "azurite": azurite_version(),
        "node": subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip()
        if node
        else "not installed",
        "rclone": rclone_version(),
        "azure_storage_blob": _version("azure-storage-blob"),
        "azure_core": _version("azure-core"),
        "trio": _version("trio"),
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        # Other engineers edit uploader/ while benchmarks run: say what was measured.
        "git_dirty": [line[3:] for line in _git("status", "--porcelain").splitlines() if line[3:].startswith("uploader/")],
        "network": "loopback only (scripts/in-loopback-netns)"
        if os.environ.get("UPLOADER_NETNS") == "loopback"
        else "not in a loopback-only namespace",
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true",
                        help="small workloads, 1 repetition, 10,000-file scan; writes to benchmarks/work/quick/")
    parser.add_argument("--reps", type=int, help="repetitions of each measurement (default 3; 1 with --quick)")
    parser.add_argument("--workloads", help="comma-separated subset: w1,w2,w3")
    parser.add_argument("--tools", default="A,Ah,B,C",
                        help="comma-separated subset of A (the service), Ah (the service with /healthz "
                             "probed), B (raw SDK), C (rclone); default all, in that order")
    parser.add_argument("--scan-files", type=int, help="files in the scan benchmark (default 100000)")
    parser.add_argument("--no-scan", action="store_true", help="skip the scan benchmark")
    parser.add_argument("--profile", action="store_true",
                        help="after the measured runs, one extra run of A per workload under py-spy (not counted)")
    parser.add_argument("--profile-args", default="",
                        help="more py-spy record options for --profile, e.g. --profile-args=--gil (only samples holding the GIL)")
    parser.add_argument("--service-script", type=Path,
                        help="run A as `python SCRIPT` instead of `python -m uploader` (a script that patches "
                             "uploader/ in memory and calls uploader.__main__.main, to measure a change first)")
    parser.add_argument("--healthz-interval", type=float, default=0.02,
                        help="seconds between /healthz probes during Ah (default 0.02)")
    parser.add_argument("--out", type=Path, help="where results.json, RESULTS.md and results.png go")
    parser.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md and the chart from results.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = args.out or (WORK_DIR / "quick" if args.quick else BENCH_DIR)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        report.write_all(json.loads((out / "results.json").read_text()), out)
        return
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    lock = open(WORK_DIR / ".lock", "w")  # noqa: SIM115 - held until the process ends
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit("another benchmark run is using benchmarks/work/ (and the CPUs): wait for it to end")
    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    workloads = QUICK_WORKLOADS if args.quick else FULL_WORKLOADS
    if args.workloads:
        wanted = set(args.workloads.split(","))
        if unknown := wanted - {w.key for w in workloads}:
            sys.exit(f"--workloads: no workload {', '.join(sorted(unknown))}; choose from w1, w2, w3")
        workloads = tuple(w for w in workloads if w.key in wanted)
    tools = args.tools.split(",")
    if unknown_tools := [t for t in tools if t not in TOOLS]:
        sys.exit(f"--tools: no tool {', '.join(unknown_tools)}; choose from {', '.join(TOOLS)}")
    scan_files = args.scan_files or (10_000 if args.quick else 100_000)
    defaults = Defaults.from_settings()
    service_command: tuple[str, ...] = (sys.executable, "-m", "uploader")
    if args.service_script:
        service_command = (sys.executable, str(args.service_script.resolve()))

    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "repetitions": reps,
        "machine": machine_info(),
        "settings": {
            "service_env": {"APP_POLL_INTERVAL_S": POLL_INTERVAL_S, "APP_MIN_FILE_AGE_S": MIN_FILE_AGE_S},
            "healthz_interval_s": args.healthz_interval,
            "defaults_copied_by_baselines": defaults.__dict__,
            "rclone_command": None,
        },
        "service_command": " ".join(service_command[1:]),
        "workloads": [w.__dict__ for w in workloads],
        "runs": [],
        "profiles": {},
        "scan": None,
    }
    results_path = out / "results.json"

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=1, default=str) + "\n")

    runs_dir = WORK_DIR / "runs"
    t_start = time.monotonic()
    for workload in workloads:
        print(f"== {workload.key}: {workload.label}: generating or reusing the files", flush=True)
        data_dir = ensure_data(workload)
        names = file_names(workload)
        plan = [(rep, tool) for rep in range(reps) for tool in tools]  # A B C A B C ...
        if args.profile and "A" in tools:
            plan.append((-1, "A"))
        for rep, tool in plan:
            run_dir = runs_dir / f"{workload.key}-{'profile' if rep < 0 else rep}-{tool}"
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            profile_to = None
            if rep < 0:
                profile_to = WORK_DIR / "profiles" / f"{workload.key}.txt"
                profile_to.parent.mkdir(parents=True, exist_ok=True)
                profile_to.unlink(missing_ok=True)
            os.sync()
            time.sleep(1.0)  # let the previous run's writeback and exits settle
            record: dict[str, Any] = {
                "workload": workload.key,
                "rep": rep,
                "tool": tool,
                "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "load_average": load_average(),
            }
            try:
                with run_azurite() as azurite:
                    create_container(azurite)
                    probe_every = args.healthz_interval if tool == "Ah" else 0.0
                    ctx = RunContext(workload, data_dir, names, azurite, run_dir, defaults, profile_to,
                                     service_command, probe_every, tuple(args.profile_args.split()))
                    if tool == "C" and results["settings"]["rclone_command"] is None:
                        results["settings"]["rclone_command"] = " ".join(
                            rclone_command(ctx, Path("<source>"), "<date>/bench/")
                        )
                    record.update(TOOLS[tool](ctx))
            except Exception as exc:  # one failed run must not lose the others
                record["error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
            if rep < 0:
                if profile_to is not None and profile_to.exists():
                    results["profiles"][workload.key] = {
                        "run": record,
                        "summary": summarize_profile(profile_to),
                    }
            else:
                results["runs"].append(record)
            for sub in ("nfs", "staging", "drop", "src"):  # keep the logs, drop the data
                shutil.rmtree(run_dir / sub, ignore_errors=True)
            save()
            print(report.progress_line(record), flush=True)

    if not args.no_scan:
        print(f"== scan: {scan_files:,} files", flush=True)
        results["scan"] = run_scan_benchmark(scan_files, 3 if args.quick else 5)
    results["finished_at"] = datetime.now(UTC).isoformat(timespec="seconds")
    results["wall_s"] = round(time.monotonic() - t_start, 1)
    save()
    report.write_all(results, out)
    print(f"wrote {results_path}, {out / 'RESULTS.md'} and {out / 'results.png'} "
          f"in {results['wall_s'] / 60:.1f} min", flush=True)
    failed = [r for r in results["runs"] if "error" in r or not r.get("verify", {}).get("ok")]
    if failed:
        sys.exit(f"{len(failed)} runs failed or left blobs missing or wrong: see {results_path}")
