"""The study harness: grid validation (one-line errors naming the key), resumable runs whose final
CSV equals an uninterrupted run's, failed cells recorded without stopping the study, tidy CSVs,
and the leakage column on a capture the analytic attack inverts exactly."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import yaml

from deploy.study import (
    TableSpec,
    add_parser,
    load_study,
    plan_study,
    render_table,
    run_study,
    splice_markdown,
)
from kernel.errors import ConfigError
from tests.helpers import ROOT, one_line_error

TINY = {
    "name": "tiny",
    "base": {"presets": ["small"], "set": {"acquisition": {"budget": 5}, "cloud.warm_start.epochs": 5}},
    "rounds": 2,
    "seeds": [0],
    "axes": {"sampling": ["random", "uncertainty"]},
    "output": {"plots": False, "report": False, "accuracy_targets": [0.5]},
}


def _grid(tmp_path, data: dict, name: str = "grid.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("patch, message", [
    ({"axes": {"samplng": ["random"]}}, "grid key 'axes.samplng' is unknown"),
    ({"leakage": {"method": ["analytic"]}}, "grid key 'leakage.method' is unknown"),
    ({"output": {"tables": [{"title": "t", "rows": ["sampling"], "metrc": "x"}]}},
     "grid key 'output.tables.0.metrc' is unknown"),
    ({"seed": [0]}, "grid key 'seed' is unknown"),
    ({"axes": {"sampling": ["random", "uncertanty"]}}, "unknown query strategy 'uncertanty'"),
    ({"axes": {"heterogeneity": {"skew": {"data.partiton": "dirichlet"}}}}, "unknown config key 'data.partiton'"),
    ({"axes": {"heterogeneity": ["dirichlet-x"]}}, "heterogeneity 'dirichlet-x'"),
    ({"base": {"set": {"train.lr": -1}}}, "config key 'train.lr'"),
    ({"leakage": {"methods": ["nosuch"]}}, "unknown attack 'nosuch'"),
    ({"output": {"reference": {"axis": "sampling", "level": "nosuch"}}}, "'output.reference.level'"),
    ({"axes": {"status": {"a": {}}}}, "grid key 'axes.status': the name is taken"),
])
def test_malformed_grid_names_the_bad_key(patch, message):
    data = {**TINY, **patch}
    with pytest.raises(ConfigError) as exc:
        plan_study(data)
    text = str(exc.value)
    assert message in text
    assert "\n" not in text


def test_malformed_grid_is_one_line_on_the_cli(tmp_path):
    bad = _grid(tmp_path, {**TINY, "axes": {"samplng": ["random", "entropy"]}})
    proc = subprocess.run([sys.executable, "-m", "deploy.study", str(bad), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    line = one_line_error(proc)
    assert "grid key 'axes.samplng' is unknown" in line
    assert not (tmp_path / "out").exists()


def test_axis_shorthands_map_onto_config_keys():
    study = plan_study({**TINY, "axes": {
        "heterogeneity": ["iid", "dirichlet-0.3", "2/2/3/3"],
        "defense": ["none", "dp-0.5+prune-0.9"],
        "topology": ["nonmassive", "20x5@0.2"],
        "train.local_epochs": [1, 3],
    }})
    assert len(study.cells) == 3 * 2 * 2 * 2
    by_id = {c.id: c for c in study.cells}
    cell = by_id["heterogeneity=dirichlet-0.3__defense=dp-0.5+prune-0.9__topology=20x5_0.2__train.local_epochs=3"]
    cfg = study.config_for(cell, seed=7)
    assert (cfg.data.partition, cfg.data.alpha) == ("dirichlet", 0.3)
    assert (cfg.defense.clip, cfg.defense.noise_sigma, cfg.defense.prune_ratio) == (1.0, 0.5, 0.9)
    assert (cfg.topology.fogs, cfg.topology.edges_per_fog, cfg.topology.fraction) == (20, 5, 0.2)
    assert cfg.train.local_epochs == 3 and cfg.seed == 7 and cfg.rounds == 2
    assert cfg.acquisition.budget == 5  # base.set (nested) survives the preset layers
    nm = study.config_for(by_id["heterogeneity=2_2_3_3__defense=none__topology=nonmassive__train.local_epochs=1"], 0)
    assert (nm.topology.fogs, nm.topology.edges_per_fog, nm.data.partition) == (3, 4, "classes")
    assert nm.defense.clip == 0.0


def test_add_parser_registers_the_subcommand(tmp_path):
    import argparse

    ap = argparse.ArgumentParser()
    add_parser(ap.add_subparsers(dest="command"))
    args = ap.parse_args(["study", "g.yaml", "--out", str(tmp_path), "--jobs", "2", "--max-cells", "1"])
    assert (args.grid, args.jobs, args.max_cells) == ("g.yaml", 2, 1)
    assert args.func.__name__ == "cmd_study"


# ------------------------------------------------------------------------------ running
def test_interrupted_study_resumes_and_gives_the_same_csv(tmp_path):
    grid = _grid(tmp_path, TINY)
    full = run_study(load_study(grid), tmp_path / "full", progress=False)
    assert len(full.ran) == 2 and not full.failed

    part = tmp_path / "part"
    first = run_study(load_study(grid), part, progress=False, max_cells=1)  # "interrupted" after one cell
    assert first.ran == ["sampling=random/seed-0"] and first.pending == 1
    done = part / "cells" / "sampling=random" / "seed-0" / "result.json"
    stamp = done.stat().st_mtime_ns
    assert len(_rows(part / "results.csv")) == 1

    # a half-written cell (no result.json) is started afresh
    half = part / "cells" / "sampling=uncertainty" / "seed-0"
    half.mkdir(parents=True)
    (half / "junk").write_text("left over")

    second = run_study(load_study(grid), part, progress=False)
    assert second.reused == ["sampling=random/seed-0"]
    assert second.ran == ["sampling=uncertainty/seed-0"]
    assert done.stat().st_mtime_ns == stamp  # not run again
    assert not (half / "junk").exists()
    assert (part / "results.csv").read_text() == (tmp_path / "full" / "results.csv").read_text()
    assert (part / "summary.csv").read_text() == (tmp_path / "full" / "summary.csv").read_text()
    info = json.loads((part / "study.json").read_text())
    assert (info["ran"], info["reused"], info["pending"]) == (1, 1, 0)

    # a third run has nothing left to do
    third = run_study(load_study(grid), part, progress=False)
    assert third.ran == [] and len(third.reused) == 2

    # changing a cell's config invalidates its result (the hash differs), the other stays
    changed = _grid(tmp_path, {**TINY, "axes": {"sampling": ["random", "uncertainty"]},
                               "base": {**TINY["base"], "set": {**TINY["base"]["set"], "train.lr": 0.01}}}, "g2.yaml")
    fourth = run_study(load_study(changed), part, progress=False, max_cells=0)
    assert fourth.ran == [] and fourth.pending == 2


def test_csv_columns_rows_and_failed_cell(tmp_path):
    data = {**TINY, "seeds": [0, 1], "rounds": 1,
            "axes": {"data.dataset": ["digits", "mnist"]},  # mnist needs data.path: that cell fails at run time
            "output": {"plots": True, "report": True, "accuracy_targets": [0.5],
                       "reference": {"axis": "data.dataset", "level": "digits"},
                       "tables": [{"title": "acc", "rows": ["data.dataset"], "metric": "final_accuracy"}]}}
    res = run_study(load_study(_grid(tmp_path, data)), tmp_path / "out", progress=False,
                    report_md=tmp_path / "t.md")
    out = tmp_path / "out"
    rows = _rows(out / "results.csv")
    assert [(r["cell"], r["seed"], r["status"]) for r in rows] == [
        ("data.dataset=digits", "0", "ok"), ("data.dataset=digits", "1", "ok"),
        ("data.dataset=mnist", "0", "failed"), ("data.dataset=mnist", "1", "failed")]
    assert len(res.failed) == 2
    assert rows[2]["reason"].startswith("DataError: dataset mnist needs data.path")
    cols = list(rows[0])
    for c in ("cell", "seed", "status", "reason", "data.dataset", "initial_accuracy", "final_accuracy",
              "min_accuracy", "labels_used", "bytes_up", "bytes_down", "edge_bytes_up", "leak_psnr_mean",
              "leak_ssim_mean", "leak_success_rate", "leak_label_acc", "labels_at_0.5", "ref_accuracy",
              "labels_to_ref", "accuracy_rounds", "labels_rounds"):
        assert c in cols, c
    ok = rows[0]
    # small preset: 2 fogs x 2 edges, budget 5, 1 round
    assert int(ok["labels_used"]) == 2 * 2 * 5
    assert 0.0 <= float(ok["final_accuracy"]) <= 1.0
    assert int(ok["bytes_up"]) > 0 and int(ok["bytes_down"]) > 0
    assert len(ok["accuracy_rounds"].split(";")) == 1
    assert 0.1 <= float(ok["r1_top_class_share"]) <= 1.0  # 20 samples over 10 classes: at least 2 of one
    summary = _rows(out / "summary.csv")
    assert [s["cell"] for s in summary] == ["data.dataset=digits", "data.dataset=mnist"]
    assert summary[0]["seeds"] == "2" and summary[0]["failed"] == "0" and summary[1]["failed"] == "2"
    accs = [float(r["final_accuracy"]) for r in rows[:2]]
    assert float(summary[0]["final_accuracy_mean"]) == pytest.approx(sum(accs) / 2, abs=1e-5)
    assert summary[0]["final_accuracy_std"] != ""
    assert len(_rows(out / "rounds.csv")) == 2  # one round for each ok run
    assert (out / "report.html").read_text().count("data:image/png;base64,") >= 1
    md = (tmp_path / "t.md").read_text()
    assert "<!-- study:tiny:begin -->" in md and "| digits |" in md and "Regenerate: `" in md


def test_leakage_of_a_single_sample_gradient_is_exact(tmp_path):
    data = {**TINY, "rounds": 1, "axes": {"sampling": ["random"]},
            "base": {"presets": ["small"], "set": {"acquisition.budget": 1, "topology.edges_per_fog": 1,
                                                   "train.update_kind": "gradient", "train.train_on": "round",
                                                   "cloud.warm_start.epochs": 5}},
            "leakage": {"methods": ["analytic"], "captures_per_cell": 1, "rounds": [1]}}
    run_study(load_study(_grid(tmp_path, data)), tmp_path / "out", progress=False)
    (row,) = _rows(tmp_path / "out" / "results.csv")
    assert row["status"] == "ok", row["reason"]
    assert row["leak_method"] == "analytic" and row["leak_captures"] == "1" and row["leak_batch"] == "1"
    assert float(row["leak_psnr_mean"]) > 60 and float(row["leak_success_rate"]) == 1.0
    assert float(row["leak_label_acc"]) == 1.0
    assert not (tmp_path / "out" / "cells" / "sampling=random" / "seed-0" / "captures").exists()  # cleaned up


# ------------------------------------------------------------------------------ tables
def test_render_table_and_splice(tmp_path):
    rows = [{"status": "ok", "s": "random", "b": "10", "m": 0.5}, {"status": "ok", "s": "random", "b": "10", "m": 0.7},
            {"status": "ok", "s": "margin", "b": "10", "m": 0.9}, {"status": "failed", "s": "margin", "b": "10", "m": 0.0}]
    text = render_table(rows, TableSpec(title="t", rows=["s"], cols="b", metric="m", format=".2f"))
    assert text.splitlines()[0] == "| s | b=10 |"
    assert "| random | 0.60 ± 0.14 |" in text and "| margin | 0.90 |" in text
    target = tmp_path / "R.md"
    target.write_text("intro\n<!-- study:x:begin -->\nold\n<!-- study:x:end -->\noutro\n")
    splice_markdown(target, "x", "new table\n")
    assert target.read_text() == "intro\n<!-- study:x:begin -->\nnew table\n<!-- study:x:end -->\noutro\n"
