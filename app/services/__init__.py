"""Use cases: the rules and the SQL. Services flush, never commit; the request or job step commits."""
