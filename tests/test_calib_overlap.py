"""Calibration never sees the evaluation text: offline C4 takes disjoint halves of the shipped file,
and a user's calibration file that shares lines with an evaluation set is refused."""
import json

import pyarrow.parquet as pq
import pytest

from llmprune import calibration
from llmprune.calibration import sources
from llmprune.errors import LLMPruneError
from llmprune.eval.perplexity import eval_tokens
from llmprune.testing import byte_tokenizer, random_text

PARQUET = sources.DATA / "c4_validation_sample.parquet"


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def shipped():
    """The shipped C4 docs read straight from the parquet, not through llmprune."""
    return [str(t) for t in pq.read_table(PARQUET).column("text").to_pylist()]


def test_offline_c4_calibration_and_evaluation_are_disjoint(tok, shipped):
    assert not sources.online()  # conftest forces offline
    assert len(shipped) == 1000
    calib, cwhere = sources.c4_docs("train")
    evald, ewhere = sources.c4_docs("validation")
    assert calib == shipped[500:] and evald == shipped[:500]
    assert "docs 500-999" in cwhere and "docs 0-499" in ewhere
    # no document, and no line of one, in both halves
    assert not set(calib) & set(evald)
    lines = {ln.strip() for d in evald for ln in d.split("\n") if ln.strip()}
    assert not [ln for d in calib for ln in d.split("\n") if ln.strip() in lines]
    # the evaluated text (decoded back from the byte-level tokens) holds every eval doc and no calib doc
    ids, where = eval_tokens("c4", tok)
    assert where.startswith("offline:c4_validation_sample.parquet docs 0-499")
    text = tok.decode(ids)
    assert text == " ".join(shipped[:500])
    assert not [d for d in calib if d in text]
    # and the calibration windows come from the calibration docs only
    windows, info = calibration.load("c4", tok, nsamples=8, seqlen=128, seed=0)
    assert "docs 500-999" in info["source"]
    for row in windows:
        w = tok.decode(row)
        assert w not in text and any(w in d for d in calib)


def _wt2_line():
    return next(r for r in sources.wikitext2_test_rows() if len(r) > 300)


def test_file_with_wikitext2_test_lines_is_refused(tmp_path, tok):
    row = _wt2_line()
    p = tmp_path / "mine.txt"
    p.write_text(random_text(300, seed=1) + "\n" + row + "\n" + random_text(300, seed=2))
    with pytest.raises(LLMPruneError, match=r"overlaps the evaluation text: 1 of its 3 lines are in the WikiText-2 "
                                            r"test text .*remove those lines") as e:
        calibration.load(str(p), tok, nsamples=2, seqlen=32)
    assert "\n" not in str(e.value)
    # the same paragraph detokenized (plain hyphens and commas, no " @-@ "), in a jsonl row: still refused
    plain = row.replace(" @-@ ", "-").replace(" @,@ ", ",").replace(" @.@ ", ".").replace(" ,", ",").replace(" .", ".")
    assert plain != row
    q = tmp_path / "mine.jsonl"
    q.write_text(json.dumps({"text": "Intro line.\n" + plain.upper()}) + "\n" + json.dumps({"text": random_text(99)}))
    with pytest.raises(LLMPruneError, match="WikiText-2 test text"):
        calibration.load(str(q), tok, nsamples=2, seqlen=32)


def test_file_with_c4_eval_docs_is_refused(tmp_path, tok, shipped):
    import pyarrow as pa

    p = tmp_path / "web.parquet"
    pq.write_table(pa.table({"text": shipped[600:610] + [shipped[42]]}), p)
    with pytest.raises(LLMPruneError, match="C4 evaluation docs 0-499"):
        calibration.load(str(p), tok, nsamples=2, seqlen=32)


def test_unrelated_files_pass_and_record_the_check(tmp_path, tok, shipped):
    # real web text (the C4 calibration docs), real-looking prose and random words: no false positive
    p = tmp_path / "calib_docs.txt"
    p.write_text("\n\n".join(shipped[500:]))
    ids, info = calibration.load(str(p), tok, nsamples=4, seqlen=64)
    assert ids.shape == (4, 64) and info["eval_overlap"].startswith("none")
    q = tmp_path / "words.txt"
    q.write_text("\n".join(random_text(60, seed=s) for s in range(50)))
    _, info = calibration.load(str(q), tok, nsamples=2, seqlen=64)
    assert "WikiText-2" in info["eval_overlap"]
    # short lines shared with the evaluation text (headings) do not count
    heading = next(r for r in sources.wikitext2_test_rows() if r.strip().startswith("="))
    r = tmp_path / "headings.txt"
    r.write_text(heading + "\n" + random_text(200, seed=3))
    calibration.load(str(r), tok, nsamples=2, seqlen=32)
