"""Tests for dfdaemon.ids: task ids, URL canonicalisation, piece math and digests."""

from __future__ import annotations

import hashlib
import itertools
import re
import zlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dfdaemon.ids import (
    DEFAULT_FILTERED_QUERY_PARAMS,
    MAX_DEFAULT_PIECE_LENGTH,
    MIN_DEFAULT_PIECE_LENGTH,
    DigestMismatch,
    FileDigester,
    InvalidTaskId,
    InvalidUrl,
    PieceSpan,
    QueryRule,
    blob_digest_from_url,
    blob_digest_task_id,
    crc32_update,
    filtered_query_params_or_default,
    format_crc32,
    host_id,
    is_valid_task_id,
    iter_pieces,
    normalize_url,
    parse_crc32_digest,
    parse_file_digest,
    peer_id,
    piece_count,
    piece_digest,
    piece_length_for,
    piece_metadata_digest,
    pieces_for,
    task_blob_digest,
    task_id,
    validate_task_id,
)

MiB = 1024 * 1024
SHA256_HEX = "b2c366cce7e68013d5441c6326d5a3e1b12aeb5ed58564d0fd3fa089bc29cb6e"
SHA512_HEX = (
    "94381a28e8c039fedfa78de025158a068226c3ccd041b22c2c8e73fc993584e9"
    "b167d9ae32bc8b372c66701c808ab134e0768c8f16b9a3e61eec1ccf8faa9db8"
)


# ----------------------------------------------------------------------------- task id vectors


def test_task_id_vector_with_piece_length_tag_and_application() -> None:
    got = task_id("https://example.com", piece_length=1024, tag="foo", application="bar")
    assert got == "27554d06dfc788c2c2c60e01960152ffbd4b145fc103fcb80b432b4dc238a6fe"


def test_task_id_vector_without_piece_length() -> None:
    got = task_id("https://example.com", tag="foo", application="bar")
    assert got == "06408fbf247ddaca478f8cb9565fe5591c28efd0994b8fea80a6a87d3203c5ca"


def test_task_id_vector_with_all_query_params_filtered() -> None:
    got = task_id("https://example.com?foo=foo&bar=bar", filtered_query_params=["foo", "bar"])
    assert got == "457b4328cde278e422c9e243f7bfd1e97f511fec43a80f535cf6b0ef6b086776"


def test_task_id_vector_from_content() -> None:
    got = task_id("https://example.com/ignored", content_for_calculating_task_id="This is a test file")
    assert got == "e2d0fe1585a63ec6009c8016ff8dda8b17719a637405a4e23c0ff81339148249"


@pytest.mark.parametrize(
    ("tag", "application", "piece_length", "expected"),
    [
        ("foo", None, None, "3c3f230ef9f191dd2821510346a7bc138e4894bee9aee184ba250a3040701d2a"),
        (None, "bar", None, "c9f9261b7305c24371244f9f149f5d4589ed601348fdf22d7f6f4b10658fdba2"),
        (None, None, 1024, "9f7c9aafbc6f30f8f41a96ca77eeae80c5b60964b3034b0ee43ccf7b2f9e52b8"),
    ],
)
def test_task_id_upstream_vectors_for_single_parts(
    tag: str | None, application: str | None, piece_length: int | None, expected: str
) -> None:
    assert task_id("https://example.com", tag=tag, application=application, piece_length=piece_length) == expected


def test_task_id_is_plain_concatenation_of_parts() -> None:
    expected = hashlib.sha256(b"https://example.com/a?x=1" + b"t" + b"app" + b"4096" + b"STANDARD").hexdigest()
    assert task_id("https://example.com/a?x=1", tag="t", application="app", piece_length=4096) == expected


def test_empty_tag_and_application_are_skipped() -> None:
    assert task_id("https://example.com", tag="", application="") == task_id("https://example.com")
    assert task_id("https://example.com") == hashlib.sha256(b"https://example.comSTANDARD").hexdigest()


def test_trailing_root_slash_and_default_port_do_not_change_the_task_id() -> None:
    base = task_id("https://example.com", tag="foo", application="bar")
    assert task_id("https://example.com/", tag="foo", application="bar") == base
    assert task_id("HTTPS://EXAMPLE.com:443/", tag="foo", application="bar") == base


def test_tag_changes_the_task_id() -> None:
    assert task_id("https://example.com/f", tag="a") != task_id("https://example.com/f", tag="b")


def test_content_wins_over_blob_digest_and_url() -> None:
    url = f"https://r.example.com/v2/library/ubuntu/blobs/sha256:{SHA256_HEX}"
    got = task_id(url, content_for_calculating_task_id="", enable_task_id_based_blob_digest=True)
    assert got == hashlib.sha256(b"").hexdigest()


def test_negative_piece_length_is_rejected() -> None:
    with pytest.raises(ValueError, match="piece_length"):
        task_id("https://example.com", piece_length=-1)


def test_task_ids_are_valid_task_ids() -> None:
    assert is_valid_task_id(task_id("https://example.com/x?y=z", tag="t"))


