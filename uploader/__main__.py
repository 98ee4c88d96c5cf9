"""``python -m uploader`` / ``uploader``: read the settings, run the service until SIGTERM, SIGINT
or SIGHUP."""

from __future__ import annotations

import signal

# From the first instant: a signal that arrives while the modules below load (most of a
# second), or during shutdown, is only noted here. The default action would end the process
# with no word (exit 143, or a KeyboardInterrupt traceback), and a second SIGTERM while
# shutting down would cut the clean-up short. A noted signal stops the service as soon as it
# runs; the signal receiver takes over while it runs and hands back to this on its way out.
SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
noted_signals: list[int] = []
for _signum in SHUTDOWN_SIGNALS:
    signal.signal(_signum, lambda signum, frame: noted_signals.append(signum))

import ctypes
import logging
import os
import sys
from typing import TYPE_CHECKING

import trio

from uploader.config import Settings, SettingsError, load_settings, unknown_settings
from uploader.errors import Fatal
from uploader.memory_budget import memory_limit, over_limit
from uploader.otel_settings import otel_setting_problems, tidy_otel_variables

if TYPE_CHECKING:
    from uploader.service import Service

log = logging.getLogger("uploader")


async def _cancel_on_signal(scope: trio.CancelScope) -> None:
    # SIGHUP too: its default would end the process at once, with no word and no clean-up.
    with trio.open_signal_receiver(*SHUTDOWN_SIGNALS) as signals:
        # A signal noted before the receiver was there counts first.
        signum = noted_signals[0] if noted_signals else await anext(aiter(signals))
        log.info("received %s; shutting down", signal.Signals(signum).name)
        scope.cancel()


async def serve(service: Service) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_cancel_on_signal, nursery.cancel_scope)
        await nursery.start(service.run)


def _fatal_errors(group: BaseException) -> list[Fatal]:
    if isinstance(group, Fatal):
        return [group]
    if isinstance(group, BaseExceptionGroup):
        return [e for sub in group.exceptions for e in _fatal_errors(sub)]
    return []


def read_settings() -> Settings:
    """The APP_* settings, after checking the OTEL_* ones too: every bad one on one line."""
    tidy_otel_variables(os.environ)
    problems = otel_setting_problems(os.environ)
    try:
        settings = load_settings()
    except SettingsError as exc:
        problems.insert(0, str(exc))
    else:
        if (too_much := over_limit(settings, memory_limit())) is not None:
            problems.insert(0, too_much)
    if problems:
        raise SettingsError("; ".join(problems))
    return settings


M_ARENA_MAX = -8  # glibc's mallopt() parameter


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas, unless MALLOC_ARENA_MAX (or GLIBC_TUNABLES) sets them. glibc gives threads that
    allocate at once arenas of their own, up to 8 per CPU of the node (not of the pod's CPU
    limit), and each keeps freed buffers (8 MiB blocks here): in a soak, 15 arenas held
    ~115 MiB more than 2 did, at the same throughput (benchmarks/RESULTS.md). Before any
    thread starts; a C library without mallopt (musl) is left as it is."""
    if "MALLOC_ARENA_MAX" in os.environ or "malloc.arena_max" in os.environ.get("GLIBC_TUNABLES", ""):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_ARENA_MAX, arenas)


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()


def main() -> None:
    try:
        settings = read_settings()
    except SettingsError as exc:
        print(f"uploader: bad setting: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    limit_malloc_arenas()
    # Imported only now: OpenTelemetry reads some OTEL_* variables when it is imported, and a
    # bad value must be reported like any other setting, not as a traceback.
    try:
        from uploader.service import Service
        from uploader.telemetry import setup_logging, setup_telemetry

        setup_logging()
        telemetry = setup_telemetry()
    except ValueError as exc:  # a value the checks above let through and the SDK refuses
        print(f"uploader: bad setting: OpenTelemetry: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)
    for note in unknown_settings(os.environ):
        log.warning(note)
    service = Service(settings, telemetry)
    code = 0
    try:
        trio.run(serve, service)
        log.info("stopped")
    except BaseException as exc:
        failures = _fatal_errors(exc)
        if failures:
            log.critical("%s: %s", failures[0].doing, failures[0])
            _flush_logs()  # the JSON line first, then the plain one
            print(f"uploader: {failures[0].doing}: {failures[0]}", file=sys.stderr, flush=True)
            code = 1
        elif not isinstance(exc, KeyboardInterrupt):
            log.critical("stopped by an unexpected error", exc_info=exc)
            code = 70  # EX_SOFTWARE
    telemetry.shutdown()
    logging.shutdown()
    # Threads abandoned on a hung NFS call must not hold up the exit.
    os._exit(code)


if __name__ == "__main__":
    main()
