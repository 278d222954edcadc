"""What a run leaves behind and how it is read again: logs, frames, replay, report."""
