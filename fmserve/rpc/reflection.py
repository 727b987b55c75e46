"""Server reflection under both names that generic clients speak: `grpc.reflection.v1alpha`
(grpcio-reflection's servicer) and `grpc.reflection.v1`.

v1 is v1alpha renamed: the same messages with the same field numbers, so the bytes on the wire
are identical and one servicer answers both. grpcio-reflection ships only v1alpha; the v1 file
descriptor is derived from it (package renamed) and added to the descriptor pool, so a client
that asks reflection to describe v1 itself gets an answer too.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

V1ALPHA_SERVICE = reflection.SERVICE_NAME
V1_PACKAGE = "grpc.reflection.v1"
V1_SERVICE = f"{V1_PACKAGE}.ServerReflection"
V1_FILE = "grpc/reflection/v1/reflection.proto"


def enable(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection (both versions) for `service_names` and the reflection services."""
    _register_v1_descriptor()
    names = [*service_names, V1ALPHA_SERVICE, V1_SERVICE]
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE, {"ServerReflectionInfo": v1}),)
    )


def _register_v1_descriptor() -> None:
    pool = descriptor_pool.Default()
    try:
        pool.FindFileByName(V1_FILE)
        return  # another service in this process registered it already
    except KeyError:
        pass
    pool.Add(_v1_file())


def _v1_file() -> descriptor_pb2.FileDescriptorProto:
    """v1alpha's file descriptor with its package (and the type names that carry it) renamed."""
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    old = f".{file.package}."
    file.name, file.package = V1_FILE, V1_PACKAGE
    for message in file.message_type:
        for field in message.field:
            if field.type_name:  # scalars have none, and setting "" would mark one
                field.type_name = field.type_name.replace(old, f".{V1_PACKAGE}.")
    for method in file.service[0].method:
        method.input_type = method.input_type.replace(old, f".{V1_PACKAGE}.")
        method.output_type = method.output_type.replace(old, f".{V1_PACKAGE}.")
    return file
