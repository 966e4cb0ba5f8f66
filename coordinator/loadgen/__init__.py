"""``coordinator load``: a consumer-side load generator for any OpenAI-compatible URL."""
