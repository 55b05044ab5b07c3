"""airgap-llm: bundle an LLM service online, install and serve it on an offline box."""

__version__ = "0.1.0"
