"""ppldelta.protocols: the one table of perplexity protocols (NumPy only, no torch), checked
against each protocol's loop written out here."""
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ppldelta import protocols


def _targets(windows):
    return [t for w in windows for t in range(w.a + 1, w.b + 1)]


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 200), L=st.integers(1, 40), data=st.data())
def test_sliding_scores_every_target_once_with_context(n, L, data):
    S = data.draw(st.integers(1, L))
    wins = protocols.plan("sliding", n, L, S)
    assert _targets(wins) == list(range(1, n))
    for w in wins:
        assert w.end - w.start <= L and w.start <= w.a < w.b == w.end
        # every target but those at the start of the text sees at least L - S + 1 tokens
        assert w.a - w.start + 1 >= min(L - S + 1, w.a + 1)
    np.testing.assert_array_equal(protocols.target_positions(wins), np.arange(1, n))


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 200), L=st.integers(1, 40), data=st.data())
def test_hf_is_the_recipe(n, L, data):
    S = data.draw(st.integers(1, L))
    expect, weights, prev_end = [], [], 0  # the recipe: labels before prev_end masked, the first shifted away
    for begin in range(0, n, S):
        end = min(begin + L, n)
        scored = list(range(max(prev_end, begin + 1), end))
        if scored:
            expect += scored
            weights.append(end - prev_end - 1)  # the recipe's num_valid_tokens - 1
        prev_end = end
        if end == n:
            break
    wins = protocols.plan("hf", n, L, S)
    assert _targets(wins) == expect and [w.weight for w in wins] == weights


def test_chunked_protocols_and_llama_cpp_layout():
    n, L = 70, 16
    wins = protocols.plan("llama.cpp", n, L, None, bos=1)
    assert len(wins) == n // L and all(w.bos == 1 for w in wins)
    first, rows = protocols.chunk_first_scored(L), protocols.chunk_rows(L)
    assert (first, rows) == (8, 7)
    for c, w in enumerate(wins):
        assert (w.start, w.end, w.a - w.start, w.b - w.a) == (c * L, (c + 1) * L, first, rows)
    assert all(w.bos is None for w in protocols.plan("llama.cpp", n, L, None, bos=False))
    with pytest.raises(ValueError, match="bos_token_id"):
        protocols.plan("llama.cpp", n, L, None, bos=None)
    with pytest.raises(ValueError, match="2\\*n_ctx"):
        protocols.plan("llama.cpp", 2 * L - 1, L, None, bos=1)
    g = protocols.plan("gptq", n, L)
    assert _targets(g) == [t for c in range(n // L) for t in range(c * L + 1, (c + 1) * L)]
    notes = protocols.notes("llama.cpp", wins, L, None, n, "tokenizer")
    assert notes["dropped_tail"] == n - (n // L) * L and notes["bos_from"] == "tokenizer"
    # the llama.cpp file reader uses the same layout
    from ppldelta import llamacpp

    assert (llamacpp._first_scored(L), llamacpp._rows_per_chunk(L)) == (first, rows)


def test_window_mean_is_the_copied_loop():
    n, L, S = 45, 10, 4
    wins = protocols.plan("window-mean", n, L, S)
    # for i in range(0, n, stride): ids[i:min(i + L, n)], every token after the window's first
    assert [(w.start, w.end) for w in wins] == [(i, min(i + L, n)) for i in range(0, n, S)]
    assert _targets(wins) == [t for i in range(0, n, S) for t in range(i + 1, min(i + L, n))]
    vals = np.arange(sum(w.b - w.a for w in wins), dtype=float)
    means = protocols.window_means(vals, wins)
    offs = protocols.offsets(wins)
    assert means[0] == vals[offs[0]:offs[1]].mean() and np.isnan(means[-1]) == (wins[-1].a == wins[-1].b)


def test_resolve_defaults_and_errors():
    assert protocols.resolve("sliding")[1:] == (1024, 512)
    assert protocols.resolve("llama.cpp")[1:] == (512, None)
    assert protocols.resolve("gptq", 64, 64)[1:] == (64, None)
    with pytest.raises(ValueError, match="leave stride unset"):
        protocols.resolve("gptq", 64, 32)
    with pytest.raises(ValueError, match="unknown protocol 'nope'; known: sliding, hf, llama.cpp, gptq, window-mean"):
        protocols.resolve("nope")
    with pytest.raises(ValueError, match="stride must be in"):
        protocols.plan("sliding", 10, 4, 5)
    spec = protocols.get("sliding")
    assert spec.per_token and not spec.add_special_tokens and spec.join == "\n\n"
    assert not protocols.get("window-mean").per_token


def test_every_protocol_is_one_complete_entry():
    assert protocols.PROTOCOLS == tuple(protocols.SPECS)
    for name, spec in protocols.SPECS.items():
        assert spec.name == name and spec.summary and spec.max_length >= 2
        L, S = 16, (8 if spec.strided else None)
        wins = protocols.plan(spec, 4 * L, L, S, bos=1 if spec.writes_bos else None)
        assert wins and protocols.notes(spec, wins, L, S, 4 * L)["rule"]


def test_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from ppldelta import protocols; print(len(protocols.plan('sliding', 10, 4, 2)))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
