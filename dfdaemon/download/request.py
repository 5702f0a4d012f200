"""What a download asks for, in domain terms.

Kept apart from the manager so the CLIs and the message conversion can build requests without importing
the download machinery (the origin client, storage, GC): every ``dfget`` and ``dfctl`` call pays for what it
imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dfdaemon import ids
from dfdaemon.download.ranges import ByteRange as ByteRange


@dataclass(frozen=True)
class DownloadRequest:
    """A ``common.v2.Download`` in domain terms; ``None`` means the optional field is unset."""

    url: str
    digest: str | None = None
    range: ByteRange | None = None
    tag: str | None = None
    application: str | None = None
    filtered_query_params: tuple[str, ...] = ()
    request_header: dict[str, str] = field(default_factory=dict)
    piece_length: int | None = None
    output_path: str | None = None
    timeout: float | None = None
    disable_back_to_source: bool = False
    need_back_to_source: bool = False
    need_piece_content: bool = False
    force_hard_link: bool = False
    overwrite: bool = False
    content_for_calculating_task_id: str | None = None
    concurrent_piece_count: int | None = None
    enable_task_id_based_blob_digest: bool = False
    # common.v2.Priority level (0-6), passed on to the scheduler; 0 is the message's default, dfget asks for 6.
    priority: int = 0
    # The requesting client's address, as upstream's dfget reports it; carried, not acted on.
    remote_ip: str | None = None
    # Set by the server, not the caller: the request came over the network (the upload server).
    from_network: bool = False
    # Upstream's Download.prefetch: a ranged request also fetches the whole task in the background.
    prefetch: bool = False
    # A ``Range`` suffix longer than the content selects all of it (RFC 9110: the forward proxy's HTTP clients);
    # otherwise it is refused, as upstream's gRPC reading refuses it.
    long_suffix_is_whole: bool = False
    # Upstream's Download.is_prefetch: this is the background download a prefetch started; its bytes from the
    # origin also take from proxy.prefetchBandwidthLimit.
    is_prefetch: bool = False

    def task_id(self) -> str:
        return ids.task_id(
            self.url,
            tag=self.tag,
            application=self.application,
            piece_length=self.piece_length,
            filtered_query_params=self.filtered_query_params,
            content_for_calculating_task_id=self.content_for_calculating_task_id,
            enable_task_id_based_blob_digest=self.enable_task_id_based_blob_digest,
        )
