"""English prose that ships with Python: the sentences of the bundled language reference.

``pydoc_data.topics`` is the text ``help()`` shows for statements and operators. It differs between
Python versions, so results record the version and :func:`corpus_hash`.
"""

from __future__ import annotations

import hashlib
import random
import re

import pydoc_data.topics

# A paragraph with any of these is grammar, a code sample or a table, not prose.
CODE_MARKS = ("::=", ">>>", "...", "{", "}", "[", "]", "=", "<", ">", "`", "*", "|", "\\", "__")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
WORD = re.compile(r"^[(\"'“‘]?[A-Za-z][A-Za-z'’-]*[)\"'”’]?[.,;:!?]?[)\"'”’]?$")


def _prose_paragraphs(text: str) -> list[str]:
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        if any(mark in block for mark in CODE_MARKS):
            continue
        paragraphs.append(" ".join(block.split()))
    return paragraphs


def _is_sentence(s: str) -> bool:
    """Plain English: 6-40 words, a capital first letter, a full stop, nearly all tokens words."""
    words = s.split()
    if not 6 <= len(words) <= 40 or not s[0].isupper() or not s.endswith("."):
        return False
    # Identifiers such as "sys.exit()" or "x.y" are code fragments inside prose.
    return sum(bool(WORD.match(w)) for w in words) >= 0.9 * len(words)


def sentences(seed: int = 0) -> list[str]:
    """All distinct prose sentences of the language reference, shuffled with ``seed``."""
    found = []
    for name in sorted(pydoc_data.topics.topics):
        for paragraph in _prose_paragraphs(pydoc_data.topics.topics[name]):
            found.extend(s for s in SENTENCE_END.split(paragraph) if _is_sentence(s))
    unique = list(dict.fromkeys(found))
    random.Random(seed).shuffle(unique)
    return unique


def corpus_hash(sents: list[str]) -> str:
    """SHA-256 (first 16 hex digits) of the sentences in the order used."""
    return hashlib.sha256("\n".join(sents).encode()).hexdigest()[:16]
