"""Shared page pieces: text, attributes, embedded JSON and image links are escaped."""

import html.parser
import json

import pytest

from parti_jax.eval import html as H

NASTY = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "</script><script>alert(2)</script>",
    "<!-- comment",
    "a & b ' \" \u2028 \u2029 end",
]


class _Collector(html.parser.HTMLParser):
    """Records start tags and the text inside <p> and <script> elements."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.text, self.scripts, self._in = [], [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in = tag

    def handle_endtag(self, tag):
        self._in = None

    def handle_data(self, data):
        if self._in == "script":
            self.scripts.append(data)
        elif self._in == "p":
            self.text.append(data)


@pytest.mark.parametrize("text", NASTY)
def test_text_and_attributes_are_escaped(text):
    markup = f'<p title="{H.esc(text)}">{H.esc(text)}</p>'
    parser = _Collector()
    parser.feed(markup)
    assert [t for t, _ in parser.tags] == ["p"]  # no injected element
    assert parser.tags[0][1] == {"title": text}  # attribute value round-trips
    assert "".join(parser.text) == text


def test_script_json_cannot_close_the_script_element():
    data = {"prompts": NASTY, "n": 3}
    tag = H.json_script_tag("data", data)
    body = tag[tag.index(">") + 1 : tag.rindex("</script>")]
    for bad in ("<", ">", "&", "\u2028", "\u2029"):
        assert bad not in body
    parser = _Collector()
    parser.feed(tag)
    assert [t for t, _ in parser.tags] == ["script"]
    assert json.loads("".join(parser.scripts)) == data


def test_image_src_percent_encodes_segments():
    assert H.image_src("images/00012_0.png") == "images/00012_0.png"
    assert H.image_src("../run b/images/x.png") == "../run%20b/images/x.png"
    assert H.image_src('javascript:alert(1)"') == "javascript%3Aalert%281%29%22"


def test_page_shell_and_tables():
    page = H.page(NASTY[0], H.table(["k", "v"], [[NASTY[1], 1.5]], numeric={1}), script="let x=1;")
    assert page.startswith("<!DOCTYPE html>")
    assert "<title>&lt;script&gt;alert(1)&lt;/script&gt;</title>" in page
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert "<img src=x" not in page
    with pytest.raises(ValueError, match="must not contain '</script'"):
        H.page("t", "", script="x='</script>'")


def test_relative_path_and_flatten_metrics(tmp_path):
    (tmp_path / "a" / "images").mkdir(parents=True)
    (tmp_path / "out").mkdir()
    assert H.relative_path(tmp_path / "a", tmp_path / "out") == "../a"
    rows = H.flatten_metrics({"fid": 7.23456, "fid_status": "unvalidated", "p": {"n": 3}})
    assert rows == [("fid", "7.235"), ("fid_status", "unvalidated"), ("p.n", "3")]
