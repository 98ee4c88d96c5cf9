"""Blob storage: the container check at start-up, and verified, resumable uploads.

Every byte is checked by the storage service itself: a small file goes up in one Put Blob
with its Content-MD5, a large one as blocks that each carry their own Content-MD5, all taken
while the file was copied to staging (so each byte is hashed once, and what is sent is
checked against what was read from NFS). Azure
does not check a whole-blob MD5 when blocks are committed, so the per-block check is what
proves the bytes; the blob's size and stored MD5 are read back before a file counts as done.

Block ids are derived from the block's position and MD5. After a crash or a network
failure, blocks already staged in storage (``get_block_list('uncommitted')``) with the right
id and size are not sent again. Uncommitted blocks expire after 7 days on Azure.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import trio
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.storage.blob import (
    BlobBlock,
    BlobClient,
    BlobProperties,
    ContainerClient,
    ContentSettings,
)
from opentelemetry import trace

from uploader.auth import Connection, Unusable, connections_to_try, no_fallback_note
from uploader.config import Settings
from uploader.errors import BlocksMissing, IntegrityError, StartupError, describe, first_leaf
from uploader.fileops import StagedFile, read_block, stage_copy
from uploader.lanes import Lanes

log = logging.getLogger(__name__)
T = TypeVar("T")
PROBE_BLOB = ".uploader-probe"
# A probe storage answers later than this says it does not work now: one answered only as a
# hang ends (a stalled server) would count a file's timeout in it against the file.
PROBE_TIMEOUT_S = 2.0
COPY_FAILURE_WAIT_S = 5.0
tracer = trace.get_tracer(__name__)


def _md5_checked(request: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Make a request that carries a Content-MD5; storage refusing it means the bytes read
    from staging are not the bytes that were hashed while copying."""
    try:
        return request(*args, **kwargs)
    except HttpResponseError as exc:
        message = str(exc.message or "").lower()
        if exc.status_code == 400 and (
            getattr(exc, "error_code", None) == "Md5Mismatch" or "md5" in message
        ):
            raise IntegrityError(f"storage found the bytes do not match their MD5: {describe(exc)}") from None
        raise


def _matches(properties: BlobProperties, staged: StagedFile) -> bool:
    stored_md5 = properties.content_settings.content_md5
    return (
        properties.size == staged.size
        and stored_md5 is not None
        and bytes(stored_md5) == staged.md5
    )


def _uncommitted_blocks(blob: BlobClient) -> list[BlobBlock]:
    """The blocks staged and not committed yet; none for a blob that does not exist, the
    usual case, answered in the thread (a trace would show every new upload as an error)."""
    try:
        return list(blob.get_block_list("uncommitted")[1])
    except ResourceNotFoundError:
        return []


def block_id(index: int, md5: bytes) -> str:
    # Fixed length for every block of a blob, as Azure requires; well under 64 bytes.
    return f"{index:05d}-{md5.hex()}"


@dataclass(frozen=True)
class _Block:
    index: int
    offset: int
    length: int
    md5: bytes


@dataclass(frozen=True)
class UploadReport:
    bytes_sent: int
    bytes_resumed: int
    blocks: int


