"""Zero-shot through lm-eval: the offline tasks load and score, and agree with an independent oracle
(log-likelihood of each choice computed here with the model, lm-eval's prompts re-derived from the
raw files, lm-eval's acc / acc_norm rules), plus bad inputs."""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

pytest.importorskip("lm_eval")

from llmprune.errors import LLMPruneError
from llmprune.eval import zeroshot as zs
from llmprune.testing import byte_tokenizer, tiny_model

LIMIT = 5
DATA = zs.TASKS_DIR


def _rows(file: str, n: int) -> list[dict]:
    if file.endswith(".tsv"):
        with open(DATA / file, newline="") as f:
            return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[:n]
    with open(DATA / file) as f:
        return [json.loads(next(f)) for _ in range(n)]


def _requests(task: str, d: dict) -> tuple[list[tuple[str, str]], list[str], int]:
    """(context, continuation) pairs, the choice strings lm-eval normalises acc_norm by, gold index:
    lm-eval's upstream prompts (piqa.yaml, arc_easy.yaml, openbookqa.yaml, super_glue boolq / copa,
    winogrande preprocess, glue rte) written out from the raw fields."""
    if task == "winogrande":  # partial scoring: one continuation under each filled-in context
        return [(c, " " + d["continuation"]) for c in d["context_options"]], d["context_options"], d["gold"]
    if task == "rte":
        ctx = f"{d['sentence1']}\nQuestion: {d['sentence2']} True or False?\nAnswer:"
        return [(ctx, " " + c) for c in ("True", "False")], ["True", "False"], int(d["label"])
    q, choices = d["query"], d["choices"]
    ctx = {"piqa": q + "Answer:", "arc_easy": q + "\nAnswer:", "arc_challenge": q + "\nAnswer:",
           "openbookqa": q, "copa": q, "boolq": q.removeprefix("Passage: ") + "\nAnswer:"}[task]
    if task == "copa":  # lm-eval's copa choices carry their own leading space, then the " " delimiter
        choices = [" " + c for c in choices]
    return [(ctx, " " + c) for c in choices], choices, int(d["gold"])


