"""PartiPrompts reader (TensorFlow-free)."""

import pytest

from parti_jax.data import prompts


@pytest.fixture(scope="module")
def all_prompts():
    return prompts.load_parti_prompts()


def test_counts_categories_and_challenges(all_prompts):
    assert len(all_prompts) == prompts.NUM_PROMPTS == 1632
    assert len({p.category for p in all_prompts}) == 12
    assert len({p.challenge for p in all_prompts}) == 11
    assert [p.index for p in all_prompts] == list(range(1632))
    assert all_prompts[0].prompt == "bond"
    assert all_prompts[0].category == "Abstract"
    assert all_prompts[0].challenge == "Basic"
    assert all_prompts[0].note == "Biology-inspired concepts with multiple meanings"


def test_published_text_kept_verbatim(all_prompts):
    giggle = [p for p in all_prompts if p.prompt.startswith('"G I G G L E"')]
    assert len(giggle) == 1, "the prompt with literal quote marks lost its quotes"
    assert giggle[0].prompt.startswith('"G I G G L E" painted in thick colorful lettering')
    padded = [p for p in all_prompts if p.prompt != p.prompt.strip()]
    assert len(padded) == 10
    assert any(p.prompt.startswith(" A sloth in a go kart") for p in padded)
    assert any(p.prompt.endswith("a bright yellow line ") for p in padded)


def test_filters(all_prompts):
    animals = prompts.load_parti_prompts(categories=["Animals"])
    assert animals and all(p.category == "Animals" for p in animals)
    assert len(animals) == sum(p.category == "Animals" for p in all_prompts)
    both = prompts.load_parti_prompts(categories=["Animals"], challenges=["Basic"])
    assert both and all(p.category == "Animals" and p.challenge == "Basic" for p in both)
    assert len(prompts.load_parti_prompts(challenges=["Basic"], limit=5)) == 5
    # A challenge absent from the category-filtered subset is still a valid name.
    assert isinstance(
        prompts.load_parti_prompts(categories=["Abstract"], challenges=["Quantity"]), list
    )
    with pytest.raises(ValueError, match="unknown PartiPrompts categories.*Animalz"):
        prompts.load_parti_prompts(categories=["Animalz"])


def test_malformed_files_name_the_line(tmp_path):
    bad_header = tmp_path / "h.tsv"
    bad_header.write_text("prompt\tcategory\nx\ty\n")
    with pytest.raises(ValueError, match=r"h\.tsv: line 1: expected the header"):
        prompts.load_parti_prompts(str(bad_header))
    short_row = tmp_path / "r.tsv"
    short_row.write_text("Prompt\tCategory\tChallenge\tNote\na cat\tAnimals\tBasic\t\nb\tAnimals\n")
    with pytest.raises(ValueError, match=r"r\.tsv: line 3: expected 4 tab-separated fields"):
        prompts.load_parti_prompts(str(short_row))
