"""Upstream's ``dfdaemon.yaml`` keys, so a configuration written for the Rust dfdaemon starts this one.

The table lists every key the Rust dfdaemon 1.5 reads (``dragonfly-client-config``, ``dfdaemon.rs``). A key this
daemon also knows is validated by :mod:`dfdaemon.config`; a key only upstream knows is dropped and named in one
warning (sizes and durations still have to parse, as upstream would insist); a key neither knows is refused with
the closest known name. Upstream's older names are moved to their current ones first, as upstream does.
"""

from __future__ import annotations

import copy
import difflib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from dfdaemon.units import parse_duration, parse_size

# What a value of an upstream-only key must parse as; anything else is not inspected.
SIZE, DURATION, ANY = "size", "duration", "any"
# A mapping whose keys are the user's own (headers): its contents are never checked against a table.
FREE_MAP = "map"

UPSTREAM_VERSION = "1.5.1"

# Every key of upstream's dfdaemon configuration, dotted, with the kind of its value.
UPSTREAM_KEYS: dict[str, str] = {
    "host.idc": ANY,
    "host.location": ANY,
    "host.hostname": ANY,
    "host.ip": ANY,
    "host.schedulerClusterID": ANY,
    "server.pluginDir": ANY,
    "server.cacheDir": ANY,
    "server.adaptiveRateLimit.bucketCount": ANY,
    "server.adaptiveRateLimit.bucketInterval": DURATION,
    "server.adaptiveRateLimit.cpuThreshold": ANY,
    "server.adaptiveRateLimit.memoryThreshold": ANY,
    "server.adaptiveRateLimit.shedCooldown": DURATION,
    "server.adaptiveRateLimit.collectInterval": DURATION,
    "download.server.socketPath": ANY,
    "download.server.requestRateLimit": ANY,
    "download.server.requestBufferSize": ANY,
    "download.protocol": ANY,
    "download.bandwidthLimit": SIZE,
    "download.backToSourceBandwidthLimit": SIZE,
    "download.pieceTimeout": DURATION,
    "download.collectedPieceTimeout": DURATION,
    "download.concurrentPieceCount": ANY,
    "upload.server.ip": ANY,
    "upload.server.port": ANY,
    "upload.server.caCert": ANY,
    "upload.server.cert": ANY,
    "upload.server.key": ANY,
    "upload.server.requestRateLimit": ANY,
    "upload.server.requestBufferSize": ANY,
    "upload.client.caCert": ANY,
    "upload.client.cert": ANY,
    "upload.client.key": ANY,
    "upload.disableShared": ANY,
    "upload.bandwidthLimit": SIZE,
    "manager.addr": ANY,
    "manager.caCert": ANY,
    "manager.cert": ANY,
    "manager.key": ANY,
    "scheduler.announceInterval": DURATION,
    "scheduler.scheduleTimeout": DURATION,
    "scheduler.maxScheduleCount": ANY,
    "scheduler.caCert": ANY,
    "scheduler.cert": ANY,
    "scheduler.key": ANY,
    "seedPeer.enable": ANY,
    "seedPeer.type": ANY,
    "dynconfig.refreshInterval": DURATION,
    "storage.server.ip": ANY,
    "storage.server.tcpPort": ANY,
    "storage.server.tcpFastopen": ANY,
    "storage.server.quicPort": ANY,
    "storage.dir": ANY,
    "storage.keep": ANY,
    "storage.writePieceTimeout": DURATION,
    "storage.writeBufferSize": ANY,
    "storage.readBufferSize": ANY,
    "storage.cacheCapacity": SIZE,
    "backend.requestHeader": FREE_MAP,
    "backend.maxRetries": ANY,
    "backend.enableCacheTemporaryRedirect": ANY,
    "backend.cacheTemporaryRedirectTTL": DURATION,
    "backend.putConcurrentChunkCount": ANY,
    "backend.putChunkSize": SIZE,
    "backend.putTimeout": DURATION,
    "backend.enableHickoryDNS": ANY,
    "gc.interval": DURATION,
    "gc.policy.taskTTL": DURATION,
    "gc.policy.persistentTaskTTL": DURATION,
    "gc.policy.persistentCacheTaskTTL": DURATION,
    "gc.policy.pageCacheIdleTimeout": DURATION,
    "gc.policy.diskThreshold": SIZE,
    "gc.policy.diskHighThresholdPercent": ANY,
    "gc.policy.diskLowThresholdPercent": ANY,
    "proxy.server.ip": ANY,
    "proxy.server.port": ANY,
    "proxy.server.requestRateLimit": ANY,
    "proxy.server.caCert": ANY,
    "proxy.server.caKey": ANY,
    "proxy.server.basicAuth.username": ANY,
    "proxy.server.basicAuth.password": ANY,
    "proxy.rules": ANY,  # a list of {regex, useTLS, redirect, filteredQueryParams}
    "proxy.registryMirror.addr": ANY,
    "proxy.registryMirror.cert": ANY,
    "proxy.registryMirror.enableTaskIDBasedBlobDigest": ANY,
    "proxy.disableBackToSource": ANY,
    "proxy.prefetch": ANY,
    "proxy.prefetchBandwidthLimit": SIZE,
    "proxy.readBufferSize": ANY,
    "security.enable": ANY,
    "network.enableIPv6": ANY,
    "health.server.ip": ANY,
    "health.server.port": ANY,
    "metrics.server.ip": ANY,
    "metrics.server.port": ANY,
    "stats.server.ip": ANY,
    "stats.server.port": ANY,
    "tracing.protocol": ANY,
    "tracing.endpoint": ANY,
    "tracing.path": ANY,
    "tracing.headers": FREE_MAP,
}

