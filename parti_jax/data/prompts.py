"""PartiPrompts (P2): the 1632 evaluation prompts published with Parti.

TensorFlow-free, so samplers and eval suites can read the prompts on any host.
The shipped `assets/PartiPrompts.tsv` is the published file byte for byte
(see `assets/PartiPrompts.SOURCE.txt`). It is parsed with CSV quoting turned
off: one prompt starts with a literal double quote that default CSV quoting
would strip, and ten prompts carry leading or trailing spaces; both are kept
exactly as published.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Iterable

NUM_PROMPTS = 1632
HEADER = ("Prompt", "Category", "Challenge", "Note")


@dataclasses.dataclass(frozen=True)
class PartiPrompt:
    """One row of PartiPrompts.tsv; `index` is the 0-based data-row number."""

    index: int
    prompt: str
    category: str
    challenge: str
    note: str


def default_prompts_path() -> str:
    """The shipped PartiPrompts.tsv inside the installed package."""
    return os.path.join(os.path.dirname(__file__), "assets", "PartiPrompts.tsv")


def _read_rows(path: str) -> list[PartiPrompt]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or tuple(header) != HEADER:
            raise ValueError(
                f"{path}: line 1: expected the header {'<TAB>'.join(HEADER)!r}, got {header!r}; "
                "pass the PartiPrompts.tsv published with Parti"
            )
        prompts = []
        for row in reader:
            line = reader.line_num
            if len(row) != len(HEADER):
                raise ValueError(
                    f"{path}: line {line}: expected {len(HEADER)} tab-separated fields "
                    f"(Prompt, Category, Challenge, Note), got {len(row)}"
                )
            prompt, category, challenge, note = row
            if not prompt.strip():
                raise ValueError(f"{path}: line {line}: empty prompt")
            prompts.append(PartiPrompt(len(prompts), prompt, category, challenge, note))
    return prompts


def load_parti_prompts(
    path: str | None = None,
    *,
    categories: Iterable[str] | None = None,
    challenges: Iterable[str] | None = None,
    limit: int | None = None,
) -> list[PartiPrompt]:
    """Reads PartiPrompts, optionally filtered.

    Args:
      path: a PartiPrompts.tsv; default the shipped copy.
      categories: keep only prompts in these categories (e.g. {"Animals"}).
      challenges: keep only prompts with these challenges (e.g. {"Basic"}).
      limit: keep at most this many prompts (after filtering, in file order).

    Returns:
      PartiPrompt records in file order; `index` is the row number in the full
      file, so filtered subsets keep stable ids.
    """
    everything = _read_rows(path or default_prompts_path())
    prompts = everything
    filters = {"category": ("categories", categories), "challenge": ("challenges", challenges)}
    for field, (kind, wanted) in filters.items():
        if wanted is not None:
            wanted, known = set(wanted), {getattr(p, field) for p in everything}
            if wanted - known:
                raise ValueError(
                    f"unknown PartiPrompts {kind} {sorted(wanted - known)}; known: {sorted(known)}"
                )
            prompts = [p for p in prompts if getattr(p, field) in wanted]
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        prompts = prompts[:limit]
    return prompts
