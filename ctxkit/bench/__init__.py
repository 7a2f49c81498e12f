"""Benchmarks behind `ctxkit bench NAME`. Each reads data in the formats of the project's data README,
prints a human table, and with --json one JSON object. Later stages add theirs to BENCHMARKS."""
