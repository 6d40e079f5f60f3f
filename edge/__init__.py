"""The edge tier: runs the current global model as ONNX (onnxruntime), picks informative samples
from its unlabeled pool with modAL's query strategies, labels them, and sends them to its fog.

Torch-free by design (it must run on a Raspberry Pi with numpy, onnxruntime, paho-mqtt,
modAL-python, scikit-learn and protobuf): nothing under ``edge/`` imports torch, fog, cloud or
attacks. This package's ``__init__`` imports nothing so that ``import edge`` stays cheap; import
the submodules you need (``edge.node``, ``edge.service``, ...).
"""
