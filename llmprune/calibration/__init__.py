"""Calibration data: token windows of shape (nsamples, seqlen), seeded and reproducible.

Named sets follow the papers' loaders (SparseGPT/Wanda datautils): C4 draws a random document
longer than seqlen and a random window inside it; WikiText-2 draws random windows from the joined
text. Files: .txt, .jsonl ("text"), .parquet ("text"), or .safetensors holding `input_ids`
(nsamples, seqlen) used as is, so two tools can be compared on identical tokens.

Text files are refused when they overlap the evaluation text (see check_overlap): a model
calibrated on the text it is then measured on gets a figure that is biased low.
"""
from __future__ import annotations

import functools
import hashlib
import random
import re
from pathlib import Path

import torch

from ..errors import LLMPruneError
from . import sources

NAMED = ("c4", "wikitext2")
OVERLAP_MIN_CHARS = 64  # shorter lines (headings, "Contact us", blank) are common to unrelated texts
_NONWORD = re.compile(r"\W+")


def _windows_from_stream(ids: torch.Tensor, nsamples: int, seqlen: int, rnd: random.Random, what: str):
    if ids.numel() < seqlen + 1:
        raise LLMPruneError(
            f"calibration data {what} has {ids.numel()} tokens, fewer than --seqlen + 1 = {seqlen + 1}: "
            f"give a longer text or lower --seqlen"
        )
    starts = [rnd.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])  # (nsamples, seqlen)


def _c4_windows(docs: list[str], tok, nsamples: int, seqlen: int, rnd: random.Random):
    """The SparseGPT/Wanda C4 sampler: a random document longer than seqlen, a random window in it.
    A small offline sample may hold too few long documents; then windows come from the documents
    joined into one stream (recorded in the source)."""
    lengths: dict[int, torch.Tensor] = {}
    long_docs = 0
    for i in range(len(docs)):  # count once so the fallback is decided up front, not by luck
        if len(docs[i]) > seqlen:  # characters >= tokens: a cheap pre-filter
            ids = tok(docs[i], return_tensors="pt").input_ids[0]
            lengths[i] = ids
            long_docs += ids.numel() > seqlen
    if long_docs < min(nsamples, 16):
        stream = tok("\n\n".join(docs), return_tensors="pt").input_ids[0]
        return _windows_from_stream(stream, nsamples, seqlen, rnd, "c4"), "documents joined (too few long ones)"
    out = []
    for _ in range(nsamples):
        while True:
            i = rnd.randint(0, len(docs) - 1)
            ids = lengths.get(i)
            if ids is not None and ids.numel() > seqlen:
                break
        s = rnd.randint(0, ids.numel() - seqlen - 1)
        out.append(ids[s : s + seqlen])
    return torch.stack(out), "random long document, random window"


def _file_texts(path: Path) -> list[str]:
    try:
        texts = _read_texts(path)
    except UnicodeDecodeError:
        raise LLMPruneError(f"calibration file {path} is not UTF-8 text: give a text file") from None
    except ValueError as e:  # json.JSONDecodeError is one; so are pyarrow's errors (ArrowInvalid)
        raise LLMPruneError(f"calibration file {path} cannot be read ({str(e).splitlines()[0][:120]}): "
                            f"check its format") from None
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise LLMPruneError(f"{path}: a 'text' field holds {type(bad).__name__} {bad!r:.40}, not a string")
    return texts


def _read_texts(path: Path) -> list:
    suf = path.suffix.lower()
    if suf == ".txt":
        return [path.read_text(encoding="utf-8")]
    if suf == ".jsonl":
        import json

        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if rows and not all(isinstance(r, dict) and "text" in r for r in rows):
            raise LLMPruneError(f"{path}: every jsonl row needs a 'text' field")
        return [r["text"] for r in rows]
    if suf == ".parquet":
        import pyarrow.parquet as pq

        try:
            t = pq.read_table(path)
        except OSError as e:  # pyarrow: not a parquet file (ArrowInvalid is a ValueError)
            raise ValueError(str(e)) from None
        if "text" not in t.column_names:
            raise LLMPruneError(f"{path}: parquet needs a 'text' column (has {t.column_names})")
        return [str(x) for x in t.column("text").to_pylist()]
    raise LLMPruneError(f"calibration file {path} has an unknown type: use .txt, .jsonl, .parquet or .safetensors")


def _units(texts):
    """Each line of the texts, normalized (every run of non-word characters -> one space, case folded,
    so WikiText's " @-@ " / " , " spacing matches plain text), if it keeps >= OVERLAP_MIN_CHARS chars."""
    for text in texts:
        for line in text.split("\n"):
            u = _NONWORD.sub(" ", line).strip().casefold()
            if len(u) >= OVERLAP_MIN_CHARS:
                yield u


def _digest(unit: str) -> bytes:
    return hashlib.blake2b(unit.encode("utf-8"), digest_size=8).digest()


@functools.lru_cache(maxsize=1)
def _eval_digests() -> dict[bytes, str]:
    """Digest of each evaluation line -> the set it belongs to (built once per process, ~0.2 s)."""
    e = sources.C4_EVAL_DOCS
    sets = (("the WikiText-2 test text", sources.wikitext2_test_rows()),
            (f"the C4 evaluation docs {e.start}-{e.stop - 1}", sources.c4_eval_docs_offline()))
    out: dict[bytes, str] = {}
    for name, texts in sets:
        for u in _units(texts):
            out.setdefault(_digest(u), name)
    return out


