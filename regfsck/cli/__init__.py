"""The command line: parses arguments and renders results; the work lives elsewhere."""
