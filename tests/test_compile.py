"""Every kernel config compiles for Hopper (sm_90) here, without a GPU: no register spills, tensor
cores in the tile kernels, vectorized weight loads. Runs compile_check in a clean subprocess (the
kernel tests may have switched this process to the Triton interpreter)."""
import json
import os
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("cc") / "cc.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    subprocess.run([sys.executable, "-m", "llmprune.kernels.compile_check", "--json", str(out),
                    "--dtypes", "fp16,bf16", "--ms", "1,16,512"], check=True, env=env, timeout=600)
    return json.loads(out.read_text())


def _compiled_rows(code: str):
    """The JSON a compile_check script prints last, run in a clean subprocess (no interpreter)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=600, capture_output=True,
                         text=True, cwd=root).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_all_configs_compile(rows):
    from llmprune.kernels.compile_check import FORMATS

    assert {(r["format"], r["dtype"], r["M"]) for r in rows} == {
        (f, d, m) for f in FORMATS for d in ("fp16", "bf16") for m in (1, 16, 512)}


def test_no_register_spills(rows):
    bad = [(r["format"], r["dtype"], r["M"], r["spill_bytes"]) for r in rows if r["spill_bytes"] != 0]
    assert not bad and all(0 < r["n_regs"] <= 255 for r in rows), bad


def test_tile_kernels_use_wgmma_and_gemv_does_not(rows):
    for r in rows:
        if r["kind"] == "tile":
            assert r["wgmma"], r  # Hopper warpgroup MMA for BW >= 64
        else:
            assert not r["tensor_cores"], r


def test_split_k_reduction_takes_one_acq_rel_ticket(rows):
    """Decode launches reduce split-K partials in-kernel: a gpu-scope acq_rel atomic (the ticket)."""
    for r in rows:
        assert r["atomic_acq_rel"] == r["reduce"], r


def test_weight_loads_are_vectorized(rows):
    bad = [(r["format"], r["dtype"], r["M"]) for r in rows if not r["vector_loads"]]
    assert not bad, bad
    # the tile kernels software-pipeline their loads through shared memory
    assert all(r["cp_async"] for r in rows if r["kind"] == "tile")


def test_signature_mismatch_is_caught():
    """The helper builds the signature from the kernel's own parameter list."""
    pytest.importorskip("triton")
    from llmprune.kernels.compile_check import _signature

    sig, aligned = _signature("w4s50", "fp16", "gemv")
    assert sig["B"] == "*i16" and sig["ws_ptr"] == "*fp32" and sig["cnt_ptr"] == "*i32"
    assert "M" not in aligned and "SPLIT" not in aligned and "KK" in aligned


def test_decode_gemvs_spend_few_instructions_per_weight(rows):
    """The first H200 sweep measured the GEMVs instruction-bound: 10-14 thread instructions per weight
    in the K loop, 300-1,400 GB/s. The default M = 1 launch of sparse24, w4g128 and w4s24 must stay
    near the ~4 an H200 can afford at full bandwidth (compile_check's docstring), with no int-to-float
    conversion instruction in the loop; prefill and the tile kernels may spend more. Triton 3.6 (torch 2.11's,
    the GPU machine's) compiles sparse24's gemv24 to 6.73 in fp16 and 7.0 in bf16 (docs/formats.md, "The
    instruction budget")."""
    import triton
    from packaging.version import Version

    limit = 6.5 if Version(triton.__version__) >= Version("3.7") else 7.0
    for r in rows:
        if r["M"] == 1 and r["format"] in ("sparse24", "w4g128", "w4s24"):
            assert r["kind"] in ("gemv4", "gemv24") and r["instr_per_weight"] <= limit, r
            assert r["loop_int_to_float"] == 0 and r["cp_async"], r
        if r["format"] == "w4g128":  # the tile kernel decodes codes by the same magic-number trick
            assert r["loop_int_to_float"] == 0, r


def test_24_tiles_place_values_by_shifts(rows):
    """The 2:4 tiles (M = 16) and the prefill unpack (M = 512) of 16-bit weights place each group's two
    kept values by 64-bit shifts (expand24_bits), not by a compare and a select per value: with selects
    sparse24 spent 11.5 and w4s24 13.5 thread instructions per weight (7.2 and 9.4 now under Triton 3.6)."""
    limit = {("sparse24", 16): 7.5, ("w4s24", 16): 10.0, ("sparse24", 512): 8.0, ("w4s24", 512): 10.0}
    for r in rows:
        if (r["format"], r["M"]) in limit:  # (unpack, M = 512: 8.4 and 13.4 before)
            assert r["instr_per_weight"] <= limit[r["format"], r["M"]], r


