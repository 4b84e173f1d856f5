"""What only cprd's command-line tools, the demo and the tests use: benchmarks (bench), churn
under handoffs (stress), the demo, starting daemons as child processes (procs), and proofs that
two fds are the same open file description (proof). Nothing in the daemon imports this package."""
