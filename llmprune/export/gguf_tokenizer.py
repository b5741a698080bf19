"""The tokenizer and chat template of a GGUF export.

Tokenizer and chat template: copied key by key from the GGUF the model was loaded from (the aliases
`llama`, `gemma3` and any --model x.gguf), so the round trip GGUF -> pruned -> GGUF keeps the exact
vocabulary, pre-tokenizer and template. Otherwise read from tokenizer.json: a byte-level BPE tokenizer
with the pre-tokenizer llama.cpp knows it by (`PRE_TOKENIZERS`: the same text splits the same way), or a
SentencePiece-style one (byte fallback: Llama 2, Mistral) as llama.cpp's `llama` vocabulary; any other
is refused rather than written with a pre-tokenizer that would split text differently.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import LLMPruneError
from .source import Source

# tokenizer.json pre-tokenizers (byte-level BPE) by the name llama.cpp's `tokenizer.ggml.pre` gives them: the
# splits tokenizer.json applies, in order (a Split's regex; "<bytelevel>": ByteLevel splitting with GPT-2's
# own regex; "<digits>": Digits, one digit each), as llama.cpp's llama-vocab.cpp splits for that name, and
# whether a word found whole in the vocabulary skips the merges (BPE's ignore_merges: llama.cpp sets it for
# llama-bpe and tekken; found by running it, bench/llamacpp_families.py)
LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
               "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
TEKKEN_SPLIT = ("[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+|[^\\r\\n\\p{L}\\p{N}]?"
                "[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+"
                "|\\s+(?!\\S)|\\s+")
GPT4O_SPLIT = ("[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               "|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
               "|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
PRE_TOKENIZERS = {(("<bytelevel>",), False): "gpt-2", (("<digits>", "<bytelevel>"), False): "smollm",
                  ((LLAMA3_SPLIT,), True): "llama-bpe", ((LLAMA3_SPLIT,), False): "dbrx",  # cl100k's split: Phi-4, OLMo 2
                  ((QWEN2_SPLIT,), False): "qwen2",
                  ((TEKKEN_SPLIT,), True): "tekken",  # Mistral NeMo, Mistral Small 3
                  ((GPT4O_SPLIT,), False): "gpt-4o"}  # o200k's split


def source_gguf(src: Source) -> Path | None:
    """The GGUF file the source model was loaded from, when it is still there."""
    from .. import models

    info = src.manifest.model or {}
    if info.get("source") == "alias" and info.get("asked") in models.ALIASES:
        try:
            p = models.alias_gguf(info["asked"])
        except LLMPruneError:
            return None
    elif info.get("source") == "gguf":
        p = Path(info.get("loaded", ""))
    else:
        return None
    return p if p.is_file() else None


def copy_tokenizer(path: Path):
    """Every tokenizer.* key of the GGUF at `path`, value and type as stored: a function writing them into a
    GGUFWriter (the file is read once for every type exported)."""
    import gguf

    fields = [(key, f.contents(), f.types[0], f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
              for key, f in gguf.GGUFReader(path).fields.items() if key.startswith("tokenizer.")]

    def add(w) -> None:
        for key, value, kind, sub in fields:
            w.add_key_value(key, value, kind, sub)

    return add


def _splits(pre) -> tuple[str, ...] | None:
    """A tokenizer.json pre-tokenizer as the splits it applies, in order (PRE_TOKENIZERS); None: one
    that is not only splitting (e.g. Metaspace, Whitespace)."""
    if pre is None:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        out: tuple[str, ...] = ()
        for p in pre.get("pretokenizers", []):
            sub = _splits(p)
            if sub is None:
                return None
            out += sub
        return out
    if kind == "Split" and "Regex" in pre.get("pattern", {}) and pre.get("behavior") == "Isolated" \
            and not pre.get("invert"):
        return (pre["pattern"]["Regex"],)
    if kind == "ByteLevel":
        return ("<bytelevel>",) if pre.get("use_regex", True) else ()
    if kind == "Digits" and pre.get("individual_digits"):
        return ("<digits>",)
    return None


def tokenizer_kind(folder: Path) -> tuple[str, str | None, dict]:
    """("gpt2", llama.cpp's pre-tokenizer name, tokenizer.json) for a byte-level BPE tokenizer.json, ("llama",
    None, tokenizer.json) for a SentencePiece-style one (BPE with byte fallback: Llama 2, Mistral, Gemma); refused
    otherwise (module docstring)."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise LLMPruneError(f"{folder} has no tokenizer.json: GGUF holds the tokenizer, so export a model loaded "
                            f"from a GGUF (its tokenizer is copied) or one with a fast tokenizer")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model, decoder = tj.get("model") or {}, tj.get("decoder") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback") and decoder.get("type") == "Sequence":
        return "llama", None, tj
    if model.get("type") != "BPE" or decoder.get("type") != "ByteLevel":
        raise LLMPruneError(f"{path}: only byte-level BPE and SentencePiece-style (byte fallback) tokenizers are "
                            f"written to GGUF: export a model loaded from a GGUF (its tokenizer is copied)")
    splits = (_splits(tj.get("pre_tokenizer")), bool(model.get("ignore_merges")))
    if not model.get("merges"):
        raise LLMPruneError(f"{path}: a BPE tokenizer without merges, which llama.cpp cannot load: export a model "
                            f"loaded from a GGUF (its tokenizer is copied)")
    if splits not in PRE_TOKENIZERS:
        raise LLMPruneError(f"{path}: its pre-tokenizer is none llmprune knows llama.cpp's name of "
                            f"({', '.join(sorted(PRE_TOKENIZERS.values()))}), and another would tokenize text "
                            f"differently: export a model loaded from a GGUF (its tokenizer is copied)")
    return "gpt2", PRE_TOKENIZERS[splits], tj


