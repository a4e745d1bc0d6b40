import pytest
import torch

from tessera.errors import ContextTooLongError
from tessera.lm import GenerationStats
from tessera.lm.local import sample_next


def test_stream_matches_hf_generate_greedy(tiny_lm):
    ids = tiny_lm.encode_chat([{"role": "user", "content": "Say something."}])
    stats = GenerationStats()
    text = "".join(tiny_lm.stream(ids, max_new_tokens=12, stats=stats))
    ref = tiny_lm.model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tiny_lm.tokenizer.pad_token_id)
    ref_ids = [t for t in ref[0, ids.shape[1]:].tolist() if t not in tiny_lm.stop_ids]
    n = stats.new_tokens
    assert text == tiny_lm.tokenizer.decode(ref_ids[:n], skip_special_tokens=True)
    assert stats.prompt_tokens == ids.shape[1] and stats.total_s > 0


def test_sampling_is_seeded(tiny_lm):
    ids = tiny_lm.encode_chat([{"role": "user", "content": "Hi"}])
    a = tiny_lm.generate(ids, max_new_tokens=8, temperature=1.0, seed=3)
    b = tiny_lm.generate(ids, max_new_tokens=8, temperature=1.0, seed=3)
    assert a == b


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(sample_next(logits, 1.0, 0.8, g)) for _ in range(200)}
    assert draws == {0, 1}
    assert int(sample_next(logits, 0.0)) == 0


def test_prompt_longer_than_context(tiny_lm):
    ids = torch.ones(1, tiny_lm.context_window, dtype=torch.long)
    with pytest.raises(ContextTooLongError, match="context holds"):
        list(tiny_lm.stream(ids, max_new_tokens=4))
