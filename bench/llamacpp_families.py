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


# Qwen3.5's M-RoPE sections as wide as the tiny head rotates (transformers' default, 11 + 11 + 10, is wider than it)
QWEN35_ROPE = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25, "mrope_section": [1, 1, 0]}


# the families' variants below, by the model type each is a variant of
VARIANTS = {"llama31": "llama", "phi35": "phi3", "phi4mini": "phi3", "glm45": "glm4_moe",
            "hunyuan_alpha": "hunyuan_v1_moe", "gpt_oss_yarn": "gpt_oss", "gpt_oss_released": "gpt_oss",
            "deepseek_yarn": "deepseek_v3", "qwen35_4l": "qwen3_5_text", "lfm2_auto": "lfm2",
            "granite_rope": "granitemoehybrid", "exaone4_llama31": "exaone4", "exaone4_32b": "exaone4",
            "olmo3_yarn": "olmo3", "nemotron_nano2": "nemotron_h", "qwen3_yarn": "qwen3", "qwen3_moe_yarn": "qwen3_moe",
            "granite_dense": "granitemoehybrid", **{f"{k}_yarn": k for k in ("llama", "mistral", "glm4", "olmo2",
                                                                               "smollm3", "seed_oss", "exaone4",
                                                                               "apertus")}}
# YaRN on a 16-token original context (48 tokens exercise it), as Qwen's long-context configs have it
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16}


# families made with every norm, bias and router selection bias random (testing.random_vectors), not ones and zeros:
# a file without its q/k norms' or the router bias' values would then read otherwise
RANDOM_VECTORS = ("minimax_m2",)


