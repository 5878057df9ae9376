"""The fault double of harness/fault_double.py, speaking Centrifugo's gRPC server API instead of
HTTP: a grpcio server with the `Batch` RPC of `centrifugal.centrifugo.api.CentrifugoApi`, from the
same vendored api.proto the extension is built from (compiled here by grpcio-tools).

Tests script it exactly as the HTTP double: `script(request)` sees the request as the HTTP API's
JSON (`request["body"]["commands"]`, raw JSON fields such as `data` decoded) and returns the same
actions. Over gRPC they mean:

    ("forward",)                  the Batch call goes to the upstream Centrifugo's gRPC API
    ("reply", 200, body_bytes)    a BatchResponse made from the HTTP reply JSON
    ("reply", status, _)          the gRPC status that means that HTTP status (500 INTERNAL,
                                  401 UNAUTHENTICATED, 503 UNAVAILABLE, ...)
    ("rewrite", fn)               forward, then answer fn(upstream reply as JSON)
    ("delay", seconds, then)      wait, then do `then`
    ("hold", seconds)             forward at once, hold the answer back
    ("reset",)                    UNAVAILABLE without running anything (grpcio cannot cut the
                                  connection from a handler; the client retries either way)
    ("forward_then_reset",)       forward, then UNAVAILABLE instead of the answer"""

import base64
import json
import os
import sys
import tempfile
import time
from concurrent import futures

import grpc
from google.protobuf import json_format

from .fault_double import RecordingDouble

PROTO_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "crates", "outbox_core", "proto")
BATCH = "/centrifugal.centrifugo.api.CentrifugoApi/Batch"
# Request fields that carry raw JSON (bytes over gRPC, JSON values over HTTP).
RAW_FIELDS = {"publish": ("data",), "broadcast": ("data",), "subscribe": ("info", "data"), "refresh": ("info",)}
HTTP_TO_GRPC = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
                413: grpc.StatusCode.RESOURCE_EXHAUSTED, 500: grpc.StatusCode.INTERNAL,
                502: grpc.StatusCode.UNAVAILABLE, 503: grpc.StatusCode.UNAVAILABLE}

_api = None


def api_pb2():
    """The message classes of api.proto, compiled once per process."""
    global _api
    if _api is None:
        from grpc_tools import protoc
        out = tempfile.mkdtemp(prefix="centrifugo_api_pb2_")
        proto = os.path.join(PROTO_DIR, "centrifugo", "api.proto")
        if protoc.main(["protoc", f"-I{PROTO_DIR}", f"--python_out={out}", proto]) != 0:
            raise RuntimeError(f"grpc_tools.protoc could not compile {proto}")
        sys.path.insert(0, out)
        from centrifugo import api_pb2 as module
        _api = module
    return _api


def as_http_json(request_message):
    """A BatchRequest as the HTTP API's JSON body, raw JSON fields decoded."""
    body = json_format.MessageToDict(request_message, preserving_proto_field_name=True)
    for command in body.get("commands", []):
        for method, payload in command.items():
            for field in RAW_FIELDS.get(method, ()):
                if field in payload:
                    payload[field] = json.loads(base64.b64decode(payload[field]))
    return body


class GrpcFaultDouble(RecordingDouble):
    def __init__(self, upstream_grpc_url=None, api_key=None):
        super().__init__(upstream_grpc_url, api_key)
        api = api_pb2()
        self._upstream_call = None
        if upstream_grpc_url:
            channel = grpc.insecure_channel(upstream_grpc_url.removeprefix("grpc://"))
            self._upstream_call = channel.unary_unary(BATCH, request_serializer=api.BatchRequest.SerializeToString,
                                                      response_deserializer=api.BatchResponse.FromString)
        handler = grpc.method_handlers_generic_handler("centrifugal.centrifugo.api.CentrifugoApi", {
            "Batch": grpc.unary_unary_rpc_method_handler(self._batch, request_deserializer=api.BatchRequest.FromString,
                                                         response_serializer=api.BatchResponse.SerializeToString)})
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        self.server.add_generic_rpc_handlers((handler,))
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")

    @property
    def api_url(self):
        return f"grpc://127.0.0.1:{self.port}"

    def start(self):
        self.server.start()
        return self

    def stop(self):
        self.server.stop(grace=0)

    def _batch(self, message, context):
        metadata = dict(context.invocation_metadata())
        key = metadata.get("authorization", "").removeprefix("apikey ")
        request = {"path": "/api/batch", "body": as_http_json(message), "raw": message.SerializeToString(),
                   "key": key, "at": time.time(), "message": message}
        return self.handle(request, lambda action: self._act(context, action, request))

    def _forward(self, request):
        return self._upstream_call(request["message"], metadata=(("authorization", f"apikey {request['key']}"),),
                                   timeout=10)

    def _act(self, context, action, request):
        api = api_pb2()
        kind = action[0]
        if kind == "delay":
            time.sleep(action[1])
            return self._act(context, action[2], request)
        if kind == "forward":
            return self._forward(request)
        if kind == "hold":
            response = self._forward(request)
            time.sleep(action[1])
            return response
        if kind == "rewrite":
            reply = json_format.MessageToDict(self._forward(request), preserving_proto_field_name=True)
            return json_format.ParseDict(action[1](reply), api.BatchResponse(), ignore_unknown_fields=True)
        if kind == "observe":
            response = self._forward(request)
            action[1](request, 200, json_format.MessageToJson(response, preserving_proto_field_name=True).encode())
            return response
        if kind == "forward_then_reset":
            self._forward(request)
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset by the double")
        if kind == "reset":
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset by the double")
        if kind == "reply":
            status, body = action[1], action[2]
            if status == 200:
                return json_format.Parse(body, api.BatchResponse(), ignore_unknown_fields=True)
            code = HTTP_TO_GRPC.get(status, grpc.StatusCode.UNKNOWN)
            detail = "grpc: received message larger than max" if status == 413 else f"as HTTP {status}"
            context.abort(code, detail)
        raise ValueError(action)
