"""Fog gateway: pools its edges' labelled samples, trains the global model locally with PyTorch,
applies defenses, and exchanges models and updates with the cloud over gRPC."""
