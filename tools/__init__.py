"""gconn's tools: the soak (gconn-soak), benchmarks and micro-benchmarks."""
