"""Shared settings of the benchmark suite."""

# ---------------------------------------------------------------- migration benchmarks
# test_migrate_*.py and test_downtime.py: their command-line options (--qemu,
# --migrate-size, --migrate-rounds), fixtures and the end-of-run comparison
# tables live in conftest_migrate.py, loaded here so `pytest benchmarks` knows
# the options before it collects.
pytest_plugins = ["conftest_migrate"]
