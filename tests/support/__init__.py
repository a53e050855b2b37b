"""What tests and benchmarks share: the tiny test world (`world`), file snapshots (`files`)
and a local S3 server (`s3`).

Importable as `tests.support` with the repository root on the path: pytest puts it there
(`pythonpath` in pyproject.toml), and the benchmarks run from the root as `python -m bench.NAME`.
"""
