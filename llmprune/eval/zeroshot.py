"""Zero-shot accuracy through lm-evaluation-harness (Gao et al., "A framework for few-shot language
model evaluation", Zenodo 10.5281/zenodo.5371628), online or offline.

lm-eval's HFLM wraps the nn.Module we hold, so a pruned or packed model is scored through its runtime
modules; a model left on disk (lazy.LazyModel: `llmprune eval` of a folder) is scored by
eval/blockwise.py, HFLM with its forward pass walked block by block. lm-eval builds the requests and
computes the metrics: this module only picks task definitions and reads the numbers back.

- Online: lm-eval's own task definitions, which download their data from the Hub.
- Offline (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set, the Hub unreachable, a builtin task that fails
  to load, or `tasks_dir` given): the llmprune_* YAMLs in eval/tasks/, which mirror lm-eval's prompts
  and metrics over the small data files shipped beside them (or the same file names in `tasks_dir`).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llmprune.calibration import sources
from llmprune.errors import LLMPruneError
from llmprune.lazy import LazyModel

TASKS_DIR = Path(__file__).parent / "tasks"

# user-facing name -> lm-eval's builtin task
HUB_TASKS = {
    "boolq": "boolq", "rte": "rte", "winogrande": "winogrande", "arc_easy": "arc_easy",
    "arc_challenge": "arc_challenge", "openbookqa": "openbookqa", "piqa": "piqa", "copa": "copa",
    "hellaswag": "hellaswag", "lambada": "lambada_openai",
}
# where each builtin task's YAML sits under lm_eval/tasks/ (0.4.13): indexing only these folders takes
# well under a second, where lm-eval's full index of ~10k YAMLs takes 7 s or more per call
_HUB_DIRS = {
    "boolq": "super_glue/boolq", "rte": "glue/rte", "winogrande": "winogrande", "arc_easy": "arc",
    "arc_challenge": "arc", "openbookqa": "openbookqa", "piqa": "piqa", "copa": "super_glue/copa",
    "hellaswag": "hellaswag", "lambada": "lambada",
}
# user-facing name -> (offline task in eval/tasks/, the data file its YAML reads)
LOCAL_TASKS = {
    "boolq": ("llmprune_boolq", "boolq.jsonl"), "rte": ("llmprune_rte", "rte_dev.tsv"),
    "winogrande": ("llmprune_winogrande", "winogrande.jsonl"),
    "arc_easy": ("llmprune_arc_easy", "arc_easy.jsonl"),
    "arc_challenge": ("llmprune_arc_challenge", "arc_challenge.jsonl"),
    "openbookqa": ("llmprune_openbookqa", "openbook_qa.jsonl"), "piqa": ("llmprune_piqa", "piqa.jsonl"),
    "copa": ("llmprune_copa", "copa.jsonl"),
}


def check_tasks(tasks: list[str] | str) -> list[str]:
    """Normalise "a,b" or ["a", "b"] to a list of known user-facing names; raise on unknown ones."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise LLMPruneError(f"no zero-shot task given: pass --tasks with some of {', '.join(HUB_TASKS)}")
    unknown = [t for t in names if t not in HUB_TASKS]
    if unknown:
        raise LLMPruneError(f"unknown zero-shot task {', '.join(unknown)}: valid tasks are {', '.join(HUB_TASKS)}")
    return list(dict.fromkeys(names))  # drop repeats, keep order


