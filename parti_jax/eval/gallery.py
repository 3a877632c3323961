"""The gallery: one page showing an eval folder's images by category and challenge.

`write_gallery(eval_dir)` writes `<eval_dir>/index.html`: the metrics, prompt
counts per category and challenge (each name a filter button), client-side
filters (category, challenge, text search, group by) with live counts, and one
card per prompt with its labels and its images in rank order with their
scores. Cards are rendered in HTML, so the page shows everything with JS off;
JS only hides, shows and regroups them.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence

from parti_jax import storage
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


def _card(record: R.PromptRecord, image_prefix: str) -> str:
    figures = []
    for i, image in enumerate(record.images):
        caption = f"#{i + 1} · {record.scores[i]:.3f}" if record.scores else f"#{i + 1}"
        figures.append(H.img_tag(image_prefix + image, title=record.prompt, caption=caption))
    note = f'<div class="note muted">{H.esc(record.note)}</div>' if record.note else ""
    return (
        f'<article class="card" id="p-{record.prompt_id}" data-prompt-id="{record.prompt_id}" '
        f'data-category="{H.esc(record.category)}" data-challenge="{H.esc(record.challenge)}">'
        f'<div class="prompt">{H.esc(record.prompt)}</div>'
        f'<div class="meta"><span class="tag">{H.esc(record.category or NONE_LABEL)}</span>'
        f'<span class="tag">{H.esc(record.challenge or NONE_LABEL)}</span> '
        f"#{record.prompt_id} · seed {record.seed}</div>{note}"
        f'<div class="images">{"".join(figures)}</div></article>'
    )


def _grouping(
    group: str, plural: str, names: list[str], counts: Counter, cards: dict[str, list[str]]
) -> tuple[str, str, str]:
    """One grouping's filter <select>, its table of counts and its sections of cards."""
    options = "".join(
        f'<option value="{H.esc(n)}">{H.esc(n or NONE_LABEL)} ({counts[n]})</option>' for n in names
    )
    total = sum(counts.values())
    select = (
        f'<label>{group.capitalize()} <select id="filter-{group}"><option value="{ALL}">'
        f"All {plural} ({total})</option>{options}</select></label>"
    )
    rows = "".join(
        f'<tr data-group="{group}" data-name="{H.esc(n)}">'
        f'<td><button type="button" class="filter-button" data-group="{group}" '
        f'data-name="{H.esc(n)}">{H.esc(n or NONE_LABEL)}</button></td>'
        f'<td class="num count">{counts[n]}</td></tr>'
        for n in names
    )
    table = (
        f'<div><h2>{plural.capitalize()}</h2><table id="{group}-counts"><thead><tr>'
        f'<th>{group}</th><th class="num">prompts</th></tr></thead><tbody>{rows}</tbody></table></div>'
    )
    sections = "".join(
        f'<section class="group" data-group="{group}" data-name="{H.esc(n)}">'
        f'<h2>{H.esc(n or NONE_LABEL)} <span class="muted">(<span class="group-visible">'
        f"{counts[n]}</span> of {counts[n]})</span></h2>"
        f'<div class="cards">{"".join(cards.get(n, []))}</div></section>'
        for n in names
    )
    return select, table, sections


_SCRIPT = r"""
const ALL = '__all__', GROUPS = ['category', 'challenge'];
const cards = $$('article.card');
const total = cards.length;

function regroup() {
  const by = $('#group-by').value;
  for (const card of cards) {
    const section = $$('#groups-' + by + ' section.group').find(s => s.dataset.name === card.dataset[by]);
    $('.cards', section).appendChild(card);
  }
  for (const g of GROUPS) $('#groups-' + g).classList.toggle('hidden', by !== g);
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
    b.classList.toggle('selected', $('#filter-' + b.dataset.group).value === b.dataset.name);
  }
}

for (const b of $$('button.filter-button')) {
  b.addEventListener('click', () => {
    const select = $('#filter-' + b.dataset.group);
    select.value = select.value === b.dataset.name ? ALL : b.dataset.name;
    applyFilters();
  });
}
for (const g of GROUPS) $('#filter-' + g).addEventListener('change', applyFilters);
$('#filter-text').addEventListener('input', applyFilters);
$('#group-by').addEventListener('change', regroup);
$('#reset-filters').addEventListener('click', () => {
  for (const g of GROUPS) $('#filter-' + g).value = ALL;
  $('#filter-text').value = '';
  applyFilters();
});
applyFilters();
"""


def write_gallery(
    eval_dir: str | os.PathLike,
    title: str = "PartiPrompts",
    *,
    out_path: str | os.PathLike | None = None,
) -> storage.Path:
    """Writes the gallery of an eval folder to `out_path` (default `<eval_dir>/index.html`;
    image links are relative to its folder, so it works from file://); returns its path."""
    eval_dir = storage.path(eval_dir)
    records = R.read_manifest(eval_dir, allow_torn_tail=True)
    metrics = R.read_metrics(eval_dir)
    out = storage.path(out_path) if out_path is not None else eval_dir / R.INDEX
    prefix = H.folder_prefix(eval_dir, out.parent)
    by_cat: dict[str, list[str]] = {}
    for r in sorted(records, key=lambda r: r.prompt_id):
        by_cat.setdefault(r.category, []).append(_card(r, prefix))
    total = len(records)
    num_images = sum(len(r.images) for r in records)
    parts, num_groups = {}, {}
    for group, plural, known in (
        ("category", "categories", PARTI_CATEGORIES),
        ("challenge", "challenges", PARTI_CHALLENGES),
    ):
        values = [getattr(r, group) for r in records]
        names = ordered_groups(values, known)
        num_groups[group] = len(names)
        cards = by_cat if group == "category" else {}  # JS moves cards on regrouping
        parts[group] = _grouping(group, plural, names, Counter(values), cards)
    metrics_html = (
        f'<div><h2>Metrics</h2><div id="metrics">{H.metrics_table(metrics)}</div></div>'
        if metrics
        else ""
    )
    body = (
        f'<header><h1>{H.esc(title)}</h1><div class="controls">{parts["category"][0]}'
        f"{parts['challenge'][0]}"
        '<label>Group by <select id="group-by"><option value="category">category</option>'
        '<option value="challenge">challenge</option></select></label>'
        '<label>Search <input type="search" id="filter-text" placeholder="words in the prompt">'
        "</label>"
        '<button type="button" id="reset-filters">Show all</button>'
        f'<span id="visible-count" class="muted">Showing {total} of {total} prompts</span>'
        "</div></header>"
        f'<p class="muted" id="totals">{total} prompts · {num_images} images · '
        f"{num_groups['category']} categories · {num_groups['challenge']} challenges</p>"
        f'<div class="summary">{metrics_html}{parts["category"][1]}{parts["challenge"][1]}</div>'
        f'<main id="groups-category">{parts["category"][2]}</main>'
        f'<main id="groups-challenge" class="hidden">{parts["challenge"][2]}</main>'
    )
    return H.write_page(out, title, body, script=_SCRIPT)
