"""The benchmark harness on tiny shapes: rows present, numbers positive, skipped methods reported. No timings."""
import json
import tomllib
from pathlib import Path

import pytest
import torch

from fastpmd.bench import core_check, methods
from fastpmd.bench.cli import main
from fastpmd.bench.harness import Entry, time_entries
from fastpmd.bench.inputs import make_inputs
from fastpmd.bench.presets import Shape, preset, shape_for_tokens
from fastpmd.bench.report import REQUIRED_KEYS, markdown
from fastpmd.bench.runner import BenchConfig, run

TINY = preset("tiny").shapes
CPU = torch.device("cpu")


def test_presets_and_bad_input():
    assert preset("qwen2.5-7b", (2048,)).shapes[0].hidden == 3584
    assert preset("llama-3-8b", (4096,)).shapes[0].vocab == 128256
    assert preset("qwen3-30b-a3b", (1024,)).shapes[0].rows == 1024
    assert [s.rows for s in preset("core-check").shapes] == [2048, 4096]
    with pytest.raises(ValueError, match="tokens"):
        preset("qwen2.5-7b")
    with pytest.raises(ValueError, match="dtype"):
        Shape(2, 8, 16, 32, dtype="float8")
    with pytest.raises(ValueError, match="group_size"):
        Shape(3, 8, 16, 32, group_size=2)
    with pytest.raises(ValueError, match="seq_len"):
        shape_for_tokens(100, 16, 32, seq_len=64)
    with pytest.raises(ValueError, match="method"):
        BenchConfig(shapes=TINY, methods=("nope",))


def test_adapters_agree():
    """Every runnable adapter computes the same loss and gradients on the same inputs."""
    inp = make_inputs(TINY[0], CPU)
    for loss in ("pmd-mean", "grpo", "gspo"):
        ref = None
        for name in ("naive", "fastpmd-torch", "liger"):
            m = methods.METHODS[name]
            if m.skip_reason(loss, CPU):
                continue
            value = m.build(inp, methods.loss_config(loss))()
            got = (value, inp.hidden.grad.clone(), inp.weight.grad.clone())
            if ref is None:
                ref = got
            for a, b in zip(got, ref):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_run_rows_and_skips():
    cfg = BenchConfig(shapes=TINY, methods=("naive", "fastpmd-torch", "fastpmd-triton", "liger"),
                      losses=("pmd-mean", "grpo"), warmup=1, reps=2, memory=False, quiet=True)
    rows = run(cfg)
    assert len(rows) == len(TINY) * 2 * 5  # shapes x losses x (4 methods + floor)
    by = {(r["method"], r["loss"], r["rows"]): r for r in rows}
    for r in rows:
        assert all(k in r for k in REQUIRED_KEYS)
        if r["status"] == "ok":
            assert r["ms_per_token"] > 0 and r["ms_min"] > 0 and r["tflops"] > 0 and r["ratio_to_floor"] > 0
            assert r["ms_min"] <= r["ms_median"] <= r["ms_max"] and r["reps"] == 2
        else:
            assert r["reason"] and r["ms_per_token"] is None
    n = TINY[0].rows
    assert "CUDA" in by[("fastpmd-triton", "pmd-mean", n)]["reason"]
    assert "no PMD" in by[("liger", "pmd-mean", n)]["reason"]
    assert by[("liger", "grpo", n)]["status"] == "ok"
    assert by[("matmul-floor", "grpo", n)]["ratio_to_floor"] == pytest.approx(1.0)


def test_missing_package_is_skipped_not_faked(monkeypatch, capsys):
    monkeypatch.setattr(methods.importlib.util, "find_spec", lambda name: None)
    cfg = BenchConfig(shapes=TINY[:1], methods=("naive", "liger", "cce"), losses=("grpo",), warmup=1, reps=1,
                      memory=False, floor=False)
    rows = run(cfg)
    skipped = {r["method"]: r["reason"] for r in rows if r["status"] == "skipped"}
    assert set(skipped) == {"liger", "cce"} and all("not installed" in v for v in skipped.values())
    assert "skipping liger" in capsys.readouterr().err


def test_failing_method_reports_error():
    class Broken(methods.Naive):
        name = "broken"

        def build(self, inp, cfg):
            def step():
                raise RuntimeError("compile failed here")
            return step

    e = Entry(Broken(), "pmd-mean")
    time_entries([e], make_inputs(TINY[0], CPU), warmup=1, reps=1)
    assert e.skip.startswith("error: RuntimeError: compile failed") and not e.times_s


def test_cli_writes_outputs(tmp_path):
    out = tmp_path / "bench"
    status = main(["--preset", "tiny", "--tokens", "32", "--methods", "naive", "fastpmd-torch", "--losses",
                   "pmd-mean", "--no-memory", "--quiet", "--out", str(out)])
    assert status == 0
    rows = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in rows} == {"naive", "fastpmd-torch", "matmul-floor"}
    assert all(r["ms_per_token"] > 0 for r in rows)
    assert "| naive | pmd-mean |" in (out / "results.md").read_text()
    assert json.loads((out / "meta.json").read_text())["versions"]["torch"]
    assert (out / "ms_per_token.png").stat().st_size > 0
    assert main(["--preset", "qwen2.5-7b"]) == 2  # no --tokens: a clear error, not a traceback
    assert main(["--preset", "tiny", "--reps", "0"]) == 2


