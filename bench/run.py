"""raydefense's benchmark suite: ``python bench/run.py [--quick] [--skip-default-run]``.

Prints a table and writes ``bench/results/<host>-<date>.json``; see ``bench/README.md`` and
``python bench/run.py --help``. Section 1 compares with torchattacks, which is not a project
dependency: ``pip install --no-deps torchattacks scipy`` (without it, section 1 says so and is
skipped). The code is in ``bench/rdbench/``.
"""
from rdbench.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
