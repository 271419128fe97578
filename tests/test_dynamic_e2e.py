"""Dynamic routing end to end on a tiny run: ``flextron dynamic``, ``eval --dynamic-only``,
``generate --dynamic``, the benchmarks, and the errors a user can cause."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import write_tiny_run

from flextron.cli import main
from flextron.config import load_config
from flextron.pipeline import runner as pipeline

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dyn")
    return Path(pipeline.run(load_config(write_tiny_run(tmp))))


def test_cli_dynamic_train_eval_generate(tiny_run, capsys):
    assert (
        main(["dynamic", str(tiny_run), "--steps", "3", "--train-blocks", "4", "--targets", "0.6,0.8,1.0", "-q"]) == 0
    )
    out = capsys.readouterr().out
    assert (
        "target 0.6: average predicted latency" in out and (tiny_run / "dynamic" / "router" / "routers.json").exists()
    )
    assert main(["eval", str(tiny_run), "--dynamic-only", "--blocks-per-domain", "3", "--timed-blocks", "1", "-q"]) == 0
    out = capsys.readouterr().out
    assert "target 0.8 (dynamic)" in out
    res = json.loads((tiny_run / "dynamic_results.json").read_text())
    assert set(res["domains"]) == {"wikipedia", "shakespeare", "python"}
    assert [r["target"] for r in res["dynamic"]] == [0.6, 0.8]
    cal, timing = res["router_summary"]["calibration"], res["router_summary"]["timing"]
    for r in res["dynamic"]:
        budget = cal[f"{r['target']:g}"][
            "budget"
        ]  # the target scaled by the timed / predicted ratio measured on this machine
        assert budget == timing[f"{r['target']:g}"]["budget"] and abs(budget / r["target"] - 1) <= 0.15 + 1e-9
        assert (
            -0.1 <= r["predicted_fraction"] / budget - 1 <= 0.05
        )  # calibrated on training blocks, measured on held-out ones
        assert set(r["per_domain"]) == set(res["domains"]) and "vs_static_predicted" in r and "timed_fraction" in r
        assert len(r["per_domain"]["python"]["mlp_width_per_layer"]) == 3
        assert all("verdict" in v["vs_static_predicted"] for v in r["per_domain"].values())
        sh = r["vs_shuffled"]  # the same configurations, not matched to their inputs
        assert sh["distinct_configs"] >= 1 and sh["verdict"] in (
            "input adaptivity helps",
            "input adaptivity hurts",
            "tie",
        )
        if sh["distinct_configs"] == 1:  # nothing to shuffle: exactly the dynamic result
            assert sh["delta_nll"] == 0
    modes = [r.get("mode") for r in json.loads((tiny_run / "results.json").read_text())["rows"]]
    assert modes.count("dynamic") == 2 and "static" in modes
    report = (tiny_run / "dynamic_report.md").read_text()
    for section in (
        "## Latency targets",
        "## Dynamic against static at equal latency",
        "## Compute per domain",
        "## Collapse",
        "## Router training",
        "Per domain, dynamic / static perplexity",
        "## Input adaptivity (shuffled control)",
    ):
        assert section in report
    for png in (
        "dynamic_latency_perplexity.png",
        "dynamic_domain_compute.png",
        "dynamic_domain_widths.png",
        "dynamic_training.png",
    ):
        assert (tiny_run / png).stat().st_size > 1000
    # evaluating again replaces the dynamic rows instead of adding more
    assert main(["eval", str(tiny_run), "--dynamic-only", "--blocks-per-domain", "2", "--timed-blocks", "0", "-q"]) == 0
    modes = [r.get("mode") for r in json.loads((tiny_run / "results.json").read_text())["rows"]]
    assert modes.count("dynamic") == 2
    capsys.readouterr()
    assert (
        main(["generate", str(tiny_run), "--target", "0.6", "--dynamic", "--max-new-tokens", "4", "the king", "-q"])
        == 0
    )
    assert capsys.readouterr().out.startswith("the king")


def test_cli_dynamic_errors(tiny_run, tmp_path, capsys):
    assert (
        main(["generate", str(tiny_run), "--target", "0.6", "--dynamic", "--dynamic-dir", str(tmp_path), "hi", "-q"])
        == 2
    )
    assert "no readable dynamic router" in capsys.readouterr().err
    assert main(["dynamic", str(tmp_path), "-q"]) == 2
    assert "not a flextron run directory" in capsys.readouterr().err
    assert main(["dynamic", str(tiny_run), "--targets", "1.0", "--out", str(tmp_path / "d"), "-q"]) == 2
    assert "dynamic.targets" in capsys.readouterr().err


def test_benchmarks_dynamic_vs_static_and_router_overhead(tiny_run, tmp_path, capsys):
    out = tmp_path / "bench"
    assert (
        _bench("dynamic_vs_static").main(
            [
                str(tiny_run),
                "--out",
                str(out),
                "--targets",
                "0.6,0.8,1.0",
                "--steps",
                "2",
                "--direct-steps",
                "2",
                "--train-blocks",
                "4",
                "--blocks-per-domain",
                "2",
                "--timed-blocks",
                "1",
                "--repeats",
                "2",
                "-q",
            ]
        )
        == 0
    )
    res = json.loads((out / "dynamic_results.json").read_text())
    direct = json.loads((out / "direct" / "dynamic_results.json").read_text())
    assert res["router_summary"]["config"]["surrogate"] and not direct["router_summary"]["config"]["surrogate"]
    assert "router (surrogate)" not in capsys.readouterr().err  # -q: no progress bars
    assert (
        _bench("router_overhead").main(
            [
                str(tiny_run),
                "--dynamic-dir",
                str(out / "dynamic"),
                "--out",
                str(out),
                "--target",
                "0.6",
                "--repeats",
                "3",
                "--seq-len",
                "16",
            ]
        )
        == 0
    )
    ov = json.loads((out / "router_overhead.json").read_text())
    assert ov["static_s"] > 0 and ov["dynamic_s"] > 0 and len(ov["per_token"]) == 5
    assert {"overhead_fraction", "router_forward_s", "per_token_latency_falls_with_width"} <= set(ov)
