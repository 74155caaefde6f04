"""Every documented entry point works from the repository root with Hugging Face's `kernels` package installed
(transformers >= 5.25 imports it with every model): `python -m pytest`, `python -m fastpmd.train`,
`torchrun -m fastpmd.train`, the `fastpmd` script and `python -c "import kernels"`. Each command runs from the
root, where `python -m` and torchrun put the working directory first on sys.path, so the repository's kernels/,
train/ and bench/ folders must never shadow an installed package of their names: they have no __init__.py (at
most namespace portions, which any installed package beats; fastpmd/_layout.py). The wheel holds them only under
fastpmd/."""
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--preset", "tiny-arith", "--prompts-per-step", "4", "--group-size", "2", "--mini-batches", "1",
        "--warmup-steps", "0", "--max-steps", "1", "--eval-n", "1", "--set", "data.eval_size=2",
        "--max-new-tokens", "3", "--no-progress", "--no-plots", "--no-export"]


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def _run(cmd, env_extra=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    env.pop("PYTHONSAFEPATH", None)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kw)


def _trained_one_step(out: Path, proc) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1]


@pytest.mark.parametrize("name", ["kernels", "train", "bench"])
def test_bare_folder_names_resolve_outside_the_repository(name, tmp_path):
    """From the root, `import name` and `find_spec(name)` give the installed package of that name (Hugging Face's
    `kernels` is installed with transformers; for the others a stand-in on PYTHONPATH), never the folder."""
    site = tmp_path / "site"
    if not _installed(name):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text("")
    code = (f"import importlib.util; print(importlib.util.find_spec({name!r}).origin); "  # before the import
            f"import {name}; print({name}.__file__)")
    proc = _run([sys.executable, "-c", code], env_extra={"PYTHONPATH": str(site)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    for line in proc.stdout.split():
        assert Path(line).resolve().parent != ROOT / name, proc.stdout


@pytest.mark.parametrize("name", ["kernels", "train", "bench"])
def test_bare_folder_names_import_nothing_of_fastpmd(name):
    """Without site-packages (-S: no torch, nothing named `name`), `import name` from the root finds at most the
    folder as an empty namespace portion: no __init__.py runs, nothing of fastpmd or torch is imported."""
    code = (f"import sys, {name}; print({name}.__file__, {name}.__spec__.origin, "
            "any(m.split('.')[0] in ('fastpmd', 'torch') for m in sys.modules))")
    proc = _run([sys.executable, "-S", "-c", code])
    assert proc.returncode == 0 and proc.stdout.split() == ["None", "None", "False"], proc.stdout + proc.stderr


def test_hf_kernels_is_installed_with_the_test_extra():
    """The cases below only prove something while transformers' `kernels` dependency is really there."""
    if not _installed("transformers") or "kernels" not in str(importlib.metadata.requires("transformers")):
        pytest.skip("this transformers does not depend on Hugging Face's kernels")
    assert _installed("kernels")


def test_python_m_pytest_from_root_imports_transformers_models(tmp_path):
    test = tmp_path / "test_hf_model.py"
    test.write_text("def test_model():\n"
                    "    import torch, transformers\n"
                    "    from transformers import Qwen2Config, Qwen2ForCausalLM\n"
                    "    cfg = Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,\n"
                    "                      num_attention_heads=2, num_key_value_heads=1)\n"
                    "    out = Qwen2ForCausalLM(cfg)(torch.zeros(1, 3, dtype=torch.long))\n"
                    "    assert out.logits.shape == (1, 3, 32)\n"
                    "    import fastpmd.kernels, fastpmd.train, fastpmd.bench\n")
    proc = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout


def test_python_m_fastpmd_train_from_root(tmp_path):
    _trained_one_step(tmp_path, _run([sys.executable, "-m", "fastpmd.train", *TINY, "--out", str(tmp_path)]))


def test_torchrun_m_fastpmd_train_from_root(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m",
           "fastpmd.train", *TINY, "--out", str(tmp_path)]
    _trained_one_step(tmp_path, _run(cmd))


def test_fastpmd_script_from_root(tmp_path):
    script = Path(sys.executable).with_name("fastpmd")
    if not script.exists():
        pytest.skip("no `fastpmd` console script next to this interpreter (fastpmd not pip-installed)")
    out = tmp_path / "run"
    _trained_one_step(out, _run([str(script), "train", *TINY, "--save-every", "1", "--out", str(out)]))
    rows = (out / "metrics.jsonl").read_text()
    again = _run([str(script), "train", *TINY, "--resume", "--out", str(out)])  # a finished run: nothing to do
    assert again.returncode == 0 and "nothing to do" in again.stderr, again.stderr[-2000:]
    assert (out / "metrics.jsonl").read_text() == rows


@pytest.mark.slow
def test_wheel_holds_the_folders_only_under_fastpmd(tmp_path):
    src = tmp_path / "src"  # a copy: setuptools writes build/ next to the sources
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "out", "runs", "*.egg-info",
                                                             "__pycache__", ".pytest_cache"))
    proc = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(src)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("fastpmd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"fastpmd", next(t for t in tops if t.endswith(".dist-info"))}, tops
    for module in ("fastpmd/_layout.py", "fastpmd/kernels/__init__.py", "fastpmd/kernels/logits.py",
                   "fastpmd/train/__init__.py", "fastpmd/train/trainer.py", "fastpmd/bench/__init__.py"):
        assert module in names, module
