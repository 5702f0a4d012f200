"""Origin (back-to-source) access: the source policy, the HTTP client stack, and ranged reads of an origin."""

from dfdaemon.backend.client import OriginClient
from dfdaemon.backend.origin import Backend, OriginInfo, RetryPolicy, header_text
from dfdaemon.backend.policy import (
    SUPPORTED_SCHEMES,
    BackendError,
    PolicyResolver,
    SourceNotAllowed,
    SourcePolicy,
    UnsupportedURL,
    check_url,
    parse_url,
)

__all__ = [
    "SUPPORTED_SCHEMES",
    "Backend",
    "BackendError",
    "OriginClient",
    "OriginInfo",
    "PolicyResolver",
    "RetryPolicy",
    "SourceNotAllowed",
    "SourcePolicy",
    "UnsupportedURL",
    "check_url",
    "header_text",
    "parse_url",
]
