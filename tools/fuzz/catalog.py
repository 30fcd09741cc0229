"""Every RPC of the contract, found by walking the generated modules' service descriptors.

Nothing here names an RPC: a method added to a ``.proto`` (and regenerated) is fuzzed on the
next run without touching the fuzzer.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from functools import cache
from types import ModuleType
from typing import cast

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message

import shared.gen.automation.v1 as _package

PACKAGE = "automation.v1"


@dataclass(frozen=True, slots=True)
class Method:
    """One RPC: where to call it and what it takes and gives."""

    service: str
    """Short service name, e.g. ``EventService``."""
    name: str
    path: str
    """The HTTP/2 path, ``/automation.v1.EventService/CreateEvent``."""
    request: type[Message]
    response: type[Message]
    client_streaming: bool
    server_streaming: bool

    @property
    def descriptor(self) -> Descriptor:
        """The request's descriptor."""
        return cast(Descriptor, self.request.DESCRIPTOR)

    @property
    def short(self) -> str:
        """``EventService/CreateEvent``: how the summary names it."""
        return f"{self.service}/{self.name}"

    @property
    def kind(self) -> str:
        return {
            (False, False): "unary_unary",
            (False, True): "unary_stream",
            (True, False): "stream_unary",
            (True, True): "stream_stream",
        }[(self.client_streaming, self.server_streaming)]


def message_class(descriptor: Descriptor) -> type[Message]:
    return message_factory.GetMessageClass(descriptor)


@cache
def modules() -> tuple[ModuleType, ...]:
    """Every ``*_pb2`` module of the package, imported."""
    names = sorted(m.name for m in pkgutil.iter_modules(_package.__path__) if m.name.endswith("_pb2"))
    return tuple(importlib.import_module(f"{_package.__name__}.{n}") for n in names)


def _method(service: str, md: MethodDescriptor) -> Method:
    return Method(
        service=service,
        name=md.name,
        path=f"/{md.containing_service.full_name}/{md.name}",
        request=message_class(md.input_type),
        response=message_class(md.output_type),
        client_streaming=md.client_streaming,
        server_streaming=md.server_streaming,
    )


@cache
def methods() -> tuple[Method, ...]:
    """Every method of every service of the package, in a stable order."""
    out: list[Method] = []
    for module in modules():
        for service in module.DESCRIPTOR.services_by_name.values():
            out.extend(_method(service.name, md) for md in service.methods)
    return tuple(sorted(out, key=lambda m: m.path))


def by_path(path: str) -> Method:
    for m in methods():
        if m.path == path:
            return m
    raise KeyError(f"no method {path} in {PACKAGE}")


def find(name: str) -> Method:
    """A method by its bare name (``CreateEvent``); for setup steps and tests."""
    for m in methods():
        if m.name == name:
            return m
    raise KeyError(f"no method named {name} in {PACKAGE}")


def message_type(fd: FieldDescriptor) -> Descriptor:
    """The message type of a message field (typed stubs allow None for other fields)."""
    d = fd.message_type
    assert d is not None, f"{fd.full_name} is not a message field"
    return d


def enum_type(fd: FieldDescriptor) -> EnumDescriptor:
    d = fd.enum_type
    assert d is not None, f"{fd.full_name} is not an enum field"
    return d


def is_map(fd: FieldDescriptor) -> bool:
    return fd.type == FieldDescriptor.TYPE_MESSAGE and message_type(fd).GetOptions().map_entry
