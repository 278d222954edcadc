"""Plans: each module holds one experiment's logic (what to measure next, when it is
done) and runs on the engine (`agent/engine/`), which owns the run directory, the event
log, telemetry, pause/resume/stop, the summary and the report. A new plan is a module
here and one line in `agent.engine.experiments.RUN_KINDS`. (The feedback trap still lives in
`agent/live/runner.py` until the recording work in that file has landed.)"""