# ----------------------------------------------------------------------------- URL canonicalisation


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://example.com", "https://example.com"),
        ("https://example.com/", "https://example.com"),
        ("HTTP://Example.COM:80/A/b", "http://example.com/A/b"),
        ("https://example.com:443/file", "https://example.com/file"),
        ("https://example.com:0443/file", "https://example.com/file"),
        ("http://example.com:443/file", "http://example.com:443/file"),
        ("https://example.com:80/file", "https://example.com:80/file"),
        ("https://example.com:8443/", "https://example.com:8443"),
        ("https://example.com/dir/", "https://example.com/dir/"),
        ("https://example.com/?", "https://example.com"),
        ("https://example.com/?a=1", "https://example.com/?a=1"),
        ("https://example.com/f?b=2&a=1", "https://example.com/f?b=2&a=1"),
        ("https://example.com/f?k=a b&m=x*y&n=c~d", "https://example.com/f?k=a+b&m=x*y&n=c%7Ed"),
        ("https://example.com/f?k=a%20b", "https://example.com/f?k=a+b"),
        ("https://example.com/f?p=1+1&q=%2B", "https://example.com/f?p=1+1&q=%2B"),
        ("https://example.com/f?s=%c3%bc&t=ü", "https://example.com/f?s=%C3%BC&t=%C3%BC"),
        ("https://example.com/f?a&b=1", "https://example.com/f?a=&b=1"),
        ("https://example.com/f?a=&&b", "https://example.com/f?a=&b="),
        ("https://example.com/f?x=a/b:c", "https://example.com/f?x=a%2Fb%3Ac"),
        ("https://example.com/f?q=%zz", "https://example.com/f?q=%25zz"),
        ("http://example.com/f#Frag", "http://example.com/f#Frag"),
        ("http://example.com/a/./b/../c", "http://example.com/a/c"),
        ("http://example.com/a b", "http://example.com/a%20b"),
        ("http://example.com/%7Euser", "http://example.com/%7Euser"),
        ("http://[0:0::1]:80/", "http://[::1]"),
        ("http://[2001:DB8::1]:8080/x", "http://[2001:db8::1]:8080/x"),
        ("http://127.1/", "http://127.0.0.1"),
        ("http://user:pw@Example.com/", "http://user:pw@example.com"),
        ("https://bücher.de/x", "https://xn--bcher-kva.de/x"),
        ("s3://MyBucket/Key", "s3://MyBucket/Key"),
        ("s3://bucket/", "s3://bucket"),
    ],
)
def test_normalize_url(url: str, expected: str) -> None:
    assert normalize_url(url) == expected


@pytest.mark.parametrize(
    ("url", "filtered", "expected"),
    [
        ("https://example.com?foo=foo&bar=bar", ["foo", "bar"], "https://example.com"),
        ("https://example.com/f?foo=1", ["foo"], "https://example.com/f"),
        ("https://example.com/f?a=1&sig=x&b=2", ["sig"], "https://example.com/f?a=1&b=2"),
        ("http://www.xx.yy/path?u=f&x=y&m=z&x=s#size", ["x", "m"], "http://www.xx.yy/path?u=f#size"),
        ("https://example.com/f?Foo=1&foo=2", ["foo"], "https://example.com/f?Foo=1"),
        ("https://example.com/f?foo%20bar=1&z=2", ["foo bar"], "https://example.com/f?z=2"),
        ("https://example.com/f?a&b=1", ["b"], "https://example.com/f?a="),
        ("https://example.com/f?a=1", ["A"], "https://example.com/f?a=1"),
    ],
)
def test_filtered_query_params(url: str, filtered: list[str], expected: str) -> None:
    assert normalize_url(url, filtered) == expected


def test_filtering_volatile_query_params_gives_one_task_id() -> None:
    a = task_id(
        "https://cdn.example.com/f.bin?Expires=1&Signature=aa&v=1", filtered_query_params=["Expires", "Signature"]
    )
    b = task_id(
        "https://cdn.example.com/f.bin?Expires=2&Signature=bb&v=1", filtered_query_params=["Expires", "Signature"]
    )
    assert a == b == task_id("https://cdn.example.com/f.bin?v=1")


def test_filtered_query_params_must_not_be_a_bare_string() -> None:
    with pytest.raises(TypeError):
        normalize_url("https://example.com/?a=1", "a")


# ----------------------------------------------------------------------------- IDNA hosts
# Expected hosts follow UTS #46 non-transitional processing without STD3 rules, which is what the
# WHATWG URL standard (and so upstream's URL parser) applies; each id is sha256(U + "STANDARD"),
# derived by hand from the task-id formula in PROTOCOL.md.


@pytest.mark.parametrize(
    ("url", "canonical", "expected_id"),
    [
        # ß survives non-transitional UTS #46; IDNA 2003 (Python's codec) would map it to "ss".
        (
            "https://Faß.DE/file",
            "https://xn--fa-hia.de/file",
            "629b259efef306b6d646defb9c37542c6c52ed8de8df22f5bdc5564f9202b200",
        ),
        # Mixed-case non-ASCII host: case-folded by the UTS #46 mapping before punycode.
        (
            "https://BÜCHER.de/x",
            "https://xn--bcher-kva.de/x",
            "f3f15f05aa69f4164a11d2f55235eb24aaef04fc758f71978b1819086225d939",
        ),
        # The ideographic full stop maps to "." and a symbol label is punycoded.
        (
            "http://I♥NY。de/",
            "http://xn--iny-zx5a.de",
            "74a090bd356b1d66efa44033d63b8e66e197f9287d7e6c2e12ae714215b241a2",
        ),
    ],
)
def test_idna_host_vectors(url: str, canonical: str, expected_id: str) -> None:
    assert normalize_url(url) == canonical
    assert task_id(url) == expected_id == hashlib.sha256(f"{canonical}STANDARD".encode()).hexdigest()


def test_idna_without_std3_rules_keeps_an_underscore() -> None:
    # WHATWG's domain to ASCII runs UTS #46 with UseSTD3ASCIIRules false, so "_" is kept (the Rust url crate
    # likewise refuses only forbidden host code points); "a_-yka" is RFC 3492 punycode of "a_ü".
    assert normalize_url("https://a_\u00fc.de/f") == "https://xn--a_-yka.de/f"


def test_idna_is_not_python_idna_2003_codec() -> None:
    assert "faß.de".encode("idna") == b"fass.de"  # the codec this module must not use
    assert task_id("https://faß.de/f") != task_id("https://fass.de/f")


