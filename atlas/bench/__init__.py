"""Side-by-side benchmarks, each printing one summary line last (`atlas bench ...`)."""
