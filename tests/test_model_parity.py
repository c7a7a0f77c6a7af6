"""Tiny random Qwen2 configs vs transformers ``Qwen2ForCausalLM`` in float32 (max |Δ logits| ≤ 1e-4)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenjax.config import RopeScaling
from qwenjax.kv_cache import KVCache
from qwenjax.model import Layout, Model, StepBatch
from qwenjax.parallel import make_mesh
from qwenjax.weights import load_checkpoint
from tiny import hf_logits, tiny_config, write_hf_checkpoint

TOL = 1e-4
PAGE = 8

CONFIGS = {
    # 14 q / 2 KV heads like the real 0.5B: tp=4, 8 replicate KV heads and pad q heads.
    "untied-default": tiny_config(),
    # Tied embeddings + YaRN at 4× an original 32-token window; vocab and MLP not divisible by tp.
    "tied-yarn": tiny_config(tie_word_embeddings=True, vocab_size=203, intermediate_size=100,
                             rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=32)),
    # 3 KV heads: no tp here divides them, so every tp > 1 replicates (lcm(3, tp) KV heads).
    "kv3": tiny_config(num_heads=6, num_kv_heads=3, head_dim=16, hidden_size=48),
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def checkpoint(request, tmp_path_factory):
    config = CONFIGS[request.param]
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = write_hf_checkpoint(config, directory)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 40))
    return config, directory, hf_logits(hf_model, tokens), tokens


def _setup(config, directory, tp, num_pages):
    layout = Layout.create(config, tp)
    mesh = make_mesh(tp)
    weights = load_checkpoint(directory, layout, mesh, jnp.float32)
    cache = KVCache.create(num_layers=config.num_layers, kv_heads=layout.heads.kv_heads,
                           head_dim=config.head_dim, num_pages=num_pages, page_size=PAGE,
                           dtype=jnp.float32, mesh=mesh)
    return Model(layout, mesh), weights, cache


def _batch(tokens, positions, seq_lens, block_tables):
    return StepBatch(jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32),
                     jnp.asarray(seq_lens, jnp.int32), jnp.asarray(block_tables, jnp.int32))


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_prefill_chunks_and_decode_match_hf(checkpoint, tp):
    """Two prefill chunks, then token-by-token decode, over shuffled pages; every logit vs HF."""
    config, directory, ref, tokens = checkpoint
    batch_size, length = tokens.shape
    pages_per_seq = length // PAGE
    # Non-contiguous, interleaved page ids: sequences never own neighbouring pages.
    page_ids = np.random.default_rng(2).permutation(batch_size * pages_per_seq + 3)[: batch_size * pages_per_seq]
    block_tables = page_ids.reshape(batch_size, pages_per_seq)
    model, weights, cache = _setup(config, directory, tp, batch_size * pages_per_seq + 3)
    forward = jax.jit(model.forward, donate_argnums=(1,))

    got = []
    for start, stop in ((0, 13), (13, 30)):  # chunk boundaries off the page boundaries
        pos = np.broadcast_to(np.arange(start, stop), (batch_size, stop - start))
        logits, cache = forward(weights, cache, _batch(tokens[:, start:stop], pos,
                                                        [stop] * batch_size, block_tables))
        got.append(np.asarray(logits))
    for t in range(30, length):
        logits, cache = forward(weights, cache, _batch(tokens[:, t:t + 1], [[t]] * batch_size,
                                                        [t + 1] * batch_size, block_tables))
        got.append(np.asarray(logits))
    got = np.concatenate(got, axis=1)
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= TOL


@pytest.mark.parametrize("tp", [1, 4])
def test_ragged_batch_with_padding(checkpoint, tp):
    """Sequences of different lengths in one padded step: padding neither writes KV nor leaks."""
    config, directory, ref, tokens = checkpoint
    lengths = [40, 17]
    chunk = 40
    pos = np.full((2, chunk), -1)
    toks = np.zeros((2, chunk), np.int64)
    for i, n in enumerate(lengths):
        pos[i, :n] = np.arange(n)
        toks[i, :n] = tokens[i, :n]
    model, weights, cache = _setup(config, directory, tp, 10)
    logits, cache = jax.jit(model.forward)(weights, cache, _batch(toks, pos, lengths, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]))
    logits = np.asarray(logits)
    assert np.abs(logits[0] - ref[0]).max() <= TOL
    # Causal: the first 17 positions of sequence 1 equal HF on the full sequence.
    assert np.abs(logits[1, :17] - ref[1, :17]).max() <= TOL
    last, _ = jax.jit(model.last_logits)(weights, cache, _batch(toks, pos, lengths, [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]))
    assert np.abs(np.asarray(last)[1] - ref[1, 16]).max() <= TOL


@pytest.mark.parametrize("tp", [1, 4])
def test_mixed_step_decode_part_and_prefill_part(checkpoint, tp):
    """One program, two parts: sequence 0 decodes one token while sequence 1 prefills a chunk."""
    config, directory, ref, tokens = checkpoint
    model, weights, cache = _setup(config, directory, tp, 10)
    tables = np.array([[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
    pos = np.arange(30)[None]
    _, cache = jax.jit(model.forward)(weights, cache, _batch(tokens[:1, :30], pos, [30], tables[:1]))
    decode = _batch(tokens[:1, 30:31], [[30]], [31], tables[:1])
    # Prefill rows padded past the prompt (chunk 24 for 20 tokens), as the engine pads them.
    prefill_pos = np.where(np.arange(24) < 20, np.arange(24), -1)[None]
    prefill = _batch(np.pad(tokens[1:, :20], ((0, 0), (0, 4))), prefill_pos, [20], tables[1:])
    last, cache = jax.jit(model.last_logits)(weights, cache, (decode, prefill))
    last = np.asarray(last)
    assert last.shape == (2, config.vocab_size)
    assert np.abs(last[0] - ref[0, 30]).max() <= TOL
    assert np.abs(last[1] - ref[1, 19]).max() <= TOL
