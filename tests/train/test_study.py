"""`fastpmd study` smoke: a tiny grid through the trainer's CLI, its table and figures."""
import json

import pytest

from fastpmd.train import study


def test_study_smoke(tmp_path):
    out = tmp_path / "study"
    argv = ["--out", str(out), "--variants", "pmd-part-clamp,pmd-mean-adaptive", "--ks", "2", "--ns", "2",
            "--seeds", "0", "--steps", "2", "--prompts", "2", "--eval-n", "1", "--warmup-steps", "2", "--jobs", "2"]
    assert study.main(argv) == 0
    cells = json.loads((out / "study.json").read_text())
    assert sorted(c["name"] for c in cells) == sorted(
        f"{v}_k{k}_n2_s0" for v in ("pmd-part-clamp", "pmd-mean-adaptive") for k in (2,))
    for c in cells:
        assert len(c["reward"]) == 2 and len(c["logratio_min_last"]) == 2 and 0 <= c["heldout_final"] <= 1
        run_cfg = json.loads((out / "cells" / c["name"] / "config.json").read_text())
        assert run_cfg["optim"]["mini_batches"] == c["k"] and run_cfg["rollout"]["group_size"] == 2
        assert run_cfg["loss"]["tau"] == 0.01 and run_cfg["model"]["name_or_path"].endswith("seed_0/hf")
    clamp = json.loads((out / "cells" / "pmd-part-clamp_k2_n2_s0" / "config.json").read_text())["loss"]
    assert clamp["estimator"] == "partition_loo_clamped"
    table = (out / "study_table.md").read_text()
    assert "| pmd-part-clamp | 2 | 2 | 1 |" in table and "| pmd-mean-adaptive | 2 | 2 | 1 |" in table
    assert (out / "study_rewards.png").stat().st_size > 0 and (out / "study_logratio.png").stat().st_size > 0
    assert study.main(argv) == 0  # finished cells are reused, not rerun
    assert study.main(["--out", str(out), "--ks", "3", "--prompts", "2"]) == 2


@pytest.mark.slow  # torchrun (3 processes), a warm-up, two eval-only runs: 30 s (lighter load) to 158 s (load 9)
def test_study_async_smoke(tmp_path):
    """One async cell (1 inference + 2 trainer processes under torchrun, 2 RL steps), its held-out evals after
    the run, its table and figures; a bad --async-k is refused before any run."""
    out = tmp_path / "study"
    argv = ["--out", str(out), "--variants", "pmd-mean", "--ks", "", "--async-k", "1", "--ns", "2", "--seeds", "0",
            "--steps", "2", "--prompts", "2", "--eval-n", "1", "--warmup-steps", "2", "--jobs", "1"]
    assert study.main(argv) == 0
    (cell,) = json.loads((out / "study.json").read_text())
    assert cell["name"] == "pmd-mean_async1_n2_s0" and cell["mode"] == "async"
    run = out / "cells" / cell["name"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["rollout"]["mode"] == "async" and cfg["rollout"]["max_staleness"] == 1
    assert cfg["optim"]["mini_batches"] == 1 and cfg["loss"]["rollout_correction"] == "tis"
    assert cfg["model"]["name_or_path"].endswith("seed_0/hf") and cfg["rollout"]["group_size"] == 2
    assert len(cell["reward"]) == 2 and len(cell["logp_diff"]) == 2 and cell["staleness_max"] <= 1
    assert 0 <= cell["heldout_start"] <= 1 and 0 <= cell["heldout_final"] <= 1 and cell["avg_key"] == "avg@1"
    # the held-out values are the eval-only runs' rows: the warm-up model's (per seed) and the exported final one's
    for path, key in ((out / "warmup" / "seed_0" / "heldout_n1", "heldout_start"), (run / "heldout", "heldout_final")):
        rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
        assert [r["kind"] for r in rows] == ["eval"] and rows[0]["avg@1"] == cell[key]
    assert "| pmd-mean | 1 | 2 | tis | 1 |" in (out / "study_async_table.md").read_text()
    assert (out / "study_async_rewards.png").stat().st_size > 0 and (out / "study_async_logratio.png").stat().st_size
    assert study.main(argv[:4] + ["--async-k", "-1"]) == 2
    assert study.main(argv[:4] + ["--async-k", "1", "--async-correction", "tis,is"]) == 2
    assert study.main(argv[:4] + ["--ks", "", "--async-k", "1", "--prompts", "3"]) == 2


def test_two_drivers_on_one_out_are_refused(tmp_path, capsys):
    """A second driver on the same --out exits 2 before any warm-up or cell (the study lost a cell that way)."""
    import fcntl

    with open(tmp_path / ".study.lock", "w") as held:  # the first driver's lock
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert study.main(["--out", str(tmp_path), "--variants", "pmd-mean", "--ks", "1", "--ns", "4",
                           "--seeds", "0"]) == 2
    assert "--out" in capsys.readouterr().err and not (tmp_path / "warmup").exists()
