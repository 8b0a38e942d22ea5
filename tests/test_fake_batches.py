"""The fake server's Files and Batch APIs, driven by the real openai SDK over loopback."""

from __future__ import annotations

import io
import json
import socket

import openai
import pytest

from support.fake_openai import FakeOpenAI, fake_vector

MODEL = "text-embedding-3-small"


def _line(custom_id: str, texts: list[str], dims: int = 8, url: str = "/v1/embeddings") -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url,
            "body": {"model": MODEL, "input": texts, "dimensions": dims}}


def _jsonl(lines: list[dict]) -> bytes:
    return ("\n".join(json.dumps(line) for line in lines) + "\n").encode()


def _client(server: FakeOpenAI, **kw) -> openai.OpenAI:
    return openai.OpenAI(api_key="sk-test", base_url=server.base_url, max_retries=0, **kw)


def _upload(client: openai.OpenAI, lines: list[dict], name: str = "in.jsonl") -> str:
    return client.files.create(file=(name, io.BytesIO(_jsonl(lines)), "application/jsonl"), purpose="batch").id


def _results(client: openai.OpenAI, file_id: str | None) -> dict[str, dict]:
    if not file_id:
        return {}
    content = client.files.content(file_id).text
    return {o["custom_id"]: o for o in map(json.loads, content.splitlines())}


def test_a_batch_answers_every_line_with_the_sync_vectors_and_counts_what_was_uploaded_and_billed():
    with FakeOpenAI(fail_inputs=["REJECT"]) as server:
        server.batches.configure(polls_to_complete=3)
        client = _client(server)
        lines = [_line("a", ["alpha", "beta"]), _line("b", ["gamma"]), _line("c", ["ok", "REJECT me"])]
        file_id = _upload(client, lines)
        batch = client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h",
                                      metadata={"backfill_file": "in.jsonl"})
        assert batch.status == "validating" and batch.metadata == {"backfill_file": "in.jsonl"}
        statuses = [client.batches.retrieve(batch.id).status for _ in range(3)]
        assert statuses == ["in_progress", "in_progress", "completed"]
        done = client.batches.retrieve(batch.id)
        assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (3, 2, 1)
        out, errors = _results(client, done.output_file_id), _results(client, done.error_file_id)
        assert set(out) == {"a", "b"} and set(errors) == {"c"}
        body = out["a"]["response"]["body"]
        assert out["a"]["response"]["status_code"] == 200
        assert [d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])] == [
            fake_vector("alpha", 8, MODEL), fake_vector("beta", 8, MODEL)]
        assert body["usage"]["prompt_tokens"] > 0
        assert errors["c"]["response"]["status_code"] == 400
        stats = server.batches.stats()
        assert stats["uploaded_lines"] == 3 and stats["uploaded_inputs"] == 5
        assert stats["billed_lines"] == 2 and stats["billed_inputs"] == 3 and stats["failed_lines"] == 1
        assert stats["batches_created"] == 1 and stats["duplicate_custom_ids"] == 0
        assert server.stats()["requests"] == 0  # the synchronous endpoint was not used


def test_hold_is_the_fast_forward_switch():
    with FakeOpenAI() as server:
        server.batches.configure(hold=True, polls_to_complete=1)
        client = _client(server)
        batch = client.batches.create(input_file_id=_upload(client, [_line("x", ["one"])]),
                                      endpoint="/v1/embeddings", completion_window="24h")
        assert {client.batches.retrieve(batch.id).status for _ in range(5)} == {"in_progress"}
        assert server.batches.complete_batches() == 1
        assert client.batches.retrieve(batch.id).status == "completed"
        assert server.batches.stats()["billed_inputs"] == 1
        assert server.batches.configure(hold=False)["hold"] is False


def test_files_and_batches_list_page_by_page_newest_first():
    with FakeOpenAI() as server:
        client = _client(server)
        names = [f"f{i}.jsonl" for i in range(5)]
        ids = [_upload(client, [_line(f"c{i}", [f"t{i}"])], name) for i, name in enumerate(names)]
        first = client.files.list(purpose="batch", limit=2)
        assert len(first.data) == 2 and first.has_more
        assert [f.filename for f in client.files.list(purpose="batch", limit=2)] == names[::-1]  # auto-paginates
        for fid in ids[:3]:
            client.batches.create(input_file_id=fid, endpoint="/v1/embeddings", completion_window="24h")
        assert [b.input_file_id for b in client.batches.list(limit=1)] == ids[:3][::-1]
        assert client.files.retrieve(ids[0]).filename == "f0.jsonl"
        with pytest.raises(openai.NotFoundError):
            client.files.retrieve("file-nope")


