"""Text filters for a PromptSpec's ``input_template`` (Jinja2): ``{{ text | romanize }}``.

A filter in the template changes the text wherever the spec renders it (training, ``tunelab eval``, ``run``), and an
adapter carries its spec, so the model is always shown the same form of the text it was trained on.

``romanize`` writes Hangul in Latin letters, one fixed spelling per jamo: the initial consonants and vowels of the
Revised Romanization of Korean (괜히 -> gwaenhi, 재미 -> jaemi), final consonants spelled like initials (맛 -> mas,
없다 -> eobsda: the written letters, not the pronunciation; not reversible, 간가 and 강아 both give ganga), and the
lone jamo of internet writing (ㅋㅋ -> kk, ㅠㅠ -> yuyu) with their letters. Everything else is kept as it is.
Why: byte-level BPE vocabularies trained on English text (SmolLM2's, GPT-2's) have almost no Hangul merges, so
every syllable costs three byte tokens that split its jamo arbitrarily; the same text in Latin letters takes under
half the tokens (NSMC reviews: 0.47x) in subwords the model has embeddings for. It is not a better input for
learning, though: trained on romanized NSMC reviews the bundled model scored 5 points under the same recipe on the
bytes (docs/train.md, "The reviews in Latin letters"), so use it where tokens are the constraint and measure.
"""

from __future__ import annotations

import functools
from typing import Callable

# Revised Romanization letters; "" for the silent initial ㅇ
_INITIALS = ["g", "kk", "n", "d", "tt", "r", "m", "b", "pp", "s", "ss", "", "j", "jj", "ch", "k", "t", "p", "h"]
_VOWELS = ["a", "ae", "ya", "yae", "eo", "e", "yeo", "ye", "o", "wa", "wae", "oe", "yo", "u", "wo", "we", "wi",
           "yu", "eu", "ui", "i"]
# the 27 finals (and none), as written: ㄳ -> gs, ㅆ -> ss, ㅇ -> ng
_FINALS = ["", "g", "kk", "gs", "n", "nj", "nh", "d", "l", "lg", "lm", "lb", "ls", "lt", "lp", "lh", "m", "b", "bs",
           "s", "ss", "ng", "j", "ch", "k", "t", "p", "h"]
# Hangul compatibility jamo U+3131..U+314E (consonants, standing alone: ㅋㅋ, ㄷㄷ), then the vowels U+314F..U+3163
_LONE_CONSONANTS = ["g", "kk", "gs", "n", "nj", "nh", "d", "tt", "r", "lg", "lm", "lb", "ls", "lt", "lp", "lh", "m",
                    "b", "pp", "bs", "s", "ss", "ng", "j", "jj", "ch", "k", "t", "p", "h"]

_SYLLABLES = 0xAC00  # 가; 11,172 syllables = 19 initials x 21 vowels x 28 finals


@functools.cache
def _table() -> dict[int, str]:
    """str.translate's table, built on first use (not at import: every tunelab command imports the prompts)."""
    table = {_SYLLABLES + i: _INITIALS[i // 588] + _VOWELS[(i % 588) // 28] + _FINALS[i % 28]
             for i in range(19 * 21 * 28)}
    table.update({0x3131 + i: s for i, s in enumerate(_LONE_CONSONANTS)})
    table.update({0x314F + i: s for i, s in enumerate(_VOWELS)})
    return table


def romanize(text: object) -> str:
    """Hangul syllables and lone jamo to Latin letters (see the module docstring); other characters unchanged."""
    return str(text).translate(_table())


FILTERS: dict[str, Callable[..., str]] = {"romanize": romanize}
