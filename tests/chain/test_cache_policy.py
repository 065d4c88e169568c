"""should_cache_fragment: its terms, their weights, the decision, and what it refuses."""

from __future__ import annotations

import json

import pytest

from fragjobs.chain.cache_policy import CacheWeights, should_cache_fragment
from fragjobs.config import Settings
from fragjobs.errors import InvalidInputError

MIB = 2**20


def decide(**given):
    values = {
        "extraction_s": 60.0,
        "size_bytes": 10 * MIB,
        "cap_bytes": 100 * MIB,
        "prompt_jobs": 3,
        "similar_jobs": 0,
        "weights": CacheWeights(),
        "threshold": 0.0,
    }
    return should_cache_fragment(**{**values, **given})


def test_the_score_is_the_weighted_sum_of_the_normalised_terms():
    decision = decide()
    terms = decision.terms
    assert terms["extraction_cost"]["normalised"] == 0.5  # 60 s is the reference
    assert terms["size"]["normalised"] == 0.1 and terms["size"]["contribution"] == -0.1
    assert terms["popularity"]["normalised"] == 0.5  # 3 jobs is the reference
    assert terms["similar_reuse"]["contribution"] == 0.0
    assert decision.score == pytest.approx(0.5 - 0.1 + 0.5)
    assert decision.placement == "shared" and decision.shared
    assert json.loads(json.dumps(decision.to_json())) == decision.to_json()


def test_weights_and_threshold_decide_the_placement():
    heavy_size = CacheWeights(extraction_cost=0.1, size=10.0, popularity=0.1, similar_reuse=0.1)
    decision = decide(weights=heavy_size)
    assert decision.placement == "local" and decision.score < 0
    assert decide(threshold=2.0).placement == "local"
    assert decide(threshold=0.9).placement == "shared"  # exactly at the threshold: shared


def test_a_term_that_cannot_be_computed_counts_zero_and_says_why():
    decision = decide(
        extraction_s=None,
        cap_bytes=None,
        similar_jobs=None,
        notes={"similar_reuse": "no similar-prompt index"},
    )
    terms = decision.terms
    assert terms["extraction_cost"] == {
        "value": None,
        "normalised": None,
        "weight": 1.0,
        "contribution": 0.0,
        "note": "not known: counts 0",
    }
    assert "no library cap" in terms["size"]["note"] and terms["size"]["contribution"] == 0.0
    assert terms["similar_reuse"]["note"] == "no similar-prompt index"
    assert "note" not in terms["popularity"]
    assert decision.score == 0.5


def test_the_weights_come_from_the_settings(tmp_path):
    settings = Settings(
        data_dir=tmp_path,
        cache_weight_extraction_cost=2.0,
        cache_weight_size=3.0,
        cache_weight_popularity=0.5,
        cache_weight_similar_reuse=0.0,
    )
    assert CacheWeights.from_settings(settings) == CacheWeights(2.0, 3.0, 0.5, 0.0)


@pytest.mark.parametrize(
    "given, message",
    [
        ({"extraction_s": -1.0}, "extraction_s"),
        ({"size_bytes": -1}, "size_bytes"),
        ({"prompt_jobs": 1.5}, "prompt_jobs"),
        ({"similar_jobs": True}, "similar_jobs"),
        ({"cap_bytes": 0}, "cap_bytes"),
        ({"notes": {"colour": "?"}}, "unknown cache term"),
    ],
)
def test_bad_input_is_refused(given, message):
    with pytest.raises(InvalidInputError, match=message):
        decide(**given)
