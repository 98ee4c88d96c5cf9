"""B, the raw SDK baseline, run as its own process: the workload's files uploaded straight
from disk by a thread pool calling ``upload_blob``, with the service's default worker count,
block size, single-put size and per-file concurrency.

No staging copy, no MD5 of our own, no verification, no NFS bookkeeping: what is left is
the ceiling for anything built on this SDK and this endpoint. It prints one JSON object.

    BENCH_CONNECTION_STRING=... python -m benchmarks.baseline --dir D --container C --prefix P ...
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--container", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--block-size", type=int, required=True)
    parser.add_argument("--single-put-size", type=int, required=True)
    parser.add_argument("--max-concurrency", type=int, required=True)
    args = parser.parse_args()

    import requests
    from azure.core.pipeline.transport import RequestsTransport
    from azure.storage.blob import BlobServiceClient

    # A connection pool as large as the number of requests in flight (the service sizes its
    # own the same way); requests' default of 10 would open and drop connections.
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(
        pool_connections=4, pool_maxsize=args.workers * args.max_concurrency
    )
    session.mount("http://", adapter)
    client = BlobServiceClient.from_connection_string(
        os.environ["BENCH_CONNECTION_STRING"],
        max_block_size=args.block_size,
        max_single_put_size=args.single_put_size,
        transport=RequestsTransport(session=session, session_owner=False),
    )
    container = client.get_container_client(args.container)
    files = sorted(p for p in args.dir.iterdir() if p.is_file())

    def upload(path: Path) -> int:
        size = path.stat().st_size
        with open(path, "rb") as data:
            container.upload_blob(
                args.prefix + path.name,
                data,
                length=size,
                overwrite=True,
                max_concurrency=args.max_concurrency,
            )
        return size

    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.time()
    with ThreadPoolExecutor(args.workers) as pool:
        sent = sum(pool.map(upload, files))
    ended = time.time()
    after = resource.getrusage(resource.RUSAGE_SELF)
    client.close()
    print(
        json.dumps(
            {
                "started": started,
                "ended": ended,
                "files": len(files),
                "bytes": sent,
                "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
                "peak_rss_kib": after.ru_maxrss,
            }
        )
    )


if __name__ == "__main__":
    main()
