"""The paper's study: run grids (grid.py) and the report over their runs (report.py)."""
