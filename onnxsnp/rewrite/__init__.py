"""Rewrite: a plan applied to the graph (weights cut along their dependency groups, shapes, rotary tables)."""
