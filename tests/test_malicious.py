"""The malicious (MKOR) cloud is the ordinary cloud with a serve hook: its target gets
manipulated parameters and a one-gradient round config, every other fog the honest model, and the
global model is aggregated from honest updates only."""

from __future__ import annotations

import numpy as np

from attacks.base import get_attack
from attacks.malicious import make_transform
from attacks.scoring import score
from attacks.taps import CaptureRecorder
from deploy.engine import InProcessEngine
from kernel.config import build_config
from kernel.data import load_dataset, make_splits
from protos.capture import read_capture, read_truth, truth_path
from protos.codec import sha256_hex


def test_malicious_cloud_targets_one_fog_and_keeps_the_aggregate_sound(tmp_path):
    cfg = build_config([], [("topology.fogs", 3), ("topology.edges_per_fog", 2), ("rounds", 2),
                            ("acquisition.budget", 5), ("acquisition.strategy", "random")], use_env=False)
    ds = load_dataset(cfg.data)
    aux = ds.x[make_splits(cfg, ds).test]
    seen: list = []
    recorder = CaptureRecorder(tmp_path / "captures", source="malicious-cloud", only={"fog-1"})
    engine = InProcessEngine(cfg, tmp_path, capture=False, observers=[seen.append, recorder],
                             serve_transform=make_transform("mkor", "fog-1", aux_x=aux, base_train=cfg.train))
    for fog in engine.fogs.values():
        fog.truth_dir = tmp_path / "captures"
    global_before = engine.cloud._payload
    m1 = engine.run_round()
    by_fog = {o.fog_id: o for o in seen}
    assert set(by_fog) == {"fog-0", "fog-1", "fog-2"}
    for honest in ("fog-0", "fog-2"):
        assert not by_fog[honest].served_transformed
        assert sha256_hex(by_fog[honest].served_payload) == sha256_hex(global_before)  # the honest model
        assert by_fog[honest].header.update_kind == "delta"  # the announced config
    assert by_fog["fog-1"].served_transformed
    assert sha256_hex(by_fog["fog-1"].served_payload) != sha256_hex(global_before)
    assert by_fog["fog-1"].header.update_kind == "gradient"  # the target got its own round config
    assert m1.updates == 3 and engine.cloud.history[-1].model_version == 1

    # the aggregate equals FedAvg of the two honest updates alone
    from protos.codec import decode_tensors

    g0 = decode_tensors(global_before)
    ups = [(decode_tensors(by_fog[f].update_payload), by_fog[f].header.num_samples) for f in ("fog-0", "fog-2")]
    total = sum(n for _, n in ups)
    for k, v in g0.items():
        expect = v + sum(u[k] * (n / total) for u, n in ups)
        np.testing.assert_allclose(engine.cloud.params[k], expect, atol=1e-6)

    # and the captured target update gives its batch away
    cap = read_capture(recorder.paths[0])
    tx, ty = read_truth(truth_path(recorder.paths[0]))
    rec = get_attack("mkor").reconstruct(cap)
    s = score(rec.x, rec.y, tx, ty)
    assert cap.num_samples == 10 and len(tx) == 10
    assert s["recovered"] >= 5, s  # distinct-class samples come out exactly; same-class ones averaged
