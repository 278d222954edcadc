"""Extra `scopeloop` sub-commands, one module per topic, each with `register(app)`.

`agent.cli` registers every module found here (sorted by name). Keep imports at the
top of these modules light: heavy libraries belong inside the command functions.
"""
