"""Sequence-to-sequence RNNs: the encoder-decoder of Part I, with and without attention.

Notation of the lecture (and of Bahdanau et al. 2015):

    encoder      h_j = f(x_j, h_{j-1})                  (bidirectional: h_j = [h_j(fwd); h_j(bwd)])
    fixed context  c = the encoder's last hidden state    (one vector for the whole input)
    decoder      s_i = f(s_{i-1}, y_{i-1}, c)             p(y_i | y_<i, x) = g(y_{i-1}, s_i, c)
    attention    e_ij = a(s_{i-1}, h_j),  alpha_ij = softmax_j(e_ij),  c_i = sum_j alpha_ij h_j
                 s_i = f(s_{i-1}, y_{i-1}, c_i)           p(y_i | y_<i, x) = g(y_{i-1}, s_i, c_i)

Shapes are batch-first: B batch, S source length, T target length, E
embedding size, H hidden size, D = H (or 2H when bidirectional).
Token ids follow gptcourse.data.Vocab: PAD = 0, BOS = 1, EOS = 2.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import AdditiveAttention
from .data import Vocab, seq2seq_batch, seq2seq_loss

CELLS = {"gru": (nn.GRU, nn.GRUCell), "lstm": (nn.LSTM, nn.LSTMCell)}


def _check_cell(cell):
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {list(CELLS)}, got {cell!r}")


class Encoder(nn.Module):
    """Embed the source and run an RNN over it, skipping the padding.

    forward(src (B, S), lengths (B,)) -> (annotations (B, S, D), last (B, D)):
    annotations h_j for every position (zeros at padding) and the last hidden
    state (for a bidirectional RNN: the forward RNN's state after the last
    real token, next to the backward RNN's state after the first).
    """

    def __init__(self, vocab_size, emb_dim, hidden_size, bidirectional=False, cell="gru"):
        super().__init__()
        _check_cell(cell)
        self.embedding = nn.Embedding(vocab_size, emb_dim, padding_idx=Vocab.PAD)
        self.rnn = CELLS[cell][0](emb_dim, hidden_size, batch_first=True, bidirectional=bidirectional)
        self.output_size = hidden_size * (2 if bidirectional else 1)

    def forward(self, src, lengths):
        if src.dim() != 2 or lengths.shape != src.shape[:1]:
            raise ValueError(f"need src (B, S) and lengths (B,), got {tuple(src.shape)} and "
                             f"{tuple(lengths.shape)}")
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embedding(src), lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, state = self.rnn(packed)
        annotations, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=src.shape[1])
        h_n = state[0] if isinstance(state, tuple) else state          # (directions, B, H)
        last = torch.cat(list(h_n), dim=-1)                             # (B, D)
        return annotations, last


class _DecoderBase(nn.Module):
    """What both decoders share: the embedding, the RNN cell, the output layer g."""

    def __init__(self, vocab_size, emb_dim, hidden_size, context_size, cell):
        super().__init__()
        _check_cell(cell)
        self.embedding = nn.Embedding(vocab_size, emb_dim, padding_idx=Vocab.PAD)
        self.cell = CELLS[cell][1](emb_dim + context_size, hidden_size)     # s_i = f(s_{i-1}, [y_{i-1}; c])
        self.init = nn.Linear(context_size, hidden_size)                    # s_0 = tanh(W_init c)
        self.out = nn.Linear(hidden_size + emb_dim + context_size, vocab_size)  # g(y_{i-1}, s_i, c)
        self.is_lstm = cell == "lstm"

    def initial_state(self, summary):
        s0 = torch.tanh(self.init(summary))                             # (B, H)
        return (s0, torch.zeros_like(s0)) if self.is_lstm else s0

    def hidden(self, state):
        return state[0] if self.is_lstm else state

    def update(self, y_prev, state, context):
        """One decoder step given the context c_i: returns (logits (B, V), new state)."""
        emb = self.embedding(y_prev)                                    # (B, E)
        state = self.cell(torch.cat([emb, context], dim=-1), state)    # s_i
        logits = self.out(torch.cat([self.hidden(state), emb, context], dim=-1))
        return logits, state


class Decoder(_DecoderBase):
    """Fixed-context decoder (Cho et al. 2014): one context vector c for every step."""

    def __init__(self, vocab_size, emb_dim, hidden_size, context_size, cell="gru"):
        super().__init__(vocab_size, emb_dim, hidden_size, context_size, cell)

    def start(self, annotations, last, src_mask):
        return self.initial_state(last), last                          # state s_0, memory = c

    def step(self, y_prev, state, memory, src_mask):
        """y_prev (B,) -> (logits (B, V), state, attention None)."""
        logits, state = self.update(y_prev, state, memory)
        return logits, state, None


class AttentionDecoder(_DecoderBase):
    """Bahdanau's decoder: a fresh context c_i = sum_j alpha_ij h_j at every step."""

    def __init__(self, vocab_size, emb_dim, hidden_size, context_size, attn_dim=None, cell="gru"):
        super().__init__(vocab_size, emb_dim, hidden_size, context_size, cell)
        self.attention = AdditiveAttention(hidden_size, context_size, attn_dim or hidden_size)

    def start(self, annotations, last, src_mask):
        # memory: all h_j, and U h_j, which is the same at every step
        return self.initial_state(last), (annotations, self.attention.U(annotations))

    def step(self, y_prev, state, memory, src_mask):
        """y_prev (B,) -> (logits (B, V), state, alpha (B, S))."""
        annotations, Uh = memory
        context, alpha = self.attention(self.hidden(state), annotations, src_mask, Uh=Uh)  # c_i
        logits, state = self.update(y_prev, state, context)
        return logits, state, alpha


class Seq2Seq(nn.Module):
    """Encoder + decoder. attention=False: the fixed-context model of chapter 1
    (RNNencdec); attention=True: Bahdanau's RNNsearch with a bidirectional
    encoder (chapter 2).

    forward(src, src_lengths, tgt_in, tgt_out=None) -> (logits (B, T, V), loss):
    teacher forcing, the decoder reads the true previous token tgt_in[:, i].
    """

    def __init__(self, src_vocab_size, tgt_vocab_size, emb_dim=32, hidden_size=128,
                 attention=False, bidirectional=None, cell="gru", attn_dim=None):
        super().__init__()
        bidirectional = attention if bidirectional is None else bidirectional
        self.encoder = Encoder(src_vocab_size, emb_dim, hidden_size, bidirectional, cell)
        D = self.encoder.output_size
        self.decoder = (AttentionDecoder(tgt_vocab_size, emb_dim, hidden_size, D, attn_dim, cell)
                        if attention else Decoder(tgt_vocab_size, emb_dim, hidden_size, D, cell))
        self.uses_attention = attention

    def _encode(self, src, src_lengths):
        annotations, last = self.encoder(src, src_lengths)
        src_mask = torch.arange(src.shape[1], device=src.device)[None, :] < src_lengths[:, None]  # (B, S)
        state, memory = self.decoder.start(annotations, last, src_mask)
        return state, memory, src_mask

    def forward(self, src, src_lengths, tgt_in, tgt_out=None):
        state, memory, src_mask = self._encode(src, src_lengths)
        logits = []
        for i in range(tgt_in.shape[1]):                               # teacher forcing
            step_logits, state, _ = self.decoder.step(tgt_in[:, i], state, memory, src_mask)
            logits.append(step_logits)
        logits = torch.stack(logits, dim=1)                            # (B, T, V)
        return logits, None if tgt_out is None else seq2seq_loss(logits, tgt_out)

    @torch.no_grad()
    def greedy_decode(self, src, src_lengths, max_len):
        """Feed back the model's own most likely token at each step.

        Returns (ids (B, max_len), attention (B, max_len, S) or None).
        """
        state, memory, src_mask = self._encode(src, src_lengths)
        y = torch.full((src.shape[0],), Vocab.BOS, dtype=torch.long, device=src.device)
        ids, alphas = [], []
        for _ in range(max_len):
            logits, state, alpha = self.decoder.step(y, state, memory, src_mask)
            y = logits.argmax(dim=-1)
            ids.append(y)
            alphas.append(alpha)
        attention = torch.stack(alphas, dim=1) if self.uses_attention else None
        return torch.stack(ids, dim=1), attention


def translate(model, text, src_vocab, tgt_vocab, max_len=32):
    """Translate one text greedily.

    Returns (output string, attention matrix (T_out, S_in) or None), where
    T_out counts the output symbols plus the final EOS and S_in the input
    symbols plus EOS, i.e. the rows and columns to label a heatmap with.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    src = torch.tensor([src_vocab.encode(text)], device=device)
    ids, attention = model.greedy_decode(src, torch.tensor([src.shape[1]], device=device), max_len)
    model.train(was_training)
    ids = ids[0].tolist()
    n_out = ids.index(Vocab.EOS) + 1 if Vocab.EOS in ids else len(ids)
    output = tgt_vocab.decode(ids)
    return output, (attention[0, :n_out].cpu() if attention is not None else None)


@torch.no_grad()
def accuracy(model, pairs, src_vocab, tgt_vocab, batch_size=256, max_len=None):
    """Greedy-decode every pair. Returns (exact-match rate, token accuracy, per-pair correctness).

    Token accuracy: the fraction of target positions (EOS included) where the
    decoded token equals the target token.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct, right_tokens, total_tokens = [], 0, 0
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        src, lengths, _, tgt_out = seq2seq_batch(chunk, src_vocab, tgt_vocab, device)
        T = tgt_out.shape[1]
        # one step more than the longest target, so a missing EOS shows as an extra symbol
        ids, _ = model.greedy_decode(src, lengths, max_len or T + 1)
        correct += [tgt_vocab.decode(row) == target for row, (_, target) in zip(ids, chunk)]
        ids = F.pad(ids, (0, max(0, T - ids.shape[1])), value=Vocab.PAD)[:, :T]
        real = tgt_out != Vocab.PAD
        right_tokens += ((ids == tgt_out) & real).sum().item()
        total_tokens += real.sum().item()
    model.train(was_training)
    return sum(correct) / len(correct), right_tokens / total_tokens, correct
