"""Blind side-by-side rating of two eval folders (two checkpoints or two settings).

`write_side_by_side(eval_dir_a, eval_dir_b, out_path)` writes one page showing,
for every prompt in both folders, A's and B's images side by side. The left
side is drawn per prompt from `seed` (half the prompts have A on the left); the
page shows no system names, paths or scores, and un-blinds only on export.

A rater clicks "Left is better", "Tie" or "Right is better" per prompt; choices
persist in localStorage under `parti_jax.sbs.<page_id>`. "Export votes" fills
the `votes-json` box and downloads `votes_<page_id>.json`, the format that
parti_jax.eval.compare reads::

    {"format": "parti_jax.side_by_side.votes/1", "page_id": "sbs-...",
     "a": "<name of A>", "b": "<name of B>", "seed": 0, "rater": "...",
     "exported_at": "<ISO time>", "num_prompts": 1632,
     "votes": [{"prompt_id": 3, "prompt": "...", "category": "...",
                "challenge": "...", "winner": "a" | "b" | "tie",
                "left": "a" | "b"}, ...]}
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence

import numpy as np

from parti_jax import storage
from parti_jax.eval import html as H
from parti_jax.eval import records as R

VOTES_FORMAT = "parti_jax.side_by_side.votes/1"
STORAGE_PREFIX = "parti_jax.sbs."
PROMPT_KEYS = ("prompt_id", "prompt", "category", "challenge")

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Pair:
    """One prompt's two records and which system the page puts on the left."""

    a: R.PromptRecord
    b: R.PromptRecord
    left: str  # "a" or "b"


def plan_pairs(
    records_a: Sequence[R.PromptRecord],
    records_b: Sequence[R.PromptRecord],
    *,
    seed: int = 0,
    where_a: str = "A",
    where_b: str = "B",
) -> list[Pair]:
    """Joins two runs on prompt_id (others left out, logged) and draws the left/right sides
    (balanced, seeded). One prompt_id with two prompt texts is an error: other prompt sets."""
    by_id_b = {r.prompt_id: r for r in records_b}
    common = sorted(r.prompt_id for r in records_a if r.prompt_id in by_id_b)
    by_id_a = {r.prompt_id: r for r in records_a}
    for pid in common:
        if by_id_a[pid].prompt != by_id_b[pid].prompt:
            raise R.RecordError(
                f"prompt_id {pid} is {by_id_a[pid].prompt!r} in {where_a} but "
                f"{by_id_b[pid].prompt!r} in {where_b}; compare runs over the same prompt set"
            )
    if not common:
        raise R.RecordError(f"{where_a} and {where_b} share no prompt_id; nothing to compare")
    dropped = len(by_id_a) + len(by_id_b) - 2 * len(common)
    if dropped:
        log.warning("%d prompt(s) are in only one of %s, %s; left out", dropped, where_a, where_b)
    rng = np.random.default_rng(seed)
    n = len(common)
    num_a_left = (n + int(rng.integers(2))) // 2
    left_is_a = np.zeros(n, dtype=bool)
    left_is_a[rng.permutation(n)[:num_a_left]] = True
    return [
        Pair(by_id_a[pid], by_id_b[pid], "a" if is_a else "b")
        for pid, is_a in zip(common, left_is_a)
    ]


def read_page_data(page: str | os.PathLike) -> dict:
    """The data embedded in a written page (prompts, sides, names, page id)."""
    text = storage.read_text(page)
    _, tag, rest = text.partition('<script type="application/json" id="sbs-data">')
    if not tag:
        raise R.RecordError(f"{page}: not a side-by-side page (no sbs-data element)")
    return json.loads(rest[: rest.index("</script>")])