@torch.no_grad()
def _loglik(model, tok, ctx: str, cont: str) -> float:
    c = tok(ctx, add_special_tokens=False)["input_ids"]
    w = tok(ctx + cont, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([w])  # (1, T)
    logp = model(ids).logits.float().log_softmax(-1)[0]  # (T, vocab)
    tgt = ids[0, len(c):]  # (T - len(c),)
    return logp[len(c) - 1: len(w) - 1].gather(-1, tgt[:, None]).sum().item()


@pytest.fixture(scope="module")
def model_tok():
    # 4096 positions: no boolq passage gets truncated, so the oracle needs no truncation rule
    return tiny_model("llama", seed=1, max_position_embeddings=4096), byte_tokenizer()


@pytest.fixture(scope="module")
def all_offline(model_tok):
    model, tok = model_tok
    raw, ran = zs.run_lm_eval(model, tok, list(zs.LOCAL_TASKS), limit=LIMIT, batch_size=4,
                              tasks_dir=DATA, log_samples=True)
    return raw, ran


@pytest.mark.parametrize("task", list(zs.LOCAL_TASKS))
def test_offline_task_matches_oracle(task, model_tok, all_offline):
    model, tok = model_tok
    raw, ran = all_offline
    assert ran[task] == f"llmprune_{task}"
    samples = sorted(raw["samples"][ran[task]], key=lambda s: s["doc_id"])
    docs = _rows(zs.LOCAL_TASKS[task][1], LIMIT)
    assert len(samples) == LIMIT
    accs, norms = [], []
    for s, d in zip(samples, docs):
        pairs, choices, gold = _requests(task, d)
        assert [tuple(a) for a in s["arguments"]] == pairs  # lm-eval built the prompts we expect
        lls = torch.tensor([_loglik(model, tok, c, x) for c, x in pairs])
        got = torch.tensor([r[0] for r in s["filtered_resps"]], dtype=lls.dtype)
        torch.testing.assert_close(got, lls, rtol=1e-4, atol=1e-3)
        accs.append(float(lls.argmax() == gold))
        norms.append(float((lls / torch.tensor([float(len(c)) for c in choices])).argmax() == gold))
    res = zs.summarize(raw, ran)[task]
    assert res["n"] == LIMIT and res["source"] == f"llmprune_{task}"
    assert res["acc"] == pytest.approx(sum(accs) / LIMIT)
    if task in ("piqa", "arc_easy", "arc_challenge", "openbookqa"):  # lm-eval's tasks with acc_norm
        assert res["acc_norm"] == pytest.approx(sum(norms) / LIMIT)
    else:
        assert res["acc_norm"] is None


def test_summary_mean_and_names(all_offline):
    raw, ran = all_offline
    out = zs.summarize(raw, ran)
    assert set(out) == set(zs.LOCAL_TASKS) | {"mean"}
    assert out["mean"] == pytest.approx(sum(out[t]["acc"] for t in zs.LOCAL_TASKS) / len(zs.LOCAL_TASKS))


def test_yaml_data_files_match_table():
    for task, (name, file) in zs.LOCAL_TASKS.items():
        text = next(p.read_text() for p in DATA.glob("*.yaml") if f"task: {name}\n" in p.read_text())
        assert re.search(rf"data_files: {re.escape(file)}\n", text), task
        assert (DATA / file).is_file()


def test_zeroshot_reads_tasks_dir_and_moves_nothing(tmp_path, model_tok):
    model, tok = model_tok
    (tmp_path / "copa.jsonl").write_text("".join(json.dumps(d) + "\n" for d in _rows("copa.jsonl", 3)))
    out = zs.zeroshot(model, tok, ["copa"], tasks_dir=tmp_path, device="cpu")  # no limit: the whole file
    assert out["copa"]["n"] == 3 and out["mean"] == out["copa"]["acc"]


def test_unreachable_hub_uses_shipped_tasks(monkeypatch, model_tok):
    model, tok = model_tok
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(zs, "_hub_reachable", lambda timeout=3.0: False)
    out = zs.zeroshot(model, tok, "rte", limit=2)
    assert out["rte"]["source"] == "llmprune_rte" and out["rte"]["n"] == 2


def test_builtin_data_failure_falls_back(monkeypatch, model_tok):
    """Online mode where lm-eval's own piqa cannot fetch its data: the shipped copy runs instead."""
    model, tok = model_tok
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # makes the builtin download fail fast
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(zs, "_env_offline", lambda: False)
    monkeypatch.setattr(zs, "_hub_reachable", lambda timeout=3.0: True)
    out = zs.zeroshot(model, tok, ["piqa"], limit=1)
    assert out["piqa"]["source"] == "llmprune_piqa" and out["piqa"]["n"] == 1


def test_env_offline_flags(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    assert not zs._env_offline()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "true")
    assert zs._env_offline()
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    assert not zs._env_offline()


@pytest.mark.parametrize("tasks, match", [
    (["piqa", "mmlu"], "unknown zero-shot task mmlu: valid tasks are boolq, rte"),
    ("", "no zero-shot task given"),
    (["hellaswag"], "hellaswag needs the Hub.*offline tasks are boolq, rte, winogrande"),
    (["lambada", "piqa"], "lambada needs the Hub"),
])
def test_bad_tasks(tasks, match, monkeypatch, model_tok):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LLMPruneError, match=match):
        zs.zeroshot(*model_tok, tasks, limit=1)


@pytest.mark.parametrize("limit", [0, -3, 1.5, True, "5"])
def test_bad_limit(limit, model_tok):
    with pytest.raises(LLMPruneError, match="--limit .* must be >= 1"):
        zs.zeroshot(*model_tok, ["piqa"], limit=limit, tasks_dir=DATA)


def test_bad_tasks_dir(tmp_path, model_tok):
    with pytest.raises(LLMPruneError, match=r"has no rte_dev.tsv \(needed by rte\)"):
        zs.zeroshot(*model_tok, ["rte"], limit=1, tasks_dir=tmp_path)
    with pytest.raises(LLMPruneError, match="is not a folder"):
        zs.zeroshot(*model_tok, ["rte"], limit=1, tasks_dir=tmp_path / "nope")
    assert len(str(LLMPruneError("x")).splitlines()) == 1


def test_check_tasks_normalises():
    assert zs.check_tasks(" piqa, copa,piqa ") == ["piqa", "copa"]
    assert set(zs.LOCAL_TASKS) < set(zs.HUB_TASKS) and zs.HUB_TASKS["lambada"] == "lambada_openai"