def test_lean_gemvs_compile_without_spills_and_beat_the_old_gemv():
    """Every lean GEMV shape the H200 sweep tries (bench/gpu_tune.py LEAN at M = 1, 2; LEAN_M4 at 4;
    LEAN_M1_INT4 at 1; and the bf16 zero-point + bias variant): no spills, no tensor cores; at M = 1 fewer
    instructions per weight than the first sweep's GEMV spent (bench/results/gpu/sass_model.txt), and
    for the int4 formats at M = 1, 2 fewer than today's GEMV (decode tile + multiply-adds). At M = 4 the
    2:4 MMA tile now spends fewer than either (test_24_tiles_place_values_by_shifts): the sweep picks."""
    pytest.importorskip("triton")
    first_sweep = {"sparse24": 11.53, "w4g128": 9.88, "w4s24": 14.06}  # M = 1, Triton 3.6
    code = """
import json, sys
sys.path.insert(0, "bench")
from gpu_tune import LEAN, LEAN_M1_INT4, LEAN_M4
from llmprune.kernels.compile_check import check_one
from llmprune.kernels.triton_gemm import Config
rows = []
for f, k in (("sparse24", "gemv24"), ("w4s24", "gemv24"), ("w4g128", "gemv4")):
    for m in (1, 2, 4):
        for bw, bk, w in (LEAN if m <= 2 else LEAN_M4)[:2]:
            rows.append(check_one(f, "fp16", m, Config(k, bw, m, bk, w, 3), reduce=True))
        if f != "sparse24" and m <= 2:
            rows.append(check_one(f, "fp16", m, Config("gemv", 64, m, 128, 8, 3), reduce=True))  # the old best
    # bf16 with an asymmetric grid (zero points) and a bias
    rows.append(check_one(f, "bf16", 1, Config(k, 128, 1, 128, 4, 3), reduce=True, has_z=f != "sparse24",
                          has_bias=True))
    if f != "sparse24":  # more rows per thread at M = 1, both variants
        for bw, bk, w in LEAN_M1_INT4:
            rows.append(check_one(f, "fp16", 1, Config(k, bw, 1, bk, w, 3), reduce=True))
            rows.append(check_one(f, "bf16", 1, Config(k, bw, 1, bk, w, 3), reduce=True, has_z=True,
                                  has_bias=True))
print(json.dumps(rows))
"""
    rows = _compiled_rows(code)
    lean = [r for r in rows if r["kind"] != "gemv"]
    assert lean and all(r["spill_bytes"] == 0 and not r["tensor_cores"] for r in lean), lean
    for r in lean:
        if r["M"] == 1:
            assert r["instr_per_weight"] < first_sweep[r["format"]], r
        old = [o for o in rows if o["kind"] == "gemv" and o["format"] == r["format"] and o["M"] == r["M"]]
        if old and r["dtype"] == "fp16":
            assert r["instr_per_weight"] < old[0]["instr_per_weight"], (r, old)


def test_grouped_gemvs_cost_what_the_plain_ones_cost():
    """The grouped (Mixture-of-Experts decode) variant of every format's M = 1 GEMV, fp16, and bf16 with zero
    points and a bias: compiles for sm_90 without spills or tensor cores, takes no split-K ticket, and its K loop
    costs what the plain launch's does (the expert's pointers are set once, before the loop; within 1% here)."""
    pytest.importorskip("triton")
    code = """
import json
from llmprune.kernels.compile_check import FORMATS, check_one
rows = []
for f in FORMATS:
    for d, hz, hb in (("fp16", False, False), ("bf16", f in ("w4g128", "w4s24"), True)):
        rows.append((check_one(f, d, 1, reduce=False, has_z=hz, has_bias=hb),
                     check_one(f, d, 1, has_z=hz, has_bias=hb, grouped=True)))
print(json.dumps(rows))
"""
    pairs = _compiled_rows(code)
    assert len(pairs) == 8
    for plain, grouped in pairs:
        assert grouped["grouped"] and not grouped["reduce"] and not grouped["atomic_acq_rel"], grouped
        assert grouped["spill_bytes"] == 0 and not grouped["tensor_cores"] and grouped["kind"] == plain["kind"]
        assert grouped["instr_per_weight"] <= plain["instr_per_weight"] * 1.03, (plain, grouped)
