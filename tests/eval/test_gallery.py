"""The PartiPrompts gallery over all 1632 prompts: groups, counts, images, escaping."""

from __future__ import annotations

import csv
import html.parser
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from parti_jax.eval import gallery
from parti_jax.eval import records as R

TSV = Path(__file__).resolve().parents[2] / "parti_jax" / "data" / "assets" / "PartiPrompts.tsv"
NASTY = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "</script>",
]


def parti_rows() -> list[dict[str, str]]:
    """PartiPrompts.tsv parsed here (csv.QUOTE_NONE), independently of parti_jax.data."""
    with open(TSV, encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def write_png(path: Path, rgb: tuple[int, int, int], size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), rgb, np.uint8)).save(path)


def build_eval_dir(
    eval_dir: Path, rows: list[dict[str, str]], colours=((220, 40, 40), (40, 40, 220))
) -> list[R.PromptRecord]:
    """An eval folder with one record per row; all prompts share the same tiny PNGs."""
    names = []
    for i, rgb in enumerate(colours):
        names.append(f"images/sample_{i}.png")
        write_png(eval_dir / names[-1], rgb)
    records = [
        R.PromptRecord(
            prompt_id=i,
            prompt=row["Prompt"],
            category=row["Category"],
            challenge=row["Challenge"],
            note=row["Note"],
            images=tuple(names),
            scores=tuple(0.9 - 0.5 * k for k in range(len(names))),
            seed=i,
        )
        for i, row in enumerate(rows)
    ]
    R.write_manifest(eval_dir, records)
    R.write_metrics(eval_dir, {"fid": 12.5, "fid_status": "unvalidated"})
    return records


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Node | None):
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node] = []
        self.text_parts: list[str] = []

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())

    def text(self) -> str:
        return "".join(self.text_parts) + "".join(c.text() for c in self.children)

    def find_all(self, tag: str | None = None, cls: str | None = None) -> list[Node]:
        out = []
        for c in self.children:
            if (tag is None or c.tag == tag) and (cls is None or cls in c.classes):
                out.append(c)
            out.extend(c.find_all(tag, cls))
        return out