class BlobStore:
    def __init__(self, connection: Connection, container: str, settings: Settings, lanes: Lanes):
        self.connection = connection
        self.container: ContainerClient = connection.client.get_container_client(container)
        self.settings = settings
        self.lanes = lanes

    @property
    def url(self) -> str:
        return str(self.container.url)

    async def ensure_container(self) -> None:
        """Read the container's properties, creating it when it is missing."""
        azure = self.lanes.azure
        try:
            await azure.run(self.container.get_container_properties)
            return
        except ResourceNotFoundError:
            pass
        try:
            await azure.run(self.container.create_container)
            log.info("created container %s", self.container.container_name)
        except ResourceExistsError:
            pass

    async def upload(
        self, staged: StagedFile, name: str, *, on_sent: Callable[[int], None] = lambda n: None
    ) -> UploadReport:
        if staged.size <= self.settings.azure_max_single_put_size:
            return await self._in_container(self._put_whole, name, staged, on_sent)
        blob = self.container.get_blob_client(name)
        return await self._in_container(self._put_blocks, blob, staged, on_sent)

    async def _in_container(self, upload: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run an upload; should the container have been deleted meanwhile, create it again
        and run the upload once more."""
        try:
            return await upload(*args)
        except ResourceNotFoundError as exc:
            if getattr(exc, "error_code", None) != "ContainerNotFound":
                raise
        log.warning("container %s is gone; creating it again", self.container.container_name)
        await self.ensure_container()
        return await upload(*args)

    async def _put_whole(
        self, name: str, staged: StagedFile, on_sent: Callable[[int], None]
    ) -> UploadReport:
        def put_blob() -> dict[str, Any]:
            # Read and build the client here, in the Azure call's own thread: one trip to a
            # thread per small file, and as little as possible on the event loop.
            blob = self.container.get_blob_client(name)
            data = read_block(staged.path, 0, staged.size)
            return _md5_checked(
                blob.upload_blob,
                data,
                blob_type="BlockBlob",
                length=len(data),
                overwrite=True,
                max_concurrency=1,
                transactional_content_md5=bytearray(staged.md5),
                content_settings=ContentSettings(content_md5=bytearray(staged.md5)),
            )

        answer = await self.lanes.azure.run(put_blob)
        on_sent(staged.size)
        # The service checked the Content-MD5 of the whole body before it answered.
        stored = answer.get("content_md5")
        if stored is not None and bytes(stored) != staged.md5:
            raise IntegrityError(f"storage computed MD5 {bytes(stored).hex()} for {name}")
        # Azure always answers with it; an endpoint that does not (a proxy, another
        # implementation) is asked for the blob it says it stored.
        if stored is None and not await self.holds(name, staged):
            raise IntegrityError(f"storage answered without an MD5 for {name}, and does not hold it as sent")
        return UploadReport(staged.size, 0, 1)

    async def _put_blocks(
        self, blob: BlobClient, staged: StagedFile, on_sent: Callable[[int], None]
    ) -> UploadReport:
        blocks = trio.open_memory_channel[_Block](math.inf)
        async with blocks[0] as ready:
            for index, md5 in enumerate(staged.block_md5s):
                ready.send_nowait(
                    _Block(index, index * staged.block_size, staged.block_length(index), md5)
                )
        sent, resumed = await self._send_blocks(blob, staged.path, blocks[1], on_sent)
        await self._commit(blob, staged)
        return UploadReport(sent, resumed, len(staged.block_md5s))

    async def upload_while_staging(
        self,
        source: Path,
        staging: Path,
        name: str,
        *,
        on_sent: Callable[[int], None] = lambda n: None,
        on_staged: Callable[[StagedFile], None] = lambda staged: None,
        at_most: int | None = None,
    ) -> tuple[StagedFile, UploadReport]:
        """Copy a large file to staging and send its blocks as each is copied (a copy of at
        most ``at_most`` bytes: ``stage_copy``). ``on_staged`` gets the copy once it is
        complete, before the commit, whose answer may be lost though it went through.

        The blob is committed only once the copy is complete, fsynced and checked unchanged:
        a copy that fails leaves nothing but uncommitted blocks, which the next attempt uses.
        """
        return await self._in_container(
            self._stream_blocks, source, staging, name, on_sent, on_staged, at_most
        )

    async def _stream_blocks(
        self,
        source: Path,
        staging: Path,
        name: str,
        on_sent: Callable[[int], None],
        on_staged: Callable[[StagedFile], None],
        at_most: int | None,
    ) -> tuple[StagedFile, UploadReport]:
        blob = self.container.get_blob_client(name)
        ready_send, ready_receive = trio.open_memory_channel[_Block](math.inf)

        def block_ready(index: int, offset: int, length: int, md5: bytes) -> None:
            trio.from_thread.run_sync(ready_send.send_nowait, _Block(index, offset, length, md5))

        staged: StagedFile | None = None
        copy_failure: Exception | None = None
        copy_ended = trio.Event()

        async def copy() -> None:
            nonlocal staged, copy_failure
            async with ready_send:
                with tracer.start_as_current_span("stage"):
                    try:
                        staged = await self.lanes.nfs.run(
                            partial(stage_copy, at_most=at_most), source, staging,
                            self.settings.azure_max_block_size, block_ready,
                        )
                    except Exception as exc:
                        copy_failure = exc
                        raise
                    finally:
                        copy_ended.set()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(copy)
                sent, resumed = await self._send_blocks(
                    blob, staging, ready_receive, on_sent, copy_ended=copy_ended
                )
        except ExceptionGroup as group:
            # A copy that fails (the file changed under it, say) removes its staging copy, and
            # the block being sent fails on the missing file: the copy's failure is the cause.
            raise (copy_failure or first_leaf(group)) from None
        assert staged is not None
        on_staged(staged)
        await self._commit(blob, staged)
        return staged, UploadReport(sent, resumed, len(staged.block_md5s))

    async def _send_blocks(
        self,
        blob: BlobClient,
        path: Path,
        blocks: trio.MemoryReceiveChannel[_Block],
        on_sent: Callable[[int], None],
        *,
        copy_ended: trio.Event | None = None,
    ) -> tuple[int, int]:
        """Stage every block that comes through ``blocks`` and is not in storage already;
        returns (bytes sent, bytes found already staged). ``copy_ended``: set when the copy
        that feeds ``blocks`` has ended."""
        azure = self.lanes.azure
        already = {block.id: block.size for block in await azure.run(_uncommitted_blocks, blob)}
        sent = resumed = 0

        def stage_block(block: _Block) -> None:
            data = read_block(path, block.offset, block.length)
            _md5_checked(
                blob.stage_block,
                block_id(block.index, block.md5),
                data,
                length=block.length,
                transactional_content_md5=bytearray(block.md5),
            )

        async def sender(todo: trio.MemoryReceiveChannel[_Block]) -> None:
            nonlocal sent, resumed
            async with todo:
                async for block in todo:
                    if already.get(block_id(block.index, block.md5)) == block.length:
                        resumed += block.length
                        continue
                    try:
                        await azure.run(stage_block, block)
                    except FileNotFoundError:
                        if copy_ended is not None:
                            # A copy that fails removes its staging file: its failure (the
                            # file changed, say) is the cause; give it a moment to be known.
                            with trio.move_on_after(COPY_FAILURE_WAIT_S):
                                await copy_ended.wait()
                        raise
                    sent += block.length
                    on_sent(block.length)

        try:
            async with blocks, trio.open_nursery() as nursery:
                for _ in range(self.settings.azure_max_concurrency):
                    nursery.start_soon(sender, blocks.clone())
        except ExceptionGroup as group:
            # The first block to fail cancelled the others: that failure is the file's.
            raise first_leaf(group) from None
        if resumed:
            log.info("resumed %s: %d bytes were already in storage", blob.blob_name, resumed)
        return sent, resumed

    async def _commit(self, blob: BlobClient, staged: StagedFile) -> None:
        azure = self.lanes.azure
        ids = [block_id(i, md5) for i, md5 in enumerate(staged.block_md5s)]
        try:
            await azure.run(
                blob.commit_block_list,
                [BlobBlock(block_id=id_) for id_ in ids],
                content_settings=ContentSettings(content_md5=bytearray(staged.md5)),
            )
        except HttpResponseError as exc:
            if getattr(exc, "error_code", None) == "InvalidBlockList":
                raise BlocksMissing(
                    f"storage no longer holds every block of {blob.blob_name}: {describe(exc)}"
                ) from None
            raise
        properties = await azure.run(blob.get_blob_properties)
        stored_md5 = properties.content_settings.content_md5
        if not _matches(properties, staged):
            raise IntegrityError(
                f"{blob.blob_name} in storage has {properties.size} bytes and MD5 "
                f"{bytes(stored_md5 or b'').hex()}, expected {staged.size} and {staged.md5.hex()}"
            )

    async def holds(self, name: str, staged: StagedFile, *, once: bool = False) -> bool:
        """Whether the blob ``name`` exists with the size and MD5 of ``staged``; ``once``:
        asked without the SDK's retries (the caller asks again in its own time)."""
        blob = self.container.get_blob_client(name)
        try:
            read = partial(blob.get_blob_properties, retry_total=0) if once else blob.get_blob_properties
            properties = await self.lanes.azure.run(read)
        except ResourceNotFoundError:
            return False
        return _matches(properties, staged)

    async def probe(self) -> bool:
        """Whether storage takes a write now: stages one block of a probe blob.

        An uncommitted block is invisible in listings and expires on its own after 7 days.
        """
        blob = self.container.get_blob_client(PROBE_BLOB)
        settings = self.settings
        try:
            # Once, now: the SDK's retries would wait seconds, and an outage may end meanwhile.
            await self.lanes.azure.run(
                partial(
                    blob.stage_block, "probe", b"probe", validate_content=True, retry_total=0,
                    connection_timeout=min(PROBE_TIMEOUT_S, settings.azure_connect_timeout_s),
                    read_timeout=min(PROBE_TIMEOUT_S, settings.azure_read_timeout_s),
                )
            )
        except (HttpResponseError, ServiceRequestError, ServiceResponseError) as exc:
            log.info("storage probe failed: %s", describe(exc))
            return False
        return True

    def close(self) -> None:
        self.connection.close()


async def open_blob_store(settings: Settings, lanes: Lanes) -> BlobStore:
    """Connect with the first credential that works; fail start-up with one clear line.

    Each connection is checked by reading the container's properties (creating it when it is
    missing), a token credential by getting a token first. Only an authentication failure
    (the credential gets no token, or storage answers 401 or 403) moves on to the next
    connection (APP_AZURE_AUTH=auto: DefaultAzureCredential, then the key settings); any
    other failure stops start-up at once.
    """
    pool_size = int(lanes.azure.limiter.total_tokens)
    connections = connections_to_try(settings, pool_size)
    failures: list[str] = []
    where = settings.azure_account_url or "storage"
    while True:
        # Building a client or a credential may read files: not on the event loop.
        connection = await lanes.azure.run(next, connections, None)
        if connection is None:
            break
        if failures:
            log.warning("%s; trying %s", failures[-1], connection.description)
        if isinstance(connection, Unusable):
            failures.append(connection.reason)
            continue
        store = BlobStore(connection, settings.azure_container, settings, lanes)
        where = store.url.split("?")[0]  # never a SAS token
        try:
            await lanes.azure.run(connection.check_credential)
            await store.ensure_container()
        except HttpResponseError as exc:  # ClientAuthenticationError is one
            store.close()
            if not (isinstance(exc, ClientAuthenticationError) or exc.status_code in (401, 403)):
                raise StartupError(
                    f"cannot use {where} with {connection.in_use()}: {describe(exc)}"
                ) from None
            if exc.response is None:  # the credential got no token
                reason = describe(exc)
                if not reason.startswith(connection.description):
                    reason = f"{connection.description} got no token: {reason}"
                failures.append(reason)
            else:
                failures.append(f"storage refused {connection.in_use()}: {describe(exc)}")
            continue
        except (ServiceRequestError, ServiceResponseError) as exc:
            store.close()
            earlier = f" (before that: {'; then '.join(failures)})" if failures else ""
            reason = describe(exc)
            if where.startswith("https:") and "WRONG_VERSION_NUMBER" in reason:
                # A URL without its scheme is https to the SDK; an emulator speaks plain http.
                reason += " (it does not answer in TLS: if it speaks plain HTTP, write http:// in its URL)"
            raise StartupError(f"cannot reach Azure Blob Storage at {where}: {reason}{earlier}") from None
        except BaseException:
            store.close()
            raise
        log.info("connected to %s with %s", where, connection.in_use())
        return store
    note = no_fallback_note(settings)
    raise StartupError(
        f"cannot authenticate to {where}: "
        + "; then ".join(failures)
        + (f"; {note}" if note else "")
    )
