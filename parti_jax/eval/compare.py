"""Aggregates side-by-side votes into win rates with 95% confidence intervals.

Input: vote files exported by the side-by-side page (parti_jax/eval/side_by_side.py),
from any number of raters and pages, all comparing the same systems A and B; a
file naming them the other way round has its winners flipped. Groups: overall,
per PartiPrompts category and per challenge.

Win rate of A = (A wins + ties / 2) / votes, so A's and B's rates add up to 1.
The interval is the 95% Wilson score interval on that proportion: unlike the
normal approximation it stays inside [0, 1] and behaves for small groups and
rates near 0 or 1. Every vote counts as one observation (raters of one prompt
are not pooled), so with many raters per prompt it is somewhat too narrow.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from parti_jax import storage
from parti_jax.eval import html as H
from parti_jax.eval.records import is_int, write_atomic

CONFIDENCE = 0.95
Z = statistics.NormalDist().inv_cdf(0.5 + CONFIDENCE / 2)
WINNERS = ("a", "b", "tie")
METHOD = (
    "win rate of A = (A wins + 0.5 * ties) / votes; 95% Wilson score interval on that "
    "proportion; each vote one observation"
)
HEADERS = ["group", "name", "votes", "A wins", "B wins", "ties", "A win rate", "95% CI"]


class VotesError(ValueError):
    """A malformed or inconsistent vote file (the message names the file)."""


@dataclasses.dataclass(frozen=True)
class Vote:
    prompt_id: int
    prompt: str
    category: str
    challenge: str
    winner: str  # "a", "b" or "tie", un-blinded


@dataclasses.dataclass(frozen=True)
class VoteFile:
    path: str
    page_id: str
    a: str
    b: str
    rater: str
    votes: tuple[Vote, ...]


def parse_votes(obj: Any, *, where: str = "votes") -> VoteFile:
    """Validates an exported votes object; errors name `where` and the field."""
    if not isinstance(obj, dict):
        raise VotesError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("page_id", "a", "b"):
        if not isinstance(obj.get(key), str) or not obj[key]:
            raise VotesError(f"{where}: field '{key}' must be a non-empty string")
    if obj["a"] == obj["b"]:
        raise VotesError(f"{where}: 'a' and 'b' are both {obj['a']!r}")
    if not isinstance(obj.get("votes"), list):
        raise VotesError(f"{where}: field 'votes' must be a list")
    votes: list[Vote] = []
    seen: set[int] = set()
    for i, v in enumerate(obj["votes"]):
        at = f"{where}: votes[{i}]"
        if not isinstance(v, dict):
            raise VotesError(f"{at}: expected an object")
        if not is_int(v.get("prompt_id")):
            raise VotesError(f"{at}: field 'prompt_id' must be an int")
        if v.get("winner") not in WINNERS:
            raise VotesError(f"{at}: field 'winner' is {v.get('winner')!r}; expected a, b or tie")
        texts = [v.get(key, "") for key in ("prompt", "category", "challenge")]
        for key, text in zip(("prompt", "category", "challenge"), texts):
            if not isinstance(text, str):
                raise VotesError(f"{at}: field '{key}' must be a string")
        if v["prompt_id"] in seen:
            raise VotesError(f"{at}: prompt_id {v['prompt_id']} voted twice in one file")
        seen.add(v["prompt_id"])
        votes.append(Vote(v["prompt_id"], *texts, v["winner"]))
    rater = obj.get("rater") or ""
    return VoteFile(where, obj["page_id"], obj["a"], obj["b"], rater, tuple(votes))


def read_votes(path: str | os.PathLike) -> VoteFile:
    """Reads one exported votes JSON file."""
    path = storage.path(path)
    try:
        obj = json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise VotesError(f"{path}: no such vote file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise VotesError(f"{path}: not valid JSON ({e})") from None
    return parse_votes(obj, where=str(path))


def wilson_interval(successes: float, n: int, z: float = Z) -> tuple[float, float]:
    """Wilson score interval for a proportion `successes / n` (successes may be fractional)."""
    if n <= 0:
        raise ValueError("wilson_interval needs n > 0")
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p) / n + z * z / (4 * n * n), 0.0))
    return max(0.0, center - half), min(1.0, center + half)


@dataclasses.dataclass(frozen=True)
class GroupStats:
    """Counts, A's win rate (ties half) and its 95% Wilson interval for one group."""

    n: int
    a_wins: int
    b_wins: int
    ties: int
    win_rate_a: float
    ci95_low: float
    ci95_high: float

    @classmethod
    def from_winners(cls, winners: Sequence[str]) -> GroupStats:
        a, b, t = (sum(w == k for w in winners) for k in WINNERS)
        n = a + b + t
        score = a + 0.5 * t
        lo, hi = wilson_interval(score, n)
        return cls(n, a, b, t, score / n, lo, hi)


