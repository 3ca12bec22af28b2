"""`rocketkv serve`'s HTTP front door: OpenAI's chat and completions API over a serving
engine (`engine.serving_api` is the contract between the two). `create_app` builds the
FastAPI application; `rocketkv_jax.cli.serve` runs it under uvicorn. `text` (incremental
detokenization, stop strings) is also what `rocketkv generate` and `chat` stream with, so
importing it must not import the web stack: `create_app` is loaded on first use."""

__all__ = ["create_app"]


def __getattr__(name: str):
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
