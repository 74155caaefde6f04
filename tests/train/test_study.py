"""`fastpmd study` smoke: a tiny grid through the trainer's CLI, its table and figures."""
import json

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