def test_builtin_task_folders_exist():
    """The fast online path indexes only these lm-eval folders; each must define its task."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    for name, folder in zs._HUB_DIRS.items():
        text = "".join(p.read_text() for p in (root / folder).glob("*.yaml"))
        assert f"task: {zs.HUB_TASKS[name]}\n" in text, name


def test_caller_rng_untouched(tmp_path, model_tok):
    """lm-eval reseeds every generator; zeroshot must hand the caller's streams back as they were."""
    import random

    import numpy as np

    (tmp_path / "copa.jsonl").write_text("".join(json.dumps(d) + "\n" for d in _rows("copa.jsonl", 1)))
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    expect = torch.rand(3), random.random(), np.random.rand()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    zs.zeroshot(*model_tok, ["copa"], tasks_dir=tmp_path)
    assert torch.equal(torch.rand(3), expect[0]) and random.random() == expect[1] and np.random.rand() == expect[2]


def test_summarize_reads_lm_eval_keys():
    """Shapes of lm-eval 0.4.13 output for a builtin multiple-choice task and for lambada_openai."""
    raw = {"results": {"piqa": {"alias": "piqa", "acc,none": 0.5, "acc_norm,none": 0.75, "acc_stderr,none": "N/A"},
                       "lambada_openai": {"acc,none": 0.25, "perplexity,none": 80.5}},
           "n-samples": {"piqa": {"original": 1838, "effective": 4}, "lambada_openai": {"original": 5153, "effective": 8}}}
    out = zs.summarize(raw, {"piqa": "piqa", "lambada": "lambada_openai"})
    assert out["piqa"] == {"acc": 0.5, "acc_norm": 0.75, "n": 4, "source": "piqa"}
    assert out["lambada"] == {"acc": 0.25, "acc_norm": None, "n": 8, "source": "lambada_openai", "ppl": 80.5}
    assert out["mean"] == pytest.approx(0.375)


def test_yaml_standalone_reads_shipped_file():
    """Without llmprune's metadata (e.g. `lm_eval --include_path llmprune/eval/tasks`), the loader
    finds the data beside the YAMLs."""
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(DATA), include_defaults=False)
    task = tm.load(["llmprune_rte"])["tasks"]["llmprune_rte"]
    docs = task.test_docs()
    assert len(docs) == 277 and docs[0]["sentence2"] == _rows("rte_dev.tsv", 1)[0]["sentence2"]


# --- a model left on disk, scored block by block (eval/blockwise.py) ------------------------------------------

def test_plan_batches_longest_first_and_passes_within_the_budget():
    from llmprune.eval.blockwise import plan

    lengths = [5, 17, 3, 17, 9, 40, 1, 8, 2]
    passes = plan(lengths, 2, 40)
    assert sorted(i for p in passes for b in p for i in b) == list(range(len(lengths)))
    assert [[[lengths[i] for i in b] for b in p] for p in passes] == [[[40, 17]], [[17, 9]], [[8, 5], [3, 2], [1]]]
    for p in passes:  # each batch padded to its first (longest) row; a pass over budget holds one batch
        assert len(p) == 1 or sum(len(b) * lengths[b[0]] for b in p) <= 40


@pytest.mark.parametrize("family,fmt", [("llama", "dense"), ("gemma2", "dense"), ("llama", "w4s24"),
                                        ("qwen3_moe", "dense"), ("llama", "slicegpt"), ("llama", "slicegpt-w4g128")])
