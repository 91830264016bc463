"""Plain text from the Wikipedia extract in the gensim wheel's test data (calibration and perplexity text).

A small, deterministic markup stripper: templates, tables, references, files and categories go; links keep their
label; bold/italic quotes, headings markup and HTML tags go. Articles keep file order.
`COMPRESSOR_WIKI_STRIPPER=gensim` uses gensim's own `filter_wiki` instead (gensim must be installed): the
reference-protocol benchmark uses it to compare with the SliceGPT reference's perplexities, whose text it matches
more closely.
"""

from __future__ import annotations

import bz2
import html
import os
import re
import xml.etree.ElementTree as ET

from compressor.sources.data import gensim_test_data
from compressor.errors import UsageError

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_TAG_BLOCK = re.compile(r"<(math|gallery|timeline|score|syntaxhighlight|source)[^>]*>.*?</\1>", re.S | re.I)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_FILE_LINK = re.compile(r"\[\[(?:File|Image|Category|Media):[^\[\]]*(?:\[\[[^\[\]]*\]\][^\[\]]*)*\]\]", re.I)
_INTERWIKI = re.compile(r"\[\[[a-z\-]{2,12}:[^\]]*\]\]")
_LINK = re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]")
_EXT_LINK = re.compile(r"\[https?://[^\s\]]+\s*([^\]]*)\]")
_BARE_URL = re.compile(r"https?://\S+")
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)
_LIST_MARK = re.compile(r"^[*#:;]+\s*", re.M)
_SPACES = re.compile(r"[ \t]+")
_BLANKS = re.compile(r"\n{3,}")


def _drop_nested(text: str, open_: str, close: str) -> str:
    """Remove balanced {{...}} / {|...|} spans, nesting included."""
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(open_, i):
            depth += 1
            i += len(open_)
        elif depth and text.startswith(close, i):
            depth -= 1
            i += len(close)
        else:
            if depth == 0:
                out.append(text[i])
            i += 1
    return "".join(out)


def strip_markup(text: str) -> str:
    text = html.unescape(text)
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _TAG_BLOCK.sub("", text)
    text = _drop_nested(text, "{{", "}}")
    text = _drop_nested(text, "{|", "|}")
    text = _FILE_LINK.sub("", text)
    text = _INTERWIKI.sub("", text)
    text = _LINK.sub(r"\1", text)
    text = _EXT_LINK.sub(r"\1", text)
    text = _BARE_URL.sub("", text)
    text = _TAG.sub("", text)
    text = _QUOTES.sub("", text)
    text = _HEADING.sub(r"\1", text)
    text = _LIST_MARK.sub("", text)
    text = _SPACES.sub(" ", text)
    lines = [line.strip() for line in text.splitlines()]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def markup_stripper():
    choice = os.environ.get("COMPRESSOR_WIKI_STRIPPER", "builtin")
    if choice == "builtin":
        return strip_markup
    if choice == "gensim":
        try:
            from gensim.corpora.wikicorpus import filter_wiki
        except ImportError:
            raise UsageError("COMPRESSOR_WIKI_STRIPPER=gensim needs gensim installed (pip install gensim==4.4.0)") from None
        return filter_wiki
    raise UsageError(f"COMPRESSOR_WIKI_STRIPPER must be 'builtin' or 'gensim', got {choice!r}")


def wiki_articles(min_chars: int = 200) -> list[tuple[str, str]]:
    """(title, plain text) of every main-namespace, non-redirect article, in file order."""
    strip = markup_stripper()
    raw = bz2.decompress((gensim_test_data() / WIKI_FILE).read_bytes())
    root = ET.fromstring(raw)
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    articles = []
    for page in root.iter(f"{ns}page"):
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        text = page.findtext(f"{ns}revision/{ns}text") or ""
        if text.lstrip().lower().startswith("#redirect"):
            continue
        plain = strip(text)
        if len(plain.strip()) >= min_chars:
            articles.append((page.findtext(f"{ns}title") or "", plain))
    return articles


def wiki_split(calibration_fraction: float = 0.8) -> tuple[list[str], list[str]]:
    """Articles split in file order: the first 80% for calibration, the rest held out for perplexity."""
    texts = [t for _, t in wiki_articles()]
    cut = int(len(texts) * calibration_fraction)
    return texts[:cut], texts[cut:]