def test_mixed_case_ascii_host_is_lowercased() -> None:
    assert normalize_url("https://Registry.EXAMPLE.com/v2/") == "https://registry.example.com/v2/"
    assert task_id("https://Registry.EXAMPLE.com/f") == task_id("https://registry.example.com/f")


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("a\ufffdb.de", "not allowed"),  # disallowed by the UTS #46 table
        ("\u0301a.de", "combining"),  # label starts with a combining mark
        ("a\u200db.de", "joiner"),  # ZERO WIDTH JOINER outside its allowed context
        ("a\u06271.de", "direction"),  # mixes left-to-right and Arabic against the bidi rule
    ],
)
def test_invalid_idna_hosts_are_refused(host: str, reason: str) -> None:
    with pytest.raises(InvalidUrl, match=reason):
        normalize_url(f"https://{host}/f")


# ----------------------------------------------------------------------------- default filtered params


def test_default_filtered_query_params_are_upstreams_thirty_keys() -> None:
    # The list in PROTOCOL.md ("Default filtered query params"), in upstream's order, duplicates dropped.
    assert len(DEFAULT_FILTERED_QUERY_PARAMS) == len(set(DEFAULT_FILTERED_QUERY_PARAMS)) == 30
    assert DEFAULT_FILTERED_QUERY_PARAMS[:2] == ("X-Amz-Algorithm", "X-Amz-Credential")
    assert {"X-Goog-Signature", "OSSAccessKeyId", "X-Obs-Date", "q-signature", "x-cos-security-token"} <= set(
        DEFAULT_FILTERED_QUERY_PARAMS
    )
    assert DEFAULT_FILTERED_QUERY_PARAMS[-1] == "ns"


def test_default_applies_only_when_the_caller_names_no_keys() -> None:
    assert filtered_query_params_or_default([]) == DEFAULT_FILTERED_QUERY_PARAMS
    assert filtered_query_params_or_default(()) == DEFAULT_FILTERED_QUERY_PARAMS
    assert filtered_query_params_or_default(["sig"]) == ("sig",)  # replaces the default, never extends it
    with pytest.raises(TypeError):
        filtered_query_params_or_default("sig")


def test_presigned_s3_url_vector_with_default_filter() -> None:
    # Derived by hand: every X-Amz-* key is in the default list, versionId is not.
    url = (
        "https://bucket.s3.amazonaws.com/model.bin?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20260101"
        "&X-Amz-Date=20260101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&versionId=3&X-Amz-Signature=beef"
    )
    got = task_id(url, filtered_query_params=filtered_query_params_or_default([]))
    assert got == "513d132312321bb3906f09a099223bc34a64da13101ac26ed8540003558f519c"
    assert got == hashlib.sha256(b"https://bucket.s3.amazonaws.com/model.bin?versionId=3STANDARD").hexdigest()
    assert task_id(url) != got  # without the default every signature is a new task


def test_containerd_ns_param_is_filtered_by_default() -> None:
    url = "https://mirror.example.com/v2/library/alpine/blobs/sha256:" + SHA256_HEX + "?ns=docker.io"
    assert normalize_url(url, DEFAULT_FILTERED_QUERY_PARAMS) == url.partition("?")[0]


def test_content_for_calculating_task_id_ignores_default_filter_and_url() -> None:
    # sha256("This is a test file"): upstream's content vector (PROTOCOL.md).
    got = task_id(
        "https://example.com/f?X-Amz-Date=1",
        tag="t",
        piece_length=4096,
        filtered_query_params=DEFAULT_FILTERED_QUERY_PARAMS,
        content_for_calculating_task_id="This is a test file",
    )
    assert got == "e2d0fe1585a63ec6009c8016ff8dda8b17719a637405a4e23c0ff81339148249"


# ----------------------------------------------------------------------------- query rules
# FORM is the released clients' rule (through 1.5.1), GO_SORTED the one upstream's main branch adopted
# after 1.5.1 to match the Go scheduler. Expected strings derived by hand from each rule.


@pytest.mark.parametrize(
    ("url", "filtered", "rule", "canonical", "expected_id"),
    [
        (
            "https://example.com/f?b=2&a=1&b=0&c=x~y*z&z=9",
            ["z"],
            QueryRule.FORM,
            "https://example.com/f?b=2&a=1&b=0&c=x%7Ey*z",
            "35a265cf3a1491be04aee768bd6e0bf40e3d1e6e4ef67e462d9f91056bf5b0d6",
        ),
        (
            "https://example.com/f?b=2&a=1&b=0&c=x~y*z&z=9",
            ["z"],
            QueryRule.GO_SORTED,
            "https://example.com/f?a=1&b=2&b=0&c=x~y%2Az",
            "486c9694798b3078d8f1e345fc39cab2b5983e1d557efd4aaee3d7430e69cec0",
        ),
        (
            "https://example.com/f?c=~' x",
            [],
            QueryRule.FORM,
            "https://example.com/f?c=%7E%27+x",
            "bc3bee9259051eb6123dcc13f25473dabc462252a0a854120809ebe8af2927ac",
        ),
        (  # no filter: left as the URL parser serialised it (WHATWG special-query percent-encoding)
            "https://example.com/f?c=~' x",
            [],
            QueryRule.GO_SORTED,
            "https://example.com/f?c=~%27%20x",
            "5d9d711d210be210b4151bd0cdf8aa74667702b45f67e5d22ad9867b0013ad6e",
        ),
        (
            "https://example.com/f?b=2&a=1",
            [],
            QueryRule.GO_SORTED,
            "https://example.com/f?b=2&a=1",
            "d5fb627f5710ff9848b216dd87b656a600d83a27a06952d5e30cfd69486e261a",
        ),
    ],
)
def test_query_rule_vectors(url: str, filtered: list[str], rule: QueryRule, canonical: str, expected_id: str) -> None:
    assert normalize_url(url, filtered, rule) == canonical
    got = task_id(url, filtered_query_params=filtered, query_rule=rule)
    assert got == expected_id == hashlib.sha256(f"{canonical}STANDARD".encode()).hexdigest()


