"""grass-kernels microbenchmarks: `python -m bench` prints the tables (see bench/README.md)."""
