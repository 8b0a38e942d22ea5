"""Settings from flags, the environment and `.env.local` over `.env`.

Precedence, highest first: command-line flag, process environment, `.env.local`, `.env`
(the seed script's files, read from the current directory). Secrets are wrapped in `Secret`
so that no repr, log line or error message can show them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dotenv import dotenv_values

ENV_FILES = (".env", ".env.local")  # later files win
# a job's request shape, the one place these defaults are written (the CLI's flags, RunRequest, RunOptions):
# in flight at once, and so re-sent after a kill, are about DEFAULT_CONCURRENCY x DEFAULT_BATCH_SIZE inputs
DEFAULT_BATCH_SIZE = 50  # inputs per request (-b)
DEFAULT_CONCURRENCY = 4  # requests in flight (--concurrency)


class Secret:
    """A string that never shows itself. `reveal()` is the only way in."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __bool__(self) -> bool:
        return bool(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def load_environment(cwd: Path | None = None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """Merge `.env`, `.env.local` and the process environment (which wins)."""
    cwd = cwd or Path.cwd()
    merged: dict[str, str] = {}
    for name in ENV_FILES:
        path = cwd / name
        if path.is_file():
            merged.update({k: v for k, v in dotenv_values(path).items() if v is not None})
    merged.update(os.environ if environ is None else environ)
    return merged


@dataclass(frozen=True)
class Settings:
    database_url: str | None = None
    auth_token: Secret | None = None
    openai_api_key: Secret | None = None
    openai_base_url: str | None = None
    env_file: str | None = None
    secrets: tuple[str, ...] = field(default=(), repr=False)
    provider: str | None = None  # BACKFILL_PROVIDER (environment, .env.local, .env)
    database_url_source: str | None = None  # "--database-url", "DATABASE_URL", "TURSO_URL from .env", ...

    @property
    def database_url_from_flag(self) -> bool:
        return self.database_url_source == "--database-url"

    def redact(self, text: str) -> str:
        """Replace every known secret in `text` with `***`."""
        for secret in self.secrets:
            if secret:
                text = text.replace(secret, "***")
        return text


def load_settings(
    database_url: str | None = None,
    *,
    openai_base_url: str | None = None,
    cwd: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    env = load_environment(cwd, environ)
    url = database_url or env.get("DATABASE_URL") or env.get("TURSO_URL") or None
    source = _source(database_url, cwd, environ)
    token = env.get("TURSO_AUTH_TOKEN") or env.get("LIBSQL_AUTH_TOKEN") or None
    key = env.get("OPENAI_API_KEY") or None
    base_url = openai_base_url or env.get("OPENAI_BASE_URL") or None
    cwd = cwd or Path.cwd()
    env_file = next((n for n in reversed(ENV_FILES) if (cwd / n).is_file()), None)
    return Settings(
        database_url=url,
        auth_token=Secret(token) if token else None,
        openai_api_key=Secret(key) if key else None,
        openai_base_url=base_url,
        env_file=env_file,
        secrets=tuple(s for s in (token, key, _url_password(url)) if s),
        provider=(env.get("BACKFILL_PROVIDER") or "").strip() or None,
        database_url_source=source,
    )


def _source(flag: str | None, cwd: Path | None, environ: Mapping[str, str] | None) -> str | None:
    """Where the database URL came from, for the one line that says so (never the URL's secrets)."""
    if flag:
        return "--database-url"
    process = os.environ if environ is None else environ
    for name in ("DATABASE_URL", "TURSO_URL"):
        if process.get(name):
            return f"${name}"
        for file in reversed(ENV_FILES):
            path = (cwd or Path.cwd()) / file
            if path.is_file() and dotenv_values(path).get(name):
                return f"{name} in {file}"
    return None


def _url_password(url: str | None) -> str | None:
    if not url or "://" not in url:
        return None
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(url)
    if parts.password:
        return parts.password
    for key in ("authToken", "auth_token"):
        values = parse_qs(parts.query).get(key)
        if values:
            return values[0]
    return None