@pytest.mark.slow
def test_core_check_on_tiny_shapes(monkeypatch):
    """Both core-check measurements (memory in fresh processes) on tiny stand-in shapes; verdicts, not values."""
    monkeypatch.setattr(core_check, "CORE_TIME_SHAPE", Shape(4, 16, 32, 512, "float32", "full", 4))
    monkeypatch.setattr(core_check, "CORE_MEM_SHAPE", Shape(4, 64, 64, 8192, "float32", "full", 4))
    monkeypatch.setattr(methods.CutCrossEntropy, "unavailable", lambda self, d: "left out of this test")
    rows, checks = core_check.run_core_check(preset("core-check"), CPU, quiet=True)
    assert [c["verdict"] in ("PASS", "FAIL") for c in checks] == [True] * 4
    mem = [r for r in rows if r.get("phase") == "memory"]
    assert {r["method"] for r in mem} == {"fastpmd-torch", "naive"}
    assert all(r["peak_mem_mb"] > 0 and r["grads_mb"] > 0 for r in mem), mem
    assert any(r["method"] == "cce" and r["status"] == "skipped" for r in rows)
    assert "| naive | pmd-mean |" in markdown(rows, {})
    assert all(k in r for r in rows for k in REQUIRED_KEYS)


def test_bench_dir_is_not_in_default_run():
    root = Path(__file__).resolve().parents[2]
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert cfg["testpaths"] == ["tests"]
    assert (root / "bench" / "micro" / "bench_ops.py").exists() and (root / "bench" / "micro" / "conftest.py").exists()


def test_harness_cap_bounds_a_slow_entry():
    """cap_s: an entry whose timed total reaches the cap sits out the remaining rounds (keeps >= 1 rep)."""
    import time

    class Sleepy(methods.Naive):
        name = "sleepy"

        def build(self, inp, cfg):
            return lambda: (time.sleep(0.05), torch.zeros(()))[1]

    slow, fast = Entry(Sleepy(), "pmd-mean"), Entry(methods.METHODS["naive"], "pmd-mean")
    time_entries([slow, fast], make_inputs(TINY[0], CPU), warmup=1, reps=4, cap_s=0.01)
    assert len(slow.times_s) == 1 and slow.warmup_s >= 0.05
    assert len(fast.times_s) >= 1


def test_liger_flce_adapter_matches_naive_under_interpreter():
    """Liger's fused linear CE (Triton) under TRITON_INTERPRET: loss and gradients equal the naive path's."""
    import subprocess
    import sys

    code = """
import torch
from fastpmd.bench import methods
from fastpmd.bench.inputs import make_inputs
from fastpmd.bench.presets import shape_for_tokens
inp = make_inputs(shape_for_tokens(24, 16, 97, seq_len=8), "cpu")
cfg, m = methods.loss_config("pmd-mean"), methods.LigerFLCE()
m.unavailable = lambda device: None
got = [m.build(inp, cfg)(), inp.hidden.grad.clone(), inp.weight.grad.clone()]
ref = [methods.METHODS["naive"].build(inp, cfg)(), inp.hidden.grad, inp.weight.grad]
for a, b in zip(got, ref):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "TRITON_INTERPRET": "1"},
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "ok", out.stderr[-3000:]


def test_cli_bad_out_fails_before_any_work(tmp_path, capsys, monkeypatch):
    """--out under a file: exit 2 at once, one line naming --out (the benchmark never starts)."""
    from fastpmd.bench import runner

    monkeypatch.setattr(runner, "run", lambda cfg: pytest.fail("the benchmark ran before --out was checked"))
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "sub"):
        assert main(["--preset", "tiny", "--no-memory", "--quiet", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--out" in err[0], err


def test_cli_tokens_and_device_errors(capsys):
    cases = [(["--preset", "core-check", "--tokens", "0"], "--tokens"),
             (["--preset", "core-check", "--tokens", "4096"], "--tokens"),
             (["--preset", "core-check", "--dtype", "bfloat16"], "--dtype"),
             (["--preset", "qwen2.5-7b", "--tokens", "0"], "--tokens"),
             (["--preset", "tiny", "--tokens", "-8"], "--tokens"),
             (["--hidden", "8", "--vocab", "16", "--tokens", "0"], "--tokens"),
             (["--preset", "tiny", "--device", "tpu"], "--device"),
             (["--preset", "tiny", "--device", "cuda:0"], "--device"),
             (["--preset", "tiny", "--device", "cpu:x"], "--device")]
    for argv, flag in cases:
        assert main([*argv, "--no-memory", "--quiet"]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flag in err[0], (argv, err)


def test_theory_figures_seeds_must_be_positive(tmp_path, capsys):
    from fastpmd.theory import figures as theory_figures

    for seeds in ("0", "-3"):
        assert theory_figures.main(["--quick", "--seeds", seeds, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "--seeds" in err[0], err
    assert not list(tmp_path.iterdir())  # nothing drawn
