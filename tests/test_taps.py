"""The curious cloud (observer hook) and the network tap (transparent gRPC proxy) record the same
update, byte for byte; the fog notices nothing."""

from __future__ import annotations

import numpy as np
import pytest

from attacks.taps import CaptureRecorder, start_tap
from cloud.node import CloudNode
from cloud.service import AggregatorServicer, start_grpc_server
from fog.service import CloudClient
from fog.trainer import local_update
from kernel.config import build_config
from protos import fogfl_pb2 as pb
from protos.capture import CaptureError, read_capture
from protos.codec import decode_tensors, encode_tensors


@pytest.fixture
def cloud_and_tap(tmp_path):
    cfg = build_config([], [("topology.fogs", 2), ("rounds", 3), ("cloud.warm_start.per_class", 2),
                            ("cloud.warm_start.epochs", 2)], use_env=False)
    curious = CaptureRecorder(tmp_path / "curious", source="curious-cloud")
    node = CloudNode(cfg, observers=[curious])
    server, port, _ = start_grpc_server(AggregatorServicer(node), "127.0.0.1", 0)
    tap_server, tap_port, proxy = start_tap(("127.0.0.1", 0), ("127.0.0.1", port), tmp_path / "tap")
    yield cfg, node, port, tap_port, curious, proxy
    tap_server.stop(0)
    server.stop(0)


def _fog_round(client: CloudClient, node: CloudNode, fog_id: str, kind: str = "delta") -> pb.UploadAck:
    header, payload = client.download(fog_id, node.round_no)
    params = decode_tensors(payload)
    x, y = node.ds.x[:12], node.ds.y[:12]
    ann = node.current.announcement
    res = local_update(node.spec, params, x, y, ann.train, seed=1)
    up = encode_tensors(res.update)
    h = pb.UpdateHeader(fog_id=fog_id, round=node.round_no, base_version=header.version, num_samples=res.num_samples,
                        update_kind=ann.train.update_kind, hparams=res.hparams, total_bytes=len(up), labels_total=12)
    return client.upload(h, up)


def test_curious_cloud_and_network_tap_agree_byte_for_byte(cloud_and_tap):
    cfg, node, port, tap_port, curious, proxy = cloud_and_tap
    via_tap = CloudClient(f"127.0.0.1:{tap_port}")
    direct = CloudClient(f"127.0.0.1:{port}")
    node.start_round()
    assert _fog_round(via_tap, node, "fog-0").accepted  # the fog behind the tap notices nothing
    assert _fog_round(direct, node, "fog-1").accepted
    node.finish_round()
    assert len(proxy.paths) == 1 and len(curious.paths) == 2
    tapped = read_capture(proxy.paths[0])
    seen = read_capture(next(p for p in curious.paths if p.name == proxy.paths[0].name))
    assert tapped.message.source == "tap" and seen.message.source == "curious-cloud"
    assert tapped.message.update_payload == seen.message.update_payload
    assert tapped.message.served_payload == seen.message.served_payload
    assert tapped.message.header.SerializeToString() == seen.message.header.SerializeToString()
    assert tapped.message.update_sha256 == seen.message.update_sha256
    assert tapped.arch == seen.arch
    for k in tapped.update:
        np.testing.assert_array_equal(tapped.update[k], seen.update[k])
    via_tap.close()
    direct.close()


def test_tap_forwards_rejections_unchanged(cloud_and_tap):
    cfg, node, port, tap_port, curious, proxy = cloud_and_tap
    client = CloudClient(f"127.0.0.1:{tap_port}")
    node.start_round()
    assert _fog_round(client, node, "fog-0").accepted
    again = _fog_round(client, node, "fog-0")  # a duplicate: the cloud says no, through the tap
    assert not again.accepted and "already sent" in again.reason
    node.finish_round()
    client.close()


def test_truncated_capture_is_a_one_line_error(cloud_and_tap, tmp_path):
    cfg, node, port, tap_port, curious, proxy = cloud_and_tap
    client = CloudClient(f"127.0.0.1:{port}")
    node.start_round()
    _fog_round(client, node, "fog-0")
    data = curious.paths[0].read_bytes()
    bad = tmp_path / "cut.fcap"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CaptureError) as e:
        read_capture(bad)
    assert "truncated" in str(e.value) and "\n" not in str(e.value)
    client.close()


def test_tap_forwards_a_request_held_for_the_next_round_and_its_refusals(cloud_and_tap):
    import threading

    import grpc

    from protos.control import ROUND_METADATA, Announcement

    cfg, node, port, tap_port, curious, proxy = cloud_and_tap
    client = CloudClient(f"127.0.0.1:{tap_port}")
    got: dict = {}
    th = threading.Thread(target=lambda: got.update(reply=client.download("fog-0", 1, wait_s=20.0)), daemon=True)
    th.start()
    th.join(0.3)
    assert th.is_alive()  # held, through the tap, until the round opens
    node.start_round()
    th.join(20)
    header, _ = got["reply"]
    assert Announcement.from_json(header.announcement).round == 1
    node.end_run()
    with pytest.raises(grpc.RpcError) as info:
        client.download("fog-0", 2, wait_s=5.0)
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert dict(info.value.trailing_metadata())[ROUND_METADATA] == "1"
    client.close()
