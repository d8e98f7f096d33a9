"""Report network: shapes, causal decoding, greedy and beam search."""

from __future__ import annotations

import math

import pytest
import torch

from echocare.tasks.report.network import EchoCareReportNet, beam_search, greedy_search

PAD, BOS, EOS, A, B = 0, 1, 2, 3, 4


def _toy_step(prefixes: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
    """A fixed language model: after <bos>: A 0.55, B 0.45; after A: <eos> 0.4, A 0.3, B 0.3;
    after B: <eos> 0.9, A 0.05, B 0.05; after two tokens: <eos> 1 (almost)."""
    rows = []
    for prefix in prefixes.tolist():
        p = [1e-9] * 5
        if len(prefix) == 1:
            p[A], p[B] = 0.55, 0.45
        elif len(prefix) == 2 and prefix[1] == A:
            p[EOS], p[A], p[B] = 0.4, 0.3, 0.3
        elif len(prefix) == 2:
            p[EOS], p[A], p[B] = 0.9, 0.05, 0.05
        else:
            p[EOS] = 1.0
        rows.append(p)
    return torch.tensor(rows, dtype=torch.float64).log()


def test_beam_search_beats_greedy_on_toy_model():
    greedy, greedy_logp = greedy_search(_toy_step, 2, BOS, EOS, max_length=5)
    assert greedy == [[A, EOS], [A, EOS]] and greedy_logp[0] == pytest.approx(math.log(0.55 * 0.4))
    beams, scores = beam_search(_toy_step, 2, BOS, EOS, max_length=5, beam_size=2, length_penalty=0.0)
    assert beams == [[B, EOS], [B, EOS]]
    assert scores[0] == pytest.approx(math.log(0.45 * 0.9)) and scores[0] > greedy_logp[0]
    # beam 1 is greedy; length penalty 1 ranks by the mean log-probability
    assert beam_search(_toy_step, 2, BOS, EOS, 5, beam_size=1, length_penalty=0.0)[0] == greedy
    _, mean_scores = beam_search(_toy_step, 1, BOS, EOS, 5, beam_size=2, length_penalty=1.0)
    assert mean_scores[0] == pytest.approx(math.log(0.45 * 0.9) / 2)
    # cut at max_length: hypotheses end without <eos>
    assert beam_search(_toy_step, 1, BOS, EOS, 1, beam_size=2)[0] == [[A]]


@pytest.fixture(scope="module")
def network() -> EchoCareReportNet:
    torch.manual_seed(0)
    return EchoCareReportNet("tiny", vocab_size=11, d_model=32, num_layers=2, num_heads=4, max_length=12, dropout=0.0).eval()


def test_report_net_shapes_and_causality(network):
    images = torch.rand(2, 2, 3, 64, 64)
    tokens = torch.tensor([[BOS, 5, 6, 7, EOS], [BOS, 8, EOS, PAD, PAD]])
    with torch.no_grad():
        logits = network(images, tokens)
        memory = network.encode_images(images)
        changed = network.decode(torch.tensor([[BOS, 5, 6, 9, 10]]), memory[:1])
    assert logits.shape == (2, 5, 11) and memory.shape == (2, 2 * (1 + 4), 32)
    # causal: later tokens do not change earlier positions' predictions
    torch.testing.assert_close(changed[0, :3], logits[0, :3], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(changed[0, 3:], logits[0, 3:])
    with pytest.raises(ValueError, match=r"\(B, 2, C, H, W\)"):
        network.encode_images(torch.rand(2, 3, 64, 64))


def test_beam_one_equals_greedy_on_network(network):
    torch.manual_seed(1)
    images = torch.rand(3, 2, 3, 64, 64)
    greedy, greedy_scores = network.generate(images, beam_size=1, max_length=8)
    memory = network.encode_images(images)

    def step(prefixes, owner):
        logits = network.decode(prefixes, memory[owner])[:, -1].float()
        logits[:, [PAD, BOS]] = float("-inf")
        return torch.log_softmax(logits, dim=-1)

    with torch.no_grad():
        beams, beam_scores = beam_search(step, 3, BOS, EOS, 8, beam_size=1)
    assert beams == greedy and beam_scores == pytest.approx(greedy_scores, abs=1e-5)
    assert all(PAD not in s and BOS not in s and 1 <= len(s) <= 8 for s in greedy)
    wide, wide_scores = network.generate(images, beam_size=4, max_length=8)
    assert len(wide) == 3 and all(1 <= len(s) <= 8 and PAD not in s for s in wide)
    assert all(math.isfinite(s) and s <= 0 for s in wide_scores)
