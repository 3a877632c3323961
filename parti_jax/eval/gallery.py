"""The PartiPrompts gallery: one page showing an eval folder's images by category and challenge.

`write_gallery(eval_dir)` reads `manifest.jsonl` and `metrics.json` (format in
parti_jax/eval/records.py) and writes `<eval_dir>/index.html`:

- a summary: metrics, and the number of prompts in each of the 12 categories
  and 11 challenge aspects (each name is a button that filters to it);
- filters (pure client-side JS, works from file://): category, challenge, a
  text search, and "group by" category or challenge; a live count of the
  prompts shown, overall and per group;
- one card per prompt: the prompt, its category, challenge, note, id and seed,
  and its images in rank order with their scores.

Cards are rendered in HTML (escaped with `html.esc`), so the page shows
everything even with JS off; JS only hides, shows and regroups them.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from parti_jax.eval import html as H
from parti_jax.eval import records as R

# The PartiPrompts labels in the paper's order (Yu et al. 2022, Table 2 and 3).
PARTI_CATEGORIES = (
    "Abstract",
    "World Knowledge",
    "People",
    "Animals",
    "Illustrations",
    "Artifacts",
    "Food & Beverage",
    "Vehicles",
    "Arts",
    "Indoor Scenes",
    "Outdoor Scenes",
    "Produce & Plants",
)
PARTI_CHALLENGES = (
    "Basic",
    "Complex",
    "Fine-grained Detail",
    "Imagination",
    "Linguistic Structures",
    "Perspective",
    "Properties & Positioning",
    "Quantity",
    "Simple Detail",
    "Style & Format",
    "Writing & Symbols",
)

ALL = "__all__"
NONE_LABEL = "(none)"


def ordered_groups(values: Sequence[str], known: Sequence[str]) -> list[str]:
    """Distinct values: those in `known` first in its order, then the rest sorted."""
    present = set(values)
    return [v for v in known if v in present] + sorted(present - set(known))


def _label(name: str) -> str:
    return name if name else NONE_LABEL


def _card(record: R.PromptRecord, image_prefix: str) -> str:
    figures = []
    for i, image in enumerate(record.images):
        caption = f"#{i + 1} · {H.format_score(record.scores[i])}" if record.scores else f"#{i + 1}"
        figures.append(H.img_tag(image_prefix + image, title=record.prompt, caption=caption))
    note = f'<div class="note muted">{H.esc(record.note)}</div>' if record.note else ""
    return (
        f'<article class="card" id="p-{record.prompt_id}" data-prompt-id="{record.prompt_id}" '
        f'data-category="{H.esc(record.category)}" data-challenge="{H.esc(record.challenge)}">'
        f'<div class="prompt">{H.esc(record.prompt)}</div>'
        f'<div class="meta"><span class="tag">{H.esc(_label(record.category))}</span>'
        f'<span class="tag">{H.esc(_label(record.challenge))}</span> '
        f"#{record.prompt_id} · seed {record.seed}</div>{note}"
        f'<div class="images">{"".join(figures)}</div></article>'
    )


def _options(select_id: str, noun: str, names: list[str], counts: Counter, total: int) -> str:
    opts = [f'<option value="{ALL}">All {noun} ({total})</option>']
    opts += [f'<option value="{H.esc(n)}">{H.esc(_label(n))} ({counts[n]})</option>' for n in names]
    return f'<select id="{select_id}">{"".join(opts)}</select>'


def _count_table(group: str, title: str, names: list[str], counts: Counter) -> str:
    rows = "".join(
        f'<tr data-group="{group}" data-name="{H.esc(n)}">'
        f'<td><button type="button" class="filter-button" data-group="{group}" '
        f'data-name="{H.esc(n)}">{H.esc(_label(n))}</button></td>'
        f'<td class="num count">{counts[n]}</td></tr>'
        for n in names
    )
    return (
        f'<table id="{group}-counts"><thead><tr><th>{H.esc(title)}</th>'
        f'<th class="num">prompts</th></tr></thead><tbody>{rows}</tbody></table>'
    )


def _sections(group: str, names: list[str], counts: Counter, cards: dict[str, list[str]]) -> str:
    out = []
    for n in names:
        out.append(
            f'<section class="group" data-group="{group}" data-name="{H.esc(n)}">'
            f'<h2>{H.esc(_label(n))} <span class="muted">(<span class="group-visible">'
            f"{counts[n]}</span> of {counts[n]})</span></h2>"
            f'<div class="cards">{"".join(cards.get(n, []))}</div></section>'
        )
    return "".join(out)


_SCRIPT = r"""
const $ = (s, el) => (el || document).querySelector(s);
const $$ = (s, el) => Array.from((el || document).querySelectorAll(s));
const ALL = '__all__';
const cards = $$('article.card');
const total = cards.length;

function regroup() {
  const by = $('#group-by').value;
  for (const card of cards) {
    const key = by === 'challenge' ? card.dataset.challenge : card.dataset.category;
    const section = $$('#groups-' + by + ' section.group').find(s => s.dataset.name === key);
    $('.cards', section).appendChild(card);
  }
  $('#groups-category').classList.toggle('hidden', by !== 'category');
  $('#groups-challenge').classList.toggle('hidden', by !== 'challenge');
  applyFilters();
}

