"""Every GGUF family llmprune exports, run by llama.cpp itself: a tiny random model of each (hidden 64,
2 blocks, the family's own transformers config), pruned with Wanda 50%, exported to GGUF F32, F16 and Q8_0;
llama.cpp's logits on fixed token ids against llmprune's (`llmprune.load` of the pruned folder, fp32). A fourth
file, Q8DQ, holds the Q8_0 file's values dequantized, as F32: llama.cpp runs the exported Q8_0 weights without
quantizing its activations to 8 bits as its Q8_0 kernels do, which splits a Q8_0 distance into the weights'
rounding (Q8DQ) and the kernels' (Q8_0 against Q8DQ). Then
tokenizers from tokenizer.json (each pre-tokenizer name llmprune writes, SentencePiece-style with and without
the "▁" prefix): llama.cpp's ids for a text against the tokenizer's own. The test suite reads these exports
with transformers' GGUF reader; this is the engine users serve with.

Two steps, two environments (llama-cpp-python is built from PyPI in its own venv, never in CI):

    python bench/llamacpp_families.py make /tmp/fam            # llmprune: models, exports, reference logits
    /root/venvs/llamacpp/bin/python bench/llamacpp_families.py check /tmp/fam   # llama.cpp: one JSON line each

and real vocabularies (SmolLM2's byte-level BPE, Gemma-3's 262k SentencePiece-style) read from the tokenizer.json
of llmprune outputs, on 20,000 characters of WikiText-2:

    python bench/llamacpp_families.py real-make /tmp/fam OUT1 OUT2 ...
    /root/venvs/llamacpp/bin/python bench/llamacpp_families.py real-check /tmp/fam
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

TYPES = "f32,f16,q8_0"
# tokenizers read from tokenizer.json (a model not loaded from a GGUF): what llama.cpp makes of each pre-tokenizer
# name and of a SentencePiece-style vocabulary, on a text where the splits, the whole-word rule and the merge
# order matter
TOKENIZERS = ("llama-bpe", "dbrx", "qwen2", "tekken", "gpt-4o", "gpt-2", "smollm", "spm", "spm-no-prefix")
TEXT = "the 12345 theme's I'm\n\nabc  abcd Äpfel 1234567 the theme is a theme, The THEME's Théâtre 2024/12/05 abcABC"


def families() -> dict:
    """Every tiny family as tests/test_families.py builds it, except what llama.cpp assumes (Gemma queries scaled by
    1/sqrt(head_dim)); Llama 3.1's RoPE scaling and Phi-3's LongRoPE (Phi-3.5's; Phi-4-mini's, half of each head
    rotated) on a 16-token original context, so that 48 tokens exercise them (llama.cpp: a context of 64); Qwen's
    with room for the token transformers 5 adds to the byte tokenizer (it loads it as Qwen2's)."""
    from llmprune.testing import LLAMA31_ROPE, PHI3_LONGROPE, PHI4_LONGROPE

    return {"llama": {}, "llama31": {"rope_parameters": LLAMA31_ROPE},
            "mistral": {}, "mixtral": {}, "qwen2": {"vocab_size": 300}, "qwen3": {"vocab_size": 300},
            "qwen2_moe": {"vocab_size": 300}, "qwen3_moe": {"vocab_size": 300}, "phi3": {},
            "phi35": PHI3_LONGROPE, "phi4mini": PHI4_LONGROPE,
            "olmo2": {}, "glm4": {}, "gemma2": {"query_pre_attn_scalar": 16},
            "gemma3_text": {"num_hidden_layers": 6, "query_pre_attn_scalar": 16}}


def _byte_bpe(kind: str):
    """A byte-level BPE tokenizer with merges across digit runs, words and contractions, split as `kind`'s
    tokenizer.json splits (Llama 3: its regex and ignore_merges; Qwen2: digits one by one; GPT-2: ByteLevel's
    own regex; SmolLM: Digits, then ByteLevel; dbrx: cl100k's split as Llama 3's, without its whole-word rule;
    tekken: Mistral NeMo's, with the rule; gpt-4o: o200k's, without)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llmprune.export.gguf import GPT4O_SPLIT, LLAMA3_SPLIT, QWEN2_SPLIT, TEKKEN_SPLIT

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<bos>"], vocab["<eos>"] = 256, 257
    merges = [("1", "2"), ("12", "3"), ("4", "5"), ("Ġ", "t"), ("Ġt", "h"), ("Ġth", "e"), ("t", "h"), ("th", "e"),
              ("'", "s"), ("'", "m"), ("Ċ", "Ċ"), ("b", "c"), ("a", "b"), ("Ġ", "Ġ"), ("Ġ", "1"), ("Ġ1", "2")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["Ġtheme"] = len(vocab)  # no merge makes it: only Llama 3's whole-word rule (ignore_merges) finds it
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=kind in ("llama-bpe", "tekken")))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind in ("gpt-2", "smollm"))
    split = {"llama-bpe": [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated")],
             "dbrx": [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), "isolated")],
             "qwen2": [pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated")],
             "tekken": [pre_tokenizers.Split(Regex(TEKKEN_SPLIT), "isolated")],
             "gpt-4o": [pre_tokenizers.Split(Regex(GPT4O_SPLIT), "isolated")],
             "smollm": [pre_tokenizers.Digits(individual_digits=True)], "gpt-2": []}[kind]
    tok.pre_tokenizer = pre_tokenizers.Sequence(split + [byte_level]) if split else byte_level
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")


def _spm(prefix: bool):
    """A SentencePiece-style tokenizer.json (BPE with byte fallback; Llama 2 and Mistral prepend "▁", Gemma
    does not) whose merge order matters: "bc" before "ab", so "abc" is a + bc."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    merges = [("b", "c"), ("a", "b"), ("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("h", "e"), ("▁", "a"), ("▁a", "bc"),
              ("1", "2"), ("▁", "▁")]
    for ch in "▁abcdehmt12'":
        vocab.setdefault(ch, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    norm = [normalizers.Prepend("▁")] if prefix else []
    tok.normalizer = normalizers.Sequence(norm + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def make_tokenizers(root: Path, calib: Path) -> None:
    from llmprune.cli import main
    from llmprune.testing import FAST_CLI, tiny_model

    ids = {}
    for kind in TOKENIZERS:
        tok = _spm(kind == "spm") if kind.startswith("spm") else _byte_bpe(kind)
        m, src = root / f"tok-{kind}-model", root / f"tok-{kind}-pruned"
        tiny_model("llama", vocab_size=320).save_pretrained(m)
        tok.save_pretrained(m)
        assert main([str(a) for a in ("compress", "--model", m, "--calib", calib, "--out", src, "--overwrite",
                                      *FAST_CLI)]) == 0
        assert main([str(a) for a in ("export", src, "--to", "gguf", "--type", "f32", "--out", root / f"tok-{kind}-gguf",
                                      "--overwrite", "--no-progress")]) == 0
        ids[kind] = tok(TEXT, add_special_tokens=False)["input_ids"]
    (root / "tokens.json").write_text(json.dumps({"text": TEXT, "ids": ids}))


def dequantized_copy(q8: Path, out: Path) -> None:
    """The GGUF `q8` with every tensor dequantized and stored F32, every key copied."""
    import gguf
    import numpy as np

    r = gguf.GGUFReader(q8)
    w = gguf.GGUFWriter(str(out), r.fields["general.architecture"].contents())
    for key, f in r.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            w.add_key_value(key, f.contents(), f.types[0], f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def make(args) -> None:
    import numpy as np
    import torch

    import llmprune
    from llmprune.cli import main
    from llmprune.testing import FAST_CLI, random_text, tiny_model_dir

    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    calib = root / "calib.txt"
    calib.write_text(random_text(4000, seed=1))
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    np.save(root / "ids.npy", ids.numpy())
    (root / "families.json").write_text(json.dumps(list(families())))  # (check runs where llmprune is not)
    for name, over in families().items():
        arch = {"llama31": "llama", "phi35": "phi3", "phi4mini": "phi3"}.get(name, name)
        stem = name.replace("phi3", "phi")  # llama.cpp gives a general.name with "phi3" in it Phi-3's special tokens
        m = tiny_model_dir(root / f"{stem}-model", arch, **over)
        src, out = root / f"{stem}-pruned", root / f"{name}-gguf"
        assert main([str(a) for a in ("compress", "--model", m, "--calib", calib, "--out", src, "--overwrite",
                                      *FAST_CLI)]) == 0
        assert main([str(a) for a in ("export", src, "--to", "gguf", "--type", TYPES, "--out", out, "--overwrite",
                                      "--no-progress")]) == 0
        q8 = next(out.glob("*-Q8_0.gguf"))
        dequantized_copy(q8, q8.with_name(q8.name.replace("-Q8_0.gguf", "-Q8DQ.gguf")))
        model, _, _ = llmprune.load(str(src))
        with torch.no_grad():
            np.save(root / f"{name}-logits.npy", model(ids).logits[0].float().numpy())
    make_tokenizers(root, calib)


def check(args) -> None:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    root = Path(args.dir)
    ids = np.load(root / "ids.npy")[0].tolist()
    for name in json.loads((root / "families.json").read_text()):
        want = np.load(root / f"{name}-logits.npy").astype(np.float64)
        row = {"family": name}
        for f in sorted((root / f"{name}-gguf").glob("*.gguf")):
            kind = f.stem.rsplit("-", 1)[1]
            try:
                llm = Llama(model_path=str(f), n_ctx=64, n_batch=64, logits_all=True, n_threads=1, verbose=False)
                llm.eval(ids)
                got = np.asarray(llm.scores[: len(ids)], dtype=np.float64)
                row[kind] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
                del llm
            except Exception as e:  # noqa: BLE001 - a file llama.cpp refuses is the finding
                row[kind] = f"error: {str(e)[:120]}"
        row["engine"] = "llama.cpp via llama-cpp-python " + llama_cpp.__version__
        print(json.dumps(row), flush=True)
    tokens = json.loads((root / "tokens.json").read_text())
    for kind, want in tokens["ids"].items():
        f = next((root / f"tok-{kind}-gguf").glob("*.gguf"))
        llm = Llama(model_path=str(f), vocab_only=True, verbose=False)
        got = llm.tokenize(tokens["text"].encode(), add_bos=False, special=False)
        print(json.dumps({"tokenizer": kind, "same_ids": got == want, "llama.cpp": got, "transformers": want}),
              flush=True)
        del llm


REAL_CHARS = 20000  # of WikiText-2's test text: real vocabularies on real text


def real_make(args) -> None:
    """Real vocabularies through the tokenizer.json path: each llmprune output is copied with its manifest
    saying it came from a folder (so the export reads its tokenizer.json instead of copying the source GGUF's),
    exported to GGUF F16; the tokenizer's own ids of a WikiText-2 excerpt saved beside it."""
    import shutil

    from llmprune.calibration import sources
    from llmprune.checkpoint import load_tokenizer
    from llmprune.cli import main

    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    text = sources.wikitext2("test")[0][:REAL_CHARS]
    ids = {}
    for src in args.outputs:
        name = Path(src).name
        copy = root / f"real-{name}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(src, copy)
        m = json.loads((copy / "llmprune.json").read_text())
        m["model"] = {**m["model"], "source": "folder"}
        (copy / "llmprune.json").write_text(json.dumps(m, indent=2))
        assert main(["export", str(copy), "--to", "gguf", "--type", "f16", "--out", str(root / f"real-{name}-gguf"),
                     "--overwrite", "--no-progress"]) == 0
        ids[name] = load_tokenizer(copy)(text, add_special_tokens=False)["input_ids"]
    (root / "real-tokens.json").write_text(json.dumps({"text": text, "ids": ids}))


def real_check(args) -> None:
    import llama_cpp
    from llama_cpp import Llama

    root = Path(args.dir)
    tokens = json.loads((root / "real-tokens.json").read_text())
    for name, want in tokens["ids"].items():
        f = next((root / f"real-{name}-gguf").glob("*.gguf"))
        llm = Llama(model_path=str(f), vocab_only=True, verbose=False)
        got = llm.tokenize(tokens["text"].encode(), add_bos=False, special=False)
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        print(json.dumps({"output": name, "vocabulary": llm.n_vocab(), "chars": len(tokens["text"]),
                          "tokens": len(want), "same_ids": got == want, "first_difference": first,
                          "engine": "llama.cpp via llama-cpp-python " + llama_cpp.__version__}), flush=True)
        del llm


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for cmd in ("make", "check", "real-check"):
        sub.add_parser(cmd).add_argument("dir", help="a working folder")
    r = sub.add_parser("real-make")
    r.add_argument("dir", help="a working folder")
    r.add_argument("outputs", nargs="+", help="llmprune outputs of real models (their tokenizer.json)")
    a = p.parse_args()
    {"make": make, "check": check, "real-make": real_make, "real-check": real_check}[a.cmd](a)


if __name__ == "__main__":
    main()
