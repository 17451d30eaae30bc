"""Hardening tests (issue 9): fuzzed numerics, mixed precision, bad input, safe files, no lost training state.

Shared pieces other areas reuse: :mod:`tests.hardening.cases` (the table-driven bad-input runner),
:mod:`tests.hardening.malicious` (pickles whose loading would run code) and :mod:`tests.hardening.figures`
(the counts printed at the end of the run for the closing note).
"""
