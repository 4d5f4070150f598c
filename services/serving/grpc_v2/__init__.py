"""Protobuf messages of the endpoint's gRPC services: the Open Inference Protocol (predict_v2.proto)
and gRPC health checking (health_v1.proto). The *_pb2 modules are generated and committed, so that
the endpoint needs only grpcio and protobuf at run time. After changing a .proto, from the root:

    pip install "grpcio-tools==1.80.1"   # a throwaway environment: its protoc writes protobuf 6.31 code
    python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. services/serving/grpc_v2/*.proto

The generated code asks for a protobuf runtime at least as new as its protoc (6.31.1: the lower
bound in pyproject.toml). Both .proto files say why their package is cairn's own.
"""
