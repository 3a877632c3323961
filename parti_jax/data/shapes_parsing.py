"""The grammar of shapes-world captions: templates compiled to regular expressions.

Each caption template becomes one anchored pattern whose named groups are the
slots ({obj1} = "[size] [colour] shape", {at1} = "in the top left", {rel} =
"to the left of", ...); the first template that matches the whole normalised
text gives the requirements. The grammar reads what `shapes` writes: this
module imports the words and templates from there, never the other way round.
"""

from __future__ import annotations

import re

from parti_jax.data.shapes import (
    CELL_NAMES,
    CELL_PHRASES,
    COLORS,
    ONE_OBJECT_TEMPLATES,
    RELATION_ITS_WORDS,
    RELATION_WORDS,
    SHAPES,
    SIZE_WORDS,
    TWO_OBJECT_TEMPLATES,
    CaptionRequirements,
    ObjectRequirement,
    all_caption_words,
)


def _alt(words) -> str:
    # Longest first so that 'top left' wins over 'top' when both could match.
    return "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))


_SIZE_OF = {w: s for s, ws in SIZE_WORDS.items() for w in ws}
_CELL_OF_NAME = {n: c for c, ns in CELL_NAMES.items() for n in ns}
_CELL_OF_PHRASE = {p: c for c, ps in CELL_PHRASES.items() for p in ps}
_REL_OF = {w: r for r, ws in RELATION_WORDS.items() for w in ws}
_REL_ITS_OF = {w: r for r, ws in RELATION_ITS_WORDS.items() for w in ws}


def _template_regex(template: str) -> re.Pattern:
    def slot(m: re.Match) -> str:
        name = m.group(1)
        kind, i = name.rstrip("12"), name[-1]
        if kind == "obj":
            return (
                rf"(?:(?P<size{i}>{_alt(_SIZE_OF)}) )?(?:(?P<color{i}>{_alt(COLORS)}) )?"
                rf"(?P<shape{i}>{_alt(SHAPES)})"
            )
        table = {
            "size": _SIZE_OF, "color": COLORS, "shape": SHAPES, "at": _CELL_OF_PHRASE,
            "pos": _CELL_OF_NAME, "rel": _REL_OF, "rel_its": _REL_ITS_OF,
        }[kind]  # fmt: skip
        group = kind if kind in ("rel", "rel_its") else name
        return rf"(?P<{group}>{_alt(table)})"

    parts = re.split(r"(\{\w+\})", template)
    out = []
    for p in parts:
        if p.startswith("{"):
            out.append(slot(re.match(r"\{(\w+)\}", p)))
        else:
            # Literal text: 'a' / 'an' interchangeable; spaces around punctuation optional.
            lit = re.escape(p)
            lit = re.sub(r"(?<![a-z])an?(?=\\ )", "an?", lit)
            lit = lit.replace(r"\ ", r"\s+").replace(",", r"\s*,").replace(":", r"\s*:")
            out.append(lit)
    return re.compile("".join(out))


# Forms people type that no template writes.
PARSE_ONLY_TEMPLATES: tuple[str, ...] = ("{obj1}", "the {obj1} {at1}", "a {obj1} and a {obj2}")
_PATTERNS: list[tuple[str, re.Pattern]] = [
    (t, _template_regex(t))
    for t in ONE_OBJECT_TEMPLATES + TWO_OBJECT_TEMPLATES + PARSE_ONLY_TEMPLATES
]


def normalize_caption(text: str) -> str:
    """Lower-case, single spaces, no trailing full stop."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(" .!")


def parse_caption(text: str) -> CaptionRequirements:
    """Reads back what a shapes-world caption states (unstated attributes are None).

    Accepts every caption the world writes (any template, synonym, case, 'a' or
    'an'); raises ValueError naming the text, and any words the world does not
    know, for anything else.
    """
    norm = normalize_caption(text)
    for _, pattern in _PATTERNS:
        m = pattern.fullmatch(norm)
        if m is None:
            continue
        g = m.groupdict()
        objs = []
        for i in ("1", "2"):
            if g.get(f"shape{i}") is None:
                continue
            at, pos = g.get(f"at{i}"), g.get(f"pos{i}")
            cell = _CELL_OF_PHRASE[at] if at else (_CELL_OF_NAME[pos] if pos else None)
            size = g.get(f"size{i}")
            objs.append(
                ObjectRequirement(
                    shape=g[f"shape{i}"],
                    color=g.get(f"color{i}"),
                    size=_SIZE_OF[size] if size else None,
                    cell=cell,
                )
            )
        relation = _REL_OF.get(g.get("rel")) or _REL_ITS_OF.get(g.get("rel_its"))
        return CaptionRequirements(objects=tuple(objs), relation=relation)
    known = set(all_caption_words())
    unknown = [w for w in re.findall(r"[a-z]+|[^\sa-z]", norm) if w not in known]
    hint = f" (unknown words: {', '.join(repr(w) for w in unknown[:8])})" if unknown else ""
    raise ValueError(
        f"{text!r} is not a shapes-world caption{hint}; expected e.g. "
        "'a small red circle in the top left' or 'a blue square to the left of a yellow triangle'"
    )
