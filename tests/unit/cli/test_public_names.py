"""Names users import from before the restructure keep working (re-exports): the README's
library section of 0.1 and the loading snippets already written into exported model cards."""

import importlib

import numpy as np
import pytest

from loralens.analysis import similarity as new_similarity
from loralens.analysis import stats as new_stats
from loralens.models.cards import PREPROCESSING
from loralens.models.saving import load_trained as new_load_trained
from loralens.tasks.preprocess import format_input as new_format_input

OLD_NAMES = [
    ("loralens.similarity", "linear_cka", new_similarity.linear_cka),
    ("loralens.similarity", "cka_against_base", new_similarity.cka_against_base),
    ("loralens.similarity", "cosine_similarity", new_similarity.cosine_similarity),
    ("loralens.stats", "compare_methods", new_stats.compare_methods),
    ("loralens.preprocess", "format_input", new_format_input),
    ("loralens.models", "load_trained", new_load_trained),
]


@pytest.mark.parametrize("module, name, new", OLD_NAMES, ids=[f"{m}.{n}" for m, n, _ in OLD_NAMES])
def test_old_import_paths_give_the_same_objects(module, name, new):
    assert getattr(importlib.import_module(module), name) is new


def test_old_paths_compute_as_before():
    from loralens.preprocess import format_input
    from loralens.similarity import linear_cka

    x = np.random.default_rng(0).normal(size=(20, 5))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert format_input(" a ", " b ", sep="</s>") == "a</s>b"


def test_model_card_snippet_names_importable_paths():
    # the card text written into every exported model: its import must keep working
    assert "from loralens.preprocess import format_input" in PREPROCESSING
    namespace: dict = {}
    exec("from loralens.preprocess import format_input", namespace)
    assert namespace["format_input"] is new_format_input
