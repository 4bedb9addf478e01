"""The LLM path: a local OpenAI-compatible teacher (FastAPI on 127.0.0.1) that answers each stage with real JSON
built by the procedural backend, plus deliberate bad replies: non-JSON text, a data model with a dangling
reference, an invalid record, an invalid tool, a task whose claim is wrong once, and a task that is always bad."""

import json
import re
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request

from orchestra_jax.data import tasks as tasks_lib
from orchestra_jax.data.synth import command, stages
from orchestra_jax.data.synth.llm import LLMError, LLMSettings, StructuredClient
from orchestra_jax.data.synth.procedural import ProceduralBackend
from orchestra_jax.env import domain as dl


class Teacher:
    """Stage replies keyed by the response_format name; state follows the pipeline's call order."""

    def __init__(self, domain: str, seed: int):
        self.backend = ProceduralBackend.for_domain(domain, seed)
        self.name, self.db, self.tools, self.data_model = domain, None, None, None
        self.requests: list[str] = []
        self.task_index = -1
        self.rounds = 0

    def reply(self, stage: str, messages: list[dict]) -> str:
        self.requests.append(stage)
        retry = len(messages) > 2
        prompt = messages[1]["content"]
        b = self.backend
        if stage == "subjects":
            return json.dumps({"subjects": b.subjects(self.name)}) if retry else "Sure! Subjects: fines, holds."
        if stage == "schema":
            return "```json\n" + json.dumps(b.schema(self.name, [])) + "\n```"
        if stage == "data_model":
            self.data_model = b.data_model(self.name, {})
            if not retry:
                broken = json.loads(json.dumps(self.data_model))
                next(iter(broken["tables"].values()))["fields"]["bogus"] = {"type": "string", "description": "x",
                                                                           "ref": "nowhere"}
                return json.dumps(broken)
            return json.dumps(self.data_model)
        if stage == "records":
            per_table = int(re.search(r"Write (\d+) new", prompt).group(1))
            self.db = self.db or {t: {} for t in self.data_model["tables"]}
            proposal = b.records(self.name, self.data_model, self.db, self.rounds, per_table)
            self.rounds += 1
            for table, records in proposal.items():
                self.db[table].update(records)
            bad = {"records": json.loads(json.dumps(proposal))}
            table = next(iter(bad["records"]))
            bad["records"][table]["ZZ9999"] = {"nonsense": True}
            return json.dumps(bad)
        if stage == "tools":
            self.tools = b.tools(self.name, self.data_model)
            return json.dumps({"tools": self.tools + [{"name": "broken_tool", "description": "x", "kind": "read",
                                                       "table": "no_table", "parameters": {}}]})
        if stage == "intents":
            count = int(re.search(r"Write (\d+) distinct", prompt).group(1))
            specs = tuple(dl.tool_from_dict(t) for t in self.tools)
            return json.dumps({"intents": b.intents(self.name, [], specs, count)})
        domain = dl.Domain(self.name, self.data_model, tuple(dl.tool_from_dict(t) for t in self.tools), "", self.db)
        if stage == "task":
            if not retry:
                self.task_index += 1
            intent = re.search(r"customer who says: (.*)\n", prompt).group(1)
            if self.task_index == 3:
                return json.dumps({"user_scenario": {"reason_for_call": "x", "known_info": "y"}, "communicate_info": [],
                                   "actions": [{"name": "teleport", "arguments": {}}], "expected_changes": []})
            try:
                draft = b.task(domain, intent, self.task_index)
            except stages.StageFailed:
                return "no idea"
            if self.task_index == 2 and not retry and draft["expected_changes"]:
                draft = {**draft, "expected_changes": [{**draft["expected_changes"][0], "value": "wrong"}]}
            return json.dumps(draft)
        if stage == "evolve":
            draft = json.loads(prompt.split("TASK:\n```json\n", 1)[1].split("\n```", 1)[0])
            try:
                return json.dumps(b.evolve(domain, draft, 0))
            except stages.StageFailed:
                return json.dumps(draft)
        raise AssertionError(stage)


