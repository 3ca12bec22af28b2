"""`rocketkv serve`'s HTTP front door: OpenAI's chat and completions API over a serving
engine (`engine.serving_api` is the contract between the two). `create_app` builds the
FastAPI application; `rocketkv_jax.cli.serve` runs it under uvicorn."""

from .app import create_app

__all__ = ["create_app"]
