"""Policy packing: packed rows (one row, or rows of bounded length) give every sequence exactly the hidden states
it gets when run alone, and the layout places whole sequences, in order, within each row's capacity."""
import pytest
import torch

from fastpmd.train.model import Policy, tiny_config
from fastpmd.train.packing import pack_layout


def _model():
    import transformers

    cfg = tiny_config("tiny-qwen2", vocab_size=37, pad_id=0, bos_id=1, eos_id=2, hidden_size=48,
                      intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def _batch(lengths, L, vocab=37):
    g = torch.Generator().manual_seed(1)
    valid = torch.arange(L)[None] < torch.tensor(lengths)[:, None]  # [B, L]
    ids = torch.randint(3, vocab, (len(lengths), L), generator=g) * valid
    pos = torch.arange(L).expand(len(lengths), L) * valid
    return ids, pos, valid


def test_pack_layout_places_whole_sequences_in_order():
    lengths = [5, 3, 7, 1, 6, 2]
    _, _, valid = _batch(lengths, 7)
    dest, used, C = pack_layout(valid, row_tokens=8)
    assert C == 8 and used.tolist() == [8, 8, 8] and used.sum() == sum(lengths)
    starts = torch.tensor([0] + lengths).cumsum(0)[:-1]
    for s, n in zip(starts.tolist(), lengths):
        d = dest[s : s + n]
        assert (d.diff() == 1).all() and d[0] // C == d[-1] // C  # contiguous, never split across rows
    assert (dest.diff() > 0).all()  # order kept
    dest1, used1, C1 = pack_layout(valid, row_tokens=None)
    assert C1 == sum(lengths) and used1.tolist() == [C1] and dest1.tolist() == list(range(C1))
    assert pack_layout(valid, row_tokens=3)[2] == 7  # capacity grows to the longest sequence


@pytest.mark.parametrize("row_tokens", [None, 8, 11, 64])
def test_packed_forward_equals_each_sequence_alone(row_tokens):
    hf = _model()
    lengths, L = [5, 3, 7, 1, 6, 2, 7], 9
    ids, pos, valid = _batch(lengths, L)
    policy = Policy(hf, row_tokens=row_tokens)
    with torch.no_grad():
        hidden, _ = policy(ids, pos, valid)  # [B, L, H]
        for b, n in enumerate(lengths):
            alone = hf.model(input_ids=ids[b : b + 1, :n], use_cache=False).last_hidden_state[0]  # [n, H]
            torch.testing.assert_close(hidden[b, :n], alone, rtol=1e-5, atol=1e-5)
            assert (hidden[b, n:] == 0).all()
