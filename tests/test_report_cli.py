"""Report (Markdown + PNG plots) on synthetic results, and the CLI's error paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flextron.cli import main, parse_target, parse_targets
from flextron.report.static import PLOTS, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
L = 4  # layers of the synthetic model


def _results() -> dict:
    def row(target, mlp, heads, ppl, lat, untrained):
        return {
            "target": target,
            "mode": "static",
            "config": {"mlp": mlp, "heads": heads},
            "params": int(100e6 * target),
            "full_params": 100_000_000,
            "predicted_latency_s": 0.1 * target,
            "latency_s": lat,
            "full_latency_s": 0.1,
            "perplexity": ppl,
            "perplexity_ci": [ppl - 0.5, ppl + 0.5],
            "untrained_perplexity": untrained,
            "ood_perplexity": ppl * 2,
            "untrained_ood_perplexity": untrained * 2,
            "homogeneous": {
                "config": {"mlp": [768] * L, "heads": [2] * L},
                "predicted_latency_s": 0.1 * target,
                "perplexity": ppl + 3.0,
            },
            "decode_tokens_per_s": 40.0 / target,
            "full_decode_tokens_per_s": 40.0,
            "tasks": {
                "piqa": {"acc": 0.5 + 0.1 * target, "acc_norm": 0.55 + 0.1 * target, "n": 50},
                "lambada": {"acc": 0.2 * target, "perplexity": 90.0 / target, "n": 50},
            },
            "tasks_protocol": {"limit": 50, "num_fewshot": 0, "seed": 0},
        }

    return {
        "run": "synthetic",
        "model_source": "smollm2",
        "original_perplexity": 15.25,
        "original_ood_perplexity": 40.5,
        "rows": [
            row(0.6, [512, 768, 1024, 1536], [1, 2, 3, 3], 21.37, 0.0612, 35.5),
            row(1.0, [1536] * L, [3] * L, 15.31, 0.1003, 15.25),
        ],
        "ablation": {"mlp_fraction": 0.5, "perplexity": {"importance": 19.87, "none": 44.12, "random": 52.01}},
        "latency_table": {
            "mape": 0.0423,
            "full_s": 0.1,
            "device": "cpu (2 threads)",
            "workload": {"batch_size": 1, "seq_len": 256},
        },
        "search_space": {
            "mlp_choices": [384, 512, 768, 1024, 1536],
            "head_choices": [1, 2, 3],
            "intermediate_size": 1536,
            "heads_per_group": 3,
            "num_layers": L,
        },
        "training": {
            "elastic": {"steps": 20, "final_lm_loss": 2.5},
            "routers": {
                "steps": 10,
                "gate_passed": True,
                "warm_start": {
                    "0.6": {
                        "homogeneous": [768, 2],
                        "homogeneous_delta": 0.812,
                        "allocated_fraction": 0.597,
                        "allocated_delta": 0.604,
                        "chosen": "allocated",
                        "config": {"mlp": [768] * L, "heads": [2] * L},
                    },
                    "1": {
                        "homogeneous": [1536, 3],
                        "homogeneous_delta": 0.0,
                        "allocated_fraction": 1.0,
                        "allocated_delta": 0.0,
                        "chosen": "homogeneous",
                        "config": {"mlp": [1536] * L, "heads": [3] * L},
                    },
                },
                "validation": {
                    "targets": {"0.6": {"routed_loss": 3.1234, "warm_start_loss": 3.2345, "kept": "router"}}
                },
            },
            "joint": {},
        },
        "provenance": {
            "commit": "abc1234",
            "versions": {"torch": "2.13.0"},
            "seed": 0,
            "stages": {"elastic": {"wall_s": 123.4, "tokens": 40960}, "routers": {"wall_s": 7.5, "tokens": 2048}},
            "total_wall_s": 130.9,
        },
        "exported_check": {
            "target": 0.6,
            "path": "runs/x/exported/target_0.6",
            "params": 60_000_000,
            "latency_s": 0.0605,
            "full_latency_s": 0.1,
            "speedup": 1.653,
        },
    }


def _write_metrics(run_dir: Path) -> None:
    recs = []
    for step in range(1, 13):
        recs.append(
            {
                "stage": "elastic",
                "step": step,
                "budget": None if step % 3 == 0 else 0.5 + 0.04 * step,
                "lm_loss": 3.0 - 0.1 * step,
                "kd_loss": 1.0 - 0.05 * step,
            }
        )
    for step in range(1, 5):
        recs.append({"stage": "joint", "step": step, "lm_loss": 2.0 - 0.1 * step})
    lines = [json.dumps(r) for r in recs] + ["", '{"stage": "elastic", "step": 99, "lm_l']  # blank + torn last line
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_write_report_makes_markdown_and_plots(tmp_path: Path):
    _write_metrics(tmp_path)
    report = write_report(tmp_path, _results())
    assert report == tmp_path / "report.md"
    text = report.read_text()
    for name in PLOTS:
        p = tmp_path / name
        assert p.is_file() and p.stat().st_size > 1000, name
        assert p.read_bytes()[:8] == PNG_MAGIC, name
        assert f"]({name})" in text, name
    # the main table: target, perplexity with CI, untrained/OOD, timed latency (ms), ratio, decode speed
    row06 = next(line for line in text.splitlines() if line.startswith("| 0.60 "))
    for cell in ("21.37 [20.87, 21.87]", "35.50", "42.74", "61.2", "0.61", "60.0", "24.37", "66.7"):
        assert cell in row06, (cell, row06)
    assert "| 1.00 " in text and "15.31" in text
    # ablation, LUT, stages, provenance, training summaries
    assert "| importance | 19.87 |" in text and "| random | 52.01 |" in text
    assert "4.23%" in text
    assert "| elastic | 2.1 min | 40960 |" in text
    assert "abc1234" in text and "gate_passed" in text
    assert "| speed-up | 1.65× |" in text
    # the router stage's warm start and validation, one row per grid target (not dumped as JSON)
    assert "| 0.6 | 768 / 2 | 0.812 | 0.597 | 0.604 | allocated | 3.1234 | 3.2345 | router |" in text
    assert "| 1 | 1536 / 3 | 0.000 | 1.000 | 0.000 | homogeneous | — | — | — |" in text
    assert "| warm_start |" not in text
    assert "8 budgeted steps and 4 full-model steps" in text
    # downstream tasks: task x target table (accuracy in %, LAMBADA perplexity), protocol stated
    assert "## Downstream tasks" in text and "0-shot" in text and "at most 50 items" in text
    assert "| target | timed (ms) | piqa acc | piqa acc_norm | lambada acc | lambada perplexity |" in text
    assert "| 0.60 | 61.2 | 56.0 | 61.0 | 12.0 | 150.00 |" in text
    assert not list(tmp_path.glob(".*.tmp")), "temporary files left behind"


def test_write_report_tolerates_missing_optional_parts(tmp_path: Path):
    results = {"run": "bare", "rows": [{"target": 0.5, "perplexity": 30.0}]}
    # a stale plot from an earlier report disappears when its data is gone
    (tmp_path / "budget_histogram.png").write_bytes(b"old")
    report = write_report(tmp_path, results)
    text = report.read_text()
    assert "| 0.50 " in text and "30.00" in text
    assert not (tmp_path / "budget_histogram.png").exists()
    assert "training_curves.png" not in text


def test_parse_targets():
    assert parse_targets("0.6,0.7, 0.85,1.0") == [0.6, 0.7, 0.85, 1.0]
    assert parse_target("1") == 1.0
    for bad in ("0", "1.5", "-0.2", "abc", "nan"):
        with pytest.raises(Exception):
            parse_target(bad)


def _run_main(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, err)


def test_cli_missing_config(capsys, tmp_path):
    code, _, err = _run_main(capsys, ["run", str(tmp_path / "nope.yaml")])
    _assert_one_line_error(code, err, "nope.yaml")


def test_cli_malformed_yaml(capsys, tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("name: x\ntrain: [1, 2\n  steps: 3\n")
    code, _, err = _run_main(capsys, ["run", str(cfg)])
    _assert_one_line_error(code, err, "not valid YAML")


def test_cli_unknown_config_key(capsys, tmp_path):
    cfg = tmp_path / "unknown.yaml"
    cfg.write_text("name: x\ntrain:\n  stepz: 3\n")
    code, _, err = _run_main(capsys, ["run", str(cfg)])
    _assert_one_line_error(code, err, "train.stepz")


@pytest.mark.parametrize("bad", ["1.5", "0", "abc"])
@pytest.mark.parametrize(
    "cmd",
    [
        lambda t: ["export", "runs/x", "--target", t, "--out", "out"],
        lambda t: ["generate", "runs/x", "--target", t, "hello"],
        lambda t: ["eval", "runs/x", "--targets", f"0.6,{t}"],
    ],
    ids=["export", "generate", "eval"],
)
def test_cli_bad_target(capsys, cmd, bad):
    code, _, err = _run_main(capsys, cmd(bad))
    _assert_one_line_error(code, err, repr(bad))


def test_cli_usage_errors(capsys):
    code, _, err = _run_main(capsys, [])
    _assert_one_line_error(code, err)
    code, _, err = _run_main(capsys, ["export", "runs/x", "--out", "o"])  # --target missing
    _assert_one_line_error(code, err, "--target")
    code, out, _ = _run_main(capsys, ["--help"])
    assert code == 0 and "export" in out


def test_cli_subprocess_no_traceback(tmp_path):
    """End to end through ``python -m flextron``: one error line, exit 2, no traceback."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\nbogus: 1\n")
    p = subprocess.run([sys.executable, "-m", "flextron", "run", str(cfg)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("error: ") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "bogus" in p.stderr


def test_cli_calls_pipeline(capsys, tmp_path, monkeypatch):
    """The commands pass parsed arguments through to the pipeline and print its results."""
    from flextron.eval import deploy
    from flextron.pipeline import runner as pipeline

    calls = []
    monkeypatch.setattr(
        pipeline, "run", lambda cfg, overwrite=False: calls.append(("run", cfg.name, overwrite)) or tmp_path / cfg.name
    )
    monkeypatch.setattr(
        deploy,
        "export_target",
        lambda run, t, out, overwrite=False, **kw: calls.append(("export", t, overwrite)) or out,
    )
    monkeypatch.setattr(
        pipeline,
        "evaluate_run",
        lambda run, targets=None, **kw: (
            calls.append(("eval", targets, kw))
            or {
                "rows": [
                    {"target": 0.6, "perplexity": 20.0, "latency_s": 0.05, "tasks": {"piqa": {"acc": 0.61, "n": 7}}}
                ]
            }
        ),
    )
    monkeypatch.setattr(
        deploy,
        "generate_text",
        lambda run, t, prompt, max_new_tokens=64, **kw: calls.append(("gen", t, max_new_tokens)) or " there was",
    )
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: demo\n")
    code, out, _ = _run_main(capsys, ["run", str(cfg), "--overwrite", "-q"])
    assert code == 0 and str(tmp_path / "demo" / "report.md") in out
    code, out, _ = _run_main(
        capsys, ["eval", "runs/x", "--targets", "0.6,1", "--tasks", "piqa,mmlu", "--limit", "7", "--num-fewshot", "0"]
    )
    assert "piqa: acc 0.61 (7 items)" in out
    assert code == 0 and "20.00" in out
    assert _run_main(capsys, ["export", "runs/x", "--target", "0.6", "--out", str(tmp_path / "o")])[0] == 0
    code, out, _ = _run_main(capsys, ["generate", "runs/x", "--target", "0.5", "--max-new-tokens", "8", "Once"])
    assert code == 0 and out.strip() == "Once there was"
    assert calls == [
        ("run", "demo", True),
        ("eval", [0.6, 1.0], {"tasks": ["piqa", "mmlu"], "limit": 7, "num_fewshot": 0}),
        ("export", 0.6, False),
        ("gen", 0.5, 8),
    ]


def test_cli_reports_flextron_errors(capsys, monkeypatch):
    from flextron.errors import ModelError
    from flextron.pipeline import runner as pipeline

    def boom(*a, **k):
        raise ModelError("runs/x is not a flextron run directory (no config.yaml)")

    monkeypatch.setattr(pipeline, "evaluate_run", boom)
    code, _, err = _run_main(capsys, ["eval", "runs/x"])
    _assert_one_line_error(code, err, "not a flextron run directory")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "evaluate_run", interrupted)
    code, _, err = _run_main(capsys, ["eval", "runs/x"])
    assert code == 130 and "interrupted" in err
