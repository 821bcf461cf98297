"""Verify: the pruned model checked and run, its fidelity measured, the gate before writing."""
