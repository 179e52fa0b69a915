"""CSV imports: upload storage, sniffing, header mapping, row validation (worker processes) and the job runner.

Kept free of imports on purpose: `rows` runs in spawned worker processes that should load as little as possible.
"""
