import subprocess
import sys


def test_import_is_cheap_and_silent():
    code = ("import sys, llmprune; heavy = [m for m in ('torch', 'triton', 'transformers', 'lm_eval') "
            "if m in sys.modules]; print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]" and r.stderr == ""


def test_lazy_api_attributes():
    import llmprune

    assert callable(llmprune.compress) and callable(llmprune.load)
    assert llmprune.CompressConfig().solver == "wanda"


def test_cli_help_lists_every_command():
    r = subprocess.run([sys.executable, "-m", "llmprune.cli", "--help"], capture_output=True, text=True, check=True)
    for cmd in ("compress", "eval", "recover", "pack", "push", "bench", "sweep", "report"):
        assert cmd in r.stdout


def test_config_rejects_unknown_keys():
    import pytest

    from llmprune.config import CompressConfig
    from llmprune.errors import LLMPruneError

    with pytest.raises(LLMPruneError, match="unknown config keys"):
        CompressConfig.from_dict({"sparsty": 0.5})
    with pytest.raises(LLMPruneError, match="global"):
        CompressConfig(scope="global", solver="wanda")
    c = CompressConfig(nsamples=None).resolved("cpu")
    assert (c.protocol, c.nsamples, c.seqlen, c.eval_windows) == ("cpu", 64, 512, 16)
    c = CompressConfig(nsamples=7).resolved("cuda")
    assert (c.protocol, c.nsamples, c.seqlen, c.eval_windows) == ("paper", 7, 2048, 0)
