"""Plans: each module holds one experiment's logic (what to measure next, when it is
done) and runs on the engine (`agent/engine/`), which owns the run directory, the event
log, telemetry, pause/resume/stop, the frame recording, the summary and the report. A
new plan is a module here and one line in `agent.engine.experiments.PLANS` (its run
entry and config loader). A plan that acts frame by frame (`feedback_trap.py`) gives
the engine's frame loop (`agent/engine/frame_loop.py`) a `FramePlan`."""
