"""Applications: the command line, the demo, benchmarks and the MONAI Label server."""
