"""Developer tools: code generation, the local cluster, PostgreSQL for tests, chaos and benchmarks."""
