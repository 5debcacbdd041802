"""Model summaries (parameters, MACs, memory) and throughput benchmarks."""