@pytest.mark.parametrize("rule", list(QueryRule))
def test_query_left_empty_loses_its_question_mark_under_both_rules(rule: QueryRule) -> None:
    # Upstream's own vector (PROTOCOL.md) holds under both rules.
    got = task_id("https://example.com?foo=foo&bar=bar", filtered_query_params=["foo", "bar"], query_rule=rule)
    assert got == "457b4328cde278e422c9e243f7bfd1e97f511fec43a80f535cf6b0ef6b086776"


def test_released_clients_rule_is_the_default() -> None:
    url = "https://example.com/f?b=2&a=1&s=x"
    assert normalize_url(url, ["s"]) == normalize_url(url, ["s"], QueryRule.FORM) == "https://example.com/f?b=2&a=1"


@pytest.mark.parametrize(
    "url",
    ["", "not-a-url", "://x", "http://", "http://h:99999/", "http://h:8a/", "http://[::1/", "http://1.2.3.4.5/"],
)
def test_invalid_urls_raise(url: str) -> None:
    with pytest.raises(InvalidUrl):
        normalize_url(url)
    with pytest.raises(ValueError):
        task_id(url)


# ----------------------------------------------------------------------------- IP hosts
# Expected values follow the WHATWG URL standard's IPv4 parser ("ends in a number", parts of up to
# four numbers, each decimal, 0-prefixed octal or 0x-prefixed hex, the last one filling the remaining
# bytes) and its IPv6 serializer (lowercase hex, the first longest run of two or more zero pieces as
# "::"), which upstream's Rust `url` crate implements; several are cases of web-platform-tests' urltestdata.


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://192.168.0.1/", "http://192.168.0.1"),  # four decimal parts
        ("http://0x7f.0.0.1/", "http://127.0.0.1"),  # WHATWG: a part 0x7f is hex
        ("http://0x7f000001/", "http://127.0.0.1"),  # a single hex number fills all four bytes
        ("http://0x7F000001/", "http://127.0.0.1"),  # the host is lowercased first, so 0X is hex too
        ("http://0x.0x.0/", "http://0.0.0.0"),  # WHATWG: "0x" with no digits is zero
        ("http://0300.0250.0.01/", "http://192.168.0.1"),  # 0-prefixed parts are octal
        ("http://127.0.0.1./", "http://127.0.0.1"),  # one trailing dot is dropped before parsing
        ("http://1./", "http://0.0.0.1"),  # also when a single number is left
        ("http://1.2.65535/", "http://1.2.255.255"),  # the last of three parts fills two bytes
    ],
)
def test_ipv4_hosts(url: str, expected: str) -> None:
    assert normalize_url(url) == expected


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://1.2.3.4.0/", "too many parts"),  # WHATWG: more than four parts is a failure
        ("http://1.2.3.4.5/", "too many parts"),
        ("http://256.0.0.1/", "out of range"),  # a part other than the last is above 255
        ("http://1.2.65536/", "out of range"),  # the last part does not fit the bytes left
        ("http://0x1g.1/", "invalid IPv4 part"),  # ends in a number, yet a part is no number
    ],
)
def test_invalid_ipv4_hosts_are_refused(url: str, reason: str) -> None:
    with pytest.raises(InvalidUrl, match=f"^invalid URL '{re.escape(url)}': .*{reason}"):
        normalize_url(url)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("1:2:3:4:5:6:7:8", "1:2:3:4:5:6:7:8"),  # no zero piece: nothing compressed
        ("1:0:2:3:4:5:6:7", "1:0:2:3:4:5:6:7"),  # a single zero piece is never compressed
        ("1:0:0:2:3:4:5:6", "1::2:3:4:5:6"),  # a run of two is
        ("1:0:0:2:0:0:3:4", "1::2:0:0:3:4"),  # of two equally long runs, the first
        ("1:0:0:2:0:0:0:3", "1:0:0:2::3"),  # the longest run wins over an earlier shorter one
        ("FE80:0:0:0:0:0:0:ABCD", "fe80::abcd"),  # pieces above 0x7fff, lowercase
        ("0:0:0:0:0:0:0:0", "::"),
    ],
)
def test_ipv6_hosts(host: str, expected: str) -> None:
    assert normalize_url(f"http://[{host}]/f") == f"http://[{expected}]/f"