def export_votes(page_data: dict, choices: dict[int, str], *, rater: str = "") -> dict:
    """Un-blinds per-prompt choices ("left", "right", "tie") into the page's export format,
    as its "Export votes" button does in JS (for scripts and tests)."""
    votes = []
    for p in page_data["prompts"]:
        choice = choices.get(p["prompt_id"])
        if choice is None:
            continue
        if choice not in ("left", "right", "tie"):
            raise ValueError(f"prompt_id {p['prompt_id']}: choice {choice!r} is not left/right/tie")
        right = "b" if p["left"] == "a" else "a"
        winner = {"left": p["left"], "right": right, "tie": "tie"}[choice]
        votes.append({**{k: p[k] for k in PROMPT_KEYS}, "winner": winner, "left": p["left"]})
    header = {k: page_data[k] for k in ("format", "page_id", "a", "b", "seed")}
    return {**header, "rater": rater, "num_prompts": len(page_data["prompts"]), "votes": votes}


def _pair_html(pair: Pair, prefix_a: str, prefix_b: str, max_images: int | None) -> str:
    # Equal image counts on both sides, so the count cannot reveal a system.
    k = min(len(pair.a.images), len(pair.b.images), max_images or len(pair.a.images))
    sides = {
        "a": "".join(H.img_tag(prefix_a + image) for image in pair.a.images[:k]),
        "b": "".join(H.img_tag(prefix_b + image) for image in pair.b.images[:k]),
    }
    right = "b" if pair.left == "a" else "a"
    r, pid = pair.a, pair.a.prompt_id
    buttons = "".join(
        f'<button type="button" class="vote-button" data-prompt-id="{pid}" '
        f'data-choice="{choice}">{label}</button>'
        for choice, label in zip(
            ("left", "tie", "right"), ("Left is better", "Tie", "Right is better")
        )
    )
    return (
        f'<article class="card" id="q-{pid}" data-prompt-id="{pid}">'
        f'<div class="prompt">{H.esc(r.prompt)}</div>'
        f'<div class="meta"><span class="tag">{H.esc(r.category or "(none)")}</span>'
        f'<span class="tag">{H.esc(r.challenge or "(none)")}</span> #{pid}</div>'
        f'<div class="pair"><div class="side" data-side="left"><div class="muted">Left</div>'
        f'<div class="images">{sides[pair.left]}</div></div>'
        f'<div class="side" data-side="right"><div class="muted">Right</div>'
        f'<div class="images">{sides[right]}</div></div></div>'
        f'<div class="vote">{buttons}</div></article>'
    )


_SCRIPT = r"""
const data = JSON.parse($('#sbs-data').textContent);
const storageKey = data.storage_prefix + data.page_id;
const byId = new Map(data.prompts.map(p => [String(p.prompt_id), p]));
let state = {choices: {}, rater: ''};

function load() {
  try {
    const saved = JSON.parse(window.localStorage.getItem(storageKey) || 'null');
    if (saved && typeof saved === 'object' && saved.choices) state = saved;
  } catch (e) { /* storage unavailable or corrupt: keep the in-memory state */ }
}
function save() {
  try { window.localStorage.setItem(storageKey, JSON.stringify(state)); }
  catch (e) { $('#status').textContent = 'Could not save to browser storage; export often.'; }
}
function render() {
  for (const b of $$('button.vote-button')) {
    b.classList.toggle('selected', state.choices[b.dataset.promptId] === b.dataset.choice);
  }
  const n = Object.keys(state.choices).filter(k => byId.has(k)).length;
  $('#progress').textContent = n + ' of ' + data.prompts.length + ' rated';
  $('#rater').value = state.rater || '';
}
const winner = (p, c) => c === 'tie' ? 'tie' : c === 'left' ? p.left : p.left === 'a' ? 'b' : 'a';
function buildExport() {
  const votes = data.prompts.filter(p => state.choices[p.prompt_id]).map(p => ({
    prompt_id: p.prompt_id, prompt: p.prompt, category: p.category, challenge: p.challenge,
    winner: winner(p, state.choices[p.prompt_id]), left: p.left}));
  return {format: data.format, page_id: data.page_id, a: data.a, b: data.b, seed: data.seed,
          rater: state.rater || '', exported_at: new Date().toISOString(),
          num_prompts: data.prompts.length, votes: votes};
}
function exportVotes() {
  const text = JSON.stringify(buildExport(), null, 2);
  $('#votes-json').value = text;
  try {
    const blob = new Blob([text], {type: 'application/json'});
    const url = URL.createObjectURL(blob);
    const link = Object.assign(document.createElement('a'),
                               {href: url, download: 'votes_' + data.page_id + '.json'});
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 5000);
    $('#status').textContent = 'Exported; the JSON is also in the box below.';
  } catch (e) {
    $('#status').textContent = 'Download failed; copy the JSON from the box below.';
  }
}

for (const b of $$('button.vote-button')) {
  b.addEventListener('click', () => {
    const id = b.dataset.promptId;
    if (state.choices[id] === b.dataset.choice) delete state.choices[id];
    else state.choices[id] = b.dataset.choice;
    save();
    render();
  });
}
$('#rater').addEventListener('input', () => { state.rater = $('#rater').value; save(); });
$('#export').addEventListener('click', exportVotes);
$('#clear').addEventListener('click', () => {
  if (window.confirm('Forget all votes on this page?')) { state.choices = {}; save(); render(); }
});
load();
render();
"""


