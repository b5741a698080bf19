import json

import pytest
import torch
from safetensors.torch import save_file

from llmprune import calibration
from llmprune.calibration import sources
from llmprune.errors import LLMPruneError
from llmprune.testing import byte_tokenizer, random_text


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def test_txt_windows_are_slices_of_the_text_and_seeded(tmp_path, tok):
    text = random_text(500, seed=3)
    p = tmp_path / "c.txt"
    p.write_text(text)
    a, info = calibration.load(str(p), tok, nsamples=6, seqlen=32, seed=7)
    b, _ = calibration.load(str(p), tok, nsamples=6, seqlen=32, seed=7)
    c, _ = calibration.load(str(p), tok, nsamples=6, seqlen=32, seed=8)
    assert a.shape == (6, 32) and a.dtype == torch.int64
    assert torch.equal(a, b) and not torch.equal(a, c)
    stream = tok(text, return_tensors="pt").input_ids[0].tolist()
    s = "," + ",".join(map(str, stream)) + ","
    for row in a.tolist():
        assert "," + ",".join(map(str, row)) + "," in s
    assert info["source"] == str(p.resolve())


def test_jsonl_parquet_and_safetensors(tmp_path, tok):
    rows = [{"text": random_text(80, seed=i)} for i in range(5)]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ids, _ = calibration.load(str(tmp_path / "c.jsonl"), tok, nsamples=3, seqlen=40)
    assert ids.shape == (3, 40)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [r["text"] for r in rows]}), tmp_path / "c.parquet")
    ids, _ = calibration.load(str(tmp_path / "c.parquet"), tok, nsamples=3, seqlen=40)
    assert ids.shape == (3, 40)
    fixed = torch.randint(0, 256, (4, 17))
    save_file({"input_ids": fixed}, str(tmp_path / "ids.safetensors"))
    ids, info = calibration.load(str(tmp_path / "ids.safetensors"), tok, nsamples=99, seqlen=99)
    assert torch.equal(ids, fixed) and info["nsamples"] == 4 and info["seqlen"] == 17


def test_bad_files(tmp_path, tok):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(LLMPruneError, match="empty"):
        calibration.load(str(tmp_path / "empty.txt"), tok, 2, 16)
    (tmp_path / "short.txt").write_text("tiny")
    with pytest.raises(LLMPruneError, match="fewer than --seqlen"):
        calibration.load(str(tmp_path / "short.txt"), tok, 2, 16)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(LLMPruneError, match="unknown type"):
        calibration.load(str(tmp_path / "x.csv"), tok, 2, 16)
    with pytest.raises(LLMPruneError, match="unknown calibration"):
        calibration.load("nope", tok, 2, 16)


@pytest.mark.parametrize("name, content, match", [
    ("bin.txt", bytes(range(128, 256)) * 4, "not UTF-8 text"),
    ("bad.jsonl", b"not json\n", "cannot be read"),
    ("num.jsonl", b'{"text": 5}\n', "holds int 5, not a string"),
    ("mixed.jsonl", b'{"text": "a"}\n{"other": "b"}\n', "every jsonl row needs a 'text' field"),
    ("fake.parquet", b"this is not parquet", "cannot be read"),
])
def test_unreadable_files_are_one_line_errors(tmp_path, tok, name, content, match):
    """A file that is not what its name says was a traceback (UnicodeDecodeError, JSONDecodeError, pyarrow's
    ArrowInvalid, an AttributeError) after the model had loaded."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(LLMPruneError, match=match):
        calibration.load(str(tmp_path / name), tok, 2, 16)


@pytest.mark.parametrize("ids, match", [(torch.rand(2, 16), "store token ids as integers"),
                                        (torch.full((2, 16), -1), "outside the tokenizer's"),
                                        (torch.full((2, 16), 10**6), "outside the tokenizer's")])
def test_token_ids_a_model_cannot_read_are_refused(tmp_path, tok, ids, match):
    """Float ids were cast to zeros and run; ids outside the vocabulary failed deep in the embedding."""
    save_file({"input_ids": ids}, str(tmp_path / "ids.safetensors"))
    with pytest.raises(LLMPruneError, match=match):
        calibration.load(str(tmp_path / "ids.safetensors"), tok, 2, 16)


def test_offline_named_sets(tok):
    assert not sources.online()  # conftest forces offline
    ids, info = calibration.load("c4", tok, nsamples=4, seqlen=64, seed=0)
    assert ids.shape == (4, 64) and info["source"].startswith("offline:c4")
    ids2, _ = calibration.load("c4", tok, nsamples=4, seqlen=64, seed=0)
    assert torch.equal(ids, ids2)
    ids, info = calibration.load("wikitext2", tok, nsamples=2, seqlen=64)
    assert "overlaps evaluation" in info["source"]
