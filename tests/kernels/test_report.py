"""`fastpmd kernels-report`: every kernel x pinned config compiles for sm_80, sm_90, sm_100 and sm_120 on this CPU
machine, without spills, within shared memory, and its matrix tiles use the architecture's tensor-core
instruction (HMMA on sm_80/sm_120, HGMMA on sm_90, UTCHMMA = tcgen05.mma on sm_100). Runs the report in fresh
processes, two at a time (the compiler must not see an interpreter-mode triton); ~1-2 minutes on 2 cores."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

TILED = {"logits_fwd", "logits_bwd", "logits_bwd_filter", "matmul_grad_hidden", "matmul_grad_weight",
         "matmul_grad_hidden_filter", "matmul_grad_weight_filter"}     # *_filter: gradient filtering variants
KERNELS = TILED | {"merge", "pmd_epilogue", "shifted_exp"}
ARCHS = ("80", "90", "100", "120")


def test_failure_rules_can_fail():
    from fastpmd.kernels.report import _failures
    ok = {"compiled": True, "stack_bytes": 0, "local_bytes": 0, "local_loads": 0, "local_stores": 0,
          "shared_bytes": 96 * 1024, "hgmma": 4, "mma": 0, "utchmma": 0}
    assert _failures(ok, 90, True) == []
    assert _failures(dict(ok, stack_bytes=8), 90, True) == ["spills (stack/local memory)"]
    assert _failures(dict(ok, local_stores=3), 90, True) == ["spills (stack/local memory)"]
    assert "shared memory" in _failures(dict(ok, shared_bytes=200 * 1024, mma=2), 80, True)[0]
    assert _failures(dict(ok, hgmma=0), 90, True) == ["matrix tiles do not use tensor cores (HGMMA)"]
    assert _failures(dict(ok, hgmma=0), 90, False) == []
    assert _failures({"compiled": False}, 80, True) == ["does not compile"]
    # sm_100 needs tcgen05 (UTCHMMA), not Hopper's wgmma; sm_120 has mma.sync and 99 KiB of shared memory
    assert _failures(ok, 100, True) == ["matrix tiles do not use tensor cores (UTCHMMA)"]
    assert _failures(dict(ok, utchmma=8), 100, True) == []
    assert _failures(dict(ok, mma=16, shared_bytes=100 * 1024), 120, True) == ["shared memory 102400 > 101376"]
    assert _failures(dict(ok, mma=16, shared_bytes=64 * 1024), 120, True) == []
    assert _failures(dict(ok, shared_bytes=64 * 1024), 120, True) == ["matrix tiles do not use tensor cores (HMMA)"]


def _run(archs, tmp_path, env):
    procs = {arch: subprocess.Popen([sys.executable, "-m", "fastpmd.kernels.report", "--arch", arch, "--out",
                                     str(tmp_path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True) for arch in archs}
    outs = {}
    for arch, p in procs.items():
        try:
            outs[arch] = p.communicate(timeout=400)[0]
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail(f"kernels-report --arch {arch} took longer than 400 s")
    return procs, outs


@pytest.mark.slow
def test_kernels_report_all_archs(tmp_path):
    from fastpmd.kernels.report import tc_key
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    for pair in (ARCHS[:2], ARCHS[2:]):
        procs, outs = _run(pair, tmp_path, env)
        for arch in pair:
            rows = json.loads((tmp_path / f"sm_{arch}" / "report.json").read_text())
            assert {r["kernel"] for r in rows} == KERNELS, outs[arch]
            for r in rows:
                assert r["compiled"], f"sm_{arch} {r['kernel']}: {r.get('error')}"
                assert r["failures"] == [], f"sm_{arch} {r['kernel']}: {r['failures']}\n{outs[arch]}"
                assert (tmp_path / f"sm_{arch}" / f"{r['kernel']}_bf16_sm{arch}_cfg0.cubin").stat().st_size > 0
                if r["kernel"] in TILED:
                    assert r[tc_key(int(arch))] > 0
                    if arch == "100":       # tcgen05 only: no Hopper wgmma left in a Blackwell build
                        assert r["hgmma"] == 0
            assert procs[arch].returncode == 0, outs[arch]


@pytest.mark.slow
def test_kernels_report_fp32_uses_tensor_cores(tmp_path):
    """`--dtype fp32` (TF32 dots: float32 matmul precision "high"/"medium") compiles the tile kernels to HGMMA on
    sm_90 and HMMA on sm_80, without spills; `--dtype fp32-ieee` (precision "highest") compiles clean on FMA."""
    from fastpmd.kernels.report import tc_key
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    procs = {arch: subprocess.Popen([sys.executable, "-m", "fastpmd.kernels.report", "--arch", arch, "--dtype", "fp32",
                                     "--dtype", "fp32-ieee", "--out", str(tmp_path)], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for arch in ("80", "90")}
    for arch, p in procs.items():
        out = p.communicate(timeout=400)[0]
        rows = json.loads((tmp_path / f"sm_{arch}" / "report.json").read_text())
        assert {(r["kernel"], r["dtype"]) for r in rows} == {(k, d) for k in KERNELS for d in ("fp32", "fp32-ieee")}
        for r in rows:
            assert r["failures"] == [], f"sm_{arch} {r['kernel']} {r['dtype']}: {r['failures']}\n{out}"
            if r["kernel"] in TILED and r["dtype"] == "fp32":
                assert r[tc_key(int(arch))] > 0, f"sm_{arch} {r['kernel']}: no tensor cores with TF32"
        assert p.returncode == 0, out
