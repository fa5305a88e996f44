import hashlib
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clevrgen.errors import PhraseError
from clevrgen.labels import (
    CLASS_INDEX, COLORS, PHRASES, SHAPES, asset_path, load_label_sets, multi_hot, parse_phrase, parse_phrases,
    phrases_of, shipped_split,
)

from conftest import SHARED_ICLEVR


def test_vocabulary_matches_the_official_objects_json():
    import json

    assert json.loads(asset_path("objects.json").read_text()) == CLASS_INDEX
    assert len(PHRASES) == 24 and PHRASES[0] == "gray cube" and PHRASES[23] == "yellow cylinder"


@pytest.mark.parametrize("text", ["red sphere", "Red  Sphere", "  RED sphere ", "red_sphere", "red\tsphere"])
def test_phrase_spellings(text):
    assert parse_phrase(text) == CLASS_INDEX["red sphere"]


@pytest.mark.parametrize("text, hint", [
    ("pink cube", "purple cube"), ("red spher", "red sphere"), ("grey ball", "gray sphere"),
    ("blu cilinder", "blue cylinder"),
])
def test_unknown_phrase_names_the_closest(text, hint):
    with pytest.raises(PhraseError) as err:
        parse_phrase(text)
    message = str(err.value)
    assert f'Did you mean "{hint}"?' in message
    assert all(c in message for c in COLORS) and all(s in message for s in SHAPES)


def test_duplicate_and_empty_lists_are_errors():
    with pytest.raises(PhraseError, match="duplicate"):
        parse_phrases(["red sphere", "Red Sphere"])
    with pytest.raises(PhraseError, match="no phrases"):
        parse_phrases([])


def test_multi_hot_round_trip():
    labels = multi_hot([["red sphere", "cyan cube"], ["gray cylinder"]])
    assert labels.shape == (2, 24) and labels.dtype == torch.float32
    assert labels.sum(1).tolist() == [2.0, 1.0]
    assert phrases_of(labels) == [["cyan cube", "red sphere"], ["gray cylinder"]]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(PHRASES), st.sampled_from(["", " ", "  "]), st.sampled_from([" ", "_", "  ", " _ "]),
       st.booleans())
def test_every_valid_phrase_round_trips(phrase, pad, sep, upper):
    color, shape = phrase.split()
    text = f"{pad}{color}{sep}{shape}{pad}"
    assert PHRASES[parse_phrase(text.upper() if upper else text)] == phrase


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_no_input_raises_anything_but_phrase_error(text):
    try:
        index = parse_phrase(text)
    except PhraseError:
        return
    assert 0 <= index < 24


def test_shipped_splits():
    assert len(shipped_split("test")) == 32 and len(shipped_split("new_test")) == 32
    assert load_label_sets("new_test")[0] == ["gray cube", "red cube", "gray sphere"]


def test_label_sets_from_a_file(tmp_path):
    path = tmp_path / "scenes.json"
    path.write_text('[["red sphere"], ["cyan cube", "gray cylinder"]]')
    assert load_label_sets(str(path)) == [["red sphere"], ["cyan cube", "gray cylinder"]]
    path.write_text('[["pink sphere"]]')
    with pytest.raises(PhraseError, match="label set 0"):
        load_label_sets(str(path))


@pytest.mark.skipif(not (SHARED_ICLEVR / "SOURCES.md").exists(), reason="../shared/iclevr is absent")
def test_shipped_json_files_match_the_published_checksums():
    table = (SHARED_ICLEVR / "SOURCES.md").read_text()
    for name in ("objects.json", "train.json", "test.json", "new_test.json"):
        expected = re.search(rf"\| {re.escape(name)} \| \d+ \| ([0-9a-f]{{64}}) \|", table).group(1)
        assert hashlib.sha256(asset_path(name).read_bytes()).hexdigest() == expected, name
