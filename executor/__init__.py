"""The Lloom executor node: takes jobs from NATS and runs them on LLM backends."""
