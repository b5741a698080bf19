import math

import pytest
import torch

from llmprune.errors import LLMPruneError
from llmprune.eval.perplexity import perplexity
from llmprune.testing import byte_tokenizer, tiny_model


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_ppl_matches_hf_loss(name):
    """Oracle: transformers' own shifted cross-entropy per window, averaged, exp."""
    m, tok = tiny_model(name), byte_tokenizer()
    tokens = torch.randint(0, 256, (5 * 48 + 7,))
    r = perplexity(m, tok, "wikitext2", seqlen=48, windows=4, progress=False, tokens=tokens)
    losses = [m(tokens[i * 48:(i + 1) * 48][None], labels=tokens[i * 48:(i + 1) * 48][None]).loss.item()
              for i in range(4)]
    assert r["windows"] == 4 and r["windows_available"] == 5 and r["tokens"] == 4 * 47
    assert r["ppl"] == pytest.approx(math.exp(sum(losses) / 4), rel=1e-5)


def test_ppl_on_shipped_wikitext_and_errors():
    m, tok = tiny_model("llama"), byte_tokenizer()
    r = perplexity(m, tok, "wikitext2", seqlen=64, windows=2, progress=False)
    assert r["source"].startswith("offline:wikitext2") and r["windows"] == 2 and r["ppl"] > 1
    with pytest.raises(LLMPruneError):
        perplexity(m, tok, "lambada", seqlen=64, windows=2, progress=False)
    with pytest.raises(LLMPruneError):
        perplexity(m, tok, "wikitext2", seqlen=64, windows=0, progress=False)


def test_evaluation_text_is_tokenized_once_per_tokenizer(monkeypatch):
    """The cache gives what tokenizing gives, keyed by the tokenizer's whole definition: another tokenizer
    (here one whose post-processor adds a BOS) is not served the first one's ids."""
    from tokenizers import processors

    from llmprune.eval import perplexity as ppl

    cache: dict = {}
    monkeypatch.setattr(ppl, "_TOKENS", cache)
    tok = byte_tokenizer()
    text, _ = ppl.sources.wikitext2("test")
    want = tok(text, return_tensors="pt").input_ids[0]
    first, _ = ppl.eval_tokens("wikitext2", tok)
    calls = []
    monkeypatch.setattr(type(tok), "__call__", lambda self, *a, **k: calls.append(1) or pytest.fail("tokenized again"))
    again, _ = ppl.eval_tokens("wikitext2", byte_tokenizer())  # an equal tokenizer: served from the cache
    assert torch.equal(first, want) and torch.equal(again, want) and not calls
    monkeypatch.undo()
    monkeypatch.setattr(ppl, "_TOKENS", cache)  # still holding the first tokenizer's ids
    bos = byte_tokenizer()
    bos.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 256)])
    got, _ = ppl.eval_tokens("wikitext2", bos)
    assert got[0] == 256 and torch.equal(got[1:], want)
