"""Print the wire-relevant shape of a set of generated Dragonfly v2 API modules as JSON.

Usage: ``python tests/wire_descriptors.py MODULE_PREFIX`` (e.g. ``dfdaemon.api`` or ``dragonfly_api``),
run from the repository root. The script imports ``common_pb2``, ``errordetails_pb2``,
``dfdaemon_pb2``, ``scheduler_pb2`` and ``manager_pb2`` under that prefix and prints one JSON document::

    {
      "messages": {"<full.Name>": {"<field>": {"number", "type", "label", "type_name", "oneof", "optional"}}},
      "enums": {"<full.Name>": {"<VALUE>": number}},
      "services": {"<full.Service>": {"<Method>": {"path", "input_type", "output_type",
                                                 "client_streaming", "server_streaming"}}}
    }

Nested messages and enums (map entries included) appear under their full names. A proto3
``optional`` field is reported with ``"optional": true`` and ``"oneof": null``; ``oneof`` names
only real oneofs. Only one set of modules may be loaded per process, because every set registers
the same ``common.v2.*`` symbols in protobuf's default pool: run the script once per prefix.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import TypeAlias

from google.protobuf.descriptor_pb2 import (
    DescriptorProto,
    EnumDescriptorProto,
    FieldDescriptorProto,
    FileDescriptorProto,
    ServiceDescriptorProto,
)

MODULES: tuple[str, ...] = ("common_pb2", "errordetails_pb2", "dfdaemon_pb2", "scheduler_pb2", "manager_pb2")

FieldInfo: TypeAlias = dict[str, int | str | bool | None]
MessageInfo: TypeAlias = dict[str, FieldInfo]
EnumInfo: TypeAlias = dict[str, int]
MethodInfo: TypeAlias = dict[str, str | bool]
ServiceInfo: TypeAlias = dict[str, MethodInfo]
Document: TypeAlias = dict[str, dict[str, MessageInfo] | dict[str, EnumInfo] | dict[str, ServiceInfo]]


def _qualify(scope: str, name: str) -> str:
    return f"{scope}.{name}" if scope else name


def _type_name(raw: str) -> str:
    """Fully-qualified type name without protoc's leading dot ("" for scalar fields)."""
    return raw[1:] if raw.startswith(".") else raw


def describe_field(field: FieldDescriptorProto, message: DescriptorProto) -> FieldInfo:
    optional = field.proto3_optional
    oneof: str | None = None
    if field.HasField("oneof_index") and not optional:
        oneof = message.oneof_decl[field.oneof_index].name
    return {
        "number": field.number,
        "type": FieldDescriptorProto.Type.Name(field.type),
        "label": FieldDescriptorProto.Label.Name(field.label),
        "type_name": _type_name(field.type_name),
        "oneof": oneof,
        "optional": optional,
    }


def describe_enum(enum: EnumDescriptorProto) -> EnumInfo:
    return {value.name: value.number for value in enum.value}


def collect_message(
    message: DescriptorProto,
    scope: str,
    messages: dict[str, MessageInfo],
    enums: dict[str, EnumInfo],
) -> None:
    full_name = _qualify(scope, message.name)
    messages[full_name] = {field.name: describe_field(field, message) for field in message.field}
    for enum in message.enum_type:
        enums[_qualify(full_name, enum.name)] = describe_enum(enum)
    for nested in message.nested_type:
        collect_message(nested, full_name, messages, enums)


def describe_service(service: ServiceDescriptorProto, package: str) -> tuple[str, ServiceInfo]:
    full_name = _qualify(package, service.name)
    methods: ServiceInfo = {
        method.name: {
            "path": f"/{full_name}/{method.name}",
            "input_type": _type_name(method.input_type),
            "output_type": _type_name(method.output_type),
            "client_streaming": method.client_streaming,
            "server_streaming": method.server_streaming,
        }
        for method in service.method
    }
    return full_name, methods


def describe_files(files: list[FileDescriptorProto]) -> Document:
    messages: dict[str, MessageInfo] = {}
    enums: dict[str, EnumInfo] = {}
    services: dict[str, ServiceInfo] = {}
    for file in files:
        for message in file.message_type:
            collect_message(message, file.package, messages, enums)
        for enum in file.enum_type:
            enums[_qualify(file.package, enum.name)] = describe_enum(enum)
        for service in file.service:
            name, methods = describe_service(service, file.package)
            services[name] = methods
    return {"messages": messages, "enums": enums, "services": services}


def load_files(prefix: str) -> list[FileDescriptorProto]:
    files: list[FileDescriptorProto] = []
    for name in MODULES:
        module = importlib.import_module(f"{prefix}.{name}")
        proto = FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        files.append(proto)
    return files


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} MODULE_PREFIX", file=sys.stderr)
        return 2
    # Run as a script, sys.path[0] is tests/; make the repository's own packages importable too.
    repo_root = str(Path(__file__).resolve().parent.parent)
    if repo_root not in sys.path:
        sys.path.append(repo_root)
    document = describe_files(load_files(argv[1]))
    json.dump(document, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
