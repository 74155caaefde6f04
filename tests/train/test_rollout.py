"""SamplingConfig, the engine protocol, and HFEngine end to end on a tiny random Qwen2."""
import sys

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from fastpmd.train.task.tokenizer import CharTokenizer
from fastpmd.train.rollout import HFEngine, Response, RolloutEngine, SamplingConfig, trim_response

TOK = CharTokenizer()
EOS, PAD = TOK.eos_id, TOK.pad_id


def tiny_model(seed=0, tie=True):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=TOK.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=64, max_position_embeddings=128,
                      tie_word_embeddings=tie)
    return Qwen2ForCausalLM(cfg).eval()


PROMPTS = [TOK.encode("12+7="), TOK.encode("3+4="), TOK.encode("12+7=")]


def greedy_reference(model, prompt, steps):
    """Unbatched argmax decoding with a full forward per step (no cache, no padding)."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(torch.tensor([ids])).logits[0, -1].argmax())
            out.append(nxt)
            ids.append(nxt)
            if nxt == EOS:
                break
    return out


def test_sampling_config_validation():
    with pytest.raises(ValueError, match="n must"):
        SamplingConfig(n=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)


def test_trim_response():
    assert trim_response([4, 5, EOS, 6, EOS], EOS, 10) == [4, 5, EOS]
    assert trim_response([4, 5, 6], EOS, 2) == [4, 5]
    assert trim_response([EOS, PAD, PAD], EOS, 3) == [EOS]


def test_hf_engine_shapes_eos_and_protocol():
    eng = HFEngine(tiny_model(), EOS, PAD)
    assert isinstance(eng, RolloutEngine)
    out = eng.generate(PROMPTS, SamplingConfig(n=4, max_new_tokens=9, seed=0))
    assert len(out) == 3 and all(len(o) == 4 for o in out)
    for resp in (r for o in out for r in o):
        assert 1 <= len(resp) <= 9
        assert EOS not in resp[:-1]
        assert len(resp) == 9 or resp[-1] == EOS
    assert eng.generate([], SamplingConfig()) == []
    with pytest.raises(ValueError, match="prompt_ids"):
        eng.generate([[]], SamplingConfig())


def test_hf_engine_seeding_is_reproducible_and_leaves_global_rng_alone():
    eng = HFEngine(tiny_model(), EOS, PAD)
    s = SamplingConfig(n=3, max_new_tokens=8, seed=11)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = eng.generate(PROMPTS, s)
    assert torch.equal(torch.get_rng_state(), state)  # caller's RNG untouched
    assert eng.generate(PROMPTS, s) == a
    assert eng.generate(PROMPTS, SamplingConfig(n=3, max_new_tokens=8, seed=12)) != a
    # equal prompts in one call are sampled independently
    assert a[0] != a[2]


def test_hf_engine_greedy_matches_unbatched_argmax_with_left_padding():
    model = tiny_model(seed=1)
    eng = HFEngine(model, EOS, PAD, batch_size=2)
    prompts = [TOK.encode("1="), TOK.encode("123+456="), TOK.encode("9*9=")]
    out = eng.generate(prompts, SamplingConfig(n=2, temperature=0.0, max_new_tokens=6))
    for p, o in zip(prompts, out):
        assert o[0] == o[1] == greedy_reference(model, p, 6)


def test_hf_engine_temperature_and_top_p_sample_from_the_right_distribution():
    # one decoding step from a fixed prompt: empirical frequencies follow softmax(logits / T), truncated by top_p
    model = tiny_model(seed=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(4)  # spread the random logits over a few tokens (tied: embeddings too)
        logits = model(torch.tensor([PROMPTS[1]])).logits[0, -1].double()
    # the temperatures must lead to clearly different distributions for the check to mean anything
    assert (torch.softmax(logits, -1) - torch.softmax(logits / 0.5, -1)).abs().max() > 0.2
    eng = HFEngine(model, EOS, PAD)
    n = 4000
    for T, top_p in ((1.0, 1.0), (0.5, 1.0), (1.0, 0.64)):  # 0.64: cumulative mass 0.62 | 0.66
        out = eng.generate([PROMPTS[1]], SamplingConfig(n=n, temperature=T, top_p=top_p, max_new_tokens=1, seed=0))
        counts = torch.bincount(torch.tensor([r[0] for r in out[0]]), minlength=TOK.vocab_size).double() / n
        probs = torch.softmax(logits / T, -1)
        if top_p < 1.0:  # keep the smallest prefix of sorted probabilities whose mass reaches top_p
            sp, idx = probs.sort(descending=True)
            keep = (sp.cumsum(0) - sp) < top_p
            probs = torch.zeros_like(probs).scatter(0, idx[keep], sp[keep])
            probs /= probs.sum()
            assert counts[probs == 0].sum() == 0
        assert (counts - probs).abs().max() < 0.04


@pytest.mark.parametrize("T, top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8), (0.0, 1.0)])
def test_hf_engine_reports_the_sampled_tokens_logprobs(T, top_p):
    """Response.logprobs[t] = log-prob of token t under softmax(logits / T), top-p renormalised (float64
    reference from a full forward over prompt + response, no cache, no padding); greedy: log_softmax(logits)."""
    model = tiny_model(seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(3)
    out = HFEngine(model, EOS, PAD).generate(PROMPTS, SamplingConfig(n=3, temperature=T, top_p=top_p,
                                                                     max_new_tokens=7, seed=1))
    checked = 0
    for prompt, group in zip(PROMPTS, out):
        for resp in group:
            assert isinstance(resp, Response) and len(resp.logprobs) == len(resp) > 0
            with torch.no_grad():
                logits = model(torch.tensor([prompt + list(resp)])).logits[0].double()  # [L, V]
            z = logits[len(prompt) - 1 : len(prompt) - 1 + len(resp)] / (T or 1.0)  # [T_resp, V]
            ref = torch.log_softmax(z, -1)
            if top_p < 1.0:
                sp, idx = ref.exp().sort(-1, descending=True)
                drop = torch.zeros_like(ref, dtype=torch.bool).scatter(-1, idx, (sp.cumsum(-1) - sp) >= top_p)
                ref = torch.log_softmax(z.masked_fill(drop, float("-inf")), -1)
            want = ref.gather(1, torch.tensor(list(resp))[:, None]).squeeze(1)
            torch.testing.assert_close(torch.tensor(resp.logprobs, dtype=torch.float64), want, atol=1e-5, rtol=0)
            checked += len(resp)
    assert checked > 10


def test_response_is_a_token_list_with_aligned_logprobs():
    r = Response([4, 5, EOS], [-0.1, -0.2, -0.3])
    assert r == [4, 5, EOS] and r[1:] == [5, EOS] and r.logprobs == [-0.1, -0.2, -0.3]
    assert Response([4]).logprobs is None
    with pytest.raises(ValueError, match="logprobs: 1 values for 2 tokens"):
        Response([4, 5], [-0.1])


def test_hf_engine_update_weights_copy_and_shared():
    src, dst = tiny_model(seed=3), tiny_model(seed=4)
    eng = HFEngine(dst, EOS, PAD)
    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=6)
    eng.update_weights(src.state_dict().items())
    want = [greedy_reference(src, p, 6) for p in PROMPTS]
    assert [o[0] for o in eng.generate(PROMPTS, greedy)] == want
    # make one token dominate: the engine follows
    new = {k: v.clone() for k, v in src.state_dict().items()}
    new["model.embed_tokens.weight"].zero_()
    new["model.embed_tokens.weight"][:, 0] = 1.0
    new["model.embed_tokens.weight"][7, 0] = 50.0  # tied lm_head: token 7 has by far the largest logit
    new["lm_head.weight"] = new["model.embed_tokens.weight"]  # tied: both names hold the same tensor
    new["model.norm.weight"].fill_(1.0)
    for k in new:
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            new[k].zero_()
    eng.update_weights(new.items())
    out = eng.generate(PROMPTS, SamplingConfig(n=2, max_new_tokens=5, seed=0))
    assert all(r == [7] * 5 for o in out for r in o)
    # a shared model: nothing to copy, nothing changes
    shared = HFEngine(src, EOS, PAD)
    before = {k: v.clone() for k, v in src.state_dict().items()}
    shared.update_weights(src.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in src.state_dict().items())
    with pytest.raises(ValueError, match="not in"):
        eng.update_weights([("nope.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        eng.update_weights([("model.norm.weight", torch.zeros(3))])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="offload moves the copy off an accelerator: needs CUDA"))])
def test_hf_engine_offload_sleep_update_wake(device):
    src, dst = tiny_model(seed=3), tiny_model(seed=4).to(device)
    eng = HFEngine(dst, EOS, PAD, offload=True)
    greedy = SamplingConfig(n=1, temperature=0.0, max_new_tokens=6)
    before = eng.generate(PROMPTS, greedy)
    eng.sleep()
    assert all(p.device.type == "cpu" for p in dst.parameters())  # parked in host memory (cpu: stays)
    eng.wake()
    assert all(p.device.type == device for p in dst.parameters())
    assert eng.generate(PROMPTS, greedy) == before
    eng.sleep()
    eng.update_weights((k, v.to(device)) for k, v in src.state_dict().items())  # lands in the host copy
    eng.wake()
    assert [o[0] for o in eng.generate(PROMPTS, greedy)] == [greedy_reference(src, p, 6) for p in PROMPTS]


def test_hf_engine_restores_training_mode():
    model = tiny_model().train()
    HFEngine(model, EOS, PAD).generate(PROMPTS[:1], SamplingConfig(max_new_tokens=2, seed=0))
    assert model.training


def test_vllm_engine_without_vllm_names_the_extra(monkeypatch, tmp_path):
    from fastpmd.train.rollout.vllm import VLLMEngine

    (tmp_path / "config.json").write_text('{"eos_token_id": 2}')
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError, installed or not
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # the constructor sets it; restored afterwards
    with pytest.raises(ImportError, match=r"fastpmd\[vllm\]"):
        VLLMEngine(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="model_dir"):
        VLLMEngine(tmp_path / "empty")
    with pytest.raises(ValueError, match="weight_sync"):
        VLLMEngine(tmp_path, weight_sync="magic")
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        VLLMEngine(tmp_path, tensor_parallel_size=2)


class _FakeLLM:
    """Records the calls VLLMEngine makes (the sleep/wake bookkeeping is ours; vLLM itself is tested elsewhere)."""

    def __init__(self):
        self.calls = []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))
        return True

    def collective_rpc(self, fn, args=()):
        self.calls.append(("rpc", [n for n, _ in args[0]], args[1]))  # consumes the stream

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


def _fake_vllm_engine(sleep_mode=True, model_type="qwen2", monkeypatch=None):
    from fastpmd.train.rollout import vllm as rollout_vllm
    from fastpmd.train.rollout.vllm import VLLMEngine

    eng = VLLMEngine.__new__(VLLMEngine)  # skip the constructor: no vLLM needed
    eng.llm, eng.enable_sleep_mode, eng.sleep_level, eng.weight_sync = _FakeLLM(), sleep_mode, 2, "auto"
    eng._asleep, eng._weights_awake, eng.eos_id, eng.model_type = False, False, EOS, model_type
    if monkeypatch is not None:  # record torch.cuda.empty_cache() (a no-op without CUDA) among the calls
        monkeypatch.setattr(rollout_vllm, "_empty_cuda_cache", lambda: eng.llm.calls.append(("empty_cache",)))
    return eng


def test_vllm_engine_sleep_update_wake_sequence(monkeypatch):
    eng = _fake_vllm_engine(monkeypatch=monkeypatch)
    w = [("model.norm.weight", torch.ones(4))]
    eng.update_weights(w)  # awake: load, then drop stale prefix-cache blocks
    assert eng.llm.calls == [("rpc", ["model.norm.weight"], "auto"), ("reset_prefix_cache",)]
    eng.llm.calls.clear()
    eng.sleep()
    eng.sleep()  # idempotent
    with pytest.raises(RuntimeError, match="wake"):
        eng.generate([[3]], SamplingConfig())
    eng.update_weights(w)  # asleep: wake the weights only
    eng.wake()
    eng.wake()
    # level 2 by default (weights are re-sent anyway); the CUDA cache is emptied before each wake-up
    assert eng.llm.calls == [("sleep", 2), ("empty_cache",), ("wake_up", ["weights"]),
                             ("rpc", ["model.norm.weight"], "auto"), ("empty_cache",), ("wake_up", ["kv_cache"])]
    eng.llm.calls.clear()
    eng.sleep()
    eng.wake()  # no update in between: wake everything
    assert eng.llm.calls == [("sleep", 2), ("empty_cache",), ("wake_up", None)]
    off = _fake_vllm_engine(sleep_mode=False)
    off.sleep()
    off.wake()
    assert off.llm.calls == []


def test_vllm_engine_sends_moe_experts_per_expert():
    eng = _fake_vllm_engine(model_type="qwen3_moe")
    eng.update_weights([("model.layers.0.mlp.experts.gate_up_proj", torch.zeros(2, 6, 4)),
                        ("model.layers.0.mlp.experts.down_proj", torch.zeros(2, 4, 3))])
    assert eng.llm.calls[0][1] == [f"model.layers.0.mlp.experts.{e}.{p}_proj.weight"
                                   for e in range(2) for p in ("gate", "up")] + \
        [f"model.layers.0.mlp.experts.{e}.down_proj.weight" for e in range(2)]


def test_vllm_worker_weight_loader_paths():
    from fastpmd.train.rollout.vllm import _load_weights_on_worker

    seen = {}

    class Model:
        def load_weights(self, weights):
            seen["load"] = weights

    class Runner:
        def get_model(self):
            return Model()

    class OldWorker:  # no reload_weights: the classic model.load_weights path
        model_runner = Runner()

    class NewWorker(OldWorker):
        def reload_weights(self, weights_iterator, is_checkpoint_format):
            seen["reload"] = (weights_iterator, is_checkpoint_format)

    w = [("x", torch.zeros(1))]
    assert _load_weights_on_worker(OldWorker(), w, "auto") == "load" and seen.pop("load") is w
    assert _load_weights_on_worker(NewWorker(), w, "auto") == "reload" and seen.pop("reload") == (w, True)
    assert _load_weights_on_worker(NewWorker(), w, "load") == "load" and seen.pop("load") is w
