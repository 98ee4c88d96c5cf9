"""The generated files: made once (random bytes, so nothing compresses), then hard-linked
into each run's folders, so every run of every tool reads the very same inodes."""

from __future__ import annotations

import json
import os
from pathlib import Path

from benchmarks.common import WORK_DIR, MiB, Workload

DATA_DIR = WORK_DIR / "data"
WRITE_CHUNK = 8 * MiB


def file_names(workload: Workload) -> list[str]:
    return [f"{workload.key}-{i:05d}.bin" for i in range(workload.count)]


def ensure_data(workload: Workload) -> Path:
    """The folder holding the workload's files; generated unless a matching set is there."""
    folder = DATA_DIR / f"{workload.key}-{workload.count}x{workload.size}"
    manifest = folder / "manifest.json"
    expected = {"count": workload.count, "size": workload.size, "names": file_names(workload)}
    if manifest.exists():
        try:
            if json.loads(manifest.read_text()) == expected and all(
                (folder / "files" / name).stat().st_size == workload.size for name in expected["names"]
            ):
                return folder / "files"
        except (OSError, ValueError):
            pass
    files = folder / "files"
    files.mkdir(parents=True, exist_ok=True)
    for stale in files.iterdir():
        stale.unlink()
    for name in expected["names"]:
        fd = os.open(files / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            left = workload.size
            while left:
                chunk = os.urandom(min(WRITE_CHUNK, left))
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
                left -= len(chunk)
        finally:
            os.close(fd)
    os.sync()
    manifest.write_text(json.dumps(expected))
    return files


def link_files(source: Path, target: Path, names: list[str]) -> None:
    """Hard-link the workload's files into ``target`` (a fresh folder)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        os.link(source / name, target / name)
