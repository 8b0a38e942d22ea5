"""Test doubles, not shipped in the wheel: a fake OpenAI-compatible server (fake_openai) and a loopback
libSQL remote server (libsql_server). Tests import them as `support.*` (tests/ is on sys.path under pytest);
scripts put tests/ on sys.path first."""
