"""Reports built from finished runs (mmf_compare)."""