def check_limit(limit, flag: str = "--limit") -> None:
    """A limit of examples per task: None (every example) or a whole number >= 1."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise LLMPruneError(f"{flag} {limit!r} must be >= 1 (or leave it out for every example)")


def check(tasks, limit, limit_flag: str) -> tuple[str, ...]:
    """The tasks an output command is asked to score (none: ()), and their limit, checked before any work."""
    check_limit(limit, limit_flag)
    if not tasks:
        if limit is not None:
            raise LLMPruneError(f"{limit_flag} limits the zero-shot tasks: add --tasks, or drop it")
        return ()
    return tuple(check_tasks(tasks))


# the one Hub check of the package; module attributes so tests can replace them
_env_offline, _hub_reachable = sources.env_offline, sources.hub_reachable


def _local_tasks(names: list[str], tasks_dir: str | Path | None) -> dict[str, Any]:
    """Build the offline lm-eval Task objects for `names`; returns {user name: Task}."""
    from lm_eval.tasks import TaskManager

    missing = [n for n in names if n not in LOCAL_TASKS]
    if missing:
        raise LLMPruneError(
            f"{', '.join(missing)} needs the Hub (no offline copy is shipped): drop it, or run online without "
            f"--tasks-dir; offline tasks are {', '.join(LOCAL_TASKS)}")
    data_dir = Path(tasks_dir) if tasks_dir is not None else TASKS_DIR
    for n in names:
        if not (data_dir / LOCAL_TASKS[n][1]).is_file():
            fix = "copy it there or drop --tasks-dir" if tasks_dir is not None else "reinstall llmprune"
            raise LLMPruneError(f"tasks dir {data_dir} has no {LOCAL_TASKS[n][1]} (needed by {n}): {fix}")
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False,
                     metadata={"tasks_dir": str(data_dir.resolve())})
    built = tm.load([LOCAL_TASKS[n][0] for n in names])["tasks"]
    return {n: built[LOCAL_TASKS[n][0]] for n in names}


def _hub_tasks(names: list[str]) -> dict[str, Any]:
    """Build lm-eval's builtin tasks (downloads their data); a task whose data cannot be loaded
    falls back to its offline copy when there is one."""
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager

    root = Path(lm_eval.tasks.__file__).parent
    dirs = sorted({str(root / _HUB_DIRS[n]) for n in names})
    # a newer lm-eval that moved a folder still works, through the full (slow) index
    tm = TaskManager(include_path=dirs, include_defaults=False) if all(map(os.path.isdir, dirs)) else TaskManager()
    out, fallback = {}, []
    for n in names:
        try:
            out[n] = tm.load([HUB_TASKS[n]])["tasks"][HUB_TASKS[n]]
        except Exception as e:  # any download / dataset failure: use the shipped data if we have it
            if n not in LOCAL_TASKS:
                raise LLMPruneError(f"lm-eval task {HUB_TASKS[n]} could not load its data ({type(e).__name__}); "
                                    f"offline tasks are {', '.join(LOCAL_TASKS)}") from e
            fallback.append(n)
    return {**out, **_local_tasks(fallback, None)} if fallback else out


def run_lm_eval(model, tokenizer, tasks: list[str] | str, limit: int | None = None, batch_size: int = 8,
                tasks_dir: str | Path | None = None, log_samples: bool = False, device=None,
                progress: bool = False) -> tuple[dict, dict[str, str]]:
    """Run lm-eval on `model`: an nn.Module where it is, or a lazy.LazyModel walked block by block on
    `device` (eval/blockwise.py). Returns (lm-eval's raw output, {user name: lm-eval task name})."""
    names = check_tasks(tasks)
    check_limit(limit)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise LLMPruneError(f"batch size must be a positive integer, got {batch_size!r}")
    if tasks_dir is not None and not Path(tasks_dir).is_dir():
        raise LLMPruneError(f"tasks dir {tasks_dir} is not a folder: pass the folder holding the task files")

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    offline = tasks_dir is not None or _env_offline() or not _hub_reachable()
    with _keep_rng():  # lm-eval reseeds python, numpy and torch: leave the caller's streams alone
        task_objs = _local_tasks(names, tasks_dir) if offline else _hub_tasks(names)
        if isinstance(model, LazyModel):
            from .blockwise import BlockwiseLM

            lm = BlockwiseLM(model, tokenizer, batch_size, device or "cpu", progress)
        else:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        raw = lm_eval.simple_evaluate(
            model=lm, tasks=list(task_objs.values()), limit=limit, num_fewshot=None,
            task_manager=TaskManager(include_defaults=False),  # tasks are built: skip indexing lm-eval's YAMLs
            bootstrap_iters=0, log_samples=log_samples,  # no stderr resampling: tests and sweeps want speed
        )
        ran = {n: t.task_name for n, t in task_objs.items()}  # task_name draws a random id as its default
    return raw, ran


@contextmanager
def _keep_rng():
    import random

    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


def zeroshot(model, tokenizer, tasks: list[str] | str, limit: int | None = None, batch_size: int = 8,
             tasks_dir: str | Path | None = None, device=None, progress: bool = False) -> dict[str, Any]:
    """Zero-shot accuracy of `model` on `tasks` (user-facing names, see HUB_TASKS).

    Returns {task: {"acc", "acc_norm", "n", "source"}, ..., "mean": mean acc over tasks}. acc_norm is
    None where lm-eval's task defines no acc_norm (boolq, rte, copa, winogrande, lambada; lambada adds
    "ppl"); n is the
    number of examples scored (the first `limit` when given); source is the lm-eval task that ran
    (llmprune_* = the shipped offline copy). `device`, when given, moves the model there for the run
    and back afterwards; otherwise the model runs where it is. A lazy.LazyModel stays on disk: its
    blocks are walked on `device` (default: the CPU), one at a time.
    """
    import torch

    if isinstance(model, LazyModel):
        raw, ran = run_lm_eval(model, tokenizer, tasks, limit=limit, batch_size=batch_size, tasks_dir=tasks_dir,
                               device=device, progress=progress)
        return summarize(raw, ran)
    here = next(model.parameters()).device
    target = torch.device(device) if device is not None else here
    if target != here:
        model.to(target)
    try:
        raw, ran = run_lm_eval(model, tokenizer, tasks, limit=limit, batch_size=batch_size, tasks_dir=tasks_dir)
    finally:
        if target != here:
            model.to(here)
    return summarize(raw, ran)


def summarize(raw: dict, ran: dict[str, str]) -> dict[str, Any]:
    """Read acc / acc_norm / n for each task out of lm-eval's output, keyed by user-facing names."""
    out: dict[str, Any] = {}
    for name, task in ran.items():
        res = raw["results"][task]
        acc_norm = res.get("acc_norm,none")
        out[name] = {"acc": float(res["acc,none"]), "acc_norm": None if acc_norm is None else float(acc_norm),
                     "n": int(raw["n-samples"][task]["effective"]), "source": task}
        if "perplexity,none" in res:  # lambada_openai also reports the target word's perplexity
            out[name]["ppl"] = float(res["perplexity,none"])
    out["mean"] = sum(out[n]["acc"] for n in ran) / len(ran)
    return out
