"""provider-agent: serve a local inference engine (llama.cpp, vLLM, SGLang, Ollama, mlx_lm)
through the coordinator; see docs/provider-agent.md."""
