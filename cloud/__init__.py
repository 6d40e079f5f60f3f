"""Cloud tier: round scheduler, aggregation strategies, gRPC service, checkpoints and ONNX export."""
