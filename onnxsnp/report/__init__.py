"""Report: the table, JSON and HTML of a prune, and what `inspect` shows."""
