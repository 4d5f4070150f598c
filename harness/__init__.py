"""The test and benchmark harness: a whole cairn system on a fresh home with a real nats-server,
the stream read incrementally, and the workloads tests and benchmarks both drive. Tests and
`bench/` import it; neither imports the other."""
