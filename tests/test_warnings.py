"""Warnings: the CLI and the tests ignore only the listed third-party warnings, one by one; a deprecated API that
tunelab's own code calls fails the tests."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest

from helpers import ROOT

# The texts the libraries really raise, with the module they are raised from.
KNOWN = [
    ("`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing` "
     "instead.", FutureWarning, "transformers.modeling_utils"),
    ("Model has `tie_word_embeddings=True` and a tied layer is part of the adapter, but `ensure_weight_tying` is not "
     "set to True.", UserWarning, "peft.tuners.tuners_utils"),
    ("Input and output embeddings are no longer tied after merging. Setting `tie_word_embeddings=False` in the "
     "model config.", UserWarning, "peft.tuners.tuners_utils"),
    ("Adapter adapter1 was active which is now deleted. Setting active adapter to adapter2.", UserWarning,
     "peft.tuners.tuners_utils"),
]


def test_cli_ignores_the_known_third_party_warnings_and_shows_any_other():
    raised = [*KNOWN, ("SENTINEL from elsewhere", UserWarning, "peft.tuners.other"),
              ("SENTINEL2 deprecated", FutureWarning, "transformers.modeling_utils")]
    code = "import warnings\nfrom tunelab.console import quiet_libraries\nquiet_libraries()\n" + "".join(
        f"warnings.warn_explicit({m!r}, {c.__name__}, 'x.py', {i}, module={mod!r})\n"
        for i, (m, c, mod) in enumerate(raised))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "SENTINEL from elsewhere" in r.stderr and "SENTINEL2 deprecated" in r.stderr
    for message, _, _ in KNOWN:
        assert message[:30] not in r.stderr, r.stderr


@pytest.mark.parametrize("message,category,module", KNOWN)
def test_tests_ignore_the_known_third_party_warnings(message, category, module):
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn_explicit(message, category, "x.py", 1, module=module)
    assert not seen


@pytest.mark.parametrize("category", [DeprecationWarning, PendingDeprecationWarning, FutureWarning])
def test_a_deprecation_raised_from_tunelab_code_fails_the_tests(category):
    with pytest.raises(category):
        warnings.warn_explicit("old API", category, "tunelab/x.py", 1, module="tunelab.x")