def check_overlap(texts: list[str], what: str) -> str:
    """Refuse calibration text that overlaps the evaluation text; return what was checked (recorded).

    Overlap: any line of the calibration texts equals a line of an evaluation text after
    normalization (see _units; lines shorter than OVERLAP_MIN_CHARS are ignored). Compared against
    both named evaluation sets whichever the run evaluates, as shipped with the package: the
    WikiText-2 test text (the same lines as the Hub's test split) and the offline C4 evaluation docs
    (sources.C4_EVAL_DOCS). Online C4 evaluation reads the Hub's first 1,100 validation docs, which
    are not on disk and are not checked here. Only verbatim reuse is caught (modulo spacing,
    punctuation and case), not paraphrase; each calibration line costs one hash.
    """
    ev = _eval_digests()
    hits: dict[str, int] = {}
    first = None
    n = 0
    for u in _units(texts):
        n += 1
        name = ev.get(_digest(u))
        if name:
            hits[name] = hits.get(name, 0) + 1
            first = first or u
    if hits:
        k = sum(hits.values())
        raise LLMPruneError(
            f"calibration file {what} overlaps the evaluation text: {k} of its {n} lines are in "
            f"{' and '.join(hits)} (e.g. {first[:48]!r}...): remove those lines from the file, or calibrate on "
            f"other text (e.g. --calib c4)")
    e = sources.C4_EVAL_DOCS
    return (f"none: no line (>= {OVERLAP_MIN_CHARS} chars, normalized) in common with the WikiText-2 test "
            f"text or the shipped C4 evaluation docs {e.start}-{e.stop - 1}")


def token_file_width(spec: str) -> int | None:
    """The window length of a token-id calibration file (.safetensors `input_ids`, used as is: --seqlen does not
    cut it), read from its header alone; None for a named set, a text file, or a file `load` will refuse."""
    path = Path(spec).expanduser()
    if spec in NAMED or path.suffix.lower() != ".safetensors" or not path.is_file():
        return None
    from ..lazy import safetensors_header

    try:
        shape = safetensors_header(path)[0]["input_ids"]["shape"]
    except (OSError, ValueError, KeyError, TypeError, MemoryError, OverflowError):
        return None  # (load names what is wrong with it)
    return shape[1] if isinstance(shape, list) and len(shape) == 2 else None


def check_width(spec: str, context: int | None) -> int | None:
    """A token-id file whose windows are longer than the model's context (`context`: max_position_embeddings,
    None: unknown) refused before any work; returns its width (token_file_width: None for anything else, whose
    `--seqlen` the caller checks instead)."""
    width = token_file_width(spec)
    if width is not None and context and width > context:
        raise LLMPruneError(f"calibration file {spec} holds windows of {width} tokens, longer than the model's context "
                            f"({context} tokens, max_position_embeddings): cut its input_ids to {context} tokens a row "
                            f"or fewer")
    return width


def load(spec: str, tokenizer, nsamples: int = 128, seqlen: int = 2048, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Returns (input_ids (nsamples, seqlen) int64, source facts for the manifest)."""
    if nsamples < 1 or seqlen < 2:
        raise LLMPruneError("--nsamples must be >= 1 and --seqlen >= 2")
    rnd = random.Random(seed)
    info = {"name": spec, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    if spec == "c4":
        docs, where = sources.c4_docs("train")
        ids, how = _c4_windows(docs, tokenizer, nsamples, seqlen, rnd)
        info.update(source=where, sampling=how)
        return ids, info
    if spec == "wikitext2":
        text, where = sources.wikitext2("train")
        stream = tokenizer(text, return_tensors="pt").input_ids[0]
        info.update(source=where, sampling="random windows of the joined text")
        return _windows_from_stream(stream, nsamples, seqlen, rnd, "wikitext2"), info
    path = Path(spec).expanduser()
    if not path.is_file():
        raise LLMPruneError(f"unknown calibration set {spec!r}: use c4, wikitext2, or a .txt/.jsonl/.parquet/.safetensors file")
    info["source"] = str(path.resolve())
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            t = load_file(str(path)).get("input_ids")
        except Exception as e:  # noqa: BLE001
            raise LLMPruneError(f"{path} is not a readable safetensors file ({e})") from None
        if t is None or t.dim() != 2 or t.shape[1] < 2:
            raise LLMPruneError(f"{path} must hold an 'input_ids' tensor of shape (nsamples, seqlen)")
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise LLMPruneError(f"{path}: input_ids are {str(t.dtype).replace('torch.', '')}: store token ids as "
                                f"integers (int64)")
        vocab = len(tokenizer) if tokenizer is not None else None
        if t.numel() and (int(t.min()) < 0 or (vocab is not None and int(t.max()) >= vocab)):
            raise LLMPruneError(f"{path}: input_ids range over {int(t.min())}..{int(t.max())}, outside the "
                                f"tokenizer's 0..{vocab - 1 if vocab else '?'}: tokenize with the model's tokenizer")
        info.update(nsamples=t.shape[0], seqlen=t.shape[1], sampling="used as is")
        return t.long(), info
    texts = [t for t in _file_texts(path) if t.strip()]
    if not texts:
        raise LLMPruneError(f"calibration file {path} is empty: give a file with text")
    info["eval_overlap"] = check_overlap(texts, str(path))
    stream = tokenizer("\n\n".join(texts), return_tensors="pt").input_ids[0]
    info["sampling"] = "random windows of the joined text"
    return _windows_from_stream(stream, nsamples, seqlen, rnd, str(path)), info