class _DomBuilder(html.parser.HTMLParser):
    VOID = {"meta", "img", "input", "br", "link", "hr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.cur = Node("#root", {}, None)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs), self.cur)
        self.cur.children.append(node)
        if tag not in self.VOID:
            self.cur = node

    def handle_endtag(self, tag):
        node = self.cur
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.cur = node.parent

    def handle_data(self, data):
        self.cur.text_parts.append(data)


def parse_dom(text: str) -> Node:
    builder = _DomBuilder()
    builder.feed(text)
    return builder.root


@pytest.fixture(scope="module")
def parti_gallery(tmp_path_factory):
    eval_dir = tmp_path_factory.mktemp("parti_eval")
    rows = parti_rows()
    build_eval_dir(eval_dir, rows)
    page = gallery.write_gallery(eval_dir, title="PartiPrompts <test>")
    return eval_dir, rows, page, parse_dom(page.read_text(encoding="utf-8"))


def test_all_prompts_grouped_with_counts(parti_gallery):
    eval_dir, rows, page, dom = parti_gallery
    assert page == eval_dir / "index.html"
    want_cat = Counter(r["Category"] for r in rows)
    want_chal = Counter(r["Challenge"] for r in rows)
    assert len(rows) == 1632 and len(want_cat) == 12 and len(want_chal) == 11

    def count_table(group):
        table = [t for t in dom.find_all("table") if t.attrs.get("id") == f"{group}-counts"][0]
        return {
            tr.attrs["data-name"]: int(tr.find_all("td", "count")[0].text())
            for tr in table.find_all("tr")
            if "data-name" in tr.attrs
        }

    assert count_table("category") == dict(want_cat)
    assert count_table("challenge") == dict(want_chal)
    # Category sections hold exactly their prompts, in prompt_id order.
    sections = [s for s in dom.find_all("section", "group") if s.attrs["data-group"] == "category"]
    assert [s.attrs["data-name"] for s in sections] == list(gallery.PARTI_CATEGORIES)
    for s in sections:
        cards = s.find_all("article", "card")
        assert len(cards) == want_cat[s.attrs["data-name"]]
        assert all(c.attrs["data-category"] == s.attrs["data-name"] for c in cards)
        ids = [int(c.attrs["data-prompt-id"]) for c in cards]
        assert ids == sorted(ids)
    challenge_sections = [
        s for s in dom.find_all("section", "group") if s.attrs["data-group"] == "challenge"
    ]
    assert sorted(s.attrs["data-name"] for s in challenge_sections) == sorted(want_chal)
    # Filters list every group with its count.
    options = [o.text() for o in dom.find_all("option")]
    assert "All categories (1632)" in options and "Animals (314)" in options
    assert "Properties & Positioning (35)" in options


def test_cards_show_prompt_images_scores_and_metrics(parti_gallery):
    eval_dir, rows, page, dom = parti_gallery
    cards = {int(c.attrs["data-prompt-id"]): c for c in dom.find_all("article", "card")}
    assert len(cards) == 1632
    # Prompts appear exactly, including the one starting with a literal quote.
    for i in (0, 500, 1631):
        assert cards[i].find_all("div", "prompt")[0].text() == rows[i]["Prompt"]
    quoted = next(i for i, r in enumerate(rows) if r["Prompt"].startswith('"'))
    assert cards[quoted].find_all("div", "prompt")[0].text() == rows[quoted]["Prompt"]
    imgs = cards[7].find_all("img")
    assert [im.attrs["src"] for im in imgs] == ["images/sample_0.png", "images/sample_1.png"]
    assert all((eval_dir / im.attrs["src"]).is_file() for im in imgs)
    captions = [f.text() for f in cards[7].find_all("figcaption")]
    assert captions == ["#1 · 0.900", "#2 · 0.400"]
    metrics = dom.find_all("div")
    metrics_text = next(d for d in metrics if d.attrs.get("id") == "metrics").text()
    assert "fid_status" in metrics_text and "unvalidated" in metrics_text


def test_every_prompt_note_and_label_is_escaped(tmp_path):
    rows = [
        {"Prompt": text, "Category": "Animals", "Challenge": "Basic", "Note": text}
        for text in NASTY
    ] + [{"Prompt": "plain", "Category": NASTY[1], "Challenge": NASTY[0], "Note": ""}]
    build_eval_dir(tmp_path, rows)
    page = gallery.write_gallery(tmp_path, title=NASTY[2])
    text = page.read_text(encoding="utf-8")
    dom = parse_dom(text)
    scripts = dom.find_all("script")
    assert len(scripts) == 1 and "alert" not in scripts[0].text()  # only the page's own JS
    assert not any("onerror" in im.attrs for im in dom.find_all("img"))
    assert all(im.attrs["src"].startswith("images/") for im in dom.find_all("img"))
    cards = {int(c.attrs["data-prompt-id"]): c for c in dom.find_all("article", "card")}
    for i, raw in enumerate(NASTY):
        assert cards[i].find_all("div", "prompt")[0].text() == raw
        assert cards[i].find_all("div", "note")[0].text() == raw
        assert cards[i].find_all("img")[0].attrs["title"] == raw
    assert cards[3].attrs["data-category"] == NASTY[1]
    assert cards[3].attrs["data-challenge"] == NASTY[0]
    assert dom.find_all("title")[0].text() == NASTY[2]


def test_page_outside_the_eval_folder_links_images_relatively(tmp_path):
    eval_dir = tmp_path / "run a"
    build_eval_dir(eval_dir, parti_rows()[:3])
    page = gallery.write_gallery(eval_dir, out_path=tmp_path / "reports" / "g.html")
    srcs = {im.attrs["src"] for im in parse_dom(page.read_text()).find_all("img")}
    assert srcs == {"../run%20a/images/sample_0.png", "../run%20a/images/sample_1.png"}
