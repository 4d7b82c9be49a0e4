"""Benchmarks: training/evaluation throughput, inference speed, HTTP load."""
