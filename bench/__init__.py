"""Benchmarks of cldpd_magic against the docker CLI on the same engine and image.

Run them with ``python -m bench`` (``--quick``, ``--only 1,4``, ``--markdown FILE``).
Every figure is a median over repetitions, compared with a baseline measured in the
same run; see ``bench/README.md`` for what each figure measures.
"""
