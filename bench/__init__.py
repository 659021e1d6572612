"""anbao's benchmark harness: wrk-style (closed loop) and wrk2-style (open
loop, coordinated omission corrected) load over the binary protocol, with
Redis (Lua grab script, AOF fsync always; the headline ratio), the naive
PostgreSQL design and a do-nothing echo server as baselines.

Run it with `python -m bench --help`; BENCHMARKS.md says how and what it
measured. Modules, one job each:

- __main__.py   `python -m bench`: parses, runs, reports, writes the files
- args.py       the command line: options, defaults, checks
- orchestrate.py  one run: the server, every scenario on anbao, the audit, the baselines
- loadgen.py    the load-generator process (uvloop, raw Protocol, HdrHistogram)
- setup.py      a scenario's set-up through the SDK (users, money, packets; sets)
- scenarios.py  what each scenario grabs, and the same shapes for the baselines
- verify.py     what the answers must add up to, against the database
- evening*.py   the red-packet evening, on anbao and on Redis
- follow_events.py, follower.py  --follow-events: the parent half, the consumer
- credit_lag.py the cross-set credit lag after a run on several sets
- apply.py, apply_stream.py, sendalone.py, outage.py  benches of their own
- baselines.py  the echo server and the naive SELECT ... FOR UPDATE server
- redis_baseline.py  redis-server of its own, the Lua grab script, its checks
- resp.py       the minimal RESP2 codec the load generator speaks to Redis
- server.py     start/stop `anbao serve` (or N sets: --sets), run the audit
- runner.py     spawns the load generators, shows progress, merges results
- report.py     terminal table, JSON, latency-percentile PNG
"""
