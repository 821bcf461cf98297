"""Compensate: block-by-block reconstruction (half-block segments, batches, workers, least-squares refits, structured OBS, projections) and the one-pass flow."""
