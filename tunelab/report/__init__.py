"""Self-contained HTML pages: one Jinja2 environment, one stylesheet, shared partials and SVG charts.

Every page (the eval's, a training run's and `tunelab run`'s) is a template under ``templates/`` that extends
``base.html.jinja`` and builds its sections from the macros of ``partials.html.jinja`` (tables of intervals,
paired comparisons, charts, cost). The package that owns a result builds the page's context from its typed
result (``tunelab.evaluate.page``, ``tunelab.train.page``, ``tunelab.run.page``) and calls :func:`write_page`.
Pages inline their CSS and SVG, have no scripts and fetch nothing; every value is autoescaped.
"""

from __future__ import annotations

from tunelab.report.render import render_page, write_page

__all__ = ["render_page", "write_page"]
