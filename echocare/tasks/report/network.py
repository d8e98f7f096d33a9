"""Report generation: a transformer text decoder on the EchoCare encoder's global features of a
case's images, with greedy and beam-search decoding.

The encoder (``.encoder``, shared by the images, so :func:`~echocare.networks.initialise_network`,
``pretrained_path`` and :func:`~echocare.networks.configure_finetuning` treat it as in every
task network) gives each image's deepest map (16C channels at H/32). Each image becomes
``1 + grid**2`` memory tokens: the map averaged over space and the map averaged over a
``grid`` x ``grid`` partition (where the lesion is), projected to ``d_model`` with a learned
embedding per image slot and per token position. A ``torch.nn.TransformerDecoder``
(pre-norm, causal self-attention, cross-attention to that memory) predicts the next token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from echocare.networks.encoder import build_encoder

__all__ = ["EchoCareReportNet", "ReportLoss", "beam_search", "greedy_search"]

#: log-probabilities of the next token: (N, T) prefixes and (N,) the sequence (batch row)
#: each prefix belongs to -> (N, V).
StepFunction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def greedy_search(step: StepFunction, batch_size: int, bos_id: int, eos_id: int, max_length: int, device=None) -> tuple[list[list[int]], list[float]]:
    """Pick the most probable token at each step until ``<eos>`` or ``max_length`` tokens.

    Args:
        step: next-token log-probabilities for (N, T) prefixes (``<bos>`` first) and their
            (N,) sequence indices -> (N, V).
        batch_size: number of sequences N.
        max_length: most generated tokens, ``<eos>`` included.

    Returns:
        ``(sequences, log_probs)``: generated ids per sequence (without ``<bos>``, with
        ``<eos>`` when produced) and their summed log-probabilities.
    """
    prefixes = torch.full((batch_size, 1), bos_id, dtype=torch.long, device=device)
    owner = torch.arange(batch_size, device=device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    total = torch.zeros(batch_size, dtype=torch.float64, device=device)
    for _ in range(int(max_length)):
        log_probs = step(prefixes, owner)
        best, token = log_probs.max(dim=-1)
        total = total + torch.where(done, torch.zeros_like(best), best).double()
        token = torch.where(done, torch.full_like(token, eos_id), token)
        prefixes = torch.cat([prefixes, token[:, None]], dim=1)
        done = done | (token == eos_id)
        if bool(done.all()):
            break
    sequences = []
    for row in prefixes[:, 1:].tolist():
        sequences.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return sequences, total.tolist()


def _normalised(log_prob: float, length: int, length_penalty: float) -> float:
    return log_prob / (max(length, 1) ** length_penalty)


def beam_search(
    step: StepFunction,
    batch_size: int,
    bos_id: int,
    eos_id: int,
    max_length: int,
    beam_size: int = 3,
    length_penalty: float = 1.0,
    device=None,
) -> tuple[list[list[int]], list[float]]:
    """Beam search: keep the ``beam_size`` best unfinished prefixes of each sequence; a
    hypothesis ends at ``<eos>`` or after ``max_length`` tokens; a sequence is done when it
    has ``beam_size`` finished hypotheses (or at ``max_length``).

    Hypotheses are ranked by summed log-probability divided by ``length ** length_penalty``
    (length = generated tokens, ``<eos>`` included; 0 ranks by the sum, 1 by the mean).
    With ``beam_size`` 1 this is :func:`greedy_search`.

    Args:
        step: next-token log-probabilities for the (N, T) live prefixes and their (N,)
            sequence indices -> (N, V).

    Returns:
        ``(sequences, scores)``: the best hypothesis of each sequence (without ``<bos>``) and
        its length-normalised score.
    """
    k = int(beam_size)
    if k < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    # Start from one live beam per sequence; the others would duplicate it.
    prefixes = torch.full((batch_size, 1), bos_id, dtype=torch.long, device=device)
    scores = torch.zeros(batch_size, dtype=torch.float64, device=device)
    owner = list(range(batch_size))  # sequence of each live row
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(batch_size)]
    for t in range(int(max_length)):
        if prefixes.shape[0] == 0:
            break
        log_probs = step(prefixes, torch.as_tensor(owner, dtype=torch.long, device=prefixes.device)).double()
        vocab = log_probs.shape[-1]
        candidates = scores[:, None] + log_probs  # (rows, V)
        new_rows, new_scores, new_owner = [], [], []
        for b in range(batch_size):
            rows = [i for i, o in enumerate(owner) if o == b]
            if not rows:
                continue
            flat = candidates[rows].reshape(-1)
            top_scores, top_index = flat.topk(min(2 * k, flat.numel()))
            kept = 0
            for s, index in zip(top_scores.tolist(), top_index.tolist()):
                row, token = rows[index // vocab], index % vocab
                sequence = prefixes[row, 1:].tolist() + [token]
                if token == eos_id or t == max_length - 1:
                    if len(finished[b]) < k:
                        finished[b].append((_normalised(s, len(sequence), length_penalty), sequence))
                else:
                    new_rows.append(prefixes[row].tolist() + [token])
                    new_scores.append(s)
                    new_owner.append(b)
                    kept += 1
                if kept == k or len(finished[b]) >= k:
                    break
            if len(finished[b]) >= k:  # done: drop its live beams
                while new_owner and new_owner[-1] == b:
                    new_rows.pop(), new_scores.pop(), new_owner.pop()
        if not new_rows:
            break
        prefixes = torch.tensor(new_rows, dtype=torch.long, device=device)
        scores = torch.tensor(new_scores, dtype=torch.float64, device=device)
        owner = new_owner
    results, best_scores = [], []
    for b in range(batch_size):
        score, sequence = max(finished[b], key=lambda h: h[0])
        results.append(sequence)
        best_scores.append(score)
    return results, best_scores


class EchoCareReportNet(nn.Module):
    """Report generation from a case's images: EchoCare encoder + transformer text decoder.

    Args:
        network_size: encoder size (``tiny``, ``base``, ``large``).
        vocab_size: tokenizer size (special tokens included).
        num_images: images per case (memory slots).
        d_model: decoder width; ``num_layers``, ``num_heads``, ``dropout`` of the decoder.
        grid: the deepest map is also averaged over a ``grid`` x ``grid`` partition
            (``grid**2`` more memory tokens per image; 0 keeps only the global token).
        max_length: longest token sequence (``<bos>`` included) the positions cover.
        pad_id, bos_id, eos_id: the tokenizer's special ids.
        in_channels: image channels (3: grey images are repeated).

    Forward:
        ``images`` (B, num_images, in_channels, H, W) (H, W divisible by 32) and ``tokens``
        (B, T) (``<bos>`` first, padded with ``pad_id``) -> logits (B, T, vocab_size) of
        the next token at each position.
    """

    def __init__(
        self,
        network_size: str = "base",
        vocab_size: int = 1000,
        num_images: int = 2,
        d_model: int = 256,
        num_layers: int = 3,
        num_heads: int = 8,
        dropout: float = 0.1,
        grid: int = 2,
        max_length: int = 128,
        pad_id: int = 0,
        bos_id: int = 1,
        eos_id: int = 2,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        self.encoder = build_encoder(network_size, in_channels=in_channels)
        feature_dim = int(self.encoder.feature_channels[-1])
        self.num_images, self.grid, self.max_length = int(num_images), int(grid), int(max_length)
        self.pad_id, self.bos_id, self.eos_id = int(pad_id), int(bos_id), int(eos_id)
        self.vocab_size = int(vocab_size)
        tokens_per_image = 1 + self.grid**2
        self.feature_norm = nn.LayerNorm(feature_dim)
        self.memory_proj = nn.Linear(feature_dim, d_model)
        self.memory_pos = nn.Parameter(torch.zeros(num_images, tokens_per_image, d_model))
        self.token_embedding = nn.Embedding(vocab_size, d_model, padding_idx=pad_id)
        self.position_embedding = nn.Embedding(max_length, d_model)
        layer = nn.TransformerDecoderLayer(
            d_model, num_heads, dim_feedforward=4 * d_model, dropout=dropout, batch_first=True, norm_first=True
        )
        self.decoder = nn.TransformerDecoder(layer, num_layers, norm=nn.LayerNorm(d_model))
        self.output = nn.Linear(d_model, vocab_size)
        # The case's mean memory added to every token embedding: a direct path from the
        # images to each prediction besides cross-attention (small data learns it sooner).
        self.context_proj = nn.Linear(d_model, d_model)
        nn.init.normal_(self.memory_pos, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N, C, H, W) -> memory (B, N * (1 + grid**2), d_model)."""
        if images.ndim != 5 or images.shape[1] != self.num_images:
            raise ValueError(f"expected images (B, {self.num_images}, C, H, W), got shape {tuple(images.shape)}")
        b, n = images.shape[:2]
        deepest = self.encoder(images.reshape(b * n, *images.shape[2:]))[-1]  # (B*N, D, h, w)
        tokens = [deepest.mean(dim=(-2, -1))[:, None]]
        if self.grid > 0:
            tokens.append(F.adaptive_avg_pool2d(deepest, self.grid).flatten(2).transpose(1, 2))
        features = torch.cat(tokens, dim=1)  # (B*N, 1 + g*g, D)
        memory = self.memory_proj(self.feature_norm(features)).reshape(b, n, -1, self.memory_pos.shape[-1])
        return (memory + self.memory_pos).reshape(b, -1, self.memory_pos.shape[-1])

    def decode(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids and (B, M, d_model) memory -> (B, T, vocab_size) next-token logits."""
        t = tokens.shape[1]
        if t > self.max_length:
            raise ValueError(f"{t} tokens exceed the network's max_length {self.max_length}")
        positions = torch.arange(t, device=tokens.device)
        x = self.token_embedding(tokens) + self.position_embedding(positions)[None] + self.context_proj(memory.mean(dim=1))[:, None]
        causal = torch.triu(torch.full((t, t), float("-inf"), device=tokens.device), diagonal=1)
        x = self.decoder(x, memory, tgt_mask=causal, tgt_key_padding_mask=tokens == self.pad_id, tgt_is_causal=True)
        return self.output(x)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode(tokens, self.encode_images(images))

    @torch.no_grad()
    def generate(
        self, images: torch.Tensor, beam_size: int = 3, max_length: int | None = None, length_penalty: float = 1.0
    ) -> tuple[list[list[int]], list[float]]:
        """Reports for (B, N, C, H, W) images: beam search (greedy when ``beam_size`` is 1).

        ``max_length``: most generated tokens (default the network's ``max_length - 1``).

        Returns:
            ``(sequences, scores)``: generated ids per case (no ``<bos>``, ending with
            ``<eos>`` unless cut at ``max_length``) and the length-normalised log-probability.
        """
        steps = min(int(max_length or self.max_length - 1), self.max_length - 1)
        memory = self.encode_images(images)
        b = memory.shape[0]

        def step(prefixes: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
            logits = self.decode(prefixes, memory[owner])[:, -1].float()
            logits[:, [self.pad_id, self.bos_id]] = float("-inf")  # never generated
            return torch.log_softmax(logits, dim=-1)

        if int(beam_size) == 1:
            sequences, log_probs = greedy_search(step, b, self.bos_id, self.eos_id, steps, memory.device)
            return sequences, [_normalised(s, len(q), length_penalty) for s, q in zip(log_probs, sequences)]
        return beam_search(step, b, self.bos_id, self.eos_id, steps, int(beam_size), length_penalty, memory.device)


class ReportLoss(nn.Module):
    """Teacher-forcing cross-entropy of next-token logits, padding ignored.

    Args:
        pad_id: the padding id (targets equal to it do not count).
        label_smoothing: mass spread uniformly over the vocabulary (0.1 is usual).

    Forward:
        ``logits`` (B, T, V) and ``targets`` (B, T) -> scalar mean over non-pad targets.
    """

    def __init__(self, pad_id: int = 0, label_smoothing: float = 0.1) -> None:
        super().__init__()
        self.pad_id, self.label_smoothing = int(pad_id), float(label_smoothing)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            targets.reshape(-1),
            ignore_index=self.pad_id,
            label_smoothing=self.label_smoothing,
        )
