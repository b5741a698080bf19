"""GPTQ's scale tuning killed with SIGKILL halfway through its training, then the same `llmprune pack` command run
again (resume.py: the codes, the teacher's states and the tuning's own checkpoint are taken over), against the same
command never interrupted, on the real SmolLM2-135M pruned by Wanda to 50% and packed to w4g128 with GPTQ and
--tune-steps STEPS (8 x 256 C4 windows, a checkpoint every 10 s; the default, 600 s, fits runs of hours). Prints
each run's wall time, what the resumed run says and whether its files hold the same bytes and tuning figures;
then the cost of checkpoints: the uninterrupted run again with one after every block and step (--checkpoint-every 0).

    python bench/resume_tune.py | tee bench/results/resume_tune.txt     (env: OUT, STEPS, KILL_AT)
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from same_tensors import digest  # (sha256 of every weights file, in order)

OUT = Path(os.environ.get("OUT", "/tmp/resume-tune-bench"))
STEPS, KILL_AT = int(os.environ.get("STEPS", "16")), int(os.environ.get("KILL_AT", "8"))
CLI = [sys.executable, "-m", "llmprune.cli"]
PACK = ["pack", "OUT/pruned", "--format", "w4g128", "--quant", "gptq", "--nsamples", "8", "--seqlen", "256",
        "--tune-steps", str(STEPS), "--eval", "none", "--no-progress"]


def say(argv: list[str], note: str = "") -> list[str]:
    print("$ llmprune " + " ".join(argv) + (f"   # {note}" if note else ""), flush=True)
    return [a.replace("OUT", str(OUT)) if a.startswith("OUT") else a for a in argv]


def run(name: str, *flags: str, note: str = "") -> float:
    t0 = time.perf_counter()
    with open(OUT / f"{name}.log", "w") as log:
        subprocess.run(CLI + say([*PACK, "--out", f"OUT/{name}", *flags], note), stdout=log, stderr=log, check=True)
    print(f"{name}: wall {time.perf_counter() - t0:.1f} s", flush=True)
    return time.perf_counter() - t0


def step_of(state: Path) -> int:
    try:
        return json.loads(state.read_text())["keep"].get("tune_train", {}).get("step", 0)
    except (OSError, ValueError, KeyError):
        return 0


def main() -> None:
    subprocess.run(["rm", "-rf", str(OUT)], check=True)
    OUT.mkdir(parents=True)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet"], check=False).returncode != 0
    print(f"# {time.strftime('%Y-%m-%d', time.gmtime())}, commit {head}{'+changes' if dirty else ''}, "
          f"{os.cpu_count()} cores")
    with open(OUT / "pruned.log", "w") as log:
        subprocess.run(CLI + say(["compress", "--model", "llama", "--solver", "wanda", "--sparsity", "0.5", "--eval",
                                  "none", "--no-progress", "--out", "OUT/pruned"]), stdout=log, stderr=log, check=True)
    run("reference", "--checkpoint-every", "off")
    t0 = time.perf_counter()
    argv = say([*PACK, "--out", "OUT/resumed", "--checkpoint-every", "10"],
               f"killed with SIGKILL once {KILL_AT} tuning steps are checkpointed")
    with open(OUT / "killed.log", "w") as log:
        proc = subprocess.Popen(CLI + argv, stdout=log, stderr=log)
    while True:
        states = list(OUT.glob(".resumed.tmp-*/.resume/state.json"))
        if states and step_of(states[0]) >= KILL_AT:
            proc.send_signal(signal.SIGKILL)
            break
        if proc.poll() is not None:
            sys.exit("the run ended before it could be killed")
        time.sleep(0.5)
    proc.wait()
    left = states[0].parent.parent
    mb = lambda paths: f"{sum(f.stat().st_size for p in paths for f in ([p] if p.is_file() else p.rglob('*'))) / 1e6:.1f} MB"
    print(f"killed: wall {time.perf_counter() - t0:.1f} s; left behind: {left.name}, {mb([left])}: GPTQ's codes "
          f"{mb([left / '.codes'])}, the teacher's states {mb([left / '.resume' / 'teacher'])}, the tuning's checkpoint "
          f"{mb(list((left / '.resume').glob('tune-*')))}", flush=True)
    run("resumed", "--checkpoint-every", "10", note="the same command again")
    print("\n".join(line for line in (OUT / "resumed.log").read_text().splitlines() if "resum" in line))
    run("every-step", "--checkpoint-every", "0")
    ref = json.loads((OUT / "reference" / "llmprune.json").read_text())["format"]["quant_options"]["tune"]
    untimed = lambda t: {k: v for k, v in t.items() if k not in ("seconds", "placement")}
    for name in ("reference", "resumed", "every-step"):
        m = json.loads((OUT / name / "llmprune.json").read_text())
        t = m["format"]["quant_options"]["tune"]
        print(f"{name:10s} *.safetensors sha256 {digest(OUT / name)}  KL {t['kl_before']} -> {t['kl_after']} "
              f"({t['kept']})  tuning figures == reference's: {untimed(t) == untimed(ref)}  pack "
              f"{m['timings']['pack']['total_s']:.1f} s  resumed {m.get('resumed')}")


if __name__ == "__main__":
    main()
