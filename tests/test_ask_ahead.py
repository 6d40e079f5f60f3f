"""A fog asks for the next round's model as it sends its update; the cloud holds the request
until that round opens (``ModelRequest.wait_ms``), or says why not: not selected, not open yet,
the run is over, too many fogs waiting."""

from __future__ import annotations

import threading

import grpc
import pytest

from cloud.node import CloudNode
from cloud.service import AggregatorServicer, start_grpc_server
from fog.service import CloudClient
from kernel.config import build_config
from protos.codec import decode_tensors
from protos.control import ROUND_METADATA, Announcement


def _cfg(fogs: int = 2, fraction: float = 1.0):
    return build_config([], [("topology.fogs", fogs), ("topology.edges_per_fog", 1), ("rounds", 3),
                             ("topology.fraction", fraction), ("cloud.warm_start.per_class", 0)], use_env=False)


@pytest.fixture(scope="module")
def node_cfg():
    return _cfg()


def _in_thread(fn, *args):
    box: dict = {}

    def run():
        try:
            box["result"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, box


def test_a_request_ahead_is_answered_when_the_round_opens_with_its_announcement(node_cfg):
    node = CloudNode(node_cfg)
    th, box = _in_thread(node.serve_next, "fog-1", 1, 30.0)
    th.join(0.3)
    assert th.is_alive()  # no round open yet: held
    node.start_round()
    th.join(10)
    status, rnd, header, payload = box["result"]
    assert (status, rnd) == ("open", 1)
    assert header.announcement.encode() == node.current.announcement_json
    assert Announcement.from_json(header.announcement).round == 1
    assert bytes(payload) == bytes(node.serve_model("fog-1")[1])
    assert node.current.served["fog-1"] is not None and header.round == 1


def test_a_round_already_open_is_served_at_once_and_a_later_one_waited_for(node_cfg):
    node = CloudNode(node_cfg)
    node.start_round()
    status, rnd, header, _ = node.serve_next("fog-0", 1, 0.0)
    assert (status, rnd, header.round) == ("open", 1, 1)
    # the next round has not opened: the wait runs out
    assert node.serve_next("fog-0", 2, 0.05)[:2] == ("timeout", 1)


def test_a_fog_not_selected_is_told_which_round():
    node = CloudNode(_cfg(fogs=4, fraction=0.5))
    ann = node.start_round()
    out = next(f for f in node.fog_ids if f not in ann.selected)
    assert node.serve_next(out, 1, 5.0)[:2] == ("not_selected", 1)


def test_the_end_of_the_run_releases_every_waiting_request(node_cfg):
    node = CloudNode(node_cfg)
    waiting = [_in_thread(node.serve_next, f"fog-{i}", 1, 30.0) for i in range(2)]
    node.end_run()
    for th, box in waiting:
        th.join(10)
        assert box["result"][0] == "over"
    assert node.serve_next("fog-0", 1, 30.0)[0] == "over"


def test_a_request_whose_asker_went_away_stops_waiting(node_cfg):
    node = CloudNode(node_cfg)
    assert node.serve_next("fog-0", 1, 30.0, active=lambda: False)[0] == "gone"


# ------------------------------------------------------------------------------------ over gRPC


@pytest.fixture
def served(node_cfg):
    node = CloudNode(node_cfg)
    servicer = AggregatorServicer(node, max_waiting=1)
    server, port, _ = start_grpc_server(servicer, "127.0.0.1", 0)
    client = CloudClient(f"127.0.0.1:{port}")
    client.wait_ready(10)
    yield node, client, servicer
    node.end_run()
    client.close()
    server.stop(0).wait(5)


def test_over_grpc_the_model_and_announcement_arrive_when_the_round_opens(served):
    node, client, _ = served
    th, box = _in_thread(client.download, "fog-0", 1, 20.0)
    th.join(0.3)
    assert th.is_alive()
    node.start_round()
    th.join(20)
    header, payload = box["result"]
    assert Announcement.from_json(header.announcement).round == header.round == 1
    assert decode_tensors(payload).keys() == node.params.keys()
    # a plain request (no wait) carries no announcement, as before
    assert client.download("fog-1", 1)[0].announcement == ""


def _refusal(client: CloudClient, fog_id: str, round_: int, wait_s: float) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        client.download(fog_id, round_, wait_s=wait_s)
    return info.value


def test_over_grpc_the_refusals_say_why_and_which_round(served):
    node, client, servicer = served
    exc = _refusal(client, "fog-0", 1, 0.05)
    assert exc.code() == grpc.StatusCode.ABORTED and "ask again" in exc.details()
    # one request may wait (max_waiting=1): a second one is refused at once
    other = CloudClient(client.address)
    th, box = _in_thread(other.download, "fog-1", 1, 20.0)
    try:
        pause = threading.Event()
        for _ in range(500):  # until the cloud holds the first request
            if servicer.waiting:
                break
            pause.wait(0.02)
        assert servicer.waiting == 1
        exc = _refusal(client, "fog-0", 1, 5.0)
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        node.start_round()
        th.join(20)
        assert box["result"][0].round == 1
    finally:
        other.close()
    node.end_run()
    exc = _refusal(client, "fog-0", 2, 5.0)
    assert exc.code() == grpc.StatusCode.OUT_OF_RANGE
    assert dict(exc.trailing_metadata())[ROUND_METADATA] == "1"


def test_over_grpc_a_fog_left_out_learns_the_round_from_the_metadata():
    node = CloudNode(_cfg(fogs=4, fraction=0.5))
    server, port, _ = start_grpc_server(AggregatorServicer(node), "127.0.0.1", 0)
    client = CloudClient(f"127.0.0.1:{port}")
    try:
        ann = node.start_round()
        out = next(f for f in node.fog_ids if f not in ann.selected)
        exc = _refusal(client, out, 1, 5.0)
        assert exc.code() == grpc.StatusCode.NOT_FOUND and out in exc.details()
        assert dict(exc.trailing_metadata())[ROUND_METADATA] == "1"
    finally:
        node.end_run()
        client.close()
        server.stop(0).wait(5)


def test_announcements_do_not_pile_up_while_a_fog_asks_ahead(tmp_path):
    """The fog keeps only the newest announcement it has not looked at: while its models come
    ahead, the announcements of those rounds are superseded instead of queued."""
    from fog.node import FogNode
    from fog.service import FogService

    cfg = _cfg()
    svc = FogService(cfg, FogNode(cfg, "fog-0", state_dir=tmp_path / "fog"), "127.0.0.1:1")
    try:
        for rnd in (1, 2, 3):
            ann = Announcement(run_id=cfg.run_id, round=rnd, model_version=rnd - 1, selected=["fog-0", "fog-1"],
                               deadline_s=5, min_updates=2, acquisition=cfg.acquisition, train=cfg.train,
                               issued_at=0.0)
            svc._on_round("rounds", ann.to_json())
        assert svc.announcements.qsize() == 1
        assert svc.announcements.get_nowait().round == 3
    finally:
        svc.close()