def write_side_by_side(
    eval_dir_a: str | os.PathLike,
    eval_dir_b: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    name_a: str | None = None,
    name_b: str | None = None,
    seed: int = 0,
    title: str = "Side-by-side",
    max_images: int | None = None,
) -> storage.Path:
    """Writes a blind side-by-side page comparing two eval folders; returns its path.

    `name_a`, `name_b` go into the exported votes (default: the folder paths); `seed`
    draws the sides (same seed, same page id); `max_images` caps the images per side
    (both sides always show the same number).
    """
    out = storage.path(out_path)
    name_a = name_a if name_a is not None else str(eval_dir_a)
    name_b = name_b if name_b is not None else str(eval_dir_b)
    if name_a == name_b:
        raise ValueError(f"A and B are both named {name_a!r}; pass distinct name_a/name_b")
    pairs = plan_pairs(
        R.read_manifest(eval_dir_a, allow_torn_tail=True),
        R.read_manifest(eval_dir_b, allow_torn_tail=True),
        seed=seed,
        where_a=storage.join(eval_dir_a, R.MANIFEST),
        where_b=storage.join(eval_dir_b, R.MANIFEST),
    )
    # A stable page id (same inputs, same id): keys localStorage and the exports.
    key = json.dumps([name_a, name_b, seed, [p.a.prompt_id for p in pairs]], separators=(",", ":"))
    page_id = "sbs-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    prompts = [{**{k: getattr(p.a, k) for k in PROMPT_KEYS}, "left": p.left} for p in pairs]
    data = dict(format=VOTES_FORMAT, page_id=page_id, storage_prefix=STORAGE_PREFIX)
    data.update(a=name_a, b=name_b, seed=seed, prompts=prompts)
    prefix_a, prefix_b = (
        H.folder_prefix(eval_dir_a, out.parent),
        H.folder_prefix(eval_dir_b, out.parent),
    )
    cards = "".join(_pair_html(p, prefix_a, prefix_b, max_images) for p in pairs)
    body = (
        f"<header><h1>{H.esc(title)}</h1>"
        '<div class="controls">'
        '<label>Rater <input type="text" id="rater" placeholder="your name (optional)"></label>'
        f'<span id="progress" class="muted">0 of {len(pairs)} rated</span>'
        '<button type="button" id="export">Export votes</button>'
        '<button type="button" id="clear">Clear votes</button>'
        '<span id="status" class="muted"></span></div></header>'
        '<p class="muted">For each prompt, pick the side whose images match the prompt better '
        "(then image quality). Sides are shuffled per prompt. Votes are kept in this browser; "
        f'export them when done. Page id <code id="page-id">{H.esc(page_id)}</code>.</p>'
        f'<main id="pairs">{cards}</main>'
        '<h2>Exported votes</h2><textarea id="votes-json" readonly '
        'placeholder="Click Export votes"></textarea>'
        f"{H.json_script_tag('sbs-data', data)}"
    )
    return H.write_page(out, title, body, script=_SCRIPT)