def make_app(teacher: Teacher) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "fake-teacher", "object": "model"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        stage = body["response_format"]["json_schema"]["name"]
        text = teacher.reply(stage, body["messages"])
        prompt_chars = sum(len(m["content"]) for m in body["messages"])
        return {"id": "x", "object": "chat.completion", "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_chars // 4, "completion_tokens": len(text) // 4}}

    return app


@pytest.fixture
def teacher_url():
    teacher = Teacher("library", seed=int(time.time()) % 1000)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(make_app(teacher), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1", teacher
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


def test_llm_pipeline_validates_retries_filters_and_resumes(tmp_path, teacher_url, capsys):
    url, teacher = teacher_url
    args = command.SynthArgs(domain="library", out=tmp_path / "out", backend="llm", llm=url, num_tasks=8,
                             db_rounds=2, records_per_round=3, max_attempts=2, price_in_per_mtok=1.0,
                             price_out_per_mtok=2.0)
    assert command.run_synth(args) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    usage = report["teacher_usage"]
    assert usage["model"] == "fake-teacher"
    assert usage["total"]["attempts"] > usage["total"]["calls"]  # invalid replies were retried
    assert usage["per_stage"]["subjects"]["attempts"] == 2 and usage["per_stage"]["data_model"]["attempts"] == 2
    assert any(f["stage"] == "task" and "teleport" in f["error"] for f in usage["failures"])
    assert usage["cost_usd"] > 0
    assert report["database"]["rejected"] >= 2 and report["tools"]["invalid"] == 1
    flt = report["filter"]
    assert flt["adds_up"] and flt["candidates"] == 8 and flt["removed"]["malformed"] >= 1

    domain = dl.load_domain(tmp_path / "out" / "library")
    records = tasks_lib.load_tasks(tmp_path / "out" / "tasks.jsonl")
    assert len(records) == flt["kept"] > 0
    for task in dl.load_domain_tasks(tmp_path / "out" / "library"):
        env = dl.DomainEnv(domain, task)
        seen = [env.call(a.name, dict(a.arguments)).observation for a in task.actions]
        assert env.score(seen).reward == 1.0
    assert "teacher fake-teacher" in capsys.readouterr().out

    # A rerun resumes from the cache: only the calls that failed go back to the teacher.
    before = len(teacher.requests)
    assert command.run_synth(args) == 0
    again = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(teacher.requests[before:]) <= {"task", "evolve"}
    assert len(teacher.requests) - before < before
    per_stage = again["teacher_usage"]["per_stage"]
    for stage in ("subjects", "schema", "data_model", "records", "tools", "intents"):
        assert per_stage[stage]["cache_hits"] == per_stage[stage]["calls"] > 0, stage
    assert again["filter"]["adds_up"]


def test_unusable_endpoints_fail_before_any_work(tmp_path, teacher_url):
    url, teacher = teacher_url
    out = tmp_path / "never"
    with pytest.raises(command.SynthUsageError, match="GET /models gave HTTP 404"):
        command.run_synth(command.SynthArgs(domain="library", out=out, backend="llm", llm=url[:-3]))
    with pytest.raises(command.SynthUsageError, match="does not serve model 'gpt-x'"):
        command.run_synth(command.SynthArgs(domain="library", out=out, backend="llm", llm=url, model="gpt-x"))
    with pytest.raises(command.SynthUsageError, match="domain name"):
        command.run_synth(command.SynthArgs(domain="Library Two", out=out, backend="llm", llm=url))
    assert not out.exists() and teacher.requests == []


def mock_client(tmp_path, handler, **settings) -> StructuredClient:
    settings = LLMSettings("http://teacher.test/v1", model="m", max_attempts=3, **settings)
    return StructuredClient(settings, tmp_path / "cache", transport=httpx.MockTransport(handler))


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


def test_client_falls_back_without_response_format_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-value")
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(("response_format" in body, request.headers.get("authorization")))
        if "response_format" in body:
            return httpx.Response(400, json={"error": "response_format unsupported"})
        return httpx.Response(200, json={"choices": [{"message": {"content": '{"n": 7}'}}], "usage": {}})

    client = mock_client(tmp_path, handler)
    result = client.complete_json("s", [{"role": "user", "content": "give n"}], SCHEMA)
    assert result.value == {"n": 7} and result.attempts == 1
    assert seen == [(True, "Bearer sk-secret-value"), (False, "Bearer sk-secret-value")]
    cached = client.complete_json("s", [{"role": "user", "content": "give n"}], SCHEMA)
    assert cached.cached and cached.value == {"n": 7} and len(seen) == 2
    assert "sk-secret" not in "".join(p.read_text() for p in (tmp_path / "cache").rglob("*.json"))


def test_client_retries_with_the_error_then_records_failure(tmp_path):
    prompts = []

    def handler(request: httpx.Request) -> httpx.Response:
        messages = json.loads(request.content)["messages"]
        prompts.append(messages[-1]["content"])
        return httpx.Response(200, json={"choices": [{"message": {"content": '{"n": "seven"}'}}]})

    client = mock_client(tmp_path, handler)
    result = client.complete_json("s", [{"role": "user", "content": "give n"}], SCHEMA)
    assert result.value is None and result.last_value == {"n": "seven"} and result.attempts == 3
    assert "'seven' is not of type 'integer'" in prompts[1] and len(prompts) == 3
    assert client.report()["failures"][0]["stage"] == "s"
    assert not (tmp_path / "cache" / "s").exists()  # failures are not cached


def test_transport_failure_mid_run_is_one_line(tmp_path):
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    with pytest.raises(LLMError, match="failed during stage s: ConnectError"):
        mock_client(tmp_path, handler).complete_json("s", [{"role": "user", "content": "x"}], SCHEMA)