@dataclasses.dataclass(frozen=True)
class CompareReport:
    a: str
    b: str
    files: tuple[str, ...]
    raters: tuple[str, ...]
    overall: GroupStats
    by_category: dict[str, GroupStats]
    by_challenge: dict[str, GroupStats]

    def to_json(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)  # the GroupStats as dicts
        fields.update(files=list(self.files), raters=list(self.raters))
        return {"a": self.a, "b": self.b, "method": METHOD, "confidence": CONFIDENCE, **fields}

    def _rows(self) -> list[list[Any]]:
        groups = [("overall", "all", self.overall)]
        groups += [("category", k or "(none)", v) for k, v in self.by_category.items()]
        groups += [("challenge", k or "(none)", v) for k, v in self.by_challenge.items()]
        return [
            [g, name, s.n, s.a_wins, s.b_wins, s.ties, f"{s.win_rate_a:.3f}",
             f"[{s.ci95_low:.3f}, {s.ci95_high:.3f}]"]
            for g, name, s in groups
        ]  # fmt: skip

    def markdown(self) -> str:
        """A readable table: one row per group."""
        lines = [
            f"# Side-by-side: A = {self.a} vs B = {self.b}",
            "",
            f"{len(self.files)} vote file(s); {METHOD}.",
            "",
            "| " + " | ".join(HEADERS) + " |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for row in self._rows():
            row[1] = row[1].replace("|", "\\|")
            lines.append("| " + " | ".join(map(str, row)) + " |")
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        body = (
            f"<h1>Side-by-side: A vs B</h1><p>A = <code>{H.esc(self.a)}</code>, "
            f"B = <code>{H.esc(self.b)}</code></p><p class=muted>{H.esc(METHOD)}. "
            f"{len(self.files)} vote file(s).</p>"
            + H.table(HEADERS, self._rows(), numeric={2, 3, 4, 5, 6})
        )
        return H.page(f"Side-by-side: {self.a} vs {self.b}", body)


def aggregate_votes(vote_files: Sequence[str | os.PathLike | Mapping[str, Any]]) -> CompareReport:
    """Win rates of A over B overall, per category and per challenge (groups sorted by name),
    from the paths of exported vote files or already-loaded vote objects."""
    if not vote_files:
        raise VotesError("no vote files given; pass the JSON files exported by the page")
    files = [
        parse_votes(f, where=f"votes[{i}]") if isinstance(f, Mapping) else read_votes(f)
        for i, f in enumerate(vote_files)
    ]
    paths = [f.path for f in files if not f.path.startswith("votes[")]
    if len(set(paths)) != len(paths):
        raise VotesError("the same vote file was given twice; pass each file once")
    ref = files[0]
    winners: list[Vote] = []
    for f in files:
        if (f.a, f.b) == (ref.a, ref.b):
            winners.extend(f.votes)
        elif (f.a, f.b) == (ref.b, ref.a):
            flip = {"a": "b", "b": "a", "tie": "tie"}
            winners.extend(dataclasses.replace(v, winner=flip[v.winner]) for v in f.votes)
        else:
            raise VotesError(
                f"{f.path}: compares {f.a!r} with {f.b!r}, but {ref.path} compares {ref.a!r} "
                f"with {ref.b!r}; aggregate one pair of systems at a time"
            )
    if not winners:
        raise VotesError(f"{', '.join(f.path for f in files)}: no votes recorded")

    def grouped(key: str) -> dict[str, GroupStats]:
        groups: dict[str, list[str]] = {}
        for v in winners:
            groups.setdefault(getattr(v, key), []).append(v.winner)
        return {k: GroupStats.from_winners(groups[k]) for k in sorted(groups)}

    return CompareReport(
        a=ref.a,
        b=ref.b,
        files=tuple(f.path for f in files),
        raters=tuple(sorted({f.rater for f in files if f.rater})),
        overall=GroupStats.from_winners([v.winner for v in winners]),
        by_category=grouped("category"),
        by_challenge=grouped("challenge"),
    )


def write_compare_report(
    report: CompareReport, out_dir: str | os.PathLike
) -> dict[str, storage.Path]:
    """Writes compare.json, compare.md and compare.html into `out_dir`; returns the paths."""
    texts = {
        "json": json.dumps(report.to_json(), indent=2) + "\n",
        "md": report.markdown(),
        "html": report.html(),
    }
    out = storage.path(out_dir)
    return {k: write_atomic(out / f"compare.{k}", text) for k, text in texts.items()}


def main_compare(argv: Sequence[str]) -> int:
    """`parti-jax eval --compare votes1.json ... [--out_dir DIR]`: prints the table, writes files."""
    parser = argparse.ArgumentParser(
        prog="parti-jax eval --compare", description="Aggregate side-by-side vote files."
    )
    parser.add_argument("votes", nargs="+", help="vote JSON files exported by the page")
    parser.add_argument(
        "--out_dir", default=None, help="where to write compare.*; default: the first file's folder"
    )
    args = parser.parse_args(list(argv))
    report = aggregate_votes(args.votes)
    out_dir = args.out_dir or os.fspath(storage.path(args.votes[0]).parent)
    paths = write_compare_report(report, out_dir)
    print(report.markdown())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
