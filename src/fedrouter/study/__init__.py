"""Reading finished runs: comparisons, tables, reports, plots, clustering studies."""
