"""results.json → RESULTS.md (tables) and results.png (chart).

The hand-written analysis between the ``analysis`` markers of an existing RESULTS.md is
kept when the file is regenerated.
"""
# ruff: noqa: RUF001
# (the multiplication signs and dashes in labels and tables are meant)

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import median

TOOLS = ("A", "B", "C")
TOOL_LABELS = {"A": "A uploader", "Ah": "A, /healthz probed", "B": "B raw SDK", "C": "C rclone"}
ANALYSIS_BEGIN = "<!-- analysis:begin (kept when make bench rewrites this file) -->"
ANALYSIS_END = "<!-- analysis:end -->"

# What the benchmark must show (the targets).
TARGET_A_OVER_B = 0.9  # workloads w1 and w2
TARGET_A_OVER_C = 1.0  # every workload
TARGET_RSS_MIB = 300  # workload w3
TARGET_HEALTHZ_P99_MS = 20  # every workload


def progress_line(record: dict[str, Any]) -> str:
    head = f"  {record['workload']} rep {record['rep']} {record['tool']} (load {record['load_average'][0]:.2f})"
    if "error" in record:
        return f"{head}: FAILED {record['error']}"
    line = (f"{head}: {record['seconds']:.2f} s, {_rate(record['files_per_s'])} files/s, "
            f"{record['mib_per_s']:.1f} MiB/s, CPU {record['cpu_s']:.1f} s, RSS {record['peak_rss_mib']:.0f} MiB")
    if record["tool"] in ("A", "Ah"):
        h, lat = record["healthz"], record["latency"]["stable_to_uploaded_s"]
        if h["p99"] is not None:
            line += f", healthz p99 {h['p99']:.1f} ms"
        if lat["p50"] is not None:
            line += f", stable->uploaded p50 {lat['p50']:.2f} s"
    if not record.get("verify", {}).get("ok", False):
        line += f", VERIFY FAILED {record.get('verify')}"
    return line


def _good(results: dict[str, Any], workload: str, tool: str) -> list[dict[str, Any]]:
    return [
        r for r in results["runs"]
        if r["workload"] == workload and r["tool"] == tool and "error" not in r and r.get("verify", {}).get("ok")
    ]


def _med(runs: list[dict[str, Any]], *path: str) -> float | None:
    values = []
    for run in runs:
        value: Any = run
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        values.append(value)
    return median(values)


