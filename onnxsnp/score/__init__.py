"""Score and allocate: the criteria, SNP's statistics, the softmax metric, measured sensitivity curves, cost and latency models, and the budget allocation."""
