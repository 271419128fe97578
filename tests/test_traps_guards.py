"""Traps a new user falls into (issue 21): one-file corpora, targets below the floor found only at
the end, training that damages the model, runs that fill the disk. Each test reproduces the trap
on a tiny run and checks the fixed behaviour."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
from conftest import make_tiny, write_tiny_run
from safetensors.torch import load_file

import flextron.pipeline.stages as stage_module
from flextron.cli import main
from flextron.config import ElasticConfig, LatencyConfig, load_config
from flextron.cost import timing
from flextron.cost.measure import measure_latency_table
from flextron.cost.table import CostTable
from flextron.data.corpora import Document, split_tails
from flextron.errors import MeasurementError
from flextron.model.elastic import convert
from flextron.model.export import load_original
from flextron.report.static import quality_flags, render_markdown


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _stages(run_dir) -> dict:
    path = run_dir / "stages.json"
    return json.loads(path.read_text()) if path.exists() else {}


# --------------------------------------------------------------------------- item 3: one-file corpora


def test_split_tails_holds_out_the_end_of_each_document():
    text = " ".join(f"w{i}" for i in range(1000))
    held, rest = split_tails([Document("one", text, "user")])
    assert len(held) == len(rest) == 1
    assert text.endswith(held[0].text) and text.startswith(rest[0].text)
    assert rest[0].text + " " + held[0].text == text  # cut at a space: no word split, nothing lost
    assert 0.08 < len(held[0].text) / len(text) < 0.12


def test_a_ten_character_file_is_refused_with_the_tokens_needed(tmp_path, capsys):
    one = tmp_path / "one.txt"
    one.write_text("the river ")  # 10 characters, 2 words
    cfg = write_tiny_run(tmp_path, data={"text_files": [str(one)]})
    capsys.readouterr()
    assert main(["run", str(cfg)]) == 2
    line = _one_error_line(capsys)
    # the calibration set: 4 sequences of 32 tokens; the training part of the file has 1 word
    assert "calibration set" in line and "needs 128 tokens" in line and "only 1 tokens" in line, line
    assert "calibration.num_sequences" in line  # what to change


def test_a_single_long_file_trains_and_evaluates(tmp_path):
    one = tmp_path / "book.txt"
    words = ["the", "river", "city", "old", "king", "north", "south", "war", "trade", "music", "art", "people"]
    one.write_text(" ".join(words[(7 * i) % len(words)] for i in range(6000)))  # one file of 6,000 words
    cfg = write_tiny_run(tmp_path, data={"text_files": [str(one)]})
    assert main(["run", str(cfg), "-q"]) == 0
    res = json.loads((tmp_path / "runs" / "tiny" / "results.json").read_text())
    assert {r["target"] for r in res["rows"]} == {0.6, 1.0}


# --------------------------------------------------------------------------- item 9: targets below the floor


def _params_floor(cfg_path) -> float:
    cfg = load_config(cfg_path)
    space = convert(load_original(cfg)[0], cfg.elastic).space
    return CostTable.from_parameters(space).fraction(space.smallest())


def test_a_target_below_the_parameter_floor_is_refused_before_any_stage(tmp_path, capsys):
    cfg = write_tiny_run(tmp_path, routers={"targets": [0.05, 0.8, 1.0]})
    floor = _params_floor(cfg)
    assert 0.05 < floor < 0.6
    capsys.readouterr()
    assert main(["run", str(cfg)]) == 2
    line = _one_error_line(capsys)
    assert "routers.targets 0.05" in line and f"{floor:.3f}" in line and "elastic.mlp_fractions" in line
    assert _stages(tmp_path / "runs" / "tiny") == {}  # nothing ran


def test_a_target_below_the_measured_floor_is_refused_by_the_latency_stage(tmp_path, capsys, monkeypatch):
    """A measured table (here: a stand-in whose smallest sub-network costs 0.7 of the full model,
    as a busy machine's did) is checked as soon as it exists, before any training."""

    def measured(fx, cfg, **kw):
        table = CostTable.from_parameters(fx.space)
        table.unit = "s"
        table.const += 0.7 / 0.3 * table.full  # every prediction shifts up: the floor rises above 0.6
        table.full += 0.7 / 0.3 * table.full
        return table

    monkeypatch.setattr(stage_module, "measure_latency_table", measured)
    cfg = write_tiny_run(tmp_path, latency={"budget": "latency", "validate_configs": 0})
    capsys.readouterr()
    assert main(["run", str(cfg)]) == 2
    line = _one_error_line(capsys)
    run_dir = tmp_path / "runs" / "tiny"
    loaded = load_config(cfg)
    space = convert(load_original(loaded)[0], loaded.elastic).space
    floor = CostTable.load(run_dir / "latency_table.json").fraction(space.smallest())
    assert "routers.targets 0.6" in line and f"{floor:.3f}" in line and "busy machine" in line
    assert set(_stages(run_dir)) == {"rank"} and not (run_dir / "checkpoints").exists()


# --------------------------------------------------------------------------- item 10: the training guard


def test_the_guard_stops_training_that_damages_the_full_model(tmp_path, capsys):
    cfg = write_tiny_run(tmp_path, train={"lr": 3.0, "warmup_steps": 0}, guard={"every": 2})
    capsys.readouterr()
    assert main(["run", str(cfg)]) == 2
    line = _one_error_line(capsys)
    assert "elastic training damaged the full model" in line and "lower train.lr (now 3)" in line
    assert "elastic" not in _stages(tmp_path / "runs" / "tiny")


@pytest.mark.parametrize("action", ["rollback", "warn"])
def test_the_guard_rolls_back_or_warns(tmp_path, capsys, action):
    cfg = write_tiny_run(
        tmp_path, train={"lr": 3.0, "warmup_steps": 0}, guard={"every": 2, "action": action}, keep_checkpoints=True
    )
    capsys.readouterr()
    assert main(["run", str(cfg), "-q"]) == 0
    assert "warning: elastic training damaged the full model" in capsys.readouterr().out
    run_dir = tmp_path / "runs" / "tiny"
    summ = _stages(run_dir)["elastic"]["summary"]
    assert summ["guard"]["fired"]["action"] == action and summ["guard"]["fired"]["step"] == 2
    elastic, ranked = (
        load_file(run_dir / "elastic" / "model.safetensors"),
        load_file(run_dir / "ranked" / "model.safetensors"),
    )
    same = all(torch.equal(elastic[k], ranked[k]) for k in ranked)
    if action == "rollback":  # the best weights measured were the stage's start: the ranked model
        assert summ["guard"]["fired"]["rolled_back_to_step"] == 0 and summ["steps_skipped"] == 4 and same
    else:
        assert summ["steps_skipped"] == 0 and not same


def test_report_flags_targets_made_worse_by_training():
    rows = [
        {"target": 0.6, "mode": "static", "perplexity": 30.0, "untrained_perplexity": 25.0},
        {"target": 0.8, "mode": "static", "perplexity": 20.0, "untrained_perplexity": 25.0},
        {"target": 1.0, "mode": "static", "perplexity": 19.0, "untrained_perplexity": 18.0},
    ]
    flags = quality_flags({"original_perplexity": 18.0, "rows": rows})
    assert len(flags) == 3  # 0.6 and 1.0 worse than before training, 1.0 over 3 % worse than the original
    assert "Target 0.60" in flags[0] and "+5.6%" in flags[2]
    assert "## Warnings" in render_markdown({"original_perplexity": 18.0, "rows": rows}, {}, [])
    rows[2].update(perplexity=18.3, untrained_perplexity=19.0)  # 1.7 % over the original, better than before
    assert not any("1.00" in f or "full model" in f for f in quality_flags({"original_perplexity": 18.0, "rows": rows}))


# --------------------------------------------------------------------------- item 13: disk


def test_a_finished_run_keeps_what_it_needs_and_reruns_a_deleted_stage(tmp_path, capsys):
    cfg = write_tiny_run(tmp_path)
    capsys.readouterr()
    assert main(["run", str(cfg), "-q"]) == 0
    assert "MB on disk" in capsys.readouterr().out
    run_dir = tmp_path / "runs" / "tiny"
    stages = _stages(run_dir)
    for stage in ("elastic", "joint"):  # the default guard stays silent on the tiny run
        assert stages[stage]["summary"]["guard"]["active"] and stages[stage]["summary"]["guard"]["fired"] is None
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "elastic").exists()
    model = (run_dir / "final" / "model.safetensors").stat().st_size
    weights = sum(f.stat().st_size for f in run_dir.rglob("*.safetensors") if "exported" not in f.parts)
    assert weights <= 3 * model, (weights, model)
    assert "## Disk" in (run_dir / "report.md").read_text()

    # a stage to run again after the tidying (here: joint, its output deleted) gets its input back
    before = load_file(run_dir / "final" / "model.safetensors")
    shutil.rmtree(run_dir / "final")
    stages = {k: v for k, v in stages.items() if k not in ("joint", "evaluate")}
    (run_dir / "stages.json").write_text(json.dumps(stages))
    assert main(["run", str(cfg), "-q"]) == 0
    after = load_file(run_dir / "final" / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # elastic and joint ran again, identically
    assert set(_stages(run_dir)) >= {"elastic", "joint", "evaluate"} and not (run_dir / "elastic").exists()


# --------------------------------------------------------------------------- item 11: a busy machine


class FakeClock:
    """A clock for :func:`flextron.cost.timing.time_models`: every timed call lasts 1 ms times
    ``load(i)``, ``i`` the number of calls timed before it (so no assertion depends on real time)."""

    def __init__(self, load):
        self.load, self.now, self.timed, self.started = load, 0.0, 0, False

    def __call__(self) -> float:
        if self.started:  # the end of a timed call
            self.now += 1e-3 * self.load(self.timed)
            self.timed += 1
        self.started = not self.started
        return self.now


LUT = LatencyConfig(seq_len=8, warmup=1, repeats=3, block_repeats=3, fit_configs=2, busy_retries=2)


def _tiny_fx():
    return convert(make_tiny("llama_gqa_tied", dtype=torch.float32), ElasticConfig((0.5, 1.0), mlp_divisor=8))


def test_steady_timings_pass_the_busy_check(monkeypatch):
    monkeypatch.setattr(timing, "clock", FakeClock(lambda i: 1.0))
    check = measure_latency_table(_tiny_fx(), LUT, progress=False).workload["busy_check"]
    assert len(check["attempts"]) == 1 and check["attempts"][0]["busy"] == [] and not check["accepted_busy"]
    assert check["attempts"][0]["drift"] < 1e-9 and check["attempts"][0]["spread"] < 1e-9


def test_a_machine_that_becomes_busy_is_measured_again(monkeypatch):
    clock = FakeClock(lambda i: 1.0 if i < 10 else 3.0)  # busy from the 11th timed call on, to the end
    monkeypatch.setattr(timing, "clock", clock)
    check = measure_latency_table(_tiny_fx(), LUT, progress=False).workload["busy_check"]
    first, second = check["attempts"]  # the second attempt, steadily busy, gives consistent fractions
    assert first["drift"] == pytest.approx(2.0) and "drifted by 200%" in first["busy"][0]
    assert second["busy"] == [] and not check["accepted_busy"]


def test_a_machine_busy_throughout_stops_the_measurement(monkeypatch):
    monkeypatch.setattr(timing, "clock", FakeClock(lambda i: 1.0 + 0.01 * i))  # ever slower
    with pytest.raises(MeasurementError, match=r"machine was busy .* 3 attempt\(s\).*latency.allow_busy: true"):
        measure_latency_table(_tiny_fx(), LUT, progress=False)
    table = measure_latency_table(_tiny_fx(), dataclasses.replace(LUT, allow_busy=True), progress=False)
    assert table.workload["busy_check"]["accepted_busy"] and len(table.workload["busy_check"]["attempts"]) == 3
