"""The wire contract of fogfl: protobuf messages, gRPC service, tensor codec, chunking, MQTT topic
names, JSON control messages and the capture format. Imports nothing else of the project."""

from protos import fogfl_pb2 as pb

__all__ = ["pb"]
