"""The fog's model for its edges: the ONNX of exactly the parameters the cloud served (the same
bytes as a torch export, so the same predictions on the edge as torch at the fog), for every
version, and a one-line WireError for a model the cloud sent that cannot be built."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cloud.node import CloudNode
from edge.classifier import OnnxClassifier
from fog.node import FogNode
from kernel.config import build_config
from kernel.models import build_model, export_onnx, set_params
from protos import fogfl_pb2 as pb
from protos.codec import decode_tensors, encode_tensors, sha256_hex
from protos.errors import WireError


@pytest.fixture(scope="module")
def cfg():
    return build_config([], [("topology.fogs", 1), ("topology.edges_per_fog", 2), ("rounds", 2),
                             ("cloud.warm_start.per_class", 2), ("cloud.warm_start.epochs", 1)], use_env=False)


def edge_model(pubs) -> pb.EdgeModel:
    (pub,) = pubs
    msg = pb.EdgeModel()
    msg.ParseFromString(pub.payload)
    return msg


def test_the_edges_get_the_onnx_of_the_served_parameters_every_version(cfg):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cloud = CloudNode(cfg)
        fog = FogNode(cfg, "fog-0")
        spec = json.loads(cloud.arch_json)
        x = cloud.ds.x[:16]
        seen = set()
        for version in range(3):
            header, payload = cloud.serve_model("fog-0")
            if version:  # a new version: other weights
                params = {k: v + np.float32(0.01 * version) for k, v in decode_tensors(payload).items()}
                payload = encode_tensors(params)
                header = pb.ModelHeader(version=version, round=version, arch_json=cloud.arch_json,
                                        total_bytes=len(payload))
            msg = edge_model(fog.on_model(header, payload))
            model = build_model(spec)
            set_params(model, decode_tensors(payload))
            assert msg.version == version and msg.sha256 == sha256_hex(msg.onnx)
            assert msg.onnx == export_onnx(model, spec["in_shape"])  # what a torch export would give
            with torch.no_grad():
                want = model.eval()(torch.from_numpy(x)).numpy()
            np.testing.assert_allclose(OnnxClassifier(msg.onnx).decision_function(x), want, rtol=1e-4, atol=1e-5)
            seen.add(msg.sha256)
        assert len(seen) == 3
    finally:
        torch.set_num_threads(threads)


def test_the_model_carries_the_announcement_of_its_round_verbatim(cfg):
    cloud = CloudNode(cfg)
    fog = FogNode(cfg, "fog-0")
    header, payload = cloud.serve_model("fog-0")
    assert edge_model(fog.on_model(header, payload)).announcement == ""  # outside a round: none
    raw = cloud.start_round().to_json()
    assert fog.on_announcement(raw) is not None
    header, payload = cloud.serve_model("fog-0", 1)
    assert header.round == 1 and edge_model(fog.on_model(header, payload)).announcement == raw.decode()
    header.round = 7  # a model for another round than the one announced: not relayed with it
    assert edge_model(fog.on_model(header, payload)).announcement == ""


@pytest.mark.parametrize("change", ["unknown arch", "no in_shape", "not json", "wrong shapes"])
def test_an_unusable_model_from_the_cloud_is_a_one_line_wire_error(cfg, change):
    cloud = CloudNode(cfg)
    fog = FogNode(cfg, "fog-0")
    header, payload = cloud.serve_model("fog-0")
    spec = json.loads(cloud.arch_json)
    if change == "unknown arch":
        header.arch_json = json.dumps({**spec, "arch": "nope"})
    elif change == "no in_shape":
        header.arch_json = json.dumps({k: v for k, v in spec.items() if k != "in_shape"})
    elif change == "not json":
        header.arch_json = "{"
    else:
        payload = encode_tensors({k: v[..., :1] for k, v in decode_tensors(payload).items()})
    with pytest.raises(WireError) as err:
        fog.on_model(header, payload)
    assert "unusable" in str(err.value) and "\n" not in str(err.value)
    assert fog.served is None  # nothing half-taken