# ----------------------------------------------------------------------------- authority and host
# WHATWG URL standard: empty credentials vanish and an empty password loses its ":"; the userinfo
# percent-encode set covers "@" and ":"; the last "@" ends the userinfo; an empty port is no port and a
# special scheme's default one is dropped; file URLs take no port and "localhost" becomes the empty host;
# a special host is percent-decoded before the domain checks (so %25 and %00 are refused), an opaque
# (non-special) host keeps its case and percent-encodes non-ASCII.


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://@example.com/f", "http://example.com/f"),
        ("http://:@example.com/f", "http://example.com/f"),
        ("http://u:@example.com/f", "http://u@example.com/f"),
        ("http://:p@example.com/f", "http://:p@example.com/f"),
        ("http://a b:c@d@example.com/f", "http://a%20b:c%40d@example.com/f"),
        ("http://a:b:c@example.com/f", "http://a:b%3Ac@example.com/f"),  # the first ":" ends the username
        ("http://example.com:/f", "http://example.com/f"),
        ("http://example.com:65535/f", "http://example.com:65535/f"),  # the largest port
        ("ws://example.com:80/f", "ws://example.com/f"),
        ("wss://example.com:443/f", "wss://example.com/f"),
        ("ftp://example.com:21/f", "ftp://example.com/f"),
        ("ftp://example.com:80/f", "ftp://example.com:80/f"),
        ("http://[::1]:8080/f", "http://[::1]:8080/f"),
        ("http://[::1]:80/f", "http://[::1]/f"),
        ("http://ex%41mple.com/f", "http://example.com/f"),
        ("file://localhost/etc/hosts", "file:///etc/hosts"),
        ("file://LOCALHOST/etc/hosts", "file:///etc/hosts"),
        ("file:///etc/hosts", "file:///etc/hosts"),
        ("file://Server/share", "file://server/share"),
        ("foo://EXample/f", "foo://EXample/f"),
        ("foo://b\u00fccher:99/f", "foo://b%C3%BCcher:99/f"),
        ("foo://a%zz/f", "foo://a%zz/f"),
    ],
)
def test_authority(url: str, expected: str) -> None:
    assert normalize_url(url) == expected


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://[::1/f", "unterminated IPv6 address"),
        ("http://[::1]x/f", "junk after IPv6 address"),
        ("http://[::1]]/f", "junk after IPv6 address"),  # the first "]" closes the address
        ("http://[::g]/f", "invalid IPv6 address"),
        ("http://example.com:65536/f", "invalid port '65536'"),
        ("http://example.com:\u0663/f", "invalid port"),  # an Arabic-Indic digit is no port digit
        ("file://server:80/f", "file URLs take no port"),
        ("http://a%25b/f", "forbidden character in host"),
        ("http://a%00b/f", "forbidden character in host"),
        ("http://a%7Fb/f", "forbidden character in host"),
        ("foo://a<b/f", "forbidden character in host"),
        ("http://:80/f", "missing host"),
    ],
)
def test_invalid_authority_is_refused(url: str, reason: str) -> None:
    with pytest.raises(InvalidUrl, match=f"^invalid URL '{re.escape(url)}': {re.escape(reason)}"):
        normalize_url(url)


# ----------------------------------------------------------------------------- path and query
# WHATWG URL standard: "." and ".." segments, percent-encoded ones included in any case (%2e, %2E), are
# resolved, and one that ends the path leaves a trailing slash; a single-dot segment in the middle vanishes.


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://example.com/a/b/..", "http://example.com/a/"),
        ("http://example.com/a/b/.", "http://example.com/a/b/"),
        ("http://example.com/a/b/%2E%2e", "http://example.com/a/"),
        ("http://example.com/a/%2E/b", "http://example.com/a/b"),
        ("http://example.com/a/.%2E/b", "http://example.com/b"),
        ("http://example.com/../../a", "http://example.com/a"),
        ("foo://host/a/b/../c", "foo://host/a/c"),
    ],
)
def test_dot_segments(url: str, expected: str) -> None:
    assert normalize_url(url) == expected


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        # WHATWG: the C0 control percent-encode set is C0 controls and everything above "~" (DEL included);
        # the path set adds space, '"', "#", "<", ">", "?", "`", "{" and "}"; "~" itself stays.
        ("http://example.com/a\x01b\x7fc", "http://example.com/a%01b%7Fc"),
        ("http://example.com/caf\u00e9", "http://example.com/caf%C3%A9"),
        ("http://example.com/~user{x}", "http://example.com/~user%7Bx%7D"),
        # An opaque path (no "/" after the scheme) takes only the C0 control set: its space stays.
        ("mailto:a b@example.com", "mailto:a b@example.com"),
        ("mailto:\u00e9\x7f@example.com", "mailto:%C3%A9%7F@example.com"),
    ],
)
def test_percent_encoding(url: str, expected: str) -> None:
    assert normalize_url(url) == expected


@pytest.mark.parametrize(
    ("url", "rule", "expected"),
    [
        # WHATWG application/x-www-form-urlencoded parsing decodes bytes as UTF-8 without failure: an
        # invalid sequence becomes U+FFFD, serialised again as its UTF-8 bytes.
        ("https://example.com/f?a=%FF&s=1", QueryRule.FORM, "https://example.com/f?a=%EF%BF%BD"),
        ("https://example.com/f?a=%C3&s=1", QueryRule.GO_SORTED, "https://example.com/f?a=%EF%BF%BD"),
        # Go's url.Values.Encode: keys sorted, url.QueryEscape writes a space as "+" and "!" as %21.
        ("https://example.com/f?b=x y!&a=1&s=1", QueryRule.GO_SORTED, "https://example.com/f?a=1&b=x+y%21"),
    ],
)
def test_filtered_query_decoding_and_escaping(url: str, rule: QueryRule, expected: str) -> None:
    assert normalize_url(url, ["s"], rule) == expected


# ----------------------------------------------------------------------------- blob digests


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"http://registry.example.com/v2/library/ubuntu/blobs/sha256:{SHA256_HEX}", SHA256_HEX),
        (f"https://registry.example.com/v2/myorg/myrepo/blobs/sha512:{SHA512_HEX}", SHA512_HEX),
        (f"https://registry.io/v2/org/team/project/blobs/sha256:{SHA256_HEX}", SHA256_HEX),
        (f"http://localhost:5000/v2/myrepo/blobs/sha256:{SHA256_HEX}?ns=docker.io", SHA256_HEX),
    ],
)
def test_blob_digest_task_id_from_url(url: str, expected: str) -> None:
    assert task_id(url, enable_task_id_based_blob_digest=True) == expected
    assert task_id(url, tag="ignored", piece_length=1, enable_task_id_based_blob_digest=True) == expected


def test_blob_url_without_the_flag_uses_the_url() -> None:
    url = f"http://registry.example.com/v2/library/ubuntu/blobs/sha256:{SHA256_HEX}"
    assert task_id(url) == hashlib.sha256(url.encode() + b"STANDARD").hexdigest()


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/file.txt",
        f"http://registry.example.com/v2/repo/manifests/sha256:{SHA256_HEX}",
        f"http://registry.example.com/v2/blobs/sha256:{SHA256_HEX}",
        f"http://registry.example.com/blobs/sha256:{SHA256_HEX}",
    ],
)
def test_non_blob_urls_fall_back_to_the_url_with_the_flag(url: str) -> None:
    assert blob_digest_from_url(url) is None
    assert task_id(url, enable_task_id_based_blob_digest=True) == task_id(url)


