"""`tunelab generate`: training data from a teacher model (label, respond, self-instruct).

Modules: ``config`` (the YAML config), ``client`` (the async teacher client: concurrency, retries, timeouts),
``journal`` (crash-safe append-only answers), ``resolver`` (journal -> cache -> teacher, budget), ``pipelines``
(requests, checks, repair re-asks), ``quality`` (gates, dedup), ``export`` (chat / alpaca / Batch API /
contamination), ``runner`` (one run end to end), ``command`` (the CLI). See docs/generate.md.

Nothing is imported here, so that `tunelab --help` stays fast: ``from tunelab.generate.runner import
run_generate, RunOptions``.
"""