def summarize(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    summary: dict[str, dict[str, Any]] = {}
    for workload in results["workloads"]:
        key = workload["key"]
        row: dict[str, Any] = {"label": workload["label"]}
        for tool in (*TOOLS, "Ah"):
            runs = _good(results, key, tool)
            row[tool] = {
                "runs": len(runs),
                "seconds": _med(runs, "seconds"),
                "files_per_s": _med(runs, "files_per_s"),
                "mib_per_s": _med(runs, "mib_per_s"),
                "cpu_s_per_gib": _med(runs, "cpu_s_per_gib"),
                "peak_rss_mib": _med(runs, "peak_rss_mib"),
                "azurite_cpu_s": _med(runs, "azurite_cpu_s"),
            }
        a_runs = _good(results, key, "A")
        # /healthz from the probed runs (Ah); older results probed during A itself.
        h_runs = [r for r in _good(results, key, "Ah") + a_runs if r["healthz"]["samples"]]
        row["A"].update(
            {
                "peak_rss_mib_max": max((r["peak_rss_mib"] for r in a_runs), default=None),
                "healthz_p50_ms": _med(h_runs, "healthz", "p50"),
                "healthz_p99_ms": _med(h_runs, "healthz", "p99"),
                "healthz_p99_ms_worst": max((r["healthz"]["p99"] for r in h_runs), default=None),
                "healthz_max_ms": max((r["healthz"]["max"] for r in h_runs), default=None),
                "healthz_samples": sum(r["healthz"]["samples"] for r in h_runs),
                "healthz_failures": sum(r["healthz"]["failures"] for r in h_runs),
                "latency_p50_s": _med(a_runs, "latency", "stable_to_uploaded_s", "p50"),
                "latency_p99_s": _med(a_runs, "latency", "stable_to_uploaded_s", "p99"),
                "claimed_to_uploaded_p50_s": _med(a_runs, "latency", "claimed_to_uploaded_s", "p50"),
                "claimed_to_uploaded_p99_s": _med(a_runs, "latency", "claimed_to_uploaded_s", "p99"),
                "drop_to_stable_s": _med(a_runs, "latency", "drop_to_stable_s_median"),
            }
        )
        a, b, c = (row[t]["mib_per_s"] for t in TOOLS)
        row["a_over_b"] = a / b if a and b else None
        row["a_over_c"] = a / c if a and c else None
        summary[key] = row
    return summary


def _f(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _rate(value: float | None) -> str:
    """Files per second with three significant digits or so (0.036 files/s is a real number)."""
    if value is None:
        return "–"
    if value >= 10:
        return f"{value:,.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("**met**" if ok else "**missed**")


def targets(summary: dict[str, dict[str, Any]]) -> list[tuple[str, str, bool | None]]:
    rows: list[tuple[str, str, bool | None]] = []
    for key, row in summary.items():
        if key in ("w1", "w2"):
            value = row["a_over_b"]
            rows.append((f"{key}: A/B ≥ {TARGET_A_OVER_B}", _f(value, 2), None if value is None else value >= TARGET_A_OVER_B))
    for key, row in summary.items():
        value = row["a_over_c"]
        rows.append((f"{key}: A/C ≥ {TARGET_A_OVER_C}", _f(value, 2), None if value is None else value >= TARGET_A_OVER_C))
    if "w3" in summary:
        value = summary["w3"]["A"]["peak_rss_mib_max"]
        rows.append((f"w3: peak RSS of the service < {TARGET_RSS_MIB} MiB (worst run)", _f(value, 0) + " MiB",
                     None if value is None else value < TARGET_RSS_MIB))
    for key, row in summary.items():
        value = row["A"]["healthz_p99_ms_worst"]
        rows.append((f"{key}: /healthz p99 < {TARGET_HEALTHZ_P99_MS} ms (worst run)", _f(value, 1) + " ms",
                     None if value is None else value < TARGET_HEALTHZ_P99_MS))
    return rows


def _existing_analysis(path: Path) -> str:
    if path.exists():
        match = re.search(re.escape(ANALYSIS_BEGIN) + r"(.*?)" + re.escape(ANALYSIS_END), path.read_text(), re.S)
        if match:
            return match.group(1).strip("\n")
    return "_No analysis written yet._"


def render_markdown(results: dict[str, Any], analysis: str) -> str:
    m, s = results["machine"], results["settings"]
    summary = summarize(results)
    d = s["defaults_copied_by_baselines"]
    reps = results["repetitions"]
    lines: list[str] = []
    add = lines.append
    add("# Benchmarks: uploader vs the raw SDK vs rclone")
    add("")
    add(f"Generated by `make bench` ({'`--quick`, ' if results.get('quick') else ''}{reps} repetition"
        f"{'s' if reps != 1 else ''} of every measurement, run in turn A, A probed, B, C; medians shown) "
        f"from `benchmarks/results.json`. Started {results['started_at']}, took "
        f"{_f((results.get('wall_s') or 0) / 60, 1)} min.")
    add("")
    add("| machine | |")
    add("| --- | --- |")
    add(f"| CPU | {m['cpu']}, {m['cores']} cores |")
    add(f"| RAM | {m['ram_gib']} GiB |")
    add(f"| kernel / OS | {m['kernel']} / {m['os']} |")
    add(f"| Python | {m['python']} (trio {m['trio']}) |")
    add(f"| Azurite | {m['azurite']} on Node.js {m['node']}, in memory, `--skipApiVersionCheck`, `--disableTelemetry`, loopback |")
    add(f"| rclone | {m['rclone']} |")
    add(f"| SDK | azure-storage-blob {m['azure_storage_blob']}, azure-core {m['azure_core']} |")
    dirty = ", ".join(m["git_dirty"]) or "none"
    add(f"| code | commit {m['git_commit']}; uploader/ files with uncommitted changes: {dirty} |")
    add(f"| network | {m['network']} |")
    add("")
    add("## Settings")
    add("")
    env = s["service_env"]
    add(f"- **A, the service**: `python -m uploader` as a real process with its defaults, except "
        f"the three folders, `APP_POLL_INTERVAL_S={env['APP_POLL_INTERVAL_S']}` and "
        f"`APP_MIN_FILE_AGE_S={env['APP_MIN_FILE_AGE_S']}` (plus the plumbing: `APP_AZURE_AUTH=key`, "
        f"Azurite's connection string, the container, `APP_HOST=127.0.0.1` and a free port). So "
        f"`APP_WORKER_CONCURRENCY={d['worker_concurrency']}`, `APP_AZURE_MAX_BLOCK_SIZE={d['block_size']}`, "
        f"`APP_AZURE_MAX_SINGLE_PUT_SIZE={d['single_put_size']}`, `APP_AZURE_MAX_CONCURRENCY={d['max_concurrency']}`, "
        f"`APP_GC_INTERVAL_S` 30 (completed files are deleted at once anyway).")
    add(f"- **B, raw SDK**: `benchmarks/baseline.py`, its own process: a thread pool of "
        f"{d['worker_concurrency']} calling `upload_blob(file, length=…, overwrite=True, "
        f"max_concurrency={d['max_concurrency']})` on a client with `max_block_size={d['block_size']}`, "
        f"`max_single_put_size={d['single_put_size']}` and a connection pool of "
        f"{d['worker_concurrency'] * d['max_concurrency']} (the service sizes its pool the same way), "
        f"straight from the generated files. No staging copy, no MD5, no verification: the ceiling "
        f"for anything built on this SDK and this endpoint.")
    add(f"- **C, rclone**: `{s.get('rclone_command') or 'rclone move …'}`, with the remote configured "
        f"only through `RCLONE_CONFIG_BENCH_TYPE=azureblob` and `RCLONE_CONFIG_BENCH_SAS_URL` (a container "
        f"SAS from `generate_container_sas`). rclone's defaults otherwise: it hashes every file (MD5, "
        f"stored on the blob and compared after the upload) and deletes each source file once its "
        f"upload is checked.")
    add("")
    add("## How it is measured")
    add("")
    add("- The files are random bytes, generated once into `benchmarks/work/data/` and hard-linked into each "
        "run's folders, so every run reads the same inodes, from the page cache (this measures the "
        "uploaders and the endpoint, not the disk).")
    add("- **Every run starts clean**: a fresh Azurite process (in memory; Azurite frees deleted blobs only "
        "in a GC pass every 10 minutes, so one process for 36 runs of up to 2 GiB would pile them up), an "
        "empty container, fresh folders, `sync` and a 1 s pause first. The 1-minute load average at the "
        "start of each run is in `results.json` (other work shares this machine).")
    add("- **A** is timed from the drop until the last blob is committed and NFS is clean. The drop: "
        "the files sit complete in a scratch folder on the same filesystem; each in turn gets the current "
        "time as its mtime (as if its writer had just closed it) and is renamed into "
        "`incoming/bench/`, so it is complete when it appears. The clock stops when the service has "
        "logged `uploaded <blob>` for every file (it logs that after the commit, the read-back check "
        "and the completion on NFS) and no file is left under the incoming and processing folders "
        "except `.processing/session.json` and `.processing/.uploader.lock` (the harness polls every 10-20 ms). A's time therefore "
        "includes the stability rule: a file is taken no sooner than `APP_MIN_FILE_AGE_S` after its "
        "mtime, at the next scan (the `drop → stable` column). The service process is fresh for "
        "each run; its CPU time (utime+stime of all its threads, from `/proc/<pid>/stat`) is counted "
        "from the drop to the end; its peak RSS is the larger of `VmHWM` and RSS sampled every 50 ms "
        "(children included; it has none).")
    add("- **B** is timed inside its process, from the first `upload_blob` to the last return (imports and "
        "client set-up excluded); CPU from `getrusage` over the same span; peak RSS is the process's "
        "`ru_maxrss` (interpreter and imports included). **C** is timed from spawning `rclone` to its exit "
        "(start-up included, a few ms); CPU and peak RSS from `wait4`'s rusage of the whole process.")
    hz_ms = (s.get("healthz_interval_s") or 0.02) * 1000
    add(f"- **/healthz** is measured in a second run of the service per repetition (*A probed*, run right "
        f"after A): a probing process of its own sends `GET /healthz` every {hz_ms:.0f} ms on a fresh TCP "
        "connection (as kubelet probes do); p50/p99 per run, the table shows the median over runs and the "
        "worst run. It runs at nice -5 and outside the harness's process, so that it measures the service's "
        "delay rather than its own wait for a core or for the harness's GIL; it still shares 2 cores with "
        "everything else. Why a separate run: an answer "
        "to `/healthz` costs the service about 1.8 ms of CPU on a fresh connection, nearly all in "
        "Hypercorn and trio (measured on an idle service, 500 probes), and far more GIL time under "
        "load, so 50 probes a second take a share of the service's event loop: on workload 1 the "
        "probed runs are 5-30 % slower. Kubelet probes every few seconds; the quiet run is what a "
        "deployment sees. The probed run's throughput is shown too.")
    add("- **stable → uploaded** (per file, p50 and p99 per run, median over runs): *uploaded* is the "
        "timestamp of the service's `uploaded <blob>` log line (millisecond resolution; written a few ms "
        "after the commit: after the read-back of the blob's properties and the completion on NFS: the "
        "rename to `.completed/` and the removal of that file and of the staging copy). *Stable* is when the service's watcher decided the file was "
        "stable, found from outside with inotify on the incoming folder: the watcher is the only one "
        "that lists that folder during a run, so each open/close of the folder is one of its scans, "
        "and a file is stable at the end of the first scan that follows a scan that already saw it and "
        "ends at least `APP_MIN_FILE_AGE_S` after the file's mtime (the watcher's rule). inotify events "
        "are stamped when the harness reads them (about 1 ms late); the watcher reads its clock just "
        "after the listing returns (2 ms of slack are allowed), so *stable* is good to a few ms, "
        "where appearance + min age + up to one poll would be off by up to a poll interval. The latency "
        "includes waiting in the queue behind earlier files: in a burst of 2,000 files its p99 is close "
        "to the whole run. `claimed → uploaded` (the unlink in incoming, seen by inotify, to the log "
        "line) is the time a worker spends on one file.")
    add("- **Ratios** are ratios of the median throughputs (MiB/s; files/s gives the same ratio).")
    add("")
    add("## Results")
    add("")
    add("Throughput (median of the runs; higher is better):")
    add("")
    add("| workload | A files/s | A MiB/s | B files/s | B MiB/s | C files/s | C MiB/s | A/B | A/C | A probed MiB/s (A/B) |")
    add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in summary.values():
        a, b, c, ah = row["A"], row["B"], row["C"], row["Ah"]
        probed = (f"{_f(ah['mib_per_s'])} ({_f(ah['mib_per_s'] / b['mib_per_s'], 2)})"
                  if ah["mib_per_s"] and b["mib_per_s"] else "–")
        add(f"| {row['label']} | {_rate(a['files_per_s'])} | {_f(a['mib_per_s'])} | {_rate(b['files_per_s'])} | "
            f"{_f(b['mib_per_s'])} | {_rate(c['files_per_s'])} | {_f(c['mib_per_s'])} | "
            f"{_f(row['a_over_b'], 2)} | {_f(row['a_over_c'], 2)} | {probed} |")
    add("")
    add("The service (A) while it works (median of the runs; the worst run in brackets):")
    add("")
    add("| workload | peak RSS MiB | CPU s/GiB | /healthz p50 ms | /healthz p99 ms | stable → uploaded p50 s | p99 s | claimed → uploaded p50 s | p99 s | drop → stable s |")
    add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in summary.values():
        a = row["A"]
        add(f"| {row['label']} | {_f(a['peak_rss_mib'], 0)} ({_f(a['peak_rss_mib_max'], 0)}) | {_f(a['cpu_s_per_gib'], 1)} | "
            f"{_f(a['healthz_p50_ms'], 1)} | {_f(a['healthz_p99_ms'], 1)} ({_f(a['healthz_p99_ms_worst'], 1)}) | "
            f"{_f(a['latency_p50_s'], 2)} | {_f(a['latency_p99_s'], 2)} | {_f(a['claimed_to_uploaded_p50_s'], 2)} | "
            f"{_f(a['claimed_to_uploaded_p99_s'], 2)} | {_f(a['drop_to_stable_s'], 2)} |")
    add("")
    add("What each costs the node (median of the runs; Azurite's own CPU shown for scale, it stands in for Azure):")
    add("")
    add("| workload | CPU s/GiB A | B | C | peak RSS MiB A | B | C | Azurite CPU s (A / B / C) |")
    add("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in summary.values():
        a, b, c = row["A"], row["B"], row["C"]
        add(f"| {row['label']} | {_f(a['cpu_s_per_gib'])} | {_f(b['cpu_s_per_gib'])} | {_f(c['cpu_s_per_gib'])} | "
            f"{_f(a['peak_rss_mib'], 0)} | {_f(b['peak_rss_mib'], 0)} | {_f(c['peak_rss_mib'], 0)} | "
            f"{_f(a['azurite_cpu_s'])} / {_f(b['azurite_cpu_s'])} / {_f(c['azurite_cpu_s'])} |")
    add("")
    add("![throughput, CPU and memory of A, B and C](results.png)")
    add("")
    add("### Targets")
    add("")
    add("| target | measured | |")
    add("| --- | ---: | --- |")
    for name, value, ok in targets(summary):
        add(f"| {name} | {value} | {_verdict(ok)} |")
    add("")
    scan = results.get("scan")
    if scan:
        add(f"### Scanning an incoming folder of {scan['files']:,} files")
        add("")
        add(f"In-process, warm caches, median of {scan['repeats']} runs after one warm-up:")
        add("")
        add("| what | median s | vs `os.scandir` alone |")
        add("| --- | ---: | ---: |")
        base = scan["scandir_names_s"]
        add(f"| `os.scandir` alone (names only) | {scan['scandir_names_s']:.3f} | 1.0 |")
        add(f"| `os.scandir` + `entry.stat(follow_symlinks=False)` (the floor for size and mtime) | {scan['scandir_lstat_s']:.3f} | {scan['scandir_lstat_s'] / base:.1f} |")
        add(f"| `uploader.watcher.scan_session_folder` (runs in an NFS lane thread) | {scan['scan_session_folder_s']:.3f} | {scan['scan_session_folder_s'] / base:.1f} |")
        add(f"| `StabilityTracker.observe`, first sight + one unchanged scan (runs on the event loop) | {scan['observe_two_scans_s']:.3f} | {scan['observe_two_scans_s'] / base:.1f} |")
        add("")
    add("### Every run")
    add("")
    add("| workload | rep | tool | start (UTC) | load avg 1/5/15 | s | files/s | MiB/s | CPU s | peak RSS MiB | /healthz p99 ms | note |")
    add("| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in results["runs"]:
        load = "/".join(f"{x:.2f}" for x in r["load_average"])
        if "error" in r:
            add(f"| {r['workload']} | {r['rep']} | {r['tool']} | {r['started_at'][11:19]} | {load} | | | | | | | failed: {r['error'][:80]} |")
            continue
        note = "" if r.get("verify", {}).get("ok") else "verify failed"
        if r.get("log_problems"):
            note += f" {len(r['log_problems'])} warnings in the log"
        p99 = r["healthz"]["p99"] if r["tool"] in ("A", "Ah") else None
        add(f"| {r['workload']} | {r['rep']} | {r['tool']} | {r['started_at'][11:19]} | {load} | {r['seconds']:.2f} | "
            f"{_rate(r['files_per_s'])} | {r['mib_per_s']:.1f} | {r['cpu_s']:.1f} | {r['peak_rss_mib']:.0f} | "
            f"{_f(p99, 1)} | {note.strip()} |")
    add("")
    profiles = results.get("profiles") or {}
    if profiles:
        add("### Where the service spends its CPU (py-spy, `make bench BENCH_ARGS=--profile`; extra runs, not counted above)")
        add("")
        for key, prof in profiles.items():
            summ = prof["summary"]
            add(f"**{key}** ({summ['samples']} samples at 100 Hz across all threads):")
            add("")
            add("| where | share of samples |")
            add("| --- | ---: |")
            for name, _, pct in summ["by_place"][:8]:
                add(f"| {name} | {pct} % |")
            add("")
            add("| uploader/ function (inclusive) | share |")
            add("| --- | ---: |")
            for name, _, pct in summ["inclusive_uploader"][:12]:
                add(f"| `{name}` | {pct} % |")
            add("")
    add("## Analysis")
    add("")
    add(ANALYSIS_BEGIN)
    add(analysis)
    add(ANALYSIS_END)
    add("")
    return "\n".join(lines)


def render_chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarize(results)
    keys = list(summary)
    labels = [summary[k]["label"].replace(" × ", "\n× ") for k in keys]
    colors = {"A": "#1f77b4", "Ah": "#aec7e8", "B": "#7f7f7f", "C": "#ff7f0e"}
    fig, axes = plt.subplots(1, 4, figsize=(17, 4.6))
    width = 0.26
    xs = range(len(keys))

    def bars(ax: Any, metric: str, title: str, ylabel: str, tools: tuple[str, ...] = TOOLS) -> None:
        for i, tool in enumerate(tools):
            values = [summary[k][tool][metric] or 0 for k in keys]
            spread = []
            for k in keys:
                runs = _good(results, k, tool)
                vals = [r[metric] for r in runs]
                med = summary[k][tool][metric] or 0
                spread.append((med - min(vals, default=med), max(vals, default=med) - med))
            offset = (i - (len(tools) - 1) / 2) * width
            ax.bar([x + offset for x in xs], values, width, label=TOOL_LABELS[tool], color=colors[tool],
                   yerr=list(zip(*spread, strict=True)) if spread else None, capsize=3)
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=9)

    has_probed = any(summary[k]["Ah"]["runs"] for k in keys)
    width = 0.2 if has_probed else 0.26
    bars(axes[0], "mib_per_s", "Throughput (median, min–max)", "MiB/s",
         ("A", "Ah", "B", "C") if has_probed else TOOLS)
    width = 0.26
    axes[0].legend(fontsize=8)
    # Relative to B: A/B and C/B, with the A/B target.
    for i, (tool, color) in enumerate((("A", colors["A"]), ("C", colors["C"]))):
        values = [(summary[k][tool]["mib_per_s"] or 0) / (summary[k]["B"]["mib_per_s"] or 1) for k in keys]
        offset = (i - 0.5) * width
        axes[1].bar([x + offset for x in xs], values, width, color=color, label=f"{TOOL_LABELS[tool]} / B")
    axes[1].axhline(TARGET_A_OVER_B, color="#d62728", linestyle="--", linewidth=1, label=f"target A/B ≥ {TARGET_A_OVER_B}")
    axes[1].axhline(1.0, color="black", linewidth=0.6)
    axes[1].set_xticks(list(xs), labels, fontsize=8)
    axes[1].set_title("Throughput relative to the raw SDK (B)", fontsize=10)
    axes[1].legend(fontsize=8)
    bars(axes[2], "cpu_s_per_gib", "CPU seconds per GiB moved", "CPU s / GiB")
    bars(axes[3], "peak_rss_mib", "Peak RSS", "MiB")
    axes[3].axhline(TARGET_RSS_MIB, color="#d62728", linestyle="--", linewidth=1, label=f"target (A, w3) < {TARGET_RSS_MIB} MiB")
    axes[3].legend(fontsize=8)
    m = results["machine"]
    fig.suptitle(f"uploader vs raw SDK vs rclone on Azurite — {m['cpu']}, {m['cores']} cores, "
                 f"{results['started_at'][:10]}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(results: dict[str, Any], out: Path) -> None:
    md = out / "RESULTS.md"
    analysis = _existing_analysis(md)
    md.write_text(render_markdown(results, analysis))
    render_chart(results, out / "results.png")


if __name__ == "__main__":
    import json

    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
    write_all(json.loads((folder / "results.json").read_text()), folder)
