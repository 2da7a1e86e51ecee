"""Commands about runs: status / validate / gc (read-only), report, capacity plan, demo, exports."""
