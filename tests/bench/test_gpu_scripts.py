"""The prepared GPU scripts, run on CPU so they are not dead on arrival: gpu_timing's code path at tiny sizes
(triton and Liger FLCE rows skipped with the reason), its PASS/FAIL logic, the bash scripts' syntax, the
fastpmd source-tree shim, and the train check's command line (cpu, gloo, float32, one step + resume)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastpmd.bench import gpu_timing

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ("bench/gpu_check.sh", "bench/gpu_env.sh", "scripts/gpu_check_train.sh")
TINY = ["--device", "cpu", "--n", "48", "--seq", "16", "--hidden", "24", "--vocab", "101", "--dtype", "float32",
        "--warmup", "1", "--reps", "2"]


def _env(**kw):
    return {**os.environ, "PYTHON": sys.executable, **kw}


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_parses(script):
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)


def test_gpu_timing_cpu_dry_run(tmp_path):
    methods = ["fastpmd-triton", "fastpmd-torch", "liger-flce", "liger", "naive"]
    assert gpu_timing.main([*TINY, "--methods", *methods, "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu_timing.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert list(rows) == [*methods, "matmul-floor"]
    assert "CUDA" in rows["fastpmd-triton"]["reason"] and "CUDA" in rows["liger-flce"]["reason"]
    assert rows["liger"]["loss"] == "grpo" and rows["naive"]["loss"] == "pmd-mean"
    for name in ("fastpmd-torch", "liger", "naive", "matmul-floor"):
        r = rows[name]
        assert r["status"] == "ok" and r["reps"] == 2 and r["tokens"] == 48, r
        assert r["ms_q1"] <= r["ms_median"] <= r["ms_q3"] and r["tflops"] > 0 and r["pct_floor_speed"] > 0
        assert (r["peak_mem_mb"] is not None) == (name != "matmul-floor")
    assert rows["matmul-floor"]["pct_floor_speed"] == pytest.approx(100.0)
    assert rows["fastpmd-torch"]["loss_value"] == pytest.approx(rows["naive"]["loss_value"], rel=1e-4)
    assert {c["verdict"] for c in res["checks"]} == {"SKIP"}  # no triton row on CPU: nothing to judge
    assert res["phases"][0]["phase"] == "N=48" and res["phases"][0]["seconds"] > 0
    md = (tmp_path / "gpu_timing.md").read_text()
    assert "| naive | pmd-mean |" in md and "fastpmd-triton / pmd-mean: triton backend needs CUDA" in md
    assert "SKIP  N=48 fastpmd-triton >= 70% of floor speed" in md


def test_gpu_timing_budget_and_bad_args(tmp_path, capsys):
    assert gpu_timing.main([*TINY, "--n", "16", "32", "--methods", "naive", "--budget-s", "0",
                            "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "gpu_timing.json").read_text())
    assert {r["tokens"] for r in res["rows"]} == {16}  # the second N would start past the budget
    assert res["phases"][1]["phase"] == "N=32 (skipped: budget)"
    (tmp_path / "file").write_text("x")
    assert gpu_timing.main([*TINY, "--out", str(tmp_path / "file" / "sub")]) == 2
    assert "--out" in capsys.readouterr().err
    assert gpu_timing.main([*TINY, "--device", "tpu", "--out", str(tmp_path)]) == 2


def _row(method, ms, mem, status="ok", n=4096, loss=None):
    return {"method": method, "tokens": n, "status": status, "reason": "" if status == "ok" else "missing",
            "ms_median": ms, "peak_mem_mb": mem, "pct_floor_speed": 100 * 70 / ms if ms else None,
            "loss_value": loss}


def test_checks_verdicts():
    rows = [_row("fastpmd-triton", 100.0, 500.0, loss=0.5), _row("fastpmd-torch", 130.0, 600.0, loss=0.505),
            _row("liger-flce", 120.0, 400.0), _row("liger", 150.0, 900.0), _row("cce", None, None, "skipped"),
            _row("naive", 90.0, 9000.0), _row("matmul-floor", 70.0, None)]
    lines = {c["check"]: c["verdict"] for c in gpu_timing.checks(rows)}
    assert lines == {"N=4096 fastpmd-triton loss agrees with fastpmd-torch": "PASS",
                     "N=4096 fastpmd-triton >= 70% of floor speed": "PASS",  # 70 / 100 ms = 70%
                     "N=4096 fastpmd-triton faster than liger-flce at <= memory": "FAIL",  # more memory
                     "N=4096 fastpmd-triton faster than liger at <= memory": "PASS",
                     "N=4096 fastpmd-triton faster than cce at <= memory": "SKIP",
                     "N=4096 fastpmd-triton faster than naive at <= memory": "FAIL"}  # slower
    rows[0]["ms_median"], rows[0]["pct_floor_speed"], rows[0]["loss_value"] = 101.0, 100 * 70 / 101.0, 0.6
    assert [c["verdict"] for c in gpu_timing.checks(rows)][:2] == ["FAIL", "FAIL"]


def test_shim_imports_the_source_tree(tmp_path):
    """Without an installed fastpmd (forced here), gpu_env_setup maps the source tree onto fastpmd.*."""
    cmd = ('source bench/gpu_env.sh && gpu_env_setup >/dev/null && "$PYTHON" -c '
           '"import fastpmd.kernels, fastpmd.bench.gpu_timing, fastpmd.train.cli as c; print(c.__file__)"')
    out = subprocess.run(["bash", "-c", cmd], cwd=ROOT, env=_env(FASTPMD_SHIM="1", GPU_ENV_TMP=str(tmp_path)),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(ROOT / "train" / "cli.py")  # through the shim's fastpmd/ link


def test_auto_pick_cpu_dry_run(tmp_path, capsys):
    """auto_pick on a CPU gpu_timing run: PREDICTED beside MEASURED ms, auto's predicted pick, autotune SKIP."""
    from fastpmd.bench import auto_pick
    assert gpu_timing.main([*TINY, "--methods", "fastpmd-torch", "naive", "--out", str(tmp_path)]) == 0
    assert auto_pick.main(["--timing", str(tmp_path / "gpu_timing.json"), "--device", "cpu", "--seq", "16"]) == 0
    md = (tmp_path / "auto_pick.md").read_text()
    assert "| method | PREDICTED ms | MEASURED median ms |" in md
    assert re.search(r"\| fastpmd-torch \| [0-9.]+ \| [0-9.]+ \|", md) and "| fastpmd-triton |" in md
    assert "auto (predicted): fastpmd-" in md and "SKIP (no CUDA)" in md
    assert "fastest fastpmd backend measured: fastpmd-torch" in md
    assert auto_pick.main(["--timing", str(tmp_path / "missing.json"), "--device", "cpu"]) == 2
    assert "--timing" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_check_script_cpu_dry_run(tmp_path):
    env = _env(GPU_CHECK_DEVICE="cpu", GPU_CHECK_PYTEST_ARGS="-k autotune_picks", GPU_ENV_TMP=str(tmp_path),
               GPU_CHECK_TIMING_ARGS=" ".join(TINY[2:] + ["--methods", "fastpmd-triton", "naive"]))
    out = subprocess.run(["bash", "bench/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "PASS  gpu_timing" in summary and "SKIP  N=48 fastpmd-triton" in summary
    assert "PASS  kernel tests" in summary
    assert "PASS  auto pick" in summary and "auto (predicted): fastpmd-" in summary
    log = (tmp_path / "out" / "kernel_tests.log").read_text()
    files = log.splitlines()[0]
    assert "tests/kernels/test_kernels.py" in files and "report" not in files, log  # the CPU-side report is left out
    assert "1 passed" in log, log
    assert json.loads((tmp_path / "out" / "gpu_timing.json").read_text())["rows"]


@pytest.mark.slow
def test_train_check_script_cpu(tmp_path):
    """The train check's command line on CPU (gloo, float32): one step, a checkpoint, a resumed second step."""
    env = _env(TRAIN_CHECK_DEVICE="cpu", TRAIN_CHECK_DTYPE="float32", STEPS="1", GPU_ENV_TMP=str(tmp_path))
    out = subprocess.run(["bash", "scripts/gpu_check_train.sh", str(tmp_path / "out")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert out.returncode == 0, summary + out.stdout[-3000:]
    assert "PASS  train 1 steps" in summary and "PASS  resume for step 2" in summary
    assert "backend auto -> torch on cpu" in summary and "zero gradient []" in summary
    rows = [json.loads(x) for x in (tmp_path / "out" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
