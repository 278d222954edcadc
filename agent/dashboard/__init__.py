"""Live web dashboard: watch a running experiment and pause / resume / stop it.

How a run and a dashboard meet: every runner that wants to be watched creates an
`agent.engine.telemetry.RunTelemetry` and writes `runs/<run>/telemetry.json` (its PUB and
control endpoints, pid, start time). The dashboard never gets handed a runner
object; it *finds* runs through those files:

- `scopeloop dashboard --port P [--run RUN_DIR]` attaches to RUN_DIR, or to the
  newest live run under `runs/` (and follows to the next one when that ends);
- `scopeloop run CONFIG --dashboard P` starts the same server in a thread of the
  CLI process, looking for a live run under the config's `runs_dir` that started
  after the command did. The run-kind entry points (`agent.engine.experiments.RUN_KINDS`,
  `fn(config_path, overrides, console)`) therefore need no new argument: a new
  experiment kind gets the dashboard by publishing telemetry, nothing else.

Modules: `hub` (telemetry subscriber thread + per-browser snapshots), `server`
(FastAPI/uvicorn app, token guard), `attach` (locators), `static/` (one page of
plain JS and canvas; nothing is fetched from the internet).
"""
