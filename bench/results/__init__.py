"""Everything derived from a run's results files: tables, plots, grids, the claims report, the
regression gate. Pure functions of the files: nothing here imports torch or a model (an
import-linter contract in pyproject.toml checks it)."""
