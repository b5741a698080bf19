"""Where named text sets come from: the Hub when reachable (as the papers do), else the small
real samples shipped in llmprune/calibration/data. The returned `where` string is recorded.

Offline, C4 calibration and C4 evaluation share one shipped file of 1,000 validation documents, so
they take disjoint halves of it: evaluation docs 0-499 (C4_EVAL_DOCS), calibration docs 500-999
(C4_CALIB_DOCS); both `where` strings name their range. Online they follow the papers: train shard 0
for calibration, validation shard 0 for evaluation (perplexity reads its first 1,100 docs)."""
from __future__ import annotations

import functools
import os
import socket
from pathlib import Path

DATA = Path(__file__).parent / "data"
C4_FILE = "c4_validation_sample.parquet"
C4_EVAL_DOCS = range(500)  # offline C4 evaluation reads only these shipped docs
C4_CALIB_DOCS = range(500, 1000)  # offline C4 calibration draws only from these
_WT2_NOTE = "lines of wiki.test.raw, each with its line end as in the Hub dataset's rows, blank rows missing, joined with '\\n\\n'"


def env_offline() -> bool:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set to a true value."""
    flags = (os.environ.get(k, "").strip().lower() for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    return any(f in ("1", "true", "yes", "on") for f in flags)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hub's host (HF_ENDPOINT, default huggingface.co) answers on its port."""
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@functools.lru_cache(maxsize=1)
def online() -> bool:
    """Whether the Hub is worth trying: not forced offline and its host answers."""
    return not env_offline() and hub_reachable()


def _hub(fn):
    if not online():
        return None
    try:
        return fn()
    except Exception:  # noqa: BLE001  # unreachable mid-way, gated, or renamed: fall back to the shipped sample
        return None


@functools.lru_cache(maxsize=1)
def wikitext2_test_rows() -> tuple[str, ...]:
    """The shipped WikiText-2 raw test rows, blank ones dropped, without line ends."""
    return tuple(r for r in (DATA / "wikitext2_test.raw").read_text(encoding="utf-8").split("\n") if r.strip())


@functools.lru_cache(maxsize=1)
def c4_shipped_docs() -> tuple[str, ...]:
    """All 1,000 shipped C4 validation documents, in file order."""
    import pyarrow.parquet as pq

    return tuple(str(t) for t in pq.read_table(DATA / C4_FILE).column("text").to_pylist())


def c4_eval_docs_offline() -> list[str]:
    """The shipped C4 docs offline evaluation reads (C4_EVAL_DOCS); never used for calibration."""
    docs = c4_shipped_docs()
    return list(docs[C4_EVAL_DOCS.start : C4_EVAL_DOCS.stop])


def wikitext2(split: str) -> tuple[str, str]:
    """The text joined with "\\n\\n" (the SparseGPT protocol for the test split; train is joined
    the same way here)."""
    def hub():
        from datasets import load_dataset

        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
        return "\n\n".join(rows), f"hub:wikitext/wikitext-2-raw-v1:{split}"

    got = _hub(hub)
    if got:
        return got
    # The Hub's rows keep their trailing "\n"; so do these, which makes the join token-for-token the
    # paper protocol's apart from the release's blank rows (SmolLM2: 20.43 here, 20.82 on the file as is).
    rows = [r + "\n" for r in wikitext2_test_rows()]
    where = f"offline:wikitext2_test.raw ({_WT2_NOTE})"
    if split != "test":
        where += "; the train split is not shipped: the test text is used, so calibration overlaps evaluation"
    return "\n\n".join(rows), where


def c4_docs(split: str) -> tuple[list[str], str]:
    """C4 en documents: train shard 0 (calibration, as the papers) or validation shard 0 (eval).
    Offline: shipped docs 500-999 for "train", docs 0-499 otherwise (disjoint; see the module doc)."""
    def hub():
        from datasets import load_dataset

        f = "en/c4-train.00000-of-01024.json.gz" if split == "train" else "en/c4-validation.00000-of-00008.json.gz"
        docs = load_dataset("allenai/c4", data_files={split: f}, split=split)["text"]
        return list(docs), f"hub:allenai/c4:{f}"

    got = _hub(hub)
    if got:
        return got
    e, c = C4_EVAL_DOCS, C4_CALIB_DOCS
    if split == "train":
        docs = list(c4_shipped_docs()[c.start : c.stop])
        return docs, (f"offline:{C4_FILE} docs {c.start}-{c.stop - 1} (validation docs: no train split shipped; "
                      f"evaluation uses docs {e.start}-{e.stop - 1})")
    return c4_eval_docs_offline(), (f"offline:{C4_FILE} docs {e.start}-{e.stop - 1} "
                                    f"(calibration uses docs {c.start}-{c.stop - 1})")
