"""Experiments: reports over artifact cards now; grids, the results store and executors join here."""