function applyFilters() {
  const cat = $('#filter-category').value;
  const chal = $('#filter-challenge').value;
  const text = $('#filter-text').value.trim().toLowerCase();
  let shown = 0;
  for (const card of cards) {
    const ok = (cat === ALL || card.dataset.category === cat) &&
               (chal === ALL || card.dataset.challenge === chal) &&
               (!text || $('.prompt', card).textContent.toLowerCase().includes(text));
    card.classList.toggle('hidden', !ok);
    if (ok) shown += 1;
  }
  for (const section of $$('section.group')) {
    const n = $$('article.card:not(.hidden)', section).length;
    $('.group-visible', section).textContent = String(n);
    section.classList.toggle('hidden', n === 0);
  }
  $('#visible-count').textContent = 'Showing ' + shown + ' of ' + total + ' prompts';
  for (const b of $$('button.filter-button')) {
    const sel = b.dataset.group === 'category' ? cat : chal;
    b.classList.toggle('selected', sel === b.dataset.name);
  }
}

for (const b of $$('button.filter-button')) {
  b.addEventListener('click', () => {
    const select = $('#filter-' + b.dataset.group);
    select.value = select.value === b.dataset.name ? ALL : b.dataset.name;
    applyFilters();
  });
}
$('#filter-category').addEventListener('change', applyFilters);
$('#filter-challenge').addEventListener('change', applyFilters);
$('#filter-text').addEventListener('input', applyFilters);
$('#group-by').addEventListener('change', regroup);
$('#reset-filters').addEventListener('click', () => {
  $('#filter-category').value = ALL;
  $('#filter-challenge').value = ALL;
  $('#filter-text').value = '';
  applyFilters();
});
applyFilters();
"""


def render_gallery(
    records: Sequence[R.PromptRecord],
    metrics: dict | None = None,
    *,
    title: str = "PartiPrompts",
    image_prefix: str = "",
) -> str:
    """The gallery page's HTML; `image_prefix` is prepended to each record's image path."""
    categories = ordered_groups([r.category for r in records], PARTI_CATEGORIES)
    challenges = ordered_groups([r.challenge for r in records], PARTI_CHALLENGES)
    cat_counts = Counter(r.category for r in records)
    chal_counts = Counter(r.challenge for r in records)
    by_cat: dict[str, list[str]] = {}
    for r in sorted(records, key=lambda r: r.prompt_id):
        by_cat.setdefault(r.category, []).append(_card(r, image_prefix))
    total = len(records)
    num_images = sum(len(r.images) for r in records)

    metrics_html = ""
    if metrics:
        rows = [list(row) for row in H.flatten_metrics(metrics)]
        metrics_html = f'<div><h2>Metrics</h2><div id="metrics">{H.table(["metric", "value"], rows)}</div></div>'
    body = (
        f"<header><h1>{H.esc(title)}</h1>"
        f'<div class="controls">'
        f"<label>Category {_options('filter-category', 'categories', categories, cat_counts, total)}</label>"
        f"<label>Challenge {_options('filter-challenge', 'challenges', challenges, chal_counts, total)}</label>"
        '<label>Group by <select id="group-by"><option value="category">category</option>'
        '<option value="challenge">challenge</option></select></label>'
        '<label>Search <input type="search" id="filter-text" placeholder="words in the prompt">'
        "</label>"
        '<button type="button" id="reset-filters">Show all</button>'
        f'<span id="visible-count" class="muted">Showing {total} of {total} prompts</span>'
        "</div></header>"
        f'<p class="muted" id="totals">{total} prompts · {num_images} images · '
        f"{len(categories)} categories · {len(challenges)} challenges</p>"
        f'<div class="summary">{metrics_html}'
        f"<div><h2>Categories</h2>{_count_table('category', 'category', categories, cat_counts)}</div>"
        f"<div><h2>Challenges</h2>{_count_table('challenge', 'challenge', challenges, chal_counts)}</div>"
        "</div>"
        f'<main id="groups-category">{_sections("category", categories, cat_counts, by_cat)}</main>'
        f'<main id="groups-challenge" class="hidden">'
        f"{_sections('challenge', challenges, chal_counts, {})}</main>"
    )
    return H.page(title, body, script=_SCRIPT)


def write_gallery(
    eval_dir: str | os.PathLike,
    title: str = "PartiPrompts",
    *,
    out_path: str | os.PathLike | None = None,
    check_images: bool = False,
) -> Path:
    """Writes the gallery of an eval folder; returns the page's path.

    Args:
      eval_dir: an eval output folder (see parti_jax/eval/records.py).
      title: the page title.
      out_path: where to write; default `<eval_dir>/index.html`. Image links are
        made relative to the page's folder, so the page works from file://.
      check_images: fail (naming the manifest line) if an image file is missing.
    """
    eval_dir = Path(eval_dir)
    records = R.read_manifest(eval_dir, check_images=check_images, allow_torn_tail=True)
    metrics = R.read_metrics(eval_dir)
    out = Path(out_path) if out_path is not None else eval_dir / R.INDEX
    prefix = H.relative_path(eval_dir, out.parent)
    prefix = "" if prefix == "." else prefix + "/"
    return H.write_page(out, render_gallery(records, metrics, title=title, image_prefix=prefix))
