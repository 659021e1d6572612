"""anbao's benchmark harness: wrk-style (closed loop) and wrk2-style (open
loop, coordinated omission corrected) load over the binary protocol, with
Redis (Lua grab script, AOF fsync always; the headline ratio), the naive
PostgreSQL design and a do-nothing echo server as baselines.

Run it with `python -m bench --help`; BENCHMARKS.md says how and what it
measured. Modules, one job each:

- loadgen.py    the load-generator process (uvloop, raw Protocol, HdrHistogram)
- scenarios.py  setup through the SDK, and what each scenario grabs
- baselines.py  the echo server and the naive SELECT ... FOR UPDATE server
- redis_baseline.py  redis-server of its own, the Lua grab script, its checks
- resp.py       the minimal RESP2 codec the load generator speaks to Redis
- server.py     start/stop `anbao serve` (or N sets: --sets), run the audit
- runner.py     spawns the load generators, shows progress, merges results
- report.py     terminal table, JSON, latency-percentile PNG
"""
