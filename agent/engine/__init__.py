"""What every plan shares: how it reaches its driver node (`link`), and soon the run
directory, event log, telemetry and pause/resume/stop (today still per plan)."""
