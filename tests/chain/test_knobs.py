"""ChainKnobs: one JSON-able set of knobs, defaults from the settings, checked on creation;
the CLI's ``run`` and ``run --farm`` build the same knobs from the same flags."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fragjobs.chain.knobs import ChainKnobs
from fragjobs.errors import InvalidInputError


def test_defaults_come_from_the_settings(settings, monkeypatch):
    knobs = ChainKnobs.from_settings(settings)
    assert (knobs.model, knobs.threshold, knobs.fidelity) == ("shapes", 0.75, 0.9)
    changed = settings.model_copy(
        update={"default_model": "tiny-sd", "default_threshold": 0.5, "default_fidelity": 0.97}
    )
    knobs = ChainKnobs.from_settings(changed, caching=False)
    assert (knobs.model, knobs.threshold, knobs.fidelity, knobs.caching) == (
        "tiny-sd",
        0.5,
        0.97,
        False,
    )


def test_json_round_trip(settings):
    knobs = ChainKnobs.from_settings(
        settings, model="tiny-sd", paraphrases=["a red disc"], profile_seeds=[3, 4], int8=False
    )
    data = json.loads(json.dumps(knobs.to_json()))
    assert ChainKnobs.from_json(data, settings) == knobs
    config = knobs.extraction_config()
    assert config.int8 is None and config.low_rank is None  # low-rank is off by default
    assert config.caching.min_ssim == knobs.fidelity


@pytest.mark.parametrize(
    ("given", "match"),
    [
        ({"threshold": 0}, "threshold"),
        ({"fidelity": 1.5}, "fidelity"),
        ({"caching": "no"}, "caching must be true or false"),
        ({"variants": 0}, "variants"),
        ({"variants": 10**9}, "variants"),
        ({"batch_size": 0}, "batch_size"),
        ({"steps": 0}, "steps"),
        ({"profile_seeds": [1, 1]}, "distinct"),
        ({"paraphrases": "one string"}, "list of prompts"),
        ({"paraphrases": [""]}, "prompt is empty"),
        ({"model": ""}, "model"),
        ({"colour": "red"}, "unknown knob"),
    ],
)
def test_bad_knobs_are_refused(settings, given, match):
    with pytest.raises(InvalidInputError, match=match):
        ChainKnobs.from_settings(settings, **given)


def test_run_on_the_farm_honours_every_flag_of_run(settings, tmp_path, monkeypatch):
    from fragjobs.cli import farm_commands, main

    seen = {}

    def record(prompt, knobs, *, out=None, **kwargs):
        seen.update(prompt=prompt, knobs=knobs, out=out)

    monkeypatch.setattr(farm_commands, "run_on_farm", record)
    flags = [
        "--model", "tiny-sd", "--variants", "6", "--threshold", "0.5", "--fidelity", "0.95",
        "--no-low-rank", "--no-int8", "--no-caching", "--paraphrase", "a red disc",
        "--batch-size", "2", "--out", str(tmp_path / "out"), "--steps", "3",
        "--profile-seeds", "0,1", "--validation-seeds", "7",
    ]  # fmt: skip
    result = CliRunner().invoke(main, ["run", "a red circle", *flags, "--farm"])
    assert result.exit_code == 0, result.output
    knobs = seen["knobs"]
    assert knobs.to_json() == {
        **ChainKnobs.from_settings(settings).to_json(),
        "model": "tiny-sd",
        "variants": 6,
        "threshold": 0.5,
        "fidelity": 0.95,
        "low_rank": False,
        "int8": False,
        "caching": False,
        "paraphrases": ["a red disc"],
        "batch_size": 2,
        "steps": 3,
        "profile_seeds": [0, 1],
        "validation_seeds": [7],
    }
    assert seen["out"] == tmp_path / "out"


def test_an_output_path_that_is_a_file_is_refused_before_any_work(settings, tmp_path):
    from fragjobs.cli import main

    existing = tmp_path / "a-file"
    existing.write_text("x")
    result = CliRunner().invoke(main, ["run", "a red circle", "--out", str(existing)])
    assert result.exit_code == 2 and "is not a folder" in result.output
    assert not (settings.data_dir / "catalog.db").exists()  # nothing was opened or written
