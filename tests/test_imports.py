"""What a command loads is part of what a user waits for: the OpenAI SDK alone is ~0.3-0.6 s of start-up.
Commands that send nothing (and an `up` with nothing to do) must not load it, nor numpy; read from the
interpreter's own import log (`-X importtime`) of the real command on a real database."""

from __future__ import annotations

import os
import subprocess
import sys

import sqlalchemy as sa

from conftest import ROOT
from engine_helpers import RUN_ARGS, build, env_for
from support.fake_openai import FakeOpenAI


def _loaded(args: list[str], env: dict[str, str]) -> tuple[int, set[str]]:
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "backfill", *args], capture_output=True,
                         text=True, cwd=ROOT, env={**os.environ, **env}, timeout=120)
    top = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in out.stderr.splitlines()
           if line.startswith("import time:") and line.count("|") == 2}
    return out.returncode, top


def test_commands_that_send_nothing_load_neither_the_sdk_nor_numpy(tmp_path, cli):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    build(sa.create_engine(url), memories=20, entities=0)
    with FakeOpenAI() as server:
        env = env_for(server, url)
        done = cli("up", *RUN_ARGS, "--target", "memories", env=env)  # a sync job, finished: every row has a vector
        assert done.code == 0, done.output[-2000:]
        code, top = _loaded(["up", *RUN_ARGS, "--target", "memories"], env)  # nothing to do
        assert code == 0 and "backfill" in top and "sqlalchemy" in top, top  # the log was read
        assert not {"openai", "numpy"} & top, "a no-op up loaded the SDK or numpy"
        for command in (["status"], ["jobs"], ["stats"], ["verify"]):
            code, top = _loaded(command, env)
            assert code == 0, command
            assert not {"openai", "numpy"} & top, f"`backfill {' '.join(command)}` loaded the SDK or numpy"
