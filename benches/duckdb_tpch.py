"""Times one TPC-H query in DuckDB over the sandbox benchmark's Parquet files.

Usage: python3 duckdb_tpch.py DIR QUERY. Prints "<threads> <best seconds>" for
1 and 2 threads (best of 3, after one warm-up). Exits non-zero without duckdb.
"""
import sys
import time

import duckdb

directory, query = sys.argv[1], sys.argv[2]
for threads in (1, 2):
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    for table in ("lineitem", "orders", "customer", "part", "partsupp", "supplier", "nation", "region"):
        con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{directory}/{table}.parquet')")
    con.execute(query).fetchall()
    best = min(
        (lambda start: (con.execute(query).fetchall(), time.perf_counter() - start)[1])(time.perf_counter())
        for _ in range(3)
    )
    print(threads, best)
