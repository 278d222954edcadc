"""`scopeloop sweep`: one config over a grid of settings and seeds, each point one run
through the config's own run entry (as `scopeloop run` would), as a Ray task.

grid.py builds the points, execute.py runs them (Ray tasks or a plain loop, one
`run_point` for both), results.py turns the finished points into the table, plots and
HTML summary.
"""
