"""dsc.passes: graph rewrites, one per file."""
