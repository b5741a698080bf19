"""A compression killed (SIGKILL) after block K, then the same command again, against a run never stopped:
prints each run's seconds and whether the resumed output holds the same tensors (resume.py). For the GPU
stage `resume` of bench/gpu_kernels.sh, where the checkpointed activations live on the GPU.

    python bench/resume_check.py MODEL_DIR [--device cuda] [--nsamples 128] [--seqlen 2048] [--kill-at 1]
"""
import argparse
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

KILLER = """
import os, signal, sys
from llmprune import resume
from llmprune.cli import main
after = resume.Checkpoints.after
def dying_after(self, i, *a):
    after(self, i, *a)
    if i == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
resume.Checkpoints.after = dying_after
sys.exit(main({argv!r}))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--kill-at", type=int, default=1, help="killed once block K and its checkpoint are done")
    ap.add_argument("--solver", default="sparsegpt")
    ap.add_argument("--work", default="/tmp/resume-check")
    a = ap.parse_args()
    from safetensors.torch import load_file

    work = Path(a.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    argv = ["compress", "--model", a.model, "--solver", a.solver, "--pattern", "2:4", "--device", a.device,
            "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--calib", "wikitext2", "--eval", "none",
            "--no-progress", "--checkpoint-every", "0"]
    runs = {}
    for name, code in (("reference", None), ("killed", KILLER), ("resumed", None)):
        out = work / ("reference" if name == "reference" else "out")
        cmd = [sys.executable, "-m", "llmprune.cli", *argv, "--out", str(out)] if code is None else \
            [sys.executable, "-c", code.format(kill_at=a.kill_at, argv=[*argv, "--out", str(out)])]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        runs[name] = round(time.perf_counter() - t0, 1)
        want = -signal.SIGKILL if name == "killed" else 0
        print(f"{name}: rc {r.returncode} in {runs[name]} s" + (f"; {r.stderr.strip()[-600:]}" if r.returncode != want
                                                                 else ""))
        if r.returncode != want:
            return 1
        if name == "killed":
            left = [p for p in work.iterdir() if p.name.startswith(".out.tmp-")]
            state = json.loads((left[0] / ".resume" / "state.json").read_text())
            size = sum(f.stat().st_size for f in left[0].rglob("*") if f.is_file())
            print(f"  left {left[0].name}: {size / 1e9:.2f} GB, checkpoint at block {state['next_block']} of "
                  f"{state['blocks']}, activations {state['hidden']}")
        if name == "resumed":
            print("  " + next(ln for ln in r.stderr.splitlines() if "resuming" in ln))
    m = json.loads((work / "out" / "llmprune.json").read_text())
    ref = json.loads((work / "reference" / "llmprune.json").read_text())
    print(f"resumed: {m['resumed']}; peak GPU MiB {m.get('peak_gpu_mib')} (reference {ref.get('peak_gpu_mib')}); "
          f"compress_s {m['timings']['compress_s']} (reference {ref['timings']['compress_s']})")
    w = [{k: v for f in sorted((work / d).glob("*.safetensors")) for k, v in load_file(f).items()}
         for d in ("reference", "out")]
    same = w[0].keys() == w[1].keys() and all(bool((w[0][k] == w[1][k]).all()) for k in w[0])
    print(f"tensors identical: {same} ({len(w[0])} tensors); sparsity {m['sparsity']['measured']} "
          f"(reference {ref['sparsity']['measured']})")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
