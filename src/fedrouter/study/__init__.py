"""Reading finished runs: comparisons, tables, reports, plots, predictions, clustering studies."""
