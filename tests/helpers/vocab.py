"""`tunelab vocab extend` on the tiny model: the number of tokens the vocabulary tests add, and the call."""

from __future__ import annotations

ADD = 300


def extend(data, out, base, add=ADD, **kw):
    """The tiny model in ``base`` with ``add`` tokens learnt from ``data``, written to ``out``; the report."""
    from tunelab.vocab.config import VocabConfig
    from tunelab.vocab.extend import extend_vocab

    return extend_vocab(data, out, VocabConfig(model=str(base), add=add, **kw))
