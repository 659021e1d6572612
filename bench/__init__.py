"""anbao's benchmark harness: wrk-style (closed loop) and wrk2-style (open
loop, coordinated omission corrected) load over the binary protocol, with
the naive PostgreSQL design and a do-nothing echo server as baselines.

Run it with `python -m bench --help`; BENCHMARKS.md says how and what it
measured. Modules, one job each:

- loadgen.py    the load-generator process (uvloop, raw Protocol, HdrHistogram)
- scenarios.py  setup through the SDK, and what each scenario grabs
- baselines.py  the echo server and the naive SELECT ... FOR UPDATE server
- server.py     start/stop `anbao serve`, run `anbao audit`
- runner.py     spawns the load generators, shows progress, merges results
- report.py     terminal table, JSON, latency-percentile PNG
"""
