"""Generated Python stubs of the qwenjax gRPC API (source: proto/qwenjax/v1/inference.proto).

    from qwenjax_proto.v1 import inference_pb2, inference_pb2_grpc

Do not edit the generated files; change the .proto and run ``python -m qwenjax_proto.regenerate``
(tests/test_server.py fails when the committed stubs drift from the .proto).
"""
