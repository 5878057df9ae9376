"""Test harness: real PostgreSQL clusters, a real Centrifugo, a real Kafka broker and a real
Centrifugo WebSocket subscriber, each started on free loopback ports and torn down after use.
Shared by the end-to-end tests, the demo and the benchmarks."""
