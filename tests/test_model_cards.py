"""Model cards: generated from the registry's pretrained metadata, and the docs page kept equal to them."""

from __future__ import annotations

from pathlib import Path

import pytest

from objretrieval.models.registry import list_pretrained, model_card, model_cards

PAGE = Path(__file__).resolve().parents[1] / "docs" / "model_cards.md"


def test_docs_page_is_the_generated_cards() -> None:
    assert PAGE.read_text() == model_cards(), (
        "docs/model_cards.md is stale: regenerate it with the command in model_cards()'s docstring"
    )


@pytest.mark.parametrize("name", list_pretrained())
def test_every_pretrained_config_has_a_full_card(name: str) -> None:
    card = model_card(name)
    for field in ("weights", "license", "paper", "input", "trained on", "Reported results"):
        assert field in card, (name, field)
    assert f'create_model("{name}", pretrained=True)' in card


def test_card_of_a_model_name_is_its_first_tag() -> None:
    assert model_card("mile_vitl") == model_card("mile_vitl.default")
    with pytest.raises(ValueError, match="no pretrained tag"):
        model_card("mile_vitl.nope")
    with pytest.raises(KeyError, match="unknown model"):
        model_card("no_such_model")
