"""provider-agent: serve a local inference engine (llama.cpp, vLLM, Ollama, SGLang, …) through the coordinator."""
