"""The one builder of ``common.v2.Download``: it and the parser are inverses, and the scheduler registration it
builds is the message peers sent before the builder existed."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dfdaemon.api import common_pb2
from dfdaemon.download import ByteRange, DownloadRequest
from dfdaemon.download.peering import Registration
from dfdaemon.rpc import convert
from dfdaemon.units import MAX_DURATION_SECONDS

UINT32 = st.integers(0, 2**32 - 1)
UINT64 = st.integers(0, 2**64 - 1)
TEXT = st.text(max_size=20)


def optional(strategy: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.none() | strategy


# A timeout as the parser produces it: whole nanoseconds, positive, at most 100 years.
TIMEOUTS = st.integers(1, MAX_DURATION_SECONDS * 10**9).map(lambda nanoseconds: nanoseconds / 1e9)

REQUESTS = st.builds(
    DownloadRequest,
    url=TEXT,
    digest=optional(TEXT),
    range=optional(st.builds(ByteRange, UINT64, UINT64)),
    tag=optional(TEXT),
    application=optional(TEXT),
    filtered_query_params=st.lists(TEXT, max_size=3).map(tuple),
    request_header=st.dictionaries(TEXT, TEXT, max_size=3),
    piece_length=optional(UINT64),
    output_path=optional(TEXT),
    timeout=optional(TIMEOUTS),
    disable_back_to_source=st.booleans(),
    need_back_to_source=st.booleans(),
    need_piece_content=st.booleans(),
    force_hard_link=st.booleans(),
    overwrite=st.booleans(),
    content_for_calculating_task_id=optional(TEXT),
    concurrent_piece_count=optional(UINT32),
    enable_task_id_based_blob_digest=st.booleans(),
    priority=st.integers(0, 6),
    remote_ip=optional(TEXT),
    from_network=st.just(False),
)


@given(REQUESTS)
def test_parse_inverts_build(request: DownloadRequest) -> None:
    assert convert.download_request(convert.download(request)) == request


@given(REQUESTS)
def test_build_survives_the_wire(request: DownloadRequest) -> None:
    message = convert.download(request)
    assert common_pb2.Download.FromString(message.SerializeToString()) == message


@given(REQUESTS, st.booleans())
def test_from_network_is_the_servers_to_say(request: DownloadRequest, from_network: bool) -> None:
    parsed = convert.download_request(convert.download(request), from_network=from_network)
    assert parsed.from_network is from_network


def test_unset_options_stay_unset() -> None:
    message = convert.download(DownloadRequest(url="http://origin.example/f"))
    assert message == common_pb2.Download(url="http://origin.example/f")
    unset = ("digest", "range", "tag", "application", "piece_length", "output_path", "timeout")
    assert not any(message.HasField(name) for name in unset)


def test_registration_carries_the_request_and_the_measured_sizes() -> None:
    registration = Registration(
        task_id="t" * 64,
        peer_id="peer",
        download=DownloadRequest(
            url="http://origin.example/f?sig=1",
            tag="v1",
            filtered_query_params=("sig",),
            request_header={"Authorization": "Bearer x"},
            disable_back_to_source=True,
            priority=common_pb2.LEVEL6,
        ),
        content_length=10_000_000,
        actual_piece_length=4 * 1024 * 1024,
        piece_count=3,
        concurrent_piece_count=8,
    )
    # Field for field what RegisterPeerRequest carried before the builder: nothing more, nothing less.
    assert convert.registered_download(registration) == common_pb2.Download(
        url="http://origin.example/f?sig=1",
        type=common_pb2.STANDARD,
        tag="v1",
        filtered_query_params=["sig"],
        request_header={"Authorization": "Bearer x"},
        disable_back_to_source=True,
        concurrent_piece_count=8,
        priority=common_pb2.LEVEL6,  # what dfget asked for, as the scheduler sees it
        actual_content_length=10_000_000,
        actual_piece_length=4 * 1024 * 1024,
        actual_piece_count=3,
    )


@pytest.mark.parametrize(
    ("download", "hub"),
    [
        (
            common_pb2.Download(url="https://huggingface.co/x", hugging_face=common_pb2.HuggingFace(revision="main")),
            "Hugging Face",
        ),
        (common_pb2.Download(url="hf://deepseek-ai/DeepSeek-OCR/model.safetensors"), "Hugging Face"),
        (
            common_pb2.Download(url="https://modelscope.cn/x", model_scope=common_pb2.ModelScope(revision="master")),
            "ModelScope",
        ),
        (common_pb2.Download(url="ModelScope://org/repo"), "ModelScope"),
        (common_pb2.Download(url="https://opencsg.com/x", open_csg=common_pb2.OpenCSG()), "OpenCSG"),
        (common_pb2.Download(url="opencsg://org/repo/file"), "OpenCSG"),
    ],
)
def test_model_hub_downloads_are_unimplemented_with_the_reason(download: common_pb2.Download, hub: str) -> None:
    with pytest.raises(convert.Unsupported, match=f"{hub} downloads .* not supported") as caught:
        convert.download_request(download)
    assert convert.status_for(caught.value) is grpc.StatusCode.UNIMPLEMENTED


def test_api_2_3_fields_the_daemon_does_not_act_on_are_accepted() -> None:
    message = common_pb2.Download(url="https://example.com/f", metadata_only=True, scheduling_policy=common_pb2.ALWAYS)
    assert convert.download_request(message).url == "https://example.com/f"


def test_a_priority_outside_upstreams_levels_is_invalid() -> None:
    message = common_pb2.Download(url="https://example.com/f")
    message.priority = 7  # type: ignore[assignment]  # an open enum: the wire may carry any number
    with pytest.raises(convert.InvalidRequest, match=r"download\.priority 7 is not a priority level"):
        convert.download_request(message)
