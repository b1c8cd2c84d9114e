"""Evaluation: constrained beam-search eval of a checkpoint and the MiniOneRec metrics."""