@pytest.mark.parametrize(
    "url",
    [
        "http://registry.example.com/v2/library/ubuntu/blobs/sha256:abc",
        "http://registry.example.com/v2/repo/blobs/md5:8a04994a666b4e4b20a2fd9e5a44f44c",
        "http://registry.example.com/v2/repo/blobs/invalid-digest",
        f"http://registry.example.com/v2/repo/blobs/sha256:{SHA256_HEX.upper()}",
        "http://registry.example.com/v2/repo/blobs/sha256:../../etc/passwd",
    ],
)
def test_blob_url_with_a_bad_digest_is_refused(url: str) -> None:
    with pytest.raises(InvalidTaskId):
        task_id(url, enable_task_id_based_blob_digest=True)


def test_blob_digest_task_id() -> None:
    assert blob_digest_task_id(f"sha256:{SHA256_HEX}") == SHA256_HEX
    assert blob_digest_task_id(f"sha512:{SHA512_HEX}") == SHA512_HEX
    # And back: a blob-named task id stands for exactly one digest.
    assert task_blob_digest(SHA256_HEX) == f"sha256:{SHA256_HEX}"
    assert task_blob_digest(SHA512_HEX) == f"sha512:{SHA512_HEX}"
    with pytest.raises(InvalidTaskId):
        task_blob_digest("../etc")


@pytest.mark.parametrize(
    "digest",
    [
        SHA256_HEX,
        f"sha256:{SHA256_HEX[:-1]}",
        f"sha256:{SHA256_HEX}0",
        f"sha512:{SHA256_HEX}",
        f"sha256:{SHA256_HEX.upper()}",
        f"md5:{SHA256_HEX[:32]}",
        "sha256:",
        "sha256:../../etc/passwd",
        f"sha256:{SHA256_HEX}\n",
    ],
)
def test_blob_digest_task_id_rejects(digest: str) -> None:
    with pytest.raises(InvalidTaskId):
        blob_digest_task_id(digest)


# ----------------------------------------------------------------------------- task id validation


@pytest.mark.parametrize("value", ["0" * 64, "a" * 64, SHA256_HEX, SHA512_HEX])
def test_valid_task_ids(value: str) -> None:
    assert is_valid_task_id(value)
    assert validate_task_id(value) == value


@pytest.mark.parametrize(
    "value",
    [
        "",
        "../../etc/passwd",
        "..",
        "/",
        SHA256_HEX.upper(),
        "A" + SHA256_HEX[1:],
        SHA256_HEX[:63],
        SHA256_HEX + "0",
        SHA256_HEX + "\n",
        "\n" + SHA256_HEX,
        SHA256_HEX[:60] + "/../",
        "g" * 64,
        SHA512_HEX[:127],
        "\u0660" * 64,
        f"sha256:{SHA256_HEX}",
    ],
)
def test_invalid_task_ids(value: str) -> None:
    assert not is_valid_task_id(value)
    with pytest.raises(InvalidTaskId, match="invalid task id"):
        validate_task_id(value)


def test_invalid_task_id_is_a_value_error() -> None:
    assert issubclass(InvalidTaskId, ValueError)


# ----------------------------------------------------------------------------- host and peer ids


def test_host_id() -> None:
    assert host_id("127.0.0.1", "localhost") == "127.0.0.1-localhost"
    assert host_id("127.0.0.1", "localhost", seed=True) == "127.0.0.1-localhost-seed"