def test_blockwise_scores_what_hflm_scores_on_the_whole_model(family, fmt, tmp_path, monkeypatch):
    """Every request of every offline task gets the log-likelihood and greedy flag lm-eval's HFLM gives
    the whole model (lm-eval's prompts, and its left truncation: 256 positions cut the boolq passages),
    walked in several passes with one block in memory; gemma2 soft-caps its logits and ties its head;
    a packed output is scored through its packed modules; a Mixture-of-Experts checkpoint's experts are
    fused as each block is read; a SliceGPT output's blocks carry their residual shortcuts, its last one
    widening the stream back to the head's full width (packed too: its shortcuts dense)."""
    from llmprune import api, lazy, onload
    from llmprune.testing import hold_one_block, tiny_model_dir

    src = tiny_model_dir(tmp_path / "src", family, seed=2, max_position_embeddings=256)
    folder = src
    if fmt != "dense":
        from llmprune.cli import main
        from llmprune.testing import FAST_CLI

        folder = tmp_path / fmt
        how = ["--solver", "slicegpt"] if fmt == "slicegpt" else \
            ["--solver", "slicegpt", "--format", "w4g128", "--group-size", "16"] if fmt == "slicegpt-w4g128" else \
            ["--solver", "magnitude", "--pattern", "2:4", "--format", fmt, "--group-size", "16"]
        assert main(["compress", "--model", str(src), *how, "--out", str(folder), *FAST_CLI]) == 0
    model, _, _ = api.load(str(folder))
    tok = byte_tokenizer()
    tasks = list(zs.LOCAL_TASKS)
    whole, ran = zs.run_lm_eval(model, tok, tasks, limit=4, batch_size=3, tasks_dir=DATA, log_samples=True)
    budget = 600  # tokens of hidden states a pass may hold: several passes, most of several batches
    monkeypatch.setattr(onload, "EVAL_ACTIVATIONS", budget * model.config.hidden_size * 4)
    walks = []
    real = onload.through_blocks
    monkeypatch.setattr(onload, "through_blocks", lambda *a, **k: walks.append([b.shape for b in a[1]]) or real(*a, **k))
    lz = lazy.LazyModel(folder, torch.float32, (json.loads((folder / "llmprune.json").read_text())["format"]
                                                if fmt not in ("dense", "slicegpt") else None))
    with monkeypatch.context() as m:
        most = hold_one_block(m)
        walked, ran2 = zs.run_lm_eval(lz, tok, tasks, limit=4, batch_size=3, tasks_dir=DATA, log_samples=True)
    assert most[0] == 1 and ran2 == ran and len(walks) > 3
    assert all(sum(n * t for n, t in w) <= budget or len(w) == 1 for w in walks)
    assert all(n <= 3 for w in walks for n, _ in w) and any(len(w) > 1 for w in walks)
    widths = [t for w in walks for _, t in w]
    assert widths == sorted(widths, reverse=True)  # batches padded to their own rows, longest first
    assert all(p.device.type == "meta" for p in lz.model.parameters())
    for t in ran.values():
        a, b = (sorted(r["samples"][t], key=lambda s: s["doc_id"]) for r in (whole, walked))
        assert len(a) == len(b) == 4
        for sa, sb in zip(a, b):
            assert sa["arguments"] == sb["arguments"]
            got = torch.tensor([float(r[0]) for r in sb["filtered_resps"]])
            want = torch.tensor([float(r[0]) for r in sa["filtered_resps"]])
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
            assert [bool(r[1]) for r in sb["filtered_resps"]] == [bool(r[1]) for r in sa["filtered_resps"]]
    assert zs.summarize(walked, ran) == zs.summarize(whole, ran)


def test_requests_that_share_an_input_are_walked_once(tmp_path, monkeypatch):
    """The choices of a one-token answer share one input (the context): it is walked once and every
    choice is scored from it, each equal to the whole model's log-likelihood and greedy flag."""
    from llmprune import lazy, onload
    from llmprune.eval.blockwise import BlockwiseLM
    from llmprune.testing import tiny_model_dir

    src = tiny_model_dir(tmp_path / "src", "llama", seed=3)
    model = AutoModelForCausalLM.from_pretrained(src).eval()
    ctx = [int(t) for t in torch.randint(1, 256, (11,), generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        greedy = int(model(torch.tensor([ctx])).logits[0, -1].argmax())
    conts = [[greedy], [(greedy + 1) % 256], [greedy, 9, 2], [3]]
    requests = [(None, ctx, c) for c in conts] + [(None, ctx[:5], [4])]
    walked = []
    real = onload.through_blocks
    monkeypatch.setattr(onload, "through_blocks", lambda *a, **k: walked.extend(a[1]) or real(*a, **k))
    lm = BlockwiseLM(lazy.LazyModel(src, torch.float32), byte_tokenizer(), 1, "cpu", progress=False)
    got = lm._loglikelihood_tokens(requests)
    assert sorted(b.shape[1] for b in walked) == [5, 11, 13] and sum(b.shape[0] for b in walked) == 3
    for (_, c, x), (ll, is_greedy) in zip(requests, got):
        with torch.no_grad():
            logp = model(torch.tensor([c + x])).logits[0].double().log_softmax(-1)
        want = sum(float(logp[len(c) - 1 + k, t]) for k, t in enumerate(x))
        assert ll == pytest.approx(want, rel=1e-5, abs=1e-4)
        assert is_greedy == all(int(logp[len(c) - 1 + k].argmax()) == t for k, t in enumerate(x))
    assert got[0][1] and not got[1][1]
