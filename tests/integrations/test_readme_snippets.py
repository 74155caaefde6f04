"""README "In your own trainer": each snippet there is copied verbatim from a marked region of this file and runs."""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import trl_tiny

ROOT = Path(__file__).resolve().parents[2]

VERL_COMMAND = """\
FASTPMD_PMD_TAU=0.01 python -m verl.trainer.main_ppo \\
    algorithm.adv_estimator=rloo \\
    actor_rollout_ref.actor.policy_loss.loss_mode=pmd_mean \\
    actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean \\
    +ray_kwargs.ray_init.runtime_env.worker_process_setup_hook=fastpmd.integrations.verl.register \\
    data.train_files=... actor_rollout_ref.model.path=... actor_rollout_ref.rollout.n=16
"""


def snippet(name: str) -> str:
    """The lines between '# README[name]>' and '# <README' in this file, dedented."""
    text = Path(__file__).read_text()
    m = re.search(rf"# README\[{name}\]>\n(.*?)\n\s*# <README", text, re.S)
    return textwrap.dedent(m.group(1))


def test_readme_shows_exactly_the_tested_snippets():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### In your own trainer", 1)[1].split("\n## ", 1)[0]
    for name in ("loop", "trl"):
        assert f"```python\n{snippet(name)}\n```" in section, name
    assert f"```bash\n{VERL_COMMAND}```" in section
    assert "FusedGRPOTrainer(GRPOTrainer):\n    def _get_per_token_logps" not in readme  # the broken snippet is gone


def test_readme_plain_loop():
    import fastpmd

    model = trl_tiny.qwen2()
    torch.manual_seed(0)
    input_ids = torch.randint(3, 14, (4, 9))
    attention_mask = torch.ones_like(input_ids)
    response_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    response_mask[:, 4:] = True
    r, n = torch.tensor([1.0, 0.0, 0.0, 1.0]), 2
    # README[loop]>
    targets, mask = input_ids[:, 1:], response_mask[:, 1:]
    with torch.no_grad():  # log pi_old, once per batch before its updates (or the rollout engine's log-probs)
        old_hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, :-1]
        old_logp = fastpmd.linear_logprobs(old_hidden, model.lm_head.weight, targets, mask=mask)
    out = model.model(input_ids=input_ids, attention_mask=attention_mask)       # base model: no logits
    hidden = out.last_hidden_state[:, :-1]                                      # hidden at t predicts token t+1
    adv = fastpmd.advantages(r, group_size=n, estimator="mean")
    loss, metrics = fastpmd.fused_linear_pmd_loss(hidden, model.lm_head.weight, targets, mask, old_logp, adv,
                                                  tau=0.01)                       # or fastpmd.nn.FusedLinearPMDLoss
    loss.backward()
    # <README
    logits = model(input_ids=input_ids).logits[:, :-1].detach()
    logp = logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]
    want, _ = fastpmd.pmd_loss(logp, old_logp, adv, mask, tau=0.01)
    torch.testing.assert_close(loss.detach(), want, rtol=1e-5, atol=1e-6)
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_readme_nn_name_works_after_import_fastpmd():
    """`fastpmd.nn.FusedLinearPMDLoss` as the README writes it: `import fastpmd` alone is enough."""
    code = ("import fastpmd, torch; m = fastpmd.nn.FusedLinearPMDLoss(tau=0.01); "
            "print(type(m).__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "FusedLinearPMDLoss", proc.stderr[-2000:]


@pytest.mark.slow
def test_readme_trl(tmp_path):
    pytest.importorskip("trl")
    model, tokenizer, dataset = trl_tiny.qwen2(), trl_tiny.tokenizer(), trl_tiny.dataset()
    reward_fn, out_dir = trl_tiny.count_threes, str(tmp_path)
    # README[trl]>
    from fastpmd.integrations.trl import PMDConfig, PMDTrainer

    args = PMDConfig(output_dir=out_dir, tau=0.01, pmd_estimator="mean", num_generations=4,
                     per_device_train_batch_size=4, max_completion_length=5, num_iterations=2, max_steps=2,
                     logging_steps=1, use_cpu=not torch.cuda.is_available())
    trainer = PMDTrainer(model=model, reward_funcs=reward_fn, args=args, train_dataset=dataset,
                         processing_class=tokenizer)
    trainer.train()
    # <README
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all("pmd/logratio_mean" in h for h in logs)


def test_readme_verl_switch():
    """The command's overrides, applied as verl applies them, in a fresh process where only Ray's setup hook
    (the dotted path in the command) registers the loss; tau from the environment variable it sets."""
    pytest.importorskip("verl.trainer.ppo.core_algos")
    words = VERL_COMMAND.replace("\\\n", " ").split()
    env_assign, overrides = words[0], [w.lstrip("+") for w in words[4:] if "=..." not in w and "rollout.n" not in w]
    code = textwrap.dedent("""
        import importlib, sys, torch
        from omegaconf import OmegaConf
        cfg = OmegaConf.from_dotlist(sys.argv[1:])
        from verl.trainer.ppo import core_algos
        assert "pmd_mean" not in core_algos.POLICY_LOSS_REGISTRY
        mod, fn = cfg.ray_kwargs.ray_init.runtime_env.worker_process_setup_hook.rsplit(".", 1)
        getattr(importlib.import_module(mod), fn)()  # what Ray runs in every worker process
        actor = OmegaConf.create({"policy_loss": {"loss_mode": cfg.actor_rollout_ref.actor.policy_loss.loss_mode}})
        g = torch.Generator().manual_seed(0)
        old = -torch.rand(6, 5, generator=g, dtype=torch.float64) * 2
        new = old + 0.1 * torch.randn(6, 5, generator=g, dtype=torch.float64)
        mask = torch.ones(6, 5); mask[2, 3:] = 0
        adv = torch.randn(6, 1, dtype=torch.float64) * mask
        loss, _ = core_algos.get_policy_loss_fn(actor.policy_loss.loss_mode)(
            old, new, adv, mask, cfg.actor_rollout_ref.actor.loss_agg_mode, actor)
        n = mask.sum(-1); a = adv.sum(-1) / n; d = ((new - old) * mask).sum(-1)
        want = ((a - 0.01 * d) ** 2 / 0.02 / n).mean()
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
        core_algos.get_adv_estimator_fn(cfg.algorithm.adv_estimator)
        print("ok")
    """)
    key, value = env_assign.split("=")
    env = {**os.environ, key: value}
    res = subprocess.run([sys.executable, "-c", code, *overrides], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]
