"""Calibration data: arrays, text and image folders turned into model inputs; the pass that captures intermediate tensors."""