def test_cancel_moves_through_cancelling_and_a_finished_batch_cannot_be_cancelled():
    with FakeOpenAI() as server:
        server.batches.configure(hold=True)
        client = _client(server)
        fid = _upload(client, [_line("x", ["one"])])
        running = client.batches.create(input_file_id=fid, endpoint="/v1/embeddings", completion_window="24h")
        assert client.batches.cancel(running.id).status == "cancelling"
        assert client.batches.retrieve(running.id).status == "cancelled"
        server.batches.configure(hold=False, polls_to_complete=0)
        finished = client.batches.create(input_file_id=fid, endpoint="/v1/embeddings", completion_window="24h")
        assert finished.status == "completed"
        with pytest.raises(openai.ConflictError):
            client.batches.cancel(finished.id)
        assert server.batches.stats()["cancels"] == 1


@pytest.mark.parametrize("lines, code", [
    ([_line("same", ["a"]), _line("same", ["b"])], "duplicate_custom_id"),
    ([_line("x", ["a"], url="/v1/chat/completions")], "mismatched_endpoint"),
])
def test_an_invalid_input_file_fails_the_batch(lines, code):
    with FakeOpenAI() as server:
        client = _client(server)
        batch = client.batches.create(input_file_id=_upload(client, lines), endpoint="/v1/embeddings",
                                      completion_window="24h")
        assert batch.status == "failed" and batch.errors.data[0].code == code
        assert server.batches.stats()["billed_lines"] == 0


def test_bad_create_requests_are_refused():
    with FakeOpenAI() as server:
        client = _client(server)
        with pytest.raises(openai.BadRequestError):
            client.batches.create(input_file_id="file-missing", endpoint="/v1/embeddings", completion_window="24h")
        fid = _upload(client, [_line("x", ["a"])])
        with pytest.raises(openai.BadRequestError):
            client.batches.create(input_file_id=fid, endpoint="/v1/completions", completion_window="24h")
        server.configure(api_key="sk-right")
        with pytest.raises(openai.AuthenticationError):
            client.files.list()


def test_a_file_is_stored_before_the_answer_so_a_client_that_gave_up_finds_it_by_name():
    with FakeOpenAI() as server:
        server.batches.configure(upload_delay_s=5)
        impatient = _client(server, timeout=0.5)
        with pytest.raises(openai.APITimeoutError):
            _upload(impatient, [_line("x", ["a"])], "kept.jsonl")
        assert [f.filename for f in _client(server).files.list(purpose="batch")] == ["kept.jsonl"]


def test_an_upload_cut_short_stores_nothing():
    with FakeOpenAI() as server:
        body = (b"--BOUND\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
                b"--BOUND\r\nContent-Disposition: form-data; name=\"file\"; filename=\"cut.jsonl\"\r\n\r\n"
                + _jsonl([_line("x", ["a"])]))  # no closing boundary: the client died mid-body
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk\r\n"
                         b"Content-Type: multipart/form-data; boundary=BOUND\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert b" 400 " in sock.recv(4096).split(b"\r\n", 1)[0] + b" "
        stats = server.batches.stats()
        assert stats["files_uploaded"] == 0 and stats["uploads_refused"] == 1
        assert list(_client(server).files.list(purpose="batch")) == []


def test_a_cut_download_drops_the_connection_halfway_once():
    with FakeOpenAI() as server:
        server.batches.configure(polls_to_complete=0, cut_downloads=1)
        client = _client(server)
        batch = client.batches.create(input_file_id=_upload(client, [_line(f"c{i}", [f"t{i}"]) for i in range(50)]),
                                      endpoint="/v1/embeddings", completion_window="24h")
        with pytest.raises(openai.APIConnectionError):
            client.files.content(batch.output_file_id).read()
        assert len(_results(client, batch.output_file_id)) == 50  # the next download is whole
        assert server.batches.stats()["content_downloads"] == 2


def test_the_enqueued_token_limit_refuses_a_batch_until_the_queue_has_room():
    with FakeOpenAI() as server:
        server.batches.configure(token_queue_limit=10, polls_to_complete=1)
        client = _client(server)
        fid = _upload(client, [_line("x", ["one two three four five six"])])  # 6 tokens
        first = client.batches.create(input_file_id=fid, endpoint="/v1/embeddings", completion_window="24h")
        refused = client.batches.create(input_file_id=fid, endpoint="/v1/embeddings", completion_window="24h")
        assert first.status == "validating"
        assert refused.status == "failed" and refused.errors.data[0].code == "token_limit_exceeded"
        assert client.batches.retrieve(first.id).status == "completed"  # leaves the queue
        again = client.batches.create(input_file_id=fid, endpoint="/v1/embeddings", completion_window="24h")
        assert again.status == "validating"