def families() -> dict:
    """Every tiny family as tests/test_families.py builds it, except what llama.cpp assumes (Gemma queries scaled by
    1/sqrt(head_dim)); Llama 3.1's RoPE scaling, Phi-3's LongRoPE (Phi-3.5's; Phi-4-mini's, half of each head
    rotated) and YaRN (`YARN`, the *_yarn variants) on a 16-token original context, so that 48 tokens exercise them
    (llama.cpp: a context of 64); Qwen's with room for the token transformers 5 adds to the byte tokenizer (it loads
    it as Qwen2's). Hybrids: Qwen3.5 also with 3 DeltaNet layers before its attention one (qwen35_4l), LFM2 with its
    MLP width adjusted as its real checkpoints' (lfm2_auto), Granite 4.0-H also with RoPE (granite_rope) and
    without experts (granite_dense), Falcon-H1 with every muP multiplier away from 1, Nemotron-H with a second Mamba2
    layer after its experts."""
    from llmprune.testing import LLAMA31_ROPE, PHI3_LONGROPE, PHI4_LONGROPE

    return {"llama": {}, "llama31": {"rope_parameters": LLAMA31_ROPE},
            "mistral": {}, "mixtral": {}, "qwen2": {"vocab_size": 300}, "qwen3": {"vocab_size": 300},
            "qwen2_moe": {"vocab_size": 300}, "qwen3_moe": {"vocab_size": 300}, "phi3": {},
            "phi35": PHI3_LONGROPE, "phi4mini": PHI4_LONGROPE,
            "gpt_oss": {},
            # GLM-4.5 (a dense first block, a shared expert); GLM-4.5's variants: q/k norms, q/k/v biases, experts
            # picked from the best of 2 groups, weights scaled; OLMoE without GQA (llama.cpp's k_norm spans every
            # head); HunYuan-A13B's NTK-alpha RoPE
            "glm4_moe": {}, "glm45": {"use_qk_norm": True, "attention_bias": True, "n_group": 2, "topk_group": 1,
                                      "routed_scaling_factor": 2.5},
            "olmoe": {"num_key_value_heads": 4}, "ernie4_5_moe": {}, "hunyuan_v1_moe": {},
            # MiniMax-M2 as released: heads x head_dim twice the hidden size, half of each head rotated (its norms
            # and router bias random: RANDOM_VECTORS)
            "minimax_m2": {"head_dim": 32, "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                                               "partial_rotary_factor": 0.5}},
            "hunyuan_alpha": {"rope_parameters": {"rope_type": "dynamic", "alpha": 1000.0, "factor": 1.0,
                                                  "rope_theta": 10000.0}},
            "llama4_text": {"num_hidden_layers": 4, "no_rope_layer_interval": 4, "attention_chunk_size": 8192,
                            "floor_scale": 8192},
            "deepseek_v3": {},
            # YaRN as gpt-oss and DeepSeek-V3 ship it (gpt-oss's correction range rounded: llama.cpp rounds it)
            "gpt_oss_yarn": {"max_position_embeddings": 131072, "rope_parameters": {
                "rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": True, "original_max_position_embeddings": 4096}},
            # gpt-oss's YaRN as released (truncate false: llama.cpp rounds the range anyway, the export's note says so)
            "gpt_oss_released": {"max_position_embeddings": 131072, "rope_parameters": {
                "rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "original_max_position_embeddings": 4096}},
            "deepseek_yarn": {"max_position_embeddings": 163840, "rope_parameters": {
                "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096}},
            "qwen3_5_text": {"vocab_size": 300, "rope_parameters": QWEN35_ROPE}, "qwen3_next": {"vocab_size": 300},
            "lfm2": {}, "granitemoehybrid": {}, "granite_rope": {"position_embedding_type": "rope"},
            "nemotron_h": {"num_hidden_layers": 4, "hybrid_override_pattern": "M*EM"},
            "qwen35_4l": {"vocab_size": 300, "rope_parameters": QWEN35_ROPE, "num_hidden_layers": 4,
                          "layer_types": ["linear_attention"] * 3 + ["full_attention"]},
            "lfm2_auto": {"block_auto_adjust_ff_dim": True, "intermediate_size": 200, "block_multiple_of": 32},
            "falcon_h1": {"attention_in_multiplier": 0.5, "attention_out_multiplier": 1.5, "key_multiplier": 0.75,
                          "ssm_in_multiplier": 1.25, "ssm_out_multiplier": 0.5, "mlp_multipliers": [1.5, 0.75],
                          "ssm_multipliers": [0.5, 1.5, 0.75, 1.25, 2.0]},
            "olmo2": {}, "glm4": {}, "gemma2": {"query_pre_attn_scalar": 16},
            "gemma3_text": {"num_hidden_layers": 6, "query_pre_attn_scalar": 16},
            "smollm3": {"num_hidden_layers": 4, "no_rope_layers": [1, 1, 1, 0], "no_rope_layer_interval": 4},
            "seed_oss": {}, "apertus": {}, "exaone4": {"sliding_window": None, "layer_types": ["full_attention"] * 2},
            "exaone4_llama31": {"sliding_window": None, "layer_types": ["full_attention"] * 2,
                                "rope_parameters": LLAMA31_ROPE},
            "exaone4_32b": {"num_hidden_layers": 64, "sliding_window": 16, "sliding_window_pattern": 4,
                            "layer_types": None},
            "olmo3": {"num_hidden_layers": 4, "layer_types": ["sliding_attention"] * 3 + ["full_attention"]},
            # YaRN on a 16-token original context: OLMo 3's on its full layers alone, with an attention factor of its
            # own; Qwen3's and Qwen3-MoE's long-context configs
            "olmo3_yarn": {"num_hidden_layers": 4, "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
                           "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 500000.0},
                                               "full_attention": {"rope_type": "yarn", "rope_theta": 500000.0,
                                                                  "factor": 8.0, "attention_factor": 1.5,
                                                                  "original_max_position_embeddings": 16}}},
            "qwen3_yarn": {"vocab_size": 300, "rope_parameters": YARN},
            # Nemotron-H with dense relu^2 MLPs and no experts (Nemotron Nano 2: llama.cpp's nemotron_h)
            "nemotron_nano2": {"hybrid_override_pattern": "M*-M", "num_hidden_layers": 4},
            "qwen3_moe_yarn": {"vocab_size": 300, "rope_parameters": YARN},
            # Granite 4.0-H without experts (H-Micro): its shared MLP alone, as wide as neither the hidden size nor
            # the (unused) experts' intermediate_size
            "granite_dense": {"num_local_experts": 0, "shared_intermediate_size": 96},
            # YaRN of the Llama-like families (Mistral's with an attention factor of its own; GLM-4's on half of
            # each head; SmolLM3's on 3 layers of 4, EXAONE 4.0's on its global ones)
            "llama_yarn": {"rope_parameters": YARN},
            "mistral_yarn": {"rope_parameters": {**YARN, "attention_factor": 1.25}},
            "glm4_yarn": {"rope_parameters": {**YARN, "partial_rotary_factor": 0.5}},
            "olmo2_yarn": {"rope_parameters": YARN},
            "smollm3_yarn": {"num_hidden_layers": 4, "no_rope_layers": [1, 1, 1, 0], "no_rope_layer_interval": 4,
                             "rope_parameters": YARN},
            "seed_oss_yarn": {"rope_parameters": YARN}, "apertus_yarn": {"rope_parameters": YARN},
            "exaone4_yarn": {"sliding_window": None, "layer_types": ["full_attention"] * 2, "rope_parameters": YARN}}


def _byte_bpe(kind: str):
    """A byte-level BPE tokenizer with merges across digit runs, words and contractions, split as `kind`'s
    tokenizer.json splits (Llama 3: its regex and ignore_merges; Qwen2: digits one by one; GPT-2: ByteLevel's
    own regex; SmolLM: Digits, then ByteLevel; dbrx: cl100k's split as Llama 3's, without its whole-word rule;
    tekken: Mistral NeMo's, with the rule; gpt-4o: o200k's, without)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from llmprune.export.gguf_tokenizer import GPT4O_SPLIT, LLAMA3_SPLIT, QWEN2_SPLIT, TEKKEN_SPLIT

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
    from transformers import AutoModelForCausalLM

    import llmprune
    from llmprune.cli import main
    from llmprune.testing import FAST_CLI, random_text, random_vectors, tiny_model_dir

    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    calib = root / "calib.txt"
    calib.write_text(random_text(4000, seed=1))
    ids = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    np.save(root / "ids.npy", ids.numpy())
    fams = {k: v for k, v in families().items() if not args.only or k in args.only.split(",")}
    (root / "families.json").write_text(json.dumps(list(fams)))  # (check runs where llmprune is not)
    for name, over in fams.items():
        arch = VARIANTS.get(name, name)
        stem = name.replace("phi3", "phi")  # llama.cpp gives a general.name with "phi3" in it Phi-3's special tokens
        m = tiny_model_dir(root / f"{stem}-model", arch, **over)
        if name in RANDOM_VECTORS:
            random_vectors(AutoModelForCausalLM.from_pretrained(m)).save_pretrained(m)
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
    if not args.only:
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
    if not (root / "tokens.json").exists():  # (make --only: no tokenizers)
        return
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
    sub.choices["make"].add_argument("--only", help="these families alone (comma-separated), no tokenizers")
    r = sub.add_parser("real-make")
    r.add_argument("dir", help="a working folder")
    r.add_argument("outputs", nargs="+", help="llmprune outputs of real models (their tokenizer.json)")
    a = p.parse_args()
    {"make": make, "check": check, "real-make": real_make, "real-check": real_check}[a.cmd](a)


if __name__ == "__main__":
    main()
