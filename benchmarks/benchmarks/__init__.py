"""asv benchmarks of natgrad-bench: see benchmarks/README.md."""