# The bandwidth limits' names before client 1.2.8, which renamed them without an alias: upstream ignores them now,
# and so does this daemon (naming them in the warning) rather than act on what upstream would not.
RETIRED_KEYS: dict[str, str] = {
    "download.rateLimit": SIZE,
    "upload.rateLimit": SIZE,
    "proxy.prefetchRateLimit": SIZE,
}

# Older upstream names and the current ones they stand for: upstream reads ``dist*`` as aliases.
RENAMED_KEYS: dict[str, str] = {
    "gc.policy.distThreshold": "gc.policy.diskThreshold",
    "gc.policy.distHighThresholdPercent": "gc.policy.diskHighThresholdPercent",
    "gc.policy.distLowThresholdPercent": "gc.policy.diskLowThresholdPercent",
}

_CHECKS: dict[str, Callable[[object], object]] = {SIZE: parse_size, DURATION: parse_duration}

# A tree of keys: a name maps to its sub-tree, or to the kind of its value at a leaf.
KeyTree = dict[str, "KeyTree | str"]


class UnknownKey(ValueError):
    """A key neither upstream nor this daemon knows; the message names it and the closest known key."""


@dataclass(frozen=True)
class Reconciled:
    """The configuration this daemon validates, and the upstream keys that were dropped from it."""

    data: dict[str, Any]
    ignored: tuple[str, ...]


def _tree(keys: dict[str, str]) -> KeyTree:
    root: KeyTree = {}
    for dotted, kind in keys.items():
        *parents, leaf = dotted.split(".")
        node = root
        for part in parents:
            child = node.setdefault(part, {})
            assert isinstance(child, dict)
            node = child
        node[leaf] = kind
    return root


UPSTREAM_TREE = _tree(UPSTREAM_KEYS | RETIRED_KEYS)


def model_tree(model: type[BaseModel]) -> KeyTree:
    """The keys a pydantic model reads (by alias), nested sections as sub-trees."""
    tree: KeyTree = {}
    for name, info in model.model_fields.items():
        section = _section(info.annotation)
        tree[info.alias or name] = ANY if section is None else model_tree(section)
    return tree


def _section(annotation: object) -> type[BaseModel] | None:
    """The model a field holds: ``Model``, or ``Model | None`` (an optional section)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        annotation = models[0] if len(models) == 1 else None
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _apply_renames(data: dict[str, Any]) -> None:
    for old, new in RENAMED_KEYS.items():
        *parents, old_leaf = old.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or old_leaf not in node:
            continue
        new_leaf = new.rsplit(".", 1)[1]
        if new_leaf in node:
            raise UnknownKey(f"{old} is upstream's older name for {new}: give one of them, not both")
        node[new_leaf] = node.pop(old_leaf)


def _suggest(key: str, path: str, *trees: KeyTree | str | None) -> UnknownKey:
    known = sorted({name for tree in trees if isinstance(tree, dict) for name in tree})
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    parent = path[: len(path) - len(key)]
    hint = f"; did you mean {parent + close[0]!r}?" if close else f" (known here: {', '.join(known)})" if known else ""
    return UnknownKey(f"unknown key {path!r}{hint}")


def _check_value(kind: str | KeyTree, value: Any, path: str) -> None:
    check = _CHECKS.get(kind) if isinstance(kind, str) else None
    if check is not None and value is not None:
        try:
            check(value)
        except ValueError as exc:
            raise UnknownKey(f"{path}: {exc}") from None


def _walk(data: dict[str, Any], ours: KeyTree | None, theirs: KeyTree | str | None, prefix: str) -> Reconciled:
    """Keep what ``ours`` reads, drop what only ``theirs`` reads (naming it), refuse the rest."""
    kept: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in data.items():
        path = f"{prefix}{key}"
        mine = ours.get(key) if ours is not None else None
        upstream = theirs.get(key) if isinstance(theirs, dict) else None
        if mine is None and upstream is None:
            raise _suggest(str(key), path, ours, theirs)
        if isinstance(value, dict) and (isinstance(mine, dict) or isinstance(upstream, dict)):
            inner = _walk(value, mine if isinstance(mine, dict) else None, upstream, f"{path}.")
            if mine is None:  # a section only upstream has: named once, its keys checked all the same
                ignored.append(path)
            else:
                kept[key] = inner.data
                ignored.extend(inner.ignored)
            continue
        if mine is None:
            _check_value(upstream or ANY, value, path)
            ignored.append(path)
        elif value is not None:  # upstream's null means "the default"
            kept[key] = value
    return Reconciled(kept, tuple(ignored))


def reconcile(data: dict[str, Any], ours: type[BaseModel]) -> Reconciled:
    """Sort an upstream-style configuration into what ``ours`` validates and the upstream keys it drops."""
    data = copy.deepcopy(data)
    _apply_renames(data)
    return _walk(data, model_tree(ours), UPSTREAM_TREE, "")


def ignored_warning(ignored: tuple[str, ...]) -> str:
    """The one warning line naming the upstream keys this daemon does not act on."""
    return f"upstream dfdaemon keys this daemon does not act on (ignored): {', '.join(ignored)}"
