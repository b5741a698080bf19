import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Triton reads its interpreter flag when @triton.jit decorates a function (its own tl.zeros & co. included), so
# it is set before any test module imports triton: transformers 5.17 imports it with AutoModelForCausalLM, and
# compressed-tensors on import. Every test computes on the CPU, where the Triton kernels run only interpreted
# (tests/test_compile.py compiles for sm_90 in subprocesses without the flag).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    from llmprune.testing import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "llama", "llama", seed=0)


@pytest.fixture(scope="session")
def calib_txt(tmp_path_factory):
    from llmprune.testing import random_text

    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(random_text(4000, seed=1))
    return p


@pytest.fixture
def live_hessians(monkeypatch):
    """Call it to make the engine's accumulators record, as each is made, the bytes of X^T X alive in all of
    them; it returns [peak] (call again to start a new count)."""
    import weakref

    from llmprune import walker
    from llmprune.stats import LayerStats

    def start() -> list[int]:
        live, peak = weakref.WeakSet(), [0]

        class Tracked(LayerStats):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                live.add(self)
                peak[0] = max(peak[0], sum(4 * s.in_features ** 2 for s in live if s.xtx is not None))

        monkeypatch.setattr(walker, "LayerStats", Tracked)
        return peak

    return start


@pytest.fixture(scope="session")
def pruned_24(tmp_path_factory, tiny_dir, calib_txt):
    """The tiny model pruned 2:4 by Wanda, as a dense llmprune output folder."""
    from llmprune.cli import main
    from llmprune.testing import FAST_CLI

    out = tmp_path_factory.mktemp("p") / "w24"
    assert main(["compress", "--model", str(tiny_dir), "--pattern", "2:4", "--calib", str(calib_txt),
                 "--out", str(out), *FAST_CLI]) == 0
    return out
