"""Block transfer over MQTT as the TUF client's fetcher (device side).

:class:`MqttBlockFetcher` is ``edgeship.ota.block_transfer.MqttBlockDownloader``
(the protocol, the resumable partial files; see that module and
docs/protocol.md, "Block transfer") as a ``tuf.ngclient.FetcherInterface``: the
TUF client (``edgeship.ota.updater``) asks it for ``edgeship://metadata/<file>``
and ``edgeship://targets/<path>``. Its failures are the TUF client's download
errors (a 404 is how the client learns that no newer root exists) and the
transport's at once.

The transport is untrusted: nothing here is verified beyond the framing; the
TUF client checks lengths, hashes and signatures of what this yields.
"""

from __future__ import annotations

__all__ = [
    "METADATA_URL",
    "TARGETS_URL",
    "URL_PREFIX",
    "BlockNotFoundError",
    "BlockTransferConfig",
    "BlockTransferError",
    "DownloaderFetcher",
    "MqttBlockFetcher",
    "PartialFile",
    "stream_for_url",
]

from collections.abc import Iterator

from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient import FetcherInterface

from . import block_transfer
from .block_transfer import (
    METADATA_URL,
    TARGETS_URL,
    URL_PREFIX,
    BlockTransferConfig,
    BlockTransferFailed,
    MqttBlockDownloader,
)
from .partial_file import PartialFile


class BlockTransferError(BlockTransferFailed, tuf_exceptions.DownloadError):
    """A block transfer failed (timeout, server error, changed file); a DownloadError to the TUF client."""

    def __init__(self, message: str) -> None:
        BlockTransferFailed.__init__(self, message)


class BlockNotFoundError(BlockTransferError, tuf_exceptions.DownloadHTTPError):  # type: ignore[misc]
    """The server has no such file: HTTP 404 to the TUF client (how it learns no newer root exists)."""

    def __init__(self, message: str, status_code: int = 404) -> None:
        BlockTransferFailed.__init__(self, message, status_code)


def stream_for_url(url: str) -> str:
    """``edgeship://metadata/1.root.json`` -> ``metadata/1.root.json`` (percent-decoded, checked).

    Raises:
        BlockNotFoundError: (HTTP 400) a URL outside ``metadata/`` and ``targets/``, or with
            ``..``, empty or absolute segments.
    """
    try:
        return block_transfer.stream_for_url(url)
    except BlockTransferFailed as exc:
        raise BlockNotFoundError(str(exc), exc.status_code or 400) from None


class MqttBlockFetcher(MqttBlockDownloader, FetcherInterface):
    """Fetch files in blocks over MQTT for the TUF client, resumable across reconnects
    and restarts (``MqttBlockDownloader``'s arguments)."""

    transfer_error = BlockTransferError
    not_found_error = BlockNotFoundError

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self.chunks(url)


class DownloaderFetcher(FetcherInterface):
    """Any ``MqttBlockDownloader`` (one the agent built without TUF) as the TUF
    client's fetcher: its failures become the client's download errors."""

    def __init__(self, downloader: MqttBlockDownloader) -> None:
        self.downloader = downloader

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            chunks = self.downloader.chunks(url)
        except BlockTransferFailed as exc:
            raise _as_tuf_error(exc) from None
        return self._translated(chunks)

    @staticmethod
    def _translated(chunks: Iterator[bytes]) -> Iterator[bytes]:
        try:
            yield from chunks
        except BlockTransferFailed as exc:
            raise _as_tuf_error(exc) from None


def _as_tuf_error(exc: BlockTransferFailed) -> BlockTransferError:
    if isinstance(exc, BlockTransferError):
        return exc
    if exc.status_code is not None:
        return BlockNotFoundError(str(exc), exc.status_code)
    return BlockTransferError(str(exc))
