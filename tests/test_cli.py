"""The CLI end to end, in-process, on a tiny random model; and every bad input."""
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmprune import checkpoint
from llmprune.cli import main
from llmprune.testing import FAST_CLI


def _run(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.mark.parametrize("solver,pattern,extra", [("wanda", "unstructured", ["--sparsity", "0.5"]),
                                                  ("wanda", "2:4", []),
                                                  ("magnitude", "unstructured", ["--sparsity", "0.6", "--scope", "global"])])
def test_compress_end_to_end(tmp_path, capsys, tiny_dir, calib_txt, solver, pattern, extra):
    out = tmp_path / "out"
    rc, so, se = _run(capsys, "compress", "--model", tiny_dir, "--solver", solver, "--pattern", pattern,
                      "--calib", calib_txt, "--out", out, "--eval", "wikitext2", "--eval-seqlen", "64",
                      "--eval-windows", "2", *FAST_CLI[:-2], *extra)
    assert rc == 0, se
    m = json.loads((out / "llmprune.json").read_text())
    for k in ("format_version", "llmprune_version", "model", "solver", "pattern", "sparsity", "timings",
              "peak_rss_mib", "eval", "versions"):
        assert k in m, k
    assert m["solver"] == solver and m["pattern"] == pattern
    target = m["sparsity"]["target"]
    assert m["sparsity"]["measured"] == pytest.approx(target, abs=1e-3)
    if solver != "magnitude":
        assert m["calibration"]["nsamples"] == 6 and m["calibration"]["seqlen"] == 32
    ev = m["eval"]["wikitext2"]
    assert ev["windows"] == 2 and ev["seqlen"] == 64 and "dense_ppl" in ev and "ppl" in ev
    assert "wikitext2" in so and f"{ev['ppl']:.3f}" in so
    # a plain HF folder: loads with transformers alone, zeros in place, logits as saved
    plain = AutoModelForCausalLM.from_pretrained(out)
    w = plain.model.layers[0].mlp.down_proj.weight
    if pattern == "2:4":
        assert ((w.view(w.shape[0], -1, 4) != 0).sum(-1) <= 2).all()
    model, tok, man = checkpoint.load(out)
    ids = torch.randint(0, 256, (2, 16))
    assert torch.equal(model(ids).logits, plain(ids).logits)
    # eval on the output folder reproduces the recorded ppl and keeps the dense reference
    rc, so, _ = _run(capsys, "eval", out, "--ppl", "wikitext2", "--seqlen", "64", "--windows", "2", "--no-progress")
    assert rc == 0
    m2 = json.loads((out / "llmprune.json").read_text())
    assert m2["eval"]["wikitext2"]["ppl"] == pytest.approx(ev["ppl"], rel=1e-6)
    assert m2["eval"]["wikitext2"]["dense_ppl"] == ev["dense_ppl"]
    assert m2["eval"]["wikitext2"]["dtype"] == "float32" and "transformers" in m2["eval"]["wikitext2"]["versions"]
    # in another dtype: its own figure, and no dense figure beside it (that one was measured in float32)
    rc, _, _ = _run(capsys, "eval", out, "--seqlen", "64", "--windows", "2", "--dtype", "bfloat16", "--no-progress")
    m3 = json.loads((out / "llmprune.json").read_text())["eval"]["wikitext2"]
    assert rc == 0 and m3["dtype"] == "bfloat16" and "dense_ppl" not in m3 and m3["ppl"] != ev["ppl"]
    rc, _, _ = _run(capsys, "eval", out, "--seqlen", "64", "--windows", "2", "--dtype", "auto", "--no-progress")
    m4 = json.loads((out / "llmprune.json").read_text())["eval"]["wikitext2"]  # auto: float32 on the CPU
    assert rc == 0 and m4["dtype"] == "float32" and m4["ppl"] == pytest.approx(ev["ppl"], rel=1e-6)


def test_python_api(tmp_path, tiny_dir, calib_txt):
    import llmprune

    m = llmprune.compress(model=str(tiny_dir), solver="wanda", sparsity=0.3, calib=str(calib_txt), nsamples=4,
                          seqlen=32, out=str(tmp_path / "o"), progress=False)
    assert m["sparsity"]["measured"] == pytest.approx(0.3, abs=0.01)
    model, tok, man = llmprune.load(str(tmp_path / "o"))
    assert man["solver"] == "wanda"


BAD = [
    (["--sparsity", "1.2"], "outside [0, 1)"),
    (["--sparsity", "-0.1"], "outside [0, 1)"),
    (["--pattern", "4:4"], "0 < N < M"),
    (["--pattern", "2:4", "--sparsity", "0.7"], "contradicts"),
    (["--pattern", "2:6"], "divisible"),
    (["--solver", "nope"], "unknown solver"),
    (["--model", "not-a-model"], "unknown model"),
    (["--model", "someorg/some-model"], "cannot fetch"),
    (["--model", "llama2"], "unknown model"),
    (["--calib", "missing.txt"], "unknown calibration"),
    (["--eval", "lambada"], "unknown --eval"),
    (["--ignore", "("], "not a valid regex"),
    (["--expert-min-tokens", "-1"], "--expert-min-tokens -1 must be"),
    (["--hessian-gib", "-1"], "--hessian-gib -1.0: GiB of Hessians held at once"),
    # an int4 group dividing no layer (hidden 64): refused before pruning, not after it (and tuning none)
    (["--pattern", "2:4", "--format", "w4s24", "--quant", "gptq", "--group-size", "48"], "int4 group size 48"),
    (["--pattern", "2:4", "--format", "w4s24", "--quant", "gptq", "--group-size", "48", "--tune-steps", "2"],
     "int4 group size 48"),
]


@pytest.mark.parametrize("argv,msg", BAD)
def test_bad_input_one_line_no_output(tmp_path, capsys, tiny_dir, calib_txt, argv, msg):
    out = tmp_path / "out"
    base = {"--model": str(tiny_dir), "--calib": str(calib_txt)}
    for i in range(0, len(argv), 2):
        base[argv[i]] = argv[i + 1]
    args = [x for kv in base.items() for x in kv]
    rc, so, se = _run(capsys, "compress", *FAST_CLI, *args, "--out", out)  # argv wins over FAST_CLI
    assert rc == 2
    lines = se.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmprune: error:") and msg in lines[0], se
    assert "Traceback" not in se
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_empty_and_short_calibration_files(tmp_path, capsys, tiny_dir):
    for text, msg in [("", "empty"), ("abc", "fewer than")]:
        f = tmp_path / "c.txt"
        f.write_text(text)
        rc, _, se = _run(capsys, "compress", "--model", tiny_dir, "--calib", f, "--out", tmp_path / "o", *FAST_CLI)
        assert rc == 2 and msg in se and not (tmp_path / "o").exists()


def test_existing_out_needs_overwrite(tmp_path, capsys, tiny_dir, calib_txt):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, se = _run(capsys, "compress", "--model", tiny_dir, "--calib", calib_txt, "--out", out, *FAST_CLI)
    assert rc == 2 and "--overwrite" in se and (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces an output, never a folder that is not one
    rc, _, se = _run(capsys, "compress", "--model", tiny_dir, "--calib", calib_txt, "--out", out, "--overwrite", *FAST_CLI)
    assert rc == 2 and "holds no llmprune.json" in se and (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    rc, _, se = _run(capsys, "compress", "--model", tiny_dir, "--calib", calib_txt, "--out", out, "--overwrite", *FAST_CLI)
    assert rc == 0 and (out / "llmprune.json").exists()
    rc, _, se = _run(capsys, "compress", "--model", tiny_dir, "--calib", calib_txt, "--out", out, "--overwrite", *FAST_CLI)
    assert rc == 0 and (out / "llmprune.json").exists()


def test_an_out_whose_writing_would_lose_something_is_refused_first(tmp_path, capsys, tiny_dir, calib_txt,
                                                                     monkeypatch):
    """--overwrite deleted the source when --out was it or held it (compress, pack, recover, export), an --out
    inside the source wrote into it, and an --out under a file, or the current folder, failed with a traceback
    after the work: each is one line, before it."""
    import shutil

    src = shutil.copytree(tiny_dir, tmp_path / "sand" / "model")
    (tmp_path / "sand" / "notes.txt").write_text("mine")
    o = tmp_path / "o"
    assert _run(capsys, "compress", "--model", src, "--calib", calib_txt, "--out", o, *FAST_CLI)[0] == 0
    (tmp_path / "afile").write_text("x")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    cases = [(["compress", "--model", src, "--calib", calib_txt, "--out", tmp_path / "sand"], "holds the source"),
             (["compress", "--model", src, "--calib", calib_txt, "--out", src], "is the source"),
             (["pack", o, "--format", "sparse24", "--out", o], "is the source"),
             (["recover", o, "--steps", "1", "--out", o], "is the source"),
             (["export", o, "--to", "gguf", "--out", o], "is the source"),
             (["pack", o, "--format", "sparse24", "--out", o / "inner"], "is inside the source"),
             (["recover", o, "--steps", "1", "--out", o / "a" / "b"], "is inside the source"),
             (["export", o, "--to", "gguf", "--out", o / "inner"], "is inside the source"),
             (["compress", "--model", src, "--calib", calib_txt, "--out", src / "inner"], "is inside the source"),
             (["compress", "--model", src, "--calib", calib_txt, "--out", tmp_path / "afile" / "x"], "is a file"),
             (["compress", "--model", src, "--calib", calib_txt, "--out", "."], "the current folder"),
             (["compress", "--model", src, "--calib", calib_txt, "--out", ".."], "the current folder or one above")]
    for argv, msg in cases:
        extra = [*FAST_CLI] if argv[0] == "compress" else ["--no-progress"]
        rc, _, se = _run(capsys, *argv, *extra, "--overwrite")
        assert rc == 2 and msg in se and len(se.strip().splitlines()) == 1, (argv, se)
    assert (tmp_path / "sand" / "notes.txt").read_text() == "mine" and (src / "config.json").exists()
    assert not [f for f in [*o.iterdir(), *src.iterdir()] if f.is_dir()]  # (nothing written inside a source)
    assert json.loads((o / "llmprune.json").read_text())["steps"] == ["prune"]
    rc, _, se = _run(capsys, "compress", "--model", src, "--calib", calib_txt, "--out", tmp_path / "afile", *FAST_CLI)
    assert rc == 2 and "is a file" in se  # not "exists: pass --overwrite"


def test_interrupt_leaves_no_partial_folder(tmp_path, capsys, tiny_dir, calib_txt, monkeypatch):
    import llmprune.manifest as mf

    real = mf.write

    def interrupted(folder, manifest):  # Ctrl-C after the weights were written
        real(folder, manifest)
        raise KeyboardInterrupt

    monkeypatch.setattr(mf, "write", interrupted)
    out = tmp_path / "o"  # (with a checkpoint committed, the folder is kept for the same command: test_resume.py)
    rc, _, se = _run(capsys, "compress", "--model", tiny_dir, "--calib", calib_txt, "--out", out, *FAST_CLI,
                     "--checkpoint-every", "off")
    assert rc == 130 and "interrupted" in se
    assert list(Path(tmp_path).iterdir()) == []


def test_a_stop_ignores_the_next_ones():
    """Ctrl-C or SIGTERM stops the run once; from then on both are ignored (the clean-up and the exit go on)."""
    import signal

    from llmprune import cli
    from llmprune.errors import Terminated

    before = {s: signal.getsignal(s) for s in cli.STOPS}
    try:
        for signum, stop in ((signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, Terminated)):
            for s, handler in before.items():
                signal.signal(s, handler)
            with pytest.raises(KeyboardInterrupt) as e:
                cli._stopped(signum, None)
            assert type(e.value) is stop
            assert all(signal.getsignal(s) == signal.SIG_IGN for s in cli.STOPS)
            signal.raise_signal(signal.SIGINT)  # a second Ctrl-C: nothing
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def test_ctrl_c_again_while_stopping_does_not_cut_the_clean_up_short(tmp_path, capsys, tiny_dir, calib_txt,
                                                                      monkeypatch):
    """A second Ctrl-C while the output's temporary folder is being dealt with was a KeyboardInterrupt there; now it
    is ignored until the run returns, and a caller in this process gets its handlers back."""
    import signal

    import llmprune.manifest as mf
    from llmprune import outdir

    real_write, real_full, after = mf.write, outdir._disk_full, []

    def interrupted(folder, manifest):  # Ctrl-C after the weights were written
        real_write(folder, manifest)
        signal.raise_signal(signal.SIGINT)
        pytest.fail("Ctrl-C did not stop the run")

    def again(e):  # and again while the clean-up runs
        signal.raise_signal(signal.SIGINT)
        after.append(1)
        return real_full(e)

    monkeypatch.setattr(mf, "write", interrupted)
    monkeypatch.setattr(outdir, "_disk_full", again)
    rc, _, se = _run(capsys, "compress", "--model", tiny_dir, "--calib", calib_txt, "--out", tmp_path / "o", *FAST_CLI,
                     "--checkpoint-every", "off")
    assert rc == 130 and se.strip() == "llmprune: interrupted; the output being written was not" and after
    assert list(Path(tmp_path).iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


STOPPED_PROGRAM = """
import atexit, signal, sys
from llmprune import placement
placement.check_one_process = lambda *a: signal.raise_signal(signal.SIGINT)  # Ctrl-C as the run starts

class Err:  # and again while the run says it stopped
    def __init__(self, f):
        self.f, self.n = f, 0
    def write(self, s):
        self.n += 1
        if self.n == 1:
            signal.raise_signal(signal.SIGINT)
        return self.f.write(s)
    def flush(self):
        self.f.flush()

sys.stderr = Err(sys.stderr)
atexit.register(lambda: [signal.raise_signal(signal.SIGINT) for _ in range(2)])  # and twice more during the exit
sys.argv = ["llmprune", "eval", "x"]
from llmprune.cli import main
sys.exit(main())
"""


def test_repeated_ctrl_c_ends_the_program_quietly():
    """The third Ctrl-C, during the exit, printed a traceback from an atexit callback: after the first, the program
    ignores them until it has exited with its one line."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", STOPPED_PROGRAM], check=False, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 130 and r.stderr == "llmprune: interrupted; the output being written was not\n", r.stderr


def test_out_of_memory_is_one_line_and_leaves_no_partial_folder(tmp_path, capsys, tiny_dir, calib_txt,
                                                                 monkeypatch):
    """A device running out of memory mid-command (here: when the manifest is written) prints one line that
    names the fixes, exits 2, and leaves no half-written output folder."""
    import torch

    import llmprune.manifest as mf

    def oom(folder, manifest):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail")

    monkeypatch.setattr(mf, "write", oom)
    out = tmp_path / "o"  # (with a checkpoint committed, the folder is kept for the same command: test_resume.py)
    rc, _, se = _run(capsys, "compress", "--model", tiny_dir, "--calib", calib_txt, "--out", out, *FAST_CLI,
                     "--checkpoint-every", "off")
    assert rc == 2 and len(se.strip().splitlines()) == 1, se
    assert "Tried to allocate 2.00 GiB" in se and "--device cpu" in se and "Traceback" not in se
    assert list(Path(tmp_path).iterdir()) == []


def test_eval_of_a_folder_without_manifest_and_missing_alias_package(tmp_path, capsys, monkeypatch):
    from llmprune import models

    monkeypatch.setitem(models.ALIASES, "ghost", models.Alias("x", "no_such_pkg_xyz", "pip install ghost-pkg==1"))
    rc, _, se = _run(capsys, "compress", "--model", "ghost", "--out", tmp_path / "o", *FAST_CLI)
    assert rc == 2 and "pip install ghost-pkg==1" in se
