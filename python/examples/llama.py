#!/usr/bin/env python3
"""A llama2.c checkpoint in numpy whose every attention goes through kvpager.

    python3 python/examples/llama.py [--model PATH] [--tokenizer PATH] [--prompt TEXT] [--steps N]
                                     [--pool SPEC] [--cache SPEC] [--print-ids] [--quiet]

The forward pass is tools/llama.c's in float32 numpy: RMSNorm, q/k/v projections, RoPE on adjacent
pairs, then per layer Sequence.append of the post-RoPE key and value and Sequence.attend of the
post-RoPE query, then wo, the SwiGLU feed-forward and the shared or own classifier; Sequence.step after
the last layer. Decoding is greedy and prints what kvpager-llama prints (the prompt, then the generated
text, one line), so both can be compared token for token. Defaults as kvpager-llama: the model is
$KVP_MODELS/stories260K.bin (else ../shared/models/stories260K.bin), the tokenizer tok512.bin next to
it. The library is found as the kvpager package finds it ($KVPAGER_LIB first).
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import kvpager  # noqa: E402

BOS = 1
BYTE0 = 3  # ids 3..258 are the byte pieces <0x00>..<0xFF>
ROPE_THETA = 10000.0
RMS_EPS = np.float32(1e-5)


class Model:
    """A llama2.c legacy (v0) checkpoint: a 7-int32 header, then float32 tensors in file order."""

    def __init__(self, path):
        header = np.fromfile(path, dtype="<i4", count=7)
        if header.shape[0] != 7:
            raise ValueError(f"{path}: too short for a llama2.c checkpoint")
        (self.dim, self.hidden_dim, self.n_layers, self.n_heads, self.n_kv_heads, vocab,
         self.seq_len) = (int(h) for h in header)
        self.vocab_size = abs(vocab)
        self.head_size = self.dim // self.n_heads
        self.kv_dim = self.n_kv_heads * self.head_size
        weights = np.fromfile(path, dtype="<f4", offset=7 * 4).astype(np.float32, copy=False)
        self._take(weights, path, shared_classifier=vocab > 0)

    def _take(self, w, path, shared_classifier):
        L, d, h, kv, V = self.n_layers, self.dim, self.hidden_dim, self.kv_dim, self.vocab_size
        at = 0

        def tensor(*shape):
            nonlocal at
            n = int(np.prod(shape))
            if at + n > w.shape[0]:
                raise ValueError(f"{path}: truncated: the header implies more weights than the file holds")
            t = w[at:at + n].reshape(shape)
            at += n
            return t

        self.embedding = tensor(V, d)
        self.rms_att = tensor(L, d)
        self.wq, self.wk = tensor(L, d, d), tensor(L, kv, d)
        self.wv, self.wo = tensor(L, kv, d), tensor(L, d, d)
        self.rms_ffn = tensor(L, d)
        self.w1, self.w2, self.w3 = tensor(L, h, d), tensor(L, d, h), tensor(L, h, d)
        self.rms_final = tensor(d)
        tensor(self.seq_len, self.head_size)  # freq_cis_real and _imag: RoPE is computed instead
        self.wcls = self.embedding if shared_classifier else tensor(V, d)
        if at != w.shape[0]:
            raise ValueError(f"{path}: {w.shape[0] - at} floats more than the header implies")

    def shape(self):
        return kvpager.Shape(self.n_layers, self.n_heads, self.n_kv_heads, self.head_size, ROPE_THETA,
                             kvpager.RopeLayout.INTERLEAVED)


class Tokenizer:
    """tok512.bin / tokenizer.bin: max_token_length, then per token a float32 score, an int32 length
    and the piece's bytes; the vocabulary size comes from the model."""

    def __init__(self, path, vocab_size):
        with open(path, "rb") as f:
            raw = f.read()
        at = 4
        self.pieces, self.scores = [], []
        for i in range(vocab_size):
            if at + 8 > len(raw):
                raise ValueError(f"{path}: truncated: record {i} of {vocab_size} is missing")
            score = np.frombuffer(raw, dtype="<f4", count=1, offset=at)[0]
            length = int(np.frombuffer(raw, dtype="<i4", count=1, offset=at + 4)[0])
            self.scores.append(float(score))
            self.pieces.append(raw[at + 8:at + 8 + length])
            at += 8 + length
        self.ids = {p: i for i, p in reversed(list(enumerate(self.pieces)))}

    def _characters(self, text):
        """One id per UTF-8 character (lead byte and up to 3 continuation bytes), else per byte."""
        data, ids, i = text.encode("utf-8"), [], 0
        while i < len(data):
            n = 1
            while n < 4 and i + n < len(data) and (data[i + n] & 0xC0) == 0x80:
                n += 1
            char = data[i:i + n]
            if char in self.ids:
                ids.append(self.ids[char])
            else:
                ids.extend(b + BYTE0 for b in char)
            i += n
        return ids

    def encode(self, text):
        """BOS, the dummy-prefix space, then greedy merges of the best-scoring pair, leftmost on ties."""
        ids = [BOS]
        if text:
            ids.append(self.ids.get(b" ", ord(" ") + BYTE0))
        ids += self._characters(text)
        while True:
            best, best_id = -1, -1
            for i in range(len(ids) - 1):
                joined = self.ids.get(self.pieces[ids[i]] + self.pieces[ids[i + 1]], -1)
                if joined >= 0 and (best < 0 or self.scores[joined] > self.scores[best_id]):
                    best, best_id = i, joined
            if best < 0:
                return ids
            ids[best:best + 2] = [best_id]

    def decode(self, prev, token):
        piece = self.pieces[token]
        if prev == BOS and piece.startswith(b" "):
            piece = piece[1:]
        if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece


def rmsnorm(x, w):
    ss = np.float32(1.0) / np.sqrt(np.dot(x, x) / np.float32(x.shape[0]) + RMS_EPS)
    return w * (ss * x)


class Rope:
    """Rotation of adjacent pairs (2m, 2m+1) of each head by pos * theta^(-2m/head_size)."""

    def __init__(self, head_size):
        exponent = (np.arange(0, head_size, 2, dtype=np.float32) / np.float32(head_size))
        self.freq = (np.float32(1.0) / np.power(np.float32(ROPE_THETA), exponent)).astype(np.float32)

    def __call__(self, x, pos):
        """x: [heads][head_size], rotated in place."""
        angle = np.float32(pos) * self.freq
        c, s = np.cos(angle), np.sin(angle)
        a, b = x[:, 0::2].copy(), x[:, 1::2].copy()
        x[:, 0::2] = a * c - b * s
        x[:, 1::2] = a * s + b * c


def forward(m, rope, seq, token, pos):
    """The logits of token at position pos; attention through seq (append, attend per layer; step)."""
    x = m.embedding[token].copy()
    for l in range(m.n_layers):
        xn = rmsnorm(x, m.rms_att[l])
        q = (m.wq[l] @ xn).reshape(m.n_heads, m.head_size)
        k = (m.wk[l] @ xn).reshape(m.n_kv_heads, m.head_size)
        v = np.ascontiguousarray((m.wv[l] @ xn).reshape(m.n_kv_heads, m.head_size))
        rope(q, pos)
        rope(k, pos)
        seq.append(l, pos, k, v)
        att = seq.attend(l, q)
        x += m.wo[l] @ att.reshape(m.dim)
        xn = rmsnorm(x, m.rms_ffn[l])
        gate, up = m.w1[l] @ xn, m.w3[l] @ xn
        x += m.w2[l] @ (gate / (np.float32(1.0) + np.exp(-gate)) * up)
    seq.step()
    return m.wcls @ rmsnorm(x, m.rms_final)


def printable(piece):
    """run.c's filter: a lone byte that is neither printable ASCII nor whitespace is not written."""
    return not (len(piece) == 1 and not (0x20 <= piece[0] <= 0x7E or piece[0] in b"\t\n\v\f\r"))


def generate(m, tok, seq, prompt, steps, out, print_ids=False):
    """kvpager-llama's decode loop, greedy: the prompt is forced, then argmax until steps or BOS.
    Returns the number of positions run."""
    ids = tok.encode(prompt)
    rope = Rope(m.head_size)
    token, generated = ids[0], []
    for pos in range(min(steps, m.seq_len)):
        logits = forward(m, rope, seq, token, pos)
        nxt = ids[pos + 1] if pos + 1 < len(ids) else int(np.argmax(logits))
        if nxt == BOS:
            return pos + 1
        if print_ids and pos + 1 >= len(ids):
            generated.append(str(nxt))
        elif not print_ids:
            piece = tok.decode(token, nxt)
            if printable(piece):
                out.write(piece)
        token = nxt
    if print_ids:
        out.write(" ".join(generated).encode())
    return min(steps, m.seq_len)


def options(argv):
    models = os.environ.get("KVP_MODELS") or "../shared/models"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=os.path.join(models, "stories260K.bin"))
    p.add_argument("--tokenizer", help="default: tok512.bin next to the model")
    p.add_argument("--prompt", default="")
    p.add_argument("--steps", type=int, default=256, help="positions to run, prompt included")
    p.add_argument("--pool", default="", help="pool specification")
    p.add_argument("--cache", default="", help="tenant specification: the cache configuration")
    p.add_argument("--print-ids", action="store_true", help="the generated ids instead of the text")
    p.add_argument("--quiet", action="store_true", help="no speed and cache report on stderr")
    o = p.parse_args(argv)
    if o.steps < 1:
        p.error("--steps wants a positive integer")
    if o.tokenizer is None:
        o.tokenizer = os.path.join(os.path.dirname(o.model), "tok512.bin")
    return o


def main(argv=None):
    o = options(argv)
    try:
        model = Model(o.model)
        tok = Tokenizer(o.tokenizer, model.vocab_size)
    except (OSError, ValueError) as e:
        print(f"llama.py: {e}", file=sys.stderr)
        return 2
    out = sys.stdout.buffer
    try:
        with kvpager.Pool(o.pool) as pool, pool.tenant("llama", o.cache) as tenant, \
                tenant.sequence(model.shape()) as seq:
            t0 = time.monotonic()
            positions = generate(model, tok, seq, o.prompt, o.steps, out, o.print_ids)
            out.write(b"\n")
            out.flush()
            if not o.quiet:
                seconds = time.monotonic() - t0
                st = seq.stats()
                print(f"llama.py: {positions} positions in {seconds:.3f} s "
                      f"({kvpager.library_path()}); cache: {st.tokens_appended} appended, "
                      f"{st.tokens_retained} retained, {st.bytes_exact} bytes exact, "
                      f"{st.bytes_compressed} compressed", file=sys.stderr)
    except kvpager.InvalidArgument as e:
        print(f"llama.py: {e}", file=sys.stderr)
        return 2
    except kvpager.Error as e:
        print(f"llama.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