def test_peer_id_is_fresh_and_shaped() -> None:
    shape = re.compile(r"127\.0\.0\.1-localhost-[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
    first, second = peer_id("127.0.0.1", "localhost"), peer_id("127.0.0.1", "localhost")
    assert shape.fullmatch(first)
    assert shape.fullmatch(second)
    assert first != second
    assert peer_id("10.0.0.1", "seed", seed=True).endswith("-seed")


# ----------------------------------------------------------------------------- piece length


@pytest.mark.parametrize(
    ("content_length", "expected"),
    [
        (0, MIN_DEFAULT_PIECE_LENGTH),
        (1, MIN_DEFAULT_PIECE_LENGTH),
        (500 * 4 * MiB, 4 * MiB),
        (500 * 4 * MiB + 500, 8 * MiB),
        (500 * 8 * MiB, 8 * MiB),
        (500 * 16 * MiB - 1, 16 * MiB),
        (500 * 16 * MiB, 16 * MiB),
        (500 * 16 * MiB + 499, 16 * MiB),
        (500 * 16 * MiB + 500, 32 * MiB),
        (500 * 64 * MiB, MAX_DEFAULT_PIECE_LENGTH),
        (500 * 64 * MiB + 500, MAX_DEFAULT_PIECE_LENGTH),
        (10**15, MAX_DEFAULT_PIECE_LENGTH),
        (2**64 - 1, MAX_DEFAULT_PIECE_LENGTH),
    ],
)
def test_piece_length_for(content_length: int, expected: int) -> None:
    assert piece_length_for(content_length) == expected


def test_piece_length_bounds() -> None:
    assert 4 * MiB == MIN_DEFAULT_PIECE_LENGTH
    assert 64 * MiB == MAX_DEFAULT_PIECE_LENGTH
    with pytest.raises(ValueError):
        piece_length_for(-1)


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_piece_length_for_is_a_clamped_power_of_two(content_length: int) -> None:
    length = piece_length_for(content_length)
    assert MIN_DEFAULT_PIECE_LENGTH <= length <= MAX_DEFAULT_PIECE_LENGTH
    assert length & (length - 1) == 0
    assert piece_count(content_length, length) <= max(501, -(-content_length // MAX_DEFAULT_PIECE_LENGTH))


# ----------------------------------------------------------------------------- pieces


def test_zero_length_content_has_no_pieces() -> None:
    assert pieces_for(0, 4 * MiB) == []
    assert piece_count(0, 4 * MiB) == 0
    assert pieces_for(0, 4, 0, 10) == []


def test_exact_multiple() -> None:
    assert pieces_for(12, 4) == [PieceSpan(0, 0, 4), PieceSpan(1, 4, 4), PieceSpan(2, 8, 4)]
    assert piece_count(12, 4) == 3


def test_last_piece_is_shorter() -> None:
    assert pieces_for(10, 4) == [PieceSpan(0, 0, 4), PieceSpan(1, 4, 4), PieceSpan(2, 8, 2)]
    assert piece_count(10, 4) == 3
    assert pieces_for(10, 4)[-1].end == 10


def test_content_smaller_than_one_piece() -> None:
    assert pieces_for(5, 4 * MiB) == [PieceSpan(0, 0, 5)]


@pytest.mark.parametrize(
    ("start", "length", "numbers"),
    [
        (0, 10, [0, 1, 2]),
        (0, 4, [0]),
        (0, 5, [0, 1]),
        (3, 2, [0, 1]),
        (4, 4, [1]),
        (4, 5, [1, 2]),
        (7, 1, [1]),
        (8, 100, [2]),
        (9, None, [2]),
        (None, 3, [0]),
        (5, 0, []),
        (10, 5, []),
        (50, 5, []),
    ],
)
def test_range_selects_overlapping_pieces(start: int | None, length: int | None, numbers: list[int]) -> None:
    assert [p.number for p in pieces_for(10, 4, start, length)] == numbers


def test_range_pieces_keep_their_full_extent() -> None:
    assert pieces_for(10, 4, 5, 1) == [PieceSpan(1, 4, 4)]


def test_iter_pieces_is_lazy_and_agrees() -> None:
    it = iter_pieces(10 * 2**40, 1)
    assert next(it) == PieceSpan(0, 0, 1)
    assert list(iter_pieces(10, 3, 2, 5)) == pieces_for(10, 3, 2, 5)


@pytest.mark.parametrize(
    ("content_length", "piece_length", "start", "length"),
    [(-1, 4, None, None), (10, 0, None, None), (10, -4, None, None), (10, 4, -1, 2), (10, 4, 0, -1)],
)
def test_bad_piece_arguments(content_length: int, piece_length: int, start: int | None, length: int | None) -> None:
    with pytest.raises(ValueError):
        pieces_for(content_length, piece_length, start, length)


@given(st.integers(min_value=0, max_value=10_000), st.integers(min_value=1, max_value=1_000))
def test_pieces_tile_the_content_exactly(content_length: int, piece_length: int) -> None:
    pieces = pieces_for(content_length, piece_length)
    assert len(pieces) == piece_count(content_length, piece_length)
    position = 0
    for expected_number, piece in enumerate(pieces):
        assert piece.number == expected_number
        assert piece.offset == position == piece.number * piece_length
        assert 0 < piece.length <= piece_length
        position = piece.end
    assert position == content_length
    assert all(p.length == piece_length for p in pieces[:-1])


@given(
    st.integers(min_value=0, max_value=10_000),
    st.integers(min_value=1, max_value=1_000),
    st.integers(min_value=0, max_value=12_000),
    st.integers(min_value=0, max_value=12_000),
)
def test_range_pieces_cover_the_range(content_length: int, piece_length: int, start: int, length: int) -> None:
    selected = pieces_for(content_length, piece_length, start, length)
    end = min(content_length, start + length)
    if start >= end:
        assert selected == []
        return
    assert selected[0].offset <= start
    assert selected[-1].end >= end
    for before, after in itertools.pairwise(selected):
        assert after.number == before.number + 1
        assert after.offset == before.end
    for piece in selected:
        assert piece.offset < end and piece.end > start
    everything = pieces_for(content_length, piece_length)
    overlapping = [p for p in everything if p.offset < end and p.end > start]
    assert selected == overlapping


# ----------------------------------------------------------------------------- piece digests


def test_piece_digest_vector() -> None:
    assert piece_digest(b"hello") == "crc32:907060870"
    assert piece_digest(b"") == "crc32:0"


def test_crc32_streaming_matches_one_shot() -> None:
    crc = 0
    for chunk in (b"he", b"", b"l", b"lo"):
        crc = crc32_update(crc, chunk)
    assert format_crc32(crc) == piece_digest(b"hello") == "crc32:907060870"
    assert crc32_update(0, memoryview(b"hello")) == 907060870


@given(st.binary(max_size=70_000), st.integers(min_value=0, max_value=70_000))
def test_crc32_is_zlibs_crc32_whole_and_in_two_parts(data: bytes, cut: int) -> None:
    """The daemon's CRC (zlib-ng) gives the values of the standard library's zlib, the CRC-32/IEEE upstream uses."""
    view = memoryview(data)
    assert crc32_update(0, data) == zlib.crc32(data)
    assert crc32_update(crc32_update(0, view[:cut]), view[cut:]) == zlib.crc32(data)


def test_format_crc32_range() -> None:
    assert format_crc32(0xFFFFFFFF) == "crc32:4294967295"
    with pytest.raises(ValueError):
        format_crc32(-1)
    with pytest.raises(ValueError):
        format_crc32(2**32)


def test_parse_crc32_digest() -> None:
    assert parse_crc32_digest("crc32:907060870") == 907060870
    assert parse_crc32_digest("crc32:0") == 0
    assert parse_crc32_digest("crc32:4294967295") == 2**32 - 1


@pytest.mark.parametrize(
    "value",
    [
        "",
        "crc32:",
        "crc32:-1",
        "crc32:+1",
        "crc32: 1",
        "crc32:1 ",
        "crc32:1_000",
        "crc32:0x10",
        "crc32:0907060870",
        "crc32:4294967296",
        "crc32:99999999999",
        "CRC32:1",
        "sha256:1",
        "907060870",
        "crc32:\u0661\u0662",
    ],
)
def test_parse_crc32_digest_rejects(value: str) -> None:
    with pytest.raises(ValueError, match="invalid crc32 digest"):
        parse_crc32_digest(value)


def test_piece_metadata_digest_vector() -> None:
    assert piece_metadata_digest(0, 0, 5, "crc32:907060870") == "crc32:3635890345"


def test_piece_metadata_digest_layout() -> None:
    raw = (7).to_bytes(4, "big") + (123).to_bytes(8, "big") + (45).to_bytes(8, "big") + b"crc32:1"
    assert piece_metadata_digest(7, 123, 45, "crc32:1") == f"crc32:{zlib.crc32(raw)}"


@pytest.mark.parametrize(("number", "offset", "length"), [(-1, 0, 1), (2**32, 0, 1), (0, 2**64, 1), (0, 0, -1)])
def test_piece_metadata_digest_ranges(number: int, offset: int, length: int) -> None:
    with pytest.raises(ValueError):
        piece_metadata_digest(number, offset, length, "crc32:0")


# ----------------------------------------------------------------------------- file digests


def test_parse_file_digest() -> None:
    assert parse_file_digest("crc32:907060870") == ("crc32", "907060870")
    assert parse_file_digest(f"sha256:{SHA256_HEX}") == ("sha256", SHA256_HEX)
    assert parse_file_digest(f"sha256:{SHA256_HEX.upper()}") == ("sha256", SHA256_HEX)
    assert parse_file_digest(f"sha512:{SHA512_HEX}") == ("sha512", SHA512_HEX)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "sha256",
        "sha256:",
        f"sha256:{SHA256_HEX[:-1]}",
        f"sha256:{SHA512_HEX}",
        f"sha512:{SHA256_HEX}",
        f"md5:{SHA256_HEX[:32]}",
        f"SHA256:{SHA256_HEX}",
        f"sha256:{'g' * 64}",
        f" sha256:{SHA256_HEX}",
        "crc32:abc",
    ],
)
def test_parse_file_digest_rejects(value: str) -> None:
    with pytest.raises(ValueError, match="invalid"):
        parse_file_digest(value)


@pytest.mark.parametrize(
    ("algorithm", "expected"),
    [
        ("crc32", str(zlib.crc32(b"hello world"))),
        ("sha256", hashlib.sha256(b"hello world").hexdigest()),
        ("sha512", hashlib.sha512(b"hello world").hexdigest()),
    ],
)
def test_file_digester_incremental(algorithm: str, expected: str) -> None:
    digester = FileDigester(f"{algorithm}:{expected}")
    assert not digester.matches()
    for chunk in (b"hello", b" ", bytearray(b"wor"), memoryview(b"ld")):
        digester.update(chunk)
    assert digester.hexdigest() == expected
    assert digester.digest() == f"{algorithm}:{expected}"
    assert digester.matches()
    digester.verify()


def test_file_digester_accepts_uppercase_hex() -> None:
    digester = FileDigester(f"sha256:{hashlib.sha256(b'x').hexdigest().upper()}")
    digester.update(b"x")
    assert digester.matches()


def test_file_digester_mismatch() -> None:
    digester = FileDigester("crc32:907060870")
    digester.update(b"hellO")
    assert not digester.matches()
    with pytest.raises(DigestMismatch, match="expected crc32:907060870"):
        digester.verify()


def test_file_digester_rejects_bad_digest() -> None:
    with pytest.raises(ValueError):
        FileDigester("md5:abc")


U32_MAX, U64_MAX = 2**32 - 1, 2**64 - 1


@pytest.mark.parametrize(
    ("number", "offset", "length"),
    [(0, 0, 0), (U32_MAX, 0, 1), (2**31, 2**63, 2**63), (7, U64_MAX, U64_MAX)],
)
def test_piece_metadata_digest_covers_the_whole_unsigned_range(number: int, offset: int, length: int) -> None:
    """u32 and u64 fields, unsigned, big-endian, up to their maximum; length 0 is a valid (empty) piece."""
    header = number.to_bytes(4, "big") + offset.to_bytes(8, "big") + length.to_bytes(8, "big")
    expected = zlib.crc32(b"crc32:42", zlib.crc32(header))
    assert piece_metadata_digest(number, offset, length, "crc32:42") == f"crc32:{expected}"


@pytest.mark.parametrize(
    ("number", "offset", "length", "message"),
    [
        (U32_MAX + 1, 0, 0, "piece number out of u32 range: 4294967296"),
        (-1, 0, 0, "piece number out of u32 range: -1"),
        (0, U64_MAX + 1, 0, "piece offset/length out of u64 range: 18446744073709551616/0"),
        (0, 0, -1, "piece offset/length out of u64 range: 0/-1"),
    ],
)
def test_piece_metadata_digest_names_the_field_out_of_range(
    number: int, offset: int, length: int, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        piece_metadata_digest(number, offset, length, "crc32:1")


def test_crc32_errors_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match=re.escape("crc32 value out of range: 4294967296")):
        format_crc32(U32_MAX + 1)
    for bad in (None, 42, b"crc32:1"):
        with pytest.raises(ValueError, match="invalid crc32 digest"):
            parse_crc32_digest(bad)  # type: ignore[arg-type]


def test_piece_length_limits_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match=re.escape("content_length must not be negative, got -1")):
        piece_length_for(-1)
    # A piece length of 0 is hashed like any other; only a negative one is refused.
    assert task_id("http://a.test/x", piece_length=0) != task_id("http://a.test/x")
    with pytest.raises(ValueError):
        task_id("http://a.test/x", piece_length=-1)
