"""Choosing among k sampled answers with no label (selection.py): best-of-k by PMI, worked by
hand on a model whose log-probs are known; the majority vote on written-out and on drawn
results; and the streams the k samples draw from."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mipo_mlx.core.config import GenerationConfig
from mipo_mlx.engine.generation import STREAM_STRIDE, Response
from mipo_mlx.engine.selection import (
    SAMPLE_STRIDE,
    best_by_pmi,
    extract_result,
    majority_pair,
    pmi_of_samples,
)

from .test_evaluate import FirstTokenModel, log_softmax


def test_best_of_k_picks_the_highest_pmi_sample_worked_by_hand():
    """The prompt's first token is 0, its context-free version's is 1: under W[0] token 0 is
    likely, under W[1] token 2. PMI = lp(y|x) - lp(y|x~) of each of three samples is worked
    out from the table; the second sample has the highest, and best-of-k keeps it."""
    table = [[3.0, 0.0, 1.0, 0.0], [0.0, 0.0, 3.0, 0.0]]
    prompts, against = [[0, 3]], [[1, 3]]
    answers = [[2, 2], [0, 0, 2], [3]]
    samples = [[Response(a, True) for a in answers]]
    got = pmi_of_samples(FirstTokenModel(table), prompts, against, samples, pad=3)
    lp = lambda row, y: sum(log_softmax(table[row])[t] for t in y)  # noqa: E731
    want = [lp(0, y) - lp(1, y) for y in answers]
    np.testing.assert_allclose(got[0], want, atol=1e-5)
    assert int(np.argmax(want)) == 1
    assert best_by_pmi(got, samples, GenerationConfig(truncated="keep")) == [1]


def test_best_of_k_skips_answers_the_truncation_rule_drops():
    pmi = np.array([[1.0, 9.0, 2.0], [5.0, 5.0, 0.0], [1.0, 2.0, 3.0]])
    cut = [[True, False, True], [True, True, True], [False, False, False]]
    samples = [[Response([1], done) for done in row] for row in cut]
    assert best_by_pmi(pmi, samples, GenerationConfig(truncated="drop")) == [2, 0, 0]
    assert best_by_pmi(pmi, samples, GenerationConfig(truncated="keep")) == [1, 0, 2]


def test_extract_result_reads_letters_then_numbers():
    assert extract_result("So the answer is: B") == "B"
    assert extract_result("24 + 18 = 42. The answer is 42.") == "42"
    assert extract_result("#### 1,250") == "1250"
    assert extract_result("I do not know.") is None


@pytest.mark.parametrize(
    "results, margin, want",
    [
        (["5", "5", "7", None], 1, (0, 2)),  # 5 has 2 votes; 7 and None 1 each: the first, 7
        (["7", None, "5", "5"], 1, (2, 0)),
        (["5", "5", "5", "5"], 1, None),  # all agree: no contrast
        (["3", "4", "3", "4"], 1, None),  # a tie at the top: margin 0
        (["3", "4", "4", "3", "4"], 2, None),  # 3 against 2: margin 1 < 2
        (["3", "4", "4", "4", "4"], 2, (1, 0)),
        ([None, "2", "2"], 1, (1, 0)),  # an answer with no result votes for None...
        ([None, None, "2"], 1, None),  # ...and None outvoting every result leaves no majority
        ([None, None, None], 1, None),  # None is never chosen
    ],
)
def test_majority_pair_written_out(results, margin, want):
    assert majority_pair(results, margin) == want


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.one_of(st.none(), st.sampled_from("1234")), min_size=1, max_size=8),
    st.integers(1, 4),
)
def test_majority_pair_properties(results, margin):
    """Chosen holds a most-voted result (never None), rejected a least-voted other one, the
    margin holds, and each is the first answer with its result; None exactly when no such pair
    exists."""
    votes = Counter(results)
    got = majority_pair(results, margin)
    real = [r for r in votes if r is not None]
    top = max((votes[r] for r in real), default=0)
    if got is None:  # no result, or the first most-voted one lacks the margin over all others
        if real:
            first_top = min((r for r in real if votes[r] == top), key=results.index)
            others = [votes[o] for o in votes if o != first_top]
            assert not others or top - min(others) < margin
        return
    c, r = got
    assert results[c] is not None and votes[results[c]] == top
    assert results[r] != results[c]
    assert votes[results[r]] == min(votes[o] for o in votes if o != results[c])
    assert votes[results[c]] - votes[results[r]] >= margin
    assert results.index(results[c]) == c and results.index(results[r]) == r


def test_sample_streams_never_meet_another_pass():
    """Sample 0 of prompt i draws from stream i (a run without best-of-k draws the same answer);
    later samples start past the negative pass's streams (STREAM_STRIDE + i)."""
    assert SAMPLE_STRIDE > STREAM_STRIDE + 1_000_000 - 1
    streams = {i + j * SAMPLE_STRIDE for i in range(1000) for j in range(8)}
    assert len(streams) == 8000
    assert not streams & {STREAM_STRIDE + i for i in range(1000)}