def spm_scores(tj: dict) -> dict[str, float]:
    """Scores for llama.cpp's `llama` vocabulary from tokenizer.json's merges. llama.cpp merges the adjacent
    pair whose joined piece scores highest, HF's BPE the pair of lowest merge rank: a piece scores minus the
    rank of the first merge making it (gguf's LlamaHfVocab writes -1000 for every piece, which would merge
    left to right instead)."""
    out: dict[str, float] = {}
    for rank, m in enumerate(tj["model"].get("merges") or []):
        pair = m.split(" ") if isinstance(m, str) else m
        if len(pair) == 2:
            out.setdefault(pair[0] + pair[1], -float(rank + 1))
    return out


def space_prefix(tj: dict) -> bool:
    """Whether a SentencePiece-style tokenizer.json puts "▁" before the text (Llama 2, Mistral: a Prepend
    normalizer or a Metaspace pre-tokenizer; Gemma: neither), which llama.cpp reads as add_space_prefix."""
    def walk(x):
        if isinstance(x, dict):
            yield x
            for v in x.values():
                yield from walk(v)
        elif isinstance(x, list):
            for v in x:
                yield from walk(v)

    parts = [*walk(tj.get("normalizer")), *walk(tj.get("pre_tokenizer"))]
    return any(p.get("type") == "Prepend" and p.get("prepend") == "\u2581" for p in parts) or any(
        p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never" and p.get("add_prefix_space", True)
        for p in parts)


def hf_tokenizer(folder: Path, n_vocab: int):
    """The tokenizer.json of `folder` as GGUF metadata (gguf.vocab, as llama.cpp's converter reads it), padded
    to the model's vocabulary: (a function writing it into a GGUFWriter, what the manifest says of it). The
    vocabulary is read once for every type exported."""
    import gguf

    model, pre, tj = tokenizer_kind(folder)
    vocab = gguf.vocab.BpeVocab(folder) if model == "gpt2" else gguf.vocab.LlamaHfVocab(folder)
    ranked = spm_scores(tj) if model == "llama" else {}
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text.encode() if isinstance(text, str) else text)
        normal = kind == gguf.TokenType.NORMAL
        scores.append(ranked.get(tokens[-1].decode("utf-8", "replace"), score) if normal else score)
        types.append(kind)
    if len(tokens) > n_vocab:
        raise LLMPruneError(f"{folder}: the tokenizer has {len(tokens)} tokens but the model embeds {n_vocab}: GGUF "
                            f"readers size the vocabulary from the tokens; resize the embeddings or fix the tokenizer")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    special = gguf.SpecialVocab(folder, load_merges=model == "gpt2", n_vocab=len(tokens))

    def add(w) -> None:
        w.add_tokenizer_model(model)
        w.add_tokenizer_pre(pre or "default")
        if model == "llama":
            w.add_add_space_prefix(space_prefix(tj))
        w.add_token_list(tokens)
        w.add_token_scores(scores)  # transformers' reader rebuilds merges from them when a vocabulary has none
        w.add_token_types(types)
        special.add_to_gguf(w, quiet=True)

    return add, f"tokenizer.json ({'SentencePiece-style' if pre is None else 'pre-tokenizer: ' + pre})"
