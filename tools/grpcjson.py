"""A grpcurl stand-in that needs no .proto files: ``python -m tools.grpcjson``.

grpcurl is the tool of choice (see the README); it is not packaged for Debian, PyPI or npm,
so this gives the same everyday commands through server reflection, with the same argument
order, so that README commands can be pasted with ``grpcurl`` replaced:

    python -m tools.grpcjson -plaintext localhost:50051 list
    python -m tools.grpcjson -plaintext localhost:50051 describe automation.v1.EventService
    python -m tools.grpcjson -plaintext -d '{"id": 1}' localhost:50051 automation.v1.EventService/GetEvent

Output is protobuf JSON (camelCase names, unset optional fields omitted), as grpcurl prints it.
On failure it prints the code, message and rich error details, and exits 64 + the gRPC code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from google.protobuf import descriptor, descriptor_pool, json_format, message_factory
from google.rpc import error_details_pb2, status_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

_DETAIL_TYPES = {
    error_details_pb2.ErrorInfo.DESCRIPTOR.full_name: error_details_pb2.ErrorInfo,
    error_details_pb2.BadRequest.DESCRIPTOR.full_name: error_details_pb2.BadRequest,
}


def _describe_service(svc: descriptor.ServiceDescriptor) -> str:
    lines = [f"{svc.full_name} is a service:", f"service {svc.name} {{"]
    for m in svc.methods:
        stream = "stream " if m.server_streaming else ""
        lines.append(f"  rpc {m.name} ( .{m.input_type.full_name} ) returns ( {stream}.{m.output_type.full_name} );")
    lines.append("}")
    return "\n".join(lines)


def _describe_message(msg: descriptor.Descriptor) -> str:
    lines = [f"{msg.full_name} is a message:", f"message {msg.name} {{"]
    for f in msg.fields:
        kind = f.message_type.full_name if f.message_type else (f.enum_type.full_name if f.enum_type else f.type)
        label = "repeated " if f.is_repeated else ""
        lines.append(f"  {label}{kind} {f.name} = {f.number};")
    lines.append("}")
    return "\n".join(lines)


def _print_error(exc: grpc.RpcError, out: Callable[[str], None]) -> int:
    call: Any = exc  # a failed call is also a grpc.Call: code(), details(), trailing_metadata()
    code: grpc.StatusCode = call.code()
    out(f"ERROR:\n  Code: {code.name}\n  Message: {call.details()}")
    for key, value in call.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        details = []
        for any_detail in status.details:
            cls = _DETAIL_TYPES.get(any_detail.TypeName())
            if cls is not None:
                detail = cls()
                any_detail.Unpack(detail)
                details.append({"@type": any_detail.type_url, **json_format.MessageToDict(detail)})
        if details:
            out("  Details:\n" + json.dumps(details, indent=2))
    return 64 + int(code.value[0])


def run(argv: Sequence[str], out: Callable[[str], None] = print) -> int:
    """Runs one command; returns the exit status (0, or 64 + the gRPC code on failure)."""
    parser = argparse.ArgumentParser(prog="python -m tools.grpcjson", description=__doc__.splitlines()[0])
    parser.add_argument("-plaintext", action="store_true", help="no TLS (the only mode supported)")
    parser.add_argument("-d", dest="data", default="{}", help="the request as JSON")
    parser.add_argument("-max-msgs", dest="max_msgs", type=int, default=0, help="stop a stream after N messages")
    parser.add_argument("target")
    parser.add_argument("command", nargs="*", help="list | describe SYMBOL | SERVICE/METHOD")
    ns = parser.parse_args(argv)
    with grpc.insecure_channel(ns.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(db)
        try:
            if not ns.command or ns.command[0] == "list":
                for name in sorted(db.get_services()):
                    out(name)
                return 0
            if ns.command[0] == "describe":
                symbol = ns.command[1]
                try:
                    out(_describe_service(pool.FindServiceByName(symbol)))
                except KeyError:
                    out(_describe_message(pool.FindMessageTypeByName(symbol)))
                return 0
            service_name, _, method_name = ns.command[0].replace("/", ".").rpartition(".")
            method = pool.FindServiceByName(service_name).FindMethodByName(method_name)
            request_cls: Any = message_factory.GetMessageClass(method.input_type)
            response_cls: Any = message_factory.GetMessageClass(method.output_type)
            request = json_format.Parse(ns.data, request_cls())
            path = f"/{service_name}/{method_name}"

            def show(message: Any) -> None:
                out(json_format.MessageToJson(message, indent=2))

            if method.server_streaming:
                stream = channel.unary_stream(
                    path,
                    request_serializer=request_cls.SerializeToString,
                    response_deserializer=response_cls.FromString,
                )
                for n, message in enumerate(stream(request), start=1):
                    show(message)
                    if ns.max_msgs and n >= ns.max_msgs:
                        break
            else:
                unary = channel.unary_unary(
                    path,
                    request_serializer=request_cls.SerializeToString,
                    response_deserializer=response_cls.FromString,
                )
                show(unary(request, timeout=30))
            return 0
        except grpc.RpcError as exc:
            return _print_error(exc, out)
        except (KeyError, json_format.ParseError) as exc:
            out(f"Error: {exc}")
            return 1


def main() -> int:
    return run(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
