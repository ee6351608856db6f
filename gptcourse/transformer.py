"""The Transformer of "Attention Is All You Need" (Vaswani et al. 2017, Figure 1).

    encoder layer:  x = Norm(x + SelfAttention(x))                      (post-norm, the paper)
                    x = Norm(x + FeedForward(x))
    decoder layer:  y = Norm(y + MaskedSelfAttention(y))               (position i sees <= i)
                    y = Norm(y + CrossAttention(y, encoder output))    (queries from y)
                    y = Norm(y + FeedForward(y))

norm_first=True puts each LayerNorm before its sublayer instead (pre-norm,
as GPT-2 does): x = x + Sublayer(Norm(x)), with a final LayerNorm after the
stack. Shapes are batch-first: B batch, S source length, T target length,
C = d_model. Masks follow gptcourse.attention: True = may attend.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import MultiHeadAttention, causal_mask, padding_mask
from .data import Vocab, seq2seq_loss
from .positional import SinusoidalPositionalEncoding

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}


class FeedForward(nn.Module):
    """Position-wise feed-forward: FFN(x) = max(0, x W_1 + b_1) W_2 + b_2. (B, T, C) -> (B, T, C)"""

    def __init__(self, d_model, d_ff, dropout=0.0, activation="relu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
        self.linear1 = nn.Linear(d_model, d_ff)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x):
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class EncoderLayer(nn.Module):
    """Self-attention and feed-forward, each wrapped in Add & Norm. (B, S, C) -> (B, S, C)"""

    def __init__(self, d_model, n_heads, d_ff, dropout=0.0, norm_first=False, activation="relu"):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.ff = FeedForward(d_model, d_ff, dropout, activation)
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first

    def forward(self, x, mask=None):
        """mask: which keys each position may attend to, e.g. a (B, 1, S) padding mask."""
        if self.norm_first:                                              # pre-norm (GPT-2)
            x = x + self.dropout(self.self_attn(self.norm1(x), mask=mask))
            return x + self.dropout(self.ff(self.norm2(x)))
        x = self.norm1(x + self.dropout(self.self_attn(x, mask=mask)))   # post-norm (paper)
        return self.norm2(x + self.dropout(self.ff(x)))


class DecoderLayer(nn.Module):
    """Masked self-attention, encoder-decoder attention and feed-forward,
    each wrapped in Add & Norm. (B, T, C), memory (B, S, C) -> (B, T, C)"""

    def __init__(self, d_model, n_heads, d_ff, dropout=0.0, norm_first=False, activation="relu"):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.cross_attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.ff = FeedForward(d_model, d_ff, dropout, activation)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d_model) for _ in range(3))
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first
        self.cross_weights = None        # (B, H, T, S) of the last call, when asked for

    def _cross(self, y, memory, memory_mask, keep_weights):
        if keep_weights:
            out, self.cross_weights = self.cross_attn(y, memory, mask=memory_mask, return_weights=True)
            return out
        return self.cross_attn(y, memory, mask=memory_mask)

    def forward(self, y, memory, tgt_mask=None, memory_mask=None, causal=True, keep_weights=False):
        """tgt_mask: extra mask on the decoder's own keys (e.g. padding);
        causal: add the causal mask (the decoder must not see the future);
        memory_mask: which encoder positions may be attended to, e.g. (B, 1, S);
        keep_weights: store the cross-attention weights in self.cross_weights."""
        d = self.dropout
        if self.norm_first:
            y = y + d(self.self_attn(self.norm1(y), mask=tgt_mask, causal=causal))
            y = y + d(self._cross(self.norm2(y), memory, memory_mask, keep_weights))
            return y + d(self.ff(self.norm3(y)))
        y = self.norm1(y + d(self.self_attn(y, mask=tgt_mask, causal=causal)))
        y = self.norm2(y + d(self._cross(y, memory, memory_mask, keep_weights)))
        return self.norm3(y + d(self.ff(y)))


class Transformer(nn.Module):
    """An encoder-decoder Transformer for seq2seq tasks, with the same
    interface as gptcourse.rnn.Seq2Seq (so rnn.translate and rnn.accuracy
    work with it):

        forward(src, src_lengths, tgt_in, tgt_out=None) -> (logits (B, T, V), loss)
        greedy_decode(src, src_lengths, max_len) -> (ids (B, max_len), cross-attention (B, max_len, S))

    Token embeddings are scaled by sqrt(d_model) and added to the sinusoidal
    positional encoding, as in the paper.
    """

    def __init__(self, src_vocab_size, tgt_vocab_size, d_model=64, n_heads=4, n_layers=2, d_ff=256,
                 dropout=0.0, max_len=256, norm_first=False, activation="relu", share_embeddings=False):
        super().__init__()
        if share_embeddings and src_vocab_size != tgt_vocab_size:
            raise ValueError(f"share_embeddings needs one vocabulary, got sizes {src_vocab_size} "
                             f"and {tgt_vocab_size}")
        self.d_model = d_model
        self.src_embedding = nn.Embedding(src_vocab_size, d_model)
        # the paper shares one matrix between both embeddings and the pre-softmax layer
        self.tgt_embedding = self.src_embedding if share_embeddings else nn.Embedding(tgt_vocab_size, d_model)
        self.positions = SinusoidalPositionalEncoding(max_len, d_model)
        layer_args = (d_model, n_heads, d_ff, dropout, norm_first, activation)
        self.encoder_layers = nn.ModuleList(EncoderLayer(*layer_args) for _ in range(n_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(*layer_args) for _ in range(n_layers))
        # pre-norm stacks end with a LayerNorm (post-norm outputs are normalised already)
        self.encoder_norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(d_model) if norm_first else nn.Identity()
        self.dropout = nn.Dropout(dropout)
        self.generator = nn.Linear(d_model, tgt_vocab_size, bias=not share_embeddings)
        # Embeddings start at N(0, 1/d_model), so that after the sqrt(d_model)
        # scaling they are about as large as the positional code (|P| <= 1):
        # with PyTorch's default N(0, 1) the positions would be drowned out.
        embeddings = [self.src_embedding] + ([] if share_embeddings else [self.tgt_embedding])
        for embedding in embeddings:                  # a list: a fixed order, so seeded runs repeat
            nn.init.normal_(embedding.weight, std=d_model ** -0.5)
        if share_embeddings:
            self.generator.weight = self.src_embedding.weight

    def embed(self, embedding, ids):
        return self.dropout(self.positions(embedding(ids) * math.sqrt(self.d_model)))

    def encode(self, src, src_lengths):
        """src (B, S) -> memory (B, S, C), source mask (B, 1, S)."""
        src_mask = padding_mask(src_lengths, src.shape[1]).to(src.device)
        x = self.embed(self.src_embedding, src)
        for layer in self.encoder_layers:
            x = layer(x, mask=src_mask)
        return self.encoder_norm(x), src_mask

    def decode(self, tgt_in, memory, src_mask, keep_weights=False):
        """tgt_in (B, T) -> logits (B, T, V). Padding at the end of tgt_in needs no
        mask: the causal mask already keeps every real position from seeing it."""
        y = self.embed(self.tgt_embedding, tgt_in)
        for layer in self.decoder_layers:
            y = layer(y, memory, memory_mask=src_mask, causal=True, keep_weights=keep_weights)
        return self.generator(self.decoder_norm(y))

    def forward(self, src, src_lengths, tgt_in, tgt_out=None):
        memory, src_mask = self.encode(src, src_lengths)
        logits = self.decode(tgt_in, memory, src_mask)
        return logits, None if tgt_out is None else seq2seq_loss(logits, tgt_out)

    @torch.no_grad()
    def greedy_decode(self, src, src_lengths, max_len):
        """Append the most likely next token max_len times (recomputing the
        decoder over the prefix: fine for short outputs). The attention
        returned is the last layer's cross-attention, averaged over heads."""
        memory, src_mask = self.encode(src, src_lengths)
        ys = torch.full((src.shape[0], 1), Vocab.BOS, dtype=torch.long, device=src.device)
        for _ in range(max_len):
            logits = self.decode(ys, memory, src_mask, keep_weights=True)
            ys = torch.cat([ys, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        attention = self.decoder_layers[-1].cross_weights.mean(dim=1)      # (B, max_len, S)
        return ys[:, 1:], attention


def transformer_params(n_layers, d_model, d_ff, vocab_size):
    """Parameters of the paper's encoder-decoder with one shared vocabulary
    (Transformer(..., share_embeddings=True)), counted on paper.

    Encoder layer: 4 attention projections (4 C^2 + 4 C), feed-forward
    (2 C d_ff + d_ff + C), 2 LayerNorms (4 C). Decoder layer: one more
    attention block and LayerNorm. Plus one embedding matrix, shared by the
    source, the target and the pre-softmax layer.
    """
    C = d_model
    attention = 4 * C * C + 4 * C
    ff = 2 * C * d_ff + d_ff + C
    encoder = n_layers * (attention + ff + 2 * 2 * C)
    decoder = n_layers * (2 * attention + ff + 3 * 2 * C)
    return encoder + decoder + vocab_size * C
