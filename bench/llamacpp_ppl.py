"""WikiText-2 perplexity of a GGUF file through llama.cpp (llama-cpp-python), on the very token windows
llmprune's own evaluation uses, so the two figures differ only by the engine and the file's weights.

Two steps, two environments (llama-cpp-python is built from PyPI in its own venv, never in CI):

    # 1. the windows, with llmprune (tokenized as `llmprune eval` does: rows joined "\\n\\n", no BOS)
    python bench/llamacpp_ppl.py windows OUT_DIR --seqlen 2048 --windows 16 --npy /tmp/wt2-16x2048.npy
    # 2. the perplexity, with llama.cpp: next-token NLL of every position, mean over all windows, exp
    /root/venvs/llamacpp/bin/python bench/llamacpp_ppl.py ppl FILE.gguf --npy /tmp/wt2-16x2048.npy
    # 3. llmprune's own figure of an output on the same windows (llmprune.load, fp32)
    python bench/llamacpp_ppl.py ref OUT_DIR --npy /tmp/wt2-16x2048.npy
"""
from __future__ import annotations

import argparse
import json
import math
import time


def windows(args) -> None:
    import numpy as np

    import llmprune
    from llmprune.eval.perplexity import eval_tokens

    _, tok, _ = llmprune.load(args.src)
    ids, where = eval_tokens("wikitext2", tok)
    n = min(args.windows, ids.numel() // args.seqlen)
    data = ids[: n * args.seqlen].view(n, args.seqlen).numpy().astype(np.int32)  # (windows, seqlen)
    np.save(args.npy, data)
    print(json.dumps({"npy": args.npy, "windows": n, "seqlen": args.seqlen, "source": where}))


def ref(args) -> None:
    import numpy as np
    import torch

    import llmprune
    from llmprune.eval.perplexity import window_nll

    model, _, _ = llmprune.load(args.src)
    data = torch.from_numpy(np.load(args.npy)).long()  # (windows, seqlen)
    t0 = time.perf_counter()
    nll = sum(float(window_nll(model, w[None]).sum()) for w in data)
    n, seqlen = data.shape
    print(json.dumps({"src": args.src, "ppl": math.exp(nll / (n * (seqlen - 1))), "windows": int(n),
                      "seqlen": int(seqlen), "seconds": round(time.perf_counter() - t0, 1),
                      "engine": "llmprune.load (fp32)"}))


def ppl(args) -> None:
    import numpy as np
    from llama_cpp import Llama

    data = np.load(args.npy)  # (windows, seqlen)
    n, seqlen = data.shape
    llm = Llama(model_path=args.gguf, n_ctx=seqlen, n_batch=args.batch, n_ubatch=args.batch, logits_all=True,
                n_threads=args.threads, verbose=False)
    t0 = time.perf_counter()
    nll, count = 0.0, 0
    for w in data:
        llm.reset()
        llm.eval(w.tolist())
        for s in range(0, seqlen - 1, 256):  # rows in chunks: a 262k vocabulary (Gemma-3) stays small
            e = min(s + 256, seqlen - 1)
            logits = np.asarray(llm.scores[s:e], dtype=np.float64)  # (rows, vocab)
            m = logits.max(1, keepdims=True)
            logz = m[:, 0] + np.log(np.exp(logits - m).sum(1))  # (rows,)
            nll += float((logz - logits[np.arange(e - s), w[s + 1 : e + 1]]).sum())
        count += seqlen - 1
    print(json.dumps({"gguf": args.gguf, "ppl": math.exp(nll / count), "windows": int(n), "seqlen": int(seqlen),
                      "tokens": count, "seconds": round(time.perf_counter() - t0, 1), "threads": args.threads,
                      "engine": "llama.cpp via llama-cpp-python " + __import__("llama_cpp").__version__}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("windows")
    w.add_argument("src", help="an llmprune output (its tokenizer)")
    w.add_argument("--seqlen", type=int, default=2048)
    w.add_argument("--windows", type=int, default=16)
    w.add_argument("--npy", required=True)
    q = sub.add_parser("ppl")
    q.add_argument("gguf")
    q.add_argument("--npy", required=True)
    q.add_argument("--threads", type=int, default=1, help="1: on a shared 2-core machine OpenMP's second thread "
                                                            "spins and costs 3x (bench/README.md)")
    q.add_argument("--batch", type=int, default=512)
    r = sub.add_parser("ref")
    r.add_argument("src", help="an llmprune output")
    r.add_argument("--npy", required=True)
    a = p.parse_args()
    {"windows": windows, "ppl": ppl, "ref": ref}[a.cmd](a)


if __name__ == "__main__":
    main()
